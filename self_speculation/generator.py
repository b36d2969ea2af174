"""Prompt in, text and statistics out: the loop around a decoding strategy."""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import GENERATION_CONFIG_NAME

from self_speculation.attention import NAME as FEW_QUERY_ATTENTION
from self_speculation.bookkeeping import LIMIT, NON_FINITE, REASONS, STOP_WORD, RowBooks
from self_speculation.config import MAX_TOKEN_ID, GenerationConfig
from self_speculation.draft import DraftExit, resolve_with_adapter
from self_speculation.errors import (
    ArgumentTypeError,
    ConfigError,
    ModelLoadError,
    UnsupportedModelError,
    check_interrupted,
    is_integer,
    require_bool,
    require_list_of,
    require_utf8,
    whole_number,
)
from self_speculation.loading import read_json
from self_speculation.model_support import (
    UNAPPLIED_SETTING_NAMES,
    unapplied_generation_settings,
)
from self_speculation.model_surgery import (
    LayerwiseModel,
    capture_hooks_suspended,
    eval_mode,
    module_state,
    reading_settings,
)
from self_speculation.passes import ForwardPasses
from self_speculation.sampling import (
    CHECKPOINT_PROCESSOR_SETTINGS,
    TokenSelector,
    check_checkpoint_processors,
)
from self_speculation.strategies import GenerationStrategy, StepResult, build_strategy, settled
from self_speculation.streaming import Streamer, decode_after, special_token_ids

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    """One generation and how it went.

    Attributes:
        text: the decoded generated text (special tokens skipped).
        token_ids: generated token ids, prompt excluded.
        num_prompt_tokens: prompt length in tokens.
        stop_reason: "eos", "stop_word", "max_steps", "context_length" (the model's
            context filled up before max_steps) or "non_finite_logits" (the model's logits
            became NaN or infinite, e.g. float16 overflowing, or when sampling the logits
            processors left no token to draw: every one banned by no_repeat_ngram_size; the
            tokens chosen from them are not kept, and a warning says so).
        total_time: seconds from the prompt's forward to the last token (device-synchronised),
            less any compiling in between (counted in ``Generator.compile_seconds``).
        num_steps: decoding steps after the prompt's forward (one verification each).
        num_drafted, num_accepted: draft tokens proposed / accepted by verification.
        exit_layer, num_speculations: the settings actually used.
    """

    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    stop_reason: str
    total_time: float
    num_steps: int
    num_drafted: int
    num_accepted: int
    exit_layer: int
    num_speculations: int

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def time_per_token(self) -> float:
        return self.total_time / max(len(self.token_ids), 1)

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.total_time if self.total_time > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / drafted (what verification accepted, a measure of the drafts: drafts
        accepted past a stop token, a stop word or the step limit count, though the output
        ends before them; ``tokens_per_step`` counts kept tokens only); None when nothing
        was drafted."""
        return self.num_accepted / self.num_drafted if self.num_drafted else None

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens produced per decoding step (the first token comes from the prompt's pass)."""
        return (len(self.token_ids) - 1) / self.num_steps if self.num_steps else None

    def metrics(self) -> dict[str, float | int | str | None]:
        """The speed and acceptance figures as a flat dict."""
        return {
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generated_tokens": self.num_generated_tokens,
            "stop_reason": self.stop_reason,
            "total_time": self.total_time,
            "time_per_token": self.time_per_token,
            "tokens_per_second": self.tokens_per_second,
            "num_steps": self.num_steps,
            "num_drafted": self.num_drafted,
            "num_accepted": self.num_accepted,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_step": self.tokens_per_step,
            "exit_layer": self.exit_layer,
            "num_speculations": self.num_speculations,
        }


class StopChecker:
    """Decides, token by token, whether generation is over.

    Stop words are searched in the decoded generated text; only a tail long enough to hold
    the longest stop word is decoded each time, since any new occurrence must end there
    (every token that has text has at least one byte of it, so a word of n UTF-8 bytes spans
    at most n of them, plus the ones it starts and ends inside; the tail also takes every
    token without text between them: special tokens, ids past the tokenizer's).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: frozenset[int],
        stop_words: Sequence[str] | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.stop_words = list(stop_words or [])
        longest = max((len(word.encode("utf-8")) for word in self.stop_words), default=0)
        self.tail_tokens = longest + 8
        self._silent = special_token_ids(tokenizer)
        self._text_ids = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        # A stop word that is a special token's text ("<|im_end|>") is matched by the
        # token's id: the token decodes to no text. (Not the end-of-sequence ids: they
        # stop as "eos".)
        names = {}
        if self.stop_words and hasattr(tokenizer, "convert_ids_to_tokens"):
            names = {token: tokenizer.convert_ids_to_tokens(token) for token in self._silent}
        words = [token for token, name in names.items() if name in self.stop_words]
        self.stop_word_ids = frozenset(words) - eos_token_ids
        # A word holding a special token's text and other text ("<|im_end|>\n", lm-eval's
        # "<|start_header_id|>user<|end_header_id|>") is searched in text with the special
        # tokens written out, where lm-eval's HFLM and generate's stop_strings match it.
        self._special_words = [
            word
            for word in self.stop_words
            if any(name and name != word and name in word for name in names.values())
        ]

    def _tail_start(self, generated: list[int]) -> int:
        """Where the tail to decode begins: ``tail_tokens`` tokens with text back."""
        start, counted = len(generated), 0
        floor = max(0, len(generated) - 8 * self.tail_tokens - 256)  # bounds a silent run
        while start > floor and counted < self.tail_tokens:
            start -= 1
            token = generated[start]
            if token not in self._silent and (self._text_ids is None or token < self._text_ids):
                counted += 1
        return start

    def reason(
        self, generated: list[int], prompt_text: str = "", context: Sequence[int] = ()
    ) -> str | None:
        """Why generation stops after ``generated``, or None.

        Args:
            prompt_text: text that ``generated`` begins with but that is the prompt's (token
                healing backs a prompt up over its last whitespace token and lets the first
                generated token repeat it): never searched for stop words.
            context: the prompt's token ids, which the generated text follows
                (``streaming.decode_after``).
        """
        if generated[-1] in self.eos_token_ids:
            return "eos"
        if generated[-1] in self.stop_word_ids:
            return "stop_word"
        if self.stop_words:
            start = self._tail_start(generated)
            # The text as decoded, then with special tokens written out for the words that
            # hold one.
            for words, skip_special in ((self.stop_words, True), (self._special_words, False)):
                if not words:
                    continue
                before = context if start == 0 else ()
                tail = decode_after(self.tokenizer, before, generated[start:], skip_special)
                if start == 0:
                    tail = tail.removeprefix(prompt_text)
                if any(word in tail for word in words):
                    return "stop_word"
        return None


def synchronize(device: torch.device) -> None:
    """Waits for ``device``'s queued work (CPU work is done when its call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator"):  # MPS, XPU (torch >= 2.6)
        torch.accelerator.synchronize(device)


