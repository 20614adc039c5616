"""Evaluate a training run: accuracy, per-class figures, calibration and the review threshold.

    python -m training.evaluate --run runs/real                     # the run's own test split
    python -m training.evaluate --run runs/real --data-dir FOLDER   # any Kaggle-layout folder
    python -m training.evaluate --score --data-dir PREPARED --run RUN [RUN ...] [--out summary.json]

Writes into --out (default RUN/eval-<name of the data>):
  metrics.json          top-1, top-5, macro-F1, per-class precision/recall/F1/support, the review
                        threshold's coverage and precision, the out-of-category images, and top-1
                        on the images whose product name contradicts their label (label_audit)
  confusion_matrix.png  row-normalized, labelled
  curves.png            loss, accuracy and macro-F1 per epoch (from the run's history)
and into RUN/calibration.json the temperature, the per-class logit bias (a fitted multiple of
the log class prior) and the review threshold, all fitted on the run's validation split;
`training.export` puts them into the model archive and the handler applies them.

Models run in float32, as the handler serves them. Images whose label is not one of the
model's classes count as errors in top-1/top-5 and are also reported on their own: how
many, and the share the review threshold routes to a person. For the run's own test split
(which holds only the model's classes) they come from the prepared `outside.csv`.

--score is the light version for several runs trained on one prepared split, on any device (a
lent GPU holds only the split's images): top-1 and macro-F1 on val and test, and the coverage at
98 % precision (threshold on val by the raw top probability, then applied to test). No calibration
fit, no figures, no out-of-category set; one line per run, and --out FILE gets them as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from handler.refund_inference import calibrated_probs
from handler.refund_model import cpu_supports_bf16
from training import label_audit
from training import prepare as prepare_mod
from training.checkpoint import CALIBRATION, CHECKPOINT, CheckpointError, load_run
from training.engine import load_images, predict
from training.metrics import confusion, macro_f1, per_class

logger = logging.getLogger("training.evaluate")
TARGET_PRECISION = 0.98


class EvaluateError(RuntimeError):
    pass


# -- calibration ---------------------------------------------------------------------------

def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor | None = None) -> tuple[float, float]:
    """(T, w) minimizing NLL(softmax(logits / T + w * log_prior)) on held-out data.

    T is temperature scaling (Guo et al. 2017); w * log(class prior) is a one-number bias
    correction (Alexandari et al. 2020, "bias-corrected temperature scaling"). A model trained
    with class weights 1/sqrt(n_c) over-predicts its small classes by about sqrt(prior) (w ~ 0.5):
    confidently, so the most confident predictions hold errors and no threshold reaches 98 %
    precision on much of the data. With log_prior None only T is fitted (w = 0).
    """
    log_t, w = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    prior = torch.zeros(logits.shape[1]) if log_prior is None else log_prior  # zeros: w's gradient is 0, w stays 0
    opt = torch.optim.LBFGS([log_t, w], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp() + w * prior, labels)
        loss.backward()
        return loss

    opt.step(closure)
    t, weight = float(log_t.detach().exp()), float(w.detach())
    if not (math.isfinite(t) and 0.05 < t < 20 and math.isfinite(weight) and abs(weight) < 5):
        return 1.0, 0.0
    return t, weight


def log_class_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log of each class's share of the training labels (a class with none counts as one image)."""
    counts = torch.bincount(labels, minlength=num_classes).double().clamp(min=1)
    return (counts / counts.sum()).log().float()


def review_threshold(confidence: torch.Tensor, correct: torch.Tensor, *, target: float = TARGET_PRECISION) -> dict:
    """The lowest confidence t such that predictions with confidence >= t are >= target precise.

    Walks the predictions from the most confident down and keeps the longest prefix whose
    precision is still >= target: maximum coverage at the required precision.
    """
    order = torch.argsort(confidence, descending=True)
    conf, ok = confidence[order], correct[order].double()
    precision = ok.cumsum(0) / torch.arange(1, len(ok) + 1, dtype=torch.float64)
    good = torch.nonzero(precision >= target).flatten()
    if len(good) == 0:
        return {"threshold": 1.0, "coverage": 0.0, "precision": float("nan"), "target_precision": target}
    k = int(good[-1]) + 1
    # Ties at the cut are accepted too: coverage and precision below are measured with them.
    t = float(conf[k - 1])
    accepted = confidence >= t
    return {"threshold": t, "coverage": float(accepted.double().mean()),
            "precision": float(correct[accepted].double().mean()), "target_precision": target}


