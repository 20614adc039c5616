"""The pieces of a training run, one job each: the uint8 image cache and augmentation, initial
weights, the optimizer's parameter groups and LR schedule, device and autocast, the thread tuner,
the weight EMA, the out-of-category share of an epoch, and the train / predict / evaluate loops. `training.train` is the script that puts them together;
`training.evaluate` and the benchmarks reuse `load_images` and `predict`.
"""
from __future__ import annotations

import copy
import logging
import math
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

from handler.refund_preprocess import load_for_model, normalize
from training.metrics import confusion, macro_f1

logger = logging.getLogger("training.train")  # the run's one log: these lines belong to training.train's output


class TrainError(RuntimeError):
    pass


# -- data ----------------------------------------------------------------------------------

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


class WeightEMA:
    """An exponential moving average of a model's weights and buffers, updated after every step.

    Buffers are averaged too (BatchNorm's running statistics), as AveragedModel(use_buffers=True)
    does, so the average is usable as it is, without a pass to recompute BN statistics; integer
    buffers (num_batches_tracked) are copied. The decay ramps up as min(decay, (1+n)/(10+n)) over
    the first updates (TensorFlow's ExponentialMovingAverage with num_updates), so early weights
    do not linger. One fused lerp over all tensors: a few ms per ResNet-50 step.
    """

    def __init__(self, model: nn.Module, decay: float, *, updates: int = 0):
        if not 0.0 < decay < 1.0:
            raise TrainError(f"Invalid --ema-decay {decay}: use a number in (0, 1), e.g. 0.998, or 0 for no EMA")
        self.decay, self.updates = decay, updates
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        # state_dict() tensors share storage with the modules: in-place updates reach them.
        own, src = self.module.state_dict(), model.state_dict()
        self._floats = [(own[k], src[k]) for k in own if own[k].is_floating_point()]
        self._others = [(own[k], src[k]) for k in own if not own[k].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_([a for a, _ in self._floats], [b for _, b in self._floats], 1.0 - decay)
        for a, b in self._others:
            a.copy_(b)


def epoch_subset(n_in: int, n_out: int, cap: int, generator: torch.Generator) -> torch.Tensor | None:
    """Indices into [in-category images, out-of-category images] for one epoch: all of the first
    n_in and a fresh random `cap` of the n_out after them (cap 0: all). None when there are none."""
    if n_out == 0:
        return None
    pick = torch.randperm(n_out, generator=generator)[:cap] if 0 < cap < n_out else torch.arange(n_out)
    return torch.cat([torch.arange(n_in), n_in + pick.sort().values])


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
                    epoch: int, generator: torch.Generator, scaler=None, tuner: ThreadTuner | None = None,
                    subset: torch.Tensor | None = None, ema: WeightEMA | None = None) -> dict:
    """One pass over `images` (or over `subset`, indices into them), in a random order."""
    model.train()
    order = torch.randperm(len(labels), generator=generator) if subset is None else \
        subset[torch.randperm(len(subset), generator=generator)]
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
        if ema is not None:
            ema.update()
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


def evaluate(model, criterion, images, labels, *, batch_size, device, amp, mean, std,
             outside: torch.Tensor | None = None, other: int | None = None) -> dict:
    """Loss, top-1 and macro-F1 over the in-category images (`labels` never holds `other`, so its
    row is empty and macro-F1 is over the refund categories; an `other` answer is wrong). With the
    `other` class: the share of in-category images answered other, and of the out-of-category
    images `outside` answered other (argmax, before calibration and threshold)."""
    logits = predict(model, images, batch_size=batch_size, device=device, amp=amp, mean=mean, std=std)
    preds = logits.argmax(1)
    cm = confusion(preds, labels, logits.shape[1])
    row = {"val_loss": float(criterion(logits, labels)), "val_acc": float((preds == labels).float().mean()),
           "val_macro_f1": macro_f1(cm)}
    if other is not None:
        row["val_in_category_answered_other"] = float((preds == other).float().mean())
        if outside is not None and len(outside):
            out_preds = predict(model, outside, batch_size=batch_size, device=device, amp=amp, mean=mean, std=std).argmax(1)
            row["val_outside_answered_other"] = float((out_preds == other).float().mean())
    return row
