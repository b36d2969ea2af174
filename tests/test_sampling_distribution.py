"""Self-speculative sampling reproduces the full model's processed distribution, exactly.

Speculative sampling (Leviathan et al. 2023, Alg. 1; LayerSkip §5) promises that the kept
tokens are distributed as samples from the full model's distribution p after the logits
warpers (temperature, then top-k, then top-p, as transformers' generate applies them).
These tests check that promise end to end, through the public API only
(``Generator.generate`` / ``generate_batch`` with a seeded ``torch.Generator``):

* a tiny Llama with a 12-token vocabulary, whose first tokens' joint distribution is
  enumerated exactly from ``model(...)`` and transformers' own warpers (the target);
* exit layer 1 of 4, so the early exit's q differs from p and drafts are both kept and
  rejected, and every first step verifies k = 3 drafts (a rejection can fall on any
  draft, then the residual norm(max(p_i - q_i, 0)) of that position is drawn);
* temperature 0.7, top-k 3 and top-p 0.9 all active, so a q or p taken before the warpers
  (or from the wrong position) changes the kept tokens' distribution;
* one prompt, a batch of identical prompts, and a batch of different prompt lengths (left
  padding, rows cut by each other's acceptance).

Noise floor: with n draws, the total-variation distance (TV) between the empirical and
the exact distribution is itself random. We simulate it: 1000 experiments of n exact
draws each give its mean and standard deviation, and a check fails when the observed TV
exceeds mean + 4.5 standard deviations (a correct sampler crosses it about once in 1e5
checks if the TV were normal; its right tail is a little heavier). With 1000 draws the floor is about 0.15 for the joint of 4 tokens (81
outcomes) and 0.06-0.08 for each token's marginal; a correct sampler measured 0.11 and
0.01-0.04. Injected bugs, checked when these tests were written: a residual drawn from
position 0 instead of the rejected draft's (or from the next position) puts 8-50% of the
draws on sequences the warpers forbid and the joint's TV at 0.22-0.55; draft
probabilities taken before the warpers give a joint TV of 0.28-0.35 (and marginal TVs up
to 0.22). Each of the three sampling tests below failed for each injected bug.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from self_speculation import GenerationConfig, Generator

VOCAB = 12
NUM_LAYERS = 4
EXIT_LAYER = 1
NUM_SPECULATIONS = 3
# The first step verifies NUM_SPECULATIONS drafts after the prefill's token, so the joint
# of the first NUM_SPECULATIONS + 1 tokens covers every draft position's rejection.
LENGTH = NUM_SPECULATIONS + 1
MAX_STEPS = NUM_SPECULATIONS + 2  # + 1 bonus token, so the first step is never cut short
WARPERS = dict(temperature=0.7, top_k=3, top_p=0.9)
NOISE_SIGMAS = 4.5


def tiny_generator() -> Generator:
    """A 4-layer Llama with a 12-token vocabulary and a sharpened head."""
    model = make_tiny_model(
        "llama_mha_untied",
        vocab_size=VOCAB,
        num_hidden_layers=NUM_LAYERS,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        seed=1,
    )
    with torch.no_grad():  # a sharper head: p far from uniform, q (exit 1) far from p
        model.lm_head.weight.mul_(4.0)
    return Generator(model, IdTokenizer())


@pytest.fixture(scope="module")
def generator() -> Generator:
    return tiny_generator()


def config() -> GenerationConfig:
    return GenerationConfig(
        max_steps=MAX_STEPS,
        sample=True,
        generation_strategy="self_speculative",
        exit_layer=EXIT_LAYER,
        num_speculations=NUM_SPECULATIONS,
        **WARPERS,
    )


def processed_probs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The sampling distribution [batch, vocab] from last-position ``logits`` [batch, vocab]
    of ``input_ids`` [batch, seq], through transformers' warpers in generate's order."""
    scores = TemperatureLogitsWarper(WARPERS["temperature"])(input_ids, logits)
    scores = TopKLogitsWarper(WARPERS["top_k"])(input_ids, scores)
    scores = TopPLogitsWarper(WARPERS["top_p"])(input_ids, scores)
    return torch.softmax(scores, dim=-1)


@torch.no_grad()
def exact_joint(model: torch.nn.Module, prompt: list[int], length: int) -> torch.Tensor:
    """P(t_1..t_length | prompt) of the full model after the warpers, [vocab] * length.

    Enumerated over the prefix tree, expanding only tokens the warpers keep (top-k 3: at
    most 3 + 9 + 27 prefixes), one batched forward per depth.
    """
    joint = torch.zeros([VOCAB] * length, dtype=torch.float64)
    prefixes: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        keys = list(prefixes)
        input_ids = torch.tensor([prompt + list(key) for key in keys])  # [prefixes, seq]
        logits = model(input_ids).logits[:, -1].double()  # [prefixes, vocab]
        probs = processed_probs(logits, input_ids)  # [prefixes, vocab]
        expanded = {}
        for key, row in zip(keys, probs):
            for token in row.nonzero().flatten().tolist():
                expanded[(*key, token)] = prefixes[key] * float(row[token])
        prefixes = expanded
    for key, probability in prefixes.items():
        joint[key] = probability
    assert abs(float(joint.sum()) - 1.0) < 1e-9
    return joint


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def noise_floor(exact: torch.Tensor, draws: int, experiments: int = 1000) -> float:
    """TV that n = ``draws`` exact samples exceed with probability well below 1e-4:
    the mean + NOISE_SIGMAS standard deviations of the TV over simulated experiments."""
    probs = exact.flatten()
    probs = probs[probs > 0]  # an exact sampler never draws the others
    rng = torch.Generator().manual_seed(1234)
    samples = torch.multinomial(probs, draws * experiments, replacement=True, generator=rng)
    offsets = torch.arange(experiments).repeat_interleave(draws) * probs.numel()
    counts = torch.bincount(samples + offsets, minlength=experiments * probs.numel())
    empirical = counts.view(experiments, -1).double() / draws  # [experiments, outcomes]
    distances = 0.5 * (empirical - probs).abs().sum(dim=-1)  # [experiments]
    return float(distances.mean() + NOISE_SIGMAS * distances.std())


