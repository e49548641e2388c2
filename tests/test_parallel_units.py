"""In-process checks without devices: multi-host argument detection, mesh.rules, and the
sizing arithmetic behind tools/shard_report.py (against hand-computed numbers)."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from _distutil import ROOT, env
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from jaxllm import config as C
from jaxllm import optim, parallel, sizing
from jaxllm.config import ConfigError

SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}


def cfg(**dist):
    c = C.defaults()
    c.dist.update(**dist)
    return c


def test_distributed_args_explicit_and_single():
    args = parallel.distributed_args(cfg(coordinator="10.0.0.1:1234", num_processes=4,
                                         process_id=2), {})
    assert args == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                    "process_id": 2, "cluster_detection_method": "deactivate"}
    assert parallel.distributed_args(cfg(), {}) is None
    assert parallel.distributed_args(cfg(), {**SLURM, "SLURM_NTASKS": "1"}) is None
    with pytest.raises(ConfigError, match="dist.num_processes: more than one process needs"):
        parallel.distributed_args(cfg(num_processes=2), {})


def test_distributed_args_auto_detected():
    per_gpu = {**SLURM, "SLURM_NTASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
               "SLURM_GPUS_ON_NODE": "8"}
    assert parallel.detect_cluster(per_gpu) == "slurm"
    assert parallel.distributed_args(cfg(), per_gpu) == {}  # JAX: GPU SLURM_LOCALID each
    per_node = {**SLURM, "SLURM_NTASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
                "SLURM_GPUS_ON_NODE": "4"}
    assert parallel.distributed_args(cfg(), per_node) == {"local_device_ids": [0, 1, 2, 3]}
    uneven = {**per_node, "SLURM_NTASKS": "3", "SLURM_STEP_TASKS_PER_NODE": "2,1"}
    assert parallel.distributed_args(cfg(), uneven) == {"local_device_ids": [0, 1, 2, 3]}
    assert parallel.distributed_args(cfg(num_processes=2, process_id=1), per_node)[
        "num_processes"] == 2
    tpu = {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}
    assert parallel.detect_cluster(tpu) == "tpu"
    assert parallel.distributed_args(cfg(), tpu) == {}
    assert parallel.detect_cluster({"MEGASCALE_COORDINATOR_ADDRESS": "h:8080"}) == "tpu"
    assert parallel.distributed_args(cfg(), {"TPU_ACCELERATOR_TYPE": "v4-8"}) == {}


def test_mesh_must_split_batch_across_processes(monkeypatch):
    """With several processes each one feeds its own rows: data*fsdp must cover them."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    c = small()
    c.mesh.update(data=1, fsdp=1, tensor=1)
    with pytest.raises(ConfigError, match=r"mesh: data\*fsdp \(1\) must be a multiple of the "
                       r"process count \(2\)"):
        parallel.make_mesh(c, jax.devices()[:1])
    c.train.batch_size = 7
    with pytest.raises(ConfigError, match="train.batch_size: 7 must be divisible by the "
                       "process count"):
        parallel.make_mesh(c, jax.devices()[:1])


def amesh(d, f, t):
    return AbstractMesh((d, f, t), parallel.AXES, axis_types=(AxisType.Auto,) * 3)


def small(**model):
    c = C.tiny()
    c.model.update(vocab_size=384, **model)
    return c


def test_mesh_rules_from_config():
    """`mesh.rules` decides where each logical axis lives; bad entries are config errors."""
    from jaxllm.state import abstract_state
    c = small()
    # embed replicated, MLP width over fsdp x tensor; names left out (layers, ...) -> None
    c.mesh.rules = (("embed", None), ("mlp", ("fsdp", "tensor")), ("heads", "tensor"),
                    ("kv_heads", "tensor"), ("vocab", "tensor"), ("batch", ("data", "fsdp")))
    _, tree, _ = abstract_state(c, amesh(1, 2, 2), optim.build_optimizer(c))
    p = tree["params"]["blocks"]
    assert p["attn"]["wq"].sharding.spec == PartitionSpec(None, None, "tensor", None)
    assert p["mlp"]["w_up"].sharding.spec == PartitionSpec(None, None, ("fsdp", "tensor"))
    c.mesh.rules = (("embed", "model"),)
    with pytest.raises(ConfigError, match="mesh.rules: 'embed' -> 'model' is not a mesh axis"):
        parallel.rules(c)
    c.mesh.rules = (("width", "fsdp"),)
    with pytest.raises(ConfigError, match="mesh.rules: bad entry"):
        parallel.rules(c)


