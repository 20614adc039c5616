"""Train the refund classifier on a Kaggle-layout catalogue.

    python -m training.train --data-dir ../shared/datasets/fashion-small --out runs/real

--data-dir is either a raw catalogue (styles.csv + images/; `training.prepare` then runs with
its defaults into RUN/data) or a folder `training.prepare` wrote. The defaults are the
recipe measured for ResNet-50 from scratch on 2 CPU cores (docs/MODEL_CARD.md): native
80x60 input, bf16 autocast + channels_last, AdamW with warm-up then cosine, label smoothing,
and a 56-minute wall-clock budget (preparation and decoding included) that the LR schedule
is stretched over, so the run ends annealed instead of being cut mid-schedule.

Writes into RUN:
  checkpoint.pt  the best epoch by validation macro-F1: a dict of state_dicts + model config +
                 class names + preprocessing + the manifests' hash (never a pickled model)
  last.pt        the latest state with optimizer/scheduler/RNG state, for --resume
  history.csv / history.json   one row per epoch
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from handler.refund_model import available_archs, build_model, cpu_supports_bf16
from handler.refund_preprocess import IMAGENET_MEAN, IMAGENET_STD, load_for_model, normalize
from training import prepare as prepare_mod
from training.metrics import confusion, macro_f1

logger = logging.getLogger("training.train")
CHECKPOINT = "checkpoint.pt"
LAST = "last.pt"
PREPARED_SUBDIR = "data"


class TrainError(RuntimeError):
    pass


# -- data ----------------------------------------------------------------------------------

def resolve_data(data_dir: Path, out: Path, args: argparse.Namespace) -> Path:
    """A prepared folder as is; a raw catalogue is prepared into RUN/data (reused when it exists)."""
    data_dir = Path(data_dir)
    if prepare_mod.is_prepared(data_dir):
        return data_dir
    if not (data_dir / "styles.csv").is_file():
        raise TrainError(f"--data-dir {data_dir} is neither a catalogue (styles.csv + images/) nor a folder training.prepare wrote")
    prepared = out / PREPARED_SUBDIR
    if not prepare_mod.is_prepared(prepared):
        prepare_mod.prepare(data_dir, prepared, categories=args.categories, min_per_class=args.min_per_class,
                            val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed)
    return prepared


def load_images(records, image_size: tuple[int, int], *, workers: int = 4, desc: str = "decode") -> torch.Tensor:
    """Decode every image once into a uint8 cache (N, 3, H, W): the same call the handler makes."""
    out = torch.empty((len(records), 3, *image_size), dtype=torch.uint8)

    def load(i: int) -> None:
        out[i] = load_for_model(Path(records[i].path).read_bytes(), image_size)

    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        list(tqdm(pool.map(load, range(len(records))), total=len(records), desc=desc, leave=False,
                  mininterval=5.0, disable=None))
    return out


def augment(batch: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, H, W): flip, mild affine (scale/shift/rotate), mild colour.

    Catalogue shots are upright and centred on a light background, so the geometry stays
    mild and out-of-frame pixels copy the border (the background) instead of turning black.
    The result goes back to uint8 so training then runs the handler's own `normalize`.
    """
    b = batch.shape[0]
    x = batch.float() / 255.0  # (B, 3, H, W)
    rand = lambda *s: torch.rand(*s, generator=generator).to(batch.device)  # noqa: E731 (CPU generator: same draws on any device)
    flip = rand(b) < 0.5
    x[flip] = x[flip].flip(-1)
    scale = 1.0 + (rand(b) * 2 - 1) * 0.10
    angle = (rand(b) * 2 - 1) * math.radians(6)
    tx, ty = (rand(b) * 2 - 1) * 0.08, (rand(b) * 2 - 1) * 0.08
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = 1.0 + (rand(b, 1, 1, 1) * 2 - 1) * 0.15
    contrast = 1.0 + (rand(b, 1, 1, 1) * 2 - 1) * 0.15
    saturation = 1.0 + (rand(b, 1, 1, 1) * 2 - 1) * 0.15
    x = x * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * saturation + gray
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)


