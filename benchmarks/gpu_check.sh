#!/usr/bin/env bash
# GPU check: the test suite un-interpreted on one CUDA GPU, then the kernel, fused LM-head and
# training-step benchmarks at GPU shapes — under 6 minutes in all, every result under OUT_DIR.
#
#   benchmarks/gpu_check.sh OUT_DIR                        # from any folder; runs in the repo root
#   GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh OUT_DIR    # print the steps and their limits, run nothing
#
# Needs one CUDA GPU and a python with torch, triton, transformers, peft, pytest (matplotlib for the
# plots). No network and no pip install: the package is used in place (PYTHONPATH = repo root). The
# C++ CPU extension is built in place when a compiler exists (in the background, while the GPU
# benchmarks run; a failed build is ignored). Peers — liger-kernel, cut-cross-entropy — are optional:
# their providers are left out when they do not import; flash-attn is never needed.
#
# Environment: PYTHON (default: python, else python3); GPU_CHECK_BUDGET_S (default 345: every step
# together, the 6-minute budget less start-up); GPU_CHECK_SKIP_BUILD=1 (no C++ build);
# GPU_CHECK_DRY_RUN=1; GPU_CHECK_ARCHIVE=FILE.tar.gz (also pack OUT_DIR into that one file, for a
# machine that hands back few files); MDPO_GIT_REV=REV (the revision to stamp on every result where
# the tree is a copy without .git: `MDPO_GIT_REV=$(git rev-parse --short HEAD)` where it was copied from).
#
# Each step runs under `timeout` with its own cap, never past the overall deadline; a failed or
# timed-out step is recorded and the next one runs. Steps marked "extra" run only if time is left.
# OUT_DIR gets: env.txt, build.log, tests.log, <step>.log, one folder per benchmark with its JSON,
# markdown and PNG, and summary.txt (also printed at the end).
set -u -o pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: benchmarks/gpu_check.sh OUT_DIR   (GPU_CHECK_DRY_RUN=1 to print the steps only)" >&2
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$REPO" || exit 2

DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-345}
MIN_STEP_S=15  # a step with less time than this left is skipped, not started
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v python >/dev/null 2>&1; then PY=python
else PY=python3
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + BUDGET))
SUMMARY=()

now() { date +%s; }

# run_step NAME CAP_S KIND COMMAND — KIND is "core" or "extra"; output to OUT/NAME.log (and the screen).
run_step() {
    local name=$1 cap=$2 kind=$3 cmd=$4
    local left=$((DEADLINE - $(now)))
    local limit=$((cap < left ? cap : left))
    if [ "$DRY" = "1" ]; then
        echo "[dry-run] $name ($kind, timeout ${cap}s): $cmd"
        SUMMARY+=("$(printf '%-22s %-18s %6s  %s' "$name" "dry-run" "-" "$OUT/$name.log")")
        return 0
    fi
    if [ "$limit" -lt "$MIN_STEP_S" ]; then
        echo "=== $name: skipped, ${left}s left of the ${BUDGET}s budget"
        SUMMARY+=("$(printf '%-22s %-18s %6s  %s' "$name" "skipped (no time)" "-" "-")")
        return 0
    fi
    echo "=== $name (timeout ${limit}s): $cmd"
    local t0 rc status
    t0=$(now)
    timeout -k 10 "$limit" bash -c "$cmd" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMEOUT (${limit}s)" ;;
        *) status="FAILED (rc=$rc)" ;;
    esac
    SUMMARY+=("$(printf '%-22s %-18s %5ss  %s' "$name" "$status" "$(($(now) - t0))" "$OUT/$name.log")")
}

# --------------------------------------------------------------------------------------- preflight
if [ "$DRY" != "1" ]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is false); nothing run" >&2
        exit 2
    fi
    {
        echo "date: $(date -u +%FT%TZ)"
        if [ -n "${MDPO_GIT_REV:-}" ]; then GIT_REV="$MDPO_GIT_REV (MDPO_GIT_REV)"
        elif GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); then
            git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && GIT_REV+="+dirty"
        else GIT_REV="unknown (no git repository; set MDPO_GIT_REV)"; fi
        echo "repo: $REPO  git: $GIT_REV"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
        "$PY" - <<'EOF' 2>&1
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0))
for name in ("triton", "transformers", "peft", "accelerate", "liger_kernel", "cut_cross_entropy", "flash_attn", "pytest", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'importable')}")
    except Exception as exc:  # absent peers are expected
        print(f"{name}: not importable ({type(exc).__name__})")
