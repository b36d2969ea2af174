"""The lm-eval model: log-likelihoods at an exit layer, generation honouring task kwargs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from self_speculation import ConfigError, GenerationConfig, Generator, load_model_and_tokenizer
from self_speculation.eval_harness import LayerSkipLM


@dataclass
class Request:  # what lm-eval's Instance offers the model
    args: tuple


@pytest.fixture(scope="module")
def generator(tiny_model_dir: Path) -> Generator:
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), "float32", "cpu")
    return Generator(model, tokenizer)


def full_logprob(generator: Generator, text: str, continuation: str) -> float:
    """Reference: log p(continuation | text) from the model's own forward."""
    tokenizer = generator.tokenizer
    # A context as the tokenizer encodes it (its own special tokens); an empty one is BOS.
    if text:
        context_ids = tokenizer(text)["input_ids"]
        continuation_ids = tokenizer(text + continuation)["input_ids"][len(context_ids) :]
    else:
        context_ids = [tokenizer.bos_token_id]
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = generator.model(input_ids=ids).logits[0, :-1]
    logprobs = F.log_softmax(logits.float(), dim=-1)
    targets = ids[0, 1:]
    return (
        logprobs[-len(continuation_ids) :]
        .gather(1, targets[-len(continuation_ids) :, None])
        .sum()
        .item()
    )


def test_loglikelihood_matches_the_model_and_changes_with_the_exit(generator: Generator) -> None:
    config = generator.resolve(GenerationConfig(sample=False))
    requests = [
        Request(("The quick brown", " fox")),
        Request(("def add(a, b):", "\n    return a + b")),
    ]
    full = LayerSkipLM(generator, config, progress=False).loglikelihood(requests)
    early = LayerSkipLM(
        generator, config, loglikelihood_exit_layer=1, progress=False
    ).loglikelihood(requests)
    for (logprob, greedy), request in zip(full, requests):
        assert logprob == pytest.approx(full_logprob(generator, *request.args), abs=1e-4)
        assert isinstance(greedy, bool)
    assert [round(value, 4) for value, _ in full] != [round(value, 4) for value, _ in early]


def test_loglikelihood_rolling_sums_every_token(generator: Generator) -> None:
    config = generator.resolve(GenerationConfig(sample=False))
    lm = LayerSkipLM(generator, config, progress=False)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    (whole,) = lm.loglikelihood_rolling([Request((text,))])
    lm.max_length = 16  # forces several windows; every token still predicted once
    (windowed,) = lm.loglikelihood_rolling([Request((text,))])
    assert whole < 0 and windowed < 0
    assert whole == pytest.approx(full_logprob(generator, "", text), abs=1e-3)


def test_a_continuation_longer_than_the_context_is_scored_in_windows(
    generator: Generator,
) -> None:
    """A multiple-choice answer longer than the model's context (a model trained at a short
    --seq_len): every token scored once, as the rolling log-likelihood does."""
    config = generator.resolve(GenerationConfig(sample=False))
    lm = LayerSkipLM(generator, config, progress=False)
    lm.max_length = 8
    answer = " the quick brown fox jumps over the lazy dog" * 2
    ((logprob, greedy),) = lm.loglikelihood([Request(("", answer))])
    (rolling,) = lm.loglikelihood_rolling([Request((answer,))])  # the same windows
    assert len(lm._encode(answer)) > 2 * lm.max_length and isinstance(greedy, bool)
    assert logprob < 0 and logprob == pytest.approx(rolling, abs=1e-4)
    ((with_context, _),) = lm.loglikelihood([Request(("Question: which?\nAnswer:", answer))])
    assert with_context < 0


def test_generate_until_honours_until_and_max_gen_toks(generator: Generator) -> None:
    config = generator.resolve(
        GenerationConfig(
            generation_strategy="self_speculative", exit_layer=2, num_speculations=3, sample=True
        )
    )
    lm = LayerSkipLM(generator, config, progress=False)
    free = lm.generate_until(
        [Request(("def add(a, b):", {"max_gen_toks": 12, "do_sample": False, "until": []}))]
    )[0]
    assert lm.generation_rows[-1]["num_generated_tokens"] <= 12
    assert lm.generation_rows[-1]["acceptance_rate"] is not None
    stop = free[3:6] if len(free) >= 6 else None
    if stop:
        (cut,) = lm.generate_until(
            [Request(("def add(a, b):", {"max_gen_toks": 12, "do_sample": False, "until": [stop]}))]
        )
        assert stop not in cut and free.startswith(cut)
    config_used, stop_words = lm._request_config(
        {"temperature": 0.0, "max_gen_toks": 5, "until": "\n\n"}
    )
    assert (config_used.sample, config_used.max_steps, stop_words) == (False, 5, ["\n\n", "</s>"])
    config_used, _ = lm._request_config({"do_sample": True, "temperature": 0.8, "top_p": 0.5})
    assert (config_used.sample, config_used.temperature, config_used.top_p) == (True, 0.8, 0.5)


