"""Check that greedy self-speculative decoding reproduces greedy autoregressive decoding.

    python correctness.py --model M --dataset human_eval --exit_layer 4 \
        --num_speculations 6 --num_samples 10 --max_steps 128 --output_dir ./logs

Runs the full model autoregressively and self-speculatively on the same prompts and
compares the generated token ids (LayerSkip's guarantee: identical when greedy, up to
floating-point ties in low precision). Writes ``<output_dir>/correctness_<time>.json``
(num_samples, num_mismatches, mismatch_pct, per mismatch the first differing position and
whether the full model's logits for the two tokens are a near tie, within rounding of the
dtype) and the per-sample rows; exits 1 when an output differs (``--allow_near_ties True``:
unless every difference is a near tie), 0 when all match.

``--sample True`` is refused: the guarantee is token identity of greedy outputs only.
Sampled outputs of a correct implementation differ too (the two strategies consume their
random draws differently), so a sampled comparison could neither pass nor fail honestly;
the sampling path is checked against the target distribution by
tests/test_sampling_distribution.py instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from arguments import (
    Arguments,
    BenchmarkArguments,
    GenerationArguments,
    arguments_dict,
    distributed_run,
    expected_tokens,
    parse_args,
    run_main,
)
from data import load_examples
from self_speculation import ConfigError, GenerationConfig, GenerationStrategyName, Generator
from self_speculation import distributed as dist
from self_speculation.benchmarking import (
    check_prompts,
    collect_rows,
    compare_strategies,
    environment_info,
    full_model_config,
    generate_rows,
    run_files,
    write_json_atomic,
)
from self_speculation.errors import one_line
from self_speculation.output_safety import refuse_output_dir_in_use
from self_speculation.sampling import _context_processors, compared_dtype

logger = logging.getLogger("correctness")

EXIT_MISMATCH = 1
# A difference whose two tokens' logits (the full model's, recomputed) are this many rounding
# steps of the dtype apart or fewer is a near tie: a one-token pass and a pass over k + 1
# tokens may each round their way (measured gaps at bfloat16 differences: under 1 step).
NEAR_TIE_STEPS = 2.0


@dataclass
class CorrectnessArguments(Arguments):
    """Model, device and output settings common to every script."""

    dtype: str | None = None
    """float32, bfloat16, float16, float64 (default: float32, on a GPU too: bfloat16 and
    float16 round a one-token pass and a pass over k + 1 tokens differently)"""
    allow_near_ties: bool = False
    """Exit 0 when every difference is a near tie: the full model's logits for the two
    differing tokens within 2 rounding steps of the dtype (each difference is classified
    and reported either way)"""


@dataclass
class CorrectnessGenerationArguments(GenerationArguments):
    """Generation flags; greedy by default, since only greedy outputs must match."""

    generation_strategy: str = GenerationStrategyName.SELF_SPECULATIVE.value
    """self_speculative, tree or adaptive: compared with autoregressive decoding of the full
    model."""
    sample: bool = False
    """Must stay False: only greedy outputs are guaranteed identical (True is refused)."""


def main(argv: list[str]) -> int:
    args, generation, benchmark = parse_args(
        CorrectnessArguments,
        CorrectnessGenerationArguments,
        BenchmarkArguments,
        argv=argv,
        prog="correctness.py",
    )
    refuse_output_dir_in_use(args.output_dir)  # a sweep's folder: now, not once loaded
    strategies = generation.strategies
    if len(strategies) != 1 or not strategies[0].speculative:
        # The comparison is fixed; another value would be ignored without a word.
        raise ConfigError(
            "correctness.py compares autoregressive decoding with one of self_speculative, "
            "tree or adaptive: give one of them "
            f"(got --generation_strategy {generation.generation_strategy})"
        )
    strategy = strategies[0]
    if generation.sample:
        raise ConfigError(
            "correctness.py checks greedy decoding only: leave out --sample True (sampled "
            "outputs differ even when both strategies are right, their random draws differ)"
        )
    if args.dtype is None:  # not bfloat16 on a GPU: exactness is checked where it holds
        args.dtype = "float32"
    elif args.dtype in ("bfloat16", "float16"):
        logger.warning(
            "--dtype %s: a one-token pass and a pass over k + 1 tokens round differently, "
            "so where the top two logits are within rounding of each other the strategies "
            "can pick different tokens without either being wrong; --dtype float32 checks "
            "exactness",
            args.dtype,
        )
    facts = args.check_model(generation.config(strategy))
    with distributed_run(args) as context:
        examples = load_examples(benchmark, args.seed)
        expected = expected_tokens(len(examples), generation.max_steps, context.world_size, facts)
        generation.announce_compile(expected)
        generator = args.load_generator(context)
        speculative = generator.resolve(generation.config(strategy, expected))
        baseline = full_model_config(speculative, generator.num_layers)
        check_prompts(generator, examples)
        files = run_files(args.output_dir, "correctness", context)
        rows = generate_rows(
            generator,
            dist.shard(examples, context),
            [baseline, speculative],
            args.seed,
            with_text_metrics=False,
            progress=context.is_main,
            description="correctness",
        )
        all_rows = collect_rows(rows, files, context)
        status = 0
        if context.is_main:
            names = [GenerationStrategyName.AUTOREGRESSIVE.value, strategy.value]
            comparison = compare_strategies(all_rows, names)
            mismatches = [
                {
                    "index": mismatch["index"],
                    "first_difference": mismatch["first_difference"],
                    **_classified(
                        generator,
                        speculative,
                        all_rows,
                        mismatch["index"],
                        mismatch["first_difference"],
                        names,
                    ),
                }
                for mismatch in comparison["mismatches"]
            ]
            near_ties = sum(mismatch["near_tie"] for mismatch in mismatches)
            document = {
                "script": "correctness.py",
                "arguments": arguments_dict(args, generation, benchmark),
                "generation_configs": [vars(baseline), vars(speculative)],
                "greedy": True,
                **{
                    key: comparison[key]
                    for key in ("num_samples", "num_mismatches", "mismatch_pct", "speedup")
                },
                "mismatches": mismatches,
                "num_near_ties": near_ties,
                "passed": comparison["num_mismatches"] == 0,  # token for token
                "only_near_ties": bool(mismatches) and near_ties == len(mismatches),
                "environment": environment_info(generator, context, [baseline, speculative]),
                "samples_file": str(files.samples),
            }
            write_json_atomic(files.result, document)
            logger.info(
                "%d/%d outputs differ (%.1f%%) between autoregressive and %s "
                "(exit_layer %d, num_speculations %d, %s)%s; wrote %s",
                comparison["num_mismatches"],
                comparison["num_samples"],
                comparison["mismatch_pct"],
                strategy.value,
                speculative.exit_layer,
                speculative.num_speculations,
                "greedy",
                f", {near_ties} of them at near ties (the full model's two logits within "
                f"{NEAR_TIE_STEPS:g} rounding steps of {generator.model.dtype})"
                if mismatches
                else "",
                files.result,
            )
            if mismatches and not (args.allow_near_ties and near_ties == len(mismatches)):
                status = EXIT_MISMATCH
        status = dist.broadcast(status, context)
    return status


def _classified(*args) -> dict:
    """``_tie_check(*args)``; a check that fails (out of memory for the recomputed forward,
    say) leaves that difference unclassified, not the run's results unwritten."""
    try:
        return _tie_check(*args)
    except Exception as error:  # the comparison itself is done: keep it
        logger.warning("could not classify a difference: %s", one_line(error))
        return {
            "tokens": None,
            "logits": None,
            "rounding_steps": None,
            "near_tie": False,
            "why": f"not classified: {one_line(error)}",
        }


