"""Generation settings, with the original LayerSkip tools' field names and defaults."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field

from self_speculation.errors import (
    ArgumentTypeError,
    ConfigError,
    require_bool,
    require_int,
    require_list_of,
    require_number,
    require_utf8,
)
from self_speculation.trees import (
    MAX_DEFAULT_TREE_DEPTH,
    MAX_TREE_NODES,
    check_branching,
    default_branching,
    tree_refusal,
)

UNSET = -1  # exit_layer / num_speculations not given: use the model's recommendation
MAX_TOKEN_ID = 2**62  # token ids above it are no vocabulary's (and overflow int64 tensors)
MIN_TEMPERATURE = 1e-4  # sampling below it is greedy decoding in all but name


class GenerationStrategyName(str, enum.Enum):
    """Decoding strategies, by their command-line names."""

    AUTOREGRESSIVE = "autoregressive"
    SELF_SPECULATIVE = "self_speculative"
    TREE = "tree"  # self-speculative with token trees drafted from the early exit
    ADAPTIVE = "adaptive"  # self-speculative chains whose length follows the acceptance

    @property
    def speculative(self) -> bool:
        """Drafts with layers [0, E) and verifies with the rest."""
        return self is not GenerationStrategyName.AUTOREGRESSIVE


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate (REFERENCE: the original tools' generation flags).

    Attributes:
        max_steps: most tokens to generate (never exceeded).
        exit_layer: E, 1 <= E <= L; drafts use layers [0, E). For ``autoregressive``,
            E < L means early-exit-only generation; -1 means the full model (or, for
            ``self_speculative``, the model's recommended exit layer).
        num_speculations: draft tokens per self-speculative step; -1: the model's
            recommendation.
        generation_strategy: ``autoregressive``, ``self_speculative`` (chains of k drafts)
            ``tree`` (token trees drafted from the early exit; greedy or sampled,
            without logits processors or the confidence stop) or ``adaptive`` (chains of
            1, 2, 4, ... up to num_speculations drafts, chosen each step from the rows'
            recent acceptance; ``adaptive``).
        adaptive_exit_layers: ``adaptive`` only: more exit layers it may draft from, each
            step choosing the exit too (each exit x length is one compiled shape).
        sample: sample instead of greedy argmax.
        temperature, top_k, top_p: sampling warpers (top_k 0 and top_p 1 disable them).
        no_repeat_ngram_size: forbid repeating n-grams of this size; 0: off, the
            checkpoint's own setting too (as ``generate(no_repeat_ngram_size=0)``); None:
            the checkpoint's setting (off when it has none).
        stop_words: stop once the generated text contains one of these; a special
            token's text ("<|im_end|>") stops at that token; one with other text around it
            ("<|im_end|>\\n") is searched in the text with special tokens written out.
        stop_token_ids: extra end-of-sequence token ids (the tokenizer's EOS always stops).
        draft_confidence_threshold: stop drafting early in a step once the early exit's
            top probability for a draft falls below this (0: always draft
            num_speculations tokens, as the original). Exactness is unaffected: any
            number of drafts is verified the same way.
        token_healing: back each prompt up over a last whitespace token (a trailing
            newline or indentation) when longer tokens start with its text, and let the
            first generated token be only one of those, so that the model chooses the token
            boundary itself (Guidance's "token healing"). The result's text is what follows
            the original prompt; its token ids start with the healed token.
        tree_branching: the ``tree`` strategy's shape: children per node at each depth
            (``[2, 2, 1]``: the 2 most likely tokens after the pending one, 2 after each of
            those, then the greedy continuation; the depth is its length and stands for
            num_speculations). None: 2, 2, then 1s to depth num_speculations.
        compile: run the decoding passes through ``torch.compile`` (the fast path:
            inductor, whole-graph, CUDA graphs on CUDA). The first generation of each
            (batch size, exit layer, k) pays the compilation; greedy tokens are the same
            as eager decoding's in float32 and float64 but at a near tie (compiled kernels
            sum in another order, so two logits within a rounding step of each other can
            flip a greedy pick; bfloat16 and float16 round coarser, and flip more often:
            docs/fast-path.md), and so are sampled ones for a seed (but for a rare draw at
            top-p's boundary, which eager code and a compiled CPU step round apart), also
            for a batch whose rows finish apart (each step draws its random numbers for
            every row the batch started with: ``DecodingState.uniforms``); ``adaptive`` on
            a CPU chooses other chains, its cost model counting the compiled passes' fixed
            cost, so even one row draws other, equally distributed, text for a seed.
    """

    max_steps: int = 512
    exit_layer: int = UNSET
    num_speculations: int = UNSET
    generation_strategy: GenerationStrategyName = GenerationStrategyName.AUTOREGRESSIVE
    sample: bool = True
    temperature: float = 0.6
    top_k: int = 0
    top_p: float = 0.9
    no_repeat_ngram_size: int | None = None
    stop_words: list[str] | None = field(default=None)
    stop_token_ids: list[int] | None = field(default=None)
    draft_confidence_threshold: float = 0.0
    token_healing: bool = False
    tree_branching: list[int] | None = field(default=None)
    adaptive_exit_layers: list[int] | None = field(default=None)
    compile: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        try:
            strategy = GenerationStrategyName(self.generation_strategy)
        except ValueError:
            names = ", ".join(s.value for s in GenerationStrategyName)
            raise ConfigError(
                f"unknown generation_strategy '{self.generation_strategy}' (choose from {names})"
            ) from None
        object.__setattr__(self, "generation_strategy", strategy)
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.exit_layer != UNSET and self.exit_layer < 1:
            raise ConfigError(
                f"exit_layer must be >= 1 (or -1 for the default), got {self.exit_layer}"
            )
        if self.num_speculations != UNSET and self.num_speculations < 1:
            raise ConfigError(
                f"num_speculations must be >= 1 (or -1 for the default), got {self.num_speculations}"
            )
        for name in ("temperature", "top_p", "draft_confidence_threshold"):
            if not math.isfinite(getattr(self, name)):  # nan/inf: never a setting
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.sample:
            # Below the floor, logits / temperature overflows float32 into inf - inf = nan.
            if not self.temperature >= MIN_TEMPERATURE:
                raise ConfigError(
                    f"temperature must be >= {MIN_TEMPERATURE} when sampling (--sample False "
                    f"for greedy decoding), got {self.temperature}"
                )
            if not 0 < self.top_p <= 1:
                raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.no_repeat_ngram_size is not None and self.no_repeat_ngram_size < 0:
            raise ConfigError(
                f"no_repeat_ngram_size must be >= 1 (0: off), got {self.no_repeat_ngram_size}"
            )
        if not 0 <= self.draft_confidence_threshold < 1:
            raise ConfigError(
                "draft_confidence_threshold must be in [0, 1), got "
                f"{self.draft_confidence_threshold}"
            )
        if self.stop_token_ids is not None and any(
            not 0 <= token < MAX_TOKEN_ID for token in self.stop_token_ids
        ):
            raise ConfigError(
                f"stop_token_ids must be token ids (0 <= id < 2**62), got {self.stop_token_ids}"
            )
        if self.stop_words is not None and any(not word for word in self.stop_words):
            raise ConfigError("stop_words must not contain an empty string")
        for index, word in enumerate(self.stop_words or []):
            require_utf8(word, f"stop_words[{index}]")
        if strategy is GenerationStrategyName.TREE:
            reason = tree_refusal(bool(self.no_repeat_ngram_size), self.draft_confidence_threshold)
            if reason:
                raise ConfigError(f"generation_strategy 'tree': {reason}")
        if self.adaptive_exit_layers is not None:
            if strategy is not GenerationStrategyName.ADAPTIVE:
                raise ConfigError(
                    "adaptive_exit_layers is for generation_strategy 'adaptive', got "
                    f"'{strategy.value}'"
                )
            if any(layer < 1 for layer in self.adaptive_exit_layers):
                raise ConfigError(
                    f"adaptive_exit_layers entries must be >= 1, got {self.adaptive_exit_layers}"
                )
        if self.tree_branching is not None:
            if strategy is not GenerationStrategyName.TREE:
                raise ConfigError(
                    f"tree_branching is for generation_strategy 'tree', got '{strategy.value}'"
                )
            check_branching(self.tree_branching)
            depth = len(self.tree_branching)
            if self.num_speculations not in (UNSET, depth):
                raise ConfigError(
                    f"tree_branching {self.tree_branching} is {depth} deep, but "
                    f"num_speculations is {self.num_speculations} (give one of them)"
                )

    def _check_types(self) -> None:
        """Python callers get a TypeError naming the field, not a failure deep in decoding
        (``max_steps=2.5``) or a str split into characters (``stop_words="name"``).

        Raises:
            ArgumentTypeError: naming the field and the value's type.
        """
        for name in ("max_steps", "exit_layer", "num_speculations", "top_k"):
            require_int(getattr(self, name), name)
            object.__setattr__(self, name, int(getattr(self, name)))  # numpy.int64 -> int
        require_int(self.no_repeat_ngram_size, "no_repeat_ngram_size", allow_none=True)
        if self.no_repeat_ngram_size is not None:
            object.__setattr__(self, "no_repeat_ngram_size", int(self.no_repeat_ngram_size))
        for name in ("temperature", "top_p", "draft_confidence_threshold"):
            require_number(getattr(self, name), name)
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("sample", "token_healing", "compile"):
            require_bool(getattr(self, name), name)
        if not isinstance(self.generation_strategy, str):  # the enum is a str too
            names = " or ".join(f"'{name.value}'" for name in GenerationStrategyName)
            raise ArgumentTypeError(
                f"generation_strategy must be {names}, got "
                f"{type(self.generation_strategy).__name__}"
            )
        if self.adaptive_exit_layers is not None:
            require_list_of(self.adaptive_exit_layers, int, "adaptive_exit_layers")
            object.__setattr__(
                self, "adaptive_exit_layers", [int(n) for n in self.adaptive_exit_layers]
            )
        if self.tree_branching is not None:
            require_list_of(self.tree_branching, int, "tree_branching")
            object.__setattr__(self, "tree_branching", [int(n) for n in self.tree_branching])
        if self.stop_words is not None:
            require_list_of(self.stop_words, str, "stop_words")
            object.__setattr__(self, "stop_words", list(self.stop_words))
        if self.stop_token_ids is not None:
            require_list_of(self.stop_token_ids, int, "stop_token_ids")
            object.__setattr__(
                self, "stop_token_ids", [int(token) for token in self.stop_token_ids]
            )

    def resolved(
        self,
        num_layers: int,
        recommended_exit_layer: int | None = None,
        recommended_num_speculations: int | None = None,
    ) -> GenerationConfig:
        """A copy with exit_layer / num_speculations filled in and checked against the model.

        Raises:
            ConfigError: exit_layer outside [1, L], or a self-speculative setting missing
                with no recommendation from the model.
        """
        exit_layer, num_speculations = self.exit_layer, self.num_speculations
        speculative = self.generation_strategy.speculative
        if exit_layer == UNSET:
            if speculative and recommended_exit_layer is None:
                raise ConfigError(
                    f"{self.generation_strategy.value} needs --exit_layer (the model recommends none)"
                )
            exit_layer = recommended_exit_layer if speculative else num_layers
            if not 1 <= exit_layer <= num_layers:
                # Not the user's value: say where it came from and how to override it.
                raise ConfigError(
                    f"the model recommends exit_layer {exit_layer} (its generation config), "
                    f"outside its [1, {num_layers}] layers; pass --exit_layer"
                )
        if not 1 <= exit_layer <= num_layers:
            raise ConfigError(
                f"exit_layer must be in [1, {num_layers}] for this model, got {exit_layer}"
            )
        beyond = [layer for layer in self.adaptive_exit_layers or [] if layer > num_layers]
        if beyond:
            raise ConfigError(
                f"adaptive_exit_layers must be in [1, {num_layers}] for this model, got {beyond}"
            )
        if self.tree_branching is not None:
            num_speculations = len(self.tree_branching)
        if speculative and num_speculations == UNSET:
            if recommended_num_speculations is None:
                raise ConfigError(
                    f"{self.generation_strategy.value} needs --num_speculations (the model "
                    "recommends none)"
                )
            num_speculations = recommended_num_speculations
        branching = self.tree_branching
        if self.generation_strategy is GenerationStrategyName.TREE and branching is None:
            branching = list(default_branching(num_speculations))  # recorded as it ran
            if num_speculations > MAX_DEFAULT_TREE_DEPTH:
                raise ConfigError(
                    f"tree: the default tree of depth num_speculations={num_speculations} "
                    f"makes more than {MAX_TREE_NODES} nodes; give num_speculations <= "
                    f"{MAX_DEFAULT_TREE_DEPTH} or a smaller tree_branching"
                )
        return dataclasses.replace(
            self,
            exit_layer=exit_layer,
            num_speculations=num_speculations,
            tree_branching=branching,
        )
