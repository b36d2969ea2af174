"""Sweep self-speculative decoding over a grid of (exit_layer, num_speculations).

    python sweep.py --model M --dataset human_eval --num_samples 20 --max_steps 128 \
        --sample False --exit_layer_first 1 --exit_layer_last 8 \
        --num_speculations_first 1 --num_speculations_last 6 --output_dir ./logs

The model is loaded once and every grid point runs on the same samples. An autoregressive
baseline (full model) is measured on them too, so each row has its speedup. Rows are
appended to ``<output_dir>/sweep.csv`` (or ``--output_file``) as points finish; a rerun with
the same settings and file skips the finished points. At the end: a tokens/s heat map
(``<csv stem>.png``), a JSON summary (``<csv stem>.json``) and the best point in the log.
Grid bounds are inclusive; ``--exit_layer_last -1`` means the last layer but one.

``--generation_strategy self_speculative,tree`` sweeps both (chains of k drafts, and token
trees of depth k: ``--tree_branching`` fixes one tree, else each k gets the default tree)
into the same CSV, with the best point of each in the summary.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from arguments import (
    Arguments,
    BenchmarkArguments,
    GenerationArguments,
    arguments_dict,
    check_output_dir,
    distributed_run,
    expected_tokens,
    parse_args,
    run_main,
)
from data import load_examples
from self_speculation import UNSET, ConfigError, GenerationConfig, GenerationStrategyName
from self_speculation import distributed as dist
from self_speculation.benchmarking import (
    append_line,
    check_prompts,
    environment_info,
    full_model_config,
    gather_rows,
    generate_rows,
    repair_last_line,
    setting_digest,
    write_json_atomic,
)
from self_speculation.draft import read_adapter_config
from self_speculation.errors import expand_home
from self_speculation.metrics import summarize_speed
from self_speculation.output_safety import output_dir_lock, replaced_when_done

logger = logging.getLogger("sweep")

COLUMNS = [
    "generation_strategy", "exit_layer", "num_speculations", "acceptance_rate", "total_time",
    "time_per_token", "tokens_per_second", "overall_tokens_per_second", "tokens_per_step",
    "speedup", "num_samples", "setting", "overall_acceptance_rate", "baseline_tokens_per_second",
]  # fmt: skip
# The headers of sweeps written before baseline_tokens_per_second (the autoregressive rate a
# row's speedup divides by: a resumed sweep measures it again, while the CSV keeps the first
# run's autoregressive row) and before overall_acceptance_rate (accepted / drafted over all
# samples, where acceptance_rate is the mean of per-sample rates): read, and rewritten with
# this version's header before a row is appended.
EARLIER_COLUMNS = COLUMNS[:-2]
EARLIER_HEADERS = (COLUMNS[:-1], EARLIER_COLUMNS)
INTEGER_COLUMNS = ("exit_layer", "num_speculations", "num_samples")
TEXT_COLUMNS = ("generation_strategy", "setting")


@dataclass
class SweepArguments:
    """The grid (inclusive bounds), and where the CSV goes."""

    exit_layer_first: int = 1
    """First exit layer of the grid."""
    exit_layer_last: int = -1
    """Last exit layer of the grid (inclusive); -1: the model's last layer but one."""
    exit_layer_step: int = 1
    """Step between the grid's exit layers."""
    num_speculations_first: int = 1
    """First k (drafts per step) of the grid."""
    num_speculations_last: int = 6
    """Last k of the grid (inclusive)."""
    num_speculations_step: int = 1
    """Step between the grid's k."""
    output_file: str | None = None
    """CSV path (default: <output_dir>/sweep.csv)"""
    baseline: bool = True
    """Also measure autoregressive decoding for the speedup column."""

    def __post_init__(self) -> None:
        if self.exit_layer_step < 1 or self.num_speculations_step < 1:
            raise ConfigError("--exit_layer_step and --num_speculations_step must be >= 1")
        if self.exit_layer_first < 1:
            raise ConfigError(f"--exit_layer_first must be >= 1, got {self.exit_layer_first}")
        if self.exit_layer_last != UNSET and self.exit_layer_last < self.exit_layer_first:
            raise ConfigError("--exit_layer_last must be >= --exit_layer_first")
        if not 1 <= self.num_speculations_first <= self.num_speculations_last:
            raise ConfigError("need 1 <= --num_speculations_first <= --num_speculations_last")
        if self.output_file is not None and not self.output_file.strip():
            raise ConfigError("--output_file is empty (give a CSV path)")
        if self.output_file is not None and Path(self.output_file).suffix.lower() in (
            ".png",
            ".json",
        ):
            # The plot and the summary go beside the CSV as <stem>.png and <stem>.json.
            raise ConfigError(
                f"--output_file {self.output_file}: the plot and summary are written to "
                "<stem>.png and <stem>.json beside the CSV and would overwrite it; give a .csv path"
            )

    def grid(self, num_layers: int) -> list[tuple[int, int]]:
        """(exit_layer, num_speculations) points, exit layer major."""
        last = num_layers - 1 if self.exit_layer_last == UNSET else self.exit_layer_last
        if not 1 <= self.exit_layer_first <= last <= num_layers:
            raise ConfigError(
                f"exit layers {self.exit_layer_first}..{last} are outside [1, {num_layers}] for this model"
            )
        exits = range(self.exit_layer_first, last + 1, self.exit_layer_step)
        speculations = range(
            self.num_speculations_first, self.num_speculations_last + 1, self.num_speculations_step
        )
        return [(exit_layer, k) for exit_layer in exits for k in speculations]


