"""train.py on Phi-4-multimodal (Phi4MultimodalForCausalLM, which AutoModelForCausalLM loads
and the engine decodes): its image and audio encoders sit inside the decoder, under
``model.embed_tokens_extend``, so the freeze of what lies outside the decoder left them
trainable. Text gives them no gradient and the optimizer no state for them: a resume
failed, "checkpoint ... is damaged or incomplete (Missing key ... embed_tokens_extend...)"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_tokenizer, write_python_corpus
from transformers import AutoConfig, AutoModelForCausalLM

_TEXT = dict(
    vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    original_max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, pad_token_id=2,
)  # fmt: skip
_ENCODERS = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_blocks=1, depthwise_seperable_out_channel=32, ext_pw_out_channel=32,
    nemo_conv_channels=32, num_key_value_heads=2, image_size=28, patch_size=14, crop_size=28,
)  # fmt: skip


def save_tiny_phi4_multimodal(directory: Path) -> Path:
    config = AutoConfig.for_model("phi4_multimodal")
    for name, value in _TEXT.items():
        setattr(config, name, value)
    config.rope_parameters = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 1.0,
    }
    for encoder in (config.vision_config, config.audio_config):
        for name, value in _ENCODERS.items():
            if hasattr(encoder, name):
                setattr(encoder, name, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    make_tiny_tokenizer().save_pretrained(directory)
    return directory


def test_train_continues_and_resumes_phi4_multimodal(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    import train
    from self_speculation import load_model_and_tokenizer

    base_dir = save_tiny_phi4_multimodal(tmp_path / "base")
    corpus = write_python_corpus(tmp_path / "corpus")
    arguments = ["--model", str(base_dir), "--data", f"{corpus}/*.py", "--seq_len", "32"]
    arguments += ["--batch_size", "2", "--max_tokens", "192", "--bf16", "False"]
    arguments += ["--warmup_steps", "1", "--num_threads", "1"]
    arguments += ["--output_dir", str(tmp_path / "run")]
    assert train.main([*arguments, "--stop_after_steps", "1"]) == 0
    assert train.main([*arguments, "--resume", "True"]) == 0
    assert "resumed at step 1" in caplog.text
    model, _ = load_model_and_tokenizer(str(tmp_path / "run"))
    base, _ = load_model_and_tokenizer(str(base_dir))
    encoders = [name for name, _ in base.named_parameters() if "embed_tokens_extend" in name]
    assert encoders
    for name in encoders:  # bf16 export of fp32 weights: equal to bf16 rounding
        torch.testing.assert_close(
            model.get_parameter(name).float(),
            base.get_parameter(name).to(torch.bfloat16).float(),
        )
    # The text decoder trained.
    assert not torch.equal(
        model.model.layers[0].mlp.down_proj.weight.float(),
        base.model.layers[0].mlp.down_proj.weight.to(torch.bfloat16).float(),
    )