# -- model -----------------------------------------------------------------------------------

def load_initial_weights(model: nn.Module, arch: str, weights: str) -> str:
    """`none`, `imagenet` (torchvision's, if they can be fetched) or a local file; the head is left new."""
    if weights == "none":
        from torchvision.models.resnet import BasicBlock, Bottleneck

        # ResNets start as near-identity maps: zero the last BN of each residual block (Goyal et al. 2017).
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
        return "none"
    if weights == "imagenet":
        if arch == "tinynet":
            raise TrainError("--weights imagenet: tinynet has no pretrained weights")
        import torchvision

        try:
            entry = torchvision.models.get_model_weights(arch).DEFAULT
        except Exception as exc:
            raise TrainError(f"--weights imagenet: torchvision has no pretrained weights for {arch!r}: {exc}") from exc
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)
        try:
            state = entry.get_state_dict(progress=False)
        except Exception as exc:
            raise TrainError(
                f"--weights imagenet: cannot fetch {entry} ({type(exc).__name__}: {exc}). This machine may have no "
                f"network: put the .pth file in the torch hub cache ({torch.hub.get_dir()}/checkpoints) or pass "
                f"--weights PATH to a local state_dict, or train from scratch with --weights none"
            ) from exc
        finally:
            socket.setdefaulttimeout(old)
        source = str(entry)
    else:
        path = Path(weights)
        if not path.is_file():
            raise TrainError(f"Invalid --weights {weights!r}: choose none, imagenet or the path of a local state_dict file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):  # one of our checkpoints
            state = state["model"]
        source = str(path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    if not usable:
        raise TrainError(f"--weights {weights}: no tensor matches {arch}'s layers")
    model.load_state_dict(usable, strict=False)
    logger.info("loaded %d tensors from %s; left new: %s", len(usable), source, skipped or "nothing")
    return source


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (they set scale, not capacity)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(progress: float, *, peak: float, warmup: float, floor: float = 0.01) -> float:
    """Linear warm-up to `peak` over the first `warmup` of progress, then cosine down to floor*peak."""
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    t = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def class_weights(labels: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor | None:
    """Loss weights against class imbalance: `sqrt` weighs class c by 1/sqrt(n_c), scaled so the
    average training image keeps weight 1 (a milder form of inverse-frequency weighting)."""
    if mode == "none":
        return None
    counts = torch.bincount(labels, minlength=num_classes).double().clamp(min=1)
    w = counts.rsqrt()
    w = w * len(labels) / (w * counts).sum()
    return w.float()


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CPU and on CUDA cards that have it (no loss scaling needed); fp16 on older cards."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast_for(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


# -- loops -----------------------------------------------------------------------------------

class Clock:
    """Progress in [0, 1] = the larger of steps done / steps planned and time used / time budget.

    The LR schedule runs on it, so a time-bound run anneals fully by its deadline.
    """

    def __init__(self, *, total_steps: int, budget_s: float | None, used_s: float = 0.0, step: int = 0):
        self.total_steps, self.budget_s = max(total_steps, 1), budget_s
        self.step, self.used_before = step, used_s
        self.started = time.monotonic()

    @property
    def used_s(self) -> float:
        return self.used_before + time.monotonic() - self.started

    @property
    def progress(self) -> float:
        p = self.step / self.total_steps
        if self.budget_s:
            p = max(p, self.used_s / self.budget_s)
        return min(p, 1.0)


class ThreadTuner:
    """Pick the torch thread count by measured step time, and re-check it now and then.

    On a shared 2-core machine two OpenMP threads stall at every barrier while another process
    holds a core (measured here: 25 s per ResNet-50 step instead of 1.3 s), and one thread is
    then many times faster; on a free machine two are. Probing the other setting costs up to
    that factor, so a probe that loses doubles the wait before the next one.
    """

    def __init__(self, candidates: list[int], *, probe_steps: int = 2, first_wait: int = 40, max_wait: int = 640):
        self.candidates = sorted(set(candidates))
        self.probe_steps, self.first_wait, self.max_wait = probe_steps, first_wait, max_wait
        self.speed: dict[int, float] = {}  # threads -> seconds per step (moving average)
        self.current = self.candidates[-1]
        self.plan: list[int] = [c for c in self.candidates[::-1] for _ in range(probe_steps)]  # try each first
        self.home: int | None = None
        self.wait = first_wait
        self.next_probe = 0
        self.steps, self.t0 = 0, None
        self.probe_times: list[float] = []
        torch.set_num_threads(self.current)

    def _set(self, n: int) -> None:
        if n != self.current:
            self.current = n
            torch.set_num_threads(n)

    def step_started(self) -> None:
        want = self.plan[0] if self.plan else self.home
        self._set(want)
        self.t0 = time.monotonic()

    def step_done(self) -> None:
        dt = time.monotonic() - self.t0
        self.steps += 1
        if self.plan:  # probing
            self.plan.pop(0)
            self.probe_times.append(dt)
            if not self.plan or self.plan[0] != self.current:
                self.speed[self.current] = min(self.probe_times)
                self.probe_times = []
            if not self.plan:
                best = min(self.speed, key=self.speed.get)
                if self.home is not None and best == self.home:
                    self.wait = min(self.wait * 2, self.max_wait)  # the probe lost: look less often
                else:
                    self.wait = self.first_wait
                self.home = best
                self.next_probe = self.steps + self.wait
            return
        old = self.speed.get(self.current, dt)
        self.speed[self.current] = 0.8 * old + 0.2 * dt
        if self.steps >= self.next_probe and len(self.candidates) > 1:
            other = next(c for c in self.candidates if c != self.home)
            self.plan = [other] * self.probe_steps


def train_one_epoch(model, optimizer, criterion, images, labels, *, clock: Clock, args, device, amp, mean, std,
                    epoch: int, generator: torch.Generator, scaler=None, tuner: ThreadTuner | None = None) -> dict:
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    total_loss, correct, seen = 0.0, 0, 0
    interactive = sys.stderr.isatty()
    bar = tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch}", leave=False,
               mininterval=1.0 if interactive else 60.0, disable=False, file=sys.stderr)
    for start in bar:
        if clock.progress >= 1.0:
            break
        idx = order[start:start + args.batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on a batch of one
            continue
        if tuner is not None:
            tuner.step_started()
        lr = lr_at(clock.progress, peak=args.lr, warmup=args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = normalize(augment(images[idx], generator=generator), mean=mean, std=std)
        x = x.to(device, memory_format=torch.channels_last)  # (B, 3, H, W)
        y = labels[idx].to(device)
        with autocast_for(device, amp):
            logits = model(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        clock.step += 1
        if tuner is not None:
            tuner.step_done()
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{lr:.2e}",
                        threads=torch.get_num_threads(), refresh=False)
    bar.close()
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1), "train_images": seen}


@torch.no_grad()  # not inference_mode: evaluate fits a temperature on these logits with autograd
def predict(model, images: torch.Tensor, *, batch_size: int, device, amp: bool, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 logits (N, C)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size], mean=mean, std=std).to(device, memory_format=torch.channels_last)
        with autocast_for(device, amp):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model, criterion, images, labels, *, batch_size, device, amp, mean, std) -> dict:
    logits = predict(model, images, batch_size=batch_size, device=device, amp=amp, mean=mean, std=std)
    preds = logits.argmax(1)
    cm = confusion(preds, labels, logits.shape[1])
    return {"val_loss": float(criterion(logits, labels)), "val_acc": float((preds == labels).float().mean()),
            "val_macro_f1": macro_f1(cm)}


