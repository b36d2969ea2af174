"""What keeps a compiled pass off the disk, or gives it another file name (precompiled):
the cases the shipped tests leave out, each of which a mutation of the check survived."""

from __future__ import annotations

import functools
import sys
import types

import torch

from self_speculation import precompiled


def _scaled(factor: float):
    return lambda x: x * factor


def _forward_of(factor: float):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * factor

    return forward


def test_a_partial_of_a_closure_is_not_kept_on_disk() -> None:
    """A partial is described by its arguments only when its function carries nothing."""
    layer = torch.nn.Linear(2, 2)
    layer.activation = functools.partial(torch.nn.functional.gelu, approximate="tanh")
    assert not precompiled.has_hooks(layer)
    layer.activation_class = torch.nn.GELU  # a class is described by its name and code
    assert not precompiled.has_hooks(layer)
    layer.activation = functools.partial(_scaled(3.0))
    assert precompiled.has_hooks(layer)


def test_a_closure_bound_to_the_module_is_not_kept_on_disk() -> None:
    layer = torch.nn.Linear(2, 2)
    layer.forward = types.MethodType(lambda self, x: x, layer)
    assert not precompiled.has_hooks(layer)
    layer.forward = types.MethodType(_forward_of(2.0), layer)  # its factor: a cell
    assert precompiled.has_hooks(layer)


def test_functions_reached_from_nested_code_and_closures_change_the_digest(
    monkeypatch,
) -> None:
    module = types.ModuleType("hunt68_patched")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec("def helper(x):\n    return x + 1\n", module.__dict__)
    exec("def outer(x):\n    return (lambda y: helper(y))(x)\n", module.__dict__)
    before = precompiled._functions_digest([module.outer])
    exec("def helper(x):\n    return x + 2\n", module.__dict__)  # monkeypatched
    assert precompiled._functions_digest([module.outer]) != before

    def calling(function):
        return lambda x: function(x)

    def one(x):
        return x + 1

    def two(x):
        return x - 1

    assert precompiled._functions_digest([calling(one)]) != precompiled._functions_digest(
        [calling(two)]
    )
