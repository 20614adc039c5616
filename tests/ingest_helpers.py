"""Helpers of the ingestion tests (test_ingest.py, test_ingest_faults.py): filling an inbox, running
the CLI, and the exactly-once invariant (`assert_exactly_once`): every file that was in the inbox
ends in processed/ with exactly one row, in quarantine/ with one error row, or still in the inbox --
never lost, never twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from ingest import db
from serving.paths import REPO_ROOT

MODEL = "refund_classifier"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fill_inbox(inbox: Path, unseen_images: Path, n: int | None = None) -> dict[str, str]:
    """Copy unseen photos into inbox/batch-a (n of them, sorted); returns {relative path: sha256}."""
    (inbox / "batch-a").mkdir(parents=True, exist_ok=True)
    for src in sorted((unseen_images / "images").glob("*.jpg"))[:n]:
        shutil.copy(src, inbox / "batch-a" / src.name)
    return snapshot(inbox)


def snapshot(inbox: Path) -> dict[str, str]:
    """{relative path: sha256} of the regular files under inbox (not following links)."""
    out = {}
    for root, _dirs, names in os.walk(inbox):
        for name in names:
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                out[p.relative_to(inbox).as_posix()] = sha(p.read_bytes())
    return out


def fetch(url: str, sql: str, params: dict | None = None) -> list[tuple]:
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql, params or {})
        return cur.fetchall()


def dated_files(root: Path) -> dict[str, Path]:
    """{relative path below the YYYY-MM-DD folder: path} of everything under processed/ or quarantine/."""
    out = {}
    if root.exists():
        for day in sorted(root.iterdir()):
            assert len(day.name) == 10 and day.name[4] == "-", f"not a dated folder: {day}"
            for p in day.rglob("*"):
                if p.is_file():
                    rel = p.relative_to(day).as_posix()
                    assert rel not in out, f"{rel} is in two dated folders"
                    out[rel] = p
    return out


def assert_exactly_once(url: str, inbox: Path, originals: dict[str, str], *, final: bool = True) -> dict[str, set]:
    """Every original file is in exactly one place, with exactly one row where it was moved.
    final=False (after a crash): files may still be pending in the inbox, but nothing is lost or doubled,
    and nothing sits in processed/ or quarantine/ without its committed row."""
    processed = dated_files(inbox.parent / "processed")
    quarantine = dated_files(inbox.parent / "quarantine")
    left = snapshot(inbox)
    where: dict[str, set] = {"inbox": set(), "processed": set(), "quarantine": set()}
    for rel, digest in originals.items():
        places = [name for name, found in (("inbox", rel in left), ("processed", rel in processed), ("quarantine", rel in quarantine)) if found]
        assert len(places) == 1, f"{rel} is in {places or 'no place'}: lost or copied"
        where[places[0]].add(rel)
        if places[0] != "inbox":
            path = (processed if places[0] == "processed" else quarantine)[rel]
            assert sha(path.read_bytes()) == digest, f"{rel} changed on its way"
    assert set(processed) <= set(originals) and set(quarantine) <= set(originals), "a file appeared from nowhere"

    rows = fetch(url, "SELECT sha256, model_version, status, id FROM predictions WHERE model_name = %(m)s", {"m": MODEL})
    per_sha = Counter(r[0] for r in rows)
    status = {r[0]: r[2] for r in rows}
    for kind in ("processed", "quarantine"):
        for rel in where[kind]:
            digest = originals[rel]
            assert per_sha[digest] == 1, f"{rel}: {per_sha[digest]} rows for its content"
            assert status[digest] == ("ok" if kind == "processed" else "rejected"), f"{rel} in {kind} with a {status[digest]} row"
    moved = [(os.fsdecode(bytes(raw)) if raw is not None else text, state) for text, state, raw in fetch(
        url, "SELECT dest_path, state, dest_path_bytes FROM ingest_files WHERE state IN ('moved', 'pending') AND dest_path LIKE %(root)s",
        {"root": f"{inbox.parent}/%"})]  # dest_path_bytes: the exact name when it is not UTF-8
    pending = [r[0] for r in moved if r[1] == "pending"]
    if final:
        assert not pending, f"moves still pending after a clean run: {pending}"
        on_disk = {str(p) for p in list(processed.values()) + list(quarantine.values())}
        journal = [r[0] for r in moved]
        assert sorted(journal) == sorted(on_disk), "ingest_files and the moved files disagree"
    return where


def ingest_env(torchserve_url: str, database_url: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INGEST_", "TORCHSERVE_"))}
    env.update({"TORCHSERVE_URL": torchserve_url, "DATABASE_URL": database_url, "PYTHONPATH": str(REPO_ROOT),
                "PYTHONUNBUFFERED": "1", **extra})
    return env


# --incomplete-grace 0: a truncated photo written by the test is quarantined at once, not waited for.
FAST = ["--min-age", "0", "--settle", "0", "--incomplete-grace", "0", "--batch-size", "3", "--concurrency", "4",
        "--log-format", "json", "--no-progress"]


def cli(inbox: Path, env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ingest", "run", "--inbox", str(inbox), *FAST, *args],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def start_cli(inbox: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ingest", "run", "--inbox", str(inbox), *FAST, *args],
                            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextmanager
def ended(proc: subprocess.Popen):
    """The job started by start_cli, killed (and reaped) if the block leaves it running."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def handler_archive(name: str, handler_source: str, model_config: str, work: Path, store: Path) -> Path:
    """STORE/NAME.mar of a test handler (handler_source, the module's text) with model_config (a
    model-config.yaml's text), built with torch-model-archiver as bench.ingestion does."""
    staging = work / f"{name}-staging"
    staging.mkdir(parents=True)
    module = staging / f"{name}_handler.py"
    module.write_text(handler_source)
    (staging / "model-config.yaml").write_text(model_config)
    tmp = work / "archiver-tmp"  # the archiver stages in $TMPDIR/<name>: private, like bench.common.private_tmp_env
    tmp.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", "1",
           "--handler", str(module), "--config-file", str(staging / "model-config.yaml"),
           "--export-path", str(store), "--archive-format", "default", "--force"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    assert result.returncode == 0, result.stderr or result.stdout
    return store / f"{name}.mar"


def summary_of(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {path.name}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)
