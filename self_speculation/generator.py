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
from self_speculation.strategies import build_strategy
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

    @torch.inference_mode()
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
        config = self.resolve(config)
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        max_new_tokens, limit_reason = config.max_steps, "max_steps"
        context_limit = getattr(self.layerwise.config, "max_position_embeddings", None)
        if context_limit is not None:
            if len(prompt_ids) >= context_limit:
                raise ConfigError(
                    f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                    f"{context_limit} tokens"
                )
            if len(prompt_ids) + max_new_tokens > context_limit:
                max_new_tokens, limit_reason = context_limit - len(prompt_ids), "context_length"
        streamer = streamer or Streamer()
        stop_token_ids = self.eos_token_ids | frozenset(config.stop_token_ids or [])
        stopper = StopChecker(self.tokenizer, stop_token_ids, config.stop_words)
        strategy = build_strategy(
            self.layerwise, config, TokenSelector(config, generator), stop_token_ids
        )
        device = self.layerwise.device
        prompt_tensor = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # [seq]

        _synchronize(device)
        started = time.perf_counter()
        state, first_token = strategy.prefill(prompt_tensor)
        generated: list[int] = []
        num_steps = num_drafted = num_accepted = 0
        step_tokens, draft_tokens, accepted_count = [first_token], [], 0
        stop_reason = None
        while True:
            kept = []
            for token in step_tokens:
                generated.append(token)
                kept.append(token)
                stop_reason = stopper.reason(generated)
                if stop_reason is None and len(generated) >= max_new_tokens:
                    stop_reason = limit_reason
                if stop_reason:
                    break
            streamer.on_step(kept, draft_tokens, accepted_count)
            if stop_reason:
                break
            state.tokens = torch.cat([state.tokens, state.tokens.new_tensor(kept)])
            step = strategy.step(state, max_new_tokens - len(generated))
            num_steps += 1
            num_drafted += len(step.draft_tokens)
            num_accepted += step.accepted_count
            step_tokens, draft_tokens, accepted_count = (
                step.new_tokens,
                step.draft_tokens,
                step.accepted_count,
            )
        _synchronize(device)
        total_time = time.perf_counter() - started
        streamer.on_end()
        return GenerationResult(
            text=self.tokenizer.decode(generated, skip_special_tokens=True),
            token_ids=generated,
            num_prompt_tokens=len(prompt_ids),
            stop_reason=stop_reason,
            total_time=total_time,
            num_steps=num_steps,
            num_drafted=num_drafted,
            num_accepted=num_accepted,
            exit_layer=config.exit_layer,
            num_speculations=max(config.num_speculations, 0),
        )


# The original tools' class name, kept for their users: it was never Llama-specific here.
HuggingfaceLlamaGenerator = Generator
