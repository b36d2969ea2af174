"""eval.py --use_cache and sampled generations: lm-eval's request cache keys a request by its
text, which a request's repeats share, and answers a rerun from it unless the task sets
do_sample; a task that samples through its temperature alone had its repeats, drawn apart
in the first run, answered by one stored answer in the rerun."""

from __future__ import annotations

import contextlib
import importlib
import json
import sqlite3
import sys
from pathlib import Path

import pytest

from arguments import run_main

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent

TASK = """\
task: sampled_repeats
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
repeats: 3
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
  temperature: 1.5
process_results: !function repeats_metric.distinct
filter_list:
  - name: all
    filter:
      - function: take_first_k
        k: 3
metric_list:
  - metric: distinct
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

METRIC = '''\
def distinct(doc, results):
    """How many different answers the document's repeats got."""
    return {"distinct": float(len(set(results[0])))}
'''


def test_a_rerun_from_the_request_cache_keeps_sampled_repeats_apart(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "prompts.jsonl"
    prompts = ["def add(a, b):\n", "class A:\n", "The quick brown"]
    data.write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n" for p in prompts))
    (tasks / "sampled_repeats.yaml").write_text(TASK.format(data=data))
    (tasks / "repeats_metric.py").write_text(METRIC)
    monkeypatch.syspath_prepend(str(REPOSITORY_ROOT))
    eval_script = importlib.import_module("eval")

    def evaluate(name: str) -> dict:
        output = tmp_path / name
        argv = [
            "eval.py", "--model", str(tiny_model_dir), "--tasks", "sampled_repeats",
            "--include_path", str(tasks), "--bootstrap_iters", "0",
            "--use_cache", str(tmp_path / "cache"), "--output_dir", str(output),
        ]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            run_main(eval_script.main, prog="eval.py")
        assert exit_info.value.code == 0, capsys.readouterr().err
        (result,) = output.glob("eval_*.json")
        return json.loads(result.read_text())["results"]["sampled_repeats"]

    first = evaluate("first")
    assert first["distinct,all"] > 1  # the repeats were drawn apart
    assert evaluate("rerun") == first


def test_sampled_answers_never_enter_the_request_cache_and_greedy_ones_stay(
    tmp_path: Path,
) -> None:
    """CachingLM stores all of a call's answers once it returns: not the sampled ones here,
    not even until the run ends (a run killed before then left them to the next run, which
    the cache answered); greedy answers stay and answer the rerun."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import CachingLM
    from tiny_models import save_tiny_model

    from self_speculation import GenerationConfig, Generator, load_model_and_tokenizer
    from self_speculation.eval_harness import LayerSkipLM

    directory = save_tiny_model(tmp_path / "model")
    model, tokenizer = load_model_and_tokenizer(str(directory), "float32", "cpu")
    generator = Generator(model, tokenizer)
    config = generator.resolve(GenerationConfig(sample=False, max_steps=8))
    sampled = ("def add(a, b):", {"until": [], "temperature": 1.5})
    greedy = ("class A:", {"until": []})
    requests = [
        Instance("generate_until", {}, sampled, 0, ("task", 0, 3)),
        Instance("generate_until", {}, sampled, 0, ("task", 0, 3)),
        Instance("generate_until", {}, greedy, 0, ("task", 1, 3)),
    ]

    def evaluate() -> tuple[list[str], list[str]]:
        lm = LayerSkipLM(generator, config, progress=False)
        answers = CachingLM(lm, str(tmp_path / "cache.db")).generate_until(requests)
        lm.cache_hook.dbdict.close()
        with contextlib.closing(sqlite3.connect(tmp_path / "cache.db")) as database:
            (stored,) = database.execute("SELECT COUNT(*) FROM unnamed").fetchone()
        assert stored == 1  # the greedy answer alone
        return answers, [row["context"] for row in lm.generation_rows]

    first, generated = evaluate()
    assert first[0] != first[1] and generated == [sampled[0], sampled[0], greedy[0]]
    assert evaluate() == (first, [sampled[0], sampled[0]])  # the greedy answer: from the cache
