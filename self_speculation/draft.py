"""Draft exits for models never trained with LayerSkip.

Two optional parts change how drafts are made, never how they are verified (the full model
still verifies every token, so greedy outputs stay identical to autoregressive decoding and
sampling keeps the full model's distribution):

* an **exit adapter** (Kangaroo, Liu et al. 2024): one small trained decoder block of the
  model's own family between layer E's output and the shared final norm + LM head. Layer
  E's own hidden states still go on to verification; only the draft logits pass through
  the adapter. Its attention keeps its keys and values in the KV cache's layer L (one past
  the model's layers), written for every column that reaches layer E (prompt, drafts, the
  last draft during verification), so rolling back is as free as for the other layers.
* a **reduced draft vocabulary** (FR-Spec, Zhao et al. 2025): the draft head scores only N
  frequent tokens (rows of the model's own LM head); every other token gets probability 0
  in the draft. Verification uses the full head.

An adapter is saved as a folder: ``adapter_config.json`` (exit layer, base model, the layer
it was initialised from, training record) and ``adapter.safetensors`` (the block's weights
and the ranked draft vocabulary, most frequent first).
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from self_speculation.config import GenerationConfig
from self_speculation.errors import ConfigError, ModelLoadError, whole_number
from self_speculation.kv_cache import ColumnKVCache
from self_speculation.model_surgery import LayerwiseModel, is_capture_hook
from self_speculation.output_safety import readable_by_others

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
_VOCAB_KEY = "draft_vocab"  # ranked token ids in the weights file
_BLOCK_PREFIX = "block."


@dataclass
class AdapterConfig:
    """What an adapter folder's ``adapter_config.json`` holds.

    Attributes:
        exit_layer: E; the adapter reads the hidden states leaving layer E - 1.
        num_layers: decoder layers of the base model (checked when loading).
        hidden_size: the base model's hidden size (checked when loading).
        init_layer: the base layer whose structure (and initial weights) the block copies.
        base_model: how the base model was named when training (informational).
        draft_vocab_size: tokens in the ranked vocabulary saved with it (0: none).
        trained_draft_vocab_size: the N it was trained for (0: the whole vocabulary); the
            default N when it is loaded.
        num_speculations: the k that measured fastest with it (None: not measured).
        training: the training record (data, tokens, time, agreement before / after).
        model_type: the base model's ``config.model_type`` (checked when loading; "":
            an adapter saved before it was recorded).
        vocab_size: the base model's vocabulary (rows of its head; checked when loading;
            0: not recorded).
    """

    exit_layer: int
    num_layers: int
    hidden_size: int
    init_layer: int
    base_model: str = ""
    draft_vocab_size: int = 0
    trained_draft_vocab_size: int = 0
    num_speculations: int | None = None
    training: dict = field(default_factory=dict)
    model_type: str = ""
    vocab_size: int = 0


class ExitAdapter(nn.Module):
    """A decoder block of the model's own family mapping layer E's output to the head's input.

    Args:
        model: the base model's layer-wise view (only its structure is copied).
        exit_layer: E, 1 <= E < L.
        init_layer: which base layer to copy (structure and starting weights); default
            the last one, which already maps into the space the final norm + head read.
    """

    def __init__(self, model: LayerwiseModel, exit_layer: int, init_layer: int | None = None):
        super().__init__()
        num_layers = model.num_layers
        if not 1 <= exit_layer < num_layers:
            raise ConfigError(
                f"an exit adapter's exit layer must be in [1, {num_layers - 1}], got {exit_layer}"
            )
        init_layer = num_layers - 1 if init_layer is None else init_layer
        if not 0 <= init_layer < num_layers:
            raise ConfigError(f"init_layer must be in [0, {num_layers - 1}], got {init_layer}")
        if any(parameter.is_meta for parameter in model.layers[init_layer].parameters()):
            # A copy would hold no weights (loading into it is a no-op, moving it fails)
            # and would carry the hook that loads the base layer's weights at each call.
            raise ConfigError(
                f"layer {init_layer}, which the exit adapter copies, is offloaded (accelerate "
                "device_map or cpu_offload): keep it on a device or pick another init_layer"
            )
        self.exit_layer = exit_layer
        self.init_layer = init_layer
        # What it was built for, recorded with it (save_adapter) and checked when loaded.
        self.model_type = model.config.model_type
        self.vocab_size = model.lm_head.weight.shape[0]
        self.layer_type = model.layer_types[init_layer]
        layer = model.layers[init_layer]
        # The copy shares the model's config (deepcopy's memo: copied as itself), so that
        # its attention runs the implementation the model selects now, the one the engine
        # builds masks for (an eager copy adds a boolean sdpa mask to its scores: no mask).
        shared = {
            id(module.config): module.config
            for module in layer.modules()
            if isinstance(getattr(module, "config", None), PretrainedConfig)
        }
        self.block = copy.deepcopy(layer, memo=shared)
        # Nor transformers' output-capturing hooks, copied with the layer when a forward with
        # output_hidden_states came before: the adapter never runs in such a forward, and
        # dynamo cannot trace them (its compiled passes failed, decoding turned eager).
        for module in self.block.modules():
            hooks = module._forward_hooks
            for key in [key for key, hook in hooks.items() if is_capture_hook(hook)]:
                del hooks[key]
        attention = getattr(self.block, "self_attn", None)
        if attention is None or not hasattr(attention, "layer_idx"):
            raise ConfigError(
                f"{type(self.block).__name__} has no self_attn.layer_idx; exit adapters need "
                "a decoder layer whose attention addresses the KV cache by layer index"
            )
        attention.layer_idx = num_layers  # its own slot in the KV cache
        self.cache_index = num_layers
        for parameter in self.block.parameters():
            parameter.requires_grad_(True)

    def forward(
        self,
        model: LayerwiseModel,
        hidden: torch.Tensor,
        cache: ColumnKVCache | None,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layer E's states [batch, seq, hidden] -> the head's input [batch, seq, hidden]."""
        return model.run_block(
            self.block, self.layer_type, hidden, cache, position_ids, padding_mask
        )