def at_threshold(confidence: torch.Tensor, correct: torch.Tensor, threshold: float) -> dict:
    accepted = confidence >= threshold
    n = max(len(confidence), 1)
    return {"coverage": float(accepted.sum()) / n,
            "precision_accepted": float(correct[accepted].double().mean()) if accepted.any() else float("nan"),
            "accepted": int(accepted.sum()), "routed_to_review": int((~accepted).sum())}


# -- data ------------------------------------------------------------------------------------

def records_to_evaluate(ckpt: dict, data_dir: Path | None) -> tuple[str, list, list, dict]:
    """-> (name, records, outside records evaluated on their own, dropped-by-reason)."""
    if data_dir is None or prepare_mod.is_prepared(data_dir):
        prepared = Path(data_dir or ckpt["data_dir"])
        if not prepare_mod.is_prepared(prepared):
            raise EvaluateError(f"the run's prepared data {prepared} is gone: pass --data-dir")
        outside_csv = prepared / "outside.csv"
        outside = prepare_mod.read_manifest(outside_csv) if outside_csv.is_file() else []
        name = "test" if data_dir is None else f"{Path(data_dir).name}-test"
        return name, prepare_mod.read_manifest(prepared / "test.csv"), outside, {}
    if not (Path(data_dir) / "styles.csv").is_file():
        raise EvaluateError(f"--data-dir {data_dir} is neither a Kaggle-layout folder (styles.csv + images/) nor a prepared one")
    records, dropped = prepare_mod.scan(data_dir)
    return Path(data_dir).resolve().name, records, [], dropped


def catalogue_of(ckpt: dict, data_dir: Path | None) -> Path | None:
    """The catalogue (styles.csv) behind the evaluated images, where it can still be found."""
    if data_dir is not None and not prepare_mod.is_prepared(data_dir):
        return Path(data_dir)
    info = Path(data_dir or ckpt["data_dir"]) / "prepare.json"  # names the catalogue it was prepared from
    if not info.is_file():
        return None
    catalogue = Path(json.loads(info.read_text())["data_dir"])
    return catalogue if (catalogue / "styles.csv").is_file() else None


# -- figures ---------------------------------------------------------------------------------

def _pyplot():
    """matplotlib's pyplot on the Agg backend; its import trips pyparsing's deprecation warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    return plt


def plot_confusion(cm: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    plt = _pyplot()

    norm = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    size = max(6.0, 0.42 * n + 3)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(n), [f"{c} ({int(s)})" for c, s in zip(classes, cm.sum(1))], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (support)")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            v = float(norm[i, j])
            if v >= 0.01:
                ax.text(j, i, f"{v:.2f}"[1:] if v < 1 else "1", ha="center", va="center", fontsize=6,
                        color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: list[dict], path: Path) -> None:
    plt = _pyplot()

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (title, keys) in zip(axes, [("loss", ["train_loss", "val_loss"]), ("accuracy", ["train_acc", "val_acc"]),
                                        ("macro-F1", ["val_macro_f1"])]):
        for key in keys:
            if any(key in h for h in history):
                ax.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------

def calibrate(run: Path, ckpt: dict, model, *, image_size, mean, std, batch_size: int) -> dict:
    """Temperature and review threshold fitted on the run's validation split (float32, as served)."""
    prepared = Path(ckpt["data_dir"])
    val_csv = prepared / "val.csv"
    if not val_csv.is_file():
        raise EvaluateError(f"the run's validation split {val_csv} is gone: cannot calibrate")
    classes = ckpt["classes"]
    to_index = {c: i for i, c in enumerate(classes)}
    recs = prepare_mod.read_manifest(val_csv)
    x = load_images(recs, image_size, desc="decode val")
    y = torch.tensor([to_index[r.label] for r in recs])
    train_y = torch.tensor([to_index[r.label] for r in prepare_mod.read_manifest(prepared / "train.csv")])
    log_prior = log_class_prior(train_y, len(classes))
    logits = predict(model, x, batch_size=batch_size, device=torch.device("cpu"), amp=False, mean=mean, std=std)
    temperature, prior_weight = fit_calibration(logits, y, log_prior)
    bias = prior_weight * log_prior
    probs = calibrated_probs(logits, temperature, bias)
    conf, pred = probs.max(1)
    review = review_threshold(conf, pred == y)
    raw_pred = logits.argmax(1)
    result = {
        "temperature": temperature, "prior_weight": prior_weight, "class_bias": [round(float(b), 6) for b in bias],
        "review_threshold": review["threshold"],
        "val_coverage": review["coverage"], "val_precision_accepted": review["precision"],
        "target_precision": review["target_precision"], "val_images": len(y),
        "val_top1": float((pred == y).double().mean()), "val_macro_f1": macro_f1(confusion(pred, y, len(classes))),
        "val_top1_uncorrected": float((raw_pred == y).double().mean()),
        "val_macro_f1_uncorrected": macro_f1(confusion(raw_pred, y, len(classes))),
        "val_nll_before": float(F.cross_entropy(logits, y)),
        "val_nll_after": float(F.nll_loss(probs.clamp(min=1e-12).log(), y)),
        "manifest_hash": ckpt.get("manifest_hash"),
    }
    if cpu_supports_bf16():  # how far training's bf16 is from serving's float32
        bf16 = predict(model, x, batch_size=batch_size, device=torch.device("cpu"), amp=True, mean=mean, std=std)
        bf16_pred = calibrated_probs(bf16, temperature, bias).argmax(1)
        result["val_bf16_fp32_top1_agreement"] = float((bf16_pred == pred).double().mean())
        result["val_top1_bf16"] = float((bf16_pred == y).double().mean())
    (Path(run) / CALIBRATION).write_text(json.dumps(result, indent=1))
    logger.info("calibration on val: %s", result)
    return result