EOF
    } > "$OUT/env.txt"
    cat "$OUT/env.txt"
fi

# Peers that import here: one python start for both (none when python is missing in a dry run).
PEERS=$("$PY" -c '
import importlib
found = []
for name in ("liger_kernel", "cut_cross_entropy"):
    try:
        importlib.import_module(name)
        found.append(name)
    except Exception:  # absent or broken: its providers are left out
        pass
print(" ".join(found))
' 2>/dev/null)
LOGPROBS_PROVIDERS="ours,ours-inplace,eager,compile"
LINEAR_PROVIDERS="ours,naive,gemms,torch-lce"
case " $PEERS " in *" liger_kernel "*) LOGPROBS_PROVIDERS+=",liger"; LINEAR_PROVIDERS+=",liger" ;; esac
case " $PEERS " in *" cut_cross_entropy "*) LINEAR_PROVIDERS+=",cce" ;; esac
echo "peers importable: ${PEERS:-none}"

# ------------------------------------------------------------- C++ extension, built in the background
BUILD_PID=""
BUILD_CMD="$PY setup.py build_ext --inplace"
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = "1" ]; then
    echo "=== build: skipped (GPU_CHECK_SKIP_BUILD=1)"
    SUMMARY+=("$(printf '%-22s %-18s %6s  %s' build "skipped (asked)" "-" "-")")
elif ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
    echo "=== build: skipped (no C++ compiler); CPU ops use the chunked torch path"
    SUMMARY+=("$(printf '%-22s %-18s %6s  %s' build "skipped (no c++)" "-" "-")")
elif [ "$DRY" = "1" ]; then
    echo "[dry-run] build (background, timeout 90s, failure ignored): $BUILD_CMD"
    SUMMARY+=("$(printf '%-22s %-18s %6s  %s' build "dry-run" "-" "$OUT/build.log")")
else
    echo "=== build (background, timeout 90s, failure ignored): $BUILD_CMD"
    (t0=$(now); timeout -k 10 90 $BUILD_CMD > "$OUT/build.log" 2>&1; echo "$? $(($(now) - t0))" > "$OUT/build.rc") &
    BUILD_PID=$!
fi

# ------------------------------------------------------------------------ steps (GPU shapes, short)
# Kernel benchmarks first: they do not touch the C++ extension (explicit providers, CUDA dispatch).
run_step logprobs 40 core \
    "$PY -m benchmarks.logprobs --device cuda --dtype bfloat16 --quick --shapes 16384x32000 --modes full --providers $LOGPROBS_PROVIDERS --results-dir $OUT/logprobs"
run_step linear_logprobs 40 core \
    "$PY -m benchmarks.linear_logprobs --device cuda --dtype bfloat16 --shapes c --heads frozen --providers $LINEAR_PROVIDERS --budget-s 0.5 --results-dir $OUT/linear_logprobs"

if [ -n "$BUILD_PID" ]; then  # the tests exercise the extension when it exists
    wait "$BUILD_PID"
    read -r BUILD_RC BUILD_S < "$OUT/build.rc" 2>/dev/null || { BUILD_RC="?"; BUILD_S="?"; }
    if [ "$BUILD_RC" = "0" ] && ls mdpo_kernels/_C*.so >/dev/null 2>&1; then BUILD_STATUS="ok"
    else BUILD_STATUS="failed (ignored)"; fi
    SUMMARY+=("$(printf '%-22s %-18s %5ss  %s' build "$BUILD_STATUS" "$BUILD_S" "$OUT/build.log")")
    echo "=== build: $BUILD_STATUS"
fi

