"""Prompts piped from a file saved with a UTF-8 byte order mark (Notepad): the mark opened
the first prompt, so the model read three stray bytes before it and the result document
recorded "\ufeff" in its prompt; data files (utf-8-sig) already dropped it."""

from __future__ import annotations

import io


def test_a_byte_order_mark_opening_the_input_is_no_part_of_the_first_prompt() -> None:
    from generate import read_prompts

    piped = io.TextIOWrapper(io.BytesIO("\ufeffdef add(a, b):\r\nhello\n".encode()), "utf-8")
    assert list(read_prompts(piped)) == ["def add(a, b):", "hello"]


def test_a_byte_order_mark_alone_on_the_first_line_is_no_prompt() -> None:
    from generate import read_prompts

    assert list(read_prompts(io.StringIO("\ufeff\nhello\n"))) == ["hello"]


def test_a_byte_order_mark_read_through_an_ascii_standard_input_is_dropped_too() -> None:
    """PYTHONIOENCODING=ascii: the mark arrives as three escaped bytes, read back as UTF-8."""
    from generate import read_prompts

    piped = io.TextIOWrapper(io.BytesIO("\ufeffcafé\n".encode()), encoding="ascii")
    assert list(read_prompts(piped)) == ["café"]


def test_a_byte_order_mark_later_in_the_input_is_prompt_text() -> None:
    from generate import read_prompts

    assert list(read_prompts(io.StringIO("a\n\ufeffb\n"))) == ["a", "\ufeffb"]
