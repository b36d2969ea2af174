"""eval.py samples a task that sets only a temperature as lm-eval's HFLM does: with
transformers' generate defaults for top_k / top_p, not the other scripts' top_p 0.9."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from self_speculation import Generator, load_model_and_tokenizer
from self_speculation.eval_harness import LayerSkipLM


@pytest.mark.parametrize(
    "gen_kwargs",
    [{"temperature": 0.8}, {"do_sample": True, "temperature": 0.7}, {"temperature": 1.0}],
)
def test_a_sampled_task_without_top_k_or_top_p_samples_as_hflm(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, gen_kwargs: dict
) -> None:
    from arguments import one_strategy

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    eval_script = importlib.import_module("eval")
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), "float32", "cpu")
    generator = Generator(model, tokenizer)
    generation = eval_script.EvalGenerationArguments()
    lm = LayerSkipLM(generator, generator.resolve(one_strategy(generation, "eval.py")))
    ours, _ = lm._request_config({"until": ["\n\n"], **gen_kwargs})
    # What lm-eval's HFLM hands transformers' generate (do_sample, temperature), and what
    # generate then samples with.
    hf_config, _ = model._prepare_generation_config(
        None, do_sample=True, temperature=gen_kwargs["temperature"]
    )
    assert ours.sample and hf_config.do_sample
    assert ours.temperature == pytest.approx(hf_config.temperature)
    assert ours.top_k == (hf_config.top_k or 0)
    assert ours.top_p == pytest.approx(1.0 if hf_config.top_p is None else hf_config.top_p)
    # A task's own top_k / top_p still win.
    theirs, _ = lm._request_config({"until": [], "top_k": 5, "top_p": 0.5, **gen_kwargs})
    assert (theirs.top_k, theirs.top_p) == (5, 0.5)
