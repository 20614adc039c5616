#!/usr/bin/env bash
# The one prepared check for a machine with a GPU (nothing in the project needs one).
#
#   bench/gpu_check.sh PREPARED_DIR WORK_DIR RESULTS_DIR [MINUTES] [PHASES]
#
# PREPARED_DIR is a folder training.prepare wrote (its manifests name the images' paths); PHASES
# (default "tests compute") picks from:
#   tests    the CUDA tests (tests/test_cuda.py) with the handler and training tests, which then
#            run on CUDA too; alongside the training runs, as the tests are tiny
#   compute  the default recipe with more compute than 2 CPU cores give in an hour, three runs
#            sharing the GPU (one alone leaves it mostly idle at 80x60, batch 128):
#              cpu-hour  15 epochs, about what the 56-min CPU budget reaches: does CUDA reproduce it?
#              long      MINUTES of wall clock, no early stop: what do many more epochs give?
#              hires     the same at 160x120: does resolution help once epochs are cheap?
#   recipes  three recipes at 12 epochs side by side: the default, --lr 1e-3, --label-smoothing 0
# Then every run is scored on the split's val and test (bench.score_runs -> RESULTS_DIR/summary.json).
# docs/MODEL_CARD.md ("With more compute") has the figures of an H200.
set -uo pipefail
data=${1:?a folder training.prepare wrote}
work=${2:?a scratch folder for the runs}
results=${3:?a folder for the logs and figures}
minutes=${4:-5}
phases=" ${5:-tests compute} "
py=${PYTHON:-python3}
mkdir -p "$work" "$results"

nvidia-smi -L
"$py" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name())'

tests() {
    "$py" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_handler.py tests/test_handler_precision.py \
        tests/test_training.py tests/test_training_run.py tests/test_training_prepare.py >"$results/tests.log" 2>&1
    echo "tests: rc=$? $(tail -n 1 "$results/tests.log")"
}

train() {
    local name=$1
    shift
    "$py" -m training.train --data-dir "$data" --out "$work/$name" --device cuda --threads 4 "$@" \
        >"$results/$name.log" 2>&1
    echo "$name: rc=$? $(grep -o 'saved .*' "$results/$name.log")"
}

[[ $phases == *" tests "* ]] && tests &
if [[ $phases == *" compute "* ]]; then
    train cpu-hour --epochs 15 --time-budget 0 &
    train long --epochs 300 --time-budget "$minutes" --patience 300 &
    train hires --epochs 300 --time-budget "$minutes" --patience 300 --image-size 160 120 &
    wait
fi
if [[ $phases == *" recipes "* ]]; then
    recipe=(--epochs 12 --time-budget 0 --patience 99)
    train base "${recipe[@]}" &
    train lr1e-3 "${recipe[@]}" --lr 1e-3 &
    train ls0 "${recipe[@]}" --label-smoothing 0 &
    wait
fi
wait
runs=("$work"/*/)
[[ -d ${runs[0]} ]] && "$py" -m bench.score_runs --data-dir "$data" --runs "${runs[@]}" --out "$results/summary.json"
