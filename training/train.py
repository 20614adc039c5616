"""Train the refund classifier on a Kaggle-layout catalogue.

    python -m training.train --data-dir ../shared/datasets/fashion-small --out runs/real

--data-dir is either a raw catalogue (styles.csv + images/; `training.prepare` then runs with
its defaults into RUN/data) or a folder `training.prepare` wrote. The defaults are the
recipe measured for ResNet-50 from scratch on 2 CPU cores (docs/MODEL_CARD.md): native
80x60 input, bf16 autocast + channels_last, AdamW with warm-up then cosine, label smoothing,
and a 56-minute wall-clock budget (preparation and decoding included) that the LR schedule
is stretched over, so the run ends annealed instead of being cut mid-schedule.

With --other class (the default) the catalogue's photos outside the refund categories
(training.prepare's outside-train.csv) are a class of their own, `other` ("not a refund
category"), the last output; --other-per-epoch draws a fresh random share of them each epoch.
Model selection and early stopping look at val macro-F1 over the refund categories only.

--extra-data DIR (repeatable) adds reviewed photos (`python -m review export`: styles.csv with
id,articleType + images/<id>.jpg) to the training split only, never to val or test: a category's
photos as that category, those labelled `other` to the out-of-category pool (left out, with a
count, under --other none). A label that is neither a category of the run nor `other` stops the
run naming the file and line; a row whose image is missing, unreadable or a copy of a photo
already in training, val or test is skipped, logged by line (training/extra_data.py).

Writes into RUN:
  checkpoint.pt  --keep best: the best epoch by validation macro-F1 (of the EMA weights when
                 --ema-decay > 0); --keep last: the annealed end. A dict of state_dicts (the EMA
                 beside the raw weights) + model config + class names + preprocessing + the
                 manifests' hash (never a pickled model)
  last.pt        the latest state with optimizer/scheduler/RNG state, for --resume
  history.csv / history.json   one row per epoch: val figures of the raw weights, of the EMA
                 (ema_*), and the best so far (best_epoch, best_val_macro_f1), so best vs last
                 and EMA vs raw can be read off the last row
  train_manifest.csv   every training photo: id,label,path,sha256,source (the prepared manifest
                 or the --extra-data styles.csv it came from; label `other` for the out-of-category pool)
The format is training/checkpoint.py's; the loop's pieces are in training/engine.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from pathlib import Path

import torch
from torch import nn

from handler.refund_inference import OTHER_LABEL
from handler.refund_model import available_archs, build_model, cpu_supports_bf16
from handler.refund_preprocess import IMAGENET_MEAN, IMAGENET_STD
from training import extra_data as extra_mod
from training import prepare as prepare_mod
from training.checkpoint import (CHECKPOINT, LAST, CheckpointError, checkpoint_dict, load_checkpoint, save_atomic,
                                 write_history, write_train_manifest)
from training.engine import (Clock, ThreadTuner, TrainError, WeightEMA, amp_dtype, class_weights, epoch_subset, evaluate,
                             load_images, load_initial_weights, param_groups, resolve_device, train_one_epoch)

logger = logging.getLogger("training.train")
PREPARED_SUBDIR = "data"
OTHER_MODES = ("none", "class")
# The recipe's choices, each one line to flip (docs/MODEL_CARD.md has the measurements).
DEFAULT_OTHER = "class"
# The network, by how training runs on this machine (--arch auto). In bf16 (a CPU with native bf16,
# or a GPU) ResNet-26 (ResNet-50's bottleneck blocks, two per stage): 21 epochs in the hour against
# ResNet-50's 13, and it beat ResNet-50, ResNet-34 and ResNet-18 on val top-1, macro-F1 and coverage
# at 98 % precision. In float32 ResNet-18: ResNet-50 gets too few epochs in the hour there, and
# ResNet-18 beat it on every val figure; ResNet-26 has not been measured there (docs/MODEL_CARD.md,
# "The network").
DEFAULT_ARCH = {"bf16": "resnet26", "fp32": "resnet18"}
ARCH_AUTO = "auto"
# ~6,400 out-of-category training photos on the real catalogue against 19,461 in the refund
# categories: 1,500 an epoch grows an epoch by ~8 % instead of a third and shows each of those
# photos about every fourth epoch; side by side on val it beat 3,000 an epoch on the categories
# and still routed > 95 % of out-of-category photos to `other` or review (docs/MODEL_CARD.md).
DEFAULT_OTHER_PER_EPOCH = 1500
DEFAULT_EMA_DECAY = 0.0
DEFAULT_KEEP = "best"


# -- data ----------------------------------------------------------------------------------

def resolve_data(data_dir: Path, out: Path, args: argparse.Namespace) -> Path:
    """A prepared folder as is; a raw catalogue is prepared into RUN/data (reused when it exists and
    is of the current format, prepared again when it is older)."""
    data_dir = Path(data_dir)
    if prepare_mod.is_prepared(data_dir):
        if not prepare_mod.is_current(data_dir):
            raise TrainError(f"--data-dir {data_dir} was written by an older training.prepare (format "
                             f"{prepare_mod.prepared_format(data_dir)}, this is {prepare_mod.PREPARE_FORMAT}: no "
                             f"outside-train/val/test.csv); prepare it again: python -m training.prepare "
                             f"--data-dir CATALOGUE --out {data_dir}, or pass the raw catalogue")
        return data_dir
    if not (data_dir / "styles.csv").is_file():
        raise TrainError(f"--data-dir {data_dir} is neither a catalogue (styles.csv + images/) nor a folder training.prepare wrote")
    prepared = out / PREPARED_SUBDIR
    if not prepare_mod.is_current(prepared):
        if prepare_mod.is_prepared(prepared):
            logger.info("%s was prepared by an older format (%d): preparing it again", prepared, prepare_mod.prepared_format(prepared))
        prepare_mod.prepare(data_dir, prepared, categories=args.categories, min_per_class=args.min_per_class,
                            val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed)
    return prepared


# -- main --------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="raw catalogue (styles.csv + images/) or a training.prepare folder")
    parser.add_argument("--extra-data", type=Path, action="append", default=[], metavar="DIR",
                        help="reviewed photos to add to the training split only (repeatable): a Kaggle-layout folder "
                             "(styles.csv with id,articleType + images/<id>.jpg, as python -m review export writes); "
                             f"articleType is a category of the run, or {OTHER_LABEL!r} for the out-of-category pool")
    parser.add_argument("--out", type=Path, required=True, help="run folder to write the checkpoints and history into")
    parser.add_argument("--arch", type=str, default=ARCH_AUTO,
                        help="the network: auto (resnet26 where training runs in bf16, resnet18 where it runs in float32), "
                             "a torchvision classifier (resnet18, resnet50, ...), one of our ResNet shapes for small "
                             "photos (resnet18_s2, resnet18_deep2, ...: docs/TRAINING.md), or tinynet for tests")
    parser.add_argument("--epochs", type=int, default=40, help="most epochs; --time-budget usually ends the run first")
    parser.add_argument("--time-budget", type=float, default=56.0,
                        help="wall-clock minutes for the whole command, preparation and decoding included; 0 = none")
    parser.add_argument("--image-size", type=int, nargs=2, default=[80, 60], metavar=("H", "W"), help="model input size (the catalogue's photos are 80x60)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=float, default=0.05, help="share of the schedule spent warming the LR up")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms and biases)")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    parser.add_argument("--class-weights", type=str, default="none", choices=["none", "sqrt"],
                        help="loss weights against class imbalance (sqrt: 1/sqrt(class size)); on the real data "
                             "it tied with none on val (docs/MODEL_CARD.md)")
    parser.add_argument("--patience", type=int, default=6, help="stop after this many epochs without a better val macro-F1")
    parser.add_argument("--other", type=str, default=DEFAULT_OTHER, choices=OTHER_MODES,
                        help=f"class: learn the prepared out-of-category photos as a last class {OTHER_LABEL!r} "
                             f"(\"not a refund category\"); none: the refund categories only")
    parser.add_argument("--other-per-epoch", type=int, default=DEFAULT_OTHER_PER_EPOCH,
                        help="out-of-category photos drawn afresh each epoch (0: all of them)")
    parser.add_argument("--ema-decay", type=float, default=DEFAULT_EMA_DECAY,
                        help="decay per step of an EMA of the weights, kept beside them in the checkpoint and "
                             "evaluated on val each epoch (e.g. 0.998: about 3 epochs); 0 = no EMA")
    parser.add_argument("--keep", type=str, default=DEFAULT_KEEP, choices=["best", "last"],
                        help="what checkpoint.pt holds: the best epoch by val macro-F1, or the last (annealed) one")
    parser.add_argument("--weights", type=str, default="none", help="initial weights: none, imagenet or the path of a local state_dict")
    parser.add_argument("--resume", type=Path, default=None, help="continue from a last.pt (or a run folder holding one)")
    parser.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    parser.add_argument("--amp", type=str, default="auto", choices=["auto", "on", "off"],
                        help="bf16 autocast on CPU (auto: where the CPU has native bf16); on CUDA bf16, or fp16 with loss "
                             "scaling on cards without bf16")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the split, init, order and augmentation")
    prepare_mod.add_split_args(parser, note=" (prepare: raw --data-dir only)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = choose 1 or all cores by measured step time")
    return parser


def main(args: argparse.Namespace) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (TrainError, CheckpointError, prepare_mod.CatalogueError) as exc:
        raise SystemExit(f"train: {exc}") from exc


def default_arch(amp: bool) -> str:
    """The network --arch auto trains: by the precision training runs in."""
    return DEFAULT_ARCH["bf16" if amp else "fp32"]


def run(args: argparse.Namespace) -> Path:
    wall_start = time.monotonic()
    if args.arch != ARCH_AUTO and args.arch not in available_archs():
        raise TrainError(f"Invalid --arch {args.arch!r}; choose one of: {ARCH_AUTO}, {', '.join(available_archs())}")
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads or cores)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    amp = {"on": True, "off": False, "auto": device.type == "cuda" or cpu_supports_bf16()}[args.amp]
    if args.arch == ARCH_AUTO:
        args.arch = default_arch(amp)
        logger.info("--arch auto: %s, the network for training in %s (%s)", args.arch, "bf16" if amp else "float32",
                    "amp on" if amp else ("--amp off" if args.amp == "off" else "this CPU has no native bf16"))
    image_size = tuple(args.image_size)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    resume = None
    if args.resume is not None:
        path = args.resume / LAST if args.resume.is_dir() else args.resume
        if not path.is_file():
            raise TrainError(f"--resume {args.resume}: no {LAST} there")
        resume = load_checkpoint(path)

    if args.other_per_epoch < 0:
        raise TrainError(f"Invalid --other-per-epoch {args.other_per_epoch}: use a count >= 0 (0: all)")
    data = resolve_data(args.data_dir, out, args).resolve()  # evaluate may run from another folder
    classes = json.loads((data / "classes.json").read_text())
    extras = extra_mod.read_all(args.extra_data, classes, data)
    train_recs = prepare_mod.read_manifest(data / "train.csv")
    val_recs = prepare_mod.read_manifest(data / "val.csv")
    # (record, source) of what trains as a category, then of the out-of-category pool (label `other`).
    inside = [(r, data / "train.csv") for r in train_recs] + [(r, e.csv) for e in extras for r in e.inside]
    pool, outside_val = [], []
    extra_other = [(r, e.csv) for e in extras for r in e.other]
    if args.other == "class":
        pool = [(r, data / "outside-train.csv") for r in prepare_mod.read_manifest(data / "outside-train.csv")] + extra_other
        outside_val = prepare_mod.read_manifest(data / "outside-val.csv")
        if pool:
            classes = classes + [OTHER_LABEL]
        else:
            logger.warning("--other class: %s holds no out-of-category photos; training the refund categories only", data)
    elif extra_other:
        logger.warning("--other none: %d reviewed photos labelled %r left out (train with --other class to learn them)",
                       len(extra_other), OTHER_LABEL)
        extra_other = []
    other = classes.index(OTHER_LABEL) if OTHER_LABEL in classes else None
    trained = [(r, r.label, src) for r, src in inside] + [(r, OTHER_LABEL, src) for r, src in pool]
    reviewed = [(r, r.label) for e in extras for r in e.inside] + [(r, OTHER_LABEL) for r, _ in extra_other]
    m_hash = extra_mod.manifest_hash(prepare_mod.manifest_hash(data), reviewed)
    if resume is not None and resume["manifest_hash"] != m_hash:
        raise TrainError(f"--resume {args.resume}: it was trained on other manifests than {data} with the "
                         f"--extra-data given now ({len(args.extra_data)} folders; hash differs)")
    write_train_manifest(out, [{"id": r.id, "label": label, "path": r.path, "sha256": r.sha256, "source": src}
                               for r, label, src in trained])
    to_index = {c: i for i, c in enumerate(classes)}
    t0 = time.monotonic()
    # One cache: the in-category photos, then the out-of-category ones (label `other`).
    train_x = load_images([r for r, _, _ in trained], image_size, desc="decode train")
    val_x = load_images(val_recs, image_size, desc="decode val")
    outside_val_x = load_images(outside_val, image_size, desc="decode outside val") if other is not None else None
    train_y = torch.tensor([to_index[label] if label != OTHER_LABEL else other for _, label, _ in trained], dtype=torch.long)
    val_y = torch.tensor([to_index[r.label] for r in val_recs])
    if device.type == "cuda":  # the uint8 cache fits any card: augmenting there keeps the GPU fed
        train_x, val_x = train_x.to(device), val_x.to(device)
        outside_val_x = outside_val_x.to(device) if outside_val_x is not None else None
    n_in, n_out = len(inside), len(pool)
    per_epoch_out = n_out if args.other_per_epoch == 0 else min(n_out, args.other_per_epoch)
    class_counts = torch.bincount(train_y[:n_in], minlength=len(classes))
    if other is not None:
        class_counts[other] = per_epoch_out  # what an epoch shows of it: the prior calibration corrects for
    logger.info("data %s: %d classes, %d train (%d reviewed) + %d out-of-category (%d reviewed; %d an epoch), "
                "%d val + %d out-of-category; decoded to uint8 %s in %.1fs (%.0f MB); amp=%s device=%s threads=%d",
                data, len(classes), n_in, n_in - len(train_recs), n_out, len(extra_other), per_epoch_out, len(val_y),
                len(outside_val), image_size,
                time.monotonic() - t0, (train_x.numel() + val_x.numel()) / 1e6, amp, device, torch.get_num_threads())

    model_config = {"arch": args.arch, "num_classes": len(classes)}
    model = build_model(**model_config)
    init = load_initial_weights(model, args.arch, args.weights) if resume is None else "resume"
    model = model.to(device, memory_format=torch.channels_last)
    # fused: one kernel for all parameters, 13 ms instead of 58 ms per ResNet-50 step on 2 cores
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, fused=True)
    weights = class_weights(train_y[:n_in], len(classes), args.class_weights)
    if weights is not None and other is not None:  # `other` by the share an epoch shows of it
        weights = class_weights(torch.repeat_interleave(torch.arange(len(classes)), class_counts), len(classes),
                                args.class_weights)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing).to(device)  # weight is a buffer
    val_criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype(device) == torch.float16 else None
    generator = torch.Generator().manual_seed(args.seed)
    tuner = ThreadTuner([1, cores]) if not args.threads and device.type == "cpu" and cores > 1 else None
    steps_per_epoch = -(-(n_in + per_epoch_out) // args.batch_size)
    budget_s = args.time_budget * 60 if args.time_budget else None
    # Keep room after the schedule ends for the last validation pass(es) and the saves.
    val_images = (len(val_y) + len(outside_val)) * (2 if args.ema_decay else 1)
    reserve_s = 20 + 3 * val_images / 200
    history, best, epoch0, used_s, step = [], {"val_macro_f1": -1.0, "epoch": 0}, 0, 0.0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        history, best, epoch0 = resume["history"], resume["best"], resume["epoch"]
        used_s, step = resume["used_s"], resume["step"]
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        logger.info("resumed %s at epoch %d, step %d (best val macro-F1 %.4f at epoch %d)",
                    args.resume, epoch0, step, best["val_macro_f1"], best["epoch"])
    else:
        used_s = time.monotonic() - wall_start  # preparation and decoding count against the budget
    ema = None
    if args.ema_decay:
        ema = WeightEMA(model, args.ema_decay, updates=resume.get("ema_updates", 0) if resume is not None else 0)
        if resume is not None and "ema" in resume:
            ema.module.load_state_dict(resume["ema"])
    schedule_s = (budget_s - reserve_s) if budget_s else None
    if schedule_s is not None and schedule_s <= used_s:
        raise TrainError(f"--time-budget {args.time_budget} min leaves no time to train after {used_s:.0f}s of preparation")
    clock = Clock(total_steps=args.epochs * steps_per_epoch, budget_s=schedule_s, used_s=used_s, step=step)
    logger.info("training %s (%s init) for at most %d epochs x %d steps%s", args.arch, init, args.epochs, steps_per_epoch,
                f", within {schedule_s / 60:.1f} min of schedule" if schedule_s else "")

    meta = dict(model_config=model_config, classes=classes, image_size=image_size, mean=mean, std=std,
                manifest_hash=m_hash, data_dir=data, args=args)
    extra = {"class_counts": class_counts.tolist(), "keep": args.keep, "ema_decay": args.ema_decay,
             "extra_data": [e.summary(other_trained=other is not None) for e in extras]}
    # The figure selection and early stopping go by: that of the weights export serves by default.
    select = "ema_val_macro_f1" if ema is not None else "val_macro_f1"
    stale = history[-1]["epoch"] - best["epoch"] if history else 0
    for epoch in range(epoch0 + 1, args.epochs + 1):
        if clock.progress >= 1.0:
            break
        t_epoch = time.monotonic()
        row = {"epoch": epoch}
        subset = epoch_subset(n_in, n_out, args.other_per_epoch, generator)
        row |= train_one_epoch(model, optimizer, criterion, train_x, train_y, clock=clock, args=args, device=device,
                               amp=amp, mean=mean, std=std, epoch=epoch, generator=generator, scaler=scaler, tuner=tuner,
                               subset=subset, ema=ema)
        train_s = time.monotonic() - t_epoch
        row["train_s"] = round(train_s, 1)
        row["images_per_s"] = round(row["train_images"] / max(train_s, 1e-9), 1)
        val = dict(batch_size=256, device=device, amp=amp, mean=mean, std=std, outside=outside_val_x, other=other)
        row |= evaluate(model, val_criterion, val_x, val_y, **val)
        if ema is not None:
            row |= {f"ema_{k}": v for k, v in evaluate(ema.module, val_criterion, val_x, val_y, **val).items()}
        row["lr"] = optimizer.param_groups[0]["lr"]
        if tuner is not None:
            row["threads"] = tuner.home or tuner.current  # home is unset until the first probes end
            row |= {f"s_per_step_{k}_threads": round(v, 3) for k, v in sorted(tuner.speed.items())}
        row["progress"] = round(clock.progress, 4)
        row["elapsed_s"] = round(clock.used_s, 1)
        improved = row[select] > best["val_macro_f1"]
        if improved:
            best = {"val_macro_f1": row[select], "val_acc": row[select.replace("macro_f1", "acc")], "epoch": epoch}
        row["best_epoch"], row["best_val_macro_f1"] = best["epoch"], best["val_macro_f1"]
        history.append(row)
        if improved or args.keep == "last":
            save_atomic(checkpoint_dict(model, history=history, epoch=epoch, best=best, ema=ema and ema.module,
                                        extra=extra | {"last": figures(row, select)}, **meta), out / CHECKPOINT)
        stale = 0 if improved else stale + 1
        last = checkpoint_dict(model, history=history, epoch=epoch, best=best, ema=ema and ema.module,
                               extra=extra | {"last": figures(row, select)}, **meta)
        last |= {"optimizer": optimizer.state_dict(), "step": clock.step, "used_s": clock.used_s,
                 "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                 "ema_updates": ema.updates if ema is not None else 0}
        save_atomic(last, out / LAST)
        write_history(out, history)
        logger.info("epoch %d: %s%s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "epoch"},
                    " *best*" if improved else "")
        if stale >= args.patience:
            logger.info("early stop: val macro-F1 has not improved for %d epochs", stale)
            break
    if not (out / CHECKPOINT).is_file():
        raise TrainError("no epoch finished within the budget: nothing to save (raise --time-budget)")
    # The kept checkpoint carries the full history, so curves show the epochs after the best too,
    # and both figures: the best epoch's and the last one's (what --keep chooses between).
    kept = load_checkpoint(out / CHECKPOINT)
    kept["history"] = history
    kept["last"] = figures(history[-1], select) if history else None
    save_atomic(kept, out / CHECKPOINT)
    write_history(out, history)
    logger.info("saved %s (--keep %s): epoch %d; best epoch %d, val macro-F1 %.4f; last epoch %d, val macro-F1 %.4f; "
                "%.1f min wall", out / CHECKPOINT, args.keep, kept["epoch"], best["epoch"], best["val_macro_f1"],
                kept["last"]["epoch"], kept["last"]["val_macro_f1"], (time.monotonic() - wall_start) / 60)
    return out / CHECKPOINT


def figures(row: dict, select: str) -> dict:
    """An epoch's val figures by which `--keep` chooses (of the EMA weights when there is an EMA)."""
    return {"epoch": row["epoch"], "val_macro_f1": row[select], "val_acc": row[select.replace("macro_f1", "acc")]}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
