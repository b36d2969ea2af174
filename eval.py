"""Evaluate with lm-evaluation-harness tasks through a LayerSkip generation strategy.

    python eval.py --model M --tasks layerskip_mc layerskip_humaneval --limit 10 \
        --generation_strategy self_speculative --exit_layer 4 --num_speculations 4 \
        --execute_code True --output_dir ./logs

Generation tasks run the chosen strategy (the task's ``until`` and generation kwargs
apply); log-likelihood tasks score with the full model, or at an exit layer with
``--loglikelihood_exit_layer E`` (or ``--loglikelihood_at_exit_layer True`` to reuse
``--exit_layer``). The local tasks in ``tasks/`` (layerskip_humaneval, layerskip_mc) work
offline; hub tasks (gsm8k, ...) need their datasets reachable. Writes
``<output_dir>/eval_<time>.json`` (lm-eval's results, speed of the generation requests,
arguments, environment) and ``eval_<time>.samples.jsonl`` (one row per generation).
``--use_cache DIR`` stores each finished request in lm-eval's request cache, so that a rerun
of an interrupted evaluation runs only what is left.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from arguments import (
    Arguments,
    GenerationArguments,
    arguments_dict,
    check_output_dir,
    distributed_run,
    error_line,
    one_strategy,
    parse_args,
    run_main,
)
from data import DataError
from self_speculation import ConfigError, GenerationConfig, LayerSkipError
from self_speculation.benchmarking import (
    JsonlWriter,
    environment_info,
    run_files,
    setting_digest,
    write_json_atomic,
)
from self_speculation.errors import expand_home, one_line
from self_speculation.metrics import summarize_speed
from self_speculation.output_safety import refuse_output_dir_in_use

logger = logging.getLogger("eval")

LOCAL_TASKS = Path(__file__).resolve().parent / "tasks"
NUMERIC_GEN_KWARGS = (
    "temperature",
    "top_p",
    "top_k",
    "max_gen_toks",
    "max_new_tokens",
    "max_tokens",
    "max_completion_tokens",
    "no_repeat_ngram_size",
)


@dataclass
class EvalGenerationArguments(GenerationArguments):
    """Generation flags, defaulting to how lm-eval's own HFLM decodes a task that sets
    nothing: greedy, 256 tokens, the context as the task wrote it, and when a task samples,
    transformers' top_k 50 and no top_p. A task's generation kwargs override them."""

    max_steps: int = 256
    """Most tokens to generate where a task sets no max_gen_toks (lm-eval's default)."""
    sample: bool = False
    """Sample where a task sets neither do_sample nor temperature (lm-eval: greedy)."""
    top_k: int = 50
    """Keep the k most likely tokens when a task samples and sets no top_k (0: off;
    default: transformers' generate's 50, as lm-eval's HFLM samples)."""
    top_p: float = 1.0
    """Nucleus sampling threshold when a task samples and sets no top_p (1.0: off, as
    lm-eval's HFLM samples)."""
    token_healing: bool = False
    """Back the prompt up over a trailing whitespace token (off: the context ends where the
    task's text ends, as lm-eval's models see it)."""


@dataclass
class EvalArguments:
    """lm-evaluation-harness settings (its own flag names)."""

    tasks: list[str]
    """Task or group names (space or comma separated)"""
    limit: float | None = None
    """Samples per task (a fraction if < 1)"""
    num_fewshot: int | None = None
    """Few-shot examples (default: the task's)"""
    include_path: str | None = None
    """Another folder of task YAMLs (tasks/ is always included)"""
    gen_kwargs: str | None = None
    """Override the tasks' generation kwargs, e.g. "max_gen_toks=64"."""
    loglikelihood_exit_layer: int | None = None
    """Score log-likelihood tasks at this exit layer (default: the full model)."""
    loglikelihood_at_exit_layer: bool = False
    """Score log-likelihood tasks at --exit_layer."""
    execute_code: bool = False
    """Allow tasks that run model-written code (layerskip_humaneval)"""
    bootstrap_iters: int = 1000
    """Bootstrap resamples for standard errors (0: off)"""
    use_cache: str | None = None
    """Folder for lm-eval's request cache (SQLite): each finished request is stored as it
    finishes (sampled generations are not kept: a rerun draws them again, from the same
    seeds), and a rerun with the same settings (an interrupted one, say) reuses them."""

    def __post_init__(self) -> None:
        self.tasks = [
            name.strip() for item in self.tasks for name in item.split(",") if name.strip()
        ]
        if not self.tasks:
            raise ConfigError("--tasks is empty")
        if self.limit is not None and not (0 < self.limit < math.inf):
            raise ConfigError(f"--limit must be a number > 0, got {self.limit}")
        if self.limit is not None and self.limit >= 1 and not float(self.limit).is_integer():
            raise ConfigError(
                f"--limit must be a whole number of samples or a fraction < 1, got {self.limit}"
            )
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"--num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.use_cache is not None:
            self.use_cache = expand_home(self.use_cache, "--use_cache")
            folder = Path(self.use_cache)
            existing = next(path for path in (folder, *folder.parents) if path.exists())
            if not self.use_cache.strip() or not existing.is_dir():
                raise ConfigError(f"--use_cache must be a folder, got {self.use_cache!r}")
        if self.bootstrap_iters < 0:
            raise ConfigError(
                f"--bootstrap_iters must be >= 0 (0: off), got {self.bootstrap_iters}"
            )
        if self.loglikelihood_exit_layer is not None and self.loglikelihood_exit_layer < 1:
            raise ConfigError(
                f"--loglikelihood_exit_layer must be >= 1, got {self.loglikelihood_exit_layer}"
            )
        if self.include_path is not None and not os.path.isdir(self.include_path):
            raise ConfigError(
                f"--include_path {self.include_path} is not a directory (a folder of task YAMLs)"
            )
        if self.gen_kwargs is not None:
            from self_speculation.eval_harness import refuse_unapplied_gen_kwargs

            for pair in self.gen_kwargs.split(","):
                key, sep, value = pair.partition("=")
                if not sep or not key.strip() or not value.strip():
                    raise ConfigError(
                        f"--gen_kwargs: expected key=value pairs separated by commas, got '{pair}'"
                    )
                refuse_unapplied_gen_kwargs([key.strip()], "--gen_kwargs")
                if key.strip() in NUMERIC_GEN_KWARGS:
                    try:
                        float(value)
                    except ValueError:
                        raise ConfigError(
                            f"--gen_kwargs: {key.strip()}={value.strip()} is not a number"
                        ) from None
        if self.loglikelihood_exit_layer is not None and self.loglikelihood_at_exit_layer:
            raise ConfigError(
                "give --loglikelihood_exit_layer or --loglikelihood_at_exit_layer, not both"
            )


def _task_manager(evaluation: EvalArguments):
    """A TaskManager that knows every requested task; the builtin index is only read when a
    requested task is not local (it takes seconds)."""
    from lm_eval.tasks import TaskManager

    paths = [str(LOCAL_TASKS)] + ([evaluation.include_path] if evaluation.include_path else [])
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(local.match_tasks([name]) for name in evaluation.tasks):
        return local
    manager = TaskManager(include_path=paths)
    unknown = [name for name in evaluation.tasks if not manager.match_tasks([name])]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    return manager


def _check_loglikelihood_exit(
    evaluation: EvalArguments, config: GenerationConfig, num_layers: int
) -> int | None:
    """The exit layer log-likelihood tasks score at (None: the full model), checked."""
    exit_layer = (
        config.exit_layer
        if evaluation.loglikelihood_at_exit_layer
        else evaluation.loglikelihood_exit_layer
    )
    if exit_layer is not None and not 1 <= exit_layer <= num_layers:
        raise ConfigError(
            f"loglikelihood exit layer must be in [1, {num_layers}] for this model, got {exit_layer}"
        )
    return exit_layer


@contextlib.contextmanager
def _quiet_git_probe():
    """lm-eval records the working directory's commit by running ``git describe``, whose
    "fatal: not a git repository" reaches the terminal outside a checkout: run it quietly."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is not None:
        evaluator.get_git_commit_hash = _git_commit
    try:
        yield
    finally:
        if original is not None:
            evaluator.get_git_commit_hash = original


def _git_commit() -> str | None:
    """The working directory's ``git describe --always``, or None outside a checkout."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always"], capture_output=True, text=True, check=False
        )
    except OSError:  # no git
        return None
    return done.stdout.strip() or None


