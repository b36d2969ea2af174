"""What any drafting policy can gain on a model: static chains, trees, adaptive lengths and
an oracle, replayed exactly on the autoregressive trajectories, priced by one cost model.

Greedy self-speculation accepts a draft when the early exit's top token equals the full
model's; while drafts are accepted they *are* the autoregressive tokens, so the whole run of
any greedy drafting policy follows from one table: for each exit layer E and generated
position, the rank of the autoregressive next token among exit E's logits (teacher-forced:
one pass over prompt + output). A chain of k accepts the run of rank-0 positions (at most
k); a tree with branching b_1..b_d accepts while the rank at depth j is below b_j; an oracle
drafts exactly the run it will get accepted. Replaying the policies costs no decoding, so
every (E, k) and shape is exact and comparable on the same trajectories.

Each step is priced in one-layer passes (``adaptive.step_cost``: drafts through [0, E)
and the head, verification of m + 1 rows through [E, L) at ``row_cost`` extra per row;
trees: one [0, E) pass per depth and one for the leaves, rows as nodes) against L + h per
autoregressive token; h is the head's weights over one layer's (what decoding reads), the
same price the ``adaptive`` strategy decides with. Nothing here is timed, so the replay
can run beside other work (one torch thread by default, as the scripts). Policies that pick
the exit each step (``adaptive_exit``, ``oracle_exit``) have no one exit layer: their rows
carry ``exit_layer`` null and the exits they chose from in ``exits``. The ratios are
bounds: a real step adds its loop, acceptance and call overhead (measured by
benchmarks/overhead.py and engine.py). If even the oracle's bound is below a target, no
drafting policy at that exit can reach it on this model.

    python benchmarks/drafting_bound.py --model models/layerskip-stdlib
    python benchmarks/drafting_bound.py --prompt_set stdlib_heldout --exit_layers 5 6 7 8
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import simple_parsing
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arguments import DEFAULT_NUM_THREADS, apply_num_threads, run_main  # noqa: E402
from benchmarks.engine import PROMPT_SETS  # noqa: E402
from self_speculation import (  # noqa: E402
    DEFAULT_MODEL,
    ConfigError,
    GenerationConfig,
    Generator,
    load_model_and_tokenizer,
)
from self_speculation.adaptive import (  # noqa: E402
    DraftPolicy,
    default_lengths,
    step_cost,
)
from self_speculation.benchmarking import write_json_atomic  # noqa: E402
from self_speculation.errors import require_thread_count  # noqa: E402
from self_speculation.output_safety import check_output_file  # noqa: E402
from self_speculation.trees import TokenTree  # noqa: E402

logger = logging.getLogger("drafting_bound")


@dataclass
class BoundArguments:
    """Replay drafting policies on autoregressive trajectories (see the module docstring)."""

    model: str = DEFAULT_MODEL
    # human_eval, or stdlib_heldout (docstrings of standard-library files the shipped model
    # was not trained on).
    prompt_set: str = "human_eval"
    num_prompts: int = 20
    max_steps: int = 128
    exit_layers: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    num_speculations: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8])
    # Tree shapes (children per node per depth), comma-separated.
    trees: list[str] = field(default_factory=lambda: ["2,1,1", "2,2,1", "2,1,1,1", "3,1,1"])
    # Extra cost of each verified row over a one-row pass (CPU few-row kernel ~0.1; GPU ~0).
    row_cost: float = 0.1
    # Fixed cost of each pass in one-layer passes (0: the paper's model; 5.5: fitted to the
    # shipped model's compiled CPU steps, adaptive.pass_overhead).
    pass_overhead: float = 0.0
    # Exit sets (comma-separated) that adaptive chooses from each step (adaptive_exit_layers).
    adaptive_exit_sets: list[str] = field(default_factory=lambda: ["5,6,7", "4,6,8", "3,4,5,6,7,8"])
    # Thresholds of the per-row confidence stop to replay.
    confidence_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    # torch threads (0: torch's default); nothing is timed, so one leaves the other core free.
    threads: int = DEFAULT_NUM_THREADS
    output: str = "logs/drafting_bound.json"

    def __post_init__(self) -> None:
        # ~ expanded: the file checked is the file written (it went to a folder named "~")
        self.output = str(check_output_file(self.output, "drafting_bound", ("arguments", "rows")))
        if self.prompt_set not in PROMPT_SETS:
            raise ConfigError(
                f"--prompt_set must be one of {', '.join(PROMPT_SETS)}, got '{self.prompt_set}'"
            )
        for name in ("num_prompts", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        require_thread_count(self.threads, "--threads")
        if any(layer < 1 for layer in self.exit_layers):
            raise ConfigError(
                f"--exit_layers must be >= 1 (exit E runs layers [0, E)), got {self.exit_layers}"
            )
        if any(k < 1 for k in self.num_speculations):
            raise ConfigError(f"--num_speculations must be >= 1, got {self.num_speculations}")
        if not self.row_cost >= 0:
            raise ConfigError(f"--row_cost must be >= 0, got {self.row_cost}")
        if not self.pass_overhead >= 0:
            raise ConfigError(f"--pass_overhead must be >= 0, got {self.pass_overhead}")
        for flag, values in (
            ("--trees", self.trees),
            ("--adaptive_exit_sets", self.adaptive_exit_sets),
        ):
            for value in values:
                parts = value.split(",")
                if not all(part.strip().isdigit() and int(part) >= 1 for part in parts):
                    raise ConfigError(
                        f"{flag} entries are comma-separated ints >= 1, e.g. 2,1,1; got '{value}'"
                    )


@torch.inference_mode()
def exit_ranks(
    generator: Generator, ids: list[int], first: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each next token among every exit's logits, and each exit's top probability
    (its confidence), teacher-forced.

    Args:
        ids: prompt + generated tokens.
        first: index of the first position whose next token a draft would predict (the
            first generated token: it came from the prefill, it is the first pending one).

    Returns:
        Ranks [L, n] long and confidences [L, n]: row E - 1 is exit E (layers [0, E)),
        column i the position first + i.
    """
    layerwise = generator.layerwise
    tokens = torch.tensor([ids])
    hidden = layerwise.embed(tokens)
    positions = torch.arange(len(ids))[None]
    targets = tokens[0, first + 1 :]  # [n]
    ranks, confidences = [], []
    for layer in range(layerwise.num_layers):
        hidden = layerwise.run_layers(hidden, layer, layer + 1, None, positions)
        logits = layerwise.unembed(hidden[:, first:-1])[0]  # [n, vocab]
        target_logits = logits.gather(1, targets[:, None])  # [n, 1]
        ranks.append((logits > target_logits).sum(dim=1))
        confidences.append(torch.softmax(logits.float(), dim=-1).amax(dim=-1))
    return torch.stack(ranks), torch.stack(confidences)