def evaluate_run(run: Path, *, data_dir: Path | None = None, out: Path | None = None, batch_size: int = 256) -> dict:
    run = Path(run)
    ckpt, model = load_run(run)
    classes = ckpt["classes"]
    pre = ckpt["preprocess"]
    image_size, mean, std = tuple(pre["image_size"]), tuple(pre["mean"]), tuple(pre["std"])
    calib_path = run / CALIBRATION
    calib = json.loads(calib_path.read_text()) if calib_path.is_file() else None
    if calib is None or calib.get("manifest_hash") != ckpt.get("manifest_hash") or "class_bias" not in calib:
        calib = calibrate(run, ckpt, model, image_size=image_size, mean=mean, std=std, batch_size=batch_size)
    temperature, threshold = calib["temperature"], calib["review_threshold"]
    bias = torch.tensor(calib["class_bias"])

    name, records, outside, dropped = records_to_evaluate(ckpt, data_dir)
    out = Path(out) if out else run / f"eval-{name}"
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        raise EvaluateError(f"no usable images to evaluate in {data_dir or ckpt['data_dir']}")
    to_index = {c: i for i, c in enumerate(classes)}
    infer = dict(batch_size=batch_size, device=torch.device("cpu"), amp=False, mean=mean, std=std)
    x = load_images(records, image_size, desc=f"decode {name}")
    logits = predict(model, x, **infer)
    probs = calibrated_probs(logits, temperature, bias)
    conf, pred = probs.max(1)
    known = torch.tensor([r.label in to_index for r in records])
    y = torch.tensor([to_index.get(r.label, -1) for r in records])
    correct = (pred == y) & known  # an out-of-category image is never right
    top5 = (probs.topk(min(5, len(classes)), 1).indices == y[:, None]).any(1) & known
    cm = confusion(pred[known], y[known], len(classes))
    stats = per_class(cm)
    metrics = {
        "run": str(run), "data": str(data_dir or ckpt["data_dir"]), "split": name,
        "images": len(records), "in_category": int(known.sum()), "outside_category": int((~known).sum()),
        "dropped": dropped,
        "top1": float(correct.double().mean()), "top5": float(top5.double().mean()),
        "macro_f1": macro_f1(cm),  # over the model's classes, on the in-category images
        "top1_in_category": float(correct[known].double().mean()) if known.any() else float("nan"),
        "calibration": calib,
        "review": {"threshold": threshold, "temperature": temperature, "prior_weight": calib.get("prior_weight", 0.0),
                   **at_threshold(conf, correct, threshold)},
        "per_class": {c: {"precision": float(stats["precision"][i]), "recall": float(stats["recall"][i]),
                          "f1": float(stats["f1"][i]), "support": int(stats["support"][i])} for i, c in enumerate(classes)},
    }
    catalogue = catalogue_of(ckpt, data_dir)
    conflicts = set(label_audit.audit(catalogue, classes)["conflict_ids"]) if catalogue is not None else set()
    conflict = torch.tensor([r.id in conflicts for r in records])
    if conflict.any():  # labels that the catalogue's own product names contradict (training.label_audit)
        metrics["label_conflicts"] = {"count": int(conflict.sum()),
                                      "top1_on_them": float(correct[conflict].double().mean()),
                                      "top1_on_the_rest": float(correct[~conflict].double().mean())}
    outside_conf = conf[~known]
    outside_preds = pred[~known]
    if outside:  # the prepared out-of-category images, evaluated on their own
        ox = load_images(outside, image_size, desc="decode outside")
        oprobs = calibrated_probs(predict(model, ox, **infer), temperature, bias)
        outside_conf, outside_preds = oprobs.max(1)
    if len(outside_conf):
        routed = outside_conf < threshold
        counts = torch.bincount(outside_preds, minlength=len(classes))
        metrics["outside"] = {
            "source": "outside.csv" if outside else name, "count": len(outside_conf),
            "routed_to_review_share": float(routed.double().mean()),
            "accepted_as_some_category": int((~routed).sum()),
            "most_predicted_as": {classes[i]: int(counts[i]) for i in counts.argsort(descending=True)[:5] if counts[i] > 0},
        }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_confusion(cm, classes, out / "confusion_matrix.png",
                   f"{name}: top-1 {metrics['top1_in_category']:.3f}, macro-F1 {metrics['macro_f1']:.3f} (row-normalized)")
    if ckpt.get("history"):
        plot_curves(ckpt["history"], out / "curves.png")
    logger.info("%s: top-1 %.4f, top-5 %.4f, macro-F1 %.4f; at threshold %.3f: coverage %.4f, precision %.4f; wrote %s",
                name, metrics["top1"], metrics["top5"], metrics["macro_f1"], threshold,
                metrics["review"]["coverage"], metrics["review"]["precision_accepted"], out)
    return metrics