def _random_source(generator: torch.Generator | None, device: torch.device) -> object | None:
    """The random source a sampled step on ``device`` draws from (``generator``, else the
    device's default one), or None where there is none to read (another device type)."""
    if generator is not None:
        return generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator if device.type == "cpu" else None


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside a ``torch.compile`` wrapper or a PEFT model (plain or mixed: its
    LoRA layers in place, merged or not): what the engine decodes layer by layer. A
    wrapper's class hides the model's own (its generation hooks, which the load check
    reads)."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            logger.info("decoding the model inside its torch.compile wrapper")
            model = model._orig_mod
        elif type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
            peft_config = getattr(model, "active_peft_config", None)
            if getattr(peft_config, "is_prompt_learning", False):
                raise UnsupportedModelError(
                    f"{type(model).__name__}: a prompt-learning adapter (prompt, prefix or "
                    "p-tuning) adds virtual tokens that only PEFT's own forward inserts"
                )
            logger.info("decoding the model inside its PEFT wrapper (adapters as they are set)")
            model = model.get_base_model()
        elif type(model).__module__.startswith("peft.") and type(model).__name__ == (
            "PeftMixedModel"  # adapters of several kinds at once; no get_base_model
        ):
            logger.info("decoding the model inside its PEFT wrapper (adapters as they are set)")
            model = model.base_model.model
        else:
            return model


def _config_state(model: torch.nn.Module) -> str:
    """The model's config as a comparable value (``repr``: a NaN equals itself there)."""
    return repr(model.config.to_dict())


def _placement(model: torch.nn.Module) -> tuple:
    """Each parameter's dtype and device, in order: what a generator's passes depend on."""
    return tuple((parameter.dtype, parameter.device) for parameter in model.parameters())


def _attention_implementation(model: torch.nn.Module) -> str | None:
    """The attention implementation the model's text config selects (the compiled passes'
    temporary switch to the few-query attention counts as sdpa)."""
    config = model.config.get_text_config(decoder=True)
    name = getattr(config, "_attn_implementation", None)
    return "sdpa" if name == FEW_QUERY_ATTENTION else name


def recommended_settings(model: PreTrainedModel) -> tuple[int | None, int | None]:
    """(exit_layer, num_speculations) the model's generation config recommends, if any.

    transformers drops unknown keys from a generation config it rebuilt from the model
    config (``_from_model_config``), so a local model's file is read again as a fallback.

    Raises:
        ModelLoadError: that file is not JSON (the loader checks a model folder's first; a
            GGUF file's folder, the model's ``name_or_path``, is not checked).
    """
    sources = [getattr(model, "generation_config", None)]
    path = Path(str(getattr(model, "name_or_path", ""))) / GENERATION_CONFIG_NAME
    if path.is_file():
        sources.append(read_json(path))
    for source in sources:
        get = (
            source.get if isinstance(source, dict) else lambda key, s=source: getattr(s, key, None)
        )
        if get("exit_layer") is not None or get("num_speculations") is not None:
            return get("exit_layer"), get("num_speculations")
    return None, None


