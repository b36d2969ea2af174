"""Exit adapters and reduced draft vocabularies change the drafts, never the output.

* Greedy self-speculation with an adapter, a reduced draft vocabulary or both equals
  autoregressive decoding (several families, sliding windows, batches of unequal prompts).
* The adapter's KV cache is filled and rolled back like the model's: an adapter that is a
  copy of the last layer, at exit L - 1, reproduces the full model exactly, so every draft
  must be accepted; a missing or stale adapter column would make drafts disagree.
* Sampling with an adapter and a reduced vocabulary keeps the full model's distribution
  (enumerated, k = 3 drafts, warpers on; ``test_sampling_distribution``'s machinery).
* Saving and loading an adapter, and every way a wrong adapter is refused.
* Training an adapter changes no base weight, changes the adapter, and resumes.
"""

from __future__ import annotations

import dataclasses
import json
import signal

import pytest
import torch
from test_sampling_distribution import (
    LENGTH,
    OTHER_PROMPT,
    PROMPT,
    Tally,
    config,
    exact_joint,
    tiny_generator,
)
from tiny_models import VOCAB_SIZE, make_tiny_model, make_tiny_tokenizer

from self_speculation import ConfigError, GenerationConfig, Generator, ModelLoadError
from self_speculation.draft import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterConfig,
    DraftExit,
    ExitAdapter,
    load_draft_exit,
    save_adapter,
)

FAMILIES = ["llama_gqa_tied", "qwen2_sliding", "gemma2_softcap_sliding", "gemma3_text", "phi3"]
PROMPTS = [[5, 60, 7, 200, 31, 8, 9], [9], [40, 41, 42]]
NUM_LAYERS = 4


def greedy(**settings) -> GenerationConfig:
    return GenerationConfig(max_steps=20, sample=False, **settings)


def speculative(exit_layer: int, k: int, **settings) -> GenerationConfig:
    return greedy(
        generation_strategy="self_speculative",
        exit_layer=exit_layer,
        num_speculations=k,
        **settings,
    )


def perturbed_adapter(generator: Generator, exit_layer: int, seed: int = 0) -> ExitAdapter:
    """An adapter unlike any base layer (its drafts are sometimes right, often wrong)."""
    adapter = ExitAdapter(generator.layerwise, exit_layer)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.parameters():
            noise = torch.randn(parameter.shape, generator=rng, dtype=parameter.dtype)
            parameter.add_(0.1 * noise)
    return adapter.requires_grad_(False)


