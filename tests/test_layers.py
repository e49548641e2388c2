"""The package layers of jaxllm (see the docstring of jaxllm/__init__.py): every import of
every module under jaxllm/ and tools/, function-local ones included, points down a layer
or stays inside its own group. Parsed with `ast`; nothing is imported."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

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


def _local_imports(path: pathlib.Path):
    """(line, imported module) for every import inside a function of the file."""
    for fn in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    yield from ((node.lineno, a.name) for a in node.names)
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    for a in node.names:  # `from jaxllm import parallel`: jaxllm.parallel
                        yield node.lineno, _resolve(f"{node.module}.{a.name}")


def _resolve(target: str) -> str:
    """The module that `target` (a module, or a name in a module) names."""
    if not target.startswith("jaxllm."):
        return target.rsplit(".", 1)[0]
    parts = target.split(".")
    while len(parts) > 1 and not ((ROOT / "/".join(parts)).with_suffix(".py").exists()
                                  or (ROOT / "/".join(parts) / "__init__.py").exists()):
        parts.pop()
    return ".".join(parts)


def _light(mod: str) -> bool:
    """Whether module `mod` (jaxllm.X.Y or tools.X) is one that must load without JAX."""
    rel = mod.split(".", 1)[1] if mod.startswith("jaxllm.") else mod
    return any(rel == m or rel.startswith(m + ".") and m in ("cli", "tools")
               for m in jaxllm.LIGHT)


def _needless_local_imports(files):
    """Function-local imports of `files` that are neither slow/optional nor kept out of a
    module that must load without JAX (jaxllm.SLOW, jaxllm.LIGHT)."""
    out = []
    for path, name in files:
        for line, target in _local_imports(path):
            if (target.split(".")[0] in jaxllm.SLOW or target.startswith("jax.experimental.pallas")
                    or target.removeprefix("jaxllm.") in jaxllm.ON_DEMAND):
                continue
            heavy = target.split(".")[0] in ("jax", "flax", "optax", "orbax") or (
                target.startswith("jaxllm.") and not _light(target))
            if not (heavy and _light(name)):
                out.append(f"{name}:{line}: function-local import of {target}")
    return out


def test_function_local_imports_are_slow_optional_or_keep_jax_out():
    files = sorted([*ROOT.glob("jaxllm/**/*.py"), *ROOT.glob("tools/*.py")])
    assert _needless_local_imports([(p, _module(p)) for p in files]) == []


def test_the_local_import_check_catches_a_needless_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import numpy\n    from jaxllm.train import loop\n"
                     "    import matplotlib.pyplot\n")
    assert [m.split(": ")[1] for m in _needless_local_imports([(probe, "jaxllm.eval.probe")])] \
        == ["function-local import of numpy", "function-local import of jaxllm.train.loop"]
    # an entry point may defer JAX (and the layers that load it) until its flags are checked
    assert _needless_local_imports([(probe, "jaxllm.cli.probe")]) == [
        "jaxllm.cli.probe:2: function-local import of numpy"]


def test_light_modules_load_without_jax_torch_or_matplotlib():
    mods = [f"jaxllm.{m}" for m in jaxllm.LIGHT if m != "tools"]
    code = (f"import sys\nimport {', '.join(mods)}\n"
            "print(sorted(m for m in ('jax', 'torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


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
