#!/usr/bin/env bash
# Every GPU path in one go, from a fresh clone, in under 5 minutes on a machine with NVIDIA GPUs:
#
#   benchmarks/gpu_check.sh              # set up, test, train one epoch of each recipe, time a step
#   benchmarks/gpu_check.sh --dry-run    # print what it would run and exit 0 (also what it does
#                                        # on a machine without a GPU)
#
# Each check below is one row of the summary table printed at the end:
#   1. setup      `make setup`: .venv with the CUDA build of torch (the Makefile's choice where
#                 nvidia-smi answers), the project, an MPI if none, MNIST
#   2. torch      torch sees the GPUs (its CUDA version, the device count and name)
#   3. tests      `pytest -m cuda`: fp16 with a GradScaler, NCCL across the GPUs there are,
#                 a device per local rank, a real fp16 run (tests/test_gpu.py, test_precision.py)
#   4. recipes    one epoch of each README recipe on the GPU, with LBANN's
#                 "Model 0 GPU memory usage statistics" line and the test accuracy; with two
#                 GPUs or more, also K-FAC on every GPU with NCCL
#   5. step time  benchmarks/step_time.py --device cuda: K-FAC's step against SGD's
# Logs: benchmarks/runs/gpu_check/<time>/ (git-ignored); the table also goes to summary.md there.
set -u
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or nothing)" >&2; exit 2 ;;
    esac
done

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [ "$GPUS" -eq 0 ] && [ "$DRY" -eq 0 ]; then
    echo "gpu_check.sh: no GPU here (nvidia-smi lists none); this is what it would run on one:"
    DRY=1
fi

PY=.venv/bin/python
LOGS="benchmarks/runs/gpu_check/$(date +%Y%m%d_%H%M%S)"
EPOCH="--num_epochs 1 trainer.device=cuda trainer.progress=false launcher.experiment_dir=$LOGS/experiments"
ROWS=()
FAILED=0

row() {  # name, result, seconds, detail
    ROWS+=("| $1 | $2 | $3 | $4 |")
}

# check NAME TIMEOUT_S COMMAND...: runs it (its output in $LOGS/NAME.log), or prints it in a dry run.
check() {
    local name=$1 limit=$2
    shift 2
    if [ "$DRY" -eq 1 ]; then
        echo "would run [$name] (at most ${limit} s): $*"
        row "$name" "not run (dry run)" "-" "-"
        return 0
    fi
    local log="$LOGS/$name.log" start=$SECONDS status=0
    echo "== $name: $*"
    timeout "$limit" "$@" >"$log" 2>&1 || status=$?
    LAST_LOG=$log
    LAST_SECONDS=$((SECONDS - start))
    if [ "$status" -eq 0 ]; then
        LAST_RESULT="ok"
    elif [ "$status" -eq 124 ]; then
        LAST_RESULT="TIMED OUT after ${limit} s"; FAILED=1
    else
        LAST_RESULT="FAILED (status $status)"; FAILED=1
    fi
    echo "   $LAST_RESULT in ${LAST_SECONDS} s (log: $log)"
    return "$status"
}

# recipe NAME ARGS...: one epoch of a README recipe on the GPU; the row holds the memory line.
recipe() {
    local name=$1
    shift
    # shellcheck disable=SC2086  # EPOCH is a list of words
    if check "$name" 150 "$PY" kfac.py "$@" $EPOCH && [ "$DRY" -eq 0 ]; then
        local memory accuracy
        memory=$(grep -m1 -o 'Model 0 GPU memory usage statistics : .*' "$LAST_LOG" | sed 's/.*statistics : //')
        accuracy=$(grep -o 'test \(accuracy\|reconstruction error\) : [0-9.]*%\{0,1\}' "$LAST_LOG" | tail -1 | sed 's/^test //')
        [ -n "$memory" ] || { LAST_RESULT="FAILED (no GPU memory line)"; FAILED=1; }
        row "$name" "$LAST_RESULT" "$LAST_SECONDS" "GPU memory: ${memory:-none}; ${accuracy:-no test line}"
    elif [ "$DRY" -eq 0 ]; then
        row "$name" "$LAST_RESULT" "$LAST_SECONDS" "see $LAST_LOG"
    fi
}

