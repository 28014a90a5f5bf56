#!/usr/bin/env bash
# Everything a GPU machine should check, in one go: the CUDA tests, the benchmark table,
# the IS batch/chunk sweep and the compile modes. Each part has its own time limit and
# a failing part does not stop the next; JSON, the PNG and one log (check.log) go to OUTDIR.
#   benchmarks/gpu_check.sh OUTDIR [bench seconds per repeat]
# SKIP="is_sweep compile_modes" leaves parts out.
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR [seconds]}
secs=${2:-0.25}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
log="$out/check.log"
part() {  # part NAME LIMIT COMMAND...: run with a time limit; whole output to check.log, its end to stdout
    local name=$1 limit=$2; shift 2
    case " ${SKIP:-} " in *" $name "*) echo "=== $name: skipped"; return;; esac
    local part_log
    part_log=$(mktemp)
    echo "=== $name (limit ${limit}s) $(date +%T)"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$part_log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    tail -n "${TAIL:-40}" "$part_log"
    { echo "=== $name: exit $rc after $((SECONDS - t0)) s"; cat "$part_log"; } >> "$log"
    rm -f "$part_log"
}
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv 2>&1
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$log"
TAIL=12 part cuda_tests 140 $py -m pytest -q -p no:cacheprovider --no-header -rfE tests/test_cuda.py
TAIL=50 part bench 230 $py benchmarks/run.py --device "$dev" --name full-cuda --out "$out" --seconds "$secs" --repeats 3 \
    --compile
TAIL=12 part is_sweep 50 $py benchmarks/is_sweep.py --device "$dev" --batch 100,1000 --chunk 50,500,5000 \
    --out "$out/is-sweep-cuda.json"
TAIL=12 part compile_modes 110 $py benchmarks/compile_modes.py --device "$dev" --cases iwae-k50-b100,vae-k1-b20 --out "$out/compile-modes-cuda.json"
