"""Sharded training equals one-device training; shardings are what the rules say; bad meshes
get the error contract. Runs in subprocesses with 8 simulated CPU devices."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _distutil import ROOT, env, run_worker


@pytest.mark.parametrize("opt", ["adamw", "lion", "adam8bit", "sophia_g"])
def test_meshes_match_one_device(opt):
    """10 steps on (8,1,1), (1,8,1), (2,2,2), (1,4,2), (2,1,4): every loss within 1e-4
    (relative) of the one-device run on the same global batches, float32 compute."""
    out = run_worker("meshes", opt)
    ref = np.asarray(out.pop("1,1,1"))
    assert len(ref) == 10 and np.all(np.isfinite(ref))
    assert abs(ref[-1] - ref[0]) > 1e-3  # the model does train: the comparison means something
    assert sorted(out) == sorted(["8,1,1", "1,8,1", "2,2,2", "1,4,2", "2,1,4"])
    for mesh, losses in out.items():
        rel = np.abs(np.asarray(losses) / ref - 1.0)
        assert rel.max() < 1e-4, (opt, mesh, rel.max(), losses, ref.tolist())


def test_shardings():
    """One subprocess (one xdist worker) for all sharding inspections below."""
    info = run_worker("shardings")
    check_fsdp_and_tensor_shard_parameters(info)
    for opt in ("adamw", "adam8bit", "sophia_g"):
        check_optimizer_state_follows_parameters(info, opt)
    check_activation_constraints(info)
    check_parameters_are_born_sharded(info)


def check_fsdp_and_tensor_shard_parameters(shard_info):
    """Mesh (1,4,2): `embed` -> fsdp (4), heads / kv_heads / mlp / vocab -> tensor (2);
    each device holds exactly the shard the spec says."""
    p = {k[len("params/"):]: v for k, v in shard_info["adamw"].items() if k.startswith("params/")}
    expect = {
        "blocks/attn/wq": ([None, "fsdp", "tensor", None], [2, 8, 2, 8]),
        "blocks/attn/wk": ([None, "fsdp", "tensor", None], [2, 8, 2, 8]),
        "blocks/attn/wo": ([None, "tensor", None, "fsdp"], [2, 2, 8, 8]),
        "blocks/mlp/w_up": ([None, "fsdp", "tensor"], [2, 8, 64]),
        "blocks/mlp/w_gate": ([None, "fsdp", "tensor"], [2, 8, 64]),
        "blocks/mlp/w_down": ([None, "tensor", "fsdp"], [2, 64, 8]),
        "blocks/ln1/scale": ([None, "fsdp"], [2, 8]),
        "embed/embedding": (["tensor", "fsdp"], [p["embed/embedding"]["shape"][0] // 2, 8]),
    }
    for name, (spec, shard) in expect.items():
        assert p[name]["spec"] == spec, (name, p[name])
        assert p[name]["shard"] == shard, (name, p[name])


def check_optimizer_state_follows_parameters(shard_info, opt):
    """Every optimizer-state leaf shaped like its parameter has the parameter's spec (Adam
    moments, Sophia's m and h, 8-bit codes); 8-bit Adam's per-block absmax keeps the
    parameter's spec where the mesh divides it; counts are replicated."""
    leaves = shard_info[opt]
    params = {k[len("params/"):]: v for k, v in leaves.items() if k.startswith("params/")}
    n_param_like, fitted = 0, 0
    for key, v in leaves.items():
        if not key.startswith("opt_state/"):
            continue
        match = [p for p in params if key.endswith("/" + p)]
        if not match or not v["shape"]:
            assert all(s is None for s in v["spec"]), (key, v)  # counts, scalars
            continue
        p = params[max(match, key=len)]
        if v["shape"] == p["shape"]:
            assert v["spec"] == p["spec"], (key, v, p)
            n_param_like += 1
        elif len(v["shape"]) == len(p["shape"]):  # per-block absmax [..., n/b]
            n = len(v["shape"])
            for s, ps in zip((v["spec"] + [None] * n)[:n], (p["spec"] + [None] * n)[:n],
                             strict=True):
                assert s in (ps, None), (key, v, p)
            fitted += any(s is not None for s in v["spec"])
    assert n_param_like >= 2 * len(params), (opt, n_param_like, len(params))
    dtypes = {v["dtype"] for k, v in leaves.items() if k.startswith("opt_state/")}
    if opt == "adam8bit":
        assert "uint8" in dtypes and fitted > 0, (dtypes, fitted)
    fsdp = [k for k, v in leaves.items() if k.startswith("opt_state/") and "fsdp" in v["spec"]]
    assert fsdp, "fsdp shards no optimizer state"


def check_activation_constraints(shard_info):
    """Under the (2,2,2) mesh the residual stream is split over batch (data, fsdp) only
    (`embed` yields fsdp to batch), attention heads additionally over tensor."""
    a = shard_info["activations"]
    assert a["residual"] == [["data", "fsdp"]]
    assert a["heads"] == [["data", "fsdp"], None, "tensor"]


def check_parameters_are_born_sharded(shard_info):
    """The jitted initializer on fsdp=8 is partitioned: no device ever holds an array bigger
    than the largest parameter's shard (the whole parameter is 8x that), and each writes
    1/8 of the state."""
    m = shard_info["init_memory"]
    assert m["largest_param_elements"] == 8 * m["largest_shard_elements"], m
    assert m["max_hlo_elements"] <= m["largest_shard_elements"], m
    assert m["output_bytes"] <= m["whole_state_bytes"] / 8 * 1.05, m


BAD = [
    (["--config.mesh.data=3", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"],
     "error: mesh: data*fsdp*tensor = 3 but there are 8 devices"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=3"],
     "error: mesh: {'data': -1, 'fsdp': 3, 'tensor': 1} cannot fill 8 devices"),
    (["--config.mesh.data=8", "--config.train.batch_size=12"],
     "error: train.batch_size: 12 must be divisible by mesh.data*mesh.fsdp (8)"),
    (["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.train.batch_size=4"],
     "error: train.batch_size: 4 must be divisible by mesh.data*mesh.fsdp (8)"),
    (["--config.mesh.data=1", "--config.mesh.tensor=8"],
     "error: mesh.tensor: 8 must divide model.n_heads (4)"),
    (["--config.mesh.data=2", "--config.mesh.tensor=-1"],
     "error: mesh.tensor: 4 must divide model.n_heads (3)"),
]


@pytest.mark.parametrize("flags,message", BAD)
def test_bad_mesh_error_contract(tmp_path, flags, message):
    """Through the CLI: one `error: ...` line naming the key, exit 2, workdir untouched."""
    model = ["--config.model.d_model=24", "--config.model.n_heads=3"] if "-1" in flags[-1] \
        else ["--config.model.d_model=32", "--config.model.n_heads=4"]
    wd = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "jaxllm.train", f"--workdir={wd}", *model,
                        "--config.model.n_layers=1", "--config.data.seq_len=16",
                        "--config.train.batch_size=8", *flags],
                       env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert err[-1].startswith(message), err[-3:]
    assert "Traceback" not in p.stderr
    assert not wd.exists()
