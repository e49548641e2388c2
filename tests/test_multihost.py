"""Two OS processes x 4 CPU devices (jax.distributed over localhost, gloo collectives) train
like one process with 8 devices; only process 0 logs; the checkpoint written collectively
restores in a single process on another mesh."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
from _distutil import ROOT, env, run_worker

from tests.fixtures import rows

COMMON = [
    "--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=4",
    "--config.model.dtype=float32", "--config.data.seq_len=32", "--config.train.batch_size=8",
    "--config.train.steps=10", "--config.train.log_every=1", "--config.train.eval_every=0",
    "--config.train.eval_batches=1", "--config.train.sample_tokens=4",
    "--config.optim.warmup_steps=2", "--config.checkpoint.every=0",
    "--config.log.tensorboard=false", "--config.log.progress=false",
    "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(workdir, *extra):
    return [sys.executable, "-m", "jaxllm.train", f"--workdir={workdir}", *COMMON, *extra]


def test_two_processes(tmp_path):
    """One run (one xdist worker) for the three checks below."""
    runs = start_runs(tmp_path)
    check_two_processes_match_one(runs)
    check_only_process_zero_logs(runs)
    check_collective_checkpoint_restores_in_one_process(runs)


def start_runs(base):
    """One 8-device process and two 4-device processes, started together."""
    ref, multi = base / "ref", base / "multi"
    port = free_port()
    procs = [subprocess.Popen(train_cmd(ref), env=env(8), cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    for i in range(2):
        procs.append(subprocess.Popen(
            train_cmd(multi, f"--config.dist.coordinator=127.0.0.1:{port}",
                      "--config.dist.num_processes=2", f"--config.dist.process_id={i}"),
            env=env(4), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out, err))
    for rc, _, err in outs:
        assert rc == 0, err[-4000:]
    return ref, multi, outs


def check_two_processes_match_one(runs):
    ref, multi, _ = runs
    a = [r for r in rows(ref) if r.get("split") == "train"]
    b = [r for r in rows(multi) if r.get("split") == "train"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
    la, lb = np.array([r["loss"] for r in a]), np.array([r["loss"] for r in b])
    assert abs(la[-1] - la[0]) > 1e-3
    np.testing.assert_allclose(lb, la, rtol=1e-4)
    start = [r for r in rows(multi) if r.get("event") == "start"]
    assert len(start) == 1 and start[0]["processes"] == 2 and start[0]["devices"] == 8


def check_only_process_zero_logs(runs):
    _, multi, outs = runs
    r = rows(multi)
    assert len([x for x in r if x.get("split") == "train"]) == 10  # not 20: one writer
    assert (multi / "config.json").exists()
    assert "step 10: eval loss" in outs[1][1] and "step 10: eval loss" not in outs[2][1]
    assert "--- sample ---" in outs[1][1] and "--- sample ---" not in outs[2][1]


def check_collective_checkpoint_restores_in_one_process(runs):
    """Both processes wrote one checkpoint (per-process OCDBT files, one data-iterator
    state each); one process with a (8,1,1) mesh restores it equal to the reference's."""
    ref, multi, _ = runs
    step = multi / "checkpoints" / "10"
    assert (step / "state").is_dir()
    assert sorted(p.name for p in (step / "data_iter").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    out = run_worker("restore", str(multi), str(ref))
    assert out["steps"] == [10, 10] and out["devices"] == 8
    assert out["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert out["max_param_abs"] > 1e-3
    assert out["max_param_diff"] < 1e-4 * max(out["max_param_abs"], 1.0), out