def _setting_key(
    args: Arguments,
    generation: GenerationArguments,
    benchmark: BenchmarkArguments,
    compiled: bool,
    world_size: int,
    baseline: bool = True,
) -> str:
    """A short hash of everything but the grid: rows with another key are not reused.
    ``compiled``: the decoding path that runs (what ``--compile auto`` decided);
    ``world_size``: the processes sharing the samples (the tokens are the same, the times
    are not: each process decodes its shard); ``baseline``: False for rows without a
    speedup, which cannot be ranked with rows that have one."""
    relevant = {
        key: value
        for key, value in arguments_dict(args, generation, benchmark).items()
        if key
        not in (
            "output_dir",
            "overwrite",
            "exit_layer",
            "num_speculations",
            "generation_strategy",
            "distributed",
        )
    }
    relevant["compile"] = compiled
    relevant["world_size"] = world_size
    relevant.update(args.placement_key())
    if not baseline:  # keyed only when off: the default run's key stays what it was
        relevant["baseline"] = False
    # What the paths hold, not only their names: a model retrained or data rewritten in
    # place measures again instead of reusing the old rows.
    paths = {"model": args.model, "draft_adapter": args.draft_adapter}
    return setting_digest(relevant, {**paths, "data_path": benchmark.data_path})


def _parse_row(fields: list[str], where: str, header: list[str] = COLUMNS) -> dict:
    """One CSV row (under ``header``) as typed values, every column of COLUMNS present (None
    where an earlier header lacks it); ConfigError naming ``where`` (file, line) when a
    value is not what the sweep writes."""
    if len(fields) != len(header):
        raise ConfigError(f"{where}: {len(fields)} fields, the header has {len(header)}")
    row: dict = dict.fromkeys(COLUMNS, "") | dict(zip(header, fields))
    if row["generation_strategy"] not in {name.value for name in GenerationStrategyName}:
        raise ConfigError(f"{where}: unknown generation_strategy '{row['generation_strategy']}'")
    for column in COLUMNS:
        value = row[column]
        if column in TEXT_COLUMNS:
            continue
        if value == "" and column not in INTEGER_COLUMNS:
            row[column] = None
            continue
        try:
            number = float(value)
            if column in INTEGER_COLUMNS:
                if not number.is_integer():
                    raise ValueError
                number = int(number)
        except (ValueError, OverflowError):
            kind = "an integer" if column in INTEGER_COLUMNS else "a number"
            raise ConfigError(f"{where}: {column} '{value}' is not {kind}") from None
        row[column] = number
    return row


