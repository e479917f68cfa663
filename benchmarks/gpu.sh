#!/usr/bin/env bash
# The whole GPU check as one command (about 12 minutes on an H100): the CUDA tests, the solver-overhead rows beside
# TorchDEQ, and DEQ-Flow's peak-memory and step-time rows against RAFT. Each part has its own time limit and its
# output goes to $OUT (default gpu_results/); a failing part does not stop the others; the exit status is the number
# of failed parts. Record the device line and the tables in benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu.sh                      # uses .venv/bin/python when present, else python3
#   PY=python OUT=/tmp/gpu bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
failed=0

part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep its output, count a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local status=$?
    echo "   exit $status after $((SECONDS - started))s; output in $OUT/$name.txt"
    tail -n 5 "$OUT/$name.txt"
    [ "$status" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$OUT/device.txt"

part cuda_tests 270 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    "tests/test_flow_model.py::test_cuda_parity_and_training_step" "tests/test_doctor.py::test_cuda_float32" \
    "tests/test_jiio.py::test_cuda_matches_cpu"
part solver_overhead 270 "$PY" -m benchmarks.solver_overhead --device cuda --quick --only overhead,execution
part flow 180 "$PY" -m benchmarks.flow --device cuda --rows memory steptime --batch 1 --repeats 3

echo "== $failed part(s) failed"
exit "$failed"
