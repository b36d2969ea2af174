"""A forward with ``output_hidden_states`` run while a compiled generation of the same model
is under way (in another thread, here from the generation's streamer) gets its hidden
states: the output-capturing hooks stay in place, doing nothing only inside the compiled
passes (they had been taken off the modules, and such a forward got no hidden states)."""

from __future__ import annotations

import threading

import torch
from test_compiled_lifetime import CONFIG
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator
from self_speculation.streaming import Streamer

PROMPT = [5, 7, 9, 11, 13]


def _hidden_states(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(input_ids=torch.tensor([PROMPT]), output_hidden_states=True).hidden_states


class _ForwardElsewhere(Streamer):
    """At the first step, runs ``model``'s forward with hidden states in another thread."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.hidden: list[tuple[torch.Tensor, ...]] = []

    def on_step(self, new_tokens: list[int], draft_tokens: list[int], accepted_count: int):
        if not self.hidden:
            thread = threading.Thread(target=lambda: self.hidden.append(_hidden_states(self.model)))
            thread.start()
            thread.join()


def test_hidden_states_of_another_threads_forward_during_a_compiled_generation(
    monkeypatch,
) -> None:
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, initializer_range=0.3)
    generator = Generator(model, IdTokenizer())
    expected = _hidden_states(model)  # installs the hooks
    hooks = {name: list(module._forward_hooks.items()) for name, module in model.named_modules()}
    plain = generator.generate(PROMPT, GenerationConfig(**{**vars(CONFIG), "compile": False}))
    streamer = _ForwardElsewhere(model)
    result = generator.generate(PROMPT, CONFIG, streamer=streamer)
    assert generator.fast_path_fallback(CONFIG) is None
    assert result.token_ids == plain.token_ids
    assert len(streamer.hidden) == 1
    assert len(streamer.hidden[0]) == len(expected) == model.config.num_hidden_layers + 1
    for during, before in zip(streamer.hidden[0], expected, strict=True):
        torch.testing.assert_close(during, before)
    after = {name: list(module._forward_hooks.items()) for name, module in model.named_modules()}
    assert after == hooks


def test_blocks_over_two_models_sharing_modules_put_the_hooks_back() -> None:
    from self_speculation.model_surgery import capture_hooks_suspended

    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    expected = _hidden_states(model)  # installs the hooks
    hooks = {name: list(module._forward_hooks.items()) for name, module in model.named_modules()}
    for first, second in ((model, model.model), (model.model, model)):
        outer, inner = capture_hooks_suspended(first), capture_hooks_suspended(second)
        outer.__enter__()
        inner.__enter__()
        outer.__exit__(None, None, None)  # overlapping, not nested
        assert len(_hidden_states(model)) == len(expected)
        inner.__exit__(None, None, None)
        after = {name: list(m._forward_hooks.items()) for name, m in model.named_modules()}
        assert after == hooks