def read_sweep_csv(csv_path: Path) -> tuple[pd.DataFrame, bool]:
    """The rows of a sweep CSV (this version's header or an earlier one), every value
    checked, and whether its last line is unfinished (no newline: a write cut short; it is
    left out, even where it parses: a row is written whole with its newline in one call, and
    one cut inside its last number, overall_acceptance_rate, still reads as a row).

    Raises:
        ConfigError: the file is not a sweep CSV, or a line (named by number) is malformed:
            hand-edited, say.
    """
    hint = "fix or delete that line, or choose another --output_file"
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")  # a BOM from a spreadsheet is fine
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{csv_path} is not a sweep CSV (not UTF-8 text at byte {error.start}); "
            "choose another --output_file"
        ) from None
    lines = text.splitlines(keepends=True)
    unfinished = bool(lines) and not lines[-1].endswith("\n")
    rows, header = [], COLUMNS
    for number, fields in enumerate(csv.reader(lines), start=1):
        last = number == len(lines)
        if not fields and number > 1:  # a blank line from an editor
            continue
        if number == 1:
            if fields in EARLIER_HEADERS:
                header = fields
            elif fields != COLUMNS and not (last and unfinished):
                raise ConfigError(
                    f"{csv_path} is not a sweep CSV (its header is not {','.join(COLUMNS)}); "
                    "choose another --output_file"
                )
            continue
        if last and unfinished:
            break  # cut short by a kill: repaired before the next row is appended
        try:
            rows.append(_parse_row(fields, f"{csv_path}, line {number}", header))
        except ConfigError as error:
            raise ConfigError(f"{error}: {hint}") from None
    table = pd.DataFrame(rows, columns=COLUMNS)
    for column in COLUMNS:
        if column not in TEXT_COLUMNS:
            table[column] = pd.to_numeric(table[column])
    return table, unfinished


def check_siblings(csv_path: Path) -> None:
    """Refuse a CSV path whose ``<stem>.json`` / ``<stem>.png`` (where the summary and the
    plot go) hold something else: ``--output_file model/config.csv`` would replace the
    model's config.json. A summary an earlier sweep wrote (and its plot) may be replaced.

    Raises:
        ConfigError: a sibling exists and is not an earlier sweep's.
    """
    summary, plot = csv_path.with_suffix(".json"), csv_path.with_suffix(".png")
    ours = False
    if summary.exists():
        try:
            document = json.loads(summary.read_bytes())
        except (OSError, ValueError, RecursionError):
            document = None
        ours = isinstance(document, dict) and document.get("script") == "sweep.py"
        if not ours:
            raise ConfigError(
                f"--output_file {csv_path}: the sweep's summary goes to {summary}, which "
                "exists and is not a sweep summary; choose another --output_file"
            )
    if plot.exists() and not ours:
        raise ConfigError(
            f"--output_file {csv_path}: the sweep's plot goes to {plot}, which exists "
            "and no sweep summary beside it says it is a sweep's; choose another --output_file"
        )


def _own_rows(table: pd.DataFrame, setting: str, baseline: bool) -> pd.DataFrame:
    """The rows of ``table`` measured under ``setting``. With a baseline, a point's row
    without a speedup (at a positive rate) is not one of them: versions before
    ``--baseline False`` was keyed apart wrote such rows under the default run's key, and a
    point reused from them had no speedup and was never ranked."""
    rows = table[table["setting"] == setting]
    if baseline:
        unranked = (
            (rows["generation_strategy"] != GenerationStrategyName.AUTOREGRESSIVE.value)
            & rows["speedup"].isna()
            & (rows["overall_tokens_per_second"] > 0)
        )
        rows = rows[~unranked]
    return rows


def _finished(csv_path: Path, setting: str, repair: bool, baseline: bool = True) -> pd.DataFrame:
    """This setting's rows already in the CSV (``_own_rows``). With ``repair``, an unfinished
    last line is cut off (its point is measured again) so the next row starts on a line of
    its own."""
    if not csv_path.exists():
        return pd.DataFrame(columns=COLUMNS)
    table, unfinished = read_sweep_csv(csv_path)
    if repair:
        dropped = repair_last_line(csv_path, is_complete=lambda line: not unfinished)
        if dropped:
            logger.warning("%s ended in an unfinished line, cut off: %r", csv_path, dropped)
        with open(csv_path, encoding="utf-8-sig") as stream:
            earlier = next(csv.reader(stream), None) in EARLIER_HEADERS
        if earlier:  # rows are appended under this version's header: the file takes it
            with replaced_when_done(csv_path) as temporary:
                table.to_csv(temporary, index=False, lineterminator="\n")
            logger.info("%s: rewritten with this version's columns", csv_path)
    own = _own_rows(table, setting, baseline)
    unranked = int((table["setting"] == setting).sum()) - len(own)
    if unranked:
        logger.warning(
            "%s: %d rows of this setting have no speedup (an earlier version's --baseline "
            "False run): their points are measured again",
            csv_path,
            unranked,
        )
    return own


