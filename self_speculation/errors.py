"""Errors a user can act on. Scripts print them as one line and exit non-zero."""

import json
import numbers
import os
import re
import threading

_interrupted = threading.Event()


def remembered_interrupt(number: int, frame: object) -> None:
    """A SIGINT handler (the scripts' ``run_main`` installs it): KeyboardInterrupt, as
    Python's own, and remembered, because Python swallows one raised while a finalizer runs
    (``Exception ignored in ... __del__``: the run went on to its end and exited 0).
    ``check_interrupted`` raises it again at the next sample or generation."""
    _interrupted.set()
    raise KeyboardInterrupt


def check_interrupted() -> None:
    """KeyboardInterrupt if a SIGINT was received (``remembered_interrupt``) whose exception
    was swallowed; nothing otherwise (and always, where the handler is not installed)."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def json_refusal(error: ValueError | RecursionError) -> str:
    """Why ``json.loads`` refused a text, in a few words: its own message for malformed
    JSON; "nested too deeply" (a RecursionError) and "a huge number" (a ValueError past
    Python's integer digit limit) for the two refusals that carry no JSON message; "not
    UTF-8" for bytes that are not text (``json.loads`` of bytes)."""
    if isinstance(error, json.JSONDecodeError):
        return error.msg
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at {error.start})"
    return "nested too deeply" if isinstance(error, RecursionError) else "a huge number"


class LayerSkipError(Exception):
    """Base class of every error meant for the user, not for a traceback."""


class ConfigError(LayerSkipError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ArgumentsError(ConfigError):
    """A command line that cannot be parsed (unknown flag, bad value, missing flag)."""


class ArgumentTypeError(ConfigError, TypeError):
    """A Python API argument of the wrong type (a str where a list is meant, a float step
    count). A TypeError for Python callers, and a ConfigError that scripts print as one line."""


def _type_name(value: object) -> str:
    text = repr(value)
    shown = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {shown}"


def require_int(value: object, name: str, allow_none: bool = False) -> None:
    """``value`` is an int (not a bool: True would count as 1), or None when allowed.

    Raises:
        ArgumentTypeError: naming ``name`` and what it got.
    """
    if value is None and allow_none:
        return
    if not is_integer(value):
        raise ArgumentTypeError(f"{name} must be an int, got {_type_name(value)}")


def is_integer(value: object) -> bool:
    """An int, or another integral number (numpy.int64), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_number(value: object, name: str) -> None:
    """``value`` is a real number (int or float, not a bool).

    Raises:
        ArgumentTypeError: naming ``name`` and what it got.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a number, got {_type_name(value)}")


def require_bool(value: object, name: str) -> None:
    """``value`` is True or False (a string "False" would be true).

    Raises:
        ArgumentTypeError: naming ``name`` and what it got.
    """
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {_type_name(value)}")


def require_list_of(value: object, kind: type, name: str) -> None:
    """``value`` is a list or tuple of ``kind`` (a str is not a list of its characters).

    Raises:
        ArgumentTypeError: naming ``name``, and the first element of another type.
    """
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        hint = f" (write [{value!r}] for one)" if isinstance(value, str | int) else ""
        raise ArgumentTypeError(
            f"{name} must be a list of {kind.__name__}, got {_type_name(value)}{hint}"
        )
    for item in value:
        if not (is_integer(item) if kind is int else isinstance(item, kind)):
            raise ArgumentTypeError(
                f"{name} must be a list of {kind.__name__}, it holds {_type_name(item)}"
            )


class UnsupportedModelError(LayerSkipError):
    """The model lacks something LayerSkip needs (decoder layers, final norm, LM head...)."""


class ModelLoadError(LayerSkipError):
    """A model or tokenizer could not be loaded (missing path, unreachable hub, bad file)."""


def real_location(path: str) -> str:
    """A local path by its real location ("m", "./m", "m/", a symlink to it and "~/m" are
    one), so that run settings recorded with one spelling match another; anything that is
    not a local path (a hub id) as given."""
    expanded = os.path.expanduser(path)
    return os.path.realpath(expanded) if os.path.exists(expanded) else path


def command_line_text(text: str) -> str:
    """A command-line argument as the UTF-8 text its bytes spell. Python decodes arguments in
    the locale's encoding with ``surrogateescape``: under ``LC_ALL=C PYTHONUTF8=0`` (ASCII)
    "café" arrived as "caf" and two escaped bytes, refused as "byte 0xc3 is not UTF-8".
    Bytes that are not UTF-8 either stay escaped (``require_utf8`` names them)."""
    if not any("\udc80" <= character <= "\udcff" for character in text):
        return text
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeError:
        return text


def require_utf8(text: str, where: str, from_bytes: bool = False) -> None:
    """Refuse text that cannot be encoded as UTF-8: a lone surrogate from a JSON ``\\ud800``
    escape, or a byte that was not UTF-8 (decoded with ``surrogateescape``, as Python does
    for arguments and standard input). Tokenizers fail on such text with a bare TypeError.

    Args:
        text: the text to check.
        where: what it is, for the message ("--prompt", "data.jsonl: row 3").
        from_bytes: ``text`` was decoded from bytes with ``surrogateescape`` (command-line
            arguments, standard input): name the undecodable byte, not a surrogate.

    Raises:
        ConfigError: naming ``where`` and the offending character.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        what = (
            f"byte 0x{code - 0xDC00:02x} is not UTF-8"
            if from_bytes and 0xDC80 <= code <= 0xDCFF
            else f"lone surrogate \\u{code:04x}"
        )
        raise ConfigError(
            f"{where} is not valid UTF-8 text ({what} at character {error.start})"
        ) from None


def whole_number(value: object, least: int = 0) -> bool:
    """Whether ``value`` (read from JSON, a config or the environment) is an int >= ``least``
    (a bool is not: JSON's true would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


MAX_THREADS = 1024  # torch fails to start (or crashes on) tens of thousands of threads


def require_thread_count(value: int, flag: str = "--num_threads") -> None:
    """Refuse a CPU thread count torch cannot use: negative, or so large that starting the
    threads aborts the process (``libgomp: Thread creation failed``) or overflows.

    Raises:
        ConfigError: naming ``flag`` and the allowed range.
    """
    if not 0 <= value <= MAX_THREADS:
        raise ConfigError(f"{flag} must be in [0, {MAX_THREADS}] (0: torch's default), got {value}")


def expand_home(path: str | os.PathLike, flag: str) -> str:
    """``path`` with a leading ``~`` or ``~user`` expanded (as the shell does).

    Raises:
        ConfigError: ``~user`` names no user with a home directory (pathlib raises a
            RuntimeError there, ``os.path`` leaves the ``~`` in place).
    """
    text = os.fspath(path)
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        head = expanded.split("/", 1)[0]
        raise ConfigError(f"{flag} {text!r}: {head!r} names no user with a home directory")
    return expanded


def one_line(error: BaseException, limit: int = 400) -> str:
    """``error``'s message on one line (transformers' messages span several), shortened."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, KeyError):  # its message is the bare key: "'lm_head.weight'"
        text = f"{type(error).__name__} {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_tokenizer(tokenizer: object, directory: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(directory)``, with a failed write (a full disk, a file size
    limit, a folder removed meanwhile) raised as the OSError it is: the Rust ``tokenizers``
    library raises a plain Exception ("File too large (os error 27)"), which scripts would
    print as a traceback."""
    try:
        tokenizer.save_pretrained(directory)  # type: ignore[attr-defined]
    except OSError:
        raise
    except Exception as error:
        match = _RUST_OS_ERROR.search(str(error))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), os.fspath(directory)) from None
