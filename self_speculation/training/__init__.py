"""LayerSkip training pieces (Elhoushi et al., ACL 2024, §4), each usable on its own.

* :mod:`layer_dropout`: per-sample skipping of whole decoder layers (§4.1).
* :mod:`early_exit_loss`: the shared head supervising every chosen exit (§4.2).
* :mod:`curriculum`: which exits are supervised at each step (§4.2).
* :mod:`objective`: the three wired together as one ``nn.Module`` for a training loop.

Exit layers count from 1: exit ``E`` runs decoder layers 0..E-1 then the final norm and the
LM head; exit ``L`` is the full model. Decoder layers themselves count from 0.
"""

from self_speculation.training.curriculum import Curriculum, active_exits
from self_speculation.training.early_exit_loss import (
    EarlyExitLoss,
    ExitScale,
    early_exit_loss,
    exit_loss_weights,
)
from self_speculation.training.layer_dropout import (
    DropoutSchedule,
    DropoutShape,
    LayerDropout,
    apply_layer_dropout,
    layer_dropout_rates,
    schedule_factor,
)

__all__ = [
    "Curriculum",
    "DropoutSchedule",
    "DropoutShape",
    "EarlyExitLoss",
    "ExitScale",
    "LayerDropout",
    "active_exits",
    "apply_layer_dropout",
    "early_exit_loss",
    "exit_loss_weights",
    "layer_dropout_rates",
    "schedule_factor",
]