def chain_run(ranks: list[int], start: int, limit: int) -> int:
    """Drafts a chain of up to ``limit`` accepts from position ``start``."""
    accepted = 0
    while accepted < limit and start + accepted < len(ranks) and ranks[start + accepted] == 0:
        accepted += 1
    return accepted


def replay_tree(ranks: list[int], branching: tuple[int, ...]) -> int:
    """Steps of a static tree over one trajectory (a chain of k: branching 1, ..., 1)."""
    position = steps = 0
    while position < len(ranks):
        depth = 0
        while (
            depth < len(branching)
            and position + depth < len(ranks)
            and ranks[position + depth] < branching[depth]
        ):
            depth += 1
        position += depth + 1
        steps += 1
    return steps


def replay_adaptive(ranks: dict[int, list[int]], policy: DraftPolicy) -> list[tuple[int, int]]:
    """The (exit, length) ``adaptive`` drafts with at each step of one trajectory (batch of
    one); ``ranks`` per exit layer."""
    position, steps = 0, []
    active = torch.ones(1, dtype=torch.bool)
    while position < len(next(iter(ranks.values()))):
        exit_layer, length = policy.choose()
        accepted = chain_run(ranks[exit_layer], position, length)
        policy.update(exit_layer, length, torch.tensor([accepted]), active)
        steps.append((exit_layer, length))
        position += accepted + 1
    return steps


def replay_confidence(
    ranks: list[int], confidences: list[float], k: int, threshold: float
) -> list[int]:
    """Lengths of chains that stop drafting after a draft whose exit confidence is below
    ``threshold`` (``draft_confidence_threshold``, per row). Confidences after a rejected
    draft are those on the autoregressive path (the real drafts there are conditioned on
    the wrong one): an approximation for the stopping point, exact for acceptance."""
    position, lengths = 0, []
    while position < len(ranks):
        length = 1
        while (
            length < k
            and position + length - 1 < len(confidences)
            and confidences[position + length - 1] >= threshold
        ):
            length += 1
        lengths.append(length)
        position += chain_run(ranks, position, length) + 1
    return lengths


