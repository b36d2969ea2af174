"""lm-evaluation-harness model backed by a LayerSkip generator.

``generate_until`` runs the chosen strategy (autoregressive, early exit or
self-speculative), honouring the task's ``until`` strings and its generation kwargs
(``max_gen_toks``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``).
``loglikelihood`` / ``loglikelihood_rolling`` score with the full model or, when given an
exit layer, with layers [0, E) + the shared head (the original ignored the exit layer for
these tasks, so accuracy never changed with it: REFERENCE §4).

Tokenisation of a (context, continuation) pair: the continuation's tokens are those of
``context + continuation`` past the context's own tokens, with whitespace at the end of the
context moved to the start of the continuation, as lm-eval's own models do.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import pickle
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM, CacheHook, hash_args
from sqlitedict import SqliteDict
from tqdm import tqdm

from self_speculation.config import MIN_TEMPERATURE, GenerationConfig
from self_speculation.errors import ConfigError, check_interrupted
from self_speculation.generator import Generator
from self_speculation.model_surgery import eval_mode, reading_settings

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # for models whose config states no context length
# lm-eval's names for the most tokens to generate, in its order of priority.
MAX_TOKENS_GEN_KWARGS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
# Generation kwargs (a task's generation_kwargs, --gen_kwargs) that generate_until applies;
# any other (repetition_penalty, num_beams, min_new_tokens...) is refused, never dropped.
APPLIED_GEN_KWARGS = frozenset(
    {"until", "do_sample", "temperature", "top_p", "top_k", "no_repeat_ngram_size"}
    | set(MAX_TOKENS_GEN_KWARGS)
)


def refuse_unapplied_gen_kwargs(keys: Iterable[str], source: str) -> None:
    """ConfigError naming the generation kwargs among ``keys`` that generate_until does not
    apply (``source``: where they came from), rather than dropping them."""
    unknown = sorted(set(keys) - APPLIED_GEN_KWARGS)
    if unknown:
        raise ConfigError(
            f"{source} {', '.join(unknown)} are not supported (this engine applies "
            f"{', '.join(sorted(APPLIED_GEN_KWARGS))})"
        )


def _number(gen_kwargs: dict[str, Any], key: str, kind: type) -> Any:
    """A task's (or --gen_kwargs') numeric generation setting, or a one-line error."""
    value = gen_kwargs[key]
    try:
        if isinstance(value, bool) or (
            kind is int and isinstance(value, float) and not value.is_integer()
        ):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"generation kwarg {key}={value!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None


def _flag(gen_kwargs: dict[str, Any], key: str) -> bool:
    """A task's (or --gen_kwargs') true/false generation setting, or a one-line error: a
    quoted "false" is not taken as true."""
    value = gen_kwargs[key]
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"generation kwarg {key}={value!r} is not true or false")


class LayerSkipLM(LM):
    """An lm-eval ``LM`` over a :class:`Generator` (batch size 1, one process).

    Args:
        generator: the loaded model's generator.
        config: resolved generation settings for ``generate_until``; a task's generation
            kwargs override its sampling fields and ``max_steps``.
        loglikelihood_exit_layer: score log-likelihoods at this exit (None: full model).
        seed: base seed of the per-request sampling generators.
        progress: show tqdm bars.
        on_generation: called with each generation's row (prediction + speed figures) as
            soon as it is done, e.g. to stream rows to a JSONL file.
    """

    def __init__(
        self,
        generator: Generator,
        config: GenerationConfig,
        loglikelihood_exit_layer: int | None = None,
        seed: int = 42,
        progress: bool = True,
        on_generation: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__()
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.config = config
        self.loglikelihood_exit_layer = loglikelihood_exit_layer
        self.seed = seed
        self.progress = progress
        self.on_generation = on_generation
        self.generation_rows: list[dict[str, Any]] = []  # one per generate_until request
        # The settings generate_until ran with (the CLI's, with each task's gen_kwargs over
        # them), each once, in the order first used.
        self.configs_used: list[dict[str, Any]] = []
        # The request-cache keys of sampled generate_until requests: answers it must not
        # keep (set_cache_hook).
        self.sampled_keys: set[str] = set()
        self.max_length = generator.layerwise.context_length or DEFAULT_CONTEXT
        # The end-of-sequence token's text: a stop string of every generate_until request,
        # as lm-eval's HFLM adds it (a model can write that text in ordinary tokens).
        eos = self.tokenizer.eos_token_id
        self.eos_text = (
            self.tokenizer.decode([eos], skip_special_tokens=False) if eos is not None else ""
        )

    # --- tokenisation -----------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS, else EOS."""
        token = self.tokenizer.bos_token_id
        return token if token is not None else self.tokenizer.eos_token_id

    def _empty_context_ids(self) -> list[int]:
        """What an empty context is conditioned on, as ids.

        Raises:
            ConfigError: the tokenizer has neither BOS nor EOS to condition on.
        """
        if self.prefix_token_id is None:
            raise ConfigError(
                "the tokenizer has neither a BOS nor an EOS token to condition an empty "
                "context on (loglikelihood_rolling and empty-context loglikelihood requests)"
            )
        return [self.prefix_token_id]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _context_ids(self, context: str) -> list[int]:
        """Context tokens with the tokenizer's own special tokens (a BOS where the tokenizer
        adds one), as lm-eval's HFLM and generate.py encode a prompt; an empty context is
        conditioned on the prefix token."""
        ids = self._encode_with_specials(context) if context else []
        return ids or self._empty_context_ids()

    def _encode_with_specials(self, text: str) -> list[int]:
        """``text``'s ids with the tokenizer's own special tokens, but no second BOS when the
        text already starts with the BOS token's text (HFLM.tok_encode's has_bos_prefix)."""
        return list(self.generator.encode(text))

    def _pair_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        if not stripped:
            ids, prefix = self._encode(continuation), self._empty_context_ids()
            if ids[:1] == prefix:  # it starts with the prefix token: that is the context
                return ids[:1], ids[1:]  # (as lm-eval's TemplateLM.loglikelihood)
            return prefix, ids
        whole = self._encode_with_specials(stripped + continuation)
        context_ids = self._encode_with_specials(stripped)
        return context_ids, whole[len(context_ids) :]

    # --- scoring ----------------------------------------------------------------------
    @torch.inference_mode()
    def _continuation_logprob(
        self, context_ids: list[int], continuation_ids: list[int]
    ) -> tuple[float, bool]:
        """log p(continuation | context) and whether greedy decoding would produce it.

        A continuation longer than the model's context is scored in windows of it, each
        with as much preceding text as fits (every token predicted once)."""
        sequence = context_ids + continuation_ids
        device = self.generator.layerwise.device
        total, greedy = 0.0, True
        start = len(context_ids)
        while start < len(sequence):
            end = min(start + self.max_length, len(sequence))
            tokens = sequence[max(0, end - self.max_length - 1) : end]
            count = end - start
            inputs = torch.tensor([tokens[:-1]], device=device)  # [1, seq]
            with (  # a model left in training mode: no dropout; no other thread's probe
                eval_mode(self.generator.model),
                reading_settings(self.generator.model),
            ):
                logits = self.generator.layerwise.logits(
                    inputs, exit_layer=self.loglikelihood_exit_layer
                )
            logprobs = F.log_softmax(logits[0, -count:].float(), dim=-1)  # [count, vocab]
            targets = torch.tensor(tokens[-count:], device=device)  # [count]
            total += logprobs.gather(1, targets.unsqueeze(1)).sum().item()
            greedy = greedy and bool((logprobs.argmax(dim=-1) == targets).all())
            start = end
        return total, greedy

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        self.generator.follow_model()  # the model as it is now (a generation would)
        results = []
        for request in tqdm(requests, desc="loglikelihood", disable=not self.progress):
            check_interrupted()
            context, continuation = request.args
            context_ids, continuation_ids = self._pair_ids(context, continuation)
            if not continuation_ids:
                results.append((0.0, True))
            else:
                results.append(self._continuation_logprob(context_ids, continuation_ids))
            self.cache_hook.add_partial("loglikelihood", request.args, results[-1])
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Whole-string log-likelihood, in windows of the model's context; every token is
        predicted once, each window with as much preceding text as fits."""
        self.generator.follow_model()
        results = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=not self.progress):
            check_interrupted()
            (text,) = request.args
            tokens = self._encode(text)
            results.append(self._continuation_logprob(self._empty_context_ids(), tokens)[0])
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, results[-1])
        return results

    # --- generation -------------------------------------------------------------------
    def set_cache_hook(self, cache_hook: CacheHook) -> None:
        """lm-eval's CachingLM stores every answer of a call under its request's text once
        the call returns, sampled ones too: the text a request's repeats share, so a rerun
        that the cache answered (it does unless the task sets do_sample) got one answer for
        repeats drawn apart. Its store here keeps no sampled answer, not even for a moment
        (a run killed before it could take them out again left them to the next run)."""
        super().set_cache_hook(cache_hook)
        if type(cache_hook.dbdict) is SqliteDict:
            cache_hook.dbdict.__class__ = _GreedyAnswers
            cache_hook.dbdict.unkept = self.sampled_keys
            cache_hook.dbdict.decode = _plain_answer  # SqliteDict's own: any pickle

    def check_gen_kwargs(self, gen_kwargs: dict[str, Any]) -> None:
        """ConfigError, as a request would raise it, for ``--gen_kwargs`` values generation
        cannot take (``do_sample=maybe``, ``max_gen_toks=0``, ``top_k=5.5``): before any task
        runs, not once the log-likelihood tasks before it are done."""
        self._request_config(gen_kwargs)

    def _request_config(self, gen_kwargs: dict[str, Any]) -> tuple[GenerationConfig, list[str]]:
        """This request's config and stop strings: the task's kwargs over the CLI's."""
        refuse_unapplied_gen_kwargs(gen_kwargs, "generation kwargs")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        changes: dict[str, Any] = {}
        if "no_repeat_ngram_size" in gen_kwargs:  # 0 (or below): off, the checkpoint's too
            ngram = _number(gen_kwargs, "no_repeat_ngram_size", int)
            changes["no_repeat_ngram_size"] = max(ngram, 0)
        for key in MAX_TOKENS_GEN_KWARGS:  # the first given, as lm-eval takes it
            if gen_kwargs.get(key) is not None:
                changes["max_steps"] = _number(gen_kwargs, key, int)
                if changes["max_steps"] < 1:
                    raise ConfigError(f"generation kwarg {key} must be >= 1, got {gen_kwargs[key]}")
                break
        if gen_kwargs.get("do_sample") is not None:
            changes["sample"] = _flag(gen_kwargs, "do_sample")
        temperature = gen_kwargs.get("temperature")
        if temperature is not None:
            temperature = _number(gen_kwargs, "temperature", float)
            if temperature < 0:
                raise ConfigError(f"gen_kwargs temperature must be >= 0, got {temperature}")
            if temperature < MIN_TEMPERATURE:  # 0 (or next to it) means greedy
                changes["sample"] = False
            else:
                changes["temperature"] = temperature
                if gen_kwargs.get("do_sample") is None:  # lm-eval: a temperature > 0 samples
                    changes["sample"] = True
        for key in ("top_p", "top_k"):
            if gen_kwargs.get(key) is not None:
                changes[key] = _number(gen_kwargs, key, type(getattr(self.config, key)))
        stop_words = [word for word in until if word] + list(self.config.stop_words or [])
        if self.eos_text and self.eos_text not in stop_words:
            stop_words.append(self.eos_text)
        changes["stop_words"] = stop_words or None
        return dataclasses.replace(self.config, **changes), stop_words

    def _request_seed(self, request: Any, number: int, seen: collections.Counter) -> int:
        """The seed of a request's sampling generator: from the request itself (task,
        document, request index and which of its repeats), so that an answer is drawn the
        same whatever else is evaluated with it, on any rank, and in a rerun that the
        request cache answers in part; requests without that identity (not lm-eval's
        Instance) count from ``seed`` in order."""
        identity = tuple(getattr(request, key, None) for key in ("task_name", "doc_id", "idx"))
        if identity[1] is None:
            return self.seed + number
        seen[identity] += 1  # lm-eval passes a request once per repeat
        key = json.dumps([self.seed, *identity, seen[identity]], default=str)
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        outputs = []
        device = self.generator.layerwise.device
        seen: collections.Counter = collections.Counter()
        for number, request in enumerate(
            tqdm(requests, desc="generate_until", disable=not self.progress)
        ):
            context, gen_kwargs = request.args
            config, stop_words = self._request_config(dict(gen_kwargs or {}))
            if vars(config) not in self.configs_used:
                self.configs_used.append(vars(config))
            prompt_ids = self._context_ids(context)
            keep = max(self.max_length - config.max_steps, self.max_length // 2)
            prompt_ids = prompt_ids[-keep:]  # left-truncate a context too long for the model
            seed = self._request_seed(request, number, seen)
            random = torch.Generator(device=device).manual_seed(seed)
            result = self.generator.generate(prompt_ids, config, generator=random)
            text = result.text
            for word in stop_words:  # the text ends before the stop string, as lm-eval expects
                cut = text.find(word)
                if cut >= 0:
                    text = text[:cut]
            outputs.append(text)
            if not config.sample:  # a sampled answer is drawn again on a rerun
                self.cache_hook.add_partial("generate_until", request.args, text)
            else:
                self.sampled_keys.add(hash_args("generate_until", request.args))
            # Which task and document a row answers (lm-eval's Instance; None otherwise).
            row = {
                "request": number,
                "task": getattr(request, "task_name", None),
                "doc_id": getattr(request, "doc_id", None),
                "seed": seed,  # what a sampled answer drew with (its repeat's own)
                "context": context,
                "prediction": text,
                **result.metrics(),
            }
            self.generation_rows.append(row)
            if self.on_generation is not None:
                self.on_generation(row)
        return outputs


class _AnswerUnpickler(pickle.Unpickler):
    """Unpickles the answers this module stores (a text, a float, a (float, bool) pair),
    which name no class: a request cache from elsewhere cannot run code on --use_cache."""

    def find_class(self, module: str, name: str) -> Any:
        # A sqlite3 error: eval.py says in one line that the cache cannot be used.
        raise sqlite3.DatabaseError(f"an entry names {module}.{name}, not an answer")


def _plain_answer(data: bytes) -> Any:
    return _AnswerUnpickler(io.BytesIO(bytes(data))).load()


class _GreedyAnswers(SqliteDict):
    """lm-eval's request cache (a ``SqliteDict``) that stores no answer under the keys in
    ``unkept``: sampled answers, drawn again on a rerun (``LayerSkipLM.set_cache_hook``)."""

    unkept: set[str]

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self.unkept:
            super().__setitem__(key, value)
