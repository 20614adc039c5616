"""Shared pieces of the benchmarks: the machine, the bench archive, services on free ports, tables, JSON.

Benchmarks drive the project only through its public entry points (training.export's CLI,
serving.torchserve.TorchServe, serving.postgres.Cluster, `python -m ingest run`), so they keep
working as those modules improve behind them.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from serving.archive import archive_name
from serving.paths import REPO_ROOT
from serving.torchserve import free_port, make_torchserve  # noqa: F401 - the benches import them from here

BENCH_ROOT = REPO_ROOT / "runs" / "bench"  # git-ignored (runs/)
# A Kaggle-layout catalogue whose images/ the serving and ingestion benches send; unset: generated images.
DATA_ENV = "RC_BENCH_DATA"


def refund_categories() -> list[str]:
    """The refund department's categories (training/categories.txt): the head size of the bench model."""
    from training import prepare

    return prepare.read_categories(prepare.DEFAULT_CATEGORIES)


def bench_data_dir() -> Path | None:
    """$RC_BENCH_DATA (`python -m bench --data-dir`, `make bench BENCH_DATA=...`), None when unset."""
    value = os.environ.get(DATA_ENV)
    if not value:
        return None
    path = Path(value)
    if not (path / "images").is_dir():
        raise SystemExit(f"bench: {DATA_ENV}={value} is not a Kaggle-layout catalogue: {path / 'images'} is not a folder "
                         f"(unset it to send generated images)")
    return path


# -- the machine ---------------------------------------------------------------------------

def machine_info() -> dict:
    flags, model, family, cpu_model = set(), platform.processor() or "unknown", "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                model = value
            elif key == "cpu family":
                family = value
            elif key == "model" and not cpu_model:
                cpu_model = value
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": model, "cpu_family": family, "cpu_model": cpu_model, "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def other_load() -> dict:
    """What else is running: the load average and any training run (ours never is: benches train in-process)."""
    found = subprocess.run(["pgrep", "-f", r"training\.train"], capture_output=True, text=True).stdout.split()
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "training_running": bool([p for p in found if int(p) != os.getpid()])}


def exit_on_sigterm() -> None:
    """SIGTERM -> SystemExit, so `finally` blocks stop the TorchServe and PostgreSQL a bench started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# -- output ----------------------------------------------------------------------------------

def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [["" if v is None else (f"{v:,.1f}" if isinstance(v, float) else str(v)) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n== {title}")
    for n, row in enumerate(cells):
        print("  ".join(v.rjust(w) if n else v.ljust(w) for v, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def run_context(*, quick: bool) -> dict:
    """What every bench result records about the run: machine, other load, date, smoke or full."""
    return {"machine": machine_info(), "load": other_load(), "date": now_iso(), "quick": quick}


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {path}", flush=True)
    return path


def read_json(path: Path | None) -> dict | None:
    if path and Path(path).is_file():
        return json.loads(Path(path).read_text())
    return None


def default_out() -> Path:
    return BENCH_ROOT / datetime.now().strftime("%Y%m%d-%H%M%S")


# -- the bench archive: the default network, randomly initialised, exported by the project's exporter
# with an int8 model built for timing (training.export --int8 timing), so that `precision: auto`
# serves what production serves: int8 on CPUs with VNNI.

def default_image_size() -> tuple[int, int]:
    """training.train's default --image-size: what a real run serves."""
    from training import train

    return tuple(train.get_args_parser().get_default("image_size"))


def default_arch() -> str:
    """The network training.train's default (--arch auto) trains on this machine: what a real run serves."""
    from handler.refund_model import cpu_supports_bf16
    from training import train

    return train.default_arch(cpu_supports_bf16())


def build_random_run(run: Path, *, arch: str, image_size: tuple[int, int], seed: int = 0) -> Path:
    """A training-run folder holding a checkpoint in training.checkpoint's format, with random weights."""
    from handler.refund_model import build_model  # the one model definition
    from handler.refund_preprocess import IMAGENET_MEAN, IMAGENET_STD
    from training.checkpoint import CHECKPOINT, save_atomic, untrained_checkpoint_dict

    classes = refund_categories()
    torch.manual_seed(seed)
    model_config = {"arch": arch, "num_classes": len(classes)}
    model = build_model(**model_config).eval()
    run.mkdir(parents=True, exist_ok=True)
    save_atomic(untrained_checkpoint_dict(model, model_config=model_config, classes=classes, image_size=image_size,
                                          mean=IMAGENET_MEAN, std=IMAGENET_STD, note="bench: random init, not trained"),
                run / CHECKPOINT)
    return run


def export_archive(run: Path, model_store: Path, version: str = "bench", *, int8: str = "timing") -> Path:
    """The project's exporter, through its CLI (its stable interface)."""
    cmd = [sys.executable, "-m", "training.export", "--run", str(run), "--version", version,
           "--model-store", str(model_store), "--force", "--int8", int8]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=private_tmp_env(model_store))
    if result.returncode != 0:
        raise SystemExit(f"bench: export failed ({result.returncode}):\n{result.stderr or result.stdout}")
    mar = Path(model_store) / archive_name(version)
    if not mar.is_file():
        raise SystemExit(f"bench: export wrote no {mar.name} in {model_store}:\n{result.stdout}")
    return mar