class _DropMetadataHint(logging.Filter):
    """lm-eval warns about --metadata (a flag of its own CLI) for every local task, in two
    lines; it means nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "--metadata" not in str(record.msg)


def _writing(writer: JsonlWriter) -> Callable[[dict], None]:
    """``writer.write``, its errors (a full disk) raised as themselves rather than as the
    OSError that eval.py reads as a task's data being unreachable."""

    def write(row: dict) -> None:
        try:
            writer.write(row)
        except OSError as error:
            raise LayerSkipError(error_line(error)) from None

    return write


def _cache_path(
    evaluation: EvalArguments,
    args: Arguments,
    generation: GenerationArguments,
    config: GenerationConfig,
    exit_layer: int | None,
) -> str | None:
    """Where lm-eval keeps this run's request cache: a file per setting under --use_cache
    (lm-eval keys a request by its text alone, so a cache of another model, strategy,
    exit or dtype must not answer it). What the model folder holds is part of the key."""
    if evaluation.use_cache is None:
        return None
    ignored = {"output_dir", "overwrite", "use_cache", "tasks", "limit", "num_fewshot"}
    ignored |= {"include_path", "execute_code", "bootstrap_iters", "num_threads", "compile"}
    relevant = {
        key: value
        for key, value in arguments_dict(args, generation, evaluation).items()
        if key not in ignored
    }
    relevant["resolved"] = {**vars(config), "compile": None}
    relevant["loglikelihood_exit_layer"] = exit_layer
    relevant.update(args.placement_key())
    digest = setting_digest(relevant, {"model": args.model, "draft_adapter": args.draft_adapter})
    path = Path(evaluation.use_cache) / f"eval-{digest}"
    logger.info("request cache: %s_rank0.db", path)
    _check_cache_file(Path(f"{path}_rank0.db"))
    return str(path)


