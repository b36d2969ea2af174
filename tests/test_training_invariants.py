"""Training pieces the suite only ran end to end: the packed blocks and the data stream
(a run's position in its data), the step shape of layer dropout, and the schedule step a
training step uses."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import make_tiny_model

from self_speculation.distributed import DistributedContext
from self_speculation.training.config import (
    DataArguments,
    LayerSkipArguments,
    ModelArguments,
    TrainConfig,
    TrainingArguments,
)
from self_speculation.training.data import BlockStream, pack_blocks
from self_speculation.training.layer_dropout import layer_dropout_rates, schedule_factor
from self_speculation.training.loop import Trainer
from self_speculation.training.objective import LayerSkipObjective


def test_blocks_are_bos_text_eos_documents_back_to_back() -> None:
    class Tokenizer:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[10 + len(text)] * len(text) for text in texts]}

    blocks = pack_blocks(Tokenizer(), ["abc", "de", "f"], seq_len=4)
    # <bos> 13 13 13 <eos> <bos> 12 12 <eos> <bos> 11 <eos>: 12 tokens, 3 blocks of 4.
    assert blocks.tolist() == [[1, 13, 13, 13], [2, 1, 12, 12], [2, 1, 11, 2]]


def test_the_stream_visits_every_block_once_per_epoch_reshuffled() -> None:
    stream = BlockStream(num_blocks=7, seed=3)
    first, second = stream.indices(0, 7), stream.indices(7, 7)
    assert sorted(first) == sorted(second) == list(range(7))
    assert first != second  # reshuffled every epoch
    # A position means the same block however the stream is read (a resume reads from it).
    fresh = BlockStream(num_blocks=7, seed=3)
    assert fresh.indices(5, 4) == (first + second)[5:9]
    assert BlockStream(7, 4).indices(0, 7) != first  # the seed picks the order


def test_step_shape_drops_the_second_half_of_the_layers() -> None:
    assert layer_dropout_rates(8, 0.2, "step") == [0.0] * 4 + [0.2] * 4
    assert layer_dropout_rates(4, 1.0, "step") == [0.0, 0.0, 1.0, 1.0]


def _trainer(tmp_path: Path, **recipe: object) -> Trainer:
    """train.py's Trainer on a tiny random Llama, 8 steps of 2 blocks of 8 tokens."""
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32).train()
    training = TrainingArguments(
        output_dir=str(tmp_path), batch_size=2, max_tokens=8 * 2 * 8, warmup_steps=1,
        bf16=False, save_every_minutes=0,
    )  # fmt: skip
    config = TrainConfig(
        ModelArguments(), DataArguments(data=["(random)"]), LayerSkipArguments(**recipe), training
    )
    blocks = torch.randint(0, model.config.vocab_size, (32, 8))
    return Trainer(config, model, None, blocks, DistributedContext(), torch.device("cpu"))


def test_a_step_drops_layers_at_its_own_step_of_the_time_schedule(tmp_path: Path) -> None:
    """Step t trains with S(t) (0-based, Eq. 3): the exponential warm-up's first step
    skips nothing, its last one skips at the full rates."""
    trainer = _trainer(tmp_path, layer_dropout_p_max=0.5, layer_dropout_schedule="exponential")
    seen = []
    for _ in range(8):
        trainer.train_step(trainer.supervised_exits())
        seen.append((trainer.dropout.step, trainer.dropout.current_rates()[-1]))
    assert seen == [(t, 0.5 * schedule_factor("exponential", t, 8)) for t in range(8)]
    assert seen[0][1] == 0.0 and seen[-1][1] == 0.5


def test_each_exit_draws_its_positions_from_its_own_row_of_noise() -> None:
    """``position_noise`` row E - 1 chooses exit E's positions, whichever exits are on."""
    objective = LayerSkipObjective(
        make_tiny_model("llama_gqa_tied", dtype=torch.float32), position_fraction=0.25
    )
    input_ids = torch.randint(0, 100, (2, 16))
    noise = torch.rand(4, 2, 16, generator=torch.Generator().manual_seed(0))
    other = noise.clone()
    other[[0, 2]] = torch.rand(2, 2, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        losses = [objective(input_ids, [2, 4], rows).exit_losses[2] for rows in (noise, other)]
        changed = noise.clone()
        changed[1] = other[0]
        moved = objective(input_ids, [2, 4], changed).exit_losses[2]
    assert torch.equal(losses[0], losses[1])  # rows of exits that are off play no part
    assert not torch.equal(losses[0], moved)