def private_tmp_env(near: Path) -> dict:
    """torch-model-archiver stages files in $TMPDIR/<model name>: two exports of one model name at once
    (another bench, a test run) overwrite each other there. A private TMPDIR keeps ours apart."""
    tmp = Path(near).parent / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def make_bench_archive(work: Path, *, image_size: tuple[int, int] | None = None, arch: str | None = None,
                       int8: str = "timing") -> Path:
    image_size, arch = tuple(image_size or default_image_size()), arch or default_arch()
    t0 = time.monotonic()
    run = build_random_run(work / f"run-{arch}", arch=arch, image_size=image_size)
    mar = export_archive(run, work / f"model_store-{arch}", int8=int8)
    print(f"bench archive: {mar} ({arch}, random init, int8 {int8}, {image_size[0]}x{image_size[1]}) in "
          f"{time.monotonic() - t0:.0f}s", flush=True)
    return mar


# -- sample images ------------------------------------------------------------------------------

def image_paths(n: int, work: Path) -> list[Path]:
    """n distinct JPEGs: the catalogue's in $RC_BENCH_DATA when set (and it has n), else the sample generator's."""
    data = bench_data_dir()
    if data is not None:
        images = data / "images"
        found = []
        for entry in sorted(os.scandir(images), key=lambda e: e.name):
            if entry.name.endswith(".jpg"):
                found.append(Path(entry.path))
                if len(found) >= n:
                    return found
        if len(found) >= n:
            return found
    return generate_images(n, work / f"generated-{n}")


def generate_images(n: int, out: Path) -> list[Path]:
    from training import make_sample_catalogue

    images = out / "images"
    have = sorted(images.glob("*.jpg")) if images.is_dir() else []
    if len(have) >= n:
        return have[:n]
    classes = len(getattr(make_sample_catalogue, "DRAWERS", None) or [0] * 6)
    per_class = -(-n // classes)
    make_sample_catalogue.write_catalogue(out, per_class=per_class, seed=7, first_id=100000)
    have = sorted(images.glob("*.jpg"))
    if len(have) < n:
        raise SystemExit(f"bench: the sample generator wrote {len(have)} images, {n} needed")
    return have[:n]


# -- services on free ports -----------------------------------------------------------------------

class PostgresForBench:
    """A private PostgreSQL cluster in a temp folder on a free port; databases made on demand."""

    def __init__(self):
        from serving.postgres import Cluster

        # Under /tmp: as root the server runs as `postgres`, which must reach the folder.
        self.root = Path(tempfile.mkdtemp(prefix="rc-bench-pg-"))
        self.cluster = Cluster(root=self.root, port=free_port())

    def __enter__(self) -> "PostgresForBench":
        self.cluster.start()
        self.at_rest = len(self.postmaster().children())  # checkpointer, background writer, ...
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def postmaster(self):
        import psutil

        return psutil.Process(int((self.cluster.data / "postmaster.pid").read_text().split()[0]))

    def cpu_s(self) -> float:
        """User + system CPU seconds the cluster has used so far: its postmaster and live processes, and
        the backends that have exited (a connection's backend ends with it; the postmaster reaps it).
        Read again until no backend was reaped between the two readings, which would miss it."""
        root = self.postmaster()
        for _ in range(20):
            t = root.cpu_times()
            live = tree_cpu_s(root.pid)
            if root.cpu_times()[2:4] == t[2:4]:
                return t.children_user + t.children_system + live
        raise RuntimeError("PostgreSQL's backends kept ending while its CPU time was read")

    def settle(self, timeout_s: float = 10.0) -> None:
        """Wait until the cluster runs no more processes than it did at rest (the backends of a client
        that has just exited end a moment later): before reading cpu_s after a client's run."""
        root = self.postmaster()
        deadline = time.monotonic() + timeout_s
        while len(root.children()) > self.at_rest and time.monotonic() < deadline:
            time.sleep(0.05)

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(self.cluster.url("postgres"))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')  # bench-made identifiers, never user input
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.cluster.url(name)


# -- memory -------------------------------------------------------------------------------------

class TreeRSS:
    """Samples the summed RSS of a process tree in a thread; `peak` is the highest sum seen.

    Also keeps each process's own high-water mark (VmHWM), which catches peaks between samples.
    """

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.pid, self.interval_s = pid, interval_s
        self.peak_bytes = 0
        self.peak_by_kind: dict[str, int] = {}
        self.hwm: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def kind(proc) -> str:
        name = proc.name()
        cmd = " ".join(proc.cmdline())
        if name == "java" or "org.pytorch.serve" in cmd:
            return "frontend"
        if "model_service_worker" in cmd:
            return "backend"
        return "launcher"

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total, by_kind = 0, {}
        for p in procs:
            try:
                rss = p.memory_info().rss
                kind = self.kind(p)
                hwm = _vm_hwm(p.pid)
            except (psutil.Error, OSError):
                continue
            total += rss
            by_kind[kind] = by_kind.get(kind, 0) + rss
            if hwm:
                self.hwm[p.pid] = (kind, max(hwm, self.hwm.get(p.pid, ("", 0))[1]))
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_by_kind = total, by_kind

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "TreeRSS":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def report(self) -> dict:
        hwm_by_kind: dict[str, int] = {}
        for kind, hwm in self.hwm.values():
            hwm_by_kind[kind] = hwm_by_kind.get(kind, 0) + hwm
        mib = lambda b: round(b / 2**20, 1)  # noqa: E731
        return {
            "peak_sum_rss_mib": mib(self.peak_bytes),
            "at_peak_by_kind_mib": {k: mib(v) for k, v in self.peak_by_kind.items()},
            "sum_of_process_hwm_mib": {k: mib(v) for k, v in hwm_by_kind.items()},
            "processes": len(self.hwm),
        }


def tree_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process and its live descendants (TorchServe: launcher, frontend, workers)."""
    import psutil

    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
