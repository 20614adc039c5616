"""Package a training run as a TorchServe model archive.

    python -m training.export --run runs/demo --version 1

-> model_store/refund_classifier-1.mar holding the handler files from handler/, the
state_dict (weights.pt: the run's EMA weights where it kept them, see --ema), index_to_name.json
(the classes; `other` last for a model that learned it), model_meta.json (arch, preprocessing
at the served size, and the temperature, class bias and review threshold that
`training.evaluate` fitted into RUN/calibration.json for that size and those weights),
model-config.yaml (batching, workers, handler settings) and the rollout sample.

With --int8 auto (the default) or on, the archive also carries the model quantized to int8
(training.quantize: calibrated on a few hundred of the run's training photos, stored as
TorchScript in weights_int8.pt, which the handler loads as it is), with its own temperature, class
bias and review threshold fitted on its validation outputs, and model_meta.json `int8` records
how it compares with fp32 on the validation split. Where it misses the gate (top-1 agreement
>= 99 %, top-1 and coverage at 98 % precision at most 0.3 and 1 point lower), the archive
carries no int8 model and `int8` says why: the handler serves bf16/fp32 and logs it.

The served size (model_meta.json `image_size`, which the handler resizes to) is --serve-size,
else the best on val of a recorded size sweep (training.evaluate --sizes), else the training
size. The calibration must have been fitted at that size: export refuses otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from serving.archive import MODEL_NAME, archive_name
from training import prepare as prepare_mod
from handler.refund_inference import OTHER_LABEL, SERVED_CALIBRATION
from training.checkpoint import CALIBRATION, CHECKPOINT, EMA_CHOICES, CheckpointError, load_checkpoint, served_size, weights_key
from training import quantize

logger = logging.getLogger("training.export")

HANDLER_DIR = Path(__file__).resolve().parent.parent / "handler"
HANDLER_FILE = "refund_handler.py"
HANDLER_EXTRA = ["refund_inference.py", "refund_model.py", "refund_preprocess.py", "refund_requests.py"]
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]*$")

# TorchServe's per-model settings (batching, workers, handler options), tuned with the handler.
MODEL_CONFIG = HANDLER_DIR / "model-config.yaml"


class ExportError(RuntimeError):
    pass


def archive_path(model_store: Path, version: str, model_name: str = MODEL_NAME) -> Path:
    return Path(model_store) / archive_name(version, model_name)


def write_sample(ckpt: dict, out: Path, *, per_class: int) -> int:
    """Up to `per_class` test-split images per class as a Kaggle-layout folder out/sample/, for
    rollouts, and up to 3 x per_class of the out-of-category test photos (outside-test.csv,
    spread over it evenly) labelled `other`, whatever the model: a rollout scores top-1 on the
    first and reports what each version does with the second.

    `serving rollout` smoke-tests a new version on the sample its archive carries. The images
    are the run's own test split (never trained or tuned on), copied as they are.
    """
    data_dir = Path(ckpt.get("data_dir") or "")
    if per_class <= 0 or not (data_dir / "test.csv").is_file():
        if per_class > 0:
            logger.warning("no test split at %s: the archive carries no rollout sample (rollout will need --sample)", data_dir)
        return 0
    taken: dict[str, int] = {}
    rows = []
    (out / "sample" / "images").mkdir(parents=True)
    for record in prepare_mod.read_manifest(data_dir / "test.csv"):
        if taken.get(record.label, 0) >= per_class or not Path(record.path).is_file():
            continue
        taken[record.label] = taken.get(record.label, 0) + 1
        shutil.copy(record.path, out / "sample" / "images" / f"{record.id}.jpg")
        rows.append(f"{record.id},{record.label}\n")
    outside_csv = data_dir / "outside-test.csv"
    outside = [r for r in prepare_mod.read_manifest(outside_csv) if Path(r.path).is_file()] if outside_csv.is_file() else []
    n = min(len(outside), 3 * per_class)
    for record in (outside[k * len(outside) // n] for k in range(n)):
        shutil.copy(record.path, out / "sample" / "images" / f"{record.id}.jpg")
        rows.append(f"{record.id},{OTHER_LABEL}\n")
    (out / "sample" / "styles.csv").write_text("id,articleType\n" + "".join(rows))
    return len(rows)


# timing: for the benchmarks' untrained archive only (quantize.build_int8_for_timing).
INT8_CHOICES = ("auto", "on", "off", "timing")


def int8_entry(ckpt: dict, state: dict, *, mode: str, image_size, calibration: dict, calibration_images: int,
               gate: quantize.Gate):
    """-> (model_meta.json's "int8" entry, the int8 program or None). auto: built where it can
    be (an arch with a quantizable form, the run's prepared train/val splits still there), on:
    the export fails where it cannot, off: not built."""
    if mode not in INT8_CHOICES:
        raise ExportError(f"Invalid --int8 {mode!r}; choose one of: {', '.join(INT8_CHOICES)}")
    if calibration_images < 1:
        raise ExportError(f"Invalid --int8-calibration-images {calibration_images}: at least 1")
    if mode == "off":
        return {"status": "off", "reason": "exported with --int8 off"}, None
    if mode == "timing":
        try:
            entry, model = quantize.build_int8_for_timing(ckpt, state, image_size=image_size, fp32_calibration=calibration)
        except quantize.Int8Error as exc:
            raise ExportError(f"--int8 timing: {exc}") from exc
        logger.warning("int8 %s: %s", entry["status"], entry["reason"])
        return entry, model
    try:
        entry, model = quantize.build_int8(ckpt, state, image_size=image_size, fp32_calibration=calibration,
                                           calibration_images=calibration_images, gate=gate)
    except quantize.Int8Error as exc:
        if mode == "on":
            raise ExportError(f"--int8 on: {exc}") from exc
        logger.warning("no int8 model in this archive: %s", exc)
        return {"status": "unavailable", "reason": str(exc)}, None
    g = entry["gate"]
    drop = g["coverage_drop"]
    figures = (f"top-1 agreement with fp32 {g['top1_agreement']:.4f}, top-1 {g['int8_top1']:.4f} (fp32 {g['fp32_top1']:.4f}), "
               f"coverage at 98 % precision {g['int8_coverage']:.4f} (fp32 {g['fp32_coverage']:.4f}; {abs(drop):.4f} "
               f"{'lower' if drop >= 0 else 'higher'} on average over {g['coverage_resamples']} resamples) on {g['images']} val photos")
    if model is None:
        logger.warning("int8 failed its gate (%s): the archive carries no int8 model and serves bf16/fp32; %s",
                       entry["reason"], figures)
    else:
        logger.info("int8 passed its gate: %s", figures)
    return entry, model


def export(run: Path, version: str, *, model_store: Path, model_name: str = MODEL_NAME, force: bool = False,
           sample_per_class: int = 10, serve_size=None, ema: str = "auto", int8: str = "auto",
           int8_calibration_images: int = 300, int8_gate: quantize.Gate = quantize.Gate()) -> Path:
    if not VERSION_RE.match(version):
        raise ExportError(f"Invalid --version {version!r}: use letters, digits, '.', '_' or '-' (e.g. 1, 1.2, 2026-11-26)")
    ckpt_path = Path(run) / CHECKPOINT
    if not ckpt_path.is_file():
        raise ExportError(f"{ckpt_path} does not exist: train first (python -m training.train --out {run} ...)")
    target = archive_path(model_store, version, model_name)
    if target.exists() and not force:
        raise ExportError(f"{target} exists; versions are immutable: export a new --version (or pass --force)")
    ckpt = load_checkpoint(ckpt_path)
    try:
        key = weights_key(ckpt, ema)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    weights = "ema" if key == "ema" else "raw"
    size = list(served_size(run, ckpt, serve_size))
    calibration = dict(ckpt.get("calibration", {}))
    calib_path = Path(run) / CALIBRATION
    if calib_path.is_file():  # written by training.evaluate: fitted on the run's validation split
        fitted = json.loads(calib_path.read_text())
        if fitted.get("manifest_hash") not in (None, ckpt.get("manifest_hash")):
            raise ExportError(f"{calib_path} was fitted for other data than {ckpt_path}: rerun training.evaluate --run {run}")
        fitted_for = (list(fitted.get("image_size", ckpt["preprocess"]["image_size"])), fitted.get("weights", "raw"))
        if fitted_for != (size, weights):
            raise ExportError(
                f"{calib_path} was fitted for the {fitted_for[1]} weights at {'x'.join(map(str, fitted_for[0]))}; "
                f"this export serves the {weights} weights at {'x'.join(map(str, size))}: run python -m "
                f"training.evaluate --run {run} --serve-size {size[0]} {size[1]} --ema {'on' if weights == 'ema' else 'off'} first")
        calibration = {k: fitted[k] for k in SERVED_CALIBRATION if k in fitted}  # what the handler applies
        calibration["calibration"] = {k: v for k, v in fitted.items() if k not in SERVED_CALIBRATION}
    else:
        logger.warning("%s has no %s: exporting the default temperature and review threshold; run "
                       "python -m training.evaluate --run %s first to fit them", run, CALIBRATION, run)
    int8_meta, int8_model = int8_entry(ckpt, ckpt[key], mode=int8, image_size=size, calibration=calibration,
                                       calibration_images=int8_calibration_images, gate=int8_gate)
    meta = {
        **ckpt["model_config"],
        **ckpt["preprocess"],
        "image_size": size,  # what the handler resizes to
        "trained_image_size": list(ckpt["preprocess"]["image_size"]),
        "weights": weights,
        **calibration,
        "manifest_hash": ckpt.get("manifest_hash"),
        "trained_epoch": ckpt.get("epoch"),
        "version": version,
        "int8": int8_meta,
    }
    Path(model_store).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        staging = Path(tmp)
        torch.save(ckpt[key], staging / "weights.pt")
        (staging / "model_meta.json").write_text(json.dumps(meta, indent=1))
        if int8_model is not None:
            quantize.save_int8(int8_model, staging / quantize.FILE)
        (staging / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(ckpt["classes"])}, indent=1))
        shutil.copy(MODEL_CONFIG, staging / "model-config.yaml")
        for name in [HANDLER_FILE, *HANDLER_EXTRA]:
            shutil.copy(HANDLER_DIR / name, staging / name)
        extra = [staging / n for n in ["model_meta.json", "index_to_name.json", *HANDLER_EXTRA]]
        if int8_model is not None:
            extra.append(staging / quantize.FILE)
        # --extra-files copies a folder's contents to the archive's top level: pass the folder holding sample/.
        if write_sample(ckpt, staging / "samplepack", per_class=sample_per_class):
            extra.append(staging / "samplepack")
        cmd = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", model_name, "--version", version,
            "--serialized-file", str(staging / "weights.pt"),
            "--handler", str(staging / HANDLER_FILE),
            "--extra-files", ",".join(str(p) for p in extra),
            "--config-file", str(staging / "model-config.yaml"),
            "--export-path", str(staging), "--archive-format", "default",
        ]
        # The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps two exports apart.
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(staging)})
        if result.returncode != 0:
            raise ExportError(f"torch-model-archiver failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
        # The archiver names the file after the model; the store keeps one file per version.
        # Copy then rename, so a reader of the store never sees a half-written archive.
        partial = target.with_suffix(".mar.partial")
        shutil.copy(staging / f"{model_name}.mar", partial)
        partial.replace(target)
    return target


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run folder written by training.train")
    parser.add_argument("--version", type=str, required=True, help="model version, e.g. 1 or 2026-11-26")
    parser.add_argument("--model-store", type=Path, default=Path("model_store"), help="where to write the .mar")
    parser.add_argument("--sample-per-class", type=int, default=10,
                        help="test-split images per class the archive carries for `serving rollout` (0: none)")
    parser.add_argument("--serve-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="input size the handler resizes to (default: the best on val of training.evaluate --sizes "
                             "if recorded, else the training size); calibration.json must be fitted at it")
    parser.add_argument("--ema", type=str, default="auto", choices=list(EMA_CHOICES),
                        help="serve the run's EMA weights (auto: when it kept them)")
    parser.add_argument("--int8", type=str, default="auto", choices=list(INT8_CHOICES),
                        help="also build the int8 model (auto: where the arch and the run's prepared data allow; "
                             "on: fail otherwise; off: no int8; timing: for benchmarks of an untrained model, "
                             "calibrated on random inputs and not gated, served with a warning)")
    parser.add_argument("--int8-calibration-images", type=int, default=300,
                        help="training photos the int8 observers are calibrated on")
    parser.add_argument("--int8-min-agreement", type=float, default=quantize.Gate.min_agreement,
                        help="gate: least top-1 agreement of int8 with fp32 on val")
    parser.add_argument("--int8-max-top1-drop", type=float, default=quantize.Gate.max_top1_drop,
                        help="gate: most val top-1 int8 may lose to fp32 (absolute)")
    parser.add_argument("--int8-max-coverage-drop", type=float, default=quantize.Gate.max_coverage_drop,
                        help="gate: most val coverage at 98 %% precision int8 may lose to fp32 (absolute), "
                             "on average over paired resamples of val")
    parser.add_argument("--model-name", type=str, default=MODEL_NAME, help="TorchServe model name")
    parser.add_argument("--force", action="store_true", help="overwrite an existing archive of this version")
    return parser


def main(args: argparse.Namespace) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = export(args.run, args.version, model_store=args.model_store, model_name=args.model_name, force=args.force,
                      sample_per_class=args.sample_per_class, serve_size=args.serve_size, ema=args.ema, int8=args.int8,
                      int8_calibration_images=args.int8_calibration_images,
                      int8_gate=quantize.Gate(min_agreement=args.int8_min_agreement, max_top1_drop=args.int8_max_top1_drop,
                                              max_coverage_drop=args.int8_max_coverage_drop))
    except ExportError as exc:
        raise SystemExit(f"export: {exc}") from exc
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main(get_args_parser().parse_args())