# -- checkpoints -------------------------------------------------------------------------------

def checkpoint_dict(model, *, model_config, classes, image_size, mean, std, manifest_hash, data_dir, history, args,
                    epoch, best) -> dict:
    return {
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "model_config": model_config,
        "classes": classes,
        "preprocess": {"image_size": list(image_size), "mean": list(mean), "std": list(std)},
        "calibration": {"temperature": 1.0, "review_threshold": 0.5},  # training.evaluate fits the real ones
        "manifest_hash": manifest_hash,
        "data_dir": str(data_dir),
        "epoch": epoch,
        "best": best,
        "history": history,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def save_atomic(obj, path: Path) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(obj, partial)
    partial.replace(path)


def write_history(out: Path, history: list[dict]) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=1))
    if history:
        fields = list(dict.fromkeys(k for row in history for k in row))
        with open(out / "history.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(history)


# -- main --------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="raw catalogue (styles.csv + images/) or a training.prepare folder")
    parser.add_argument("--out", type=Path, required=True, help="run folder to write the checkpoints and history into")
    parser.add_argument("--arch", type=str, default="resnet50", help="torchvision classifier name, or tinynet for tests")
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
    except (TrainError, prepare_mod.CatalogueError) as exc:
        raise SystemExit(f"train: {exc}") from exc


def run(args: argparse.Namespace) -> Path:
    wall_start = time.monotonic()
    if args.arch not in available_archs():
        raise TrainError(f"Invalid --arch {args.arch!r}; choose one of: {', '.join(available_archs())}")
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads or cores)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    amp = {"on": True, "off": False, "auto": device.type == "cuda" or cpu_supports_bf16()}[args.amp]
    image_size = tuple(args.image_size)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    resume = None
    if args.resume is not None:
        path = args.resume / LAST if args.resume.is_dir() else args.resume
        if not path.is_file():
            raise TrainError(f"--resume {args.resume}: no {LAST} there")
        resume = torch.load(path, map_location="cpu", weights_only=True)

    data = resolve_data(args.data_dir, out, args).resolve()  # evaluate may run from another folder
    classes = json.loads((data / "classes.json").read_text())
    m_hash = prepare_mod.manifest_hash(data)
    if resume is not None and resume["manifest_hash"] != m_hash:
        raise TrainError(f"--resume {args.resume}: it was trained on other manifests than {data} (hash differs)")
    train_recs = prepare_mod.read_manifest(data / "train.csv")
    val_recs = prepare_mod.read_manifest(data / "val.csv")
    to_index = {c: i for i, c in enumerate(classes)}
    t0 = time.monotonic()
    train_x, val_x = load_images(train_recs, image_size, desc="decode train"), load_images(val_recs, image_size, desc="decode val")
    train_y = torch.tensor([to_index[r.label] for r in train_recs])
    val_y = torch.tensor([to_index[r.label] for r in val_recs])
    if device.type == "cuda":  # the uint8 cache fits any card: augmenting there keeps the GPU fed
        train_x, val_x = train_x.to(device), val_x.to(device)
    logger.info("data %s: %d classes, %d train, %d val; decoded to uint8 %s in %.1fs (%.0f MB); amp=%s device=%s threads=%d",
                data, len(classes), len(train_y), len(val_y), image_size, time.monotonic() - t0,
                (train_x.numel() + val_x.numel()) / 1e6, amp, device, torch.get_num_threads())

    model_config = {"arch": args.arch, "num_classes": len(classes)}
    model = build_model(**model_config)
    init = load_initial_weights(model, args.arch, args.weights) if resume is None else "resume"
    model = model.to(device, memory_format=torch.channels_last)
    # fused: one kernel for all parameters, 13 ms instead of 58 ms per ResNet-50 step on 2 cores
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, fused=True)
    weights = class_weights(train_y, len(classes), args.class_weights)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing).to(device)  # weight is a buffer
    val_criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype(device) == torch.float16 else None
    generator = torch.Generator().manual_seed(args.seed)
    tuner = ThreadTuner([1, cores]) if not args.threads and device.type == "cpu" and cores > 1 else None
    steps_per_epoch = -(-len(train_y) // args.batch_size)
    budget_s = args.time_budget * 60 if args.time_budget else None
    # Keep room after the schedule ends for the last validation pass and the saves.
    reserve_s = 20 + 3 * len(val_y) / 200
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
    schedule_s = (budget_s - reserve_s) if budget_s else None
    if schedule_s is not None and schedule_s <= used_s:
        raise TrainError(f"--time-budget {args.time_budget} min leaves no time to train after {used_s:.0f}s of preparation")
    clock = Clock(total_steps=args.epochs * steps_per_epoch, budget_s=schedule_s, used_s=used_s, step=step)
    logger.info("training %s (%s init) for at most %d epochs x %d steps%s", args.arch, init, args.epochs, steps_per_epoch,
                f", within {schedule_s / 60:.1f} min of schedule" if schedule_s else "")

    meta = dict(model_config=model_config, classes=classes, image_size=image_size, mean=mean, std=std,
                manifest_hash=m_hash, data_dir=data, args=args)
    stale = history[-1]["epoch"] - best["epoch"] if history else 0
    for epoch in range(epoch0 + 1, args.epochs + 1):
        if clock.progress >= 1.0:
            break
        t_epoch = time.monotonic()
        row = {"epoch": epoch}
        row |= train_one_epoch(model, optimizer, criterion, train_x, train_y, clock=clock, args=args, device=device,
                               amp=amp, mean=mean, std=std, epoch=epoch, generator=generator, scaler=scaler, tuner=tuner)
        train_s = time.monotonic() - t_epoch
        row["train_s"] = round(train_s, 1)
        row["images_per_s"] = round(row["train_images"] / max(train_s, 1e-9), 1)
        row |= evaluate(model, val_criterion, val_x, val_y, batch_size=256, device=device, amp=amp, mean=mean, std=std)
        row["lr"] = optimizer.param_groups[0]["lr"]
        if tuner is not None:
            row["threads"] = tuner.home or tuner.current  # home is unset until the first probes end
            row |= {f"s_per_step_{k}_threads": round(v, 3) for k, v in sorted(tuner.speed.items())}
        row["progress"] = round(clock.progress, 4)
        row["elapsed_s"] = round(clock.used_s, 1)
        history.append(row)
        improved = row["val_macro_f1"] > best["val_macro_f1"]
        if improved:
            best = {"val_macro_f1": row["val_macro_f1"], "val_acc": row["val_acc"], "epoch": epoch}
            save_atomic(checkpoint_dict(model, history=history, epoch=epoch, best=best, **meta), out / CHECKPOINT)
        stale = 0 if improved else stale + 1
        last = checkpoint_dict(model, history=history, epoch=epoch, best=best, **meta)
        last |= {"optimizer": optimizer.state_dict(), "step": clock.step, "used_s": clock.used_s,
                 "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
        save_atomic(last, out / LAST)
        write_history(out, history)
        logger.info("epoch %d: %s%s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "epoch"},
                    " *best*" if improved else "")
        if stale >= args.patience:
            logger.info("early stop: val macro-F1 has not improved for %d epochs", stale)
            break
    if not (out / CHECKPOINT).is_file():
        raise TrainError("no epoch finished within the budget: nothing to save (raise --time-budget)")
    # The best checkpoint carries the full history, so curves show the epochs after the best too.
    best_ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    best_ckpt["history"] = history
    save_atomic(best_ckpt, out / CHECKPOINT)
    write_history(out, history)
    logger.info("saved %s: epoch %d, val acc %.4f, val macro-F1 %.4f; %.1f min wall", out / CHECKPOINT, best["epoch"],
                best.get("val_acc", float("nan")), best["val_macro_f1"], (time.monotonic() - wall_start) / 60)
    return out / CHECKPOINT


if __name__ == "__main__":
    main(get_args_parser().parse_args())
