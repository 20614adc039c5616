"""Evaluate a training run: accuracy, per-class figures, calibration, the review threshold, and
what happens to photos outside the refund categories.

    python -m training.evaluate --run runs/real                     # the run's own test split
    python -m training.evaluate --run runs/real --split val         # its val split (for choosing)
    python -m training.evaluate --run runs/real --data-dir FOLDER   # any Kaggle-layout folder
    python -m training.evaluate --run runs/real --outside-dir FOLDER   # + out-of-category photos
    python -m training.evaluate --run runs/real --sizes 80x60 96x72 112x84   # served size sweep, val only
    python -m training.evaluate --score --data-dir PREPARED --run RUN [RUN ...] [--out summary.json]

Writes into --out (default RUN/eval-<name of the data>):
  metrics.json          over the refund categories: top-1, top-5, macro-F1, per-class
                        precision/recall/F1/support (an `other` answer on an in-category photo is
                        wrong; its share is `in_category_answered_other`); the review threshold's
                        coverage and precision; label-conflict top-1 (label_audit); and for the
                        out-of-category photos (`outside`: outside-test.csv with test, outside-val.csv
                        with val; `outside_dirs`: each --outside-dir) the shares answered "other",
                        sent to review, their sum (`handled_share`) and accepted as a category
  confusion_matrix.png  row-normalized, labelled
  curves.png            loss, accuracy and macro-F1 per epoch (from the run's history)
and into RUN/calibration.json the temperature, the per-class logit bias (a fitted multiple of
the log class prior) and the review threshold, all fitted on the run's validation split (and
its out-of-category photos, for the NLL fit of a model with `other`), at the served size and
for the weights evaluated (EMA or raw); `training.export` puts them into the model archive.

The served decision: the answer is the calibrated argmax, `other` included; needs_review is
confidence < threshold whatever the answer, so a confident "other" is answered "other" and an
unconfident one goes to review. The threshold is the lowest confidence at which accepted answers
on in-category val photos are >= 98 % right, so it means what it meant for 30-class models.

The served size is --serve-size, else the best on val of a recorded --sizes sweep
(RUN/eval-sizes/metrics.json), else the training size. Models run in float32, as the handler
serves them (the sweep's speed: bf16 where the CPU has it natively, batch 32).

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

from handler.refund_inference import (OTHER_LABEL, MarginFit, calibrated_probs, confidence_fit, label_margin,
                                      served_answers, served_labels)
from handler.refund_model import cpu_supports_bf16
from training import label_audit
from training import prepare as prepare_mod
from training.checkpoint import CALIBRATION, CHECKPOINT, EMA_CHOICES, SIZE_SWEEP, CheckpointError, load_run, served_size
from training.engine import load_images, predict
from training.timing import measure
from training.metrics import confusion, macro_f1, per_class

logger = logging.getLogger("training.evaluate")
TARGET_PRECISION = 0.98


class EvaluateError(RuntimeError):
    pass


# -- calibration ---------------------------------------------------------------------------

def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor | None = None,
                    weights: torch.Tensor | None = None) -> tuple[float, float]:
    """(T, w) minimizing NLL(softmax(logits / T + w * log_prior)) on held-out data (each example's
    NLL times its weight, where given).

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
        nll = F.cross_entropy(logits / log_t.exp() + w * prior, labels, reduction="none")
        loss = nll.mean() if weights is None else (nll * weights).sum() / weights.sum()
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

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def prepared_outside(prepared: Path, split: str) -> tuple[str, list]:
    """The prepared out-of-category photos that go with `split` (outside-val.csv with val,
    outside-test.csv with test); a folder of format 1 has only outside.csv, used whole for test."""
    path = Path(prepared) / f"outside-{split}.csv"
    if path.is_file():
        return path.name, prepare_mod.read_manifest(path)
    if split == "test" and (Path(prepared) / "outside.csv").is_file():
        return "outside.csv", prepare_mod.read_manifest(Path(prepared) / "outside.csv")
    return path.name, []


