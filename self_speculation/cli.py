"""The command-line parser of every script: dataclasses as flags (simple-parsing).

Flags are matched whole (``--max_token`` is an unknown flag, not ``--max_tokens``), each
dataclass's flags are grouped under a title a user can read ("generation options", not
"GenerationArguments ['group1']"), a default is shown once, and a command line that cannot
be parsed raises :class:`~self_speculation.errors.ArgumentsError`, which the scripts print as
one line with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import simple_parsing

from self_speculation.errors import ArgumentsError, ConfigError

_NUMBER = re.compile(r"^-\d*\.?\d+([eE][-+]?\d+)?$")  # a negative value, not a flag


def log_to_stderr(level: int, rank: int | None = None, force: bool = True) -> None:
    """Every script's log lines on stderr: time, level, ``[rank R]`` under torchrun (``rank``,
    else $RANK, where $WORLD_SIZE says several processes), logger name, message; without
    transformers' progress bars ("Loading weights", "Writing model shards"). ``force``:
    replace handlers already configured (False: a caller's own logging set-up stays)."""
    rank_env = os.environ.get("RANK") if rank is None else str(rank)
    # Checked later, in the run (a bad value is a one-line error there, not here).
    several = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")
    prefix = f"[rank {rank_env}] " if rank_env is not None and several else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=force,
    )
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


class HelpFormatter(simple_parsing.SimpleHelpFormatter):
    """Adds "(default: X)" only where the flag's help does not already say "(default: ...)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text.lower() or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def group_title(title: str) -> str:
    """``"GenerationArguments ['group1']"`` -> ``"generation options"``; other titles as given."""
    if not re.search(r" \[.*\]$", title):
        return title
    name = re.sub(r"(Arguments|Config)$", "", re.sub(r" \[.*\]$", "", title))
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower() or "common"
    return f"{words} options"


class FlagParser(simple_parsing.ArgumentParser):
    """simple-parsing's parser without flag prefixes, raising instead of printing usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("add_option_string_dash_variants", simple_parsing.DashVariant.UNDERSCORE)
        kwargs.setdefault("add_config_path_arg", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs["allow_abbrev"] = False  # an unknown flag is an error, never a guessed one
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ArgumentsError(f"{message} (see --help)")

    def _preprocessing(self, *args: Any, **kwargs: Any) -> None:
        super()._preprocessing(*args, **kwargs)
        # simple-parsing lets a flag whose field is optional ("int | None") go without a
        # value, which then stands for "not given": "--prompt $EMPTY" read standard input,
        # "--dtype" alone ran in the default one. Such a flag takes a value; a yes/no one
        # given alone means yes, as the boolean flags do.
        for action in self._actions:
            if type(action) is argparse._StoreAction and action.nargs == "?":
                if action.const is not None:  # a bare flag's meaning given on purpose
                    continue
                if action.type is simple_parsing.utils.str2bool:
                    action.const = True
                else:
                    action.nargs = None

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        # simple-parsing refuses "--nobf16 True" with exit(message=...): status 0, the run
        # not started, and a script's caller told it succeeded. --help exits without one.
        if status == 0 and message:
            self.error(message.strip())
        super().exit(status, message)

    def parse_known_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        try:
            return super().parse_known_args(args, *rest, **kwargs)
        except ConfigError:
            # The dataclasses are built (and validated) before argparse reports what it did
            # not recognise; a misspelt flag, whose field kept its default, is the likelier
            # cause of a rejected value ("--max_token 5": "give a budget"), so name it first.
            unknown = [
                argument
                for argument in (sys.argv[1:] if args is None else args)
                if argument.startswith("-")
                and not _NUMBER.match(argument)
                and argument.split("=", 1)[0] not in self._option_string_actions
            ]
            if unknown:
                self.error(f"unrecognized arguments: {' '.join(unknown)}")
            raise

    def add_argument_group(self, *args: Any, **kwargs: Any) -> argparse._ArgumentGroup:
        if isinstance(kwargs.get("title"), str):
            kwargs["title"] = group_title(kwargs["title"])
        elif args and isinstance(args[0], str):
            args = (group_title(args[0]), *args[1:])
        return super().add_argument_group(*args, **kwargs)
