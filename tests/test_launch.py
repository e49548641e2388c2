"""launch/ scripts: --dry-run prints the exact commands (checked by parsing them as a shell
would), bad arguments get `error: ...` and exit 2, and local.sh really trains on CPU."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

from _distutil import ROOT

LAUNCH = ROOT / "launch"
TRICKY = "--config.train.sample_prompt=it's f(x) $HOME"


def sh(script, *args, env=None, check=True):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_"))}
    e.update(env or {})
    p = subprocess.run(["bash", str(LAUNCH / script), *args], env=e, cwd=ROOT,
                       capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def env_split(argv):
    """['env', 'K=V', ..., prog, args...] -> ({K: V}, [prog, args...])."""
    assert argv[0] == "env"
    i, env = 1, {}
    while "=" in argv[i] and not argv[i].startswith("-"):
        k, v = argv[i].split("=", 1)
        env[k] = v
        i += 1
    return env, argv[i:]


def test_local_gpu_dry_run():
    out = sh("local.sh", "--dry-run", "--platform=gpu", "--config=configs/tiny.py",
             "--workdir=runs/x", TRICKY, env={"XLA_FLAGS": "--xla_dump_to=/tmp/d"}).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1
    env, argv = env_split(shlex.split(lines[0]))
    assert argv == ["python3", "-m", "jaxllm.train", "--config=configs/tiny.py",
                    "--workdir=runs/x", TRICKY]
    flags = env["XLA_FLAGS"].split()
    assert flags[0] == "--xla_dump_to=/tmp/d"  # the caller's own flags first, untouched
    names = [f.split("=", 1)[0] for f in flags]
    assert len(names) == len(set(names))  # each flag once
    assert all(f.startswith("--xla_") and "=" in f for f in flags)
    # GPU throughput flags are added: collectives overlapped with compute, command buffers
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert "--xla_gpu_enable_command_buffer" in names
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert env["JAX_PLATFORMS"] == "cuda"
    # this jaxlib's XLA parses every flag and value at start-up (a bad one aborts)
    p = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(jnp.ones(2).sum())"],
                       env={**os.environ, "JAX_PLATFORMS": "cpu",
                            "XLA_FLAGS": env["XLA_FLAGS"].replace("--xla_dump_to=/tmp/d", "")},
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0 and p.stdout.strip() == "2.0", p.stderr[-2000:]
    off = sh("local.sh", "--dry-run", "--platform=gpu", env={"JAXLLM_COMMAND_BUFFER": ""})
    assert "--xla_gpu_enable_command_buffer= " in off.stdout.replace("'", "") + " "


def test_local_auto_platform(tmp_path):
    """auto: gpu when `nvidia-smi -L` lists a GPU (a fake one here), else cpu."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do\n"
                    "  echo \"GPU $i: NVIDIA H100 (UUID: x)\"\ndone\n")
    fake.chmod(0o755)
    path = f"{tmp_path}:{os.environ['PATH']}"
    env, _ = env_split(shlex.split(sh("local.sh", "--dry-run", env={"PATH": path}).stdout))
    assert env["JAX_PLATFORMS"] == "cuda"
    fake.write_text("#!/bin/sh\necho 'No devices were found'\n")
    env, _ = env_split(shlex.split(sh("local.sh", "--dry-run", env={"PATH": path}).stdout))
    assert env["JAX_PLATFORMS"] == "cpu"