def _hook_loaded(module: nn.Module) -> contextlib.AbstractContextManager:
    """``module`` with the weights its accelerate hook loads at each call (an offloaded
    module's are meta outside its calls); as it is without a hook. accelerate is imported
    only then: it is an optional dependency (the ``scripts`` extra), not the package's."""
    if not hasattr(module, "_hf_hook"):
        return contextlib.nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module)


def _address(tensor: torch.Tensor) -> int | None:
    """``tensor``'s data address (``weight.data = ...`` keeps the parameter); None for a
    tensor subclass without storage of its own (torchao's quantized weights)."""
    try:
        return tensor.data_ptr()
    except RuntimeError:
        return None


def _version(tensor: torch.Tensor) -> object:
    """``tensor``'s in-place version; for an inference tensor (made inside
    ``torch.inference_mode``), which keeps none, a new object each time: unequal to any
    earlier one, so that its rows are copied at each generation (a change cannot be told)."""
    try:
        return tensor._version
    except RuntimeError:
        return object()


def _fits(copy: torch.Tensor | None, rows: torch.Tensor | None) -> bool:
    """Whether ``rows`` can be written into ``copy`` (both None, or alike tensors)."""
    if copy is None or rows is None:
        return copy is None and rows is None
    return (copy.shape, copy.dtype, copy.device) == (rows.shape, rows.dtype, rows.device)


