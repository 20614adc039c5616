"""training.train / evaluate / export on the sample catalogue with the tiny arch: seconds, not minutes."""
from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from handler.refund_inference import calibrated_probs, confidence_fit, prepare_batch, served_answers
from handler.refund_model import build_model
from handler.refund_preprocess import normalize
from support import TINY, run_train
from training import engine
from training import evaluate as evaluate_mod
from training import export as export_mod
from training import prepare as prepare_mod
from training.checkpoint import CHECKPOINT, LAST, load_checkpoint
from training.metrics import confusion, macro_f1


@pytest.fixture(scope="module")
def prepared(sample_catalogue, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare_mod.prepare(sample_catalogue, out)
    return out


@pytest.fixture(scope="module")
def evaluated_run(trained_run, tmp_path_factory):
    """A copy of the session's tiny run, evaluated (so the shared run keeps no calibration file)."""
    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(trained_run, run)
    metrics = evaluate_mod.evaluate_run(run)
    return run, metrics


def test_train_on_a_prepared_folder_then_resume(prepared, tmp_path):
    run = tmp_path / "run"
    run_train("--data-dir", str(prepared), "--out", str(run), "--epochs", "2", "--patience", "99", *TINY)
    first = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in first] == [1, 2] and not (run / "data").exists()  # used as is, not re-prepared
    ckpt = load_checkpoint(run / CHECKPOINT)
    assert ckpt["manifest_hash"] == prepare_mod.manifest_hash(prepared)
    assert ckpt["preprocess"] == {"image_size": [32, 32], "mean": list(ckpt["preprocess"]["mean"]),
                                  "std": list(ckpt["preprocess"]["std"])}
    assert set(ckpt) >= {"model", "model_config", "classes", "preprocess", "manifest_hash", "history", "epoch"}
    run_train("--data-dir", str(prepared), "--out", str(run), "--epochs", "4", "--patience", "99",
              "--resume", str(run), *TINY)
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[:2] == first  # resumed, not restarted
    assert (run / "history.csv").read_text().splitlines()[0].startswith("epoch,train_loss,train_acc")
    last = load_checkpoint(run / LAST)
    assert last["epoch"] == 4 and last["step"] == 4 * 9 and "optimizer" in last  # 132 images / 16 a step


def test_thread_tuner_in_a_run_shorter_than_its_probes(prepared, tmp_path):
    """The demo trains 2 steps an epoch: fewer than the tuner's first probes (found by `make demo`)."""
    run_train("--data-dir", str(prepared), "--out", str(tmp_path / "r"), "--epochs", "2", "--patience", "99",
              *TINY[:-4], "--batch-size", "128", "--lr", "0.01", "--class-weights", "sqrt")
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert len(history) == 2 and all(h.get("threads", 1) >= 1 for h in history)


def test_resume_refuses_other_data(prepared, sample_catalogue, tmp_path):
    run = tmp_path / "run"
    run_train("--data-dir", str(prepared), "--out", str(run), "--epochs", "1", *TINY)
    other = tmp_path / "other"
    prepare_mod.prepare(sample_catalogue, other, seed=5)
    with pytest.raises(SystemExit, match="other manifests"):
        run_train("--data-dir", str(other), "--out", str(run), "--epochs", "2", "--resume", str(run), *TINY)


def test_time_budget_too_small_fails_clearly(prepared, tmp_path):
    with pytest.raises(SystemExit, match="no time to train"):
        run_train("--data-dir", str(prepared), "--out", str(tmp_path / "r"), "--time-budget", "0.1", *TINY)


def test_clock_and_schedule():
    clock = engine.Clock(total_steps=100, budget_s=100.0, used_s=50.0, step=10)
    assert 0.5 <= clock.progress < 0.52  # the budget, not the steps, sets progress here
    clock.step = 90
    assert clock.progress == pytest.approx(0.9)
    lrs = [engine.lr_at(p / 100, peak=1.0, warmup=0.1) for p in range(101)]
    assert lrs[10] == pytest.approx(1.0) and lrs[5] == pytest.approx(0.5)
    assert all(a <= b for a, b in zip(lrs[:11], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.01)


def test_class_weights():
    labels = torch.tensor([0] * 16 + [1] * 4)
    assert engine.class_weights(labels, 2, "none") is None
    w = engine.class_weights(labels, 2, "sqrt")
    assert w[1] / w[0] == pytest.approx(2.0)  # sqrt(16 / 4)
    assert float((w[labels]).mean()) == pytest.approx(1.0)


def test_augment_keeps_shape_dtype_and_is_seeded():
    batch = torch.randint(0, 256, (8, 3, 20, 16), dtype=torch.uint8)
    a = engine.augment(batch, generator=torch.Generator().manual_seed(1))
    b = engine.augment(batch, generator=torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == batch.shape and torch.equal(a, b) and not torch.equal(a, batch)


def test_weights_options(prepared, tmp_path, trained_run, monkeypatch):
    model = build_model("tinynet", 6)
    with pytest.raises(engine.TrainError, match="no pretrained weights"):
        engine.load_initial_weights(model, "tinynet", "imagenet")
    with pytest.raises(engine.TrainError, match="Invalid --weights"):
        engine.load_initial_weights(model, "tinynet", str(tmp_path / "nope.pt"))
    # a local file: one of our checkpoints (its "model") or a bare state_dict
    assert engine.load_initial_weights(model, "tinynet", str(trained_run / CHECKPOINT)).endswith("checkpoint.pt")
    ckpt = load_checkpoint(trained_run)
    assert torch.equal(model.fc.weight, ckpt["model"]["fc.weight"])
    # imagenet weights that cannot be fetched: a clear message, not a traceback from urllib
    import torchvision

    def offline(self, *a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(engine.TrainError, match="cannot fetch .*--weights PATH"):
        engine.load_initial_weights(build_model("resnet18", 6), "resnet18", "imagenet")


def test_review_threshold_reaches_the_precision():
    conf = torch.tensor([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = torch.tensor([True, True, True, True, False, True, False, False])
    r = evaluate_mod.review_threshold(conf, correct, target=0.98)
    assert r["threshold"] == pytest.approx(0.8) and r["coverage"] == 0.5 and r["precision"] == 1.0
    r = evaluate_mod.review_threshold(conf, correct, target=0.8)
    assert r["threshold"] == pytest.approx(0.6) and r["precision"] == pytest.approx(5 / 6)
    assert evaluate_mod.review_threshold(conf, torch.zeros(8, dtype=torch.bool))["coverage"] == 0.0


def test_temperature_undoes_a_scaling():
    torch.manual_seed(0)
    y = torch.randint(0, 5, (400,))
    logits = torch.randn(400, 5)
    logits[torch.arange(400), y] += 2
    t, w = evaluate_mod.fit_calibration(logits, y)
    assert w == 0.0
    assert evaluate_mod.fit_calibration(logits * 3, y)[0] == pytest.approx(3 * t, rel=1e-2)


def test_prior_weight_undoes_a_prior_shift():
    """Logits that over-predict small classes by 1/sqrt(prior), as sqrt class weights leave them,
    get w ~ 0.5 back, and the corrected probabilities are better calibrated (lower NLL)."""
    torch.manual_seed(0)
    prior = torch.tensor([0.6, 0.25, 0.1, 0.05])
    true_logits = 2 * torch.randn(4000, 4) + prior.log()  # the Bayes posterior's logits ...
    y = torch.multinomial(torch.softmax(true_logits, 1), 1).flatten()  # ... the labels drawn from it
    shifted = true_logits - 0.5 * prior.log()  # ... as a class-weighted model learns them
    log_prior = prior.log()
    t, w = evaluate_mod.fit_calibration(shifted, y, log_prior)
    assert w == pytest.approx(0.5, abs=0.1) and t == pytest.approx(1.0, abs=0.1)
    nll = lambda z: float(torch.nn.functional.cross_entropy(z, y))  # noqa: E731
    assert nll(shifted / t + w * log_prior) < nll(shifted / evaluate_mod.fit_calibration(shifted, y)[0])
    assert evaluate_mod.log_class_prior(torch.tensor([0, 0, 0, 1]), 3).exp().tolist() == pytest.approx([0.6, 0.2, 0.2])



def test_out_of_category_photos_count_at_trainings_share_in_the_fit():
    """Val holds out-of-category photos at 40 %, training showed `other` at about 14 %: counted as
    they come, the prior weight takes up the difference and the categories' top-1 drops by points;
    weighted to training's share, a model calibrated to its training prior keeps w ~ 0."""
    torch.manual_seed(0)
    classes = ["a", "b", "c", "d", "other"]
    z = 2 * torch.randn(40000, 5) + torch.tensor([0.45, 0.25, 0.15, 0.05, 0.10]).log()  # the Bayes posterior's logits ...
    labels = torch.multinomial(torch.softmax(z, 1), 1).flatten()  # ... and the labels drawn from it
    log_prior = evaluate_mod.log_class_prior(labels, 5)  # what training showed
    inside = labels != 4
    logits, y, out_logits = z[inside][:6000], labels[inside][:6000], z[~inside][:4000]
    fit = evaluate_mod.fit_served(logits, y, out_logits, classes, log_prior)
    assert fit["prior_weight"] == pytest.approx(0.0, abs=0.1) and fit["temperature"] == pytest.approx(1.0, abs=0.05)
    assert fit["val_top1"] >= fit["val_top1_uncorrected"] - 0.005
    assert fit["val_macro_f1"] >= fit["val_macro_f1_uncorrected"] - 0.01

def long_tailed_val(seed: int = 0, n: int = 6000):
    """A model calibrated to a long-tailed training prior (its logits the Bayes posterior's): the
    most probable class favours the large classes, at the small ones' recall."""
    torch.manual_seed(seed)
    prior = torch.tensor([0.40, 0.25, 0.15, 0.08, 0.05, 0.03, 0.02, 0.01, 0.007, 0.003])
    z = 1.5 * torch.randn(n, len(prior)) + prior.log()
    y = torch.multinomial(torch.softmax(z, 1), 1).flatten()
    return z, y, prior.log()


def test_label_adjustment_is_adopted_where_it_raises_macro_f1_on_the_half_it_was_not_chosen_on():
    logits, y, log_prior = long_tailed_val()
    classes = [f"c{i}" for i in range(10)]
    fit = evaluate_mod.fit_served(logits, y, torch.empty(0, 10), classes, log_prior)
    adj = fit["label_adjustment_fit"]
    assert adj["adopted"] and fit["label_adjustment"] > 0
    assert adj["cross_fit"]["macro_f1_gain"] > 0.01 and adj["cross_fit"]["coverage_gain"] >= 0
    assert fit["label_bias"] == pytest.approx((-fit["label_adjustment"] * log_prior).tolist(), abs=1e-5)
    assert fit["val_macro_f1"] > fit["val_macro_f1_uncorrected"] + 0.01
    # the served figures are those of the adopted rule, the threshold fitted on its confidence
    by_tau = {r["tau"]: r for r in adj["val"]}
    assert fit["val_macro_f1"] == pytest.approx(by_tau[fit["label_adjustment"]]["macro_f1"])
    assert fit["review_threshold"] == pytest.approx(by_tau[fit["label_adjustment"]]["threshold"])
    a, b = evaluate_mod.val_halves(y)  # disjoint, together all of val, each class split within one photo
    assert sorted(torch.cat([a, b]).tolist()) == list(range(len(y)))
    assert ((torch.bincount(y[a], minlength=10) - torch.bincount(y[b], minlength=10)).abs() <= 1).all()


def test_label_adjustment_is_not_adopted_where_the_classes_are_balanced():
    torch.manual_seed(0)
    y = torch.randint(0, 5, (3000,))
    logits = torch.randn(3000, 5)
    logits[torch.arange(3000), y] += 1.5
    fit = evaluate_mod.fit_served(logits, y, torch.empty(0, 5), list("abcde"), torch.full((5,), 0.2).log())
    assert fit["label_adjustment"] == 0.0 and not fit["label_adjustment_fit"]["adopted"]
    assert "label_bias" not in fit


def test_label_adjustment_that_would_route_fewer_out_of_category_photos_is_not_eligible():
    """`other` is the largest class here: adjusting by the prior takes the out-of-category photos'
    answers from `other` to a category, confidently enough to be accepted."""
    classes = ["a", "b", "c", "other"]
    log_prior = torch.tensor([0.05, 0.05, 0.05, 0.85]).log()
    y = torch.arange(3000) % 3
    logits = torch.zeros(3000, 4)
    logits[:, 3] = -5.0
    logits[torch.arange(3000), y] += 0.3  # always right, at a confidence of 0.40: the threshold is that low
    out_logits = torch.tensor([[0.0, -3.0, -3.0, 0.05]]).repeat(2000, 1)  # `other` at 0.51, `a` at 0.49
    fit = evaluate_mod.fit_served(logits, y, out_logits, classes, log_prior)
    rows = {r["tau"]: r for r in fit["label_adjustment_fit"]["val"]}
    assert rows[0.0]["outside_handled"] == 1.0 and rows[1.0]["outside_handled"] == 0.0
    assert fit["label_adjustment_fit"]["eligible"] == [0.0]
    assert fit["label_adjustment"] == 0.0 and fit["val_outside"]["handled_share"] == 1.0


def capped_val(*, wrong_runner_up_close: bool, seed: int = 0, n: int = 4000):
    """Calibrated-looking logits of 10 classes, 90 % of answers right.

    wrong_runner_up_close: the top probability is drawn alike for right and wrong answers (as a
    network trained to the end with label smoothing caps it), but a wrong answer's runner-up is the
    true class, close behind; a right answer's rest is spread evenly. Otherwise the top probability
    tells them apart (right 0.80-0.95, wrong 0.50-0.80) and it is a right answer whose runner-up is
    close: the margin mixes them."""
    g = torch.Generator().manual_seed(seed)
    k = 10
    y = torch.randint(0, k, (n,), generator=g)
    right = torch.rand(n, generator=g) < 0.9
    label = torch.where(right, y, (y + torch.randint(1, k, (n,), generator=g)) % k)
    u = torch.rand(n, generator=g)
    top = 0.90 + 0.07 * u if wrong_runner_up_close else torch.where(right, 0.80 + 0.15 * u, 0.50 + 0.30 * u)
    close = ~right if wrong_runner_up_close else right
    runner_up = torch.where(right, (label + 1) % k, y)
    probs = ((1 - top) / (k - 1))[:, None].repeat(1, k)
    probs[close] = ((1 - top[close]) * 0.1 / (k - 2))[:, None].repeat(1, k)
    probs[close, runner_up[close]] = (1 - top[close]) * 0.9
    probs[torch.arange(n), label] = top
    return probs.log(), y


def test_the_margin_serves_the_confidence_where_the_top_probability_cannot_tell_right_from_wrong():
    logits, y = capped_val(wrong_runner_up_close=True)
    classes = [f"c{i}" for i in range(10)]
    fit = evaluate_mod.fit_served(logits, y, torch.empty(0, 10), classes, torch.full((10,), 0.1).log())
    choice = fit["confidence_choice"]
    assert choice["score"] == "margin"
    assert choice["probability"]["cross_fit_coverage"] < 0.1 and choice["margin"]["cross_fit_coverage"] > 0.8
    assert fit["confidence_fit"]["score"] == "margin" and fit["confidence_fit"]["slope"] > 0
    assert fit["val_coverage"] > 0.8 and fit["val_precision_accepted"] >= 0.98
    # the served confidence is P(right | margin): near 1 where the answers are right, well below where they are not
    served = served_answers(calibrated_probs(logits, fit["temperature"], torch.tensor(fit["class_bias"])), None,
                            confidence_fit(fit))[0]
    right = logits.argmax(1) == y
    assert served[right].mean() > 0.97 and served[~right].mean() < 0.5
    assert ((served >= fit["review_threshold"]) == right).double().mean() > 0.95


def test_the_top_probability_stays_the_confidence_where_the_margin_answers_no_more():
    logits, y = capped_val(wrong_runner_up_close=False)
    classes = [f"c{i}" for i in range(10)]
    fit = evaluate_mod.fit_served(logits, y, torch.empty(0, 10), classes, torch.full((10,), 0.1).log())
    choice = fit["confidence_choice"]
    assert choice["score"] == "probability" and "confidence_fit" not in fit
    assert choice["probability"]["cross_fit_coverage"] > choice["margin"]["cross_fit_coverage"]
    assert fit["val_coverage"] > 0.85


def test_a_kept_rule_is_served_as_it_is_and_only_the_rest_is_fitted():
    """int8 keeps fp32's served rule: the confidence's score and the label adjustment are not chosen
    again on int8's outputs (a flipped near tie would change 1-2 % of the labels), while T, the
    prior weight, the margin's fit and the threshold are fitted on them."""
    logits, y = capped_val(wrong_runner_up_close=True)  # chosen freely: the margin (above)
    classes = [f"c{i}" for i in range(10)]
    prior = torch.full((10,), 0.1).log()
    free = evaluate_mod.fit_served(logits, y, torch.empty(0, 10), classes, prior)
    assert evaluate_mod.served_rule(free) == {"confidence": "margin", "label_adjustment": 0.0}
    kept = evaluate_mod.fit_served(logits, y, torch.empty(0, 10), classes, prior,
                                   rule={"confidence": "probability", "label_adjustment": 0.5})
    assert evaluate_mod.served_rule(kept) == {"confidence": "probability", "label_adjustment": 0.5}
    assert "confidence_fit" not in kept and kept["label_bias"] == [round(-0.5 * float(p), 6) for p in prior]
    assert kept["val_coverage"] < 0.1  # the top probability cannot tell right from wrong here: kept all the same
    again = evaluate_mod.fit_served(logits * 1.3, y, torch.empty(0, 10), classes, prior, rule=evaluate_mod.served_rule(free))
    assert evaluate_mod.served_rule(again) == evaluate_mod.served_rule(free)
    assert again["temperature"] == pytest.approx(free["temperature"] * 1.3, rel=0.05)  # refitted on these logits


def test_the_margin_is_not_chosen_where_it_would_accept_out_of_category_photos():
    """The out-of-category photos are answered a category at a top probability below most right
    answers', but far ahead of their runner-up: the margin would accept them."""
    logits, y = capped_val(wrong_runner_up_close=True)
    classes = [f"c{i}" for i in range(9)] + ["other"]
    keep = y != 9
    logits, y = logits[keep], y[keep]
    out = torch.zeros(1000, 10)
    out[:, 0] = 5.0  # the rest alike: p = 0.94, a margin of 5 (a right answer's: about 4.8)
    fit = evaluate_mod.fit_served(logits, y, out, classes, torch.full((10,), 0.1).log())
    choice = fit["confidence_choice"]
    assert choice["margin"]["cross_fit_coverage"] > choice["probability"]["cross_fit_coverage"]
    assert choice["margin"]["outside_handled"] < 0.95 <= choice["probability"]["outside_handled"]
    assert choice["score"] == "probability" and "confidence_fit" not in fit


def test_macro_f1():
    cm = confusion(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 2]), 4)
    assert cm.tolist()[1] == [1, 2, 0, 0]
    # class 0: P=1/2 R=1 F1=2/3; class 1: P=1 R=2/3 F1=4/5; class 2: 1; class 3 has no support
    assert macro_f1(cm) == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)


def test_evaluate_writes_metrics_figures_and_calibration(evaluated_run):
    run, metrics = evaluated_run
    out = run / "eval-test"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["split"] == "test" and saved["images"] == 6 * 4 and saved["outside_category"] == 0
    for key in ("top1", "top5", "macro_f1"):
        assert 0 <= saved[key] <= 1
    assert saved["top5"] >= saved["top1"] >= 0.5
    assert set(saved["per_class"]) == {"Casual Shoes", "Handbags", "Jeans", "Socks", "Tshirts", "Watches"}
    assert all(set(v) == {"precision", "recall", "f1", "support"} for v in saved["per_class"].values())
    assert sum(v["support"] for v in saved["per_class"].values()) == 24
    for png in ("confusion_matrix.png", "curves.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG" and img.width > 400
    calib = json.loads((run / evaluate_mod.CALIBRATION).read_text())
    assert calib["temperature"] > 0 and 0 <= calib["review_threshold"] <= 1
    assert len(calib["class_bias"]) == 6 and calib["val_nll_after"] <= calib["val_nll_before"] + 1e-6
    assert calib["val_coverage"] == 0 or calib["val_precision_accepted"] >= 0.98
    assert saved["review"]["threshold"] == calib["review_threshold"]


def test_evaluate_counts_out_of_category_images_as_errors(evaluated_run, sample_catalogue, tmp_path):
    run, _ = evaluated_run
    folder = tmp_path / "labelled"
    (folder / "images").mkdir(parents=True)
    rows = (sample_catalogue / "styles.csv").read_text().splitlines()[1:9]
    with open(folder / "styles.csv", "w") as f:  # only the two needed columns
        f.write("id,articleType\n")
        for i, line in enumerate(rows):
            fields = line.split(",")
            label = "Sunglasses" if i < 3 else fields[4]
            f.write(f"{fields[0]},{label}\n")
            shutil.copy(sample_catalogue / "images" / f"{fields[0]}.jpg", folder / "images")
    (folder / "images" / "999.jpg").write_bytes(b"broken")
    with open(folder / "styles.csv", "a") as f:
        f.write("999,Jeans\n")
    m = evaluate_mod.evaluate_run(run, data_dir=folder)
    assert m["images"] == 8 and m["in_category"] == 5 and m["outside_category"] == 3
    assert m["dropped"] == {"unreadable_image": 1}
    assert m["top1"] <= 5 / 8 and m["top1"] == pytest.approx(m["top1_in_category"] * 5 / 8)
    assert m["outside"]["count"] == 3 and 0 <= m["outside"]["routed_to_review_share"] <= 1
    assert (run / "eval-labelled" / "metrics.json").is_file()


def test_evaluate_reports_images_whose_name_contradicts_their_label(evaluated_run, sample_catalogue, tmp_path):
    run, metrics = evaluated_run
    assert "label_conflicts" not in metrics  # the sample catalogue's names name their own category
    folder = tmp_path / "named"
    (folder / "images").mkdir(parents=True)
    lines = (sample_catalogue / "styles.csv").read_text().splitlines()
    with open(folder / "styles.csv", "w") as f:
        f.write(lines[0] + "\n")
        for i, line in enumerate(lines[1:9]):
            fields = line.split(",", 9)
            if i < 2:  # named as another of the model's categories
                fields[9] = "Blue Jeans" if fields[4] == "Watches" else "Steel Watches"
            f.write(",".join(fields) + "\n")
            shutil.copy(sample_catalogue / "images" / f"{fields[0]}.jpg", folder / "images")
    m = evaluate_mod.evaluate_run(run, data_dir=folder)
    c = m["label_conflicts"]
    assert c["count"] == 2
    assert m["top1"] == pytest.approx((2 * c["top1_on_them"] + 6 * c["top1_on_the_rest"]) / 8)


def test_export_carries_the_fitted_calibration(evaluated_run, tmp_path):
    run, _ = evaluated_run
    calib = json.loads((run / evaluate_mod.CALIBRATION).read_text())
    mar = export_mod.export(run, "7", model_store=tmp_path)
    with zipfile.ZipFile(mar) as z:
        meta = json.loads(z.read("model_meta.json"))
        index = json.loads(z.read("index_to_name.json"))
        names = set(z.namelist())
    for key in ("temperature", "review_threshold", "class_bias", "prior_weight", "label_adjustment"):
        assert meta[key] == calib[key], key
    assert meta.get("label_bias") == calib.get("label_bias")
    assert {"arch", "num_classes", "image_size", "mean", "std"} <= set(meta)
    assert meta["num_classes"] == len(index) == 6 and meta["version"] == "7"
    assert {"weights.pt", "model-config.yaml", "refund_preprocess.py"} <= names
    # the rollout sample: the run's test split, up to 10 per class, in the Kaggle layout
    sample = [n for n in names if n.startswith("sample/images/")]
    test_ids = {line.split(",")[0] for line in (run / "data" / "test.csv").read_text().splitlines()[1:]}
    assert sample and {Path(n).stem for n in sample} <= test_ids
    with zipfile.ZipFile(mar) as z:
        labels = z.read("sample/styles.csv").decode().splitlines()
    assert labels[0] == "id,articleType" and len(labels) == len(sample) + 1


def test_one_preprocessing_definition(prepared, tmp_path):
    """Training's cache, evaluation and the handler give identical tensors, odd sizes and modes included."""
    recs = prepare_mod.read_manifest(prepared / "val.csv")[:4]
    extra = []
    for name, img in [("big.png", Image.new("RGBA", (224, 224), (10, 200, 30, 128))),
                      ("small.jpg", Image.new("RGB", (53, 75), (200, 10, 10))),
                      ("grey.png", Image.new("L", (120, 160), 90))]:
        buf = io.BytesIO()
        img.save(buf, format=name.split(".")[1].replace("jpg", "jpeg"))
        (tmp_path / name).write_bytes(buf.getvalue())
        extra.append(prepare_mod.Record(id=name, label="x", path=tmp_path / name, sha256=""))
    recs += extra
    size, mean, std = (80, 60), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    cached = normalize(engine.load_images(recs, size), mean=mean, std=std)
    served = prepare_batch([{"body": r.path.read_bytes()} for r in recs], size, max_pixels=10**8, max_bytes=10**8)
    assert served.good == list(range(len(recs)))
    assert torch.equal(cached, normalize(served.batch, mean=mean, std=std))


def test_evaluate_score_on_val_and_test(trained_run, tmp_path):
    """training.evaluate --score (the GPU runs' scorer): split figures and a val-fitted threshold, runs without a checkpoint skipped."""
    out = tmp_path / "summary.json"
    args = evaluate_mod.get_args_parser().parse_args(["--score", "--data-dir", str(trained_run / "data"),
                                                      "--run", str(trained_run), str(tmp_path), "--out", str(out)])
    summary = evaluate_mod.main(args)
    assert list(summary) == [trained_run.name] and json.loads(out.read_text()) == summary
    fig = summary[trained_run.name]
    assert 1 <= fig["best_epoch"] <= fig["epochs"] <= 10 and 0 <= fig["test_top1"] <= 1 and 0 <= fig["val_macro_f1"] <= 1
    assert 0 < fig["val_coverage"] <= 1 and 0 <= fig["test_coverage"] <= 1
