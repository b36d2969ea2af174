"""Killing tests for hand mutants of the model glue (draft exits, surgery, passes) that the
other tests let through: each pins one behaviour that changes no greedy output yet is
promised (draft logits equal the full head's on the kept rows, ...)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import ConfigError, Generator, LayerwiseModel, UnsupportedModelError
from self_speculation.draft import DraftExit, ExitAdapter, rank_tokens


@pytest.mark.parametrize("family", ["gemma2_softcap_sliding", "cohere", "granite_scalars"])
def test_reduced_vocab_draft_logits_get_the_family_s_scaling_and_soft_capping(
    family: str,
) -> None:
    """The draft head over N rows is the full head restricted to them: soft-capping,
    Cohere's logit scale and Granite's logits_scaling included (without them, sampled
    drafts come from another distribution and are rejected more often)."""
    generator = Generator(make_tiny_model(family), make_tiny_tokenizer())
    layerwise = generator.layerwise
    vocab = torch.arange(0, layerwise.lm_head.weight.shape[0], 3)  # [N]
    draft = DraftExit(layerwise, None, vocab)
    hidden = 4 * torch.randn(2, 3, layerwise.config.hidden_size, dtype=torch.float64)
    full = layerwise.unembed(hidden)  # [2, 3, vocab]
    torch.testing.assert_close(draft.small_logits(hidden), full[..., vocab])
    torch.testing.assert_close(draft.head(hidden)[..., vocab], full[..., vocab])


def test_a_biased_lm_head_s_draft_rows_keep_their_own_bias() -> None:
    """A head with a bias: the reduced vocabulary's rows take the bias of their own ids."""
    model = make_tiny_model("llama_mha_untied")
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=torch.float64)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(torch.linspace(-3, 3, head.out_features, dtype=torch.float64))
    model.lm_head = biased
    layerwise = Generator(model, make_tiny_tokenizer()).layerwise
    vocab = torch.tensor([2, 50, 51, 200, 319])
    hidden = torch.randn(1, 2, layerwise.config.hidden_size, dtype=torch.float64)
    draft = DraftExit(layerwise, None, vocab)
    torch.testing.assert_close(draft.small_logits(hidden), layerwise.unembed(hidden)[..., vocab])


def test_an_exit_adapter_at_or_past_the_last_layer_is_refused() -> None:
    """E = L has nothing to adapt (the full model's own head): one ConfigError."""
    layerwise = Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer()).layerwise
    for exit_layer in (0, layerwise.num_layers, layerwise.num_layers + 1):
        with pytest.raises(ConfigError, match="exit layer must be in"):
            ExitAdapter(layerwise, exit_layer)


def test_tokens_are_ranked_most_frequent_first_ties_by_id() -> None:
    ranked = rank_tokens(torch.tensor([3, 3, 3, 1, 1, 4, 4, 2]), vocab_size=6)
    assert ranked.tolist() == [3, 1, 4, 2, 0, 5]


@pytest.mark.parametrize("family", ["llama_longrope", "llama_dynamic_rope"])
def test_lookahead_positions_past_the_rotary_limit_leave_earlier_tables_alone(
    family: str,
) -> None:
    """Verification's spare columns may run past the usable context; clamped to the last
    usable position, they must not switch the tables of the positions that count
    (longrope's long factors, dynamic RoPE's growth start past the limit)."""
    layerwise = LayerwiseModel(make_tiny_model(family))
    limit = layerwise.rotary_position_limit
    assert limit is not None
    hidden = layerwise.embed(torch.tensor([[1, 2, 3]]))  # [1, 3, hidden]
    alone = layerwise._rotary(hidden[:, :2], set(), torch.tensor([[0, limit - 1]]))[None]
    beside = layerwise._rotary(hidden, set(), torch.tensor([[0, limit - 1, limit + 5]]))[None]
    for table, paired in zip(alone, beside, strict=True):
        torch.testing.assert_close(paired[:, :2], table, rtol=0, atol=0)
        torch.testing.assert_close(paired[:, 2], table[:, 1], rtol=0, atol=0)


def test_cohere_s_logit_scale_is_the_one_its_model_holds() -> None:
    """Cohere copies logit_scale onto the model when it is built; a config changed later
    changes nothing in the model's forward, so nothing in the engine's either."""
    model = make_tiny_model("cohere")
    model.config.logit_scale = 2.0  # the model keeps 0.5
    layerwise = LayerwiseModel(model)  # the load-time probe compares with model's forward
    tokens = torch.tensor([[3, 17, 42, 5]])
    torch.testing.assert_close(layerwise.logits(tokens), model(input_ids=tokens).logits)


