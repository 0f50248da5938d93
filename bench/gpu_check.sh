#!/usr/bin/env bash
# Everything a lent GPU session should run, in stages that each fit one device call (<= 10 min).
# Logs and result rows go under $OUT (the device tool brings them back); the last lines printed are
# a short summary.
#
#   bash bench/gpu_check.sh tests     # the whole test suite on CUDA (gpu-marked cases included)
#   bash bench/gpu_check.sh kernels   # bench_linear_logprob --record: shapes A/B vs baselines + floor
#   bash bench/gpu_check.sh step      # bench_step: Qwen3-4B both paths, then 8B/14B with offload
#   bash bench/gpu_check.sh all       # the three, in that order
#
# The device machines have torch, triton and transformers but no network: carry the small wheels
# (liger-kernel, cut-cross-entropy, math-verify and its latex2sympy2-extended/antlr4 needs) in .whl/
# (see the device tool's README; the device call names .whl in `carry`); this script installs
# whatever is there into /tmp/site.
set -u
stage=${1:-all}
OUT=${OUT:-/tmp/resrl-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.csv" 2>&1
python3 - > "$OUT/versions.txt" 2>&1 <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for name in ("triton", "transformers", "liger_kernel", "cut_cross_entropy", "math_verify", "flash_attn", "vllm"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "installed"))
    except Exception as e:
        print(name, "missing:", type(e).__name__)
EOF

summary=()
run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, remember the exit code
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name: exit $rc ($(tail -n 1 "$OUT/$name.log" | cut -c1-150))")
}

if [[ $stage == tests || $stage == all ]]; then
    run tests 420 python3 -m pytest -q -p no:logging -x tests
fi
if [[ $stage == kernels || $stage == all ]]; then
    run kernels 420 python3 bench/bench_linear_logprob.py --record
fi
if [[ $stage == step || $stage == all ]]; then
    run step_4b 240 python3 bench/bench_step.py --model qwen3-4b --offload --record
    run step_8b 180 python3 bench/bench_step.py --model qwen3-8b --offload --paths resrl --record
    run step_14b 150 python3 bench/bench_step.py --model qwen3-14b --offload --paths resrl --record
fi
cp bench/results/*.jsonl "$OUT/" 2> /dev/null
cat "$OUT/versions.txt"
for line in "${summary[@]}"; do echo "$line"; done
for name in kernels step_4b step_8b step_14b; do
    [[ -f $OUT/$name.log ]] && tail -n 12 "$OUT/$name.log"
done
exit 0
