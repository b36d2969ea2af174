"""Training invariants that hand mutations of the early-exit loss and the training loop
showed no test pinned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

from self_speculation.distributed import DistributedContext
from self_speculation.errors import ConfigError
from self_speculation.training.config import (
    DataArguments,
    LayerSkipArguments,
    ModelArguments,
    TrainConfig,
    TrainingArguments,
)
from self_speculation.training.curriculum import active_exits
from self_speculation.training.early_exit_loss import select_positions
from self_speculation.training.loop import Trainer, _cut_log


def test_an_exit_is_supervised_on_the_rounded_share_of_each_rows_positions() -> None:
    """Row by row, ``round(fraction * valid)`` positions (at least one): those with the
    smallest noise among the valid ones."""
    valid = torch.zeros(3, 10, dtype=torch.bool)
    valid[0, :7] = True  # 0.5 * 7 = 3.5 -> 4
    valid[1, 1:10] = True  # 0.5 * 9 = 4.5 -> 4 (round half to even, as Python's round)
    valid[2, 5] = True  # 0.5 * 1 -> at least one
    noise = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    chosen = select_positions(valid, 0.5, noise)
    rows = {}
    for index in chosen.tolist():
        rows.setdefault(index // 10, []).append(index % 10)
    for row, count in ((0, 4), (1, 4), (2, 1)):
        candidates = valid[row].nonzero().squeeze(1).tolist()
        expected = sorted(sorted(candidates, key=lambda p: noise[row, p].item())[:count])
        assert rows[row] == expected
    assert chosen.tolist() == sorted(chosen.tolist())


def _trainer(tmp_path: Path, steps: int = 8, **settings: object) -> Trainer:
    """train.py's Trainer on a tiny random Llama (4 layers), ``steps`` steps of 2 blocks of
    8 tokens; ``settings`` go to the recipe or, when they are training flags, to those."""
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32).train()
    flags = {key: settings.pop(key) for key in list(settings) if key in TRAINING_FLAGS}
    flags = {"batch_size": 2, "max_tokens": steps * 2 * 8, **flags}
    training = TrainingArguments(
        output_dir=str(tmp_path), warmup_steps=1, bf16=False, save_every_minutes=0, **flags
    )
    config = TrainConfig(
        ModelArguments(), DataArguments(data=["(random)"]), LayerSkipArguments(**settings), training
    )
    blocks = torch.randint(0, model.config.vocab_size, (32, 8))
    return Trainer(config, model, None, blocks, DistributedContext(), torch.device("cpu"))


TRAINING_FLAGS = {"batch_size", "gradient_accumulation_steps", "max_tokens"}


def test_a_step_of_accumulated_micro_batches_moves_the_data_position_by_all_of_them(
    tmp_path: Path,
) -> None:
    """batch 1 x 2 micro-batches reads stream positions 0, 1, then 2, 3: every block once,
    as batch 2 does (the position advanced by one micro-batch re-read blocks)."""
    trainer = _trainer(
        tmp_path, batch_size=1, gradient_accumulation_steps=2, max_tokens=4 * 2 * 8,
        layer_dropout_p_max=0.0, early_exit_loss=False,
    )  # fmt: skip
    read = []
    indices = trainer.stream.indices
    trainer.stream.indices = lambda start, count: (
        read.append((start, count)) or indices(start, count)
    )
    for _ in range(2):
        trainer.train_step(trainer.supervised_exits())
    assert read == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert (trainer.progress.blocks, trainer.progress.tokens) == (4, 4 * 8)


def test_step_t_supervises_the_curriculums_exits_of_step_t(tmp_path: Path) -> None:
    """Rotational, R 2, 4 layers: step 0 supervises exits 2 and 4, step 1 exits 1, 3, 4."""
    trainer = _trainer(tmp_path, early_exit_curriculum="rotational", early_exit_rotation=2)
    seen = []
    for _ in range(3):
        seen.append(trainer.supervised_exits())
        trainer.train_step(seen[-1])
    assert seen == [[2, 4], [1, 3, 4], [2, 4]]
    assert seen == [active_exits("rotational", t, 8, 4, 2) for t in range(3)]


def test_a_resume_keeps_the_log_lines_up_to_the_checkpoints_step(tmp_path: Path) -> None:
    """The checkpoint's own step stays logged (only the steps trained again are cut), and a
    line a kill cut short goes."""
    log = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"step": step, "loss": 1.0}) for step in range(1, 6)]
    log.write_text("\n".join(lines) + '\n{"step": 6, "lo', encoding="utf-8")
    _cut_log(log, 3)
    assert log.read_text(encoding="utf-8").splitlines() == lines[:3]


def test_a_token_budget_equal_to_what_was_trained_is_already_spent(tmp_path: Path) -> None:
    """A run stopped at step 3 of 8 and resumed with --max_tokens of 3 steps: refused in one
    line, as docs/training.md says of a budget already spent (not a run that trains nothing)."""
    trainer = _trainer(tmp_path, steps=3)
    trainer.progress.step, trainer.progress.tokens = 3, 3 * 2 * 8
    with pytest.raises(ConfigError, match="already spent"):
        trainer._set_token_horizon(8)
    trainer = _trainer(tmp_path, steps=4)
    trainer.progress.step, trainer.progress.tokens = 3, 3 * 2 * 8
    trainer._set_token_horizon(8)
    assert trainer.progress.total_steps == 4
