#!/usr/bin/env bash
# The one prepared check for a GPU machine (nothing in the project needs one):
#   1. the CUDA tests (tests/test_cuda.py) with the handler and training tests, which then run on CUDA too
#      (alongside step 2);
#   2. the default recipe on the real catalogue with more compute than 2 CPU cores give in an hour,
#      three runs sharing the GPU (one alone leaves it mostly idle at 80x60, batch 128):
#        cpu-hour  15 epochs, about what the 56-min CPU budget reaches (14.3): does CUDA reproduce it?
#        long      the same recipe for MINUTES of wall clock, no early stop: what do many more epochs give?
#        hires     the same, upscaled to 160x120 inside MINUTES: does resolution help once epochs are cheap?
#      and each run's best checkpoint scored on the test split (uncalibrated top-1 / macro-F1).
#
#   bench/gpu_check.sh PREPARED_DIR WORK_DIR RESULTS_DIR [MINUTES]
# PREPARED_DIR is a folder training.prepare wrote (its manifests name the images' paths).
set -uo pipefail
data=${1:?a folder training.prepare wrote}
work=${2:?a scratch folder for the runs}
results=${3:?a folder for the logs and figures}
minutes=${4:-4}
py=${PYTHON:-python3}
mkdir -p "$work" "$results"

nvidia-smi -L
"$py" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name())'
tests() {  # alongside the runs: the device time is the scarce thing, and the tests are tiny
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
tests &
train cpu-hour --epochs 15 --time-budget 0 &
train long --epochs 300 --time-budget "$minutes" --patience 300 &
train hires --epochs 300 --time-budget "$minutes" --patience 300 --image-size 160 120 &
wait

"$py" - "$data" "$work" "$results" <<'EOF'
import json, sys
from pathlib import Path

import torch

from handler.refund_model import build_model
from training import prepare as prepare_mod
from training.metrics import confusion, macro_f1
from training.train import load_images, predict

data, work, results = map(Path, sys.argv[1:])
classes = json.loads((data / "classes.json").read_text())
records = prepare_mod.read_manifest(data / "test.csv")
y = torch.tensor([classes.index(r.label) for r in records])
summary = {}
for run in sorted(p for p in work.iterdir() if (p / "checkpoint.pt").is_file()):
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = build_model(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device, memory_format=torch.channels_last)
    pre = ckpt["preprocess"]
    x = load_images(records, tuple(pre["image_size"]), desc="decode test")
    pred = predict(model, x, batch_size=512, device=device, amp=False, mean=pre["mean"], std=pre["std"]).argmax(1)
    history = ckpt["history"]
    summary[run.name] = {
        "epochs": len(history), "best_epoch": ckpt["epoch"], "minutes": round(history[-1]["elapsed_s"] / 60, 2),
        "images_per_s": [h["images_per_s"] for h in history],
        "val_acc": [round(h["val_acc"], 4) for h in history], "val_macro_f1": [round(h["val_macro_f1"], 4) for h in history],
        "test_top1": round(float((pred == y).double().mean()), 4), "test_macro_f1": round(macro_f1(confusion(pred, y, len(classes))), 4),
    }
    print(run.name, {k: v for k, v in summary[run.name].items() if not isinstance(v, list)}, flush=True)
(results / "summary.json").write_text(json.dumps(summary, indent=1))
EOF