def _append_row(csv_path: Path, row: dict) -> None:
    """One whole line per row (header first in a new or empty file), so that a kill leaves
    at most an unfinished last line, which the next run repairs."""
    if not csv_path.exists() or os.path.getsize(csv_path) == 0:
        append_line(csv_path, ",".join(COLUMNS))
    values = ["" if row.get(column) is None else row[column] for column in COLUMNS]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    append_line(csv_path, buffer.getvalue())


def _measure(generator, samples, config, seed, context) -> dict:
    rows = list(
        generate_rows(
            generator,
            samples,
            [config],
            seed,
            with_text_metrics=False,
            progress=False,
            log_samples=False,
        )
    )
    return summarize_speed(gather_rows(rows, context))


def _csv_lock(csv_path: Path, context: dist.DistributedContext, flag: str):
    """One sweep appends to a CSV at a time (two would measure every point twice, each
    while the other loads the machine): rank 0 holds its folder's lock for the run."""
    if not context.is_main:
        return contextlib.nullcontext()
    return output_dir_lock(csv_path.parent, flag=flag)


def main(argv: list[str]) -> int:
    args, generation, benchmark, sweep = parse_args(
        Arguments,
        GenerationArguments,
        BenchmarkArguments,
        SweepArguments,
        argv=argv,
        prog="sweep.py",
    )
    first_exit = 1
    if args.draft_adapter is not None:
        # An exit adapter is trained for one exit layer: the grid is over k at that layer.
        first_exit = read_adapter_config(args.draft_adapter).exit_layer
        logger.info("the draft adapter fixes the exit layer at %d", first_exit)
        sweep.exit_layer_first = sweep.exit_layer_last = first_exit
    strategies = [name for name in generation.strategies if name.speculative] or [
        GenerationStrategyName.SELF_SPECULATIVE
    ]
    speculative = dataclasses.replace(
        generation.config(GenerationStrategyName.SELF_SPECULATIVE),
        exit_layer=first_exit,
        num_speculations=1,
        tree_branching=None,
    )
    if sweep.output_file is not None:
        check_output_dir(
            str(Path(expand_home(sweep.output_file, "--output_file")).parent),
            "--output_file's folder",
            overwrite=args.overwrite,
        )
    facts = args.check_model(speculative)  # before the data and weights load
    if facts is not None and facts.num_layers is not None:
        sweep.grid(facts.num_layers)
    if facts is not None and facts.context_length is not None:
        if sweep.num_speculations_last >= facts.context_length:
            raise ConfigError(
                f"--num_speculations_last must be below the model's context "
                f"({facts.context_length} tokens), got {sweep.num_speculations_last}"
            )
    csv_path = Path(
        expand_home(sweep.output_file or Path(args.output_dir) / "sweep.csv", "--output_file")
    )
    if csv_path.is_dir():
        raise ConfigError(f"{csv_path} is a directory; --output_file must be a CSV file")
    if csv_path.exists() and not csv_path.is_file():  # /dev/null, a FIFO (reading it waits)
        raise ConfigError(f"{csv_path} is not a regular file (the sweep appends rows to it)")
    with (
        distributed_run(args) as context,
        _csv_lock(
            csv_path, context, "--output_file's folder" if sweep.output_file else "--output_dir"
        ),
    ):
        # The CSV and the data first: either one malformed fails before the weights load.
        check_siblings(csv_path)
        examples = load_examples(benchmark, args.seed)
        expected = expected_tokens(len(examples), generation.max_steps, context.world_size, facts)
        generation.announce_compile(expected)  # per grid point
        compiled = generation.compile_for(expected)
        speculative = dataclasses.replace(speculative, compile=compiled)
        # The main process's key: ranks on other machines see other file times.
        setting = dist.broadcast(
            _setting_key(args, generation, benchmark, compiled, context.world_size, sweep.baseline),
            context,
        )
        # The main process's finished points: every rank must measure the same points in
        # the same order (each point ends in a collective), and a rank on another machine
        # may see no CSV, or an older one.
        done = dist.broadcast(
            _finished(csv_path, setting, repair=True, baseline=sweep.baseline)
            if context.is_main
            else None,
            context,
        )
        generator = args.load_generator(context)
        grid = sweep.grid(generator.num_layers)
        points = [
            (strategy, exit_layer, k)
            for strategy in strategies
            for exit_layer, k in _strategy_grid(strategy, grid, generation)
        ]
        # Every point's settings resolved before anything is measured: one the model or
        # the strategy refuses (a default tree too large at some k) fails now, not midway.
        configs = {
            point: generator.resolve(_point_config(speculative, generation, *point))
            for point in points
        }
        check_prompts(generator, examples)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        samples = dist.shard(examples, context)

        finished = {
            (row.generation_strategy, int(row.exit_layer), int(row.num_speculations))
            for row in done.itertuples()
        }
        todo = [point for point in points if (point[0].value, *point[1:]) not in finished]
        logger.info(
            "%d grid points, %d already in %s", len(points), len(points) - len(todo), csv_path
        )
        baseline_rate = None
        if sweep.baseline:
            previous = done[
                done["generation_strategy"] == GenerationStrategyName.AUTOREGRESSIVE.value
            ]
            earlier = None  # an earlier run's baseline, whose row stays the CSV's
            if len(previous) and pd.notna(previous["overall_tokens_per_second"].iloc[-1]):
                earlier = float(previous["overall_tokens_per_second"].iloc[-1])
            if earlier is not None and not todo:
                baseline_rate = earlier
            else:  # speedups are ratios within one run: measured for this run's points
                config = full_model_config(speculative, generator.num_layers)
                speed = _measure(generator, samples, config, args.seed, context)
                baseline_rate = speed["overall_tokens_per_second"]
                if earlier is not None:
                    logger.info(
                        "autoregressive baseline measured again for this run's points: %.1f "
                        "tokens/s (%.1f in the earlier run, whose row stays in the CSV)",
                        baseline_rate or 0.0,
                        earlier,
                    )
                else:
                    if context.is_main:
                        _append_row(
                            csv_path,
                            _csv_row(
                                config.generation_strategy.value,
                                generator.num_layers,
                                0,
                                speed,
                                1.0,
                                setting,
                                baseline_rate,
                            ),
                        )
                    logger.info("autoregressive baseline: %.1f tokens/s", baseline_rate or 0.0)

        for strategy, exit_layer, num_speculations in tqdm(
            todo, desc="sweep", unit="point", disable=not context.is_main
        ):
            config = configs[strategy, exit_layer, num_speculations]
            speed = _measure(generator, samples, config, args.seed, context)
            rate = speed["overall_tokens_per_second"]
            speedup = rate / baseline_rate if rate and baseline_rate else None
            if context.is_main:
                _append_row(
                    csv_path,
                    _csv_row(
                        config.generation_strategy.value,
                        exit_layer,
                        num_speculations,
                        speed,
                        speedup,
                        setting,
                        baseline_rate,
                    ),
                )
                logger.info(
                    "%s, exit_layer %d, num_speculations %d: %.1f tokens/s, acceptance %s, "
                    "speedup %s",
                    strategy.value, exit_layer, num_speculations, rate or 0.0,
                    "n/a" if speed["acceptance_rate"] is None else f"{speed['acceptance_rate']:.3f}",
                    "n/a" if speedup is None else f"{speedup:.2f}x",
                )  # fmt: skip
        if context.is_main:
            _finish(
                csv_path, setting, points, args, generation, benchmark, sweep, generator,
                context, speculative,
            )  # fmt: skip
    return 0


