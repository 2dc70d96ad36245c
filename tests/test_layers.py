"""Imports flow one way: infra -> config -> data, text -> models -> training, eval -> CLIs.

Every module of tti/ is read (its imports, including those inside functions) and no import
may name a module of a layer above its own; then each layer is imported alone, in a fresh
interpreter, and must load no module of a layer above it.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Bottom up. A module belongs to the first layer whose prefix its dotted name starts with;
# the top-level modules (tti.train, tti.sample, ...) are the CLIs.
LAYERS = [("infra", ("tti.infra",)), ("config", ("tti.config",)),
          ("data and text", ("tti.data", "tti.text")), ("models", ("tti.models",)),
          ("training and eval", ("tti.training", "tti.eval")), ("CLIs", ("tti",))]


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise ValueError(f"{module} is in no layer")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / "tti").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "tti":
            out[name] = path
    return out


def imported_tti_modules(path: Path) -> set[str]:
    """The tti modules a file imports anywhere in it (`from tti.x import y` names tti.x, or
    tti.x.y where that is a module)."""
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tti.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tti" or node.module.startswith("tti."):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in known else node.module)
    return found - {"tti"}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_runs_upward():
    upward = []
    for name, path in modules().items():
        here = layer_of(name)
        for target in sorted(imported_tti_modules(path)):
            if layer_of(target) > here:
                upward.append(f"{name} ({LAYERS[here][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tti.training.state import TrainState\n")
    assert imported_tti_modules(bad) == {"tti.training.state"}
    assert layer_of("tti.training.state") > layer_of("tti.config.load")


@pytest.mark.parametrize("layer", range(len(LAYERS) - 1), ids=[n for n, _ in LAYERS[:-1]])
def test_a_layer_imports_alone(layer):
    """Importing every module of a layer loads nothing from the layers above it."""
    names = [m for m in modules() if layer_of(m) == layer]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in names)
            + "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('tti.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    above = [m for m in out if layer_of(m) > layer]
    assert not above, f"importing the {LAYERS[layer][0]} layer loaded {above}"


def test_the_config_layer_loads_no_torch():
    """Reading and checking a config costs no torch import (the launchers' preflight runs it)."""
    code = ("import sys, tti.config.load, tti.config.rules, tti.config.resume\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out
