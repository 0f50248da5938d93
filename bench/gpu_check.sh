#!/usr/bin/env bash
# What a lent GPU session runs, in stages that each fit one device call; expected on one H100
# (bench/NOTES.md): about 4 + 2 + 6 minutes, with a machine start (1-2 min) inside a session's 15.
# Each stage stops itself at its budget (the first one's counts from the script's start), so a
# device call with timeout_s = budget + 30 always brings its archive back.
#
#   bash bench/gpu_check.sh tests     # budget 420 s: gpu-marked cases, then the rest (-n 8)
#   bash bench/gpu_check.sh kernels   # budget 200 s: bench_linear_logprob --record, shapes A and B
#   bash bench/gpu_check.sh step      # budget 460 s: bench_step --record, Qwen3-1.7B both paths, then
#                                     #   Qwen3-4B resrl with CPU offload (~66 GiB host)
#   bash bench/gpu_check.sh all       # the three in turn (longer than one 10-minute device call)
#   bash bench/gpu_check.sh --cpu-smoke STAGE   # the same script on the CPU at tiny sizes
#
# Before the device call, here: `make gpu-wheels` (the wheels the machine lacks and .whl/commit.json,
# the commit the rows name: the machine's copy of the tree has no .git); the call names .whl in
# `carry`. Output: $OUT/gpu_check.tar.gz (gpu_check/: summary, versions and commit, logs/, junit/,
# the tests marker, results/ with only the rows this run appended) and $OUT/summary.txt, both rewritten after every
# step, so a stop keeps what finished. Rows are appended to $RESRL_RESULTS_DIR (default
# bench/results) the moment each case ends.
#
# Environment: OUT (default: a new temp folder), RESRL_RESULTS_DIR (smoke default: a temp folder),
# RESRL_PYTHON (default python3; smoke: .venv/bin/python where present).
set -u
smoke=0
if [[ ${1:-} == --cpu-smoke ]]; then
    smoke=1
    shift
fi
stage=${1:-all}
case $stage in tests | kernels | step | all) ;; *)
    echo "gpu_check.sh: unknown stage '$stage'; accepted: tests, kernels, step, all (after --cpu-smoke or not)" >&2
    exit 2
    ;;
esac

# Paths the caller gave are theirs; the script runs from the repository's root.
[[ -n ${OUT:-} ]] && OUT=$(realpath -m "$OUT")
[[ -n ${RESRL_RESULTS_DIR:-} ]] && RESRL_RESULTS_DIR=$(realpath -m "$RESRL_RESULTS_DIR")
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
work=$tmp/gpu_check
mkdir -p "$work/logs" "$work/junit" "$work/results"
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_out.XXXXXX")}
mkdir -p "$OUT"
py=${RESRL_PYTHON:-python3}
if ((smoke)); then
    [[ -z ${RESRL_PYTHON:-} && -x .venv/bin/python ]] && py=$PWD/.venv/bin/python
    export RESRL_RESULTS_DIR=${RESRL_RESULTS_DIR:-$tmp/results_dir}
fi
export RESRL_RESULTS_DIR=${RESRL_RESULTS_DIR:-$PWD/bench/results}
mkdir -p "$RESRL_RESULTS_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# torchrun on a free port: test files that launch it may run at once under pytest-xdist.
export PET_STANDALONE=1

# Sizes: the only thing --cpu-smoke changes besides the device.
declare -A budget=([tests]=420 [kernels]=200 [step]=460)
if ((smoke)); then
    test_args=(tests/test_linear_logprob.py -k "bad_input or zero_tokens or unknown_impl or gpu")
    kernel_args=(--device cpu --shapes smoke --reps 2)
    step_args=(--device cpu --prompts 2 --n 2 --prompt-len 8 --response-len 16 --micro-batch-tokens 64 --steps 1)
    # NAME MODEL PATHS PATH_TIMEOUT_S [EXTRA_ARGS]
    step_cases=("step_small tiny resrl,reference 100" "step_offload tiny resrl 100 --offload")
