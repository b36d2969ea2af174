"""Token trees drafted from the early exit: their static shape and their acceptance.

A tree is given by its branching: ``(2, 2, 1)`` means the pending token (the root, depth 0)
gets the early exit's 2 most likely next tokens as children, each of those gets its 2 most
likely, and each of those 1 (the greedy continuation): 1 + 2 + 4 + 4 = 11 nodes, depth 3.
Nodes are numbered breadth-first (by depth, then parent, then rank), and a step writes node
j at cache column ``base + j``, where ``base`` is the pending token's column. Each node's
attention sees the prompt and accepted tokens before ``base`` and its own ancestors in the
tree (``ColumnKVCache.tree``); its position is ``base``'s plus its depth.

The shape is static (Medusa, SpecInfer and EAGLE's fixed trees), so that one compiled
call serves every step: drafting runs each depth's nodes through layers [0, E) in one
pass, verification runs every node through layers [E, L) in one pass, and acceptance walks
from the root to the child whose token the full model chooses, as long as there is one.
The full model's choice after a node is its argmax (greedy: autoregressive decoding's
tokens) or a draw from its warped distribution with one number per depth (sampling: each
new token is a draw from the full model given the tokens before it, whichever drafts
there were, so the output keeps autoregressive sampling's distribution exactly).
The accepted path's cache columns are then moved to the columns after ``base`` (one copy
of at most ``depth`` columns per layer), so that the column invariant of ``strategies``
holds as after a chain step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from self_speculation.errors import ConfigError

MAX_TREE_NODES = 64  # a verification pass over more rows than this costs more than it saves


class TreeColumns(NamedTuple):
    """What the tokens of one call into a tree see (set on ``ColumnKVCache.tree``).

    Attributes:
        base: the root's column per row, [batch]; node j sits at column ``base + j``.
        node_depths: depth of every node of the tree, [nodes].
        ancestors: for each token of the call, which nodes it attends to (its ancestors
            and itself), [new, nodes] bool.
        query_depths: depth of each token of the call, [new].
    """

    base: torch.Tensor
    node_depths: torch.Tensor
    ancestors: torch.Tensor
    query_depths: torch.Tensor


@dataclass(frozen=True)
class TokenTree:
    """The static shape of a token tree.

    Args:
        branching: children per node at each depth (depth 1 first); its length is the
            tree's depth (the most drafts a step can accept).
    """

    branching: tuple[int, ...]

    def __post_init__(self) -> None:
        check_branching(self.branching)

    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Nodes at each depth, the root's depth 0 first."""
        sizes = [1]
        for width in self.branching:
            sizes.append(sizes[-1] * width)
        return tuple(sizes)

    @property
    def starts(self) -> tuple[int, ...]:
        """Index of each depth's first node."""
        starts = [0]
        for size in self.sizes[:-1]:
            starts.append(starts[-1] + size)
        return tuple(starts)

    @property
    def num_nodes(self) -> int:
        return sum(self.sizes)

    @property
    def parents(self) -> tuple[int, ...]:
        """Each node's parent (the root's is -1)."""
        parents = [-1]
        for depth, width in enumerate(self.branching):
            for local in range(self.sizes[depth + 1]):
                parents.append(self.starts[depth] + local // width)
        return tuple(parents)

    def depths(self, device: torch.device) -> torch.Tensor:
        """Depth of every node, [nodes]."""
        return torch.tensor(
            [depth for depth, size in enumerate(self.sizes) for _ in range(size)], device=device
        )

    def ancestors(self, device: torch.device) -> torch.Tensor:
        """[nodes, nodes] bool: whether node j is node i's ancestor or i itself."""
        table = []
        for node in range(self.num_nodes):
            row = [False] * self.num_nodes
            while node >= 0:
                row[node] = True
                node = self.parents[node]
            table.append(row)
        return torch.tensor(table, device=device)


def tree_refusal(context_processors: bool, confidence_threshold: float) -> str | None:
    """Why the ``tree`` strategy cannot decode with these settings (they need each draft's
    own context, or a chain), or None."""
    if context_processors:
        reason = (
            "logits processors (no_repeat_ngram_size; a checkpoint's repetition penalty, bad "
            "words or suppressed tokens) read each draft's own context, which a tree's nodes "
            "do not have"
        )
    elif confidence_threshold > 0:
        reason = "draft_confidence_threshold shortens chains, not trees"
    else:
        return None
    return f"{reason}; use 'self_speculative' (chains) instead"


def check_branching(branching: tuple[int, ...] | list[int]) -> None:
    """Raises ConfigError for a branching that makes no tree, or too large a one."""
    if not branching:
        raise ConfigError("tree_branching needs at least one depth (e.g. 2 2 1)")
    if any(width < 1 for width in branching):
        raise ConfigError(f"tree_branching entries must be >= 1, got {list(branching)}")
    nodes, size = 1, 1
    for width in branching:
        size *= width
        nodes += size
        if nodes > MAX_TREE_NODES:
            raise ConfigError(
                f"tree_branching {list(branching)} makes more than {MAX_TREE_NODES} nodes; "
                "branch less"
            )


def default_branching(depth: int) -> tuple[int, ...]:
    """The tree used when only a depth (num_speculations) is given: the two most likely
    tokens at the first two depths, greedy continuations after (1 + 2 + 4 + 4 (k - 2)
    nodes)."""
    return tuple(2 if index < 2 else 1 for index in range(depth))


def _default_tree_depth_limit() -> int:
    depth = 1
    while True:
        try:
            check_branching(default_branching(depth + 1))
        except ConfigError:
            return depth
        depth += 1


# The deepest default tree within MAX_TREE_NODES (16: 1 + 2 + 4 + 4 x 14 = 63 nodes).
MAX_DEFAULT_TREE_DEPTH = _default_tree_depth_limit()


def tree_accept(
    tree: TokenTree, tokens: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk the tree from the root along the full model's choices.

    Args:
        tree: the shape.
        tokens: each node's token, [batch, nodes] (the root's is the pending token).
        targets: the full model's choice after each node, [batch, nodes]: its argmax, or
            a draw from its distribution (nodes of one depth drawing with the same number).

    Returns:
        accepted counts [batch] (the accepted path's length), the next token [batch] (the
        correction after the path, or the bonus token at a leaf), the path's nodes per
        depth [batch, depth] (past the accepted ones, the most likely children from the
        last accepted node on: the drafts a chain would have proposed) and their tokens
        [batch, depth].
    """
    batch = tokens.shape[0]
    node = torch.zeros(batch, dtype=torch.long, device=tokens.device)  # the path's end
    guess = node  # follows rank-0 children after a rejection (what is reported as drafts)
    alive = torch.ones(batch, dtype=torch.bool, device=tokens.device)
    accepted = torch.zeros_like(node)
    path = []
    for depth, width in enumerate(tree.branching):
        first_child = tree.starts[depth + 1] + (guess - tree.starts[depth]) * width  # [batch]
        children = first_child[:, None] + torch.arange(width, device=tokens.device)
        target = targets.gather(1, guess[:, None])  # [batch, 1]
        matches = tokens.gather(1, children) == target  # [batch, width]; one at most
        found = alive & matches.any(dim=1)
        # The matching child while the path holds; else the first (most likely) one.
        rank = matches.long().argmax(dim=1) * alive  # [batch]
        guess = children.gather(1, rank[:, None])[:, 0]
        path.append(guess)
        node = torch.where(found, guess, node)
        accepted = accepted + found.long()
        alive = found
    path_nodes = torch.stack(path, dim=1)  # [batch, depth]
    next_tokens = targets.gather(1, node[:, None])[:, 0]
    return accepted, next_tokens, path_nodes, tokens.gather(1, path_nodes)
