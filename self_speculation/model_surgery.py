"""Layer-range access to a Hugging Face decoder-only causal LM.

This is the only module that touches a model's internals. It exposes three primitives
(LayerSkip, Elhoushi et al. 2024, §4-§5):

* ``embed(input_ids)``: the model's own token embedding, including family scaling.
* ``run_layers(hidden, start, end, cache, position_ids)``: decoder layers ``[start, end)``
  with the model's own layers, rotary embedding, masks and a transformers ``Cache``.
* ``unembed(hidden)``: the model's own final norm and LM head, including family scaling.

Early exit at layer E is ``unembed(run_layers(embed(x), 0, E))``; verification is
``run_layers(h_E, E, L)``; the full model is ``run_layers(embed(x), 0, L)``: one code path.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import re
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import Cache, DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from self_speculation.errors import UnsupportedModelError, one_line
from self_speculation.kv_cache import ColumnKVCache, LayerColumns
from self_speculation.model_support import (
    SLIDING_ATTENTION,
    attention_layer_types,
    check_cache_layers,
    check_transformers_version,
    generation_hook_limit,
    refuse_unusable_weights,
    rotary_position_limit,
)
from self_speculation.trees import TreeColumns

logger = logging.getLogger(__name__)

_BASE_MODEL_ATTRIBUTES = ("model", "transformer", "base_model")


# The name the installed transformers' mask helpers take the cache under.
_MASK_CACHE_KEYWORD = (
    "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
)


# LAYERSKIP_LAYER_REGIONS=1: compiled passes trace each decoder layer once and call it for
# every layer like it (``layer_regions``); unset (or anything else), every layer instance.
LAYER_REGIONS_VARIABLE = "LAYERSKIP_LAYER_REGIONS"
_REGIONS_SETTING = os.environ.get(LAYER_REGIONS_VARIABLE, "")


def _layer_call(
    layer: nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    position_ids: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    keyword: str,
    layer_idx: int | None,
) -> torch.Tensor:
    """One decoder layer over a ``ColumnKVCache``'s buffers of that layer, given as tensors
    (``LayerColumns``): every argument is a tensor, a constant or the layer, so that
    layers of one shape trace to the same code."""
    hidden = layer(
        hidden,
        attention_mask=attention_mask,
        position_embeddings=position_embeddings,
        position_ids=position_ids,
        use_cache=True,
        **{keyword: LayerColumns(keys, values, columns, layer_idx)},
    )
    return hidden[0] if isinstance(hidden, tuple) else hidden


def _regions_supported() -> bool:
    """torch >= 2.12: ``nested_compile_region`` reuses a traced region across calls whose
    inputs pass its guards (``max_reuse_entries`` came with that)."""
    region = getattr(torch.compiler, "nested_compile_region", None)
    return region is not None and "max_reuse_entries" in inspect.signature(region).parameters


# A compiled pass traces a decoder layer once per shape of its inputs (and whatever its
# guards tell apart: another class, another layer type's mask), and calls that code for
# every layer like it, where it traced and compiled every layer instance before (30 of them
# in the shipped model's E = 7, k = 3 step). Up to 4096 distinct layers before torch gives
# up (a model whose layers all differ traces each once, as before). The model's layers go
# through one such region per structure (``region_for``); this one serves exit adapters.
_layer_region = (
    torch.compiler.nested_compile_region(_layer_call, max_reuse_entries=4096)
    if _regions_supported()
    else _layer_call
)


# One region per layer structure (``region_for``): torch keeps a region's traced code by
# its function's code object, and checks a trace of a layer against another layer by the
# guards that trace recorded. torch 2.13 records none on the modules and weights an earlier
# trace in the same pass read (a layer traced again for another shape of its inputs: a tree
# step's drafts), and a layer of another structure matched it: a dense first layer's code
# stamped out for a mixture-of-experts layer failed to compile (DeepSeek, AFMoE), a norm of
# another class was run as the first layer's (other tokens).
_STRUCTURE_REGIONS: dict[tuple, Callable] = {}


def layer_structure(layer: nn.Module) -> tuple:
    """What layers sharing a region must have alike: each module's name and class, each
    weight's name, shape, dtype and device."""
    tensors = [*layer.named_parameters(), *layer.named_buffers()]
    return (
        tuple((name, type(module)) for name, module in layer.named_modules()),
        tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in tensors),
    )


def region_for(structure: tuple) -> Callable:
    """The region layers of ``structure`` are called through when compiling: ``_layer_call``
    under a code object of its own (``_layer_call`` itself without regions)."""
    if _layer_region is _layer_call:
        return _layer_call
    region = _STRUCTURE_REGIONS.get(structure)
    if region is None:
        # Named by the structure, not by the order models were built in: a pass kept on
        # disk is named after the code it runs (precompiled), in this process and the next.
        digest = hashlib.sha256(repr(structure).encode()).hexdigest()[:16]
        code = _layer_call.__code__.replace(co_name=f"_layer_call_{digest}")
        function = types.FunctionType(code, _layer_call.__globals__, code.co_name)
        region = torch.compiler.nested_compile_region(function, max_reuse_entries=4096)
        _STRUCTURE_REGIONS[structure] = region
    return region


def layer_regions() -> bool:
    """Whether compiled passes trace each decoder layer once and reuse it
    (``_layer_region``): with LAYERSKIP_LAYER_REGIONS=1, on torch >= 2.12. Not by default:
    on CPU inductor's C++ wrapper cannot call such a region, and its Python wrapper made
    decoding 11-17% slower on the shipped model, for half the cold compile
    (docs/fast-path.md); on CUDA, where CUDA graphs replay whatever wrapper, it has not run
    on a GPU yet."""
    return _REGIONS_SETTING == "1" and _layer_region is not _layer_call


def cache_keyword(function: Callable) -> str:
    """The keyword under which ``function`` (a decoder layer's forward, a mask helper) takes
    the KV cache: ``cache`` from transformers 5.24 on (where ``past_key_values`` is a
    deprecated alias, warned about at every run and due to go in 5.40; after that, a cache
    passed under the old name would land in ``**kwargs``, unused), ``past_key_values``
    before. A function that names neither (it hands ``**kwargs`` on) gets the name the
    installed transformers' mask helpers use."""
    parameters = inspect.signature(function).parameters
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    return _MASK_CACHE_KEYWORD


