"""Prompt in, text and statistics out: the loop around a decoding strategy."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import GENERATION_CONFIG_NAME

from self_speculation.config import GenerationConfig
from self_speculation.errors import ConfigError
from self_speculation.model_surgery import LayerwiseModel
from self_speculation.sampling import TokenSelector
from self_speculation.strategies import StepResult, build_strategy
from self_speculation.streaming import Streamer


@dataclass(frozen=True)
class GenerationResult:
    """One generation and how it went.

    Attributes:
        text: the decoded generated text (special tokens skipped).
        token_ids: generated token ids, prompt excluded.
        num_prompt_tokens: prompt length in tokens.
        stop_reason: "eos", "stop_word", "max_steps" or "context_length" (the model's
            context filled up before max_steps).
        total_time: seconds from the prompt's forward to the last token (device-synchronised).
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
        """accepted / drafted; None when nothing was drafted."""
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
    the longest stop word is decoded each time, since any new occurrence must end there.
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
        # Each token decodes to at least one character, bar partial bytes: pad generously.
        self.tail_tokens = max((len(word) for word in self.stop_words), default=0) + 8

    def reason(self, generated: list[int]) -> str | None:
        if generated[-1] in self.eos_token_ids:
            return "eos"
        if self.stop_words:
            tail = self.tokenizer.decode(generated[-self.tail_tokens :], skip_special_tokens=True)
            if any(word in tail for word in self.stop_words):
                return "stop_word"
        return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recommended_settings(model: PreTrainedModel) -> tuple[int | None, int | None]:
    """(exit_layer, num_speculations) the model's generation config recommends, if any.

    transformers drops unknown keys from a generation config it rebuilt from the model
    config (``_from_model_config``), so a local model's file is read again as a fallback.
    """
    sources = [getattr(model, "generation_config", None)]
    directory = Path(str(getattr(model, "name_or_path", "")))
    if (directory / GENERATION_CONFIG_NAME).is_file():
        sources.append(json.loads((directory / GENERATION_CONFIG_NAME).read_text()))
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
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        verify_model: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layerwise = LayerwiseModel(model, verify=verify_model)
        self.recommended_exit_layer, self.recommended_num_speculations = recommended_settings(model)
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        model_eos = getattr(model.generation_config, "eos_token_id", None)
        if model_eos is not None:
            eos |= set(model_eos) if isinstance(model_eos, list) else {model_eos}
        self.eos_token_ids = frozenset(eos)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids, default=0)

    @property
    def num_layers(self) -> int:
        return self.layerwise.num_layers

    def resolve(self, config: GenerationConfig) -> GenerationConfig:
        """``config`` with exit_layer / num_speculations resolved for this model."""
        return config.resolved(
            self.num_layers, self.recommended_exit_layer, self.recommended_num_speculations
        )

    def encode(self, prompt: str) -> list[int]:
        """Prompt text -> token ids (with the tokenizer's special tokens, e.g. BOS)."""
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
        return self.generate_batch([prompt], config, streamer, generator)[0]

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        context_limit = self.layerwise.context_length
        if context_limit is not None and len(prompt_ids) >= context_limit:
            raise ConfigError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                f"{context_limit} tokens"
            )
        return prompt_ids

    def _token_limit(self, prompt_length: int, config: GenerationConfig) -> tuple[int, str]:
        """(most new tokens, the stop reason when reached) for one prompt."""
        context_limit = self.layerwise.context_length
        if context_limit is not None and prompt_length + config.max_steps > context_limit:
            return context_limit - prompt_length, "context_length"
        return config.max_steps, "max_steps"

    @torch.inference_mode()
    def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        config: GenerationConfig,
        streamer: Streamer | None = None,
        generator: torch.Generator | None = None,
    ) -> list[GenerationResult]:
        """Generate continuations of several prompts at once (left-padded batch).

        Each row's tokens are its own (greedy rows equal their one-by-one output up to
        floating-point differences that padding brings). The times are the batch's.

        Raises:
            ConfigError: as ``generate``; also a streamer with more than one prompt.
        """
        config = self.resolve(config)
        prompt_ids = [self._prompt_ids(prompt) for prompt in prompts]
        if not prompt_ids:
            raise ConfigError("no prompts given")
        if streamer is not None and len(prompt_ids) > 1:
            raise ConfigError("a streamer can follow one prompt only")
        limits = [self._token_limit(len(ids), config) for ids in prompt_ids]
        streamer = streamer or Streamer()
        stop_token_ids = self.eos_token_ids | frozenset(config.stop_token_ids or [])
        stopper = StopChecker(self.tokenizer, stop_token_ids, config.stop_words)
        strategy = build_strategy(
            self.layerwise, config, TokenSelector(config, generator), stop_token_ids
        )
        device = self.layerwise.device
        batch = len(prompt_ids)
        generated: list[list[int]] = [[] for _ in range(batch)]
        stop_reasons: list[str | None] = [None] * batch
        num_steps, num_drafted, num_accepted = [0] * batch, [0] * batch, [0] * batch

        _synchronize(device)
        started = time.perf_counter()
        state, first_tokens = strategy.prefill(prompt_ids, self.pad_token_id)
        step = StepResult(first_tokens.unsqueeze(1), first_tokens.unsqueeze(1)[:, :0])
        while True:
            new_tokens = step.new_tokens.tolist()
            for row in range(batch):
                if stop_reasons[row]:
                    continue
                kept = 0
                for token in new_tokens[row]:
                    generated[row].append(token)
                    kept += 1
                    reason = stopper.reason(generated[row])
                    if reason is None and len(generated[row]) >= limits[row][0]:
                        reason = limits[row][1]
                    if reason:
                        stop_reasons[row] = reason
                        break
                if row == 0:
                    streamer.on_step(
                        new_tokens[0][:kept], step.draft_tokens[0].tolist(), step.accepted_count
                    )
            active = [reason is None for reason in stop_reasons]
            if not any(active):
                break
            state.append(step.new_tokens)
            budget = max(
                limits[row][0] - len(generated[row]) for row in range(batch) if active[row]
            )
            step = strategy.step(state, budget, torch.tensor(active, device=device))
            for row in range(batch):
                if active[row]:
                    num_steps[row] += 1
                    num_drafted[row] += step.draft_tokens.shape[1]
                    num_accepted[row] += step.accepted_count
        _synchronize(device)
        total_time = time.perf_counter() - started
        streamer.on_end()
        return [
            GenerationResult(
                text=self.tokenizer.decode(generated[row], skip_special_tokens=True),
                token_ids=generated[row],
                num_prompt_tokens=len(prompt_ids[row]),
                stop_reason=stop_reasons[row],
                total_time=total_time,
                num_steps=num_steps[row],
                num_drafted=num_drafted[row],
                num_accepted=num_accepted[row],
                exit_layer=config.exit_layer,
                num_speculations=max(config.num_speculations, 0),
            )
            for row in range(batch)
        ]


# The original tools' class name, kept for their users: it was never Llama-specific here.
HuggingfaceLlamaGenerator = Generator
