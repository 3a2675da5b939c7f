#!/usr/bin/env bash
# Set up and run jaxgrm on every worker (host) of a Cloud TPU VM, one process per host.
# See experiments/tpu/README.md.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: experiments/tpu/run_pod.sh setup TPU_NAME ZONE PROJECT
       experiments/tpu/run_pod.sh run   TPU_NAME ZONE PROJECT [LAUNCH_OPTIONS] -- JAXGRM_ARGS...

  setup  copy this checkout's tracked files to $REPO_DIR on all workers and install it there in
         a virtual environment $REPO_DIR/.venv (pip install -e . "jax[tpu]"); rerun it to ship
         code changes
  run    on all workers at once: cd $REPO_DIR && .venv/bin/python -m experiments.tpu.launch ARGS
         e.g. run my-tpu us-central2-b my-project -- rl --config experiments/configs/world_rl.py \
                  --workdir /mnt/shared/runs/world_rl
              run my-tpu us-central2-b my-project --check

environment:
  REPO_DIR  the checkout on the workers; a relative path is under the login home (default: jaxgrm)
  PYTHON    the workers' Python 3.11 or newer that setup builds the environment with
            (default: python3)
  JAX_SPEC  what setup installs for JAX (default: jax[tpu]>=0.10,<0.11, as pyproject.toml pins)
EOF
  exit 2
}

[[ $# -ge 4 ]] || usage
mode=$1 name=$2 zone=$3 project=$4
shift 4
repo_dir=${REPO_DIR:-jaxgrm}
python=${PYTHON:-python3}
jax_spec=${JAX_SPEC:-"jax[tpu]>=0.10,<0.11"}
q() { printf '%q' "$1"; }
tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone" --project "$project" --worker=all)

case $mode in
  setup)
    [[ $# -eq 0 ]] || usage
    root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
    archive=$(mktemp "${TMPDIR:-/tmp}/jaxgrm-src.XXXXXX")
    trap 'rm -f "$archive"' EXIT
    # Tracked files plus uncommitted edits to them, without runs/ or other untracked outputs.
    (cd "$root" && git ls-files -z | tar --null -T - -czf "$archive")
    "${tpu[@]}" scp "$archive" "$name:jaxgrm-src.tar.gz" "${where[@]}"
    remote="mkdir -p $(q "$repo_dir") && tar -xzf jaxgrm-src.tar.gz -C $(q "$repo_dir")"
    remote+=" && rm jaxgrm-src.tar.gz && cd $(q "$repo_dir")"
    remote+=" && { [[ -x .venv/bin/python ]] || $(q "$python") -m venv .venv; }"
    remote+=" && .venv/bin/python -m pip install -q -U pip"
    remote+=" && .venv/bin/python -m pip install -q -e . $(q "$jax_spec")"
    remote+=" && .venv/bin/python -c 'import jax, jaxgrm; print(\"jax\", jax.__version__)'"
    "${tpu[@]}" ssh "$name" "${where[@]}" --command "$remote"
    ;;
  run)
    [[ $# -ge 1 ]] || usage
    remote="cd $(q "$repo_dir") && .venv/bin/python -m experiments.tpu.launch"
    for arg in "$@"; do
      remote+=" $(q "$arg")"
    done
    "${tpu[@]}" ssh "$name" "${where[@]}" --command "$remote"
    ;;
  *)
    usage
    ;;
esac