def marginals(joint: torch.Tensor) -> list[torch.Tensor]:
    """The distribution of each position of ``joint`` [vocab] * length."""
    axes = range(joint.dim())
    return [joint.sum(tuple(other for other in axes if other != axis)) for axis in axes]


def assert_matches(empirical: torch.Tensor, exact: torch.Tensor, draws: int, label: str) -> None:
    """The joint and every position's marginal within the noise floor of ``draws``; no
    sequence the warpers forbid."""
    impossible = float(empirical[exact == 0].sum())
    assert impossible == 0, f"{label}: {impossible:.3f} of the draws have probability 0"
    checks = [("joint", empirical, exact)] + [
        (f"token {position + 1}", observed, expected)
        for position, (observed, expected) in enumerate(zip(marginals(empirical), marginals(exact)))
    ]
    for name, observed, expected in checks:
        distance, floor = total_variation(observed, expected), noise_floor(expected, draws)
        assert distance < floor, f"{label}, {name}: TV {distance:.4f} >= noise floor {floor:.4f}"


class Tally:
    """Counts of the first LENGTH tokens of sampled outputs, and the drafting they took."""

    def __init__(self) -> None:
        self.counts = torch.zeros([VOCAB] * LENGTH, dtype=torch.float64)
        self.draws = self.drafted = self.accepted = 0
        self.steps_with_all_drafts = 0  # runs whose first step drafted NUM_SPECULATIONS

    def add(self, result) -> None:
        assert len(result.token_ids) == MAX_STEPS
        self.counts[tuple(result.token_ids[:LENGTH])] += 1
        self.draws += 1
        self.drafted += result.num_drafted
        self.accepted += result.num_accepted
        self.steps_with_all_drafts += result.num_drafted >= NUM_SPECULATIONS

    def check(self, exact: torch.Tensor, label: str) -> None:
        # The machinery was exercised: several drafts per step, some kept, some rejected.
        assert self.steps_with_all_drafts == self.draws, label
        assert 0.05 < self.accepted / self.drafted < 0.95, (label, self.accepted, self.drafted)
        assert_matches(self.counts / self.draws, exact, self.draws, label)


PROMPT = [3, 1, 4]
OTHER_PROMPT = [9, 2, 6, 5, 3]  # longer: PROMPT is left-padded beside it


@pytest.mark.slow
def test_one_prompt_matches_the_exact_distribution(generator: Generator) -> None:
    """1000 seeded draws of one prompt."""
    exact = exact_joint(generator.model, PROMPT, LENGTH)
    rng = torch.Generator().manual_seed(0)
    tally = Tally()
    for _ in range(1000):
        tally.add(generator.generate(PROMPT, config(), generator=rng))
    tally.check(exact, "one prompt")


@pytest.mark.slow
def test_batch_of_identical_prompts_matches_the_exact_distribution(
    generator: Generator,
) -> None:
    """Rows of a batch are independent draws (each row's output follows p whatever the
    other rows accepted): 250 batches of 4 rows, pooled."""
    exact = exact_joint(generator.model, PROMPT, LENGTH)
    rng = torch.Generator().manual_seed(1)
    tally = Tally()
    for _ in range(250):
        for result in generator.generate_batch([PROMPT] * 4, config(), generator=rng):
            tally.add(result)
    tally.check(exact, "identical rows")


@pytest.mark.slow
def test_batch_of_different_prompts_matches_each_rows_distribution(
    generator: Generator,
) -> None:
    """Two prompt lengths alternating in a batch of 4 (left padding; each row's step cut
    to the batch's smallest accepted count): 400 batches, 800 draws per prompt."""
    prompts = [PROMPT, OTHER_PROMPT, PROMPT, OTHER_PROMPT]
    exact = {tuple(prompt): exact_joint(generator.model, prompt, LENGTH) for prompt in prompts}
    rng = torch.Generator().manual_seed(2)
    tallies = {key: Tally() for key in exact}
    for _ in range(400):
        for prompt, result in zip(
            prompts, generator.generate_batch(prompts, config(), generator=rng)
        ):
            tallies[tuple(prompt)].add(result)
    for key, tally in tallies.items():
        tally.check(exact[key], f"batched prompt {list(key)}")


def test_exact_target_is_what_the_warpers_allow(generator: Generator) -> None:
    """The reference itself: top-k 3 keeps at most 3 tokens per position, and the
    enumeration is a distribution that differs from the unwarped model's (so the tests
    above would notice a sampler that skipped the warpers)."""
    exact = exact_joint(generator.model, PROMPT, LENGTH)
    for marginal in marginals(exact)[:1]:
        assert int((marginal > 0).sum()) <= WARPERS["top_k"]
    assert int((exact > 0).sum()) <= WARPERS["top_k"] ** LENGTH
    with torch.no_grad():
        logits = generator.model(torch.tensor([PROMPT])).logits[0, -1].double()
    unwarped = torch.softmax(logits, dim=-1)
    assert total_variation(marginals(exact)[0], unwarped) > 0.1