# pytest-xdist (in the GPU machine's image) spreads the suite over half the cores, 2 threads each.
WORKERS=$(( $(nproc 2>/dev/null || echo 2) / 2 )); [ "$WORKERS" -gt 8 ] && WORKERS=8
XDIST=""
if [ "$WORKERS" -ge 2 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST="-n $WORKERS"; fi
run_step tests 140 core "OMP_NUM_THREADS=2 MDPO_TEST_DEVICE=cuda $PY -m pytest -q $XDIST --durations=10 tests/"  # run_step tees it to OUT/tests.log
run_step train_step 75 core \
    "$PY -m benchmarks.train_step --device cuda --dtype bfloat16 --budget-s 2 --results-dir $OUT/train_step"
# Extras, while time is left: the README's main job on the GPU (bf16, the trainer's CUDA path that the
# fp32 tests do not take), the other vocabulary, checkpointed activations, the other VLM shape.
MJ=$OUT/main_job; SC=$MJ/sample_data/scenes
run_step main_job 120 extra \
    "$PY -m mdpo.data.cli make-sample $MJ/sample_data --scenes && $PY -m mdpo.train configs/tiny-cpu-sft.yaml data.path=$SC/sft.json model.path=$SC/model output_dir=$MJ/sft progress_bar=false && $PY -m mdpo.train configs/tiny-cpu.yaml data.path=$SC/pairs.json data.eval_path=$SC/eval.json model.path=$MJ/sft/final output_dir=$MJ/run progress_bar=false"
run_step logprobs_v151936 40 extra \
    "$PY -m benchmarks.logprobs --device cuda --dtype bfloat16 --quick --shapes 16384x151936 --modes full --providers $LOGPROBS_PROVIDERS --results-dir $OUT/logprobs_v151936"
run_step train_step_ckpt 60 extra \
    "$PY -m benchmarks.train_step --device cuda --dtype bfloat16 --grad-ckpt --budget-s 2 --results-dir $OUT/train_step"
# One GPU, one process: a DDP and an FSDP2 run of the same tiny config (bf16, LoRA), their losses side by side.
FS=$OUT/fsdp2_step
run_step fsdp2_step 60 extra \
    "$PY -m mdpo.data.cli make-sample $FS/data --n 32 --eval 8 && for e in ddp fsdp2; do $PY -m mdpo.train model.preset=tiny-llava data.path=$FS/data/data.json output_dir=$FS/\$e distributed.engine=\$e max_steps=3 micro_batch_size=4 effective_batch_size=8 data.max_length=256 model.lora_dropout=0 progress_bar=false report_to=none plots=false || exit 1; done && $PY -c \"import json,sys; r=[[json.loads(l)['loss/total'] for l in open(sys.argv[i]+'/metrics.jsonl')] for i in (1,2)]; print('fsdp2 vs ddp losses', r, 'max |diff|', max(abs(a-b) for a,b in zip(*r)))\" $FS/ddp $FS/fsdp2"
run_step linear_logprobs_b 35 extra \
    "$PY -m benchmarks.linear_logprobs --device cuda --dtype bfloat16 --shapes b --heads frozen,trained --providers $LINEAR_PROVIDERS --budget-s 0.3 --results-dir $OUT/linear_logprobs_b"

# --------------------------------------------------------------------------------------- summary
{
    echo
    echo "================ gpu_check summary ($(($(now) - START))s of ${BUDGET}s) — $OUT"
    printf '%-22s %-18s %6s  %s\n' step status time log
    printf '%s\n' "${SUMMARY[@]}"
    if [ -f "$OUT/tests.log" ]; then
        echo
        echo "pytest: $(grep -E '(passed|failed|error|no tests ran)' "$OUT/tests.log" | tail -n 1)"
    fi
    TARGETS=$(grep -E '^target:' "$OUT"/*.log 2>/dev/null | sed "s|^$OUT/||" || true)
    if [ -n "$TARGETS" ]; then
        echo
        echo "targets:"
        echo "$TARGETS"
    fi
    RESULTS=$(find "$OUT" -mindepth 2 -name '*.json' 2>/dev/null | sort)
    if [ -n "$RESULTS" ]; then
        echo
        echo "results:"
        echo "$RESULTS"
    fi
} | tee "$OUT/summary.txt"

if [ -n "${GPU_CHECK_ARCHIVE:-}" ] && [ "$DRY" != "1" ]; then
    tar -czf "$GPU_CHECK_ARCHIVE" -C "$OUT" . && echo "archive: $GPU_CHECK_ARCHIVE ($(du -h "$GPU_CHECK_ARCHIVE" | cut -f1))"
fi
