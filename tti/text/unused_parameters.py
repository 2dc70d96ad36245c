"""Drop what an output does not depend on (e.g. a text encoder's pooler), for any nn.Module.

Under DDP with find_unused_parameters=False, a trainable parameter that gets no gradient
crashes the second step ("Expected to have finished reduction in the prior iteration").
Which parameters an output depends on is read once from the autograd graph of one small
forward: the same walk DDP's find_unused_parameters=True would repeat at every step.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def parameters_reached(output: torch.Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) that `output`'s autograd graph reaches."""
    reached, seen, stack = set(), set(), [output.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        leaf = getattr(fn, "variable", None)  # an AccumulateGrad node holds its leaf
        if leaf is not None:
            reached.add(id(leaf))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return reached


def drop_unused(model: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[list[str], list[str]]:
    """Remove from `model` each largest submodule whose parameters never reach `run()` (its
    output, computed deterministically in eval mode) and freeze every other parameter that
    does not; returns (dropped module names, frozen parameter names).

    A submodule is removed by setting its attribute to None, which Hugging Face models read
    as "absent" (e.g. `pooler`); if the model cannot run without it (the forward fails or its
    output changes), it is put back and frozen instead. Used parameters keep their flags.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(True)  # a frozen model too: the graph must reach every parameter
    try:
        with torch.enable_grad():
            before = run()
        reached = parameters_reached(before)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    dropped = []
    for name, module in _largest_unused_modules(model, reached):
        _set_submodule(model, name, None)
        if _same_output(run, before.detach()):
            dropped.append(name)
        else:  # the model cannot run without it
            _set_submodule(model, name, module)
    frozen = []
    for name, p in model.named_parameters():
        if id(p) not in reached:
            p.requires_grad_(False)
            frozen.append(name)
    return dropped, frozen


def _largest_unused_modules(model: nn.Module, reached: set[int]) -> list[tuple[str, nn.Module]]:
    """(name, module) of the outermost submodules that own parameters, none of them reached."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        params = list(module.parameters())
        inside_found = any(name.startswith(f"{outer}.") for outer, _ in found)
        if name and params and not inside_found and all(id(p) not in reached for p in params):
            found.append((name, module))
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module | None) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, module)


def _same_output(run: Callable[[], torch.Tensor], before: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            after = run()
    except Exception:  # the model needs what was removed
        return False
    return after.shape == before.shape and torch.allclose(after, before)