def ranked_vocab(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(VOCAB_SIZE, generator=torch.Generator().manual_seed(seed))[:size]


def draft_exits(generator: Generator) -> dict[str, DraftExit]:
    """Draft exits at layer 2: an adapter, a reduced vocabulary, and both."""
    model = generator.layerwise
    return {
        "adapter": DraftExit(model, perturbed_adapter(generator, 2)),
        "vocab": DraftExit(model, None, ranked_vocab(96).sort().values),
        "both": DraftExit(model, perturbed_adapter(generator, 2, seed=1), ranked_vocab(64)),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_adapter_or_reduced_vocab_equals_autoregressive(family: str) -> None:
    generator = Generator(make_tiny_model(family), make_tiny_tokenizer())
    reference = [result.token_ids for result in generator.generate_batch(PROMPTS, greedy())]
    for name, draft in draft_exits(generator).items():
        generator.draft = draft
        for k in (1, 3):
            batch = generator.generate_batch(PROMPTS, speculative(2, k))
            assert [result.token_ids for result in batch] == reference, (name, k)
        alone = generator.generate(PROMPTS[0], speculative(2, 4))
        assert alone.token_ids == reference[0], name
        assert alone.num_drafted > 0


@pytest.mark.parametrize("family", ["llama_mha_untied", "gemma2_softcap_sliding"])
def test_adapter_cache_columns_are_filled_and_rolled_back(family: str) -> None:
    """At exit L - 1, an unchanged copy of the last layer IS the full model's last layer:
    drafting with it from a correct cache reproduces the full model's tokens, so every
    draft is accepted. The adapter's columns come from the prefill, from drafting, and
    from verification's last-draft pass; a missing one breaks the agreement."""
    generator = Generator(make_tiny_model(family), make_tiny_tokenizer())
    reference = [result.token_ids for result in generator.generate_batch(PROMPTS, greedy())]
    adapter = ExitAdapter(generator.layerwise, NUM_LAYERS - 1).requires_grad_(False)
    generator.draft = DraftExit(generator.layerwise, adapter)
    for k in (2, 5):
        batch = generator.generate_batch(PROMPTS, speculative(NUM_LAYERS - 1, k))
        assert [result.token_ids for result in batch] == reference
        for result in batch:
            assert result.num_drafted > 0
            assert result.num_accepted == result.num_drafted, (k, result.metrics())
    # Early-exit decoding through the same adapter is the full model too.
    early = generator.generate_batch(PROMPTS, greedy(exit_layer=NUM_LAYERS - 1))
    assert [result.token_ids for result in early] == reference


def test_exit_layer_comes_from_the_adapter_and_others_are_refused() -> None:
    generator = Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer())
    generator.draft = DraftExit(generator.layerwise, perturbed_adapter(generator, 2))
    result = generator.generate(
        PROMPTS[0], greedy(generation_strategy="self_speculative", num_speculations=2)
    )
    assert result.exit_layer == 2
    with pytest.raises(ConfigError, match="trained for exit layer 2"):
        generator.generate(PROMPTS[0], speculative(3, 2))
    # The full model (exit L) needs no draft exit and is always allowed.
    assert generator.generate(PROMPTS[0], greedy()).exit_layer == NUM_LAYERS


def test_reduced_vocab_drafts_only_its_tokens() -> None:
    generator = Generator(make_tiny_model("qwen2"), make_tiny_tokenizer())
    vocab = ranked_vocab(32)
    draft = DraftExit(generator.layerwise, None, vocab.sort().values)
    hidden = torch.randn(2, 3, generator.layerwise.config.hidden_size, dtype=torch.float64)
    logits = draft.head(hidden)  # [2, 3, vocab]
    full = generator.layerwise.unembed(hidden)
    inside = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
    inside[vocab] = True
    assert torch.isinf(logits[..., ~inside]).all()
    torch.testing.assert_close(logits[..., inside], full[..., inside])
    mapping = draft.full_to_draft()
    assert torch.equal(draft.draft_ids(mapping[vocab]), vocab)
    assert (mapping[~inside] == -1).all()


@pytest.mark.slow
def test_sampling_with_adapter_and_reduced_vocab_keeps_the_distribution() -> None:
    """1000 seeded draws of one prompt and 250 batches of two unequal prompts, k = 3,
    temperature / top-k / top-p on, drafts from a perturbed adapter over 8 of 12 tokens."""
    generator = tiny_generator()
    adapter = ExitAdapter(generator.layerwise, 1)
    with torch.no_grad():
        rng = torch.Generator().manual_seed(3)
        for parameter in adapter.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=rng))
    adapter.requires_grad_(False)
    vocab = torch.tensor([0, 1, 2, 4, 5, 7, 9, 11])
    generator.draft = DraftExit(generator.layerwise, adapter, vocab)
    rng = torch.Generator().manual_seed(0)
    exact = exact_joint(generator.model, PROMPT, LENGTH)
    tally = Tally()
    for _ in range(1000):
        tally.add(generator.generate(PROMPT, config(), generator=rng))
    tally.check(exact, "adapter, one prompt")
    tally, other = Tally(), Tally()
    for _ in range(250):
        first, second = generator.generate_batch([PROMPT, OTHER_PROMPT], config(), generator=rng)
        tally.add(first)
        other.add(second)
    tally.check(exact, "adapter, batch row 0")
    other.check(exact_joint(generator.model, OTHER_PROMPT, LENGTH), "adapter, batch row 1")


def test_save_and_load_round_trip(tmp_path) -> None:
    generator = Generator(
        make_tiny_model("llama_gqa_tied", dtype=torch.float32), make_tiny_tokenizer()
    )
    model = generator.layerwise
    adapter = perturbed_adapter(generator, 2)
    ranking = ranked_vocab(VOCAB_SIZE)
    settings = AdapterConfig(exit_layer=2, num_layers=NUM_LAYERS, hidden_size=32, init_layer=3)
    save_adapter(tmp_path, adapter, settings, ranking)
    loaded = load_draft_exit(model, tmp_path, draft_vocab_size=50)
    assert loaded.exit_layer == 2
    assert torch.equal(loaded.vocab, ranking[:50].sort().values)
    for name, tensor in adapter.block.state_dict().items():
        expected = tensor.to(torch.bfloat16).float()  # adapters are stored in bfloat16
        torch.testing.assert_close(loaded.adapter.block.state_dict()[name], expected)
    assert load_draft_exit(model, tmp_path).vocab is None  # N = 0: the whole vocabulary
    assert load_draft_exit(model) is None
    generator.draft = loaded
    reference = generator.generate(PROMPTS[0], greedy()).token_ids
    assert generator.generate(PROMPTS[0], speculative(2, 3)).token_ids == reference