def replay_oracle(ranks: list[int], k: int) -> list[int]:
    """The lengths of an oracle that drafts exactly what will be accepted (at most k):
    the cheapest a chain can be."""
    position, lengths = 0, []
    while position < len(ranks):
        run = chain_run(ranks, position, k)
        lengths.append(run)
        position += run + 1
    return lengths


def tree_cost(tree: TokenTree, exit_layer: int, num_layers: int, head: float, row: float) -> float:
    """A tree step in one-layer passes: one [0, E) pass per depth (its nodes as rows) with
    the head, the leaves through [0, E), every node through [E, L) and the head."""
    total = 0.0
    for depth in range(tree.depth + 1):
        rows = tree.sizes[depth]
        layers = exit_layer + (head if depth < tree.depth else 0.0)
        total += layers * (1 + row * (rows - 1))
    return total + (num_layers - exit_layer + head) * (1 + row * (tree.num_nodes - 1))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    arguments = simple_parsing.parse(
        BoundArguments, args=argv, add_config_path_arg=False, allow_abbrev=False
    )
    apply_num_threads(arguments.threads)
    model, tokenizer = load_model_and_tokenizer(arguments.model, "float32", "cpu")
    generator = Generator(model, tokenizer)
    num_layers = generator.num_layers
    exits = [layer for layer in arguments.exit_layers if layer < num_layers]
    if not exits:
        raise ConfigError(f"--exit_layers must have one below the model's {num_layers} layers")
    for exit_set in arguments.adaptive_exit_sets:
        if any(int(layer) > num_layers for layer in exit_set.split(",")):
            raise ConfigError(
                f"--adaptive_exit_sets: '{exit_set}' names an exit past the model's "
                f"{num_layers} layers"
            )
    head = generator.layerwise.head_cost_in_layers()
    logger.info("L=%d, head = %.2f layers", num_layers, head)

    prompts = PROMPT_SETS[arguments.prompt_set](arguments.num_prompts)
    config = GenerationConfig(max_steps=arguments.max_steps, sample=False)
    trajectories, confidences = [], []  # per prompt: [L, n] ranks and top probabilities
    for prompt in prompts:
        prompt_ids = generator.encode(prompt)
        result = generator.generate(prompt_ids, config)
        ranks, confidence = exit_ranks(generator, prompt_ids + result.token_ids, len(prompt_ids))
        confidences.append(confidence)
        if int(ranks[-1].count_nonzero()):
            logger.warning(
                "the last layer disagrees with decoding at %d positions (ties)",
                int(ranks[-1].count_nonzero()),
            )
        trajectories.append(ranks)
    tokens = sum(ranks.shape[1] for ranks in trajectories)  # after each first token
    overhead = arguments.pass_overhead
    autoregressive = tokens * (num_layers + head + overhead)

    rows = []

    def add(
        policy: str, exit_layer: int | None, steps: int, drafts: int, cost: float, **extra
    ) -> None:
        rows.append(
            {
                "policy": policy,
                "exit_layer": exit_layer,
                "steps": steps,
                "tokens_per_step": tokens / steps,
                "drafts": drafts,
                "acceptance": (tokens - steps) / drafts if drafts else None,
                "bound": autoregressive / cost,
                **extra,
            }
        )

    def cost_of(length: int, exit_layer: int) -> float:
        if not length:  # nothing to draft: one full-model pass
            return num_layers + head + overhead
        return step_cost(length, exit_layer, num_layers, head, arguments.row_cost, overhead)

    k_max = max(arguments.num_speculations)
    for exit_layer in exits:
        per_exit = [ranks[exit_layer - 1].tolist() for ranks in trajectories]
        sure = [confidence[exit_layer - 1].tolist() for confidence in confidences]
        agreement = sum(r.count(0) for r in per_exit) / tokens
        for k in arguments.num_speculations:
            steps = sum(replay_tree(r, (1,) * k) for r in per_exit)
            cost = steps * cost_of(k, exit_layer)
            add("chain", exit_layer, steps, steps * k, cost, k=k, agreement=agreement)
        for shape in arguments.trees:
            tree = TokenTree(tuple(int(part) for part in shape.split(",")))
            steps = sum(replay_tree(r, tree.branching) for r in per_exit)
            cost = steps * (
                tree_cost(tree, exit_layer, num_layers, head, arguments.row_cost)
                + (tree.depth + 2) * overhead
            )
            add("tree", exit_layer, steps, steps * tree.depth, cost, tree=shape)
        for threshold in arguments.confidence_thresholds:
            lengths = []
            for r, c in zip(per_exit, sure):
                lengths += replay_confidence(r, c, k_max, threshold)
            cost = sum(cost_of(m, exit_layer) for m in lengths)
            add(
                "confident",
                exit_layer,
                len(lengths),
                sum(lengths),
                cost,
                k=k_max,
                threshold=threshold,
                mean_length=sum(lengths) / len(lengths),
            )
        for name in ("adaptive", "oracle"):
            lengths = []
            for r in per_exit:
                if name == "adaptive":
                    policy = DraftPolicy(
                        [exit_layer], default_lengths(k_max), num_layers, head,
                        arguments.row_cost, batch_size=1, overhead=overhead,
                    )  # fmt: skip
                    lengths += [length for _, length in replay_adaptive({exit_layer: r}, policy)]
                else:
                    lengths += replay_oracle(r, k_max)
            cost = sum(cost_of(m, exit_layer) for m in lengths)
            add(
                name,
                exit_layer,
                len(lengths),
                sum(lengths),
                cost,
                k=k_max,
                mean_length=sum(lengths) / len(lengths),
            )
    # adaptive choosing the exit too (--adaptive_exit_layers), over each set given.
    for exit_set in arguments.adaptive_exit_sets:
        chosen_exits = [int(layer) for layer in exit_set.split(",")]
        steps_taken = []
        for ranks in trajectories:
            policy = DraftPolicy(
                chosen_exits, default_lengths(k_max), num_layers, head,
                arguments.row_cost, batch_size=1, overhead=overhead,
            )  # fmt: skip
            by_exit = {layer: ranks[layer - 1].tolist() for layer in chosen_exits}
            steps_taken += replay_adaptive(by_exit, policy)
        cost = sum(cost_of(length, layer) for layer, length in steps_taken)
        drafted = sum(length for _, length in steps_taken)
        add("adaptive_exit", None, len(steps_taken), drafted, cost, k=k_max, exits=exit_set)
    # An oracle that also picks the exit of each step: the most tokens per cost among the
    # exits' exact runs (greedy step by step).
    steps = drafts = 0
    cost = 0.0
    for ranks in trajectories:
        per_exit = {exit_layer: ranks[exit_layer - 1].tolist() for exit_layer in exits}
        position = 0
        while position < ranks.shape[1]:
            options = []
            for exit_layer, r in per_exit.items():
                run = chain_run(r, position, k_max)
                options.append(((run + 1) / cost_of(run, exit_layer), run, exit_layer))
            _, run, exit_layer = max(options)
            cost += cost_of(run, exit_layer)
            drafts += run
            steps += 1
            position += run + 1
    add("oracle_exit", None, steps, drafts, cost, k=k_max, exits=",".join(map(str, exits)))
    document = {
        "benchmark": "drafting_bound",
        "arguments": vars(arguments),
        "num_layers": num_layers,
        "head_layers": head,
        "tokens": tokens,
        "rows": rows,
    }
    write_json_atomic(Path(arguments.output), document)
    print_rows(rows)
    return 0