class DraftExit:
    """How drafts leave the model at layer E: an optional adapter, an optional vocabulary.

    Args:
        model: the base model's layer-wise view.
        adapter: an exit adapter (None: layer E's states go straight to the head).
        vocab: the draft vocabulary's token ids [N] (None: the whole vocabulary).
    """

    def __init__(
        self,
        model: LayerwiseModel,
        adapter: ExitAdapter | None = None,
        vocab: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        if vocab is not None:
            size = model.lm_head.weight.shape[0]
            if not isinstance(vocab, torch.Tensor) or vocab.dim() != 1 or len(vocab) == 0:
                raise ConfigError("a draft vocabulary must be a non-empty 1-D tensor of token ids")
            if vocab.is_floating_point() or vocab.dtype == torch.bool:
                raise ConfigError(f"a draft vocabulary holds token ids, not {vocab.dtype} values")
            if int(vocab.min()) < 0 or int(vocab.max()) >= size:
                raise ConfigError(
                    f"the draft vocabulary holds token ids outside this model's vocabulary (0..{size - 1})"
                )
        if adapter is not None:
            if not isinstance(adapter, ExitAdapter):
                raise ConfigError(f"adapter must be an ExitAdapter, got {type(adapter).__name__}")
            if (
                adapter.cache_index != model.num_layers
                or not 1 <= adapter.exit_layer < model.num_layers
            ):
                raise ConfigError(
                    f"the exit adapter was built for a model of {adapter.cache_index} layers; "
                    f"this one has {model.num_layers}"
                )
            layer = model.layers[adapter.init_layer]
            allowed = {(model.dtype, torch.device(model.device))} | {
                (p.dtype, p.device) for p in layer.parameters()
            }
            wrong = {(p.dtype, p.device) for p in adapter.parameters()} - allowed
            if wrong:
                dtype, device = wrong.pop()
                raise ConfigError(
                    f"the exit adapter's weights are {dtype} on {device}; the model's are "
                    f"{model.dtype} on {model.device} (move it with adapter.to(...))"
                )
        self.vocab = None if vocab is None else vocab.to(model.device, torch.long)
        # The k recommended with the adapter (its config's num_speculations), if any.
        self.num_speculations: int | None = None
        self._head_weight = None
        self._head_bias = None
        self._copied_head: tuple | None = None  # _head_state() of the rows copied
        self._copy_head_rows()

    def _head_state(self) -> tuple | None:
        """Which head weights the rows would be copied from now: each tensor and its
        in-place version (``load_state_dict`` and optimizer steps write weights in place;
        inference tensors keep none: ``_version``); None for an offloaded head (meta
        weights between calls, new ones at each)."""
        head = self.model.lm_head
        tensors = (head.weight, getattr(head, "bias", None))
        if head.weight.is_meta:
            return None
        return tuple(
            None if tensor is None else (id(tensor), _address(tensor), _version(tensor))
            for tensor in tensors
        )

    def follow_head(self) -> None:
        """Copy the head's rows again when its weights changed since they were copied (a
        checkpoint loaded into the model, a training step): drafts from the old rows
        accepted less, and sampled other text for a seed than a new DraftExit. In place,
        where compiled passes (CUDA graphs) read the copy at its address."""
        if self.vocab is None:
            return
        state = self._head_state()
        if state is not None and state != self._copied_head:
            self._copy_head_rows(in_place=True)

    def _copy_head_rows(self, in_place: bool = False) -> None:
        """A contiguous copy of the draft vocabulary's N head rows: one dense product per
        draft (none without a draft vocabulary); with ``in_place``, into the copy there is
        where it fits."""
        if self.vocab is None:
            return
        head = self.model.lm_head
        # An offloaded head (accelerate device_map) holds meta weights outside its calls:
        # its hook loads them for the copy.
        with _hook_loaded(head):
            if head.weight.is_meta:
                raise ConfigError(
                    "a reduced draft vocabulary copies rows of the LM head, whose weights are "
                    "offloaded with nothing to load them here: keep lm_head on a device"
                )
            weight = head.weight.detach()  # [vocab, hidden]
            if type(weight) is not torch.Tensor and hasattr(weight, "dequantize"):
                # A quantized weight (torchao's tensor subclasses) may not take row
                # indexing: its rows are copied in the model's dtype.
                weight = weight.dequantize().to(self.model.dtype)
            bias = getattr(head, "bias", None)
            rows = weight[self.vocab]  # [N, hidden]
            bias_rows = None if bias is None else bias.detach()[self.vocab]  # [N]
            if in_place and _fits(self._head_weight, rows) and _fits(self._head_bias, bias_rows):
                # An inference tensor (copied inside torch.inference_mode) is written in it.
                with torch.inference_mode(self._head_weight.is_inference()):
                    self._head_weight.copy_(rows)
                    if bias_rows is not None:
                        self._head_bias.copy_(bias_rows)
            else:
                self._head_weight, self._head_bias = rows.contiguous(), bias_rows
        self._copied_head = self._head_state()

    def follow_model(self) -> None:
        """After the model moved to another dtype or device (``model.to(...)``): move the
        adapter and the draft vocabulary with it and copy the head's rows again, which
        were the model's old weights (a float32 adapter or head copy beside a bfloat16
        model fails in the middle of a generation)."""
        model = self.model
        if self.adapter is not None:
            self.adapter.to(device=model.device, dtype=model.dtype)
        if self.vocab is not None:
            self.vocab = self.vocab.to(model.device)
        self._copy_head_rows()

    @property
    def exit_layer(self) -> int | None:
        """The exit layer the adapter was trained for (None: any)."""
        return None if self.adapter is None else self.adapter.exit_layer

    @property
    def extra_cache_layers(self) -> int:
        """KV-cache layers needed past the model's own (the adapter's attention)."""
        return 0 if self.adapter is None else 1

    def adapt(
        self,
        hidden: torch.Tensor,
        cache: ColumnKVCache | None,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layer E's states through the adapter (unchanged without one)."""
        if self.adapter is None:
            return hidden
        return self.adapter(self.model, hidden, cache, position_ids, padding_mask)

    @property
    def vocab_size(self) -> int:
        """The model's full vocabulary size (rows of its LM head)."""
        return self.model.lm_head.weight.shape[0]

    def small_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Head input [..., hidden] -> logits over the draft vocabulary only [..., N]
        (the whole vocabulary without one), with the family's own norm and scaling."""
        if self.vocab is None:
            return self.model.unembed(hidden)
        normed = self.model.norm(hidden)
        small = torch.nn.functional.linear(normed, self._head_weight, self._head_bias)
        return self.model.scale_logits(small)  # [..., N]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Head input [..., hidden] -> draft logits [..., vocab]: -inf outside the draft
        vocabulary (probability 0 there)."""
        small = self.small_logits(hidden)
        if self.vocab is None:
            return small
        full = small.new_full((*small.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy(-1, self.vocab, small)

    def full_to_draft(self) -> torch.Tensor:
        """Each full-vocabulary id's index in the draft vocabulary, -1 outside it, [vocab]."""
        if self.vocab is None:
            return torch.arange(self.vocab_size, device=self.model.device)
        mapping = torch.full((self.vocab_size,), -1, dtype=torch.long, device=self.model.device)
        mapping[self.vocab] = torch.arange(len(self.vocab), device=self.model.device)
        return mapping

    def draft_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices into the draft vocabulary -> full-vocabulary token ids."""
        return indices if self.vocab is None else self.vocab[indices]

    def logits(
        self,
        hidden: torch.Tensor,
        cache: ColumnKVCache | None,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draft logits from layer E's states."""
        return self.head(self.adapt(hidden, cache, position_ids, padding_mask))


def resolve_with_adapter(
    config: GenerationConfig,
    num_layers: int,
    recommended_exit_layer: int | None,
    recommended_num_speculations: int | None,
    adapter_exit_layer: int | None,
    adapter_num_speculations: int | None,
) -> GenerationConfig:
    """``config.resolved`` where an adapter's exit layer and k come before the model's
    recommendations.

    Raises:
        ConfigError: as ``GenerationConfig.resolved``; also an exit layer below L other than
            the one the adapter was trained for.
    """
    resolved = config.resolved(
        num_layers,
        adapter_exit_layer or recommended_exit_layer,
        adapter_num_speculations or recommended_num_speculations,
    )
    early = resolved.exit_layer < num_layers
    if adapter_exit_layer is not None and early and resolved.exit_layer != adapter_exit_layer:
        raise ConfigError(
            f"the draft adapter was trained for exit layer {adapter_exit_layer}; got "
            f"--exit_layer {resolved.exit_layer} (leave it unset or give {adapter_exit_layer})"
        )
    return resolved


def save_adapter(
    path: str | Path, adapter: ExitAdapter, config: AdapterConfig, vocab: torch.Tensor | None
) -> None:
    """Write an adapter folder: the block's weights in bfloat16, the ranked vocabulary."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        _BLOCK_PREFIX + name: tensor.detach().to(torch.bfloat16).contiguous().cpu()
        for name, tensor in adapter.block.state_dict().items()
    }
    if vocab is not None:
        tensors[_VOCAB_KEY] = vocab.detach().to(torch.int64).cpu().contiguous()
    config.draft_vocab_size = 0 if vocab is None else len(vocab)
    config.model_type, config.vocab_size = adapter.model_type, adapter.vocab_size
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_NAME))
    readable_by_others(folder / ADAPTER_WEIGHTS_NAME)
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2) + "\n")


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """The ``adapter_config.json`` of an adapter folder.

    Raises:
        ConfigError: not an adapter folder, or a malformed config.
    """
    folder = Path(path)
    config_file = folder / ADAPTER_CONFIG_NAME
    if not folder.is_dir() or not config_file.is_file():
        raise ConfigError(
            f"--draft_adapter: {path} is not an adapter folder (no {ADAPTER_CONFIG_NAME})"
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        config = AdapterConfig(**raw)
    except (ValueError, TypeError, RecursionError) as error:  # not JSON / UTF-8, wrong keys
        reason = "JSON nested too deeply" if isinstance(error, RecursionError) else error
        raise ConfigError(f"--draft_adapter: {config_file} is malformed ({reason})") from None
    if config.num_speculations is not None and not whole_number(config.num_speculations, 1):
        # JSON's true is not 1: it passed here and failed at the first generation as an
        # int setting the user never gave ("num_speculations must be an int, got bool").
        raise ConfigError(
            f"--draft_adapter: {config_file}: 'num_speculations' must be a whole number >= 1 "
            f"(or null), got {config.num_speculations!r}"
        )
    names = ("exit_layer", "num_layers", "hidden_size", "init_layer", "draft_vocab_size")
    for name in (*names, "trained_draft_vocab_size", "vocab_size"):
        value = getattr(config, name)
        if not whole_number(value):
            raise ConfigError(f"--draft_adapter: {config_file}: '{name}' must be an integer >= 0")
    if not isinstance(config.model_type, str):
        raise ConfigError(f"--draft_adapter: {config_file}: 'model_type' must be a string")
    return config


def load_draft_exit(
    model: LayerwiseModel,
    adapter_path: str | Path | None = None,
    draft_vocab_size: int = -1,
    vocab: torch.Tensor | None = None,
) -> DraftExit | None:
    """The draft exit named by the command-line flags (None when neither is given).

    Args:
        adapter_path: an adapter folder (``--draft_adapter``).
        draft_vocab_size: N, keep the N most frequent tokens (``--draft_vocab_size``; 0:
            the whole vocabulary; -1: the N the adapter was trained for, else 0). The ranking comes from ``vocab`` or else the adapter.
        vocab: a ranked vocabulary (most frequent first), e.g. counted over a corpus.

    Raises:
        ConfigError / ModelLoadError: the adapter does not fit this model, or N has no
            ranking to come from.
    """
    adapter = None
    saved_vocab = None
    if adapter_path is not None:
        config = read_adapter_config(adapter_path)
        if (config.num_layers, config.hidden_size) != (model.num_layers, model.config.hidden_size):
            raise ConfigError(
                f"--draft_adapter: {adapter_path} was trained for a model with "
                f"{config.num_layers} layers of width {config.hidden_size}; this one has "
                f"{model.num_layers} of width {model.config.hidden_size}"
            )
        built_for = {
            "a model of type": (config.model_type, model.config.model_type),
            "a vocabulary of": (config.vocab_size, model.lm_head.weight.shape[0]),
        }
        for what, (saved, ours) in built_for.items():
            if saved and saved != ours:  # "" / 0: an adapter saved before they were recorded
                raise ConfigError(
                    f"--draft_adapter: {adapter_path} was trained for {what} {saved}; this "
                    f"model has {ours}"
                )
        if not 1 <= config.exit_layer < model.num_layers or config.init_layer >= model.num_layers:
            raise ConfigError(f"--draft_adapter: {adapter_path}: exit or init layer out of range")
        adapter = ExitAdapter(model, config.exit_layer, config.init_layer)
        weights_file = Path(adapter_path) / ADAPTER_WEIGHTS_NAME
        try:
            tensors = load_file(str(weights_file))
        except (OSError, SafetensorError) as error:
            raise ModelLoadError(f"--draft_adapter: cannot read {weights_file} ({error})") from None
        saved_vocab = tensors.pop(_VOCAB_KEY, None)
        if saved_vocab is not None and (
            saved_vocab.dim() != 1
            or saved_vocab.is_floating_point()
            or saved_vocab.dtype == torch.bool
            or len(saved_vocab.unique()) != len(saved_vocab)
        ):
            raise ConfigError(
                f"--draft_adapter: {weights_file}: '{_VOCAB_KEY}' must be a 1-D list of distinct "
                "integer token ids"
            )
        state = {
            name[len(_BLOCK_PREFIX) :]: tensor
            for name, tensor in tensors.items()
            if name.startswith(_BLOCK_PREFIX)
        }
        expected = adapter.block.state_dict()
        if set(state) != set(expected) or any(
            state[name].shape != expected[name].shape for name in expected
        ):
            raise ConfigError(
                f"--draft_adapter: {weights_file} does not hold a "
                f"{type(adapter.block).__name__} of this model's sizes"
            )
        adapter.block.load_state_dict({name: t.to(model.dtype) for name, t in state.items()})
        adapter.to(model.device)
        adapter.requires_grad_(False)
        adapter.eval()
    if draft_vocab_size == -1:
        draft_vocab_size = config.trained_draft_vocab_size if adapter is not None else 0
    if draft_vocab_size < 0:
        raise ConfigError(f"--draft_vocab_size must be >= 0 (or -1), got {draft_vocab_size}")
    ranked = vocab if vocab is not None else saved_vocab
    chosen = None
    if draft_vocab_size > 0:
        if ranked is None:
            raise ConfigError(
                "--draft_vocab_size needs a token ranking: an adapter saved with one "
                "(--draft_adapter) or a corpus (--draft_vocab_corpus)"
            )
        if draft_vocab_size > len(ranked):
            raise ConfigError(
                f"--draft_vocab_size {draft_vocab_size} is more than the {len(ranked)} ranked "
                "tokens available"
            )
        # ascending ids: the head's rows in memory order (DraftExit checks their range)
        chosen = ranked[:draft_vocab_size].to(torch.long).sort().values
    if adapter is None and chosen is None:
        return None
    draft = DraftExit(model, adapter, chosen)
    if adapter_path is not None:
        draft.num_speculations = config.num_speculations
    return draft


def saved_ranking(path: str | Path) -> torch.Tensor | None:
    """The ranked draft vocabulary saved in an adapter folder (None when it has none)."""
    try:
        return load_file(str(Path(path) / ADAPTER_WEIGHTS_NAME)).get(_VOCAB_KEY)
    except (OSError, SafetensorError) as error:
        raise ModelLoadError(f"cannot read the adapter in {path} ({error})") from None


def rank_tokens(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids ranked by frequency in ``token_ids`` (most frequent first; ties by id);
    tokens never seen follow, by id."""
    counts = torch.bincount(token_ids.flatten().to(torch.long), minlength=vocab_size)
    # A stable sort of -counts keeps ids ascending among equal counts.
    return torch.sort(-counts[:vocab_size], stable=True).indices


def cache_layers(model: LayerwiseModel, draft: DraftExit | None) -> int:
    """KV-cache layers a generation needs with ``draft``."""
    return model.num_layers + (0 if draft is None else draft.extra_cache_layers)
