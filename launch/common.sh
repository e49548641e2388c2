# Helpers sourced by launch/local.sh and launch/tpu_pod.sh (slurm.sbatch keeps its own copy:
# sbatch runs a spooled copy of the script, away from this folder).

die() { echo "error: $*" >&2; exit 2; }

# shell-quote each argument (bare when safe, else in single quotes), joined by spaces
shq() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ && "$a" != \~* ]]; then out+=("$a")
    else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  local IFS=' '; echo -n "${out[*]}"
}
