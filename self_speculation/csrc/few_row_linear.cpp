// y = x w^T for the few-row products of decoding: x [rows, in] with 1 <= rows <= 8, w [out, in].
//
// A decoding step multiplies one row (autoregressive decoding, drafting) or k + 1 rows
// (verification) by every weight matrix. Reading the weights is the cost; BLAS sgemm, built
// for many rows, packs its operands and does not stream them. Here every weight row is read
// once for all rows of x (which stays in L1): a 6-row product costs little more than a 1-row
// one. Vectors are GCC/Clang vector extensions, so the file builds on any CPU the compiler
// targets (-march=native on the machine that runs it).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>

namespace {

typedef float Vec8 __attribute__((vector_size(32)));

inline Vec8 load(const float* pointer) {
  Vec8 vector;
  std::memcpy(&vector, pointer, sizeof(vector));
  return vector;
}

inline float horizontal_sum(Vec8 vector) {
  float sum = 0.0f;
  for (int lane = 0; lane < 8; ++lane) sum += vector[lane];
  return sum;
}

// Output columns [first, last): kBlock weight rows at a time, kRows accumulators each.
template <int kRows, int kBlock>
void columns(const float* x, const float* w, float* y, int64_t in, int64_t out, int64_t first,
             int64_t last) {
  int64_t column = first;
  for (; column + kBlock <= last; column += kBlock) {
    Vec8 sums[kBlock][kRows] = {};
    int64_t k = 0;
    for (; k + 8 <= in; k += 8) {
      Vec8 inputs[kRows];
      for (int row = 0; row < kRows; ++row) inputs[row] = load(x + row * in + k);
      for (int block = 0; block < kBlock; ++block) {
        const Vec8 weights = load(w + (column + block) * in + k);
        for (int row = 0; row < kRows; ++row) sums[block][row] += inputs[row] * weights;
      }
    }
    for (int block = 0; block < kBlock; ++block) {
      const float* weight_row = w + (column + block) * in;
      for (int row = 0; row < kRows; ++row) {
        float sum = horizontal_sum(sums[block][row]);
        for (int64_t tail = k; tail < in; ++tail) sum += x[row * in + tail] * weight_row[tail];
        y[row * out + column + block] = sum;
      }
    }
  }
  for (; column < last; ++column) {
    const float* weight_row = w + column * in;
    for (int row = 0; row < kRows; ++row) {
      float sum = 0.0f;
      for (int64_t k = 0; k < in; ++k) sum += x[row * in + k] * weight_row[k];
      y[row * out + column] = sum;
    }
  }
}

template <int kRows>
void product(const float* x, const float* w, float* y, int64_t in, int64_t out) {
  // Enough independent accumulators to hide FMA latency, few enough to stay in registers.
  constexpr int kBlock = kRows <= 2 ? 4 : (kRows <= 4 ? 2 : 1);
  at::parallel_for(0, out, 64, [&](int64_t first, int64_t last) {
    columns<kRows, kBlock>(x, w, y, in, out, first, last);
  });
}

at::Tensor few_row_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "few_row_linear: x [rows, in] and w [out, in] expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "few_row_linear: float32 only");
  const at::Tensor x_contiguous = x.contiguous();
  const at::Tensor w_contiguous = w.contiguous();
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0);
  at::Tensor y = at::empty({rows, out}, x.options());
  const float* x_data = x_contiguous.data_ptr<float>();
  const float* w_data = w_contiguous.data_ptr<float>();
  float* y_data = y.data_ptr<float>();
  switch (rows) {
    case 1: product<1>(x_data, w_data, y_data, in, out); break;
    case 2: product<2>(x_data, w_data, y_data, in, out); break;
    case 3: product<3>(x_data, w_data, y_data, in, out); break;
    case 4: product<4>(x_data, w_data, y_data, in, out); break;
    case 5: product<5>(x_data, w_data, y_data, in, out); break;
    case 6: product<6>(x_data, w_data, y_data, in, out); break;
    case 7: product<7>(x_data, w_data, y_data, in, out); break;
    case 8: product<8>(x_data, w_data, y_data, in, out); break;
    default: return at::mm(x_contiguous, w_contiguous.t());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(layerskip, library) { library.def("few_row_linear(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(layerskip, CPU, library) { library.impl("few_row_linear", &few_row_linear); }
