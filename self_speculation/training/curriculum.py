"""Early-exit curricula C(t, l): which exits the early-exit loss supervises at step t.

LayerSkip (Elhoushi et al., ACL 2024, §4.2, "Curriculum"): supervising every exit every step
costs the head once per layer; a curriculum enables a subset. Exit layers are 1-based
(exit ``l`` leaves decoder layers 0..l-1); the last exit ``L`` is always supervised.

* ``none``: every exit 1..L at every step.
* ``rotational``: every R-th exit, the set shifted by one each step: exit ``l`` is on at step
  ``t`` when ``(l + t) % R == 0``; after R steps every exit has been on once.
* ``gradual``: exits switch on from the last layer downwards, one every T / (2L) steps: the
  exit after 0-based decoder layer ``i`` (exit ``l = i + 1``) is on once
  ``t / T >= 0.5 * (L - i) / L`` (paper §4.2; REFERENCE.md's ``layer l`` is 0-based), so the
  first layer's exit comes on at exactly half-way; the last exit is on from the start.
"""

from __future__ import annotations

import enum

from self_speculation.errors import ConfigError


class Curriculum(str, enum.Enum):
    """Early-exit curricula (paper §4.2)."""

    NONE = "none"
    ROTATIONAL = "rotational"
    GRADUAL = "gradual"


def active_exits(
    curriculum: Curriculum | str,
    step: int,
    total_steps: int | None,
    num_layers: int,
    rotation: int = 2,
) -> list[int]:
    """The 1-based exit layers supervised at optimizer step ``step`` (0-based), ascending.

    Args:
        curriculum: which curriculum.
        step: t, the current optimizer step.
        total_steps: T, the number of optimizer steps of the run (``gradual`` only); None
            while unknown (a time budget before the speed is measured): ``gradual`` then
            stays at its start, the last exit alone.
        num_layers: L.
        rotation: R, the period of ``rotational``.
    """
    curriculum = Curriculum(curriculum)
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
    every = range(1, num_layers + 1)
    if curriculum is Curriculum.NONE:
        return list(every)
    if curriculum is Curriculum.ROTATIONAL:
        if rotation < 1:
            raise ConfigError(f"rotation must be >= 1, got {rotation}")
        return [layer for layer in every if (layer + step) % rotation == 0 or layer == num_layers]
    if curriculum is Curriculum.GRADUAL:
        if total_steps is None:
            return [num_layers]
        total = max(total_steps, 1)
        # Exit ``layer`` follows 0-based decoder layer ``layer - 1``, on once
        # step / T >= 0.5 * (L - (layer - 1)) / L; in integers (no rounding at the boundary).
        return [
            layer
            for layer in every
            if layer == num_layers or 2 * num_layers * step >= total * (num_layers - layer + 1)
        ]
    raise AssertionError(curriculum)
