"""LayerSkip training pieces (Elhoushi et al., ACL 2024, §4), each usable on its own.

* :mod:`layer_dropout`: per-sample skipping of whole decoder layers (§4.1).
* :mod:`early_exit_loss`: the shared head supervising every chosen exit, one exit at a
  time (§4.2).
* :mod:`curriculum`: which exits are supervised at each step (§4.2).
* :mod:`objective`: the early-exit loss over a model as one ``nn.Module`` (what FSDP or
  DDP wraps).
* :mod:`layer_quality`: per-exit held-out accuracy, perplexity and agreement with the last
  layer (``layer_report.py``).

``train.py``'s parts: :mod:`config` (the command line), :mod:`build` (texts, model,
tokenizer), :mod:`loop` (the training loop), :mod:`checkpointing` (sharded checkpoints,
export), :mod:`distributed_setup` (device, FSDP2 / DDP, mixed precision, activation
checkpointing), :mod:`data` and :mod:`presets` (token blocks, architectures).

Exit layers count from 1: exit ``E`` runs decoder layers 0..E-1 then the final norm and the
LM head; exit ``L`` is the full model. Decoder layers themselves count from 0.
"""

from self_speculation.training.curriculum import Curriculum, active_exits
from self_speculation.training.early_exit_loss import (
    EarlyExitLoss,
    ExitScale,
    early_exit_loss,
    exit_loss_weights,
    stacked_early_exit_loss,
)
from self_speculation.training.layer_dropout import (
    DropoutSchedule,
    DropoutShape,
    LayerDropout,
    apply_layer_dropout,
    layer_dropout_rates,
    schedule_factor,
)
from self_speculation.training.layer_quality import ExitQuality, exit_quality
from self_speculation.training.objective import LayerSkipObjective

__all__ = [
    "Curriculum",
    "DropoutSchedule",
    "DropoutShape",
    "EarlyExitLoss",
    "ExitQuality",
    "ExitScale",
    "LayerDropout",
    "LayerSkipObjective",
    "active_exits",
    "apply_layer_dropout",
    "early_exit_loss",
    "exit_loss_weights",
    "exit_quality",
    "layer_dropout_rates",
    "schedule_factor",
    "stacked_early_exit_loss",
]
