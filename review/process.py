"""The review server in the background (`python -m review up | down`), like `python -m serving up`
keeps TorchServe: a pid file and a log in the state folder (RC_STATE_DIR, default .run/review/).
No Flask here: `python -m serving down` stops the review server through this module too."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from serving.paths import REPO_ROOT, state_dir
from serving.torchserve import process_alive, terminate_group


def review_state() -> Path:
    return state_dir() / "review"


def pid_file() -> Path:
    return review_state() / "review.pid"


def log_file() -> Path:
    return review_state() / "review.log"


def running_pid() -> int | None:
    """The pid of the background review server, or None (a stale pid file is removed)."""
    try:
        pid = int(pid_file().read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if process_alive(pid):
        return pid
    pid_file().unlink(missing_ok=True)
    return None


def address() -> str | None:
    try:
        return pid_file().read_text().split()[1]
    except (OSError, IndexError):
        return None


def start(host: str, port: int, extra_args: list[str], *, wait_s: float = 30.0) -> str:
    """Start `python -m review serve` detached (its own session), wait until it answers; its address."""
    if running_pid() is not None:
        return address() or f"http://{host}:{port}/"
    review_state().mkdir(parents=True, exist_ok=True)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    log = open(log_file(), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "review", "serve", "--host", host, "--port", str(port), *extra_args],
                            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    log.close()
    pid_file().write_text(f"{proc.pid} {url}\n")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_file().unlink(missing_ok=True)
            raise RuntimeError(f"the review server exited with code {proc.returncode}; see {log_file()}")
        try:
            if requests.get(url + "login", timeout=2).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.3)
    stop()
    raise RuntimeError(f"the review server did not answer at {url} within {wait_s:.0f} s; see {log_file()}")


def stop(wait_s: float = 10.0) -> bool:
    """Stop the background review server; False when none was running."""
    pid = running_pid()
    if pid is None:
        return False
    terminate_group(pid, wait_s, poll_s=0.1)
    pid_file().unlink(missing_ok=True)
    return True