def find_base_model(model: nn.Module) -> nn.Module:
    """The module holding ``model``'s decoder layers as ``.layers`` (the one place that finds them).

    Raises:
        UnsupportedModelError: no such module.
    """
    for name in _BASE_MODEL_ATTRIBUTES:
        base = getattr(model, name, None)
        # A multimodal model's text decoder (Gemma 3, Mistral 3...): its text-only decoding.
        text = getattr(base, "language_model", None)
        for candidate in (base, text):
            if isinstance(candidate, nn.Module) and isinstance(
                getattr(candidate, "layers", None), nn.ModuleList
            ):
                return candidate
    raise UnsupportedModelError(
        f"{type(model).__name__} has no decoder layers as a ModuleList at .model.layers; "
        "LayerSkip needs a decoder-only causal LM such as Llama, Qwen2, Mistral or Gemma"
    )


# Module classes of layers that are not attention over a KV cache (state-space, recurrent,
# convolutional, linear attention): hybrids holding them are refused, named by them.
_NOT_ATTENTION = re.compile(
    r"Mamba|Mixer|Conv1d|ShortConv|Recurrent|GatedDelta|DeltaAttention|SSM|Rwkv|LinearAttention"
)


def _require(module: nn.Module, attribute: str, owner: str) -> nn.Module:
    value = getattr(module, attribute, None)
    if not isinstance(value, nn.Module):
        other = next(
            (
                type(part).__name__
                for part in module.modules()
                if part is not module and _NOT_ATTENTION.search(type(part).__name__)
            ),
            None,
        )
        why = (
            f"its layers are not all attention ({other}): LayerSkip drafts and verifies "
            "through attention layers and their KV cache"
            if other is not None
            else "its base model is laid out otherwise than Llama's (embed_tokens, layers, "
            "norm, rotary_emb)"
        )
        raise UnsupportedModelError(
            f"{owner} has no module '{attribute}', which LayerSkip needs: {why}"
        )
    return value


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode within the block, each module's own mode restored after:
    decoding (and the load-time probe) in training mode would apply dropout, layer dropout
    and gradient checkpointing (which drops the KV cache).

    Blocks over one model nest and overlap (eager generations in several threads, a
    generation started from a streamer): the first to enter records the modes, the last to
    leave restores them, so that no generation still running sees them restored. An
    interrupt (KeyboardInterrupt) while the modes are switched still restores them."""
    held = None
    try:
        with _EVAL_LOCK:
            held = _EVAL_HOLDS.get(model) or [0, None]
            _EVAL_HOLDS[model] = held
            held[0] += 1
            if held[1] is None:
                held[1] = [module for module in model.modules() if module.training]
                if held[1]:
                    model.eval()
        yield
    finally:
        if held is not None:
            with _EVAL_LOCK:
                held[0] -= 1
                if held[0] <= 0:
                    _EVAL_HOLDS.pop(model, None)
                    for module in held[1] or ():
                        module.training = True


# model -> [blocks inside eval_mode now, the modules it found training]
_EVAL_HOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_EVAL_LOCK = threading.RLock()


def is_capture_hook(hook: Callable) -> bool:
    """Whether ``hook`` is one of transformers' output-capturing forward hooks. The first
    forward with ``output_hidden_states`` (or ``output_attentions``) installs them on the
    layers for good; they record only inside such a forward, so the engine's passes,
    which call the layers themselves, never need them."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def user_hooks(name: str, value: object) -> tuple | None:
    """The hooks in ``value``, a module attribute named ``name``, less output-capturing
    ones (``is_capture_hook``); None when it holds no hooks: not a ``..._hooks`` dict
    (transformers' ``enable_input_require_grads`` keeps a list of handles as
    ``_require_grads_hooks``, read as a dict before: a traceback)."""
    if not (name.endswith("hooks") and isinstance(value, dict)):
        return None
    return tuple(hook for hook in value.values() if not is_capture_hook(hook))


def global_forward_hooks() -> tuple:
    """The forward hooks and pre-hooks registered for every module
    (``torch.nn.modules.module.register_module_forward_hook`` and its pre-hook twin): they
    run inside a pass as a module's own hooks do."""
    hooks = torch.nn.modules.module
    return (*hooks._global_forward_pre_hooks.values(), *hooks._global_forward_hooks.values())


def _inert_when_traced(hook: Callable) -> Callable:
    """``hook`` (an output-capturing hook) that does nothing inside code dynamo traces, and
    records as before elsewhere (a forward with ``output_hidden_states`` in another thread,
    or from a streamer). One per hook, kept on it: a new one each generation would be a new
    value for the guards of a hooked model's passes (a compile again each generation)."""
    inert = getattr(hook, "_inert_when_traced", None)
    if inert is None:

        @functools.wraps(hook)  # its __module__ too: still is_capture_hook
        def inert(module: nn.Module, args: tuple, output: object) -> None:
            if torch.compiler.is_compiling():  # a compiled pass, which captures nothing
                return None
            return hook(module, args, output)

        # Kept on the wrapper too: blocks over two models sharing modules (a PEFT model
        # and its base) do not wrap it again.
        hook._inert_when_traced = inert._inert_when_traced = inert
    return inert


@contextmanager
def capture_hooks_suspended(model: nn.Module) -> Iterator[None]:
    """``model``'s output-capturing hooks (``is_capture_hook``) left out of the code that
    dynamo traces within the block, and as they were after. Compiled passes need it: such a
    hook reads a ``ContextVar``, which dynamo cannot trace, so one forward with
    ``output_hidden_states`` before had turned every later compiled generation eager. Each
    hook is swapped in its place for one that does nothing while traced
    (``_inert_when_traced``): a forward with ``output_hidden_states`` that another thread (or
    a streamer) runs meanwhile captures as before (with the hooks off the modules, it got
    no hidden states at all).

    Blocks over one model nest and overlap (compiled generations of several Generators in
    several threads): the first to enter swaps the hooks, the last to leave puts them
    back."""
    with _EVAL_LOCK:
        held = _CAPTURE_HOLDS.get(model)
        if held is None:
            held = _CAPTURE_HOLDS[model] = [0, []]
            for module in model.modules():
                hooks = module._forward_hooks
                for key, hook in list(hooks.items()):
                    if is_capture_hook(hook):
                        hooks[key] = _inert_when_traced(hook)
                        held[1].append((hooks, key, hook))
        held[0] += 1
    try:
        yield
    finally:
        with _EVAL_LOCK:
            held[0] -= 1
            if not held[0]:
                _CAPTURE_HOLDS.pop(model, None)
                for hooks, key, hook in held[1]:
                    if hooks.get(key) is _inert_when_traced(hook):  # not removed meanwhile
                        hooks[key] = hook


