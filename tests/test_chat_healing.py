"""generate.py --chat_template True: the template's generation prompt is the model's own
boundary; the answer is what transformers' greedy generate gives on the template's ids."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_chat_prompts_are_not_healed_over_the_generation_prompt(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    chat_model = tmp_path / "chat"
    shutil.copytree(tiny_model_dir, chat_model)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(chat_model)
    message = [{"role": "user", "content": "def add(a, b):"}]
    ids = tokenizer.apply_chat_template(
        message, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert tokenizer.decode(ids[-1:]) == "\n"  # a whitespace token that longer ones extend
    model = AutoModelForCausalLM.from_pretrained(chat_model)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8)
    expected = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    generate = importlib.import_module("generate")
    argv = [
        "--model", str(chat_model), "--prompt", "def add(a, b):", "--chat_template", "True",
        "--sample", "False", "--max_steps", "8", "--streamer", "none",
        "--output_dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    assert generate.main(argv) == 0
    (result,) = (tmp_path / "logs").glob("generate_*.json")
    answer = json.loads(result.read_text())["prompts"][0]
    assert answer["num_prompt_tokens"] == len(ids)  # not backed up over the template's "\n"
    assert answer["text"] == expected
    assert capsys.readouterr().out == expected + "\n"
