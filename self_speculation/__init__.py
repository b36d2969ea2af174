"""LayerSkip: early-exit inference and self-speculative decoding on transformers models.

Terms used throughout (Elhoushi et al., "LayerSkip", ACL 2024):

* L: number of decoder layers. Layers are counted from 0 when indexed (``layers[0]``).
* exit layer E (1 <= E <= L): run layers 0..E-1, then the model's own final norm and LM
  head. E == L is the full model. Every exit shares that one head.
* pending token: the newest token of the sequence, not yet in any KV cache.
* draft tokens: tokens proposed autoregressively by the early exit (layers [0, E)).
* verification: one pass of layers [E, L) over the pending token and the drafts, starting
  from their exit-layer hidden states (the exit query cache) and the shared KV cache.
* accepted count: how many drafts verification kept (the longest agreeing prefix when
  greedy; speculative sampling when sampling).
* correction / bonus token: the full model's token after the accepted drafts: a
  correction at the first rejection, a bonus token when every draft was accepted.
* acceptance rate: accepted / drafted over a run.
"""

from self_speculation.config import UNSET, GenerationConfig, GenerationStrategyName
from self_speculation.errors import (
    ConfigError,
    LayerSkipError,
    ModelLoadError,
    UnsupportedModelError,
)
from self_speculation.generator import (
    GenerationResult,
    Generator,
    HuggingfaceLlamaGenerator,
    StopChecker,
    recommended_settings,
)
from self_speculation.loading import (
    DEFAULT_MODEL,
    DTYPES,
    load_model_and_tokenizer,
    smollm2_gguf_path,
)
from self_speculation.model_surgery import LayerwiseModel, truncate_cache
from self_speculation.strategies import (
    STRATEGIES,
    AutoRegressiveGenerationStrategy,
    DecodingState,
    GenerationStrategy,
    SelfSpeculativeGenerationStrategy,
    StepResult,
    build_strategy,
)
from self_speculation.streaming import (
    SpeculativeStreamer,
    Streamer,
    StreamerName,
    TextStreamer,
    build_streamer,
)

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "STRATEGIES",
    "UNSET",
    "AutoRegressiveGenerationStrategy",
    "ConfigError",
    "DecodingState",
    "GenerationConfig",
    "GenerationResult",
    "GenerationStrategy",
    "GenerationStrategyName",
    "Generator",
    "HuggingfaceLlamaGenerator",
    "LayerSkipError",
    "LayerwiseModel",
    "ModelLoadError",
    "SelfSpeculativeGenerationStrategy",
    "SpeculativeStreamer",
    "StepResult",
    "StopChecker",
    "Streamer",
    "StreamerName",
    "TextStreamer",
    "UnsupportedModelError",
    "build_strategy",
    "build_streamer",
    "load_model_and_tokenizer",
    "recommended_settings",
    "smollm2_gguf_path",
    "truncate_cache",
]