# model -> [blocks inside capture_hooks_suspended now, (hooks dict, key, hook swapped)]
_CAPTURE_HOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _SettingsUse:
    """Who reads a model's settings now (generations, by thread) and who changes them for a
    moment (the load probe narrows its sliding windows: ``_narrowed_windows``)."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.readers: dict[int, int] = {}  # thread -> blocks
        self.writer: int | None = None
        self.depth = 0  # the writer's nested blocks
        self.waiting: set[int] = set()  # writers waiting that read themselves


_SETTINGS_USES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _settings_use(model: nn.Module) -> _SettingsUse:
    with _EVAL_LOCK:
        use = _SETTINGS_USES.get(model)
        if use is None:
            use = _SETTINGS_USES[model] = _SettingsUse()
        return use


@contextmanager
def reading_settings(model: nn.Module) -> Iterator[None]:
    """Within the block, no other thread changes ``model``'s settings (a Generator made in
    another thread probes the model with its windows narrowed: a generation running
    meanwhile decoded with the narrowed window). Blocks nest and overlap; a thread's own
    changes (a Generator made from its streamer) wait for no one but other threads."""
    use, me = _settings_use(model), threading.get_ident()
    with use.condition:
        use.condition.wait_for(lambda: use.writer in (None, me))
        use.readers[me] = use.readers.get(me, 0) + 1
    try:
        yield
    finally:
        with use.condition:
            use.readers[me] -= 1
            if not use.readers[me]:
                del use.readers[me]
            use.condition.notify_all()


@contextmanager
def changing_settings(model: nn.Module) -> Iterator[None]:
    """Within the block, this thread may change ``model``'s settings and restore them: it
    waits until no other thread reads them (``reading_settings``).

    Raises:
        UnsupportedModelError: two threads that each generate with the model and each
            need to change its settings (each would wait for the other forever).
    """
    use, me = _settings_use(model), threading.get_ident()
    with use.condition:
        reading = me in use.readers

        def free() -> bool:
            if reading and use.waiting - {me}:
                raise UnsupportedModelError(
                    "two threads generating with this model each made a Generator for it "
                    "(or changed its config) from inside their generation: make Generators "
                    "before starting generations in other threads"
                )
            return use.writer in (None, me) and all(thread == me for thread in use.readers)

        if reading:
            use.waiting.add(me)
        try:
            use.condition.wait_for(free)
        finally:
            use.waiting.discard(me)
            use.condition.notify_all()
        use.writer, use.depth = me, use.depth + 1
    try:
        yield
    finally:
        with use.condition:
            use.depth -= 1
            if not use.depth:
                use.writer = None
            use.condition.notify_all()


# Not settings the passes read: nn.Module's containers, the training flag, the static
# cache length transformers' generate keeps on the model (each static-cache call sets it),
# and transformers' mark of its output-capturing hooks (``is_capture_hook``).
CAPTURE_HOOKS_MARK = "_output_capturing_hooks_installed"
_MODULE_CONTAINERS = frozenset(
    {"_parameters", "_buffers", "_modules", "training", "_previous_max_cache_length"}
    | {CAPTURE_HOOKS_MARK}
)
_PLAIN = (bool, int, float, str, type(None))


def module_state(model: nn.Module) -> tuple:
    """What compiled passes bake in of ``model``'s modules besides their tensors, as it is
    now: each module's identity, its hooks (those registered for every module too:
    ``register_module_forward_hook``), and its plain settings (flags such as a PEFT layer's
    merged or disabled adapters, its per-adapter scaling, an attention's scaling). Compiled
    code does not re-check the modules at each call (that cost 0.75 ms per call), so a
    Generator compares this between its compiled generations and compiles again when it
    changed. The training flag is left out (generation runs in eval mode either way), and so
    are output-capturing hooks (inert inside compiled passes)."""
    state: list = [tuple(map(id, global_forward_hooks()))]
    for module in model.modules():
        state.append(id(module))
        for key, value in vars(module).items():
            if key in _MODULE_CONTAINERS:
                continue
            hooks = user_hooks(key, value)  # _forward_hooks, _forward_pre_hooks...
            if hooks is not None:
                if hooks:
                    state.append((key, tuple(map(id, hooks))))
            elif isinstance(value, _PLAIN):
                state.append((key, value))
            elif isinstance(value, list | tuple) and all(isinstance(x, _PLAIN) for x in value):
                state.append((key, tuple(value)))
            elif isinstance(value, set | frozenset) and all(isinstance(x, _PLAIN) for x in value):
                state.append((key, frozenset(value)))
            elif isinstance(value, dict) and all(
                isinstance(x, _PLAIN) for item in value.items() for x in item
            ):  # per adapter: a PEFT LoRA layer's scaling (peft's rescale_adapter_scale)
                state.append((key, tuple(value.items())))
    return tuple(state)


def truncate_cache(cache: Cache, length: int) -> None:
    """Roll every layer of ``cache`` back to at most ``length`` positions (in place)."""
    for layer in cache.layers:
        surplus = layer.get_seq_length() - length
        if surplus > 0:
            layer.crop(-surplus)


class LayerwiseModel:
    """A decoder-only LM seen as embed -> layers [0, L) -> unembed.

    Args:
        model: a transformers causal LM whose base model holds its decoder layers in
            ``.layers`` and has ``embed_tokens``, ``norm`` and ``rotary_emb``.
        verify: run a short probe and check that embed + all layers + unembed reproduce
            the model's own forward; a family whose forward does something this class does
            not reproduce is rejected with ``UnsupportedModelError`` instead of silently
            giving wrong logits.
    """

    def __init__(self, model: PreTrainedModel, verify: bool = True) -> None:
        check_transformers_version()
        self.model = model
        self.config = model.config.get_text_config(decoder=True)
        owner = type(model).__name__
        self.base = find_base_model(model)
        refuse_unusable_weights(model, owner)
        # The modules the model's own forward runs around the ones this view calls (the
        # model itself, its base model): this view never runs their forward hooks.
        base_name = next(name for name, module in model.named_modules() if module is self.base)
        self._outer_modules = {
            f"{name or 'the model'} ({type(module).__name__})": module
            for name, module in model.named_modules()
            if name == "" or base_name == name or base_name.startswith(f"{name}.")
        }
        bypassed = self.bypassed()
        if bypassed is not None:
            raise UnsupportedModelError(f"{owner}: {bypassed}")
        self.layers: nn.ModuleList = self.base.layers
        # Where each layer's attention writes (its own index; None: it names none).
        self._cache_indices = check_cache_layers(self.layers, owner)
        self.embed_tokens = _require(self.base, "embed_tokens", owner)
        self.norm = _require(self.base, "norm", owner)
        self.rotary_emb = _require(self.base, "rotary_emb", owner)
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(lm_head, nn.Module):
            raise UnsupportedModelError(f"{owner} has no LM head (get_output_embeddings)")
        self.lm_head = lm_head
        self.num_layers = len(self.layers)
        # One name for every layer (and exit adapter: a copy of one) of a transformers version.
        self.cache_keyword = (
            cache_keyword(self.layers[0].forward) if self.layers else _MASK_CACHE_KEYWORD
        )
        # Gemma 4 from transformers 5.24: the last layer of each attention type stores its
        # keys and values in a dict its model's forward hands every layer (for layers that
        # reuse them, refused above, or an assistant model): each call gets a fresh one.
        self._stores_shared_kv = any(
            getattr(module, "store_full_length_kv", False) is True
            for module in self.layers.modules()
        )
        self._layer_ids = [id(layer) for layer in self.layers]  # replaced_module
        self._regions = [region_for(layer_structure(layer)) for layer in self.layers]
        # Some families (Gemma 3) keep one rotary embedding per layer type.
        rotary_parameters = inspect.signature(self.rotary_emb.forward).parameters
        self.rotary_per_layer_type = "layer_type" in rotary_parameters
        self.follow_config()
        self.follow_attention_implementation(verify)

    def follow_config(self) -> None:
        """Read what the engine applies from the config as it is now (at load, and after the
        config was changed): the family scalars the model's own forward applies outside its
        layers, read where that forward reads them, each layer's attention type and the
        context (``_follow_context``)."""
        config = self.config
        # Copied onto the model when it was made (Cohere's logit scale, Granite's embedding
        # multiplier): a config changed since changes nothing there.
        self.embedding_multiplier = vars(self.base).get(
            "embedding_multiplier", getattr(config, "embedding_multiplier", None)
        )
        if self.embedding_multiplier is None and getattr(config, "mup_enabled", False):
            # AFMoE's muP input scaling: its base model multiplies the embeddings by
            # sqrt(hidden_size) before the first layer (read from the config at each forward).
            self.embedding_multiplier = config.hidden_size**0.5
        self.logit_scale = vars(self.model).get("logit_scale", getattr(config, "logit_scale", None))
        # Read from the config at each forward (Granite MoE copies logits_scaling too, and
        # reads the config's).
        self.logits_scaling = getattr(config, "logits_scaling", None)
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)
        owner = type(self.model).__name__
        declared = getattr(config, "num_hidden_layers", None)
        if (
            isinstance(declared, int)
            and not isinstance(declared, bool)
            and declared < self.num_layers
        ):
            # Layers added (a duplicated block) without the config: the model's own forward
            # runs layers[:num_hidden_layers], this view all of them.
            raise UnsupportedModelError(
                f"{owner}: config.num_hidden_layers is {declared} but the model holds "
                f"{self.num_layers} decoder layers (its own forward and cache expect "
                f"{declared}): set config.num_hidden_layers to {self.num_layers}, or delete the "
                f"layers past the first {declared}"
            )
        self.layer_types = attention_layer_types(self.config, self.num_layers, owner)
        self.has_sliding_layers = SLIDING_ATTENTION in self.layer_types
        self._follow_context(owner)

    def _follow_context(self, owner: str) -> None:
        """The longest sequence (prompt + generated) the engine decodes, ``context_length``
        (None when the config states none), what ends it, ``context_source``, and where rotary
        positions are clamped, ``rotary_position_limit``: read from the config as it is now,
        as transformers reads the switch points (its generation hooks and longrope's tables
        read them at each call)."""
        context_length: int | None = getattr(self.config, "max_position_embeddings", None)
        if context_length is not None and context_length < 1:  # --model_args, say (0 too)
            raise UnsupportedModelError(
                f"{owner}: max_position_embeddings must be >= 1, got {context_length}"
            )
        context_source = "max_position_embeddings"
        # Decoding must end where the model's own generation hooks or its rotary tables
        # would stop matching a plain KV-cache loop; rotary positions are clamped there.
        hook_limit = generation_hook_limit(self.model, self.config)
        if hook_limit is not None and (context_length is None or context_length > hook_limit):
            logger.warning(
                "%s: transformers re-runs this family's cache once a sequence passes %d "
                "tokens (original_max_position_embeddings); decoding stops there",
                owner,
                hook_limit,
            )
            context_length = hook_limit
            context_source = "where transformers re-runs this family's cache"
        position_limit = rotary_position_limit(
            self.rotary_emb,
            set(self.layer_types) if self.rotary_per_layer_type else None,
            context_length,
            self.config,
            self.embed_tokens.weight.new_zeros(1, 1, self.embed_tokens.weight.shape[-1]),
            owner,
        )
        if position_limit is not None:
            if position_limit < context_length:
                context_source = "where its rotary tables switch"
            context_length = min(context_length, position_limit)
        self.context_length, self.context_source = context_length, context_source
        self.rotary_position_limit = position_limit

    def replaced_module(self) -> str | None:
        """Which module this view reads the model no longer holds (its head or embeddings
        replaced by ``resize_token_embeddings``, a layer swapped), named; None when all are
        the model's still. The view, its probe and everything built on them (drafts, token
        texts) describe the old modules."""
        try:
            base = find_base_model(self.model)
        except UnsupportedModelError:
            return "its decoder layers"
        head = getattr(self.model, "get_output_embeddings", lambda: None)()
        held = {
            "its decoder": (base, self.base),
            "its decoder layers": (base.layers, self.layers),
            "embed_tokens": (getattr(base, "embed_tokens", None), self.embed_tokens),
            "norm": (getattr(base, "norm", None), self.norm),
            "rotary_emb": (getattr(base, "rotary_emb", None), self.rotary_emb),
            "lm_head": (head, self.lm_head),
        }
        for name, (now, then) in held.items():
            if now is not then:
                return name
        if [id(layer) for layer in self.layers] != self._layer_ids:
            return "a decoder layer"
        return None

    def bypassed(self) -> str | None:
        """What of the model's own forward this view would skip, named with the remedy; None
        when nothing. The view calls embed_tokens, the decoder layers, norm, rotary_emb and
        the LM head, not the model's own forward nor its base model's: a forward hook on
        those (on the logits, say) would never run, and an activated LoRA (PEFT's
        ``alora_invocation_tokens``) would never be handed the offsets that PEFT's forward
        finds in the tokens, so its layers would decode as the base model."""
        for name, module in self._outer_modules.items():
            if user_hooks("_forward_hooks", module._forward_hooks) or user_hooks(
                "_forward_pre_hooks", module._forward_pre_hooks
            ):
                return (
                    f"{name} has a forward hook, which the layer-wise engine never runs (it "
                    "calls embed_tokens, the decoder layers, norm and lm_head, not the "
                    "model's own forward): register it on one of those, or remove it"
                )
        for module in self.model.modules():
            variants = vars(module).get("lora_variant")  # a PEFT LoRA layer's (read per call)
            if not isinstance(variants, dict) or getattr(module, "disable_adapters", False):
                continue
            for adapter in getattr(module, "active_adapters", ()):
                if type(variants.get(adapter)).__name__ == "ALoraLinearVariant":
                    name = next(n for n, m in self.model.named_modules() if m is module)
                    return (
                        f"{name} holds an activated LoRA adapter ('{adapter}', PEFT's "
                        "alora_invocation_tokens), which only PEFT's own forward applies "
                        "(from its invocation tokens on): decode with an adapter of another "
                        "kind, or with this one disabled"
                    )
        return None

    def follow_attention_implementation(self, verify: bool = True) -> None:
        """Build masks for the attention implementation the config now selects (eager
        attention adds its mask to the scores; sdpa takes a boolean mask), and with
        ``verify`` probe the layer-wise forward against the model's own again (at load, and
        after ``model.set_attn_implementation``)."""
        implementation = getattr(self.config, "_attn_implementation", None) or "eager"
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"attn_implementation '{implementation}' is not supported: the engine gives "
                "attention its own column masks, which it builds for "
                f"{' and '.join(ATTENTION_IMPLEMENTATIONS)} (load the model with one of them)"
            )
        self.additive_masks = implementation == "eager"
        if verify:
            with eval_mode(self.model):
                self._verify_against_own_forward()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self) -> DynamicCache:
        """An empty KV cache with one layer cache per decoder layer.

        Sliding-window layers get full caches too: a window cache drops old positions,
        which a rollback after verification cannot restore; the masks apply the window.
        """
        if self.has_sliding_layers:
            return DynamicCache()
        return DynamicCache(config=self.model.config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, seq] -> input hidden states [batch, seq, hidden]."""
        hidden = self.embed_tokens(input_ids)  # [batch, seq, hidden]
        if self.embedding_multiplier is not None:
            hidden = hidden * self.embedding_multiplier
        return hidden

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [batch, seq, hidden] at any exit -> logits [batch, seq, vocab]."""
        return self.scale_logits(self.lm_head(self.norm(hidden)))  # [batch, seq, vocab]

    def head_cost_in_layers(self) -> float:
        """The head's (final norm + LM head) weights over one decoder layer's: what a
        one-token pass through it costs in one-layer passes, where reading weights bounds
        the cost (decoding)."""
        layer = sum(parameter.numel() for parameter in self.layers[0].parameters())
        head = sum(parameter.numel() for parameter in self.lm_head.parameters())
        head += sum(parameter.numel() for parameter in self.norm.parameters())
        return head / max(layer, 1)

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's scaling and soft-capping of raw LM-head outputs."""
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _masks(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        cache: Cache | None,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> dict[str, torch.Tensor | None]:
        """One attention mask per layer type used by layers [start, end)."""
        masks: dict[str, torch.Tensor | None] = {}
        for index in range(start, end):
            layer_type = self.layer_types[index]
            if layer_type in masks:
                continue
            # A single new token that may see the whole (unpadded) past needs no mask.
            if hidden.shape[1] == 1 and layer_type == "full_attention" and padding_mask is None:
                masks[layer_type] = None
                continue
            # Layers below the exit may hold more positions than later ones: size each
            # mask against the first layer of its type that this call runs and that holds
            # keys (a layer whose attention was dropped, by pruning, holds none).
            holder = index
            if cache is not None:
                holder = next(
                    (
                        i
                        for i in range(index, end)
                        if self.layer_types[i] == layer_type and cache.get_seq_length(i) > 0
                    ),
                    index,
                )
            past = cache.get_seq_length(holder) if cache is not None else 0
            make_mask = (
                create_sliding_window_causal_mask
                if layer_type == SLIDING_ATTENTION
                else create_causal_mask
            )
            masks[layer_type] = make_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=(
                    None if padding_mask is None else padding_mask[:, : past + hidden.shape[1]]
                ),
                position_ids=position_ids,
                **{_MASK_CACHE_KEYWORD: cache},
                **({"layer_idx": holder} if cache is not None else {}),
            )
        return masks

    def _rotary(
        self, hidden: torch.Tensor, layer_types: set[str], position_ids: torch.Tensor
    ) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) per layer type (key None when the family shares one rotary).

        Positions past ``rotary_position_limit`` (columns no kept token reads) are clamped,
        so that they cannot switch the tables of the positions that count.
        """
        if self.rotary_position_limit is not None:
            position_ids = position_ids.clamp(max=self.rotary_position_limit - 1)
        if not self.rotary_per_layer_type:
            return {None: self.rotary_emb(hidden, position_ids)}
        return {
            layer_type: self.rotary_emb(hidden, position_ids, layer_type)
            for layer_type in layer_types
        }

    def _column_masks(
        self,
        hidden: torch.Tensor,
        layer_types: set[str],
        cache_index: int,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """One mask [batch, 1, new, capacity] per layer type, from the cache's write columns.

        A query at column c sees columns [pad, c] of its row (and [c - window + 1, c] on a
        sliding layer). A left-padding query sees only itself, so that no row of the
        attention is empty (an empty row would put NaN into the padding columns' values,
        and 0 * NaN would reach real tokens).
        """
        slots = torch.arange(cache.columns(cache_index), device=hidden.device)  # [capacity]
        if cache.tree is not None:
            causal, columns, slot_columns = _tree_visibility(cache.tree, slots, pad_counts)
        else:
            columns = cache.write_columns[:, None, :, None]  # [batch, 1, new, 1]
            causal = slots <= columns  # [batch, 1, new, capacity]
            if pad_counts is not None:
                causal = causal & ((slots >= pad_counts[:, None, None, None]) | (slots == columns))
            slot_columns = slots
        masks: dict[str, torch.Tensor] = {}
        for layer_type in layer_types:
            visible = causal
            if layer_type == SLIDING_ATTENTION:
                visible = causal & (slot_columns > columns - self.config.sliding_window)
            if self.additive_masks:  # eager attention adds the mask to its scores
                visible = torch.zeros((), dtype=hidden.dtype, device=hidden.device).masked_fill(
                    ~visible, torch.finfo(hidden.dtype).min
                )
            masks[layer_type] = visible
        return masks

    def run_layers(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        cache: Cache | None,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run decoder layers [start, end) (0-based, end exclusive).

        Args:
            hidden: hidden states entering layer ``start``, [batch, seq, hidden].
            start: first layer to run.
            end: one past the last layer to run.
            cache: KV cache. A ``ColumnKVCache`` (the engine's) must have its
                ``write_columns`` set to the new tokens' columns, [batch, seq]; any other
                transformers ``Cache`` holds, in layer i, the columns before the new tokens.
            position_ids: positions of the ``seq`` new tokens, [batch, seq].
            padding_mask: with a ``ColumnKVCache``: each row's left padding, [batch] (None:
                no padding). Otherwise 1 for real tokens, 0 for (left) padding,
                [batch, columns] over every column so far, the new ones included; None
                when nothing is padded.

        Returns:
            Hidden states leaving layer ``end - 1``, [batch, seq, hidden].
        """
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) outside [0, {self.num_layers}]")
        if start == end:
            return hidden
        layer_types = set(self.layer_types[start:end])
        if isinstance(cache, ColumnKVCache):
            masks = self._column_masks(hidden, layer_types, start, cache, padding_mask)
        else:
            masks = self._masks(hidden, start, end, cache, position_ids, padding_mask)
        rotary = self._rotary(hidden, layer_types, position_ids)  # type -> (cos, sin)
        for index in range(start, end):
            hidden = self._call_layer(
                self.layers[index],
                self.layer_types[index],
                hidden,
                masks,
                rotary,
                cache,
                position_ids,
                self._cache_indices[index],
                self._regions[index],
            )
        return hidden

    def _call_layer(
        self,
        layer: nn.Module,
        layer_type: str,
        hidden: torch.Tensor,
        masks: dict[str, torch.Tensor | None],
        rotary: dict[str | None, tuple[torch.Tensor, torch.Tensor]],
        cache: Cache | None,
        position_ids: torch.Tensor,
        cache_index: int | None,
        region: Callable = _layer_region,
    ) -> torch.Tensor:
        position_embeddings = rotary[layer_type if self.rotary_per_layer_type else None]
        if (
            isinstance(cache, ColumnKVCache)
            and cache_index is not None
            and cache.keys[cache_index] is not None  # not the prefill, which allocates them
            and not self._stores_shared_kv
        ):
            compiling = torch.compiler.is_compiling()
            call = region if compiling and layer_regions() else _layer_call
            return call(
                layer,
                hidden,
                masks[layer_type],
                position_embeddings,
                position_ids,
                cache.keys[cache_index],
                cache.values[cache_index],
                cache.write_columns,
                self.cache_keyword,
                None if compiling else cache_index,
            )
        hidden = layer(
            hidden,
            attention_mask=masks[layer_type],
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self.cache_keyword: cache},
            **({"shared_kv_states": {}} if self._stores_shared_kv else {}),
        )
        if isinstance(hidden, tuple):  # older layer signatures return (hidden, ...)
            hidden = hidden[0]
        return hidden

    def run_block(
        self,
        block: nn.Module,
        layer_type: str,
        hidden: torch.Tensor,
        cache: ColumnKVCache | None,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run one decoder layer that is not among the model's layers (an exit adapter).

        Its attention must carry its own ``layer_idx`` (a cache index past the model's
        layers). ``cache``: a ``ColumnKVCache`` with ``write_columns`` set (``padding_mask``
        is then each row's left padding), or None for a fresh causal pass over ``hidden``
        (``padding_mask``: 1 for real tokens, 0 for left padding, or None).
        """
        if isinstance(cache, ColumnKVCache):
            index = block.self_attn.layer_idx
            masks = self._column_masks(hidden, {layer_type}, index, cache, padding_mask)
        elif cache is None:
            make_mask = (
                create_sliding_window_causal_mask
                if layer_type == SLIDING_ATTENTION
                else create_causal_mask
            )
            masks = {
                layer_type: make_mask(
                    config=self.config,
                    inputs_embeds=hidden,
                    attention_mask=padding_mask,
                    position_ids=position_ids,
                    **{_MASK_CACHE_KEYWORD: None},
                )
            }
        else:
            raise TypeError(f"run_block takes a ColumnKVCache or None, not {type(cache).__name__}")
        rotary = self._rotary(hidden, {layer_type}, position_ids)
        return self._call_layer(
            block,
            layer_type,
            hidden,
            masks,
            rotary,
            cache,
            position_ids,
            block.self_attn.layer_idx if cache is not None else None,
        )

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, exit_layer: int | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab] of a fresh forward exiting after ``exit_layer`` layers."""
        exit_layer = self.num_layers if exit_layer is None else exit_layer
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.run_layers(self.embed(input_ids), 0, exit_layer, None, positions)
        return self.unembed(hidden)

    def _offloaded_tied_head(self) -> bool:
        """Whether the LM head is tied to the input embeddings and offloaded by an accelerate
        hook while they are not: the hook looks for a head weight that was never saved apart,
        and transformers' own forward fails (a KeyError)."""

        def offloaded(module: nn.Module | None) -> bool:
            return bool(getattr(getattr(module, "_hf_hook", None), "offload", False))

        config = self.model.config.get_text_config(decoder=True)
        return (
            getattr(config, "tie_word_embeddings", False)
            and offloaded(self.model.get_output_embeddings())
            and not offloaded(self.model.get_input_embeddings())
        )

    @torch.no_grad()
    def _verify_against_own_forward(self) -> None:
        """Compare the layer-wise view with the model's own forward on a probe that can see
        what a short one cannot: two rows, one left-padded, longer than every sliding
        window (windows are narrowed to a few positions for the probe, in both views), run
        once as a whole, once as a prefill followed by one-token steps with a cache, and once
        through the decoding engine's cache as self-speculation writes it
        (``_column_logits``: stale columns, a step split at a middle layer).

        Raises:
            UnsupportedModelError: the views differ, or the model's own forward fails (a
                kernel without this dtype, say), in one line.
        """
        owner = type(self.model).__name__
        length = min(_PROBE_LENGTH, self.context_length or _PROBE_LENGTH)
        padding = min(_PROBE_PADDING, length - 1)
        vocab = self.embed_tokens.weight.shape[0]
        probe = (torch.arange(2 * length, device=self.device).view(2, length) * 7 + 3) % vocab
        mask = torch.ones_like(probe)  # [2, length]: 1 real, 0 left padding
        mask[1, :padding] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [2, length]
        real = mask.bool()
        # At the model's own precision, whatever torch.autocast block the caller is in: the
        # probe checks the views' arithmetic, which a bfloat16 autocast would blur past its
        # tolerance (and blame the family).
        with (
            _narrowed_windows(self.model, self.model.config, self.config),
            torch.autocast(self.device.type, enabled=False),
        ):
            try:
                expected = self.model(
                    input_ids=probe, attention_mask=mask, position_ids=positions, use_cache=False
                ).logits.float()  # [2, kept, vocab]: every position, or the last ones
            except Exception as error:  # a kernel the dtype lacks, say: one line, not a trace
                dtype = str(self.dtype).removeprefix("torch.")
                hint = (
                    "; if the dtype is the cause, try --dtype float32"
                    if self.dtype != torch.float32
                    else ""
                )
                if self._offloaded_tied_head():
                    hint = (
                        "; its LM head shares the input embeddings' weights but is offloaded "
                        "apart from them, which accelerate cannot load: keep lm_head and "
                        "embed_tokens on one device"
                    )
                raise UnsupportedModelError(
                    f"{owner}: its own forward fails in {dtype} ({one_line(error, 200)}){hint}"
                ) from None
            try:
                whole = self.unembed(
                    self.run_layers(self.embed(probe), 0, self.num_layers, None, positions, mask)
                ).float()
                stepped = self._stepped_logits(probe, positions, mask).float()
                columned = self._column_logits(probe, positions, mask).float()
            except Exception as error:
                raise UnsupportedModelError(
                    f"{owner}: the layer-wise forward fails ({one_line(error, 200)}); "
                    "this family needs an adapter"
                ) from None
        # A forward may keep the last positions' logits only (generate reads the last one):
        # those are compared.
        kept = expected.shape[1] if expected.dim() == 3 else 0
        if (
            expected.shape[0] != 2
            or not 1 <= kept <= length
            or expected.shape[-1] != whole.shape[-1]
        ):
            raise UnsupportedModelError(
                f"{owner}: its own forward returns logits of shape {list(expected.shape)} for "
                f"2 rows of {length} tokens, the layer-wise view {list(whole.shape)}; this "
                "family needs an adapter"
            )
        whole, stepped, columned = (view[:, length - kept :] for view in (whole, stepped, columned))
        real = real[:, length - kept :]
        masked = torch.isneginf(expected[real]).all(dim=0)  # [vocab]: ids never let win
        masked &= ~torch.isneginf(whole[real]).all(dim=0)  # unless the view masks them too
        if masked.any() and not masked.all():
            raise UnsupportedModelError(
                f"{owner}: its own forward sets the logits of {int(masked.sum())} token ids to "
                "-inf (a vocabulary mask outside its layers), which the layer-wise engine does "
                "not apply; this family needs an adapter"
            )
        # Some families' own forward gives a left-padded row NaN (Gemma 2's eager attention
        # over all-masked padding queries); the engine masks padding its own way, so only
        # the rows the model itself computes are compared.
        finite = torch.isfinite(expected).all(dim=-1)  # [2, kept]
        real &= (finite | ~real).all(dim=1, keepdim=True)  # whole rows out
        full_precision = self.dtype in (torch.float32, torch.float64)
        if not real.any():  # NaN weights, or a dtype the activations overflow
            dtype = str(self.dtype).removeprefix("torch.")
            hint = "; try --dtype float32" if not full_precision else ""
            raise UnsupportedModelError(
                f"{owner}: its own forward gives NaN or infinite logits in {dtype} "
                f"(broken weights or an overflowing dtype){hint}"
            )
        scale = max(expected[real].abs().max().item(), 1.0)
        for view, actual, tolerance in (
            ("whole", whole, 1e-3 if full_precision else 5e-2),
            # bfloat16 rounds a cached step's inputs otherwise than a whole pass's
            ("cached one-token", stepped, 1e-3 if full_precision else 1e-1),
            ("column-cache", columned, 1e-3 if full_precision else 1e-1),
        ):
            error = (expected[real] - actual[real]).abs().max().item() / scale
            if not error <= tolerance:
                window = getattr(self.config, "sliding_window", None)
                cause = "this family needs an adapter" + (
                    f" (or: its config sets sliding_window={window}, which transformers' cache "
                    "applies; if this family's attention has no window, remove it from "
                    "config.json)"
                    if window
                    else ""
                )
                raise UnsupportedModelError(
                    f"{owner}: the layer-wise {view} forward differs from the model's own "
                    f"forward (relative error {error:.2e}); {cause}"
                )

    def _stepped_logits(
        self, probe: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits [batch, length, vocab] of a prefill of the probe but its last
        ``_PROBE_STEPS`` tokens, then one token at a time through a cache, as decoding runs."""
        cache = self.new_cache()
        prefill = max(1, probe.shape[1] - _PROBE_STEPS)
        hidden = self.run_layers(
            self.embed(probe[:, :prefill]),
            0,
            self.num_layers,
            cache,
            positions[:, :prefill],
            mask[:, :prefill],
        )
        logits = [self.unembed(hidden)]
        for column in range(prefill, probe.shape[1]):
            hidden = self.run_layers(
                self.embed(probe[:, column : column + 1]),
                0,
                self.num_layers,
                cache,
                positions[:, column : column + 1],
                mask[:, : column + 1],
            )
            logits.append(self.unembed(hidden))
        return torch.cat(logits, dim=1)

    def _column_logits(
        self, probe: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits [batch, length, vocab] of the probe through the decoding engine's cache
        (``ColumnKVCache``), as self-speculation writes it: a prefill; a step of other
        tokens over the next columns, then dropped (rejected drafts, left stale in the
        cache); two tokens over the first of those columns, through layers [0, E) and
        then [E, L) (drafts, then verification), E the middle layer; one-token steps."""
        batch, length = probe.shape
        # Spare columns, as decoding has: a family that reads positions from the cache's
        # length (``get_seq_length``, the columns allocated) instead of ``position_ids``
        # sees other ones than its own forward and is refused.
        cache = ColumnKVCache(self.num_layers, batch, length + _PROBE_SPARE_COLUMNS)
        pad_counts = (mask == 0).sum(dim=-1)  # [batch]
        columns = torch.arange(length, device=probe.device).expand(batch, length)

        def run(first: int, tokens: torch.Tensor, split: int = 0) -> torch.Tensor:
            cache.write_columns = columns[:, first : first + tokens.shape[1]]
            at = positions[:, first : first + tokens.shape[1]]
            hidden = self.run_layers(self.embed(tokens), 0, split, cache, at, pad_counts)
            hidden = self.run_layers(hidden, split, self.num_layers, cache, at, pad_counts)
            return self.unembed(hidden)

        prefill = max(1, length - _PROBE_STEPS)
        logits = [run(0, probe[:, :prefill])]
        if prefill < length:
            run(prefill, (probe[:, prefill:] + 1) % self.embed_tokens.weight.shape[0])
            pair = probe[:, prefill : prefill + 2]
            logits.append(run(prefill, pair, split=self.num_layers // 2))
        for column in range(prefill + 2, length):
            logits.append(run(column, probe[:, column : column + 1]))
        cache.write_columns = None
        return torch.cat(logits, dim=1)


# The attention implementations whose masks the engine builds (eager adds its mask to the
# scores; sdpa takes a boolean one); flash attention, flex attention or paged attention
# take masks of other forms.
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
_PROBE_LENGTH = 12  # tokens per probe row
_PROBE_PADDING = 3  # left padding of the second row
_PROBE_STEPS = 4  # one-token steps after the prefill
_PROBE_SPARE_COLUMNS = 5  # cache columns past the probe's last token
_PROBE_WINDOW = 4  # the shortest window during the probe; all stay shorter than the probe
# Config lengths past which a family attends otherwise (Doge keeps its top
# keep_window_size keys; Llama 4's NoPE layers scale their queries from floor_scale
# positions on, positions it takes from the cache's length); the probe narrows each so
# that it sees that regime.
_WINDOW_SETTINGS = ("sliding_window", "keep_window_size", "floor_scale")


@contextmanager
def _narrowed_windows(model: nn.Module, *configs: PretrainedConfig | None) -> Iterator[None]:
    """Within the block, the ``_WINDOW_SETTINGS`` of every config, and of every module of
    ``model`` that copied one at init, are short enough for the probe to pass them (the
    model's own forward and the layer-wise view both read them per call).

    Settings keep their order: the i-th smallest distinct value becomes at most
    ``_PROBE_WINDOW + 2 i``. Narrowing all of them to one length would hide one behind
    another (Doge's top keep_window_size keys inside a longer sliding window: with both at
    4 the window leaves nothing for the top-k to drop).
    """
    with changing_settings(model):
        yield from _narrowing(model, configs)


def _narrowing(model: nn.Module, configs: tuple[PretrainedConfig | None, ...]) -> Iterator[None]:
    found = []
    holders = [*configs, *model.modules()]
    for holder in {id(c): c for c in holders if c is not None}.values():
        for name in _WINDOW_SETTINGS:
            window = getattr(holder, name, None)
            if isinstance(window, int) and not isinstance(window, bool):
                found.append((holder, name, window))
    lengths = sorted({window for _, _, window in found})
    narrowed = {
        window: min(window, _PROBE_WINDOW + 2 * rank) for rank, window in enumerate(lengths)
    }
    saved = []
    for holder, name, window in found:
        if narrowed[window] < window:
            saved.append((holder, name, window))
            setattr(holder, name, narrowed[window])
    try:
        yield
    finally:
        for holder, name, window in saved:
            setattr(holder, name, window)


def _tree_visibility(
    tree: TreeColumns, slots: torch.Tensor, pad_counts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the tokens of a token-tree call see (``trees``): the columns before the root,
    and their own ancestors among the tree's columns.

    Returns:
        visible [batch, 1, new, capacity]; each query's chain column (the column it would
        have in a chain: root + depth) [batch, 1, new, 1]; each slot's chain column
        [batch, 1, 1, capacity] (sliding windows count in those).
    """
    base = tree.base[:, None]  # [batch, 1]
    offsets = slots - base  # [batch, capacity]
    nodes = tree.node_depths.shape[0]
    in_tree = (offsets >= 0) & (offsets < nodes)
    node = offsets.clamp(0, nodes - 1)  # [batch, capacity]
    sees_node = tree.ancestors[:, node].permute(1, 0, 2)  # [batch, new, capacity]
    before = slots < base  # [batch, capacity]
    if pad_counts is not None:
        before = before & (slots >= pad_counts[:, None])
    visible = torch.where(in_tree[:, None], sees_node, before[:, None])[:, None]
    query_columns = (base + tree.query_depths)[:, None, :, None]  # [batch, 1, new, 1]
    slot_columns = torch.where(in_tree, base + tree.node_depths[node], slots)[:, None, None]
    return visible, query_columns, slot_columns