def _point_config(
    speculative: GenerationConfig,
    generation: GenerationArguments,
    strategy: GenerationStrategyName,
    exit_layer: int,
    num_speculations: int,
) -> GenerationConfig:
    """The settings of one grid point (not yet resolved against the model)."""
    return dataclasses.replace(
        speculative,
        generation_strategy=strategy,
        exit_layer=exit_layer,
        num_speculations=num_speculations,
        tree_branching=generation.tree_branching if strategy.value == "tree" else None,
        adaptive_exit_layers=(
            generation.adaptive_exit_layers if strategy.value == "adaptive" else None
        ),
    )


def _strategy_grid(
    strategy: GenerationStrategyName, grid: list[tuple[int, int]], generation: GenerationArguments
) -> list[tuple[int, int]]:
    """The (exit_layer, num_speculations) points of one strategy: a given tree has one
    depth, so its points are the grid's exit layers at that depth."""
    if strategy is GenerationStrategyName.TREE and generation.tree_branching:
        depth = len(generation.tree_branching)
        return list(dict.fromkeys((exit_layer, depth) for exit_layer, _ in grid))
    return grid


def _csv_row(
    strategy: str,
    exit_layer: int,
    num_speculations: int,
    speed: dict,
    speedup,
    setting: str,
    baseline_rate: float | None,
) -> dict:
    """A CSV row; ``baseline_rate``: the autoregressive tokens/s its speedup divides by."""
    return {
        "generation_strategy": strategy,
        "exit_layer": exit_layer,
        "num_speculations": num_speculations,
        **{key: speed[key] for key in COLUMNS if key in speed},
        "speedup": speedup,
        "setting": setting,
        "baseline_tokens_per_second": baseline_rate,
    }