def test_a_negative_gen_kwargs_temperature_is_refused(generator: Generator) -> None:
    lm = LayerSkipLM(generator, generator.resolve(GenerationConfig()), progress=False)
    with pytest.raises(ConfigError, match="gen_kwargs temperature must be >= 0, got -1"):
        lm._request_config({"temperature": -1})
    assert not lm._request_config({"temperature": 0})[0].sample  # 0: greedy


def test_an_empty_context_without_bos_or_eos_is_one_line(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rolling log-likelihoods and empty-context requests condition on BOS, else EOS; a
    tokenizer with neither is a ConfigError, not a tensor of None."""
    lm = LayerSkipLM(generator, generator.resolve(GenerationConfig(sample=False)), progress=False)
    monkeypatch.setattr(LayerSkipLM, "prefix_token_id", property(lambda self: None))
    with pytest.raises(ConfigError, match="neither a BOS nor an EOS"):
        lm.loglikelihood_rolling([Request(("def add(a, b):",))])
    with pytest.raises(ConfigError, match="neither a BOS nor an EOS"):
        lm.loglikelihood([Request(("", "def add(a, b):"))])


def test_each_finished_request_is_in_the_request_cache_when_a_run_stops(
    generator: Generator, tmp_path: Path
) -> None:
    """eval.py --use_cache: lm-eval's CachingLM stores a call's results when the call
    returns; the model stores each greedy request as it finishes, so a run stopped after
    the first of two keeps it, and the rerun generates the second only."""
    from lm_eval.api.model import CachingLM

    config = generator.resolve(GenerationConfig(sample=False, max_steps=4))
    requests = [Request(("def add(a, b):", {"until": []})), Request(("class A:", {"until": []}))]

    def stop_after_the_first(row: dict) -> None:
        raise KeyboardInterrupt

    stopped = LayerSkipLM(generator, config, progress=False, on_generation=stop_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        CachingLM(stopped, str(tmp_path / "cache.db")).generate_until(requests)
    rerun = LayerSkipLM(generator, config, progress=False)
    answers = CachingLM(rerun, str(tmp_path / "cache.db")).generate_until(requests)
    assert [row["context"] for row in rerun.generation_rows] == ["class A:"]
    fresh = LayerSkipLM(generator, config, progress=False).generate_until(requests)
    assert answers == fresh


def test_a_sampled_answer_does_not_depend_on_the_requests_beside_it(generator: Generator) -> None:
    """A sampled request's seed comes from the request (task, document, repeat), not its
    place among the requests given: a rerun that the request cache answers in part, or
    another rank, draws each answer as a full run would; a request's repeats differ."""
    from lm_eval.api.instance import Instance

    config = generator.resolve(GenerationConfig(sample=True, temperature=2.0, max_steps=12))

    def request(doc_id: int) -> Instance:
        arguments = (f"def f{doc_id}(a, b):", {"until": [], "do_sample": True})
        return Instance("generate_until", {}, arguments, 0, ("task", doc_id, 2))

    first, second = request(0), request(1)
    together = LayerSkipLM(generator, config, progress=False).generate_until([first, first, second])
    alone = LayerSkipLM(generator, config, progress=False).generate_until([second])
    assert together[2] == alone[0]
    assert together[0] != together[1]  # the two repeats of one request


def test_scores_and_answers_are_lm_evals_own_hf_models(tiny_model_dir: Path) -> None:
    """The same requests through lm-eval's HFLM and through LayerSkipLM (greedy, both
    strategies) give the same log-likelihoods and texts; the tiny tokenizer adds no BOS, as
    SmolLM2's and Qwen's do not (a BOS put in front of every context changed SmolLM2's
    multiple-choice accuracy)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", batch_size=1)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), "float32", "cpu")
    generator = Generator(model, tokenizer)
    pairs = [("The quick brown", " fox"), ("def add(a, b):", "\n    return a + b"), ("x ", "y")]
    scored = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    asked = [
        Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 8}), i)
        for i, prompt in enumerate(["def add(a, b):\n", "The quick brown"])
    ]
    expected_scores, expected_texts = hf.loglikelihood(scored), hf.generate_until(asked)
    for strategy in ("autoregressive", "self_speculative"):
        config = generator.resolve(
            GenerationConfig(
                generation_strategy=strategy, sample=False, exit_layer=2, num_speculations=3
            )
        )
        lm = LayerSkipLM(generator, config, progress=False)
        for (ours, _), (theirs, _) in zip(lm.loglikelihood(scored), expected_scores):
            assert ours == pytest.approx(theirs, abs=1e-4)
        assert lm.generate_until(asked) == expected_texts


def test_gen_kwargs_the_engine_does_not_apply_are_refused_not_dropped(
    generator: Generator,
) -> None:
    lm = LayerSkipLM(generator, generator.resolve(GenerationConfig()), progress=False)
    for kwargs in ({"repetition_penalty": 1.3}, {"num_beams": 4}, {"min_new_tokens": 5}):
        with pytest.raises(ConfigError, match=f"{next(iter(kwargs))} are not supported"):
            lm._request_config({"until": ["\n"], **kwargs})
    assert lm._request_config({"no_repeat_ngram_size": 3})[0].no_repeat_ngram_size == 3


def test_a_context_that_starts_with_the_bos_text_gets_one_bos() -> None:
    """As lm-eval's HFLM (has_bos_prefix): a BOS-adding tokenizer adds none before a text
    that already starts with its BOS token's text (a task that writes it out)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from self_speculation import DEFAULT_MODEL

    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, "float32", "cpu")
    lm = LayerSkipLM(Generator(model, tokenizer), GenerationConfig(sample=False), progress=False)
    bos = tokenizer.bos_token
    assert lm._context_ids(f"{bos}def f():").count(tokenizer.bos_token_id) == 1
    hf = HFLM(pretrained=DEFAULT_MODEL, dtype="float32", device="cpu", batch_size=1)
    pairs = [(f"{bos}def add(a, b):", "\n    return a + b"), ("def f(x):", " return x")]
    scored = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for (ours, _), (theirs, _) in zip(lm.loglikelihood(scored), hf.loglikelihood(scored)):
        assert ours == pytest.approx(theirs, abs=1e-4)


