"""What the layer-wise engine can reproduce exactly of a model, decided before it decodes.

``LayerwiseModel`` runs a model's own decoder layers, rotary embedding and masks, one layer
range at a time, with one KV cache that drafting, verification and rollback share. That is
exact only when each call's result depends on nothing the layer-wise view changes. These
checks find what would break it and either adapt (a shorter usable context) or refuse with
``UnsupportedModelError``, one line, instead of decoding wrong tokens:

* attention kinds: each layer's kind as the family's own forward chooses it (the config's
  ``layer_types``; without them, a ``sliding_window`` windows every layer, as Mistral,
  Mixtral, Starcoder2, Phi-3 and Qwen3-MoE do); kinds other than full and sliding
  (chunked, linear, state-space...) are refused.
* rotary tables: transformers' ``longrope`` and ``dynamic`` RoPE pick their frequencies from
  the largest position of each call, so a verification call (positions p .. p + k) or a
  batch (rows at different positions) would rotate a position otherwise than one-token
  decoding does. Where the tables are call-independent only below a switch point, the
  usable context ends there; where they are not even then, the model is refused.
* generation hooks: a family whose ``prepare_inputs_for_generation`` does more than pass
  the cache along decodes otherwise than a plain KV-cache loop (Phi-3 drops its cache and
  re-runs the sequence when it crosses ``original_max_position_embeddings``); one whose
  ``generate`` (or a step of it: its processors, stopping criteria, defaults) is its own
  decodes other tokens than the engine, which never calls them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import GenerationMixin, PretrainedConfig

from self_speculation.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
SUPPORTED_ATTENTION = (FULL_ATTENTION, SLIDING_ATTENTION)
_GENERATION_HOOKS = (
    "prepare_inputs_for_generation",
    "_update_model_kwargs_for_generation",
    # Overridden by remote code to add its own processors, stop words or defaults (Qwen's
    # generate adds stop words): greedy tokens the engine would not give, without a word.
    "generate",
    "_sample",
    "_prefill",
    "_prepare_generation_config",
    "_prepare_special_tokens",
    "_get_logits_processor",
    "_get_stopping_criteria",
)
# Families whose generation hook recomputes the cache once the sequence passes
# config.original_max_position_embeddings (and does nothing else): exact below it.
_CACHE_RESET_AT_ORIGINAL_LENGTH = frozenset(
    {"Phi3ForCausalLM", "PhimoeForCausalLM", "Phi4MultimodalForCausalLM"}
)
# Multimodal families whose generation hook only hands image inputs (token_type_ids) to the
# first call: text-only decoding, all this engine does with them, is a plain KV-cache loop.
_IMAGE_INPUTS_ONLY = frozenset({"Gemma3ForConditionalGeneration"})


# The oldest transformers whose internals the engine calls as it does (mask helpers taking
# ``inputs_embeds`` and ``layer_idx``: 5.0-5.13 fail every model's load-time check);
# pyproject.toml declares the same bound.
MIN_TRANSFORMERS = "5.14"


def check_transformers_version(version: str | None = None) -> None:
    """UnsupportedModelError, naming the installed version, below ``MIN_TRANSFORMERS``."""
    version = transformers.__version__ if version is None else version
    if Version(version) < Version(MIN_TRANSFORMERS):
        raise UnsupportedModelError(
            f"transformers {version} is installed; the layer-wise engine needs transformers "
            f">= {MIN_TRANSFORMERS} (pip install -U 'transformers>={MIN_TRANSFORMERS},<6')"
        )


def _reads_layer_types(config: PretrainedConfig) -> bool:
    """Whether ``config.layer_types`` is a setting of the config's family. A transformers
    config class without that field (Mistral's, Mixtral's, Phi-3's, Starcoder2's,
    Qwen3-MoE's) keeps a config.json's ``layer_types`` as a stray attribute its forward
    never reads (a Mixtral, Phi-3 or Starcoder2 config.json listing them; a Mistral one
    loaded with ``MistralForCausalLM``, which AutoModel would load as Ministral): such a
    family windows every layer. Configs from elsewhere (remote code) are taken at their
    word."""
    cls = type(config)
    if not cls.__module__.startswith("transformers.") or not dataclasses.is_dataclass(cls):
        return True
    return any(field.name == "layer_types" for field in dataclasses.fields(cls))


def attention_layer_types(config: PretrainedConfig, num_layers: int, owner: str) -> list[str]:
    """Each decoder layer's attention kind, as the family's own forward applies it.

    Raises:
        UnsupportedModelError: a kind the engine cannot reproduce, a list of the wrong
            length, or a sliding layer without a usable window.
    """
    declared = getattr(config, "layer_types", None) if _reads_layer_types(config) else None
    window = getattr(config, "sliding_window", None)
    if declared:
        layer_types = list(declared)
    elif window is not None:  # no per-layer list: the forward windows every layer
        layer_types = [SLIDING_ATTENTION] * num_layers
    else:
        layer_types = [FULL_ATTENTION] * num_layers
    if len(layer_types) != num_layers:
        raise UnsupportedModelError(
            f"{owner}: config.layer_types lists {len(layer_types)} layers for {num_layers} "
            "decoder layers"
        )
    for index, kind in enumerate(layer_types):
        if kind not in SUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"{owner}: layer {index} uses '{kind}', which the layer-wise engine does not "
                f"reproduce exactly (supported: {', '.join(SUPPORTED_ATTENTION)})"
            )
    if SLIDING_ATTENTION in layer_types and not (
        isinstance(window, int) and not isinstance(window, bool) and window >= 2
    ):
        # A window of 1: transformers' own cached decoding and its forward disagree there.
        raise UnsupportedModelError(
            f"{owner}: sliding-window layers need config.sliding_window >= 2, got {window!r}"
        )
    return layer_types


def check_cache_layers(layers: nn.ModuleList, owner: str) -> list[int | None]:
    """The engine's cache has one layer per decoder layer, and a decoder layer's attention
    writes the cache layer of its own index (``layer_idx``). A family whose decoder layer
    holds attention of other cache indices (LongCat-Flash: two per layer, 2i and 2i + 1)
    is refused in one line, and so is one whose layers reuse another layer's keys and values
    (Gemma 4's KV sharing: a draft or verification range would miss the layer that holds
    them).

    Returns:
        Each layer's cache index: its own index where its modules carry a ``layer_idx``,
        None where none does.
    """
    indices: list[int | None] = []
    for index, layer in enumerate(layers):
        indices.append(None)
        for name, module in layer.named_modules():
            if getattr(module, "is_kv_shared_layer", False) is True:
                raise UnsupportedModelError(
                    f"{owner}: decoder layer {index} reuses another layer's keys and values "
                    "(KV sharing, num_kv_shared_layers); the layer-wise engine keeps one cache "
                    "layer per decoder layer"
                )
            cache_index = getattr(module, "layer_idx", None)
            if isinstance(cache_index, int) and cache_index != index:
                raise UnsupportedModelError(
                    f"{owner}: decoder layer {index} holds attention of cache layer "
                    f"{cache_index} ({name or 'the layer itself'}); the layer-wise engine "
                    "keeps one cache layer per decoder layer"
                )
            if isinstance(cache_index, int) and not isinstance(cache_index, bool):
                indices[index] = index
    return indices


def generation_hook_limit(model: nn.Module, config: PretrainedConfig) -> int | None:
    """The longest sequence up to which ``model``'s own generation hooks leave decoding a
    plain KV-cache loop; None when they never interfere.

    Raises:
        UnsupportedModelError: a hook of unknown effect.
    """
    cls = type(model)
    for hook in _GENERATION_HOOKS:
        defined_by = next((klass for klass in cls.__mro__ if hook in vars(klass)), GenerationMixin)
        if defined_by is GenerationMixin or not issubclass(defined_by, GenerationMixin):
            continue
        if hook == "prepare_inputs_for_generation" and defined_by.__name__ in _IMAGE_INPUTS_ONLY:
            continue
        if hook == "prepare_inputs_for_generation" and defined_by.__name__ in (
            _CACHE_RESET_AT_ORIGINAL_LENGTH
        ):
            limit = getattr(config, "original_max_position_embeddings", None)
            if isinstance(limit, int) and limit >= 2:
                return limit
            continue  # the reset never triggers without that setting
        raise UnsupportedModelError(
            f"{cls.__name__}: {defined_by.__name__}.{hook} changes how transformers decodes "
            "this family, which the layer-wise engine does not reproduce"
        )
    return None


def _original_lengths(config: PretrainedConfig) -> list[int]:
    """Switch points a config declares: ``original_max_position_embeddings``, top level or in
    its (per-layer-type) ``rope_parameters``."""
    found = [getattr(config, "original_max_position_embeddings", None)]
    parameters = getattr(config, "rope_parameters", None) or {}
    nested = parameters.values() if all(isinstance(v, dict) for v in parameters.values()) else []
    for entry in [parameters, *nested]:
        if isinstance(entry, dict):
            found.append(entry.get("original_max_position_embeddings"))
    return sorted({n for n in found if isinstance(n, int) and not isinstance(n, bool) and n >= 2})


def _tables_call_independent(
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    limit: int,
    device: torch.device,
) -> bool:
    """Whether the (cos, sin) of sample positions below ``limit`` come out the same alone,
    beside position ``limit - 1`` and beside position 0 (calls of other largest positions)."""
    samples = sorted({0, 1, limit // 2, limit - 2, limit - 1} & set(range(limit)))
    for position in samples:
        alone = _tables(rotary(torch.tensor([[position]], device=device)))
        for other in (limit - 1, 0):
            pair = _tables(rotary(torch.tensor([[other, position]], device=device)))
            for table, paired in zip(alone, pair, strict=True):
                if not torch.equal(table[:, 0], paired[:, 1]):
                    return False
    return True


def _tables(output: torch.Tensor | tuple) -> tuple[torch.Tensor, ...]:
    """A rotary module's output as a tuple of [batch, seq, ...] tables: (cos, sin) for most
    families, one complex tensor for DeepSeek-V2."""
    return (output,) if isinstance(output, torch.Tensor) else tuple(output)


def rotary_position_limit(
    rotary_emb: nn.Module,
    layer_types: set[str] | None,
    context_length: int | None,
    config: PretrainedConfig,
    hidden: torch.Tensor,
    owner: str,
) -> int | None:
    """Where positions must be clamped before ``rotary_emb`` so that every position gets
    the tables one-token decoding gives it in any call; None: nowhere.

    Returns ``context_length`` when the tables only change past the context (dynamic
    RoPE grows there: the engine's lookahead columns must not trigger it), or a shorter
    switch point (longrope's ``original_max_position_embeddings``) below which they are
    call-independent: decoding must end there. Probes a copy of the module (dynamic RoPE
    rewrites its buffers when called).

    Args:
        layer_types: the types to probe for a family with one rotary table per layer type;
            None when the family shares one.
        hidden: any [1, 1, hidden] tensor of the model's dtype and device.

    Raises:
        UnsupportedModelError: the tables depend on the call even below every switch point.
    """
    if context_length is None or context_length < 2:
        return None
    probe = copy.deepcopy(rotary_emb)

    def independent(limit: int) -> bool:
        for layer_type in layer_types or [None]:
            extra = () if layer_type is None else (layer_type,)

            def tables(positions: torch.Tensor, extra: tuple = extra) -> tuple:
                return probe(hidden, positions, *extra)

            if not _tables_call_independent(tables, limit, hidden.device):
                return False
        return True

    try:
        with torch.no_grad():
            return _position_limit(independent, context_length, config, owner)
    except UnsupportedModelError:
        raise
    except Exception as error:  # a family whose tables the engine could not compute either
        raise UnsupportedModelError(
            f"{owner}: its rotary embedding cannot be called as the layer-wise engine calls it "
            f"({type(error).__name__}: {error})"
        ) from None


def _position_limit(
    independent: Callable[[int], bool], context_length: int, config: PretrainedConfig, owner: str
) -> int | None:
    """``rotary_position_limit``'s search: the context doubled, the context, then each
    switch point the config declares."""
    if independent(2 * context_length):
        return None
    if independent(context_length):
        return context_length
    for limit in _original_lengths(config):
        if limit < context_length and independent(limit):
            logger.warning(
                "%s: its rotary embedding switches tables at %d positions "
                "(original_max_position_embeddings); decoding stops there, where every "
                "position still gets the tables one-token decoding gives it",
                owner,
                limit,
            )
            return limit
    raise UnsupportedModelError(
        f"{owner}: its rotary embedding gives a position different tables depending on the "
        "other positions of a call, which self-speculation and batching would change"
    )


# Settings of a checkpoint's generation_config.json that change transformers' greedy or
# sampled tokens, each with its neutral value, that the engine does not apply (it applies
# sampling's context processors; its own GenerationConfig sets the sampling warpers).
_CHECKPOINT_PROCESSORS = {
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "min_length": 0,
    "min_new_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "typical_p": 1.0,
    "min_p": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0,  # transformers applies both to a decoder's prompt
    "encoder_no_repeat_ngram_size": 0,
    "guidance_scale": 1.0,
    "watermarking_config": None,
    "stop_strings": None,
    # generate heals the prompt's last token when given the tokenizer (pipelines give it);
    # the engine heals only when its own GenerationConfig asks (--token_healing True).
    "token_healing": False,
    # Other decoding modes: beam search, contrastive search, DoLa, constrained beams.
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "penalty_alpha": 0.0,
    "dola_layers": None,
    "constraints": None,
    "force_words_ids": None,
    # Sampling: the engine's GenerationConfig (sample, temperature, top_k, top_p; the
    # scripts' flags) decides it, never the checkpoint (neutral: transformers' defaults).
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "top_h": None,
}


UNAPPLIED_SETTING_NAMES = tuple(_CHECKPOINT_PROCESSORS)
# Values other than the default that change no token: a floor of 0 keeps every token, as
# none does; 0 new tokens before the end of sequence is no constraint.
_ALSO_NEUTRAL = {"min_p": 0, "min_new_tokens": 0, "min_length": 1}
# Warpers transformers' generate applies only when it samples (do_sample): a checkpoint that
# decodes greedily changes no token with them.
_SAMPLING_ONLY = {
    "temperature", "top_k", "top_p", "top_h", "min_p", "typical_p", "epsilon_cutoff",
    "eta_cutoff",
}  # fmt: skip


def unapplied_generation_settings(model: nn.Module) -> list[str]:
    """``name=value`` for each logits-changing setting of ``model``'s generation config that
    differs from its neutral value: transformers' ``generate`` applies it, the engine does
    not (so its tokens differ from ``generate``'s with that checkpoint's defaults)."""
    generation_config = getattr(model, "generation_config", None)
    samples = bool(getattr(generation_config, "do_sample", False))
    found = []
    for name, neutral in _CHECKPOINT_PROCESSORS.items():
        value = getattr(generation_config, name, neutral)
        if value is None or value == neutral or value in ([], {}, ()):
            continue
        if name in _SAMPLING_ONLY and not samples:
            continue
        if value == _ALSO_NEUTRAL.get(name, neutral):
            continue
        found.append(f"{name}={value!r}")
    return found


def refuse_unusable_weights(model: nn.Module, owner: str) -> None:
    """UnsupportedModelError, naming the cause, for weights the engine cannot decode with:
    weights left on the meta device with nothing to load them (``init_empty_weights``, a
    failed load), an embedding offloaded by accelerate (the engine embeds tokens itself,
    outside the hooks that would bring it back), and int8 dynamically quantized linear
    layers (``quantize_dynamic``: each call scales activations by its own range, so drafts,
    verification and the probe's whole forward differ)."""
    loaded_by_hook = set()  # modules an accelerate hook loads weights into when called
    for module in model.modules():
        if hasattr(module, "_hf_hook"):
            loaded_by_hook.update(id(inner) for inner in module.modules())
    meta = [
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if id(module) not in loaded_by_hook
        for name, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]
        if tensor.is_meta
    ]
    if meta:
        raise UnsupportedModelError(
            f"{owner}: {len(meta)} weight(s) are on the meta device with nothing to load them "
            f"(e.g. {meta[0]}; init_empty_weights?): load the model's weights first"
        )
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_meta:
        raise UnsupportedModelError(
            f"{owner}: its input embeddings are offloaded (accelerate device_map or "
            "cpu_offload); keep embed_tokens on a device (offloading layers, the norm or "
            "the head works)"
        )
    for name, module in model.named_modules():
        packed = getattr(module, "_packed_params", None)
        if getattr(packed, "dtype", None) == torch.qint8:
            raise UnsupportedModelError(
                f"{owner}: {name} is an int8 dynamically quantized linear layer "
                "(quantize_dynamic), whose activation scales depend on the whole call, so "
                "self-speculation cannot reproduce the model's own decoding; quantize to "
                "float16 instead, or decode the float model"
            )
    for name, weight in model.named_parameters():
        # torchao's weights that quantize their inputs too (Int8DynamicActivation...Config):
        # rounding activations at every call turns the engine's other grouping of the same
        # arithmetic into other tokens. Weight-only ones decode exactly.
        if (
            getattr(weight, "act_quant_kwargs", None) is not None
            or getattr(weight, "activation_quantization", None) is not None
        ):
            raise UnsupportedModelError(
                f"{owner}: {name} quantizes its inputs at each call (torchao's dynamic "
                f"activation quantization, {type(weight).__name__}), so self-speculation "
                "cannot reproduce the model's own decoding; quantize the weights only "
                "(Int8WeightOnlyConfig, IntxWeightOnlyConfig), or decode the float model"
            )
