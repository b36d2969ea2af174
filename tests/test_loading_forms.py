"""Checkpoints in the forms users have on disk: custom code, GGUF files missing a tensor,
chat templates that fail, malformed eos ids, folders without a tokenizer, PEFT adapters."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_model

from self_speculation import GenerationConfig, Generator, LayerSkipError, load_model_and_tokenizer
from self_speculation.errors import ConfigError, ModelLoadError


def _custom_code_model(directory: Path) -> Path:
    save_tiny_model(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(
        model_type="mymodel",
        architectures=["MyForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_my.MyConfig",
            "AutoModelForCausalLM": "modeling_my.MyForCausalLM",
        },
    )
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "configuration_my.py").write_text(
        "from transformers import LlamaConfig\n"
        "class MyConfig(LlamaConfig):\n    model_type = 'mymodel'\n"
    )
    (directory / "modeling_my.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_my import MyConfig\n"
        "class MyForCausalLM(LlamaForCausalLM):\n    config_class = MyConfig\n"
    )
    return directory


def test_custom_code_loads_with_trust_remote_code_and_is_refused_without(tmp_path: Path) -> None:
    directory = _custom_code_model(tmp_path / "custom")
    with pytest.raises(ModelLoadError, match="trust_remote_code=true"):
        load_model_and_tokenizer(str(directory))  # one line, no y/N question on the terminal
    model, tokenizer = load_model_and_tokenizer(
        str(directory), model_args={"trust_remote_code": True}
    )
    assert type(model).__name__ == "MyForCausalLM"
    generator = Generator(model, tokenizer)
    plain = GenerationConfig(sample=False, max_steps=12)
    drafted = GenerationConfig(
        generation_strategy="self_speculative", sample=False, max_steps=12,
        exit_layer=2, num_speculations=3,
    )  # fmt: skip
    assert (
        generator.generate("def", drafted).token_ids == generator.generate("def", plain).token_ids
    )


def _write_gguf(source: Path, path: Path, drop: str | None = None) -> None:
    """The tiny Llama of ``source`` as an F32 GGUF file, without tensor ``drop``."""
    gguf = pytest.importorskip("gguf")
    from safetensors.torch import load_file

    config = json.loads((source / "config.json").read_text())
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config["vocab_size"])
    texts = {index: text for text, index in tokenizer["model"]["vocab"].items()}
    texts.update({token["id"]: token["content"] for token in tokenizer["added_tokens"]})
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([texts.get(i, f"[PAD{i}]") for i in range(config["vocab_size"])])
    writer.add_token_types([3 if i < 3 else 1 for i in range(config["vocab_size"])])
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    )
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip

    def permute(weight: np.ndarray, n: int) -> np.ndarray:  # llama.cpp's rotary row order
        return (
            weight.reshape(n, 2, weight.shape[0] // n // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape)
        )

    for key, tensor in load_file(source / "model.safetensors").items():
        weight = tensor.float().numpy()
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        else:
            parts = key.split(".")
            module = ".".join(parts[3:-1])
            name = f"blk.{parts[2]}.{names[module]}.weight"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                weight = permute(weight, heads if module == "self_attn.q_proj" else kv_heads)
        if name != drop:
            writer.add_tensor(name, np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_file_decodes_as_its_source_and_one_missing_a_tensor_is_refused(
    tmp_path: Path,
) -> None:
    source = save_tiny_model(tmp_path / "st", initializer_range=0.2)
    _write_gguf(source, tmp_path / "whole.gguf")
    _write_gguf(source, tmp_path / "lacking.gguf", drop="blk.3.ffn_down.weight")
    reference, tokenizer = load_model_and_tokenizer(str(source))
    model, _ = load_model_and_tokenizer(str(tmp_path / "whole.gguf"))
    config = GenerationConfig(sample=False, max_steps=12)
    assert (
        Generator(model, tokenizer).generate("def add(a, b):", config).token_ids
        == Generator(reference, tokenizer).generate("def add(a, b):", config).token_ids
    )
    with pytest.raises(ModelLoadError, match=r"lack model\.layers\.3\.mlp\.down_proj\.weight"):
        load_model_and_tokenizer(str(tmp_path / "lacking.gguf"))
    # Its weights are plain tensors once loaded: it saves (train.py's export of a continued
    # SmolLM2 failed after training: "quantized with gguf and is not serializable").
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    saved, _ = load_model_and_tokenizer(str(tmp_path / "saved"))
    assert (
        Generator(saved, tokenizer).generate("def add(a, b):", config).token_ids
        == Generator(reference, tokenizer).generate("def add(a, b):", config).token_ids
    )


def test_chat_template_that_fails_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    chat_model = tmp_path / "chat"
    shutil.copytree(tiny_model_dir, chat_model)
    (chat_model / "chat_template.jinja").write_text(
        "{{ raise_exception('Conversation roles must alternate') }}"
    )
    generate = importlib.import_module("generate")
    argv = ["--model", str(chat_model), "--prompt", "hi", "--max_steps", "4",
            "--chat_template", "True", "--sample", "False", "--output_dir", str(tmp_path / "logs")]  # fmt: skip
    with pytest.raises(ConfigError, match="chat template fails.*roles must alternate"):
        generate.main(argv)  # run_main prints it as one line, exit status 2


def test_eos_token_id_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    directory = save_tiny_model(tmp_path / "m")
    path = directory / "generation_config.json"
    document = json.loads(path.read_text())
    document["eos_token_id"] = "1"
    path.write_text(json.dumps(document))
    model, tokenizer = load_model_and_tokenizer(str(directory))
    with pytest.raises(ModelLoadError, match="eos_token_id"):
        Generator(model, tokenizer)


def test_folder_without_tokenizer_or_with_an_adapter_names_the_problem(tmp_path: Path) -> None:
    from tiny_models import make_tiny_model

    make_tiny_model("llama_gqa_tied", dtype=torch.float32).save_pretrained(tmp_path / "no-tok")
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        load_model_and_tokenizer(str(tmp_path / "no-tok"))
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(LayerSkipError, match="PEFT adapter"):
        load_model_and_tokenizer(str(tmp_path / "lora"))
    assert issubclass(ModelLoadError, LayerSkipError)


def test_a_failing_chat_template_in_adapter_training_is_one_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from self_speculation.adapter_training import chat_texts

    _, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }{% endfor %}"  # syntax
    with pytest.raises(ConfigError, match="chat template fails on a user message"):
        chat_texts(tokenizer, ["hi"], ["there"])


def test_trust_remote_code_must_be_a_boolean(tiny_model_dir: Path) -> None:
    """ "False" from a key=value --model_args is a string, which would read as true."""
    with pytest.raises(ConfigError, match="trust_remote_code must be true or false"):
        load_model_and_tokenizer(str(tiny_model_dir), model_args={"trust_remote_code": "False"})
