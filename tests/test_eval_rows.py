"""eval.py's generation rows name the task and document each answers (a multi-task run's
rows could not be traced back to their questions) and the seed each drew with (a sampled
answer's repeats draw apart: the row says how to draw one again)."""

from __future__ import annotations

import json
from pathlib import Path


def test_each_generation_row_names_its_task_and_document(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import eval as eval_script

    argv = ["--model", str(tiny_model_dir), "--tasks", "layerskip_humaneval", "--limit", "2"]
    argv += ["--execute_code", "True", "--gen_kwargs", "max_gen_toks=4"]
    assert eval_script.main([*argv, "--output_dir", str(tmp_path)]) == 0
    (rows_file,) = tmp_path.glob("eval_*.samples.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert sorted((row["task"], row["doc_id"]) for row in rows) == [
        ("layerskip_humaneval", 0),
        ("layerskip_humaneval", 1),
    ]


def test_a_sampled_rows_seed_draws_its_answer_again(tmp_path: Path) -> None:
    import torch
    from lm_eval.api.instance import Instance
    from tiny_models import save_tiny_model

    from self_speculation import GenerationConfig, Generator, load_model_and_tokenizer
    from self_speculation.eval_harness import LayerSkipLM

    directory = save_tiny_model(tmp_path / "model")
    model, tokenizer = load_model_and_tokenizer(str(directory), "float32", "cpu")
    generator = Generator(model, tokenizer)
    config = generator.resolve(GenerationConfig(sample=False, max_steps=8))
    sampled = ("def add(a, b):", {"until": [], "temperature": 1.5})
    requests = [Instance("generate_until", {}, sampled, 0, ("task", 0, 2))] * 2
    lm = LayerSkipLM(generator, config, progress=False)
    answers = lm.generate_until(requests)
    seeds = [row["seed"] for row in lm.generation_rows]
    assert len(set(seeds)) == 2  # the repeats draw apart
    for row, answer in zip(lm.generation_rows, answers, strict=True):
        again = generator.generate(
            lm._context_ids(row["context"]),
            lm._request_config(dict(sampled[1]))[0],
            generator=torch.Generator().manual_seed(row["seed"]),
        )
        assert again.text == answer