class Generator:
    """Generates text from a prompt with any registered strategy.

    Args:
        model: a transformers decoder-only causal LM.
        tokenizer: its tokenizer.
        verify_model: check at construction that the layer-wise view reproduces the
            model's own forward (one short probe forward).
        draft: how drafts leave layer E (``DraftExit``: an exit adapter, a reduced draft
            vocabulary) built on this model; None: the plain exit (see ``draft``).

    Raises:
        ModelLoadError: the model's generation config holds an EOS id, exit_layer or
            num_speculations that is not a whole number (>= 1 for the latter two).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        verify_model: bool = True,
        draft: DraftExit | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise ArgumentTypeError(
                f"model must be a transformers causal LM (from load_model_and_tokenizer), "
                f"got {type(model).__name__}"
            )
        if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
            raise ArgumentTypeError(
                f"tokenizer must be the model's tokenizer (callable, with decode), "
                f"got {type(tokenizer).__name__}"
            )
        require_bool(verify_model, "verify_model")
        if draft is not None and not isinstance(draft, DraftExit):
            raise ArgumentTypeError(
                f"draft must be a DraftExit or None, got {type(draft).__name__}"
            )
        model = _unwrapped(model)
        self.model = model
        self.tokenizer = tokenizer
        self.layerwise = LayerwiseModel(model, verify=verify_model)
        if draft is not None and draft.model.model is not model:
            raise ConfigError("this DraftExit was built for another model")
        self._draft = draft
        self._checked_generation_config: tuple | None = None
        self._check_generation_config()
        self._recommended_settings()  # malformed ones fail now, not at the first generation
        _ = self.eos_token_ids  # as malformed ids
        self._verify_model = verify_model
        self._attention = _attention_implementation(model)  # what the probe checked
        self._forward_passes: dict[bool, ForwardPasses] = {}
        self._placement = _placement(model)  # what the passes were built for
        self._config_state = _config_state(model)  # what the view and passes read
        self._module_state: tuple = ()  # the modules as the compiled passes saw them
        self._compiled_lock = threading.Lock()  # one compiled generation at a time
        self._compiled_owner: int | None = None  # the thread running it
        self._retired_compile_seconds = 0.0  # of passes dropped since (compile_seconds)
        self._full_depth_drafts_warned = False
        self._texts: list[str] | None = None
        self._texts_key: tuple | None = None  # what _texts were computed for
        # Finished rows leave a batch (``_rows_to_keep``); False keeps every row to the end
        # (benchmarks compare the two in one run).
        self.shed_finished_rows = True
        # Issue each step before reading the previous step's counts (None: on GPUs, where
        # the device would otherwise wait for the host's bookkeeping every step; on a CPU
        # nothing runs meanwhile, and reading ahead costs one discarded step at the end).
        self.steps_ahead: bool | None = None

    @property
    def num_layers(self) -> int:
        return self.layerwise.num_layers

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokenizer's EOS and the model's generation config's, read at each generation
        (as transformers' ``generate`` reads them): a chat end token set after the Generator
        was made stops it too.

        Raises:
            ModelLoadError: an id that is not a whole number ("1" in generation_config.json)
                or is too large to be a token id.
        """
        tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
        eos = {tokenizer_eos} if tokenizer_eos is not None else set()
        model_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if model_eos is not None:
            eos |= set(model_eos) if isinstance(model_eos, (list, tuple)) else {model_eos}
        # Below MAX_TOKEN_ID: a larger one overflows the stop ids' int64 tensor (a traceback
        # at the first generation); a negative one stops nothing, as in transformers.
        if not all(is_integer(token) and token < MAX_TOKEN_ID for token in eos):
            raise ModelLoadError(
                f"{type(self.model).__name__}'s eos_token_id is {model_eos!r} "
                f"(generation_config.json) and its tokenizer's {tokenizer_eos!r}: "
                "token ids must be whole numbers below 2**62; fix generation_config.json"
            )
        return frozenset(int(token) for token in eos)

    def _recommended_settings(self) -> tuple[int | None, int | None]:
        """(exit_layer, num_speculations) the model's generation config recommends now, read
        at each generation as its EOS ids are: a recommendation set or changed after the
        Generator was made is followed, as a new Generator follows it.

        Raises:
            ModelLoadError: a recommendation that is not a whole number >= 1.
        """
        settings = recommended_settings(self.model)
        for name, value in zip(("exit_layer", "num_speculations"), settings, strict=True):
            if value is not None and not whole_number(value, 1):
                # load_model_and_tokenizer refuses such a generation_config.json; a model
                # made or changed in Python reaches here (-1 would decode with k = -1).
                raise ModelLoadError(
                    f"{type(self.model).__name__}'s generation config recommends {name} "
                    f"{value!r}: it must be a whole number >= 1 (or absent); fix "
                    "generation_config.json or model.generation_config"
                )
        return settings

    @property
    def recommended_exit_layer(self) -> int | None:
        """The exit layer the model's generation config recommends now (None: none)."""
        return self._recommended_settings()[0]

    @property
    def recommended_num_speculations(self) -> int | None:
        """The num_speculations the model's generation config recommends now (None: none)."""
        return self._recommended_settings()[1]

    @property
    def pad_token_id(self) -> int:
        """The id left padding is filled with (masked: any id of the model's vocabulary
        serves). The tokenizer's pad, else the smallest EOS, else 0; one outside the model's
        vocabulary (a pad token added to the tokenizer only) is not used."""
        vocab = self.layerwise.embed_tokens.weight.shape[0]
        candidates = [getattr(self.tokenizer, "pad_token_id", None), *sorted(self.eos_token_ids)]
        return next((t for t in candidates if t is not None and 0 <= t < vocab), 0)

    def _check_generation_config(self) -> None:
        """The model's generation config, at construction and at each generation (it can be
        changed in between): settings that transformers' generate applies and this engine
        does not are named in a warning (once per distinct set), and processors that could
        not run (a repetition penalty of 0, bad words outside the vocabulary) are one
        ModelLoadError."""
        checkpoint = getattr(self.model, "generation_config", None)
        names = [*CHECKPOINT_PROCESSOR_SETTINGS, *UNAPPLIED_SETTING_NAMES]
        # A copy: a list changed in place (bad_words_ids.append) must compare unequal.
        settings = copy.deepcopy(tuple(getattr(checkpoint, name, None) for name in names))
        if settings == self._checked_generation_config:
            return
        try:
            check_checkpoint_processors(checkpoint, self.layerwise.lm_head.weight.shape[0])
        except ValueError as error:
            raise ModelLoadError(
                f"{type(self.model).__name__}'s generation config cannot be applied: {error}"
            ) from None
        unapplied = unapplied_generation_settings(self.model)
        if unapplied:
            logger.warning(
                "%s's generation config sets %s: transformers' generate applies it, this "
                "engine does not (it decodes with its own GenerationConfig)",
                type(self.model).__name__,
                ", ".join(unapplied),
            )
        self._checked_generation_config = settings

    @property
    def draft(self) -> DraftExit | None:
        """How drafts leave layer E (exit adapter, reduced vocabulary); None: the plain exit."""
        return self._draft

    @draft.setter
    def draft(self, draft: DraftExit | None) -> None:
        if draft is not None and not isinstance(draft, DraftExit):
            raise ArgumentTypeError(
                f"draft must be a DraftExit or None, got {type(draft).__name__}"
            )
        if draft is not None and draft.model.model is not self.model:
            raise ConfigError(
                "this DraftExit was built for another model: build it on generator.layerwise"
            )
        with self._holding_compiled_passes("the draft cannot change during a compiled generation"):
            self._draft = draft
            self._drop_passes()  # passes (and compiled code) hold the draft exit

    def _drop_passes(self) -> None:
        """Forget the forward passes (built again when next used); the seconds they spent
        compiling stay in ``compile_seconds``."""
        self._retired_compile_seconds += sum(
            passes.compile_seconds for passes in self._forward_passes.values()
        )
        self._forward_passes.clear()

    def resolve(self, config: GenerationConfig) -> GenerationConfig:
        """``config`` with exit_layer / num_speculations resolved for this model.

        Raises:
            ConfigError: settings outside the model's range, more drafts per step than
                the model's context holds, or a tree node with more children than the
                vocabulary has tokens.
            ModelLoadError: the model's generation config recommends an exit_layer or
                num_speculations that is not a whole number >= 1.
        """
        if not isinstance(config, GenerationConfig):
            raise ArgumentTypeError(
                f"config must be a GenerationConfig, got {type(config).__name__}"
            )
        draft = self._draft
        recommended_exit_layer, recommended_num_speculations = self._recommended_settings()
        resolved = resolve_with_adapter(
            config,
            self.num_layers,
            recommended_exit_layer,
            recommended_num_speculations,
            draft.exit_layer if draft is not None else None,
            draft.num_speculations if draft is not None else None,
        )
        context = self.layerwise.context_length
        if context is not None and resolved.num_speculations >= context:
            if config.tree_branching is not None:  # the depth the user gave
                raise ConfigError(
                    f"tree_branching {config.tree_branching} is {resolved.num_speculations} "
                    f"deep; a tree must be shallower than the model's context ({context} tokens)"
                )
            raise ConfigError(
                f"num_speculations must be below the model's context ({context} tokens), "
                f"got {resolved.num_speculations}"
            )
        widest = max(resolved.tree_branching or [0])
        # out_features: a quantized head's weight may be packed into another shape.
        vocab_size = getattr(self.layerwise.lm_head, "out_features", widest)
        if widest > vocab_size:  # a node's children are distinct tokens
            raise ConfigError(
                f"tree_branching {resolved.tree_branching}: a node has at most {vocab_size} "
                f"children (the model's vocabulary), got {widest}"
            )
        full_depth = resolved.exit_layer == self.num_layers and draft is None
        if resolved.generation_strategy.speculative and full_depth:
            if not self._full_depth_drafts_warned:
                self._full_depth_drafts_warned = True
                logger.warning(
                    "exit_layer %d is the full model: each draft costs a whole forward pass, "
                    "so self-speculation is slower than autoregressive decoding (pick a lower "
                    "--exit_layer)",
                    resolved.exit_layer,
                )
        return resolved

    def encode(self, prompt: str) -> list[int]:
        """Prompt text -> token ids (with the tokenizer's special tokens, e.g. BOS), but no
        second BOS before a text that starts with the BOS token's text (a chat template's
        text, which writes it out), as lm-eval's HFLM encodes (its has_bos_prefix)."""
        if not isinstance(prompt, str):
            raise ArgumentTypeError(f"prompt must be a str, got {type(prompt).__name__}")
        bos = getattr(self.tokenizer, "bos_token", None)
        if isinstance(bos, str) and bos and prompt.startswith(bos):
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    def generate(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig,
        streamer: Streamer | None = None,
        generator: torch.Generator | None = None,
    ) -> GenerationResult:
        """Generate a continuation of ``prompt`` (text or token ids).

        Raises:
            ConfigError: empty prompt, prompt too long for the model, or settings outside
                the model's range.
        """
        self._check_call(config, streamer, generator)
        self.follow_model()  # the prompt is checked against the context the config states now
        # Checked (and tokenized) once here, so that a message names "prompt", not "prompts[0]".
        prompts = [self._prompt_ids(prompt)]
        return self._generate_followed(prompts, config, streamer, generator)[0]

    @staticmethod
    def _check_call(config: object, streamer: object, generator: object) -> None:
        """The arguments of ``generate`` / ``generate_batch`` besides the prompts.

        Raises:
            ArgumentTypeError: naming the argument of the wrong type.
        """
        if not isinstance(config, GenerationConfig):
            raise ArgumentTypeError(
                f"config must be a GenerationConfig, got {type(config).__name__}"
            )
        if streamer is not None and not isinstance(streamer, Streamer):
            raise ArgumentTypeError(
                f"streamer must be a Streamer (self_speculation.build_streamer) or None, "
                f"got {type(streamer).__name__}"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ArgumentTypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )

    def _prompt_ids(self, prompt: str | Sequence[int], name: str = "prompt") -> list[int]:
        """``prompt`` (text, or a list / 1-D tensor of token ids) as checked token ids.

        Raises:
            ArgumentTypeError: neither text nor token ids (bytes, None, a nested list).
            ConfigError: empty (or whitespace only), token ids outside the vocabulary, or
                too long for the model.
        """
        if isinstance(prompt, str):
            if not prompt.strip():  # as the scripts: a generation from BOS alone
                raise ConfigError(f"{name} is empty")
            require_utf8(prompt, name)
            prompt_ids = self.encode(prompt)
        elif isinstance(prompt, torch.Tensor):
            integer = not (prompt.dtype.is_floating_point or prompt.is_complex())
            if prompt.dim() != 1 or not integer or prompt.dtype == torch.bool:
                raise ArgumentTypeError(
                    f"{name}: a tensor of token ids must be 1-D and integer, got shape "
                    f"{list(prompt.shape)} and {prompt.dtype}"
                )
            prompt_ids = prompt.tolist()
        elif isinstance(prompt, list | tuple):
            require_list_of(prompt, int, name)
            prompt_ids = [int(token) for token in prompt]  # numpy.int64 -> int
        else:  # bytes are a sequence of ints too, but never token ids
            raise ArgumentTypeError(
                f"{name} must be a str or a list of token ids, got {type(prompt).__name__}"
                + (" (decode bytes to str first)" if isinstance(prompt, bytes | bytearray) else "")
            )
        if not prompt_ids:
            raise ConfigError(f"{name} is empty")
        vocab = self.layerwise.embed_tokens.weight.shape[0]
        outside = [token for token in prompt_ids if not 0 <= token < vocab]
        if outside:
            raise ConfigError(
                f"{name}: {outside[0]} is not a token id of this model (ids 0..{vocab - 1})"
            )
        context_limit = self.layerwise.context_length
        if context_limit is not None and len(prompt_ids) >= context_limit:
            raise ConfigError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                f"{context_limit} tokens ({self.layerwise.context_source})"
            )
        return prompt_ids

    def _warn_of_padding(
        self, prompts: Sequence[str | Sequence[int]], prompt_ids: list[list[int]]
    ) -> None:
        """A warning when prompts given as ids begin or end with the tokenizer's pad token (a
        batch padded by the tokenizer, handed over as ids): every id given is prompt text to
        the engine, which pads batches itself, so the model would read the padding. (Not
        where the pad token is also the end-of-sequence or beginning-of-sequence token, nor
        for a text, whose pad token, Qwen's <|endoftext|> say, the writer put there.)"""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None or pad in self.eos_token_ids:
            return
        if pad == getattr(self.tokenizer, "bos_token_id", None):
            return
        padded = [
            index
            for index, (prompt, ids) in enumerate(zip(prompts, prompt_ids, strict=True))
            if not isinstance(prompt, str) and pad in (ids[0], ids[-1])
        ]
        if padded:
            logger.warning(
                "%s of %d prompts (%s) begin or end with the pad token (id %d): the model "
                "reads every id of a prompt, padding too; pass each prompt unpadded (the "
                "engine pads batches itself)",
                len(padded),
                len(prompt_ids),
                ", ".join(f"prompts[{index}]" for index in padded[:4])
                + (", ..." if len(padded) > 4 else ""),
                pad,
            )

    def _token_texts(self) -> list[str]:
        """Each vocabulary entry's text as it reads inside a text (after a token that is a
        word: a SentencePiece Llama tokenizer drops a text's leading space, so that "▁"
        alone is ""), computed once per tokenizer and size: tokens added to the tokenizer
        afterwards (into spare rows of the model's vocabulary) are read too."""
        vocab = self.layerwise.embed_tokens.weight.shape[0]
        tokenizer = self.tokenizer
        key = (id(tokenizer), len(tokenizer) if hasattr(tokenizer, "__len__") else None, vocab)
        if self._texts is None or key != self._texts_key:
            decode = tokenizer.decode
            texts = [decode([token]) for token in range(vocab)]
            letter = next(([token] for token, text in enumerate(texts) if text.isalpha()), [])
            if letter:
                head = decode(letter)
                after = [decode([*letter, token]) for token in range(vocab)]
                texts = [
                    whole[len(head) :] if whole.startswith(head) else alone
                    for whole, alone in zip(after, texts, strict=True)
                ]
            self._texts, self._texts_key = texts, key
        return self._texts

    def _heal(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[str], torch.Tensor]:
        """Token healing: (prompts backed up over a last whitespace token (a newline,
        indentation) whose text begins longer tokens, the removed texts, allowed first
        tokens [batch, vocab]). A prompt ending in a word or punctuation is left alone:
        there the tokenizer's own boundary is the one the model was trained on."""
        texts = self._token_texts()
        device = self.layerwise.device
        allowed = torch.ones(len(prompt_ids), len(texts), dtype=torch.bool, device=device)
        healed_prompts, removed = [], []
        special = special_token_ids(self.tokenizer)
        for row, ids in enumerate(prompt_ids):
            tail = texts[ids[-1]] if len(ids) > 1 and ids[-1] < len(texts) else ""
            if tail.strip():
                tail = ""  # only a trailing whitespace token is a boundary worth healing
            extending = [t for t, text in enumerate(texts) if tail and text.startswith(tail)]
            if len(extending) < 2 or ids[-1] in special:
                healed_prompts.append(ids)  # nothing to heal: the token is all there is
                removed.append("")
                continue
            allowed[row] = False
            allowed[row, extending] = True
            healed_prompts.append(ids[:-1])
            removed.append(tail)
        return healed_prompts, removed, allowed

    def _token_limit(self, prompt_length: int, config: GenerationConfig) -> tuple[int, str]:
        """(most new tokens, the stop reason when reached) for one prompt."""
        context_limit = self.layerwise.context_length
        if context_limit is not None and prompt_length + config.max_steps > context_limit:
            return context_limit - prompt_length, "context_length"
        return config.max_steps, "max_steps"

    def _strategy(
        self, config: GenerationConfig, generator: torch.Generator | None
    ) -> GenerationStrategy:
        selector = TokenSelector(config, generator, getattr(self.model, "generation_config", None))
        return build_strategy(self._passes(config), config, selector)

    def _passes(self, config: GenerationConfig) -> ForwardPasses:
        """The eager or compiled forward passes (built once each, then reused; built again
        after the model's parameters moved to another dtype or device: compiled passes and
        kept buffers are made for one)."""
        self.follow_model()
        passes = self._forward_passes.get(config.compile)
        if passes is None:
            passes = ForwardPasses(self.layerwise, config.compile, self._draft)
            self._forward_passes[config.compile] = passes
            if config.compile:  # what they will compile (also when made outside a generation)
                self._module_state = self._modules_state()
        return passes

    def follow_model(self) -> None:
        """Take in what changed in the model since the last generation (its config, dtype,
        device or attention implementation: read and probed again, passes rebuilt), or
        refuse what the engine cannot follow in one line. Every generation does this first;
        code that computes logits through ``layerwise`` directly (the lm-eval adapter's
        log-likelihoods) calls it before.

        Raises:
            ConfigError: a head, embedding or layer replaced since the Generator was made, a
                hook or an activated LoRA the engine would skip, or a change refused by the
                probe.
        """
        replaced = self.layerwise.replaced_module()
        if replaced is not None:
            raise ConfigError(
                f"the model's {replaced} was replaced since this Generator was made "
                "(resize_token_embeddings, say): make a new Generator for the model as it is"
            )
        bypassed = self.layerwise.bypassed()
        if bypassed is not None:  # a hook or an adapter added since the Generator was made
            raise ConfigError(bypassed)
        config_state = _config_state(self.model)
        if config_state != self._config_state:
            # Read at each call by eager code (a sliding window's mask), but baked into
            # compiled passes (one kept on disk runs without guard checks) and into the
            # layer-wise view's scalars (soft-capping): read again, probed again.
            if self._forward_passes:
                logger.info("the model's config changed: new forward passes")
            # Until this succeeds, no config is the one read: a change refused here (and
            # undone) is read again, never kept half-read in the view.
            self._config_state = None
            self._drop_passes()
            self.layerwise.follow_config()
            self.layerwise.follow_attention_implementation(self._verify_model)
            self._config_state = config_state
        placement = _placement(self.model)
        if placement != self._placement:
            if self._forward_passes:
                logger.info("the model moved to another dtype or device: new forward passes")
            self._placement = None  # as the config's: followed again after a refusal
            self._drop_passes()
            if self._draft is not None:  # its adapter and head rows follow the model
                self._draft.follow_model()
            # What the load probe checked may not hold in the new dtype (a kernel that takes
            # no float64, a float16 head that overflows): probed again, one error if not.
            self.layerwise.follow_attention_implementation(self._verify_model)
            self._placement = placement
        if self._draft is not None:  # its copy of the head's rows, after a weights change
            self._draft.follow_head()
        attention = _attention_implementation(self.model)
        if attention != self._attention:  # model.set_attn_implementation(...) since
            self._drop_passes()
            self.layerwise.follow_attention_implementation(self._verify_model)
            self._attention = attention

    def fast_path_fallback(self, config: GenerationConfig | None = None) -> str | None:
        """Why ``config``'s compiled passes (None: any compiled passes so far) fell back to
        eager decoding (no compiler, a graph break, a failing compile); None when they run
        compiled or ``config`` is eager."""
        if config is None:
            reasons = (passes.fallback_reason for passes in self._forward_passes.values())
            return next((reason for reason in reasons if reason), None)
        if not config.compile or config.compile not in self._forward_passes:
            return None
        return self._forward_passes[config.compile].fallback_reason

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far (first calls of each compiled shape; not the
        few-row kernel's build, once per machine, which the log times)."""
        return self._retired_compile_seconds + sum(
            passes.compile_seconds for passes in self._forward_passes.values()
        )

    def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        config: GenerationConfig,
        streamer: Streamer | None = None,
        generator: torch.Generator | None = None,
    ) -> list[GenerationResult]:
        """Generate continuations of several prompts at once (left-padded batch).

        Rows advance independently (each keeps its own accepted drafts); each row's tokens
        are its own (greedy rows equal their one-by-one output up to floating-point
        differences that padding brings). The times are the batch's.

        Compiled generations (``config.compile``) of one Generator run one at a time: they
        share its key/value buffers. Another thread's waits for the running one; one started
        from inside the running one (its streamer, say) is refused (a streamer that hands it
        to another thread and waits for it would wait forever).

        Raises:
            ConfigError: as ``generate``; also a streamer with more than one prompt, and a
                compiled generation started inside another of this Generator.
        """
        # A change to follow may probe the model with its windows narrowed (it waits for
        # other threads' generations): before this one starts reading the settings.
        self.follow_model()
        return self._generate_followed(prompts, config, streamer, generator)

    def _generate_followed(
        self,
        prompts: Sequence[str | Sequence[int]],
        config: GenerationConfig,
        streamer: Streamer | None,
        generator: torch.Generator | None,
    ) -> list[GenerationResult]:
        """``generate_batch`` once ``follow_model`` has run."""
        adapter = self._draft.adapter if self._draft is not None else None
        with (
            self._compiled_use(config),
            eval_mode(self.model),
            eval_mode(adapter) if adapter is not None else contextlib.nullcontext(),
            reading_settings(self.model),
        ):
            return self._generate_batch(prompts, config, streamer, generator)

    def _modules_state(self) -> tuple:
        """``module_state`` of the model and of the draft adapter, if any."""
        adapter = self._draft.adapter if self._draft is not None else None
        return module_state(self.model) + (module_state(adapter) if adapter is not None else ())

    @contextlib.contextmanager
    def _compiled_use(self, config: object) -> Iterator[None]:
        """Holds this Generator's compiled passes for one generation (see generate_batch)."""
        if not (isinstance(config, GenerationConfig) and config.compile is True):
            yield
            return
        refusal = (
            "a compiled generation cannot start inside another one of the same Generator "
            "(from its streamer, say: they share its key/value buffers); start it after "
            "that one ends, or from another Generator"
        )
        with self._holding_compiled_passes(refusal), capture_hooks_suspended(self.model):
            # What the passes compiled so far saw (a generation changes none of it: tested).
            state = self._modules_state()
            if True in self._forward_passes and state != self._module_state:
                logger.info(
                    "the model's modules changed since its passes were compiled (a hook, or "
                    "a setting such as an adapter merged or switched off): compiling again"
                )
                self._drop_passes()
            self._module_state = state
            yield

    @contextlib.contextmanager
    def _holding_compiled_passes(self, refusal: str) -> Iterator[None]:
        """Waits for another thread's compiled generation and holds the compiled passes;
        inside this thread's own compiled generation, ``ConfigError(refusal)``."""
        if self._compiled_owner == threading.get_ident():
            raise ConfigError(refusal)
        with self._compiled_lock:
            try:
                self._compiled_owner = threading.get_ident()
                yield
            finally:
                self._compiled_owner = None

    @torch.no_grad()
    def _generate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        config: GenerationConfig,
        streamer: Streamer | None,
        generator: torch.Generator | None,
    ) -> list[GenerationResult]:
        self._check_call(config, streamer, generator)
        if generator is not None and generator.device.type != self.layerwise.device.type:
            raise ConfigError(
                f"generator is a {generator.device.type} torch.Generator; the model runs on "
                f"{self.layerwise.device} (make it with torch.Generator(device=...))"
            )
        if isinstance(prompts, str | bytes | bytearray | torch.Tensor) or not isinstance(
            prompts, Sequence
        ):
            raise ArgumentTypeError(
                f"prompts must be a list of prompts, got {type(prompts).__name__}"
                + (
                    " (use generate for one prompt, or write [prompt])"
                    if isinstance(prompts, str)
                    else ""
                )
            )
        if not prompts:
            raise ConfigError("no prompts given")
        check_interrupted()  # a Ctrl-C a finalizer swallowed during the last generation
        prompt_ids = [
            self._prompt_ids(prompt, f"prompts[{index}]") for index, prompt in enumerate(prompts)
        ]
        self._warn_of_padding(prompts, prompt_ids)
        config = self.resolve(config)
        self._check_generation_config()
        vocab_size = self.layerwise.embed_tokens.weight.shape[0]  # as prompts are checked
        beyond = [token for token in config.stop_token_ids or [] if token >= vocab_size]
        if beyond:
            raise ConfigError(
                f"stop_token_ids: {beyond[0]} is not a token id of this model (its vocabulary "
                f"has ids 0..{vocab_size - 1})"
            )
        healed_text, first_token_allowed = [""] * len(prompt_ids), None
        if config.token_healing:
            prompt_ids, healed_text, first_token_allowed = self._heal(prompt_ids)
        if streamer is not None and len(prompt_ids) > 1:
            raise ConfigError("a streamer can follow one prompt only")
        limits = [self._token_limit(len(ids), config) for ids in prompt_ids]
        stop_token_ids = self.eos_token_ids | frozenset(config.stop_token_ids or [])
        stop_words = StopChecker(self.tokenizer, stop_token_ids, config.stop_words)
        strategy = self._strategy(config, generator)
        speculative = config.generation_strategy.speculative
        device = self.layerwise.device
        batch = len(prompt_ids)
        rows = RowBooks.start([most for most, _ in limits], sorted(stop_token_ids), device)
        generated = [0] * batch  # host copy of rows.generated, by prompt
        reasons: list[str | None] = [None] * batch  # by prompt
        # Finished rows leave the batch (``_rows_to_keep``): ``order[i]`` is the prompt whose
        # sequence is in row i of the state now; a row's tokens are read when it leaves.
        order = list(range(batch))
        token_ids: dict[int, list[int]] = {}
        streamer = streamer or Streamer()
        follow_tokens = streamer.wants_tokens or bool(config.stop_words)
        # Where no streamer or stop word needs a step's tokens, the next step is issued
        # before this step's counts are read: a GPU never idles while the host keeps books.
        # (Not for a strategy that reads the device to choose each step anyway.)
        ahead = (
            not follow_tokens
            and not strategy.reads_device_each_step
            and (self.steps_ahead if self.steps_ahead is not None else device.type == "cuda")
        )

        # (A step issued ahead runs before the rows the read just finished can leave; a
        # sampled row draws the same numbers either way: ``DecodingState.uniforms``.)
        # The step issued after the last row finished is discarded: its draws are given
        # back, so that the random source ends where reading step by step leaves it (a
        # generator shared by later calls draws what it would with a streamer), unless
        # something else drew from it since (another thread: its numbers must not repeat).
        random = _random_source(generator, device) if ahead and config.sample else None
        random_state = drawn_state = None

        def issue(remaining: int) -> StepResult:
            """The next step for the rows still running (``remaining``: the most tokens a
            running row may still add, as the host knew before reading the last step)."""
            # Never draft more than could be kept as of the last read (k drafts yield up to
            # k + 1 tokens); the step in flight may have used some of that room, so a last
            # step can draft (and count) tokens past max_steps that are never emitted.
            num_drafts = min(config.num_speculations, remaining - 1) if speculative else 0
            return strategy.counted_step(state, num_drafts, rows)

        streamer.on_prompt(prompt_ids[0])
        streamer.on_start(healed_text[0])
        synchronize(device)
        compiled_before = self.compile_seconds
        started = time.perf_counter()
        state = strategy.prefill(
            prompt_ids, self.pad_token_id, max(most for most, _ in limits), first_token_allowed
        )
        new_tokens = state.tokens[:, state.prompt_width : state.prompt_width + 1]  # [batch, 1]
        first = StepResult(
            new_tokens, torch.ones_like(rows.limit), new_tokens[:, :0], torch.zeros_like(rows.limit)
        )
        step = settled(first, rows, None)  # the first token is not a counted step
        while True:
            # The step's one host synchronisation: how many tokens each row kept, why rows
            # stopped, and the tokens (``bookkeeping.settle``'s summary).
            size = len(order)
            read = _HostRead(step.summary)
            # Counted before this step's read, whether the next step goes ahead of it or
            # not, so that both draft alike (and sampling draws alike).
            remaining = max(limits[i][0] - generated[i] for i in order if reasons[i] is None)
            if random is not None:
                random_state = random.get_state()
            upcoming = issue(remaining) if ahead else None
            if random is not None:
                drawn_state = random.get_state()
            host = read.values()
            ended = time.perf_counter()  # this step is done (a step issued ahead is not timed)
            kept_list, codes = host[:size], host[size : 2 * size]
            width = step.new_tokens.shape[1]
            for index, prompt in enumerate(order):
                if reasons[prompt] is not None or (kept_list[index] == 0 and not codes[index]):
                    continue
                new_row = host[2 * size + index * width :][: kept_list[index]]
                if config.stop_words:
                    cut = _stop_word_cut(
                        stop_words,
                        state,
                        index,
                        generated[prompt],
                        new_row,
                        healed_text[prompt],
                        prompt_ids[prompt],
                    )
                    if cut is not None:
                        kept_list[index], new_row, codes[index] = cut, new_row[:cut], STOP_WORD
                        rows.generated[index] = generated[prompt] + cut
                        rows.reason[index] = STOP_WORD
                generated[prompt] += kept_list[index]
                if codes[index]:
                    reasons[prompt] = (
                        REASONS[codes[index]] if codes[index] != LIMIT else limits[prompt][1]
                    )
                if prompt == 0 and streamer.wants_tokens:
                    drafts = step.draft_tokens[0].tolist()
                    streamer.on_step(new_row, drafts, int(step.accepted_counts[0]))
            if all(reason is not None for reason in reasons):
                break
            keep = None
            if self.shed_finished_rows:
                keep = self._rows_to_keep(strategy, [reasons[i] is None for i in order])
            if keep is not None:
                for index, prompt in enumerate(order):
                    if index not in keep:
                        token_ids[prompt] = state.generated(index, generated[prompt])
                state.select_rows(keep)
                kept_rows = torch.tensor(keep, device=device)
                rows = rows.select(kept_rows)
                if upcoming is not None:
                    upcoming = upcoming.select_rows(kept_rows)
                order = [order[index] for index in keep]
            step = upcoming if upcoming is not None else issue(remaining)
        synchronize(device)  # a step issued ahead of the last read finishes, untimed
        if random_state is not None and torch.equal(random.get_state(), drawn_state):
            random.set_state(random_state)  # that step's draws, given back
        # Passes compiled during the generation (a new prompt width, a longer cache) compiled
        # before the last read: their seconds are in compile_seconds, not in the decoding time.
        total_time = ended - started - (self.compile_seconds - compiled_before)
        streamer.on_end()
        broken = [row for row in range(batch) if reasons[row] == REASONS[NON_FINITE]]
        if broken:
            logger.warning(
                "%d of %d generations stopped early: the model's logits became NaN or "
                "infinite (an overflowing dtype such as float16? try bfloat16 or float32), "
                "or sampling's logits processors left no token to draw (no_repeat_ngram_size "
                "over a used-up vocabulary; a repetition penalty overflowing the logits); "
                "their text ends before the first token chosen from such logits",
                len(broken),
                batch,
            )
        for index, prompt in enumerate(order):
            token_ids[prompt] = state.generated(index, generated[prompt])
        num_steps, drafted, accepted = rows.totals()
        results = []
        for row in range(batch):
            text = decode_after(self.tokenizer, prompt_ids[row], token_ids[row])
            results.append(
                GenerationResult(
                    text=text.removeprefix(healed_text[row]),
                    token_ids=token_ids[row],
                    num_prompt_tokens=len(prompt_ids[row]),
                    stop_reason=reasons[row],
                    total_time=total_time,
                    num_steps=num_steps[row],
                    num_drafted=drafted[row],
                    num_accepted=accepted[row],
                    exit_layer=config.exit_layer,
                    num_speculations=config.num_speculations if speculative else 0,
                )
            )
        return results

    @staticmethod
    def _rows_to_keep(strategy: GenerationStrategy, running: list[bool]) -> list[int] | None:
        """The rows (indices into the current batch) to go on with, or None to keep all.

        Finished rows leave as soon as a smaller batch runs without compiling anything:
        in eager decoding, the running rows alone; in compiled decoding, the smallest
        batch size already compiled that holds them (topped up with finished rows, whose
        steps are ignored). A finished row that stays costs a full row of every pass.
        """
        count, size = sum(running), len(running)
        fits = next((smaller for smaller in range(count, size) if strategy.can_run(smaller)), None)
        if fits is None:
            return None
        finished = [index for index in range(size) if not running[index]]
        fillers = set(finished[: fits - count])
        return [index for index in range(size) if running[index] or index in fillers]


