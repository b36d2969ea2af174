"""Benchmark a generation strategy on a dataset: quality and speed.

    python benchmark.py --model M --dataset human_eval --num_samples 10 \
        --generation_strategy autoregressive,self_speculative --exit_layer 4 \
        --num_speculations 4 --sample False --max_steps 128 --output_dir ./logs

Several strategies separated by commas run on the same samples (interleaved per sample);
the result then also holds the speedup over the first one and whether the token ids
agreed. Writes ``<output_dir>/benchmark_<time>.json`` (one JSON document: arguments,
generation configs, metrics per strategy, comparison, environment) and
``benchmark_<time>.samples.jsonl`` (one row per sample and strategy, streamed).
Several processes: ``torchrun --nproc_per_node N benchmark.py ...`` shards the samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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
from data import HUMAN_EVAL_PROBLEM_FIELDS, DataError, DatasetName, load_examples
from self_speculation import ConfigError
from self_speculation import distributed as dist
from self_speculation.benchmarking import (
    check_prompts,
    collect_rows,
    compare_strategies,
    environment_info,
    generate_rows,
    run_files,
    write_json_atomic,
)
from self_speculation.metrics import (
    human_eval_pass,
    stop_reasons,
    summarize_speed,
    summarize_text,
)
from self_speculation.output_safety import refuse_output_dir_in_use

logger = logging.getLogger("benchmark")


@dataclass
class MetricArguments:
    """Metrics that need an explicit opt-in."""

    execute_code: bool = False
    """human_eval: run the generated code against its tests (pass@1)"""


def main(argv: list[str]) -> int:
    args, generation, benchmark, metric = parse_args(
        Arguments,
        GenerationArguments,
        BenchmarkArguments,
        MetricArguments,
        argv=argv,
        prog="benchmark.py",
    )
    refuse_output_dir_in_use(args.output_dir)  # a sweep's folder: now, not once loaded
    if metric.execute_code and benchmark.dataset != DatasetName.HUMAN_EVAL.value:
        raise ConfigError("--execute_code True applies to --dataset human_eval only")
    facts = args.check_model(*generation.configs())  # before the data and weights load
    with distributed_run(args) as context:
        examples = load_examples(benchmark, args.seed)
        expected = expected_tokens(len(examples), generation.max_steps, context.world_size, facts)
        generation.announce_compile(expected)
        generator = args.load_generator(context)
        configs = [generator.resolve(config) for config in generation.configs(expected)]
        problems = {example.index: example.metadata for example in examples}
        if metric.execute_code:
            _check_problems(problems)
            logger.warning("--execute_code True: model-written code will run on this machine")
        check_prompts(generator, examples)
        files = run_files(args.output_dir, "benchmark", context)

        with_references = all(example.output is not None for example in examples)
        if not with_references:
            logger.warning("the samples have no references: quality metrics are skipped")
        rows = generate_rows(
            generator,
            dist.shard(examples, context),
            configs,
            args.seed,
            progress=context.is_main,
            with_text_metrics=with_references,
        )
        if metric.execute_code:
            rows = (
                {**row, "passed": human_eval_pass(problems[row["index"]], row["prediction"])}
                for row in rows
            )
        all_rows = collect_rows(rows, files, context)
        if context.is_main:
            document = _result_document(
                args, generation, benchmark, metric, configs, all_rows, generator, context
            )
            document["samples_file"] = str(files.samples)
            write_json_atomic(files.result, document)
            _log_summary(document)
            logger.info("wrote %s and %s", files.result, files.samples)
    return 0


def _check_problems(problems: dict[int, dict]) -> None:
    """Fail before generating when a sample lacks what running its tests needs (a local
    --data_path copy of HumanEval without the "test" column, say)."""
    for index, problem in problems.items():
        missing = [key for key in HUMAN_EVAL_PROBLEM_FIELDS if key not in problem]
        if missing:
            raise DataError(
                f"--execute_code True: sample {index} has no {', '.join(missing)} "
                f"(HumanEval problems need {', '.join(HUMAN_EVAL_PROBLEM_FIELDS)})"
            )


def _result_document(
    args, generation, benchmark, metric, configs, rows, generator, context
) -> dict:
    strategies = [config.generation_strategy.value for config in configs]
    with_references = all(row["reference"] is not None for row in rows)
    metrics = {}
    for strategy in strategies:
        chosen = [row for row in rows if row["generation_strategy"] == strategy]
        quality = summarize_text(chosen) if with_references else {}
        metrics[strategy] = {
            **quality,
            **summarize_speed(chosen),
            "stop_reasons": stop_reasons(chosen),
        }
        if metric.execute_code:
            metrics[strategy]["pass@1"] = sum(row["passed"] for row in chosen) / max(len(chosen), 1)
    document = {
        "script": "benchmark.py",
        "arguments": arguments_dict(args, generation, benchmark, metric),
        "generation_configs": [vars(config) for config in configs],
        "num_samples": len({row["index"] for row in rows}),
        "metrics": metrics,
        "quality_metrics": "computed" if with_references else "skipped: no references",
        "environment": environment_info(generator, context, configs),
    }
    if len(strategies) > 1:
        comparison = compare_strategies(rows, strategies)
        comparison["greedy"] = not configs[0].sample
        document["comparison"] = comparison
    return document


def _log_summary(document: dict) -> None:
    for strategy, metrics in document["metrics"].items():
        acceptance = metrics["acceptance_rate"]
        rouge = metrics.get("rougeL")  # None: no reference had a word rouge-score keeps
        quality = (
            f", ROUGE-L {'n/a' if rouge is None else f'{rouge:.3f}'}, "
            f"BLEU {metrics['corpus_bleu']:.2f}, exact match {metrics['exact_match'] or 0.0:.3f}"
            if "corpus_bleu" in metrics
            else ""
        )
        if "pass@1" in metrics:
            quality += f", pass@1 {metrics['pass@1']:.3f}"
        logger.info(
            "%s: %d samples, %.1f tokens/s (%.4f s/token), acceptance %s%s",
            strategy,
            metrics["num_samples"],
            metrics["overall_tokens_per_second"] or 0.0,
            metrics["time_per_token"] or 0.0,
            "n/a" if acceptance is None else f"{acceptance:.3f}",
            quality,
        )
        cut = metrics.get("stop_reasons", {}).get("context_length", 0)
        if cut:
            logger.warning(
                "%s: %d of %d outputs reached the model's context before --max_steps "
                "(stop_reason context_length in the samples file): they are cut short",
                strategy,
                cut,
                metrics["num_samples"],
            )
    comparison = document.get("comparison")
    if comparison:
        for strategy, speedup in comparison["speedup"].items():
            if strategy != comparison["baseline"] and speedup is not None:
                logger.info("%s speedup over %s: %.2fx", strategy, comparison["baseline"], speedup)
        logger.info(
            "outputs identical on %d/%d samples%s",
            comparison["num_samples"] - comparison["num_mismatches"],
            comparison["num_samples"],
            "" if comparison.get("greedy", True) else " (sampled: each strategy draws its own)",
        )


if __name__ == "__main__":
    run_main(main, prog="benchmark.py")