def test_local_cpu_dry_run_and_errors():
    env, argv = env_split(shlex.split(sh("local.sh", "--dry-run", "--platform=cpu",
                                         "--devices=8", "--", "--workdir=w").stdout))
    assert env == {"JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert argv == ["python3", "-m", "jaxllm.train", "--workdir=w"]
    for bad, msg in ((["--platform=tpu"], "error: --platform: got 'tpu'"),
                     (["--platform=gpu", "--devices=4"], "error: --devices: only with"),
                     (["--devices=x"], "error: --devices: must be")):
        p = sh("local.sh", "--dry-run", *bad, check=False)
        assert p.returncode == 2 and p.stderr.startswith(msg), p.stderr


def test_local_cpu_trains(tmp_path):
    """Not a dry run: two simulated CPU devices, data-parallel, two steps."""
    wd = tmp_path / "run"
    sh("local.sh", "--platform=cpu", "--devices=2", f"--workdir={wd}",
       "--config.model.d_model=32", "--config.model.n_layers=1", "--config.data.seq_len=16",
       "--config.train.batch_size=4", "--config.train.steps=2", "--config.train.log_every=1",
       "--config.train.eval_every=0", "--config.train.eval_batches=1",
       "--config.train.sample_tokens=0", "--config.log.tensorboard=false",
       "--config.log.progress=false", env={"PYTHON": "python"})
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in rows if r.get("event") == "start")
    assert start["devices"] == 2 and start["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert [r["step"] for r in rows if r.get("split") == "train"] == [1, 2]


def test_tpu_pod_dry_run():
    common = ["--dry-run", "--name=llm", "--zone=us-central2-b", "--project=proj",
              "--type=v4-32"]
    lines = sh("tpu_pod.sh", *common, "up", "--", "--config=configs/llama_1b.py",
               "--workdir=/mnt/shared/run", TRICKY).stdout.strip().splitlines()
    assert len(lines) == 5, lines
    where = ["--zone=us-central2-b", "--project=proj"]
    describe, create = lines[0].split(" || ")
    assert shlex.split(describe)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe",
                                         "llm"]
    assert shlex.split(create) == ["gcloud", "compute", "tpus", "tpu-vm", "create", "llm",
                                   *where, "--accelerator-type=v4-32",
                                   "--version=tpu-ubuntu2204-base"]
    tar = shlex.split(lines[1])
    assert tar[:3] == ["tar", "czf", "/tmp/jaxllm-src-llm.tgz"] and tar[-3:] == [
        "-C", str(ROOT), "."]
    assert shlex.split(lines[2]) == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                                     "/tmp/jaxllm-src-llm.tgz", "llm:~/jaxllm-src.tgz",
                                     "--worker=all", *where]
    setup = shlex.split(lines[3])
    assert setup[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llm", "--worker=all",
                         *where[:1]]
    assert "pip install -q -e ~/jaxllm" in setup[-1] and "jax[tpu]" in setup[-1]
    train = shlex.split(lines[4])
    assert train[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llm", "--worker=all"]
    remote = train[-1]
    assert remote.startswith("--command=")
    remote_argv = shlex.split(remote[len("--command="):])
    assert remote_argv[:3] == ["cd", "~/jaxllm", "&&"]
    i = remote_argv.index("python3")
    assert remote_argv[i:i + 6] == ["python3", "-m", "jaxllm.train",
                                    "--config=configs/llama_1b.py",
                                    "--workdir=/mnt/shared/run", TRICKY]
    assert remote_argv[-3:] == ["|", "tee", "~/jaxllm-train.log"]
    delete = shlex.split(sh("tpu_pod.sh", *common, "delete").stdout)
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "llm", *where,
                      "--quiet"]
    logs = shlex.split(sh("tpu_pod.sh", *common, "logs").stdout)
    assert "--worker=0" in logs and logs[-1] == "--command=tail -n 200 -f ~/jaxllm-train.log"
    v5 = sh("tpu_pod.sh", "--dry-run", "--name=a", "--zone=z", "--type=v5p-16", "--spot",
            "create").stdout
    assert "--version=v2-alpha-tpuv5 --spot" in v5


def _remote_train_argv(env=None):
    train = shlex.split(sh("tpu_pod.sh", "--dry-run", "--name=a", "--zone=z", "train", "--",
                           "--config=configs/llama_1b.py", env=env).stdout)
    return shlex.split(train[-1][len("--command="):])