[ "$DRY" -eq 1 ] || mkdir -p "$LOGS"
echo "gpu_check.sh: $GPUS GPU(s); logs in $LOGS"

# 1-2: the CUDA build of torch, and that it sees the GPUs.
if check setup 240 make setup; then
    [ "$DRY" -eq 0 ] && row setup "$LAST_RESULT" "$LAST_SECONDS" "$($PY -c 'import torch; print("torch", torch.__version__)' 2>&1)"
elif [ "$DRY" -eq 0 ]; then
    row setup "$LAST_RESULT" "$LAST_SECONDS" "see $LAST_LOG"
fi
if check torch 60 "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch ' + torch.__version__ + \
' has no CUDA: remove .venv and run make setup again where nvidia-smi answers'; print('CUDA', torch.version.cuda, \
torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0))"; then
    [ "$DRY" -eq 0 ] && row torch ok "$LAST_SECONDS" "$(tail -1 "$LAST_LOG")"
elif [ "$DRY" -eq 0 ]; then
    row torch "$LAST_RESULT" "$LAST_SECONDS" "$(tail -1 "$LAST_LOG")"
fi

# 3: the CUDA-marked tests.
if check tests 240 "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider; then
    [ "$DRY" -eq 0 ] && row tests ok "$LAST_SECONDS" "$(grep -E '[0-9]+ (passed|failed|skipped)' "$LAST_LOG" | tail -1)"
elif [ "$DRY" -eq 0 ]; then
    row tests "$LAST_RESULT" "$LAST_SECONDS" "$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$LAST_LOG" | tail -1)"
fi

# 4: one epoch of each README recipe (README.md, "A quick try" and "More commands").
recipe adam_mlp --model mlp --optimizer adam --optimizer-learning-rate 1e-4
recipe kfac_quick --kfac
recipe kfac_mlp --model mlp --optimizer sgd --optimizer-learning-rate 1e-1 --kfac --kfac-damping-act 0.01 --kfac-damping-err 1
recipe kfac_fast experiment=kfac_fast
recipe kfac_large_batch experiment=kfac_large_batch --mini_batch_size 3000
recipe cnn_momentum model=cnn optimizer=momentum optimizer.learning_rate=0.01
recipe autoencoder --model autoencoder experiment=kfac_adaptive --mini_batch_size 1000
if [ "$GPUS" -ge 2 ]; then
    recipe kfac_nccl --procs-per-node "$GPUS" --kfac trainer.backend=nccl
fi

# 5: K-FAC's step against SGD's on the GPU.
if check step_time 150 "$PY" benchmarks/step_time.py --device cuda --steps 50 --warmup 5; then
    [ "$DRY" -eq 0 ] && row step_time ok "$LAST_SECONDS" "$(grep -E '^\| (sgd|kfac)' "$LAST_LOG" | head -3 | \
        awk -F'|' '{for (i = 2; i <= 4; i++) gsub(/^ +| +$/, "", $i); printf "%s %s ms (%sx SGD); ", $2, $3, $4}')"
elif [ "$DRY" -eq 0 ]; then
    row step_time "$LAST_RESULT" "$LAST_SECONDS" "see $LAST_LOG"
fi

TABLE=$(printf '%s\n' "| check | result | seconds | detail |" "|---|---|---|---|" "${ROWS[@]}")
echo
echo "$TABLE"
if [ "$DRY" -eq 1 ]; then
    echo
    echo "dry run: nothing was run"
    exit 0
fi
echo "$TABLE" >"$LOGS/summary.md"
echo
echo "summary: $LOGS/summary.md; total ${SECONDS} s"
exit "$FAILED"
