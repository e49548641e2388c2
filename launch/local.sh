#!/usr/bin/env bash
# Train on one host: all its GPUs (one process, mesh over the local devices) or the CPU.
#
#   launch/local.sh [--dry-run] [--platform=auto|gpu|cpu] [--devices=N] [--] TRAIN_ARGS...
#   launch/local.sh --config=configs/gpt2_124m.py --workdir=runs/gpt2 --config.mesh.fsdp=-1
#   launch/local.sh --platform=cpu --devices=8 --workdir=runs/cpu8 --config.mesh.fsdp=2
#
# --platform   auto (default): gpu when `nvidia-smi -L` lists a GPU, else cpu.
# --devices=N  cpu only: simulate N devices (--xla_force_host_platform_device_count).
# --dry-run    print the exact command (with its environment) instead of running it.
#
# GPU environment (appended to any XLA_FLAGS you already set; override by exporting):
#   --xla_gpu_enable_latency_hiding_scheduler=true  overlap collectives (FSDP all-gathers,
#       gradient reduce-scatters) with compute;
#   --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL  replay fusions and custom calls
#       (cuDNN attention) as CUDA graphs: less launch overhead per step; set
#       JAXLLM_COMMAND_BUFFER="" to turn command buffers off (e.g. while chasing a hang);
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.90  let XLA preallocate 90% of GPU memory (JAX's
#       default is 75%), leaving room for CUDA/cuDNN workspaces.
# Multi-host GPU: launch/slurm.sbatch; TPU pods: launch/tpu_pod.sh.
set -euo pipefail

dry_run=0
platform=auto
devices=0
args=()
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --platform=*) platform="${1#*=}" ;;
    --devices=*) devices="${1#*=}" ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done

# die, shq (shell quoting): shared with the other launchers
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
case "$platform" in auto|gpu|cpu) ;; *) die "--platform: got '$platform'; allowed: auto, gpu, cpu" ;; esac
[[ "$devices" =~ ^[0-9]+$ ]] || die "--devices: must be a non-negative integer, got '$devices'"
if [[ "$platform" == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && [[ "$(nvidia-smi -L 2>/dev/null)" == GPU* ]]; then
    platform=gpu
  else
    platform=cpu
  fi
fi
((devices == 0)) || [[ "$platform" == cpu ]] || die "--devices: only with --platform=cpu"

python="${PYTHON:-python3}"
xla_flags="${XLA_FLAGS:-}"
envs=()
if [[ "$platform" == gpu ]]; then
  xla_flags+="${xla_flags:+ }--xla_gpu_enable_latency_hiding_scheduler=true"
  xla_flags+=" --xla_gpu_enable_command_buffer=${JAXLLM_COMMAND_BUFFER-FUSION,CUSTOM_CALL}"
  envs+=("XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}")
  envs+=("JAX_PLATFORMS=cuda")
else
  ((devices == 0)) || xla_flags+="${xla_flags:+ }--xla_force_host_platform_device_count=$devices"
  envs+=("JAX_PLATFORMS=cpu")
fi
[[ -z "$xla_flags" ]] || envs+=("XLA_FLAGS=$xla_flags")


cmd=(env "${envs[@]}" "$python" -m jaxllm.train "${args[@]}")
if ((dry_run)); then
  shq "${cmd[@]}"
  echo
  exit 0
fi
cd "$(dirname "$0")/.."
exec "${cmd[@]}"