def test_tpu_pod_sets_collective_overlap_flags():
    """`train` runs with LIBTPU_INIT_ARGS that overlap FSDP's all-gathers and the gradient
    all-reduces with compute (MaxText's flags); JAXLLM_LIBTPU_INIT_ARGS replaces them."""
    argv = _remote_train_argv()
    env = [a for a in argv if a.startswith("LIBTPU_INIT_ARGS=")]
    assert len(env) == 1 and argv.index(env[0]) == argv.index("python3") - 1, argv
    flags = dict(f.split("=", 1) for f in env[0][len("LIBTPU_INIT_ARGS="):].split())
    assert all(k.startswith("--xla_") and v == "true" for k, v in flags.items()), flags
    for key in ("--xla_tpu_enable_async_collective_fusion_fuse_all_gather",
                "--xla_enable_async_all_gather", "--xla_enable_async_all_reduce",
                "--xla_tpu_overlap_compute_collective_tc",
                "--xla_tpu_enable_data_parallel_all_reduce_opt"):
        assert key in flags, key
    assert not any("vmem" in k for k in flags)  # chip-specific limits stay out
    assert not any(a.startswith("LIBTPU") for a in _remote_train_argv({
        "JAXLLM_LIBTPU_INIT_ARGS": ""}))
    mine = _remote_train_argv({"JAXLLM_LIBTPU_INIT_ARGS": "--xla_foo=1 --xla_bar=2"})
    assert "LIBTPU_INIT_ARGS=--xla_foo=1 --xla_bar=2" in mine


def test_tpu_pod_errors():
    for args, msg in ((["--zone=z", "up"], "error: --name: required"),
                      (["--name=a", "up"], "error: --zone: required"),
                      (["--name=a", "--zone=z"], "error: ACTION: missing"),
                      (["--name=a", "--zone=z", "--type=v9-8", "create"],
                       "error: --type: unknown TPU type 'v9-8'"),
                      (["--name=a", "--zone=z", "launch"], "error: unknown argument 'launch'")):
        p = sh("tpu_pod.sh", "--dry-run", *args, check=False)
        assert p.returncode == 2 and p.stderr.startswith(msg), (args, p.stderr)


def _slurm_env(tmp_path, ntasks):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "scontrol"  # expands the node list like the real one
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-a[01-02]" ] || exit 1\n'
                    "echo gpu-a01\necho gpu-a02\n")
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_NTASKS": str(ntasks)}


def test_slurm_dry_run(tmp_path):
    env = _slurm_env(tmp_path, 16)
    out = sh("slurm.sbatch", "--dry-run", "--", "--config=configs/llama_1b.py",
             "--workdir=/shared/x", TRICKY, env=env).stdout
    argv = shlex.split(out)
    assert argv[:4] == ["srun", "--ntasks=16", "--kill-on-bad-exit=1", "--export=ALL"]
    run_env, rest = env_split(argv[4:])
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in run_env["XLA_FLAGS"].split()
    assert rest[:2] == ["bash", "-c"] and len(rest) == 3
    task = rest[2]
    assert task.startswith("export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID; exec python3 ")
    # what one task (process 5, GPU 5 of its node) runs, with python replaced by printf
    fake_py = tmp_path / "bin" / "python3"
    fake_py.write_text('#!/bin/sh\necho "CUDA=$CUDA_VISIBLE_DEVICES"\n'
                       'for a in "$@"; do echo "$a"; done\n')
    fake_py.chmod(0o755)
    p = subprocess.run(["bash", "-c", task], capture_output=True, text=True, check=True,
                       env={**env, "SLURM_PROCID": "5", "SLURM_LOCALID": "5"})
    assert p.stdout.splitlines() == [
        "CUDA=5", "-m", "jaxllm.train", "--config.dist.coordinator=gpu-a01:16242",
        "--config.dist.num_processes=16", "--config.dist.process_id=5",
        "--config=configs/llama_1b.py", "--workdir=/shared/x", TRICKY]


def test_slurm_per_node_and_errors(tmp_path):
    env = _slurm_env(tmp_path, 2)
    argv = shlex.split(sh("slurm.sbatch", "--dry-run", "--per-node", "--port=23456",
                          env=env).stdout)
    assert argv[1] == "--ntasks=2"
    assert argv[-1] == ("exec python3 -m jaxllm.train --config.dist.coordinator=gpu-a01:23456"
                        " --config.dist.num_processes=2 --config.dist.process_id=$SLURM_PROCID")
    p = sh("slurm.sbatch", "--dry-run", check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: SLURM_JOB_ID is not set")
    p = sh("slurm.sbatch", "--dry-run", env={**env, "SLURM_JOB_NODELIST": "h[1-9]"},
           check=False)
    assert p.returncode == 2 and p.stderr.startswith(
        "error: scontrol show hostnames 'h[1-9]' failed"), p.stderr
    p = sh("slurm.sbatch", "--dry-run", "--port=x", env=env, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: --port: must be a number")
