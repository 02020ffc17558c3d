#!/usr/bin/env bash
# Every measurement the open issues need from the 16-core / one-GPU machine,
# in four parts that each finish well inside one 10-minute device call:
#
#   benchmarks/device_suite.sh gpu     # GPU tests looped (up to 20 passes), driver files, GPU table
#   benchmarks/device_suite.sh allreduce  # distrib-bench --compare at 2, 4, 8, 16 ranks
#   benchmarks/device_suite.sh tune    # the shm engine's paths side by side at 4, 8, 16 ranks
#   benchmarks/device_suite.sh train   # DDP (both bucket layouts) and Hogwild scaling
#
# The timeouts are caps that keep each part inside one 10-minute device call
# (not yet run as a whole: written when no device machine was lent).
# Wheels for what the machine lacks (pyzmq; gymnasium and farama-notifications
# for Hogwild) are installed from WHEELS (default .whl, git-ignored: carry it)
# into /tmp/site. Fetch them once with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 -d .whl pyzmq==27.3.0 gymnasium==1.4.0 \
#     farama-notifications==0.0.6
# Each table also goes to $OUT/<name>.txt (or /tmp/device-out) so it comes back whole.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: device_suite.sh gpu|allreduce|tune|train}
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PY=$(command -v python3)
echo "# $(date -u +%FT%TZ) $(nproc) cores; $(nvidia-smi -L 2>/dev/null | head -1)"
echo "# git $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo +changes)"

# run SECONDS NAME CMD...: one bounded step whose output is also kept in $out/NAME.txt
run() {
  local t=$1 name=$2
  shift 2
  echo "=== $name: $*"
  timeout "$t" "$@" 2>&1 | tee "$out/$name.txt"
  echo "=== $name rc=${PIPESTATUS[0]}"
}

case $part in
gpu)
  # The GPU suite 20 times (or until 330 s are spent), then what the CUDA
  # driver left in /dev/shm (distrib removes a dead child's cuda.shm files),
  # then the GPU all-reduce table.
  files="tests/test_gpu_ipc.py tests/test_gpu_collectives.py tests/test_gpu_group.py tests/test_gpu_plan.py tests/test_ddp_gpu.py"
  ls /dev/shm >"$out/shm-before.txt"
  end=$((SECONDS + 330))
  passed=0
  for i in $(seq 1 20); do
    [ $SECONDS -ge $end ] && break
    if timeout 300 "$PY" -m pytest -q -p no:cacheprovider $files >"$out/gpu-last.txt" 2>&1; then
      passed=$((passed + 1))
      echo "pass $i: $(tail -1 "$out/gpu-last.txt")"
    else
      echo "FAIL $i"
      cp "$out/gpu-last.txt" "$out/gpu-fail-$i.txt"
    fi
  done
  echo "GPU suite: $passed passed of $i runs"
  ls /dev/shm >"$out/shm-after.txt"
  echo "/dev/shm entries new since the start:"
  comm -13 "$out/shm-before.txt" "$out/shm-after.txt"
  run 150 gpu-allreduce "$PY" -m distrib.bench._cli --device cuda
  ;;
allreduce)
  for n in 2 4 8 16; do
    run $((60 + 8 * n)) "ar$n" "$PY" -m distrib.bench._cli --nproc "$n" --ops all_reduce \
      --sizes 4K,64K,256K,1M,4M,16M,64M,256M --transport auto --compare --peer-python "$PY"
  done
  ;;
tune)
  for n in 4 8 16; do
    run 150 "tune$n" "$PY" benchmarks/tune_shm_thresholds.py --nproc "$n" --rounds 3
  done
  ;;
train)
  run 200 ddp "$PY" benchmarks/bench_ddp.py --ranks 1 2 4 8 16 --steps 10 --repeat 1 --peer-python "$PY"
  # with DDP's short last bucket (last_bucket_mb=1; off by default), where it should matter
  run 120 ddp-last-bucket "$PY" benchmarks/bench_ddp.py --ranks 1 8 --steps 10 --repeat 1 \
    --last-bucket-mb 1 --peer-python "$PY"
  run 150 hogwild "$PY" benchmarks/bench_hogwild.py --workers 1 2 4 8 16 --seconds 3
  ;;
*)
  echo "unknown part '$part': expected gpu, allreduce, tune or train" >&2
  exit 2
  ;;
esac