def _check_cache_file(path: Path) -> None:
    """Refuse, in one line, a request cache file that SQLite cannot read (cut short by a
    full disk or a kill, overwritten): lm-eval opens it in a thread of its own, whose error
    is a traceback."""
    if not path.exists():
        return
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as database:
            verdict = database.execute("PRAGMA quick_check").fetchone()
        if verdict is None or verdict[0] != "ok":
            raise sqlite3.DatabaseError(str(verdict[0] if verdict else "no answer"))
    except sqlite3.Error as error:
        raise _cache_error(path, error, "is damaged") from None


def _cache_error(path: Path | str, error: sqlite3.Error, what: str) -> ConfigError:
    """One line on a request cache SQLite cannot use; a cache another run holds locked is
    not called damaged (deleting it would lose that run's answers)."""
    if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
        return ConfigError(
            f"--use_cache: the request cache {path} is in use by another run "
            f"({one_line(error, 200)}); wait for it, or choose another --use_cache"
        )
    return ConfigError(
        f"--use_cache: the request cache {path} {what} ({one_line(error, 200)}); delete it "
        "to start afresh, or choose another --use_cache"
    )


def main(argv: list[str]) -> int:
    args, generation, evaluation = parse_args(
        Arguments, EvalGenerationArguments, EvalArguments, argv=argv, prog="eval.py"
    )
    refuse_output_dir_in_use(args.output_dir)  # a sweep's folder: now, not once loaded
    config = one_strategy(generation, "eval.py")
    if evaluation.use_cache is not None:
        # A folder the cache files go into: the rules of every output folder (not models/,
        # not a model's folder, writable), checked before the tasks and weights load.
        check_output_dir(evaluation.use_cache, "--use_cache", overwrite=args.overwrite)
    logging.getLogger("lm_eval.api.task").addFilter(_DropMetadataHint())
    facts = args.check_model(config)  # before the tasks and weights load
    if facts is not None and facts.num_layers is not None:
        _check_loglikelihood_exit(
            evaluation,
            config.resolved(
                facts.num_layers, facts.recommended_exit_layer, facts.recommended_num_speculations
            ),
            facts.num_layers,
        )
    with distributed_run(args, one_process="eval.py") as context:
        from lm_eval import simple_evaluate

        task_manager = _task_manager(evaluation)
        generator = args.load_generator(context)
        config = generator.resolve(config)
        exit_layer = _check_loglikelihood_exit(evaluation, config, generator.num_layers)
        if evaluation.execute_code:
            logger.warning("--execute_code True: model-written code will run on this machine")

        from self_speculation.eval_harness import LayerSkipLM

        files = run_files(args.output_dir, "eval", context)
        cache = _cache_path(evaluation, args, generation, config, exit_layer)
        with JsonlWriter(files.samples) as writer, _quiet_git_probe():
            lm = LayerSkipLM(
                generator, config, exit_layer, seed=args.seed, on_generation=_writing(writer)
            )
            if evaluation.gen_kwargs is not None:  # its values, now: not after the other tasks
                from lm_eval.utils import simple_parse_args_string

                lm.check_gen_kwargs(simple_parse_args_string(evaluation.gen_kwargs))
            try:
                output = simple_evaluate(
                    model=lm,
                    tasks=evaluation.tasks,
                    num_fewshot=evaluation.num_fewshot,
                    limit=evaluation.limit,
                    gen_kwargs=evaluation.gen_kwargs,
                    task_manager=task_manager,
                    bootstrap_iters=evaluation.bootstrap_iters,
                    confirm_run_unsafe_code=evaluation.execute_code,
                    use_cache=cache,
                    random_seed=args.seed,
                    numpy_random_seed=args.seed,
                    torch_random_seed=args.seed,
                    fewshot_random_seed=args.seed,
                    log_samples=False,
                )
            except ValueError as error:
                if "unsafe" in str(error):
                    raise ConfigError(f"{error} (eval.py: pass --execute_code True)") from None
                if "Sample larger than population" in str(error):  # lm-eval's few-shot draw
                    raise ConfigError(
                        f"--num_fewshot {evaluation.num_fewshot}: a task has fewer examples "
                        "to draw shots from"
                    ) from None
                raise
            except sqlite3.Error as error:  # the request cache's file: damaged, or not writable
                raise _cache_error(f"{cache}_rank0.db", error, "cannot be used") from None
            except (ConnectionError, OSError) as error:  # a hub task's dataset is unreachable
                raise DataError(
                    f"cannot load a task's data: {error}. Hub tasks need the network or a "
                    f"cached copy; the local tasks in tasks/ work offline"
                ) from None
            finally:  # the cache writes in a thread of its own: what is queued is kept
                stored = getattr(lm.cache_hook, "dbdict", None)
                if stored is not None:
                    stored.close()
        document = {
            "script": "eval.py",
            "arguments": arguments_dict(args, generation, evaluation),
            "generation_config": vars(config),
            # What generation ran with: the tasks' gen_kwargs (max_gen_toks, do_sample,
            # temperature...) over generation_config, one entry per distinct setting.
            "generation_configs_used": lm.configs_used,
            "loglikelihood_exit_layer": exit_layer,
            "results": output["results"] if output else {},
            "n-shot": (output or {}).get("n-shot", {}),
            "speed": summarize_speed(lm.generation_rows),
            "environment": environment_info(generator, context, [config]),
            "samples_file": str(files.samples),
        }
        write_json_atomic(files.result, document)
        for task, metrics in document["results"].items():
            shown = ", ".join(
                f"{name.split(',')[0]} {value:.4f}"
                for name, value in metrics.items()
                if isinstance(value, float) and "stderr" not in name
            )
            logger.info("%s: %s", task, shown)
        if lm.generation_rows:
            speed = document["speed"]
            logger.info(
                "generation: %d requests, %.1f tokens/s, acceptance %s",
                speed["num_samples"],
                speed["overall_tokens_per_second"] or 0.0,
                "n/a" if speed["acceptance_rate"] is None else f"{speed['acceptance_rate']:.3f}",
            )
        logger.info("wrote %s", files.result)
    return 0


if __name__ == "__main__":
    run_main(main, prog="eval.py")
