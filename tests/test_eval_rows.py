"""eval.py's generation rows name the task and document each answers: a multi-task run's
rows could not be traced back to their questions."""

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