class _HostRead:
    """A device tensor's values for the host, copied without waiting for the device:
    ``values`` waits for the copy alone (on a GPU, steps issued after it keep running)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._done = None
        if tensor.device.type == "cuda":
            # The copy runs on its tensor's device, whichever device is current.
            stream = torch.cuda.current_stream(tensor.device)
            tensor = tensor.to("cpu", non_blocking=True)  # into pinned memory
            self._done = torch.cuda.Event()
            self._done.record(stream)
        self._tensor = tensor

    def values(self) -> list[int]:
        if self._done is not None:
            self._done.synchronize()
        return self._tensor.tolist()


def _stop_word_cut(
    checker: StopChecker,
    state,
    row: int,
    generated: int,
    new_tokens: list[int],
    prompt_text: str,
    prompt: list[int],
) -> int | None:
    """How many of ``new_tokens`` to keep when one completes a stop word, else None
    (``prompt_text``, ``prompt``: see ``StopChecker.reason``)."""
    history = state.generated(row, generated)
    for index, token in enumerate(new_tokens):
        history.append(token)
        if checker.reason(history, prompt_text, prompt) == "stop_word":
            return index + 1
    return None


# The original tools' class name, kept for their users: it was never Llama-specific here.
HuggingfaceLlamaGenerator = Generator