def row_shape(row: dict) -> str:
    """What a row's policy drafted: its tree, confidence threshold or chain length."""
    if "tree" in row:
        return row["tree"]
    if "threshold" in row:
        return f"k={row['k']},t={row['threshold']}"
    return f"k={row['k']}"


def print_rows(rows: list[dict]) -> None:
    """One line per row, then each policy's best: its exit layer, or the exits it chose
    from for the policies that pick one each step (``exit_layer`` None)."""
    print(f"{'policy':<13} {'E':>3} {'shape':>11} {'T/step':>7} {'accept':>7} {'bound':>6}  exits")
    best: dict[str, dict] = {}
    for row in rows:
        exit_layer = "-" if row["exit_layer"] is None else row["exit_layer"]
        acceptance = "-" if row["acceptance"] is None else f"{row['acceptance']:.3f}"
        print(
            f"{row['policy']:<13} {exit_layer:>3} {row_shape(row):>11} "
            f"{row['tokens_per_step']:>7.2f} {acceptance:>7} {row['bound']:>5.2f}x"
            + (f"  {row['exits']}" if "exits" in row else "")
        )
        if row["bound"] > best.get(row["policy"], {"bound": 0})["bound"]:
            best[row["policy"]] = row
    for policy, row in best.items():
        where = f"E={row['exit_layer']}" if "exits" not in row else f"exits {row['exits']}"
        print(
            f"best {policy}: {where} {row_shape(row)}"
            f" {row['bound']:.2f}x autoregressive (cost-model bound)"
        )
    print(json.dumps({policy: round(row["bound"], 3) for policy, row in best.items()}))


if __name__ == "__main__":
    run_main(main, prog="drafting_bound.py")