def test_a_layer_range_past_the_model_is_one_value_error() -> None:
    layerwise = LayerwiseModel(make_tiny_model("llama_gqa_tied"))
    hidden = layerwise.embed(torch.tensor([[1, 2]]))
    positions = torch.arange(2)[None]
    for start, end in ((0, layerwise.num_layers + 1), (3, 2), (-1, 2)):
        with pytest.raises(ValueError, match="outside"):
            layerwise.run_layers(hidden, start, end, None, positions)


def test_phi3_s_context_ends_where_its_generation_hook_would_rerun_the_cache() -> None:
    """Phi-3's prepare_inputs_for_generation drops the cache past
    original_max_position_embeddings, also with a static RoPE: decoding ends there."""
    model = make_tiny_model("phi3", original_max_position_embeddings=16)
    layerwise = LayerwiseModel(model)
    assert model.config.max_position_embeddings > 16
    assert layerwise.context_length == 16
    assert "re-runs" in layerwise.context_source


def test_layer_types_listing_more_layers_than_the_model_has_are_refused() -> None:
    model = make_tiny_model("gemma3_text")
    config = model.config
    config.layer_types = [*config.layer_types, "full_attention"]
    with pytest.raises(UnsupportedModelError, match="lists 5 layers for 4"):
        LayerwiseModel(model)


def test_few_query_attention_without_a_scaling_uses_sdpa_s_default() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from self_speculation.attention import few_query_attention

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 2, 8, generator=generator)
    key, value = (torch.randn(1, 2, 5, 8, generator=generator) for _ in "kv")
    mask = torch.arange(5) <= 3 + torch.arange(2)[None, None, :, None]  # [1, 1, 2, 5]
    expected, _ = sdpa_attention_forward(module, query, key, value, mask)
    output, _ = few_query_attention(module, query, key, value, mask)
    torch.testing.assert_close(output, expected)


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_a_step_with_its_books_adds_no_token_to_a_finished_row(strategy: str) -> None:
    """The compiled path's one-call steps (``decode_step``, ``counted_greedy_step``, run
    eagerly here): a row whose books say it stopped keeps its length and tokens."""
    from test_equivalence import BATCH_PROMPTS, generator_for, greedy

    from self_speculation.bookkeeping import RowBooks

    generator = generator_for("llama_mha_untied")
    extra = dict(exit_layer=2, num_speculations=2) if strategy == "self_speculative" else {}
    config = generator.resolve(greedy(8, generation_strategy=strategy, **extra))
    state = generator._strategy(config, None).prefill(BATCH_PROMPTS[:2], generator.pad_token_id, 8)
    passes = generator._passes(config)
    books = RowBooks.start([8, 8], [], state.lengths.device)
    books.reason = torch.tensor([0, 1])  # row 1 stopped
    common = (state.tokens, state.lengths, state.cache, state.pad_counts)
    if strategy == "autoregressive":
        outputs = passes.decode_step(*common, books.tensors(), config.exit_layer)
    else:
        made = torch.tensor([2])
        outputs = passes.counted_greedy_step(*common, made, books.tensors(), 2, 2)
    tokens, lengths, counts = outputs[0], outputs[1], outputs[3]
    assert counts.tolist()[1] == 0 and counts.tolist()[0] >= 1
    assert lengths[1] == state.lengths[1] and lengths[0] > state.lengths[0]
    assert tokens[1].equal(state.tokens[1])


def test_an_adapter_s_drafts_for_a_left_padded_row_equal_the_row_s_own() -> None:
    """``early`` at the exit layer hands the adapter each row's own positions (columns less
    the row's left padding), as prefill and verification do."""
    from self_speculation.passes import ForwardPasses

    generator = Generator(make_tiny_model("llama_mha_untied"), make_tiny_tokenizer())
    layerwise = generator.layerwise
    adapter = ExitAdapter(layerwise, 2)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, dtype=parameter.dtype))
    passes = ForwardPasses(layerwise, draft=DraftExit(layerwise, adapter.requires_grad_(False)))

    def drafts(prompts: list[list[int]]) -> torch.Tensor:
        width = max(map(len, prompts))
        pad_counts = torch.tensor([width - len(prompt) for prompt in prompts])
        tokens = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        cache = passes.new_cache(len(prompts), width + 4)
        passes.prefill(tokens, cache, pad_counts, layerwise.num_layers)
        columns = torch.full((len(prompts), 1), width)
        logits, _ = passes.early(torch.tensor([[7]] * len(prompts)), columns, cache, pad_counts, 2)
        return logits  # [batch, vocab]

    alone = drafts([[5, 60, 7]])
    batched = drafts([[5, 60, 7], [9, 8, 40, 41, 42, 43]])
    torch.testing.assert_close(batched[:1], alone)


def test_a_torch_dtype_argument_is_taken_for_its_own_name() -> None:
    from self_speculation.loading import _check_load_arguments

    for name in ("float32", "bfloat16", "float16", "float64"):
        dtype = getattr(torch, name)
        assert _check_load_arguments("m", dtype, torch.device("cpu"), None) == ("m", name, "cpu")