def test_per_device_bytes_rounds_up():
    m = amesh(1, 4, 2)
    leaf = jax.ShapeDtypeStruct((10, 6), jnp.float32,
                                sharding=NamedSharding(m, PartitionSpec("fsdp", "tensor")))
    both = jax.ShapeDtypeStruct((8,), jnp.bfloat16,
                                sharding=NamedSharding(m, PartitionSpec(("fsdp", "tensor"))))
    assert sizing.per_device_bytes([leaf]) == 3 * 3 * 4  # ceil(10/4) x 6/2 float32
    assert sizing.per_device_bytes([both]) == 1 * 2
    assert sizing.global_bytes([leaf, both]) == 240 + 16


def test_activation_estimate_hand_computed():
    """d 128, 4 layers, 4 heads, SwiGLU d_ff 384, T 256, batch 16, float32, mesh (2,2,2):
    4 sequences = 1024 tokens per device, tp 2.
    none: 4·128 + (128+256)/2 + 4·256/2 + 128/2 + 3·384/2 = 1856 per layer and token
          -> 4·1856·1024·4 B = 30,408,704; logits 2·4·256·192·4 B = 1,572,864.
    full: 4·128·1024·4 + 1856·1024·4 = 9,699,328 (+ logits)."""
    c = small(d_model=128, n_layers=4, n_heads=4)
    c.data.seq_len, c.train.batch_size = 256, 16
    a = sizing.activation_bytes(c, (2, 2, 2))
    assert (a["layers"], a["logits"], a["tokens_per_device"]) == (30408704, 1572864, 1024)
    c.model.remat = "full"
    assert sizing.activation_bytes(c, (2, 2, 2))["layers"] == 9699328
    c.model.remat, c.model.attention_backend = "dots", "flash"
    # 3·128 + 192 + 0 + 64 + 2·384/2 = 1024 per layer and token; recomputed layer without
    # probabilities: 1856 - 512 = 1344
    assert sizing.activation_bytes(c, (2, 2, 2))["layers"] == (4 * 1024 + 1344) * 1024 * 4


def llama_expected():
    """Llama 1B (configs/llama_1b.py) by hand: V 32000, d 2048, L 24, d_ff 5632, untied."""
    d, layers, f, v = 2048, 24, 5632, 32000
    norms = (2 * layers + 1) * d
    matrices = 2 * v * d + layers * (4 * d * d + 3 * d * f)
    return norms, matrices


def test_llama_report_matches_hand_count():
    import importlib.util
    spec = importlib.util.spec_from_file_location("llama", ROOT / "configs" / "llama_1b.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.mesh.update(data=1, fsdp=-1, tensor=2)
    r = sizing.report(c, 16)
    norms, matrices = llama_expected()
    assert r["param_count"] == norms + matrices == 1_364_297_728
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 2}
    # norm scales: embed -> fsdp only (replicated over tensor); matrices: fsdp x tensor
    assert r["per_device"]["params"] == norms * 4 // 8 + matrices * 4 // 16
    assert r["per_device"]["grads"] == r["per_device"]["params"]
    extra = r["per_device"]["opt_state"] - 2 * r["per_device"]["params"]
    assert 0 <= extra <= 64  # AdamW: two moments, plus replicated step counters
    assert r["global"]["params"] == (norms + matrices) * 4


def test_shard_report_cli():
    base = [sys.executable, "tools/shard_report.py", "--config=configs/llama_1b.py"]

    def run(*args):
        return subprocess.run([*base, *args], env=env(1), cwd=ROOT, capture_output=True,
                              text=True, timeout=300, check=False)
    p = run("--mesh=1,-1,2", "--devices=16")
    assert p.returncode == 0, p.stderr
    norms, matrices = llama_expected()
    assert "mesh data=1 x fsdp=8 x tensor=2 (16 devices); 1,364,297,728 parameters" in p.stdout
    assert f"{norms * 4 // 8 + matrices * 4 // 16:,}" in p.stdout
    for args, msg in ((["--mesh=2,x", "--devices=16"], "error: --mesh: got '2,x'"),
                      (["--mesh=3,1,1", "--devices=16"], "error: mesh: data*fsdp*tensor = 3"),
                      (["--mesh=1,1,32", "--devices=32"], "error: mesh.tensor: 32 must divide"),
                      (["--mesh=1,1,1"], "error: --devices: must be >= 1")):
        p = run(*args)
        assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(msg), \
            (args, p.stderr)