def test_wrong_adapters_are_refused(tmp_path) -> None:
    generator = Generator(
        make_tiny_model("llama_gqa_tied", dtype=torch.float32), make_tiny_tokenizer()
    )
    model = generator.layerwise
    settings = AdapterConfig(exit_layer=2, num_layers=NUM_LAYERS, hidden_size=32, init_layer=3)
    save_adapter(tmp_path / "good", perturbed_adapter(generator, 2), settings, ranked_vocab(100))
    with pytest.raises(ConfigError, match="not an adapter folder"):
        load_draft_exit(model, tmp_path / "missing")
    with pytest.raises(ConfigError, match="more than the 100 ranked"):
        load_draft_exit(model, tmp_path / "good", draft_vocab_size=101)
    with pytest.raises(ConfigError, match="needs a token ranking"):
        load_draft_exit(model, None, draft_vocab_size=10)
    other = Generator(
        make_tiny_model("llama_gqa_tied", dtype=torch.float32, num_hidden_layers=6),
        make_tiny_tokenizer(),
    )
    with pytest.raises(ConfigError, match="6 of width 32"):
        load_draft_exit(other.layerwise, tmp_path / "good")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ADAPTER_CONFIG_NAME).write_text((tmp_path / "good" / ADAPTER_CONFIG_NAME).read_text())
    (broken / ADAPTER_WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_draft_exit(model, broken)
    (broken / ADAPTER_CONFIG_NAME).write_text(json.dumps({"exit_layer": "two"}))
    with pytest.raises(ConfigError, match="malformed|must be an integer"):
        load_draft_exit(model, broken)
    repeated = tmp_path / "repeated"
    save_adapter(repeated, perturbed_adapter(generator, 2), settings, torch.full((40,), 7))
    with pytest.raises(ConfigError, match="distinct"):
        load_draft_exit(model, repeated)


def test_a_draft_exit_that_does_not_fit_is_refused_when_given() -> None:
    """The Python API: a DraftExit of another model, ids out of range or an adapter in
    another dtype fail when given, in one line, not mid-generation."""
    generator = Generator(
        make_tiny_model("llama_gqa_tied", dtype=torch.float32), make_tiny_tokenizer()
    )
    other = Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), make_tiny_tokenizer())
    with pytest.raises(ConfigError, match="built for another model"):
        generator.draft = DraftExit(other.layerwise, perturbed_adapter(other, 2))
    with pytest.raises(ConfigError, match="outside this model's vocabulary"):
        DraftExit(generator.layerwise, None, torch.tensor([3, VOCAB_SIZE]))
    with pytest.raises(ConfigError, match="float64"):
        DraftExit(generator.layerwise, perturbed_adapter(generator, 2).double())