def _finish(
    csv_path, setting, points, args, generation, benchmark, sweep, generator, context, speculative
) -> None:
    """Plot, summary and best point of this run's grid (the CSV may hold more points, from
    earlier runs with other bounds)."""
    table, _ = read_sweep_csv(csv_path)
    keys = pd.Series(
        list(zip(table["generation_strategy"], table["exit_layer"], table["num_speculations"])),
        index=table.index,
    )
    wanted = [(strategy.value, exit_layer, k) for strategy, exit_layer, k in points]
    table = _own_rows(table[keys.isin(wanted)], setting, sweep.baseline)
    if table.empty:
        logger.warning("no grid point measured")
        return
    best = _best_row(table)
    plot_path = csv_path.with_suffix(".png")

    def plain(row: pd.Series) -> dict:
        return {
            key: (value.item() if hasattr(value, "item") else value) for key, value in row.items()
        }

    best_point = plain(best)
    best_by_strategy = {
        strategy: plain(_best_row(rows)) for strategy, rows in table.groupby("generation_strategy")
    }
    write_json_atomic(
        csv_path.with_suffix(".json"),
        {
            "script": "sweep.py",
            "arguments": arguments_dict(args, generation, benchmark, sweep),
            "setting": setting,
            "csv_file": str(csv_path),
            "plot_file": str(plot_path),
            "best": best_point,
            "best_by_strategy": best_by_strategy,
            "grid": table.to_dict(orient="records"),
            "environment": environment_info(generator, context, [speculative]),
        },
    )
    # The plot after the summary: a run killed between the two leaves a summary that marks
    # the folder as a sweep's (a plot with none beside it would refuse the rerun).
    # The heat map shows the first strategy swept that has rows (chains, unless only trees).
    shown = next(name for name, *_ in wanted if (table["generation_strategy"] == name).any())
    _plot(table[table["generation_strategy"] == shown], plot_path)
    logger.info(
        "best: %s, exit_layer %d, num_speculations %d: %.1f tokens/s (speedup %s); wrote %s, %s, %s",
        best["generation_strategy"], int(best["exit_layer"]), int(best["num_speculations"]),
        best["overall_tokens_per_second"],
        "n/a" if pd.isna(best["speedup"]) else f"{best['speedup']:.2f}x", csv_path,
        csv_path.with_suffix(".json"), plot_path,
    )  # fmt: skip


def _best_row(table: pd.DataFrame) -> pd.Series:
    """The fastest point of ``table``: the highest speedup over autoregressive decoding
    where the rows have one, else (``--baseline False``) the highest tokens/s.

    Rows of a resumed sweep come from several runs, each measured against its own baseline
    under its own load: their tokens/s are not comparable, their speedups are (within one
    run both rank the points alike, every speedup being tokens/s over the same baseline).
    """
    if table["speedup"].notna().any():  # a point without one (a rate of 0) is never the best
        return table.loc[table["speedup"].idxmax()]
    return table.loc[table["overall_tokens_per_second"].idxmax()]


def _plot(table: pd.DataFrame, path: Path) -> None:
    """Heat map of tokens/s over (exit_layer, num_speculations), best point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = table.pivot_table(
        index="num_speculations", columns="exit_layer", values="overall_tokens_per_second"
    )
    figure, axes = plt.subplots(
        figsize=(1.0 + 0.6 * max(len(grid.columns), 4), 1.0 + 0.5 * max(len(grid.index), 4))
    )
    image = axes.imshow(grid.values, origin="lower", aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(grid.columns)), [str(value) for value in grid.columns])
    axes.set_yticks(range(len(grid.index)), [str(value) for value in grid.index])
    axes.set_xlabel("exit_layer")
    axes.set_ylabel("num_speculations")
    axes.set_title(f"{table['generation_strategy'].iloc[0]} tokens/s")
    figure.colorbar(image, ax=axes, label="tokens/s")
    best = _best_row(table)
    axes.plot(
        list(grid.columns).index(best["exit_layer"]), list(grid.index).index(best["num_speculations"]),
        marker="*", color="red", markersize=14,
    )  # fmt: skip
    figure.tight_layout()
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)


if __name__ == "__main__":
    run_main(main, prog="sweep.py")
