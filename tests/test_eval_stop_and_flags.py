"""generate_until as lm-eval's HFLM: the EOS token's text is a stop string of every
request, and a do_sample written as a string is read, not taken as true."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

from self_speculation import ConfigError, GenerationConfig, Generator, load_model_and_tokenizer
from self_speculation.eval_harness import LayerSkipLM


def test_the_eos_text_written_in_ordinary_tokens_ends_an_answer_as_in_hflm(
    tmp_path: Path,
) -> None:
    """A tokenizer whose EOS token's text ("xx") the tiny model writes in ordinary tokens
    ("x", "x"): HFLM adds the EOS text to every request's stop strings and cuts there."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    directory = save_tiny_model(tmp_path / "model", max_position_embeddings=512)
    tokenizer_json = json.loads((directory / "tokenizer.json").read_text())
    for token in tokenizer_json["added_tokens"]:
        if token["id"] == 1:
            token["content"] = "xx"
    vocab = tokenizer_json["model"]["vocab"]
    vocab["xx"] = vocab.pop("</s>")
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = "xx"
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    hf = HFLM(pretrained=str(directory), dtype="float32", device="cpu", batch_size=1)
    model, tokenizer = load_model_and_tokenizer(str(directory), "float32", "cpu")
    assert tokenizer.eos_token == "xx" and tokenizer("x")["input_ids"] != [1]
    generator = Generator(model, tokenizer)
    config = generator.resolve(GenerationConfig(sample=False, token_healing=False))
    lm = LayerSkipLM(generator, config, progress=False)
    asked = [
        Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 12}), i)
        for i, prompt in enumerate(["x", "The quick brown"])
    ]
    expected = hf.generate_until(asked, disable_tqdm=True)
    assert "xx" not in "".join(expected)
    assert lm.generate_until(asked) == expected


@pytest.mark.parametrize("value", ["false", "False", " false", 0, False])
def test_a_do_sample_written_as_false_decodes_greedily(tiny_model_dir: Path, value) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), "float32", "cpu")
    generator = Generator(model, tokenizer)
    lm = LayerSkipLM(generator, generator.resolve(GenerationConfig(sample=True)), progress=False)
    config, _ = lm._request_config({"until": [], "do_sample": value})
    assert config.sample is False
    config, _ = lm._request_config({"until": [], "do_sample": "true", "temperature": 0.5})
    assert config.sample is True


def test_a_do_sample_neither_true_nor_false_is_one_line(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), "float32", "cpu")
    generator = Generator(model, tokenizer)
    lm = LayerSkipLM(generator, generator.resolve(GenerationConfig(sample=False)), progress=False)
    with pytest.raises(ConfigError, match="do_sample='no' is not true or false"):
        lm._request_config({"until": [], "do_sample": "no"})


def test_an_empty_context_before_a_continuation_starting_with_bos_scores_as_hflm(
    tiny_model_dir: Path,
) -> None:
    """lm-eval conditions an empty context on the prefix token (BOS), unless the
    continuation's first token is that token: then it is the context, not scored."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", batch_size=1)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), "float32", "cpu")
    generator = Generator(model, tokenizer)
    lm = LayerSkipLM(generator, generator.resolve(GenerationConfig(sample=False)), progress=False)
    pairs = [("", "<s>def add(a, b):"), ("", "def add(a, b):"), ("", "<s> fox")]
    scored = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for (ours, _), (theirs, _) in zip(
        lm.loglikelihood(scored), hf.loglikelihood(scored, disable_tqdm=True)
    ):
        assert ours == pytest.approx(theirs, abs=1e-4)