else
    # Not the script's own CPU twin (tests/test_gpu_check.py): it would nest this script in itself.
    test_args=(tests -k "not cpu_smoke")
    kernel_args=()
    step_args=()
    step_cases=("step_1.7b qwen3-1.7b resrl,reference 95" "step_4b_offload qwen3-4b resrl 220 --offload")
fi

# Rows already in the results files: the archive takes only what this run appends.
declare -A rows_before=()
for f in "$RESRL_RESULTS_DIR"/*.jsonl; do
    [[ -f $f ]] && rows_before[$(basename "$f")]=$(stat -c %s "$f")
done

summary=()
last_rc=0
failures=0
stage_end=0

pack() {  # the archive and the summary in $OUT, rebuilt after every step
    local f name before
    for f in "$RESRL_RESULTS_DIR"/*.jsonl; do
        [[ -f $f ]] || continue
        name=$(basename "$f")
        before=${rows_before[$name]:-0}
        (($(stat -c %s "$f") > before)) && tail -c +$((before + 1)) "$f" > "$work/results/$name"
    done
    [[ -f $RESRL_RESULTS_DIR/.tests_green.json ]] && cp "$RESRL_RESULTS_DIR/.tests_green.json" "$work/tests_marker.json"
    printf '%s\n' "${summary[@]}" > "$work/summary.txt"
    tar -czf "$OUT/gpu_check.tar.gz.part" -C "$tmp" gpu_check && mv -f "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
    cp "$work/summary.txt" "$OUT/summary.txt"
}

run() {  # run NAME LIMIT_S CMD...: logs/NAME.log, at most LIMIT_S and never past the stage's budget
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    # 10 s of each budget stay for `timeout`'s grace before SIGKILL and for packing.
    local left=$((stage_end - SECONDS - 10))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        last_rc=124
        failures=$((failures + 1))
        summary+=("$name: not run, the stage's budget is spent")
        pack
        return
    fi
    echo "== $name (at most $limit s):$(printf ' %q' "$@")"
    # SIGINT first: pytest then writes its junit file and summary, Python benchmarks their rows.
    timeout -s INT -k 10 "$limit" "$@" > "$work/logs/$name.log" 2>&1
    last_rc=$?
    ((last_rc != 0)) && failures=$((failures + 1))
    local how="exit $last_rc"
    ((last_rc == 124)) && how="STOPPED at its $limit s limit"
    summary+=("$name: $how after $((SECONDS - t0)) s | $(grep -v '^\s*$' "$work/logs/$name.log" | tail -n 1 | cut -c1-160)")
    pack
}

begin_stage() {  # the first stage's budget counts from the script's start (setup included)
    stage_end=$(((stage_end > 0 ? SECONDS : 0) + ${budget[$1]}))
    summary+=("-- stage $1 (budget ${budget[$1]} s)")
}

# --- what this machine is, and the wheels it lacks ----------------------------------------------
# On the GPU machine (fresh, discarded after) into python3's own environment: tests that start
# processes with PYTHONPATH=<repo> would not see a --target folder. The smoke run leaves this
# machine's venv alone: a folder on PYTHONPATH (also the fallback where the environment is read-only).
site=$tmp/site
install_wheels() {  # install_wheels [TARGET_FOLDER]
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade ${1:+--target "$1"} \
        .whl/*.whl >> "$work/logs/wheels.log" 2>&1
}
if ls .whl/*.whl > /dev/null 2>&1; then
    n_wheels=$(ls .whl/*.whl | wc -l)
    if ((!smoke)) && install_wheels; then
        summary+=("wheels: $n_wheels from .whl/ installed into $py's environment")
    elif install_wheels "$site"; then
        export PYTHONPATH="$PYTHONPATH:$site"
        summary+=("wheels: $n_wheels from .whl/ installed into $site, on PYTHONPATH")
    else
        summary+=("wheels: INSTALL FAILED (logs/wheels.log)")
    fi
else
    summary+=("wheels: none in .whl/ (make gpu-wheels): math-verify, liger-kernel, cut-cross-entropy may be missing")
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv || echo "no nvidia-smi"; } > "$work/gpu.csv" 2>&1
"$py" -m pip list --format=freeze > "$work/pip_list.txt" 2>&1
"$py" - > "$work/versions.txt" 2>&1 << 'EOF'
import importlib, importlib.metadata, os, sys
import torch
from bench.common import git_commit, tree_fingerprint
cuda = torch.cuda.is_available()
print("python", sys.version.split()[0], "| cpus", os.cpu_count())
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if cuda else "no GPU")
mods = {"triton": "triton", "transformers": "transformers", "liger_kernel": "liger-kernel",
        "cut_cross_entropy": "cut-cross-entropy", "math_verify": "math-verify",
        "latex2sympy2_extended": "latex2sympy2_extended", "antlr4": "antlr4-python3-runtime",
        "xdist": "pytest-xdist", "pytest_timeout": "pytest-timeout", "flash_attn": "flash-attn", "vllm": "vllm"}
for mod, dist in mods.items():
    try:
        importlib.import_module(mod)
        print(dist, importlib.metadata.version(dist))
    except Exception as e:
        print(dist, "missing:", type(e).__name__)
print("commit", git_commit(), "| tree", tree_fingerprint())
EOF
summary+=("$(grep '^torch' "$work/versions.txt") | $(grep '^commit' "$work/versions.txt")")
((smoke)) && summary+=("mode: --cpu-smoke (tiny sizes on the CPU)")
pack

# --- stages ---------------------------------------------------------------------------------------
if [[ $stage == tests || $stage == all ]]; then
    begin_stage tests
    common=(-q -p no:cacheprovider)
    parallel=()
    "$py" -c "import xdist" 2> /dev/null && parallel=(-n 8)
    "$py" -c "import pytest_timeout" 2> /dev/null && parallel+=(--timeout 150)
    # The GPU's own cases first (bf16 kernels vs PyTorch, the trainer and both step paths in bf16),
    # then everything else: a suite that runs out of time still leaves these.
    run tests_gpu 150 "$py" -m pytest "${common[@]}" -m gpu --junitxml="$work/junit/tests_gpu.xml" "${test_args[@]}"
    rc_gpu=$last_rc
    run tests_suite 400 "$py" -m pytest "${common[@]}" "${parallel[@]}" --durations 25 -m "not gpu" \
        --junitxml="$work/junit/tests_suite.xml" "${test_args[@]}"
    rc_suite=$last_rc
    # The outcome per test file, with the tree and device: the kernels stage records after it
    # (also in a later device call) instead of rerunning the kernel tests.
    "$py" bench/common.py tests-marker --selection "${test_args[*]}" \
        "$work/junit/tests_gpu.xml:$rc_gpu" "$work/junit/tests_suite.xml:$rc_suite" > "$work/logs/tests_marker.log" 2>&1
    summary+=("tests marker: $(tail -n 1 "$work/logs/tests_marker.log")")
    pack
fi

if [[ $stage == kernels || $stage == all ]]; then
    begin_stage kernels
    run kernels 190 "$py" bench/bench_linear_logprob.py --record "${kernel_args[@]}"
fi

if [[ $stage == step || $stage == all ]]; then
    begin_stage step
    for case in "${step_cases[@]}"; do
        read -r name model paths path_timeout extra <<< "$case"
        commas=${paths//[^,]/}
        # shellcheck disable=SC2086
        run "$name" $(((${#commas} + 1) * path_timeout + 20)) "$py" bench/bench_step.py --model "$model" \
            --paths "$paths" --path-timeout "$path_timeout" --record "${step_args[@]}" $extra
    done
fi

echo
cat "$work/versions.txt"
echo
printf '%s\n' "${summary[@]}"
for log in kernels "${step_cases[@]%% *}"; do
    [[ -f $work/logs/$log.log ]] && { echo "-- $log (last lines)"; tail -n 14 "$work/logs/$log.log"; }
done
echo
echo "archive: $OUT/gpu_check.tar.gz ($(ls "$OUT" | wc -l) files in \$OUT); $failures step(s) failed"
# Failed or stopped steps are in the summary; the exit code says whether there were any.
((failures == 0))
