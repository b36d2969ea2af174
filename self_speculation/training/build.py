"""What ``train.py`` trains on and what it trains: the texts and the model + tokenizer.

A run either resumes (the architecture from the checkpoint, the tokenizer from
``output_dir/tokenizer``), continues an existing model (``--model``: hub id, local directory
or ``smollm2``), or starts from scratch (``--preset`` / ``--config_file``; a byte-level BPE
tokenizer is trained on the data by rank 0). The model is built in fp32 on the CPU; the
distributed setup moves or shards it afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from self_speculation.distributed import DistributedContext, barrier
from self_speculation.errors import ConfigError, one_line, save_tokenizer
from self_speculation.loading import auto_model_class, load_model_and_tokenizer
from self_speculation.model_surgery import find_base_model
from self_speculation.training.checkpointing import CHECKPOINT_DIR, damaged
from self_speculation.training.config import DataArguments, TrainConfig
from self_speculation.training.data import hub_texts, read_texts, resolve_files, train_tokenizer
from self_speculation.training.presets import architecture_config

logger = logging.getLogger("train")

TOKENIZER_DIR = "tokenizer"


def load_texts(data: DataArguments) -> list[str]:
    """Every training document of ``data`` (files, then the hub dataset)."""
    texts: list[str] = []
    if data.data:
        files = resolve_files(data.data, data.exclude)
        logger.info("reading %d files", len(files))
        texts.extend(read_texts(files, data.text_field))
    if data.dataset:
        texts.extend(
            hub_texts(data.dataset, data.dataset_config, data.dataset_split, data.text_field)
        )
    if not texts:
        raise ConfigError("the training data is empty")
    return texts


def build_model_and_tokenizer(
    config: TrainConfig, texts: list[str], distributed: DistributedContext
) -> tuple[nn.Module, Any]:
    """The fp32 model and tokenizer to train: resumed, continued from --model, or new.

    A new run trains its tokenizer on ``texts`` (rank 0; the others load it) and saves it
    under output_dir/tokenizer, where a resumed run finds it again.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import GENERATION_CONFIG_NAME

    output_dir = Path(config.training.output_dir)
    torch.manual_seed(config.training.seed)
    if config.training.resume:
        try:
            tokenizer = AutoTokenizer.from_pretrained(output_dir / TOKENIZER_DIR)
        except Exception as error:  # a missing folder reads as a bad hub id
            raise ConfigError(
                f"the run's tokenizer in {output_dir / TOKENIZER_DIR} is missing or damaged "
                f"({one_line(error)})"
            ) from None
        try:
            architecture = AutoConfig.from_pretrained(output_dir / CHECKPOINT_DIR)
        except Exception as error:
            raise damaged(output_dir / CHECKPOINT_DIR, error) from None
        model = auto_model_class(architecture).from_config(architecture, dtype=torch.float32)
        if (output_dir / TOKENIZER_DIR / GENERATION_CONFIG_NAME).is_file():  # a continued model's
            model.generation_config = GenerationConfig.from_pretrained(output_dir / TOKENIZER_DIR)
    elif config.model.model:
        # Weights in fp32 for training, whatever they were saved in.
        model, tokenizer = load_model_and_tokenizer(
            config.model.model, dtype="float32", device="cpu"
        )
        if distributed.is_main:
            save_tokenizer(tokenizer, output_dir / TOKENIZER_DIR)
            if not getattr(model.generation_config, "_from_model_config", True):
                # Its own stop ids and settings, for the export (a resume reads them here).
                model.generation_config.save_pretrained(output_dir / TOKENIZER_DIR)
    else:
        if distributed.is_main:
            logger.info("training a %d-token byte-level BPE tokenizer", config.model.vocab_size)
            tokenizer = train_tokenizer(texts, config.model.vocab_size)
            save_tokenizer(tokenizer, output_dir / TOKENIZER_DIR)
        barrier(distributed)
        tokenizer = AutoTokenizer.from_pretrained(output_dir / TOKENIZER_DIR)
        architecture = architecture_config(
            config.model.preset,
            config.model.config_file,
            vocab_size=len(tokenizer),
            max_position_embeddings=config.model.seq_len,
            special_token_ids=dict(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
        )
        try:
            model = AutoModelForCausalLM.from_config(architecture, dtype=torch.float32)
        except Exception as error:  # an activation, rope type or field value it refuses
            source = (
                f"--config_file {config.model.config_file}"
                if config.model.config_file
                else f"--preset {config.model.preset}"
            )
            raise ConfigError(
                f"{source}: transformers cannot build a causal LM from it ({one_line(error)})"
            ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    freeze_outside_text_decoder(model)
    return model.train(), tokenizer


def freeze_outside_text_decoder(model: nn.Module) -> None:
    """A multimodal model's vision tower and projector, also where its decoder holds them
    (Phi-4-multimodal's ``embed_tokens_extend``): frozen. Text training gives them no
    gradient, so the optimizer kept no state for them, and a resume failed to load the
    state the checkpoint lacked; their weights are exported as loaded. What is trained is
    what the layer-wise engine runs: embedding, decoder layers, final norm and LM head (all
    of a text-only causal LM)."""
    base = find_base_model(model)
    parts = [getattr(base, name, None) for name in ("embed_tokens", "layers", "norm")]
    parts.append(model.get_output_embeddings())
    trained = {
        id(parameter)
        for part in parts
        if isinstance(part, nn.Module)
        for parameter in part.parameters()
    }
    frozen = [p for p in model.parameters() if id(p) not in trained and p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    if frozen:
        logger.info(
            "%d parameters outside the text decoder and LM head (a vision tower...) are frozen",
            sum(parameter.numel() for parameter in frozen),
        )