def _tie_check(
    generator: Generator,
    config: GenerationConfig,
    rows: list[dict],
    index: int,
    position: int,
    names: list[str],
) -> dict:
    """Whether the first difference of sample ``index`` is a near tie: the full model's own
    forward over the prompt and the common tokens, its logits for the two differing tokens
    as greedy decoding compares them (token healing's first-token restriction and the logits
    processors applied: no_repeat_ngram_size, the checkpoint's repetition penalty...), their
    gap in rounding steps at their magnitude of the dtype greedy decoding compares them in
    (the model's; float32 for float64, as transformers' ``generate``)."""
    plain, other = (
        next(row for row in rows if row["index"] == index and row["generation_strategy"] == name)
        for name in names
    )
    if position >= min(len(plain["token_ids"]), len(other["token_ids"])):
        ended = [row["token_ids"][position] if position < len(row["token_ids"]) else None
                 for row in (plain, other)]  # fmt: skip
        return {
            "tokens": ended,
            "logits": None,
            "rounding_steps": None,
            "near_tie": False,
            "why": "one output ends where the other goes on",
        }
    prompt_ids = generator.encode(plain["prompt"])
    context = prompt_ids[: plain["num_prompt_tokens"]] + plain["token_ids"][:position]
    model = generator.model
    ids = torch.tensor([context], device=model.device)
    with torch.inference_mode():
        logits = model(ids).logits[:, -1].float()  # [1, vocab]
        if position == 0 and config.token_healing:  # the first token extends the healed end
            _, _, allowed = generator._heal([prompt_ids])
            allowed = allowed[:, : logits.shape[-1]].to(logits.device)
            logits[:, : allowed.shape[-1]] = logits[:, : allowed.shape[-1]].masked_fill(
                ~allowed, float("-inf")
            )
        processors = _context_processors(config, getattr(model, "generation_config", None))
        logits = processors(ids, logits)[0]
    tokens = plain["token_ids"][position], other["token_ids"][position]
    values = [float(logits[token]) for token in tokens]
    if not all(math.isfinite(value) for value in values):
        return {
            "tokens": list(tokens),
            "logits": values,
            "rounding_steps": None,
            "near_tie": False,
            "why": "a token greedy decoding rules out (banned, or not finite)",
        }
    magnitude = max(abs(value) for value in values)
    # In the dtype greedy decoding compares them in (float32 for a float64 model's logits).
    eps = torch.finfo(compared_dtype(model.dtype)).eps
    step = eps * 2.0 ** math.floor(math.log2(max(magnitude, 1e-30)))
    steps = abs(values[0] - values[1]) / step
    return {
        "tokens": list(tokens),  # autoregressive's, then the other strategy's
        "logits": values,  # the full model's logits for them, as greedy decoding compares them
        "rounding_steps": steps,
        "near_tie": steps <= NEAR_TIE_STEPS,
    }


if __name__ == "__main__":
    run_main(main, prog="correctness.py")