def test_eval_py_decodes_a_task_that_sets_nothing_as_lm_evals_hflm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """eval.py's own defaults (not GenerationConfig's): a task giving only `until` is decoded
    greedily for lm-eval's 256 tokens from the context as written (no token healing: a
    context ending in a newline healed into other answers), as HFLM decodes it; a task giving
    only a temperature above 0 samples, and max_new_tokens counts as max_gen_toks."""
    import importlib

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tiny_models import save_tiny_model

    from arguments import one_strategy

    tiny_model_dir = save_tiny_model(tmp_path / "model", max_position_embeddings=1024)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    eval_script = importlib.import_module("eval")
    hf = HFLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", batch_size=1)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), "float32", "cpu")
    generator = Generator(model, tokenizer)
    generation = eval_script.EvalGenerationArguments(
        generation_strategy="self_speculative", exit_layer=2, num_speculations=3
    )
    lm = LayerSkipLM(generator, generator.resolve(one_strategy(generation, "eval.py")))
    lm.progress = False
    asked = [
        Instance("generate_until", {}, (prompt, {"until": ["\n\n\n"]}), i)
        for i, prompt in enumerate(["def add(a, b):\n", "for x in y:\n    "])
    ]
    assert lm.generate_until(asked) == hf.generate_until(asked)
    config, _ = lm._request_config({"temperature": 0.7, "max_new_tokens": 9})
    assert config.sample and config.temperature == 0.7 and config.max_steps == 9
    config, _ = lm._request_config({"temperature": 0.7, "do_sample": False})
    assert not config.sample


def test_loglikelihood_follows_the_model_as_it_is_now(tiny_model_dir: Path) -> None:
    """Log-likelihoods go through the layer-wise view directly, which skipped what every
    generation does first: a model switched to another attention implementation since the
    Generator was made was scored with the old one's masks, and a hook the view never runs
    was ignored."""
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), "float32", "cpu")
    generator = Generator(model, tokenizer)
    lm = LayerSkipLM(generator, generator.resolve(GenerationConfig(sample=False)), progress=False)
    requests = [Request(("def add(a, b):", "\n    return a + b"))]
    for implementation in ("eager", "sdpa", "eager"):
        model.set_attn_implementation(implementation)
        ((logprob, _),) = lm.loglikelihood(requests)
        assert logprob == pytest.approx(full_logprob(generator, *requests[0].args), abs=1e-4)
        (rolling,) = lm.loglikelihood_rolling([Request(("def add(a, b):",))])
        assert rolling == pytest.approx(full_logprob(generator, "", "def add(a, b):"), abs=1e-4)
    model.register_forward_hook(lambda module, args, output: output)
    with pytest.raises(ConfigError, match="forward hook"):
        lm.loglikelihood(requests)