def test_training_changes_only_the_adapter_and_resumes(tmp_path) -> None:
    from train_adapter import AdapterTrainArguments, train_adapter

    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    tokenizer = make_tiny_tokenizer()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 400)
    output = tmp_path / "adapter"
    arguments = dict(
        output_dir=str(output),
        model="tiny",
        exit_layer=2,
        data=[str(corpus)],
        seq_len=32,
        max_target_tokens=1024,
        held_out_blocks=4,
        batch_size=4,
        epochs=1,
        learning_rate=1e-3,
        draft_vocab_size=40,
    )
    handlers = [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)]
    record = train_adapter(AdapterTrainArguments(**arguments), model, tokenizer)
    assert [signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)] == handlers
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    first_steps = record["steps"]
    assert first_steps == record["total_steps"] > 0
    loaded = load_draft_exit(Generator(model, tokenizer).layerwise, output)
    assert len(loaded.vocab) == 40  # by default, the N the adapter was trained for
    initial = model.model.layers[NUM_LAYERS - 1].state_dict()
    changed = [
        not torch.equal(
            loaded.adapter.block.state_dict()[name], initial[name].to(torch.bfloat16).float()
        )
        for name in initial
    ]
    assert any(changed)  # training moved the adapter
    assert record["after"]["coverage"] > 0
    # A second run with more epochs reuses the targets and continues from the checkpoint.
    record = train_adapter(AdapterTrainArguments(**{**arguments, "epochs": 2}), model, tokenizer)
    assert record["steps"] == 2 * first_steps
    assert all(torch.equal(before[name], model.state_dict()[name]) for name in before)
    # Run again when finished: no step trained, and the record keeps its loss and time.
    again = train_adapter(AdapterTrainArguments(**{**arguments, "epochs": 2}), model, tokenizer)
    assert again["steps"] == record["steps"]
    assert again["final_loss"] == record["final_loss"] is not None
    assert again["train_seconds"] >= record["train_seconds"] > 0
    # Another adapter's settings do not continue this checkpoint.
    with pytest.raises(ConfigError, match="continues a run with --init_layer 3, not 1"):
        train_adapter(AdapterTrainArguments(**{**arguments, "init_layer": 1}), model, tokenizer)
    (output / "checkpoint.pt").write_bytes(b"cut short")
    with pytest.raises(ConfigError, match="not a checkpoint of this adapter training"):
        train_adapter(AdapterTrainArguments(**{**arguments, "epochs": 3}), model, tokenizer)


def test_layer_quality_of_a_draft_exit() -> None:
    """The exact adapter (a copy of the last layer at exit L - 1) agrees with the last layer
    everywhere; a reduced vocabulary's coverage is the share of last-layer tokens inside it."""
    from self_speculation.training.layer_quality import draft_exit_quality, exit_quality

    generator = Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer())
    model = generator.layerwise
    blocks = torch.randint(3, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(0))
    exact = DraftExit(model, ExitAdapter(model, NUM_LAYERS - 1).requires_grad_(False))
    quality = draft_exit_quality(model, exact, NUM_LAYERS - 1, blocks)
    assert quality["agreement"] == 1.0 and quality["coverage"] == 1.0
    full = exit_quality(model, blocks)[-1]
    assert quality["accuracy"] == pytest.approx(full.accuracy)
    assert quality["perplexity"] == pytest.approx(full.perplexity)
    last = model.logits(blocks)[:, :-1].argmax(-1)
    vocab = last.flatten().unique()[:5]  # a vocabulary holding some of the last layer's choices
    reduced = draft_exit_quality(model, DraftExit(model, None, vocab), 2, blocks)
    assert reduced["coverage"] == pytest.approx(float(torch.isin(last, vocab).double().mean()))
    assert reduced["perplexity"] is None or reduced["perplexity"] > 0


def test_scripts_take_an_adapter(tiny_model_dir, prompts_file, tmp_path) -> None:
    """sweep.py with --draft_adapter sweeps k at the adapter's exit layer (its outputs checked
    against autoregressive decoding by correctness.py, which takes the same flags)."""
    import importlib

    import pandas as pd
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = Generator(model, make_tiny_tokenizer())
    settings = AdapterConfig(exit_layer=2, num_layers=NUM_LAYERS, hidden_size=32, init_layer=3)
    save_adapter(tmp_path / "adapter", perturbed_adapter(generator, 2), settings, None)
    common = [
        "--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path",
        str(prompts_file), "--max_steps", "10", "--sample", "False",
        "--draft_adapter", str(tmp_path / "adapter"),
    ]  # fmt: skip
    sweep = importlib.import_module("sweep")
    csv = tmp_path / "sweep.csv"
    argv = [*common, "--num_speculations_first", "1", "--num_speculations_last", "2"]
    assert sweep.main([*argv, "--output_file", str(csv), "--output_dir", str(tmp_path)]) == 0
    table = pd.read_csv(csv, dtype={"setting": str})
    speculative = table[table["generation_strategy"] == "self_speculative"]
    assert sorted(speculative["num_speculations"]) == [1, 2]
    assert set(speculative["exit_layer"]) == {2}
    correctness = importlib.import_module("correctness")
    argv = [*common, "--num_speculations", "3", "--output_dir", str(tmp_path / "check")]
    assert correctness.main(argv) == 0
    # The result document says how drafts left the model (the flags say -1: "the adapter's").
    (result,) = (tmp_path / "check").glob("correctness_*.json")
    draft = json.loads(result.read_text())["environment"]["draft"]
    assert draft == {"adapter_exit_layer": 2, "adapter_init_layer": 3, "draft_vocab_size": None}