def score_run(run: Path, data_dir: Path, *, device: torch.device, batch_size: int = 512) -> dict:
    """--score: split figures of one run and its val-fitted threshold applied to test."""
    ckpt, model = load_run(run)
    classes, pre = ckpt["classes"], ckpt["preprocess"]
    model = model.to(device)
    history = ckpt["history"]
    out = {"epochs": len(history), "best_epoch": ckpt["epoch"], "minutes": round(history[-1]["elapsed_s"] / 60, 2),
           "train_acc_last": round(history[-1]["train_acc"], 4)}
    confidence, correct = {}, {}
    for split in ("val", "test"):
        records = prepare_mod.read_manifest(Path(data_dir) / f"{split}.csv")
        y = torch.tensor([classes.index(r.label) for r in records])
        x = load_images(records, tuple(pre["image_size"]), desc=split)
        logits = predict(model, x, batch_size=batch_size, device=device, amp=False, mean=pre["mean"], std=pre["std"])
        confidence[split], pred = logits.softmax(1).max(1)
        correct[split] = pred == y
        out[f"{split}_top1"] = round(float(correct[split].double().mean()), 4)
        out[f"{split}_macro_f1"] = round(macro_f1(confusion(pred, y, len(classes))), 4)
    cut = review_threshold(confidence["val"], correct["val"])
    test = at_threshold(confidence["test"], correct["test"], cut["threshold"])
    out |= {"threshold": round(cut["threshold"], 4), "val_coverage": round(cut["coverage"], 4),
            "test_coverage": round(test["coverage"], 4), "test_precision": round(test["precision_accepted"], 4)}
    return out


def score_runs(runs: list[Path], data_dir: Path, *, out: Path | None = None, batch_size: int = 512) -> dict:
    """--score over several runs; a folder without a checkpoint is named and skipped."""
    if not prepare_mod.is_prepared(data_dir):
        raise EvaluateError(f"--score needs --data-dir: a folder training.prepare wrote (train/val/test.csv); got {data_dir}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    summary = {}
    for run in runs:
        if not (Path(run) / CHECKPOINT).is_file():
            print(f"{Path(run).name}: no {CHECKPOINT}, skipped", flush=True)
            continue
        summary[Path(run).name] = score_run(run, data_dir, device=device, batch_size=batch_size)
        print(Path(run).name, summary[Path(run).name], flush=True)
    if out:
        Path(out).write_text(json.dumps(summary, indent=1))
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, nargs="+", required=True,
                        help="run folder written by training.train (with --score: one or more)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="Kaggle-layout or prepared folder (default: the run's test split); with --score: the prepared split")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: RUN/eval-<data name>); with --score: a JSON file for the figures")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: 256; --score: 512)")
    parser.add_argument("--score", action="store_true",
                        help="light scoring of the runs on --data-dir's val and test splits, on a GPU when there is one")
    return parser


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.score:
            return score_runs(args.run, args.data_dir, out=args.out, batch_size=args.batch_size or 512)
        if len(args.run) != 1:
            raise EvaluateError(f"--run takes one run folder (several only with --score); got {len(args.run)}")
        metrics = evaluate_run(args.run[0], data_dir=args.data_dir, out=args.out, batch_size=args.batch_size or 256)
    except (EvaluateError, CheckpointError, prepare_mod.CatalogueError) as exc:
        raise SystemExit(f"evaluate: {exc}") from exc
    print(json.dumps({k: metrics[k] for k in ("split", "images", "top1", "top5", "macro_f1", "review", "outside",
                                              "label_conflicts") if k in metrics}))
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
