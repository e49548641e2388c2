"""The package layers of jaxllm (see the docstring of jaxllm/__init__.py): every import of
every module under jaxllm/ and tools/, function-local ones included, points down a layer
or stays inside its own group. Parsed with `ast`; nothing is imported."""

from __future__ import annotations

import ast
import pathlib

import jaxllm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_layers_are_documented_in_the_package_docstring():
    doc = jaxllm.__doc__
    for name in ("config", "kernels", "optim", "parallel", "model", "data", "checkpoint",
                 "state", "run", "train", "eval", "hf", "experiments", "cli", "tools"):
        assert name in doc, name


def _module(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path, mod: str):
    """(line, imported module) for every import in the file, at any depth."""
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            yield node.lineno, base
            for a in node.names:  # `from jaxllm import train` imports jaxllm.train
                yield node.lineno, f"{base}.{a.name}"


def _where(mod: str):
    """(layer, group) of a jaxllm module or tool; None for third-party modules."""
    if mod == "tools" or mod.startswith("tools."):
        return jaxllm.LAYERS["tools"], "entry"
    if mod != "jaxllm" and not mod.startswith("jaxllm."):
        return None
    parts = mod.split(".")
    if parts[-1] == "__main__":  # `python -m jaxllm.x` entry points
        return jaxllm.LAYERS["cli"], "entry"
    if len(parts) == 1:
        return -1, "jaxllm"  # the package itself: its docstring and version only
    name = parts[1]
    if name not in jaxllm.LAYERS:
        return None  # `from jaxllm import X` where X is no module: judged by X's own entry
    return jaxllm.LAYERS[name], jaxllm.GROUPS.get(name, name)


def _violations(files):
    """Imports of `files` [(path, module name)] that point up a layer or across groups."""
    out, seen = [], set()
    for path, name in files:
        src = _where(name)
        assert src is not None, f"{path}: not placed in jaxllm.LAYERS"
        for line, target in _imports(path, name):
            if (name.startswith("jaxllm.kernels") and target.split(".")[0] == "flax"
                    and (name, line, "flax") not in seen):
                seen.add((name, line, "flax"))
                out.append(f"{name}:{line}: kernels import {target}")
            dst = _where(target)
            if dst is None or dst[1] == src[1] or dst[0] < src[0] or (name, line, dst) in seen:
                continue
            seen.add((name, line, dst))
            out.append(f"{name}:{line} (layer {src[0]}) imports {target} (layer {dst[0]})")
    return out


def test_every_import_points_down_a_layer():
    files = sorted([*ROOT.glob("jaxllm/**/*.py"), *ROOT.glob("tools/*.py")])
    assert _violations([(p, _module(p)) for p in files]) == []


def test_the_check_catches_upward_and_sideways_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import jax\nfrom jaxllm import parallel\n\n\ndef f():\n"
                     "    from jaxllm.train import loop\n    return loop\n")
    got = _violations([(probe, "jaxllm.model.probe")])
    assert len(got) == 1 and "imports jaxllm.train" in got[0], got
    assert len(_violations([(probe, "jaxllm.eval.probe")])) == 1  # eval and train: siblings
    assert _violations([(probe, "jaxllm.experiments")]) == []
    probe.write_text("from flax import nnx\n")
    assert len(_violations([(probe, "jaxllm.kernels.probe")])) == 1


def test_functions_outside_kernels_stay_short():
    """The project's size rule: no function outside jaxllm/kernels/ (whose Pallas kernels
    are long by nature) is longer than 60 lines, so each reads in one screen."""
    long = []
    for path in sorted([*ROOT.glob("jaxllm/**/*.py"), *ROOT.glob("tools/*.py")]):
        if "kernels" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []
