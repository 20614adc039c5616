"""The out-of-category photos as a class of their own (`other`), the weight EMA, best vs last, and
the served size: prepare -> train -> evaluate -> export -> handler on a sample catalogue that has
products outside the refund categories (sunglasses, wallets, perfume)."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from handler.refund_inference import OTHER_LABEL, format_prediction
from serving import archive as archive_mod
from support import make_handler, train_tiny
from training import evaluate as evaluate_mod
from training import export as export_mod
from training import make_sample_catalogue
from training import prepare as prepare_mod
from training import quantize
from training.checkpoint import CALIBRATION, CHECKPOINT, load_checkpoint, load_run

CATEGORIES = ["Casual Shoes", "Handbags", "Jeans", "Socks", "Tshirts", "Watches"]
OUTSIDE_TYPES = set(make_sample_catalogue.OUTSIDE_DRAWERS)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("catalogue-other")
    make_sample_catalogue.write_catalogue(out, per_class=30, seed=0, outside_per_class=30)
    return out


@pytest.fixture(scope="module")
def other_run(catalogue, tmp_path_factory) -> Path:
    """Trained with the out-of-category class and an EMA of the weights."""
    return train_tiny(catalogue, tmp_path_factory.mktemp("run-other"), "--other", "class", "--ema-decay", "0.9",
                      "--patience", "99")


@pytest.fixture(scope="module")
def evaluated(other_run, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("evaluated-other") / "run"
    shutil.copytree(other_run, run)
    return run, evaluate_mod.evaluate_run(run)


# -- prepare ---------------------------------------------------------------------------------

def test_prepare_splits_the_outside_photos_by_article_type(catalogue, tmp_path):
    summary = prepare_mod.prepare(catalogue, tmp_path / "p")
    assert summary["format"] == prepare_mod.PREPARE_FORMAT == 2 and prepare_mod.is_current(tmp_path / "p")
    splits = {s: prepare_mod.read_manifest(tmp_path / "p" / f"outside-{s}.csv") for s in prepare_mod.SPLITS}
    for label in OUTSIDE_TYPES:  # stratified: each type cut like a category, 30 -> 22 / 4 / 4
        assert [sum(r.label == label for r in splits[s]) for s in prepare_mod.SPLITS] == [22, 4, 4]
    assert summary["outside_split_sizes"] == {"train": 66, "val": 12, "test": 12}
    ids = [r.id for recs in splits.values() for r in recs]
    union = prepare_mod.read_manifest(tmp_path / "p" / "outside.csv")
    assert len(ids) == len(set(ids)) == 90 and set(ids) == {r.id for r in union}  # outside.csv: the union
    inside = {r.id for s in prepare_mod.SPLITS for r in prepare_mod.read_manifest(tmp_path / "p" / f"{s}.csv")}
    assert not inside & set(ids)
    # the in-category splits do not depend on the outside photos
    plain = tmp_path / "plain-cat"
    make_sample_catalogue.write_catalogue(plain, per_class=30, seed=0)
    prepare_mod.prepare(plain, tmp_path / "q")
    for s in prepare_mod.SPLITS:
        assert [r.id for r in prepare_mod.read_manifest(tmp_path / "q" / f"{s}.csv")] == \
               [r.id for r in prepare_mod.read_manifest(tmp_path / "p" / f"{s}.csv")]


def test_other_is_a_reserved_name(catalogue, tmp_path):
    cats = tmp_path / "cats.txt"
    cats.write_text("Tshirts\nother\n")
    with pytest.raises(prepare_mod.CatalogueError, match="reserved"):
        prepare_mod.prepare(catalogue, tmp_path / "p", categories=cats)


def make_old_format(folder: Path) -> None:
    """What training.prepare wrote before the outside photos were split: one outside.csv, no format."""
    for name in prepare_mod.OUTSIDE_SPLITS:
        (folder / name).unlink()
    info = json.loads((folder / "prepare.json").read_text())
    del info["format"]
    (folder / "prepare.json").write_text(json.dumps(info))


def test_an_older_prepared_folder_is_refused_or_prepared_again(catalogue, tmp_path):
    given = tmp_path / "given"
    prepare_mod.prepare(catalogue, given)
    make_old_format(given)
    assert prepare_mod.is_prepared(given) and not prepare_mod.is_current(given)
    with pytest.raises(SystemExit, match="older training.prepare"):
        train_tiny(given, tmp_path / "r1", epochs=1)
    # a run's own RUN/data of the older format is prepared again
    run = tmp_path / "r2"
    prepare_mod.prepare(catalogue, run / "data")
    make_old_format(run / "data")
    train_tiny(catalogue, run, epochs=1)
    assert prepare_mod.is_current(run / "data") and OTHER_LABEL in load_checkpoint(run)["classes"]


# -- train -------------------------------------------------------------------------------------

def test_train_learns_other_as_a_last_class_with_an_ema(other_run):
    ckpt = load_checkpoint(other_run)
    assert ckpt["classes"] == CATEGORIES + [OTHER_LABEL] and ckpt["model_config"] == {"arch": "tinynet", "num_classes": 7}
    assert ckpt["class_counts"][-1] == 66  # all 66 outside-train photos each epoch (under the default cap)
    assert set(ckpt["ema"]) == set(ckpt["model"]) and ckpt["ema_decay"] == 0.9
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"] if ckpt["model"][k].is_floating_point())
    history = json.loads((other_run / "history.json").read_text())
    last = history[-1]
    assert last["train_images"] == 132 + 66
    for key in ("val_macro_f1", "ema_val_macro_f1", "val_in_category_answered_other", "val_outside_answered_other",
                "ema_val_outside_answered_other", "best_epoch", "best_val_macro_f1"):
        assert key in last, key
    # the shapes are easy: the model learns to say "not a refund category"
    assert last["ema_val_outside_answered_other"] >= 0.8 and last["ema_val_in_category_answered_other"] <= 0.1, last
    # --keep best (the default), by the EMA's val macro-F1 since the run has one
    assert ckpt["keep"] == "best" and ckpt["epoch"] == ckpt["best"]["epoch"] == last["best_epoch"]
    assert ckpt["best"]["val_macro_f1"] == max(h["ema_val_macro_f1"] for h in history)
    assert ckpt["last"] == {"epoch": 10, "val_macro_f1": last["ema_val_macro_f1"], "val_acc": last["ema_val_acc"]}
    # load_run serves the EMA where there is one, the raw weights on request
    assert load_run(other_run)[0]["weights"] == "ema" and load_run(other_run, ema="off")[0]["weights"] == "raw"


def test_other_per_epoch_draws_a_share(catalogue, tmp_path):
    run = train_tiny(catalogue, tmp_path / "r", "--other-per-epoch", "10", epochs=2)
    history = json.loads((run / "history.json").read_text())
    assert [h["train_images"] for h in history] == [132 + 10] * 2
    ckpt = load_checkpoint(run)
    assert ckpt["class_counts"][-1] == 10 and "ema" not in ckpt


@pytest.mark.parametrize("keep, kept_epoch", [("best", 1), ("last", 3)])
def test_keep_best_or_last(catalogue, tmp_path, monkeypatch, keep, kept_epoch):
    """Val macro-F1 made to fall epoch after epoch: best is the first epoch, last the third; both
    figures are recorded whichever is kept."""
    from training import train as train_mod

    real, calls = train_mod.evaluate, []

    def falling(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) | {"val_macro_f1": 1.0 / len(calls)}

    monkeypatch.setattr(train_mod, "evaluate", falling)
    run = train_tiny(catalogue, tmp_path / "r", "--keep", keep, "--other-per-epoch", "10", epochs=3)
    ckpt, last = load_checkpoint(run), load_checkpoint(run / "last.pt")
    assert ckpt["keep"] == keep and ckpt["epoch"] == kept_epoch
    assert ckpt["best"]["epoch"] == 1 and ckpt["best"]["val_macro_f1"] == 1.0
    assert ckpt["last"]["epoch"] == 3 and ckpt["last"]["val_macro_f1"] == pytest.approx(1 / 3)
    assert all(torch.equal(ckpt["model"][k], last["model"][k]) for k in last["model"]) is (keep == "last")
    rows = json.loads((run / "history.json").read_text())
    assert [(r["best_epoch"], r["best_val_macro_f1"]) for r in rows] == [(1, 1.0)] * 3


def test_resume_keeps_the_ema(catalogue, tmp_path):
    run = tmp_path / "r"
    common = ("--ema-decay", "0.9", "--other-per-epoch", "10", "--patience", "99")
    train_tiny(catalogue, run, *common, epochs=2)
    first = load_checkpoint(run / "last.pt")
    assert first["ema_updates"] == first["step"] == 2 * 9  # (132 + 10) / 16 a step
    train_tiny(catalogue, run, *common, "--resume", str(run), epochs=3)
    last = load_checkpoint(run / "last.pt")
    assert last["ema_updates"] == last["step"] == 3 * 9 and [h["epoch"] for h in last["history"]] == [1, 2, 3]
    assert any(not torch.equal(first["ema"][k], last["ema"][k]) for k in first["ema"])


def test_epoch_subset_is_fresh_each_epoch():
    from training.engine import epoch_subset

    g = torch.Generator().manual_seed(0)
    a, b = epoch_subset(5, 20, 4, g), epoch_subset(5, 20, 4, g)
    assert a[:5].tolist() == list(range(5)) and len(a) == 9 and a[5:].min() >= 5 and len(set(a.tolist())) == 9
    assert a.tolist() != b.tolist()
    assert epoch_subset(5, 3, 0, g).tolist() == list(range(8)) and epoch_subset(5, 0, 4, g) is None


def test_without_outside_photos_the_run_has_the_refund_categories_only(trained_run):
    assert OTHER_LABEL not in load_checkpoint(trained_run)["classes"]  # the plain sample catalogue has none


# -- evaluate --------------------------------------------------------------------------------

def test_evaluate_reports_the_routing_of_outside_photos(evaluated, tmp_path):
    run, m = evaluated
    assert m["served"]["weights"] == "ema" and m["served"]["other_output"] is True
    assert set(m["per_class"]) == set(CATEGORIES) and m["images"] == 24  # over the refund categories only
    o = m["outside"]
    assert o["source"] == "outside-test.csv" and o["count"] == 12
    assert o["answered_other_share"] + o["routed_to_review_share"] + o["accepted_as_category_share"] == pytest.approx(1.0)
    assert o["handled_share"] == pytest.approx(o["answered_other_share"] + o["routed_to_review_share"])
    assert o["answered_other_share"] >= 0.5 and 0 <= m["in_category_answered_other"] <= 0.2
    calib = json.loads((run / CALIBRATION).read_text())
    assert calib["weights"] == "ema" and calib["image_size"] == [32, 32] and len(calib["class_bias"]) == 7
    assert calib["val_outside"]["count"] == 12  # fitted on val: outside-val beside it
    # val for choosing: outside-val goes with it
    val = evaluate_mod.evaluate_run(run, split="val")
    assert val["split"] == "val" and val["outside"]["source"] == "outside-val.csv"
    # any folder of photos outside the categories: a plain folder of images
    plain = tmp_path / "returns"
    plain.mkdir()
    for r in prepare_mod.read_manifest(run / "data" / "outside-test.csv")[:5]:
        shutil.copy(r.path, plain / f"photo-{r.id}.jpg")
    (plain / "notes.txt").write_text("not an image")
    (plain / "broken.jpg").write_bytes(b"broken")
    m2 = evaluate_mod.evaluate_run(run, outside_dirs=[plain])
    d = m2["outside_dirs"][str(plain)]
    assert d["count"] == 5 and d["dropped"] == {"unreadable_image": 1}
    assert d["handled_share"] == pytest.approx(d["answered_other_share"] + d["routed_to_review_share"])


def test_a_model_without_other_reports_the_same_routing(trained_run, catalogue, tmp_path):
    """A 6-class model on a Kaggle folder with out-of-category rows: never answers other, same keys."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    m = evaluate_mod.evaluate_run(run, outside_dirs=[catalogue])
    d = m["outside_dirs"][str(catalogue)]
    assert d["count"] == 90 and d["answered_other_share"] == 0.0
    assert d["routed_to_review_share"] + d["accepted_as_category_share"] == pytest.approx(1.0)
    assert "in_category_answered_other" not in m


def test_size_sweep_on_val_sets_the_served_size(evaluated, tmp_path):
    src, _ = evaluated
    run = tmp_path / "run"
    shutil.copytree(src, run)
    args = evaluate_mod.get_args_parser().parse_args(["--run", str(run), "--sizes", "32x32", "40x40", "48x48",
                                                      "--speed-seconds", "0.05"])
    sweep = evaluate_mod.main(args)
    assert [r["image_size"] for r in sweep["sizes"]] == [[32, 32], [40, 40], [48, 48]] and sweep["split"] == "val"
    assert all(r["images_per_s"] > 0 and 0 <= r["val_macro_f1"] <= 1 for r in sweep["sizes"])
    assert sweep["sizes"][0]["speed_vs_trained_size"] == 1.0
    saved = json.loads((run / "eval-sizes" / "metrics.json").read_text())
    assert saved["best"] == sweep["best"] == max(sweep["sizes"], key=lambda r: (round(r["val_macro_f1"], 6),
                                                                                 -r["image_size"][0] * r["image_size"][1]))["image_size"]
    # export serves the sweep's best by default, and wants the calibration fitted at it
    best = sweep["best"]
    if best != [32, 32]:
        with pytest.raises(export_mod.ExportError, match=f"--serve-size {best[0]} {best[1]}"):
            export_mod.export(run, "8", model_store=tmp_path / "store")
    forced = [40, 40] if best != [40, 40] else [48, 48]
    with pytest.raises(export_mod.ExportError, match=f"training.evaluate --run .* --serve-size {forced[0]} {forced[1]}"):
        export_mod.export(run, "9", model_store=tmp_path / "store", serve_size=forced)
    evaluate_mod.evaluate_run(run, serve_size=forced)
    assert json.loads((run / CALIBRATION).read_text())["image_size"] == forced
    mar = export_mod.export(run, "9", model_store=tmp_path / "store", serve_size=forced)
    meta = json.loads(zipfile.ZipFile(mar).read("model_meta.json"))
    assert meta["image_size"] == forced and meta["trained_image_size"] == [32, 32] and meta["weights"] == "ema"


# -- export and the handler ------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_handler(evaluated, tmp_path_factory):
    run, _ = evaluated
    store = tmp_path_factory.mktemp("store-other")
    mar = export_mod.export(run, "1", model_store=store)
    folder = tmp_path_factory.mktemp("mar-other")
    with zipfile.ZipFile(mar) as z:
        z.extractall(folder)
    return folder, make_handler(folder)


def test_export_carries_other_and_a_sample_of_outside_photos(other_handler, evaluated):
    folder, _ = other_handler
    index = json.loads((folder / "index_to_name.json").read_text())
    assert index["6"] == OTHER_LABEL and len(index) == 7
    meta = json.loads((folder / "model_meta.json").read_text())
    assert meta["num_classes"] == 7 and meta["weights"] == "ema" and meta["image_size"] == [32, 32]
    ema = load_checkpoint(evaluated[0])["ema"]
    served = torch.load(folder / "weights.pt", weights_only=True)
    assert all(torch.equal(served[k], ema[k]) for k in ema)
    labels = [line.split(",")[1] for line in (folder / "sample" / "styles.csv").read_text().splitlines()[1:]]
    assert labels.count(OTHER_LABEL) == 12 and len(labels) == 12 + 24  # outside-test, then the test split
    outside_ids = {r.id for r in prepare_mod.read_manifest(evaluated[0] / "data" / "outside-test.csv")}
    rows = [line.split(",") for line in (folder / "sample" / "styles.csv").read_text().splitlines()[1:]]
    assert {i for i, label in rows if label == OTHER_LABEL} == outside_ids


def test_handler_answers_other_for_an_outside_photo(other_handler, evaluated):
    folder, (h, ctx) = other_handler
    run, _ = evaluated
    outside = prepare_mod.read_manifest(run / "data" / "outside-test.csv")
    inside = prepare_mod.read_manifest(run / "data" / "test.csv")
    out = h.handle([{"body": r.path.read_bytes()} for r in outside + inside], ctx)
    on_outside, on_inside = out[:len(outside)], out[len(outside):]
    assert sum(a["label"] == OTHER_LABEL for a in on_outside) >= 0.75 * len(outside)
    for a in out:
        assert a["in_category"] is (a["label"] != OTHER_LABEL) and a["needs_review"] is (a["confidence"] < h.review_threshold)
        assert len(a["topk"]) == 5
    assert sum(a["label"] == r.label for a, r in zip(on_inside, inside)) >= 0.75 * len(inside)
    assert any(OTHER_LABEL in [t["label"] for t in a["topk"]] for a in on_inside)  # top-k may hold it


def test_int8_of_a_model_with_other(evaluated, tmp_path):
    """The int8 model of a model with the `other` output: calibrated and gated on val with its
    out-of-category photos (labelled other), and served with in_category like the float one."""
    run, _ = evaluated
    anything = quantize.Gate(min_agreement=0.0, max_top1_drop=1.0, max_coverage_drop=1.0)  # the gate has its own tests
    mar = export_mod.export(run, "5", model_store=tmp_path / "store", sample_per_class=0, int8="on", int8_gate=anything)
    folder = tmp_path / "mar"
    with zipfile.ZipFile(mar) as z:
        z.extractall(folder)
    int8 = json.loads((folder / "model_meta.json").read_text())["int8"]
    val, outside_val = (prepare_mod.read_manifest(run / "data" / f) for f in ("val.csv", "outside-val.csv"))
    assert int8["status"] == "passed" and len(int8["class_bias"]) == 7
    assert (int8["gate"]["images"], int8["gate"]["in_category"]) == (len(val) + len(outside_val), len(val))
    assert "outside-train.csv" in int8["calibration_source"]
    h, ctx = make_handler(folder)
    assert h.precision == "int8" and h.classes[6] == OTHER_LABEL
    outside = prepare_mod.read_manifest(run / "data" / "outside-test.csv")
    out = h.handle([{"body": r.path.read_bytes()} for r in outside], ctx)
    assert sum(a["label"] == OTHER_LABEL for a in out) >= 0.75 * len(outside)
    assert all(a["in_category"] is (a["label"] != OTHER_LABEL) for a in out)


def test_an_older_archive_answers_as_before(extracted_archive, unseen_images):
    """A model without the `other` output (all archives before it): no in_category key, never "other"."""
    h, ctx = make_handler(extracted_archive)
    out = h.handle([{"body": p.read_bytes()} for p in sorted((unseen_images / "images").glob("*.jpg"))[:4]], ctx)
    assert all(set(a) == {"label", "confidence", "topk", "needs_review", "model", "version"} for a in out)


def test_format_prediction_for_other():
    classes = ["Jeans", "Tshirts", OTHER_LABEL]
    kw = dict(topk=3, review_threshold=0.6, model="m", version="1")
    sure = format_prediction(torch.tensor([0.1, 0.1, 0.8]), classes, **kw)
    unsure = format_prediction(torch.tensor([0.3, 0.2, 0.5]), classes, **kw)
    jeans = format_prediction(torch.tensor([0.7, 0.1, 0.2]), classes, **kw)
    assert (sure["label"], sure["in_category"], sure["needs_review"]) == (OTHER_LABEL, False, False)
    assert (unsure["label"], unsure["in_category"], unsure["needs_review"]) == (OTHER_LABEL, False, True)
    assert (jeans["label"], jeans["in_category"], jeans["needs_review"]) == ("Jeans", True, False)
    assert "in_category" not in format_prediction(torch.tensor([0.7, 0.3]), ["Jeans", "Tshirts"], **kw)


def test_serving_and_the_handler_agree_on_the_other_label():
    assert archive_mod.OTHER_LABEL == OTHER_LABEL


# -- older runs ------------------------------------------------------------------------------

def test_an_older_run_evaluates_and_exports(trained_run, tmp_path):
    """A checkpoint without the keys this version adds, on a prepared folder of the older format."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for name in prepare_mod.OUTSIDE_SPLITS:  # the older format: one outside.csv
        (run / "data" / name).unlink(missing_ok=True)
    ckpt = load_checkpoint(run)
    for key in ("class_counts", "keep", "ema_decay", "last"):
        ckpt.pop(key, None)
    ckpt["manifest_hash"] = prepare_mod.manifest_hash(run / "data")
    torch.save(ckpt, run / CHECKPOINT)
    m = evaluate_mod.evaluate_run(run)
    assert m["served"] == {"image_size": [32, 32], "trained_image_size": [32, 32], "weights": "raw", "classes": 6,
                           "other_output": False}
    assert m["top1"] >= 0.5
    mar = export_mod.export(run, "3", model_store=tmp_path / "store")
    assert json.loads(zipfile.ZipFile(mar).read("index_to_name.json"))["5"] == "Watches"
