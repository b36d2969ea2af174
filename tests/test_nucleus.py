"""Top-p's nucleus three ways (``sampling._nucleus_floor``): eager code among the likeliest
candidates (the whole vocabulary sorted when a nucleus ends past them), a compiled CPU step
by bisection (no sort, no branch), CUDA by sorting. Each keeps the same tokens (up to the
rounding of sums at the boundary), the tokens transformers' top-p keeps, and tokens tied at
the boundary together."""

from __future__ import annotations

import pytest
import torch
from transformers import TopPLogitsWarper

from self_speculation import sampling
from self_speculation.sampling import _bisected_floor, _nucleus_floor, _sorted_floor, warped


def _rows() -> torch.Tensor:
    """Probability rows over 500 tokens: peaked to flat, some with tokens at probability 0
    (top-k's -inf)."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, 500, generator=generator)
    logits = logits * torch.tensor([0.05, 0.5, 2.0, 5.0, 12.0, 3.0])[:, None, None]
    logits[5, :, 100:] = float("-inf")
    return logits.reshape(-1, 500).softmax(dim=-1)


def _near_boundary(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Rows [n] where the mass before some token lies within rounding of ``top_p``."""
    descending = probs.double().sort(dim=-1, descending=True).values
    before = descending.cumsum(dim=-1) - descending
    return ((before - top_p).abs() < 1e-5).any(dim=-1)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_three_ways_keep_the_same_tokens(top_p: float) -> None:
    probs = _rows()
    sure = ~_near_boundary(probs, top_p)
    kept = {
        "sorted": probs >= _sorted_floor(probs, top_p),
        # Each scale's rows apart: one row ending past the candidates sorts its batch.
        "candidates": torch.cat([g >= _nucleus_floor(g, top_p) for g in probs.split(40)]),
        "bisected": probs >= _bisected_floor(probs, top_p),
    }
    for way, tokens in kept.items():
        assert torch.equal(tokens[sure], kept["sorted"][sure]), way
    if top_p >= 0.5:  # the flattest rows' nuclei end past the candidates: eager code sorted
        assert int(kept["sorted"][:40].sum(dim=-1).min()) > sampling.NUCLEUS_CANDIDATES
    # transformers' top-p keeps the same tokens (no ties here).
    theirs = TopPLogitsWarper(top_p)(None, probs.log())
    assert torch.equal(torch.isfinite(theirs)[sure], kept["sorted"][sure])


def test_a_compiled_warp_bisects_and_keeps_eager_codes_tokens() -> None:
    logits = _rows().log()
    compiled = torch.compile(lambda x: warped(x, 0.7, 0, 0.9), backend="eager", fullgraph=True)
    sure = ~_near_boundary((logits / 0.7).softmax(dim=-1), 0.9)
    ours, eager = compiled(logits), warped(logits, 0.7, 0, 0.9)
    assert torch.equal(torch.isfinite(ours)[sure], torch.isfinite(eager)[sure])


def test_exact_sums_decide_exactly() -> None:
    """Dyadic probabilities sum without rounding: the boundary is the rule's own."""
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.09375, 0.03125]])
    for top_p, count in [(0.5, 1), (0.75, 2), (0.7500001, 3), (0.875, 3), (0.9, 4), (0.97, 5)]:
        for floor in (_sorted_floor, _nucleus_floor, _bisected_floor):
            assert int((probs >= floor(probs, top_p)).sum()) == count, (floor, top_p)


def test_ties_at_the_boundary_stay_together() -> None:
    """Three tokens tied at 0.2 where the nucleus ends in their middle: all three are kept
    each way (transformers keeps some of them, which depending on its sort)."""
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    for floor in (_sorted_floor, _nucleus_floor, _bisected_floor):
        assert (probs >= floor(probs, 0.7)).tolist() == [[True] * 4]
        assert (probs >= floor(probs, 0.3)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(warped(probs.log(), 1.0, 0, 0.7)).all()


def test_the_likeliest_token_always_stays() -> None:
    probs = torch.tensor([[0.9, 0.05, 0.05], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    for floor in (_sorted_floor, _nucleus_floor, _bisected_floor):
        kept = probs >= floor(probs, 1e-6)
        assert kept.any(dim=-1).all()
        assert kept[:2].sum().item() == 2