def test_result_documents_give_the_draft_vocabulary_that_ran() -> None:
    from self_speculation.benchmarking import _draft_description

    generator = Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer())
    assert _draft_description(generator) is None
    generator.draft = DraftExit(generator.layerwise, None, torch.arange(0, 60, 2))
    assert _draft_description(generator) == {
        "adapter_exit_layer": None,
        "adapter_init_layer": None,
        "draft_vocab_size": 30,
    }


@pytest.mark.parametrize("sample", [False, True])
def test_early_exit_decoding_whose_reduced_vocabulary_is_all_banned_is_one_error(
    sample: bool,
) -> None:
    """Early-exit decoding over a two-token vocabulary with no-repeat-1-gram: at the first
    token (both in the prompt) a ConfigError; later (each used once) a ConfigError when
    greedy, not a banned token 0, and when sampling the row stops with the two tokens, as
    over a full vocabulary (a failing multinomial draw before)."""
    generator = Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer())
    generator.draft = DraftExit(generator.layerwise, None, torch.tensor([7, 9]))
    config = GenerationConfig(max_steps=6, sample=sample, exit_layer=2, no_repeat_ngram_size=1)
    first = "leave no token to follow the prompt" if sample else "ban all of them"
    with pytest.raises(ConfigError, match=first):
        generator.generate([5, 60, 7, 200, 31, 8, 9], config)
    if sample:
        result = generator.generate([5, 60, 200], config)
        assert sorted(result.token_ids) == [7, 9] and result.stop_reason == "non_finite_logits"
    else:
        with pytest.raises(ConfigError, match="ban all of them"):
            generator.generate([5, 60, 200], config)
    free = dataclasses.replace(config, no_repeat_ngram_size=None)
    assert set(generator.generate([5, 60, 200], free).token_ids) <= {7, 9}


@pytest.mark.parametrize("sample", [False, True])
def test_early_exit_decoding_over_a_reduced_vocabulary_processes_each_step_once(
    sample: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The all-banned check reads the logits the step chooses from: the processors run once
    per generated token (they loop over rows in Python), and the tokens are those of a run
    without the check's extra processing."""
    from self_speculation.sampling import TokenSelector

    generator = Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer())
    generator.draft = DraftExit(generator.layerwise, None, torch.arange(40, 80))
    config = GenerationConfig(max_steps=6, sample=sample, exit_layer=2, no_repeat_ngram_size=2)
    calls = []
    process = TokenSelector.process
    monkeypatch.setattr(
        TokenSelector, "process", lambda self, *args: calls.append(1) or process(self, *args)
    )
    result = generator.generate([5, 60, 200], config)
    assert len(result.token_ids) == 6 and set(result.token_ids) <= set(range(40, 80))
    assert len(calls) == 6


def test_an_adapter_records_its_model_and_refuses_another(tmp_path) -> None:
    """An adapter folder records the base model's type and vocabulary; loading it on a model
    of the same shape but another family (Mistral's weights are named as Llama's) or another
    vocabulary is one error, not a silently useless draft. One saved before they were
    recorded still loads."""
    import json

    llama = Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), make_tiny_tokenizer())
    settings = AdapterConfig(exit_layer=2, num_layers=NUM_LAYERS, hidden_size=32, init_layer=3)
    save_adapter(tmp_path / "a", perturbed_adapter(llama, 2), settings, None)
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["model_type"] == "llama" and saved["vocab_size"] == VOCAB_SIZE
    mistral = Generator(
        make_tiny_model("mistral", dtype=torch.float32, num_key_value_heads=2),
        make_tiny_tokenizer(),
    )
    with pytest.raises(
        ConfigError, match="trained for a model of type llama; this model has mistral"
    ):
        load_draft_exit(mistral.layerwise, tmp_path / "a")
    wider = Generator(
        make_tiny_model("llama_gqa_tied", dtype=torch.float32, vocab_size=VOCAB_SIZE + 8),
        make_tiny_tokenizer(),
    )
    with pytest.raises(ConfigError, match=f"a vocabulary of {VOCAB_SIZE}; this model has"):
        load_draft_exit(wider.layerwise, tmp_path / "a")
    del saved["model_type"], saved["vocab_size"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(saved))
    assert load_draft_exit(mistral.layerwise, tmp_path / "a").exit_layer == 2