def records_to_evaluate(ckpt: dict, data_dir: Path | None, split: str = "test") -> tuple[str, list, tuple[str, list], dict]:
    """-> (name, records, (source, outside records evaluated on their own), dropped-by-reason)."""
    if data_dir is None or prepare_mod.is_prepared(data_dir):
        prepared = Path(data_dir or ckpt["data_dir"])
        if not prepare_mod.is_prepared(prepared):
            raise EvaluateError(f"the run's prepared data {prepared} is gone: pass --data-dir")
        name = split if data_dir is None else f"{Path(data_dir).name}-{split}"
        return name, prepare_mod.read_manifest(prepared / f"{split}.csv"), prepared_outside(prepared, split), {}
    if not (Path(data_dir) / "styles.csv").is_file():
        raise EvaluateError(f"--data-dir {data_dir} is neither a Kaggle-layout folder (styles.csv + images/) nor a prepared one")
    records, dropped = prepare_mod.scan(data_dir)
    return Path(data_dir).resolve().name, records, ("", []), dropped


def outside_folder(folder: Path, categories: set[str]) -> tuple[list, dict]:
    """--outside-dir: a Kaggle-layout folder (its rows whose label is not one of `categories`) or
    a plain folder of images (all of them); unreadable images are dropped and counted."""
    folder = Path(folder)
    if (folder / "styles.csv").is_file():
        records, dropped = prepare_mod.scan(folder)
        return [r for r in records if r.label not in categories], dropped
    if not folder.is_dir():
        raise EvaluateError(f"--outside-dir {folder} is neither a Kaggle-layout folder nor a folder of images")
    records, dropped = [], {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        digest, reason = prepare_mod.check_image(path)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        records.append(prepare_mod.Record(id=str(path.relative_to(folder)), label="", path=path, sha256=digest))
    return records, dropped


def catalogue_of(ckpt: dict, data_dir: Path | None) -> Path | None:
    """The catalogue (styles.csv) behind the evaluated images, where it can still be found."""
    if data_dir is not None and not prepare_mod.is_prepared(data_dir):
        return Path(data_dir)
    info = Path(data_dir or ckpt["data_dir"]) / "prepare.json"  # names the catalogue it was prepared from
    if not info.is_file():
        return None
    catalogue = Path(json.loads(info.read_text())["data_dir"])
    return catalogue if (catalogue / "styles.csv").is_file() else None


def other_index(classes: list[str]) -> int | None:
    """Index of the out-of-category output, None for a model without one."""
    return classes.index(OTHER_LABEL) if OTHER_LABEL in classes else None


def routing(probs: torch.Tensor, threshold: float, classes: list[str], label_bias: torch.Tensor | None = None,
            fit: MarginFit | None = None) -> dict:
    """What the served decision does with out-of-category photos, as shares that add up to 1:
    answered `other` (confidently), sent to review (any answer under the threshold), accepted as
    one of the refund categories. handled = answered other + sent to review."""
    conf, pred = served_answers(probs, label_bias, fit)
    n = max(len(conf), 1)
    review = conf < threshold
    other = other_index(classes)
    is_other = (pred == other) & ~review if other is not None else torch.zeros_like(review)
    accepted = ~review & ~is_other
    counts = torch.bincount(pred[accepted], minlength=len(classes))
    return {
        "count": len(conf),
        "answered_other_share": float(is_other.sum()) / n,
        "routed_to_review_share": float(review.sum()) / n,
        "handled_share": float((is_other | review).sum()) / n,
        "accepted_as_category_share": float(accepted.sum()) / n,
        "accepted_as_some_category": int(accepted.sum()),
        "most_accepted_as": {classes[i]: int(counts[i]) for i in counts.argsort(descending=True)[:5] if counts[i] > 0},
    }


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

def train_log_prior(ckpt: dict, prepared: Path) -> torch.Tensor:
    """log of each class's share of what training showed an epoch: the checkpoint's class_counts
    (`other` counted at its per-epoch draw), or, for older runs, train.csv's labels."""
    classes = ckpt["classes"]
    counts = ckpt.get("class_counts")
    if counts is None:
        to_index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([to_index[r.label] for r in prepare_mod.read_manifest(Path(prepared) / "train.csv")])
        counts = torch.bincount(labels, minlength=len(classes)).tolist()
    return log_class_prior(torch.repeat_interleave(torch.arange(len(classes)), torch.tensor(counts)), len(classes))


def split_logits(ckpt: dict, model, split: str, *, image_size, mean, std, batch_size: int, desc: str = ""):
    """float32 logits of the run's prepared `split` (in-category: logits, labels) and of the
    out-of-category photos that go with it (outside-<split>.csv): (logits, labels, outside logits)."""
    prepared = Path(ckpt["data_dir"])
    path = prepared / f"{split}.csv"
    if not path.is_file():
        raise EvaluateError(f"the run's {split} split {path} is gone")
    to_index = {c: i for i, c in enumerate(ckpt["classes"])}
    recs = prepare_mod.read_manifest(path)
    infer = dict(batch_size=batch_size, device=torch.device("cpu"), amp=False, mean=mean, std=std)
    logits = predict(model, load_images(recs, image_size, desc=f"decode {split}{desc}"), **infer)
    _, outside = prepared_outside(prepared, split)
    out_logits = predict(model, load_images(outside, image_size, desc=f"decode outside {split}{desc}"), **infer) \
        if outside else torch.empty(0, len(to_index))
    return logits, torch.tensor([to_index[r.label] for r in recs]), out_logits


def served_rule(calibration: dict) -> dict:
    """The choices a fit made rather than fitted: which score the confidence is read from
    (choose_confidence) and the label adjustment tau (choose_label_adjustment)."""
    return {"confidence": "margin" if calibration.get("confidence_fit") else "probability",
            "label_adjustment": float(calibration.get("label_adjustment") or 0.0)}


def fit_served(logits: torch.Tensor, y: torch.Tensor, out_logits: torch.Tensor, classes: list[str],
               log_prior: torch.Tensor, rule: dict | None = None) -> dict:
    """The served decision fitted on val: T and the prior weight by NLL (on the out-of-category
    photos too, labelled `other`, where the model has that output), then the review threshold:
    the lowest confidence at which accepted answers on in-category photos are >= 98 % right (an
    `other` answer on one is wrong). The threshold does not depend on how many out-of-category
    photos val happens to hold; what it does to them is reported beside it (`val_outside`).

    With `rule` (served_rule of another fit), the confidence's score and the label adjustment are
    that fit's, not chosen again: the int8 model serves fp32's rule, and only T, the prior weight,
    the margin's fit and the threshold are its own. Chosen again on int8's outputs, a near tie
    between two taus could flip and change the label of 1-2 % of the photos.

    The out-of-category photos are weighted in the NLL so that they make up the share `other` had
    in training (its per-epoch draw), not the share val happens to hold (a quarter of it): fitted
    at val's share, the prior weight took up the difference and moved answers from the small
    categories to the large ones and `other`, lowering macro-F1 over the categories."""
    other = other_index(classes)
    fit_x, fit_y, weights = logits, y, None
    if other is not None and len(out_logits):
        fit_x = torch.cat([logits, out_logits])
        fit_y = torch.cat([y, torch.full((len(out_logits),), other)])
        share = float(log_prior[other].exp())  # `other`'s share of what training showed an epoch
        weights = torch.cat([torch.ones(len(logits)),
                             torch.full((len(out_logits),), share / (1 - share) * len(logits) / len(out_logits))])
    temperature, prior_weight = fit_calibration(fit_x, fit_y, log_prior, weights)
    bias = prior_weight * log_prior
    probs = calibrated_probs(logits, temperature, bias)
    out_probs = calibrated_probs(out_logits, temperature, bias) if len(out_logits) else None
    choice = choose_confidence(probs, y, out_probs, classes) if rule is None else {"score": rule["confidence"], "kept": True}
    order = RAW_MARGIN if choice["score"] == "margin" else None  # the confidence's order, before its fit
    adjustment = choose_label_adjustment(probs, y, log_prior, out_probs, classes, order) if rule is None else \
        {"tau": rule["label_adjustment"], "kept": True}
    lbias = -adjustment["tau"] * log_prior if adjustment["tau"] else None
    fit = None
    if order is not None:
        labels = served_labels(probs, lbias)
        fit = fit_margin_confidence(label_margin(probs, labels), labels == y)
    conf, pred = served_answers(probs, lbias, fit)
    review = review_threshold(conf, pred == y)
    raw_pred = logits.argmax(1)
    fit_probs = calibrated_probs(fit_x, temperature, bias)
    result = {
        "temperature": temperature, "prior_weight": prior_weight, "class_bias": [round(float(b), 6) for b in bias],
        "review_threshold": review["threshold"],
        "val_coverage": review["coverage"], "val_precision_accepted": review["precision"],
        "target_precision": review["target_precision"], "val_images": len(y),
        "val_top1": float((pred == y).double().mean()), "val_macro_f1": macro_f1(confusion(pred, y, len(classes))),
        "val_top1_uncorrected": float((raw_pred == y).double().mean()),
        "val_macro_f1_uncorrected": macro_f1(confusion(raw_pred, y, len(classes))),
        "val_nll_before": float(F.cross_entropy(fit_x, fit_y)),
        "val_nll_after": float(F.nll_loss(fit_probs.clamp(min=1e-12).log(), fit_y)),
        "outside_weight": float(weights[-1]) if weights is not None else None,
        "label_adjustment": adjustment["tau"], "label_adjustment_fit": adjustment,
        "confidence_choice": choice,
    }
    if lbias is not None:
        result["label_bias"] = [round(float(b), 6) for b in lbias]
    if fit is not None:
        result["confidence_fit"] = {"score": "margin", "slope": fit.slope, "intercept": fit.intercept}
    if other is not None:
        result["val_in_category_answered_other"] = float((pred == other).double().mean())
    if out_probs is not None:
        result["val_outside"] = routing(out_probs, review["threshold"], classes, lbias, fit)
    return result


# Logit adjustment strengths tried: the label is argmax(log p - tau * log prior) (served_labels).
LABEL_ADJUSTMENTS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_ROUTING = 0.95  # out-of-category photos answered `other` or sent to review: never below this for a tau or the margin


def routes_enough(share: float | None, base: float | None) -> bool:
    """A served rule may replace the base rule only if it still sends at least min(MIN_ROUTING, the
    base's share) of the out-of-category photos to `other` or review (no out-of-category photos: any)."""
    return base is None or share >= min(MIN_ROUTING, base)


def served_figures(probs: torch.Tensor, y: torch.Tensor, tau: float, log_prior: torch.Tensor,
                   order: MarginFit | None = None) -> dict:
    """Top-1, macro-F1 and coverage at 98 % precision (threshold fitted on these photos) of the
    served answer with label adjustment `tau`, its confidence ordered as `order` orders it."""
    conf, pred = served_answers(probs, -tau * log_prior if tau else None, order)
    review = review_threshold(conf, pred == y)
    return {"tau": tau, "top1": float((pred == y).double().mean()), "macro_f1": macro_f1(confusion(pred, y, probs.shape[1])),
            "coverage": review["coverage"], "threshold": review["threshold"]}


def val_halves(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two halves of val, each class split evenly between them (every other photo of a class)."""
    first = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        first[torch.nonzero(y == c).flatten()[::2]] = True
    return torch.nonzero(first).flatten(), torch.nonzero(~first).flatten()


def choose_label_adjustment(probs: torch.Tensor, y: torch.Tensor, log_prior: torch.Tensor, out_probs: torch.Tensor | None,
                            classes: list[str], order: MarginFit | None = None) -> dict:
    """The served label adjustment tau, chosen so that it is adopted only where it helps on photos
    it was not chosen on.

    A tau is eligible where the out-of-category photos stay >= 95 % answered `other` or sent to
    review (or as many as without it) and, on the photos it is chosen on, it loses no coverage at
    98 % precision against tau = 0; among those, the best macro-F1 over the categories wins. Chosen
    on each half of val and scored on the other (cross-fitted), it is adopted only if it raised
    macro-F1 and lost no coverage there on average; the served tau is then the one chosen on all
    of val. Otherwise tau = 0: the most probable class, as without adjustment. Coverage is that of
    the served confidence (`order`: the margin's, where choose_confidence chose it)."""
    rows = [served_figures(probs, y, t, log_prior, order) for t in LABEL_ADJUSTMENTS]  # all of val; rows[0]: tau = 0
    for r in rows:  # the out-of-category photos at each tau's own threshold
        r["outside_handled"] = None if out_probs is None or not len(out_probs) else \
            routing(out_probs, r["threshold"], classes, -r["tau"] * log_prior if r["tau"] else None, order)["handled_share"]
    base_routing = rows[0]["outside_handled"]
    eligible = [r["tau"] for r in rows if routes_enough(r["outside_handled"], base_routing)]

    def pick(idx):
        base = served_figures(probs[idx], y[idx], 0.0, log_prior, order)
        rows = [served_figures(probs[idx], y[idx], t, log_prior, order) for t in eligible]
        return max((r for r in rows if r["coverage"] >= base["coverage"]), key=lambda r: (r["macro_f1"], -r["tau"]))["tau"]

    folds = []
    a, b = val_halves(y)
    for chose_on, scored_on in ((a, b), (b, a)):
        tau = pick(chose_on)
        got, base = (served_figures(probs[scored_on], y[scored_on], t, log_prior, order) for t in (tau, 0.0))
        folds.append({"tau": tau, "macro_f1_gain": got["macro_f1"] - base["macro_f1"],
                      "top1_gain": got["top1"] - base["top1"], "coverage_gain": got["coverage"] - base["coverage"]})
    mean = {k: sum(f[k] for f in folds) / len(folds) for k in ("macro_f1_gain", "top1_gain", "coverage_gain")}
    adopted = mean["macro_f1_gain"] > 0 and mean["coverage_gain"] >= 0
    return {"tau": pick(torch.arange(len(y))) if adopted else 0.0, "adopted": adopted, "eligible": eligible,
            "cross_fit": {"folds": folds, **mean}, "val": rows}


# The margin in the same order as the served confidence will have it, before its fit (any slope > 0 orders alike).
RAW_MARGIN = MarginFit(1.0, 0.0)


def choose_confidence(probs: torch.Tensor, y: torch.Tensor, out_probs: torch.Tensor | None, classes: list[str]) -> dict:
    """Which score the served confidence is read from: the label's calibrated probability, or its
    margin over the runner-up (served_answers), whichever answers more photos at 98 % precision on
    photos its threshold was not fitted on.

    Each score's threshold is fitted on one stratified half of val and applied to the other, both
    ways (the label: the most probable class). The margin is chosen only if its cross-fitted coverage
    is higher and it sends at least min(95 %, the probability's share) of the out-of-category photos
    to `other` or to review at its threshold on all of val; otherwise the probability, as before."""
    halves = val_halves(y)
    rows = {}
    for score, order in (("probability", None), ("margin", RAW_MARGIN)):
        conf, pred = served_answers(probs, None, order)
        ok = pred == y
        folds = []
        for fitted_on, applied_to in (halves, halves[::-1]):
            cut = review_threshold(conf[fitted_on], ok[fitted_on])["threshold"]
            got = at_threshold(conf[applied_to], ok[applied_to], cut)
            folds.append({"coverage": got["coverage"], "precision": got["precision_accepted"]})
        whole = review_threshold(conf, ok)
        rows[score] = {"cross_fit_coverage": sum(f["coverage"] for f in folds) / len(folds), "folds": folds,
                       "val_coverage": whole["coverage"],
                       "outside_handled": None if out_probs is None or not len(out_probs) else
                       routing(out_probs, whole["threshold"], classes, None, order)["handled_share"]}
    prob, margin = rows["probability"], rows["margin"]
    routes = routes_enough(margin["outside_handled"], prob["outside_handled"])
    chosen = "margin" if margin["cross_fit_coverage"] > prob["cross_fit_coverage"] and routes else "probability"
    return {"score": chosen, **rows}


def fit_margin_confidence(margin: torch.Tensor, correct: torch.Tensor) -> MarginFit:
    """(slope, intercept) of P(right | margin) = sigmoid(slope * margin + intercept), by logistic
    regression on val (Platt 1999): the served confidence keeps meaning "right this often"."""
    x, t = margin.double(), correct.double()
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(params[0] * x + params[1], t)
        loss.backward()
        return loss

    opt.step(closure)
    slope, intercept = (float(v) for v in params.detach())
    if not (math.isfinite(slope) and slope > 0 and math.isfinite(intercept)):
        raise EvaluateError(f"the margin does not order right answers above wrong ones on val (slope {slope:.4g})")
    return MarginFit(slope, intercept)


def calibrate(run: Path, ckpt: dict, model, *, image_size, mean, std, batch_size: int) -> dict:
    """Temperature, class bias and review threshold fitted on the run's validation split (and its
    out-of-category photos) at `image_size`, float32, as served; written to RUN/calibration.json."""
    prepared = Path(ckpt["data_dir"])
    if not (prepared / "val.csv").is_file():
        raise EvaluateError(f"the run's validation split {prepared / 'val.csv'} is gone: cannot calibrate")
    logits, y, out_logits = split_logits(ckpt, model, "val", image_size=image_size, mean=mean, std=std, batch_size=batch_size)
    result = fit_served(logits, y, out_logits, ckpt["classes"], train_log_prior(ckpt, prepared))
    result |= {"image_size": list(image_size), "weights": ckpt.get("weights", "raw"), "manifest_hash": ckpt.get("manifest_hash")}
    if cpu_supports_bf16():  # how far training's bf16 is from serving's float32
        x = load_images(prepare_mod.read_manifest(prepared / "val.csv"), image_size, desc="decode val")
        bf16 = predict(model, x, batch_size=batch_size, device=torch.device("cpu"), amp=True, mean=mean, std=std)
        bias = torch.tensor(result["class_bias"])
        lbias = torch.tensor(result["label_bias"]) if "label_bias" in result else None
        pred = served_labels(calibrated_probs(logits, result["temperature"], bias), lbias)
        bf16_pred = served_labels(calibrated_probs(bf16, result["temperature"], bias), lbias)
        result["val_bf16_fp32_top1_agreement"] = float((bf16_pred == pred).double().mean())
        result["val_top1_bf16"] = float((bf16_pred == y).double().mean())
    (Path(run) / CALIBRATION).write_text(json.dumps(result, indent=1))
    logger.info("calibration on val: %s", result)
    return result


def calibration_fits(calib: dict | None, ckpt: dict, image_size) -> bool:
    """Whether RUN/calibration.json was fitted for these weights, data and size (older files:
    the raw weights at the training size)."""
    return (calib is not None and "class_bias" in calib and "label_adjustment" in calib and "confidence_choice" in calib
            and calib.get("manifest_hash") == ckpt.get("manifest_hash")
            and list(calib.get("image_size", ckpt["preprocess"]["image_size"])) == list(image_size)
            and calib.get("weights", "raw") == ckpt.get("weights", "raw"))


def evaluate_run(run: Path, *, data_dir: Path | None = None, out: Path | None = None, batch_size: int = 256,
                 split: str = "test", ema: str = "auto", serve_size=None, outside_dirs=()) -> dict:
    run = Path(run)
    ckpt, model = load_run(run, ema=ema)
    classes = ckpt["classes"]
    other = other_index(classes)
    pre = ckpt["preprocess"]
    image_size, mean, std = served_size(run, ckpt, serve_size), tuple(pre["mean"]), tuple(pre["std"])
    calib_path = run / CALIBRATION
    calib = json.loads(calib_path.read_text()) if calib_path.is_file() else None
    if not calibration_fits(calib, ckpt, image_size):
        calib = calibrate(run, ckpt, model, image_size=image_size, mean=mean, std=std, batch_size=batch_size)
    temperature, threshold = calib["temperature"], calib["review_threshold"]
    bias = torch.tensor(calib["class_bias"])
    lbias = torch.tensor(calib["label_bias"]) if "label_bias" in calib else None
    fit = confidence_fit(calib)

    name, records, (outside_source, outside), dropped = records_to_evaluate(ckpt, data_dir, split)
    out = Path(out) if out else run / f"eval-{name}"
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        raise EvaluateError(f"no usable images to evaluate in {data_dir or ckpt['data_dir']}")
    to_index = {c: i for i, c in enumerate(classes) if i != other}  # no photo is labelled `other`
    infer = dict(batch_size=batch_size, device=torch.device("cpu"), amp=False, mean=mean, std=std)
    x = load_images(records, image_size, desc=f"decode {name}")
    probs = calibrated_probs(predict(model, x, **infer), temperature, bias)
    conf, pred = served_answers(probs, lbias, fit)
    known = torch.tensor([r.label in to_index for r in records])
    y = torch.tensor([to_index.get(r.label, -1) for r in records])
    correct = (pred == y) & known  # an out-of-category photo is never right, an `other` answer neither
    top5 = (probs.topk(min(5, len(classes)), 1).indices == y[:, None]).any(1) & known
    cm = confusion(pred[known], y[known], len(classes))
    stats = per_class(cm)
    metrics = {
        "run": str(run), "data": str(data_dir or ckpt["data_dir"]), "split": name,
        "served": {"image_size": list(image_size), "trained_image_size": list(pre["image_size"]),
                   "weights": ckpt["weights"], "classes": len(classes), "other_output": other is not None},
        "images": len(records), "in_category": int(known.sum()), "outside_category": int((~known).sum()),
        "dropped": dropped,
        "top1": float(correct.double().mean()), "top5": float(top5.double().mean()),
        "macro_f1": macro_f1(cm),  # over the refund categories, on the in-category images
        "top1_in_category": float(correct[known].double().mean()) if known.any() else float("nan"),
        "calibration": calib,
        "review": {"threshold": threshold, "temperature": temperature, "prior_weight": calib.get("prior_weight", 0.0),
                   "label_adjustment": calib.get("label_adjustment", 0.0),
                   "confidence": (calib.get("confidence_fit") or {}).get("score", "probability"),
                   **at_threshold(conf[known], correct[known], threshold)},
        "per_class": {c: {"precision": float(stats["precision"][i]), "recall": float(stats["recall"][i]),
                          "f1": float(stats["f1"][i]), "support": int(stats["support"][i])}
                      for i, c in enumerate(classes) if i != other},
    }
    if other is not None and known.any():  # in-category photos the model calls "not a refund category"
        metrics["in_category_answered_other"] = float((pred[known] == other).double().mean())
        metrics["in_category_accepted_as_other"] = float(((pred[known] == other) & (conf[known] >= threshold)).double().mean())
    catalogue = catalogue_of(ckpt, data_dir)
    conflicts = set(label_audit.audit(catalogue, classes)["conflict_ids"]) if catalogue is not None else set()
    conflict = torch.tensor([r.id in conflicts for r in records])
    if conflict.any():  # labels that the catalogue's own product names contradict (training.label_audit)
        metrics["label_conflicts"] = {"count": int(conflict.sum()),
                                      "top1_on_them": float(correct[conflict].double().mean()),
                                      "top1_on_the_rest": float(correct[~conflict].double().mean())}
    if outside:  # the prepared out-of-category photos of this split, evaluated on their own
        oprobs = calibrated_probs(predict(model, load_images(outside, image_size, desc="decode outside"), **infer),
                                  temperature, bias)
        metrics["outside"] = {"source": outside_source, **routing(oprobs, threshold, classes, lbias, fit)}
    elif (~known).any():
        metrics["outside"] = {"source": name, **routing(probs[~known], threshold, classes, lbias, fit)}
    for folder in outside_dirs:
        recs, folder_dropped = outside_folder(folder, set(to_index))
        if not recs:
            raise EvaluateError(f"--outside-dir {folder} holds no readable out-of-category image")
        fprobs = calibrated_probs(predict(model, load_images(recs, image_size, desc=f"decode {Path(folder).name}"), **infer),
                                  temperature, bias)
        metrics.setdefault("outside_dirs", {})[str(folder)] = {**routing(fprobs, threshold, classes, lbias, fit), "dropped": folder_dropped}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_confusion(cm, classes, out / "confusion_matrix.png",
                   f"{name}: top-1 {metrics['top1_in_category']:.3f}, macro-F1 {metrics['macro_f1']:.3f} (row-normalized)")
    if ckpt.get("history"):
        plot_curves(ckpt["history"], out / "curves.png")
    logger.info("%s at %s, %s weights: top-1 %.4f, top-5 %.4f, macro-F1 %.4f; at threshold %.3f: coverage %.4f, "
                "precision %.4f; out-of-category handled %s; wrote %s", name, "x".join(map(str, image_size)), ckpt["weights"],
                metrics["top1"], metrics["top5"], metrics["macro_f1"], threshold, metrics["review"]["coverage"],
                metrics["review"]["precision_accepted"],
                f"{metrics['outside']['handled_share']:.4f}" if "outside" in metrics else "-", out)
    return metrics


def parse_size(text: str) -> tuple[int, int]:
    """"96x72" -> (96, 72): height x width."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"Invalid size {text!r}: use HxW, e.g. 96x72") from exc
    if h < 8 or w < 8:
        raise argparse.ArgumentTypeError(f"Invalid size {text!r}: at least 8x8")
    return h, w


def sweep_sizes(run: Path, sizes, *, ema: str = "auto", batch_size: int = 256, seconds: float = 4.0,
                speed_batch: int = 32) -> dict:
    """--sizes: the model evaluated at other input sizes than it was trained on (Touvron et al.
    2019, "Fixing the train-test resolution discrepancy"), on val only, calibrated afresh at each
    size as export would serve it; with the in-process serving speed of each size (batch 32, bf16
    where the CPU has it natively, as the handler's `precision: auto`). The best by val macro-F1
    (ties: the fewer pixels) is what evaluate and export use by default afterwards."""
    run = Path(run)
    ckpt, model = load_run(run, ema=ema)
    classes, pre = ckpt["classes"], ckpt["preprocess"]
    mean, std = tuple(pre["mean"]), tuple(pre["std"])
    prior = train_log_prior(ckpt, Path(ckpt["data_dir"]))
    bf16 = cpu_supports_bf16()
    rows = []
    for size in sizes:
        logits, y, out_logits = split_logits(ckpt, model, "val", image_size=size, mean=mean, std=std,
                                             batch_size=batch_size, desc=f" {size[0]}x{size[1]}")
        fit = fit_served(logits, y, out_logits, classes, prior)
        x = torch.randn(speed_batch, 3, *size).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        speed = measure(model, x, bf16=bf16, seconds=seconds)
        row = {"image_size": list(size), "val_top1": fit["val_top1"], "val_macro_f1": fit["val_macro_f1"],
               "val_top1_uncorrected": fit["val_top1_uncorrected"], "val_coverage": fit["val_coverage"],
               "review_threshold": fit["review_threshold"],
               "val_in_category_answered_other": fit.get("val_in_category_answered_other"),
               "val_outside_handled_share": fit["val_outside"]["handled_share"] if "val_outside" in fit else None,
               "images_per_s": speed["images_per_s"], "batch_ms": speed["batch_ms"]}
        rows.append(row)
        logger.info("size %dx%d: %s", *size, row)
    trained = list(pre["image_size"])
    base = next((r for r in rows if r["image_size"] == trained), None)
    for r in rows:
        r["speed_vs_trained_size"] = round(r["images_per_s"] / base["images_per_s"], 3) if base else None
    best = max(rows, key=lambda r: (round(r["val_macro_f1"], 6), -r["image_size"][0] * r["image_size"][1]))
    result = {"run": str(run), "split": "val", "weights": ckpt["weights"], "trained_image_size": trained,
              "criterion": "val macro-F1 of the served (calibrated) answer; ties: fewer pixels",
              "speed": {"batch_size": speed_batch, "precision": "bf16" if bf16 else "fp32", "threads": torch.get_num_threads(),
                        "seconds": seconds},
              "sizes": rows, "best": best["image_size"]}
    path = run / SIZE_SWEEP
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    logger.info("best served size on val: %s (wrote %s)", "x".join(map(str, best["image_size"])), path)
    return result


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
                        help="Kaggle-layout or prepared folder (default: the run's own split); with --score: the prepared split")
    parser.add_argument("--split", type=str, default="test", choices=["test", "val"],
                        help="which split of the run's (or --data-dir's prepared) data; val for choosing, test for the record")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: RUN/eval-<data name>); with --score: a JSON file for the figures")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: 256; --score: 512)")
    parser.add_argument("--ema", type=str, default="auto", choices=list(EMA_CHOICES),
                        help="evaluate the run's EMA weights (auto: when it kept them)")
    parser.add_argument("--serve-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="input size to calibrate and evaluate at (default: the best of a recorded --sizes sweep, "
                             "else the training size)")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=None, metavar="HxW",
                        help="sweep: val figures and serving speed at each size (e.g. 80x60 96x72 112x84); "
                             "writes RUN/eval-sizes/metrics.json and nothing else")
    parser.add_argument("--speed-seconds", type=float, default=4.0, help="with --sizes: timed seconds per size")
    parser.add_argument("--outside-dir", type=Path, action="append", default=[],
                        help="photos outside the model's categories (a Kaggle-layout folder: its rows not in them; "
                             "or a plain folder of images): shares answered other / sent to review; repeatable")
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
        if args.sizes:
            result = sweep_sizes(args.run[0], args.sizes, ema=args.ema, batch_size=args.batch_size or 256,
                                 seconds=args.speed_seconds)
            print(json.dumps({"best": result["best"], "sizes": result["sizes"]}))
            return result
        metrics = evaluate_run(args.run[0], data_dir=args.data_dir, out=args.out, batch_size=args.batch_size or 256,
                               split=args.split, ema=args.ema, serve_size=args.serve_size, outside_dirs=args.outside_dir)
    except (EvaluateError, CheckpointError, prepare_mod.CatalogueError) as exc:
        raise SystemExit(f"evaluate: {exc}") from exc
    print(json.dumps({k: metrics[k] for k in ("split", "served", "images", "top1", "top5", "macro_f1",
                                              "in_category_answered_other", "review", "outside", "outside_dirs",
                                              "label_conflicts") if k in metrics}))
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
