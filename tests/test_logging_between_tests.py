"""The root logger after a script ran in-process: no handler left on the test's closed
stderr (the conftest fixture ``_root_logging_after_each_test``). The two tests run in this
order in one worker (``--dist loadfile``)."""

from __future__ import annotations

import logging


def test_a_script_points_logging_at_the_captured_stderr(capsys) -> None:
    from self_speculation.cli import log_to_stderr

    log_to_stderr(logging.INFO)
    logging.getLogger("generate").info("a line")
    assert "a line" in capsys.readouterr().err


def test_the_next_test_logs_to_no_closed_stream() -> None:
    streams = [getattr(handler, "stream", None) for handler in logging.getLogger().handlers]
    assert not [stream for stream in streams if getattr(stream, "closed", False)]
