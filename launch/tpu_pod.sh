#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod): every worker runs the same command;
# JAX finds the others itself (jax.distributed.initialize auto-detection on TPU).
#
#   launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE [--project=P] [--type=v4-32]
#                     [--version=RUNTIME] [--spot] ACTION [-- TRAIN_ARGS...]
#
# ACTION
#   create   reuse the TPU VM NAME if it exists, else create it (--type, --version, --spot)
#   setup    copy this checkout (tar, gcloud scp) to ~/jaxllm on all workers, pip install it
#   train    run `python3 -m jaxllm.train TRAIN_ARGS` on all workers at once, streaming
#            the output (process 0 logs) and keeping it in ~/jaxllm-train.log on each worker
#   logs     follow worker 0's ~/jaxllm-train.log (after a dropped connection)
#   delete   delete the TPU VM
#   up       create + setup + train
# --dry-run prints the exact commands, one per line, instead of running them.
#
# TPU environment of `train` (LIBTPU_INIT_ARGS; export JAXLLM_LIBTPU_INIT_ARGS to replace
# it, "" for libtpu's defaults). The flags MaxText sets to overlap FSDP's collectives with
# compute, from AI-Hypercomputer/maxtext benchmarks/xla_flags_library.py:
#   CF_FOR_ALL_GATHER: --xla_tpu_enable_async_collective_fusion,
#       --xla_tpu_enable_async_collective_fusion_fuse_all_gather,
#       --xla_tpu_enable_async_collective_fusion_multiple_steps,
#       --xla_tpu_overlap_compute_collective_tc, --xla_enable_async_all_gather
#       (the parameter all-gathers of FSDP run as continuation fusions beside the matmuls);
#   CF_FOR_ALL_REDUCE: --xla_enable_async_all_reduce (gradient reductions likewise);
#   DATA_PARALLEL_OVERLAP: --xla_tpu_enable_data_parallel_all_reduce_opt,
#       --xla_tpu_data_parallel_opt_different_sized_ops (pipeline the data-parallel
#       all-reduces across iterations; the DCN ones between slices).
# MaxText's --xla_tpu_scoped_vmem_limit_kib=98304 is left out: it exceeds v4's VMEM.
#
# The workdir must be one directory all workers share (checkpoints are written collectively
# by Orbax, each worker its own shards): an NFS/Filestore or gcsfuse mount, e.g.
#   launch/tpu_pod.sh --name=llm --zone=us-central2-b --type=v4-32 up -- \
#       --config=configs/llama_1b.py --workdir=/mnt/shared/llama1b --config.mesh.fsdp=-1
set -euo pipefail

dry_run=0
name="" zone="" project="" type="v4-8" version="" spot=0 action=""
train_args=()
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --type=*) type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --spot) spot=1 ;;
    --) shift; train_args=("$@"); break ;;
    create|setup|train|logs|delete|up) action="$1" ;;
    *) echo "error: unknown argument '$1'; see the header of $0" >&2; exit 2 ;;
  esac
  shift
done

# die, shq (shell quoting): shared with the other launchers
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -n "$action" ]] || die "ACTION: missing; allowed: create, setup, train, logs, delete, up"
[[ -n "$name" ]] || die "--name: required (the TPU VM name)"
[[ -n "$zone" ]] || die "--zone: required (e.g. us-central2-b)"
if [[ -z "$version" ]]; then  # the TPU software image matching the generation
  case "$type" in
    v4-*|v3-*|v2-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) die "--type: unknown TPU type '$type'; pass --version=RUNTIME explicitly" ;;
  esac
fi

tpu="gcloud compute tpus tpu-vm"
where="--zone=$(shq "$zone")${project:+ --project=$(shq "$project")}"
src="/tmp/jaxllm-src-$name.tgz"
root="$(cd "$(dirname "$0")/.." && pwd)"
log='~/jaxllm-train.log'
overlap="--xla_tpu_enable_async_collective_fusion=true"
overlap+=" --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true"
overlap+=" --xla_tpu_enable_async_collective_fusion_multiple_steps=true"
overlap+=" --xla_tpu_overlap_compute_collective_tc=true"
overlap+=" --xla_enable_async_all_gather=true --xla_enable_async_all_reduce=true"
overlap+=" --xla_tpu_enable_data_parallel_all_reduce_opt=true"
overlap+=" --xla_tpu_data_parallel_opt_different_sized_ops=true"
libtpu_args="${JAXLLM_LIBTPU_INIT_ARGS-$overlap}"

run() {  # print (dry run) or run one shell command line
  if ((dry_run)); then echo "$1"; else bash -c "$1"; fi
}

do_create() {
  run "$tpu describe $(shq "$name") $where --format='value(state)' >/dev/null 2>&1 || $tpu create $(shq "$name") $where --accelerator-type=$(shq "$type") --version=$(shq "$version")$( ((spot)) && echo ' --spot')"
}
do_setup() {
  run "tar czf $(shq "$src") --exclude=.git --exclude=.venv --exclude=.whl --exclude=runs --exclude='*.pyc' -C $(shq "$root") ."
  run "$tpu scp $(shq "$src") $(shq "$name"):~/jaxllm-src.tgz --worker=all $where"
  run "$tpu ssh $(shq "$name") --worker=all $where --command='mkdir -p ~/jaxllm && tar xzf ~/jaxllm-src.tgz -C ~/jaxllm && pip install -q -U \"jax[tpu]\" && pip install -q -e ~/jaxllm'"
}
do_train() {
  local env="${libtpu_args:+LIBTPU_INIT_ARGS=$(shq "$libtpu_args") }"
  local remote="cd ~/jaxllm && ${env}python3 -m jaxllm.train${train_args:+ $(shq "${train_args[@]}")} 2>&1 | tee $log"
  run "$tpu ssh $(shq "$name") --worker=all $where --command=$(shq "$remote")"
}
do_logs() {
  run "$tpu ssh $(shq "$name") --worker=0 $where --command='tail -n 200 -f $log'"
}
do_delete() {
  run "$tpu delete $(shq "$name") $where --quiet"
}

case "$action" in
  up) do_create; do_setup; do_train ;;
  *) "do_$action" ;;
esac
