"""Settings of the ingestion job, from (highest first) command-line flags, environment variables,
an optional YAML file (--config / INGEST_CONFIG), and defaults.

One table (`FIELDS`) defines each setting once: its flag, its variable, its YAML key, its type,
default and help, so the three sources cannot drift apart; the `Settings` dataclass takes its
defaults from it.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from serving.archive import MODEL_NAME
from serving.client import READ_TIMEOUT_S


class SettingsError(ValueError):
    pass


def parse_duration(text: str | float | int) -> float:
    """'90', '90s', '15m', '2h', '1d', '1h30m' -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", s)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != s.replace(" ", ""):
        raise SettingsError(f"Invalid duration {text!r}; use a number of seconds or e.g. 30s, 15m, 2h, 1d, 1h30m")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * unit[u] for n, u in parts)


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    s = str(text).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"Invalid boolean {text!r}; use one of: true, false, 1, 0, yes, no")


def _path(text: str | Path) -> Path:
    return Path(text).expanduser()


def _positive_int(text: str | int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"Invalid number {text!r}") from exc
    if value < 1:
        raise SettingsError(f"Invalid value {value}; it must be at least 1")
    return value


def _log_format(text: str) -> str:
    if text not in ("human", "json"):
        raise SettingsError(f"Invalid log format {text!r}; choose one of: human, json")
    return text


@dataclass(frozen=True)
class Field:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    env: str | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


FIELDS: list[Field] = [
    Field("inbox", _path, None, "folder of photos to classify, read recursively", "INGEST_INBOX", "DIR"),
    Field("processed", _path, None, "where classified photos go, in YYYY-MM-DD/ subfolders (default: INBOX/../processed)", "INGEST_PROCESSED", "DIR"),
    Field("quarantine", _path, None, "where rejected photos go, in YYYY-MM-DD/ subfolders (default: INBOX/../quarantine)", "INGEST_QUARANTINE", "DIR"),
    Field("model", str, MODEL_NAME, "NAME or NAME/VERSION to ask TorchServe for", "INGEST_MODEL", "NAME[/VERSION]"),
    Field("batch_size", _positive_int, 64, "rows per database transaction", "INGEST_BATCH_SIZE", "N"),
    Field("photos_per_request", _positive_int, 16, "photos sent in one request (multipart; at most the handler's max_photos, 64; "
          "1: one photo per request, the form every TorchServe handler reads); a request also stays under --max-request-bytes",
          "INGEST_PHOTOS_PER_REQUEST", "N"),
    Field("max_request_bytes", _positive_int, 24 * 1024 * 1024, "bytes of photos in one request of several; keep it under "
          "TorchServe's max_request_size (27 MiB in config.properties); a single larger photo goes alone", "INGEST_MAX_REQUEST_BYTES", "BYTES"),
    Field("concurrency", _positive_int, 64, "requests in flight to TorchServe (about 4 x batchSize x workers keeps every worker's next batch waiting)", "INGEST_CONCURRENCY", "N"),
    Field("torchserve_url", str, None, "TorchServe inference address (default: inference_address of config.properties)", "TORCHSERVE_URL", "URL"),
    Field("management_url", str, None, "TorchServe management address, for renewing an expired key (default: config.properties)", "TORCHSERVE_MANAGEMENT_URL", "URL"),
    Field("key_file", _path, None, "TorchServe's key_file.json when token authorization is on (default: the local TorchServe's, if config.properties turns tokens on)", "TORCHSERVE_KEY_FILE", "FILE"),
    Field("database_url", str, None, "PostgreSQL libpq URL (default: the private cluster of `python -m serving up`)", "DATABASE_URL", "URL"),
    Field("timeout", parse_duration, READ_TIMEOUT_S, "read timeout of one request; keep it above TorchServe's responseTimeout "
          "(120s), so that TorchServe answers a slow batch (e.g. 507, worker restarted) before the job gives up and sends it again", "INGEST_TIMEOUT", "DURATION"),
    Field("response_timeout", parse_duration, 120.0, "TorchServe's responseTimeout for the model (model-config.yaml): a worker "
          "that dies on a request after about this long was killed for hanging on it (worker_timeout), sooner it crashed (worker_crash)",
          "INGEST_RESPONSE_TIMEOUT", "DURATION"),
    Field("worker_wait", parse_duration, 120.0, "after a worker died, how long to wait for TorchServe to report it up again "
          "(/ping Healthy) before stopping the run (exit 3)", "INGEST_WORKER_WAIT", "DURATION"),
    Field("connect_timeout", parse_duration, 5.0, "connect timeout of one request", "INGEST_CONNECT_TIMEOUT", "DURATION"),
    Field("retries", _positive_int, 8, "attempts per photo for an answer that is not a verdict on it (no connection, timeout, 5xx, a 4xx without the handler's code) before giving up", "INGEST_RETRIES", "N"),
    Field("backoff", parse_duration, 0.5, "first retry delay; doubles per attempt, with jitter", "INGEST_BACKOFF", "DURATION"),
    Field("backoff_max", parse_duration, 15.0, "longest retry delay", "INGEST_BACKOFF_MAX", "DURATION"),
    Field("db_retry_for", parse_duration, 60.0, "how long to keep reconnecting to PostgreSQL before stopping the run", "INGEST_DB_RETRY_FOR", "DURATION"),
    Field("min_age", parse_duration, 10.0, "skip files modified less than this long ago (still being written)", "INGEST_MIN_AGE", "DURATION"),
    Field("settle", parse_duration, 2.0, "a younger file is taken if its size and mtime stay the same this long (0: wait for --min-age)", "INGEST_SETTLE", "DURATION"),
    Field("max_bytes", _positive_int, 20 * 1024 * 1024, "files larger than this are quarantined without being sent (the handler's max_bytes in model-config.yaml)", "INGEST_MAX_BYTES", "BYTES"),
    Field("max_in_flight_bytes", _positive_int, 256 * 1024 * 1024, "bytes of photos held in memory at once, read or being sent (a single larger photo still goes, alone)", "INGEST_MAX_IN_FLIGHT_BYTES", "BYTES"),
    Field("stuck_after", parse_duration, 3600.0, "a file left in the inbox for a reason that does not pass by itself (unreadable, "
          "symlink, not a file, unsupported) and modified longer ago than this is named in the summary and makes the run exit 1",
          "INGEST_STUCK_AFTER", "DURATION"),
    Field("incomplete_grace", parse_duration, 3600.0, "a photo TorchServe calls truncated or empty stays in the inbox (skipped: incomplete) while modified less than this long ago; 0: quarantine it at once", "INGEST_INCOMPLETE_GRACE", "DURATION"),
    Field("prune_after", parse_duration, None, "retention: after each run, remove photos moved to processed/ or "
          "quarantine/ longer ago than this (rows kept; photos with an open or unexported review kept; default: keep all)",
          "INGEST_PRUNE_AFTER", "DURATION"),
    Field("limit", _positive_int, None, "stop after taking this many files (the rest waits for the next run)", "INGEST_LIMIT", "N"),
    Field("flush_every", parse_duration, 2.0, "commit at least this often even when a batch is not full", "INGEST_FLUSH_EVERY", "DURATION"),
    Field("progress", parse_bool, None, "progress bar on stderr (default: when stderr is a terminal)", "INGEST_PROGRESS", "BOOL"),
    Field("log_format", _log_format, "human", "human or json (one object per line)", "INGEST_LOG_FORMAT", "FORMAT"),
]
BY_NAME = {f.name: f for f in FIELDS}


def _default(name: str) -> Any:
    """The default FIELDS states for `name`: the Settings dataclass below states none of its own."""
    return BY_NAME[name].default


@dataclass
class Settings:
    """A run's settings. Where FIELDS' default is None for want of a fixed value, `python -m ingest`
    fills it before building Settings (torchserve_url, management_url, key_file from the local
    TorchServe's config.properties, database_url from the private PostgreSQL: see
    ingest.__main__.build_settings); built in code, give torchserve_url."""

    inbox: Path
    database_url: str
    processed: Path | None = _default("processed")
    quarantine: Path | None = _default("quarantine")
    model: str = _default("model")
    batch_size: int = _default("batch_size")
    photos_per_request: int = _default("photos_per_request")
    max_request_bytes: int = _default("max_request_bytes")
    concurrency: int = _default("concurrency")
    torchserve_url: str | None = _default("torchserve_url")
    management_url: str | None = _default("management_url")
    key_file: Path | None = _default("key_file")
    timeout: float = _default("timeout")
    response_timeout: float = _default("response_timeout")
    worker_wait: float = _default("worker_wait")
    connect_timeout: float = _default("connect_timeout")
    retries: int = _default("retries")
    backoff: float = _default("backoff")
    backoff_max: float = _default("backoff_max")
    db_retry_for: float = _default("db_retry_for")
    min_age: float = _default("min_age")
    settle: float = _default("settle")
    max_bytes: int = _default("max_bytes")
    max_in_flight_bytes: int = _default("max_in_flight_bytes")
    stuck_after: float = _default("stuck_after")
    incomplete_grace: float = _default("incomplete_grace")
    prune_after: float | None = _default("prune_after")
    limit: int | None = _default("limit")
    flush_every: float = _default("flush_every")
    progress: bool | None = _default("progress")
    log_format: str = _default("log_format")
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.inbox = Path(self.inbox).resolve()
        self.processed = Path(self.processed).resolve() if self.processed else self.inbox.parent / "processed"
        self.quarantine = Path(self.quarantine).resolve() if self.quarantine else self.inbox.parent / "quarantine"
        if self.processed == self.quarantine:
            raise SettingsError(f"--processed and --quarantine are the same folder ({self.processed}); give them different folders")
        for name in ("processed", "quarantine"):
            if getattr(self, name) == self.inbox:
                raise SettingsError(f"--{name} is the inbox itself ({self.inbox}); give it another folder")

    @property
    def model_name(self) -> str:
        return self.model.partition("/")[0]

    @property
    def model_version(self) -> str | None:
        return self.model.partition("/")[2] or None

    def public(self) -> dict:
        """What a run records about its settings: no URLs (they may hold passwords)."""
        keep = ("inbox", "processed", "quarantine", "model", "batch_size", "photos_per_request", "concurrency", "timeout",
                "retries", "min_age", "limit")
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in ((k, getattr(self, k)) for k in keep)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag; defaults are None so that unset flags fall through to env/YAML."""
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="YAML settings file (keys as the flags, with _ or -); default: INGEST_CONFIG")
    for f in FIELDS:
        env = f" [env {f.env}]" if f.env else ""
        default = f"; default {f.default}" if f.default is not None and "default" not in f.help else ""
        if f.parse is parse_bool:
            parser.add_argument(f.flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"{f.help}{default}{env}")
        else:
            parser.add_argument(f.flag, dest=f.name, type=str, default=None, metavar=f.metavar, help=f"{f.help}{default}{env}")


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as exc:
        raise SettingsError(f"settings file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise SettingsError(f"settings file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {path} must hold a mapping of setting: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in BY_NAME:
            raise SettingsError(f"Invalid setting {key!r} in {path}; choose from: {', '.join(sorted(BY_NAME))}")
        out[name] = value
    return out


def resolve(args: argparse.Namespace, environ: dict | None = None) -> dict:
    """{name: parsed value} from flags > environment > YAML > defaults."""
    environ = os.environ if environ is None else environ
    config = args.config or (Path(environ["INGEST_CONFIG"]) if environ.get("INGEST_CONFIG") else None)
    from_yaml = load_yaml(config) if config else {}
    values = {}
    for f in FIELDS:
        raw, source = getattr(args, f.name, None), f.flag
        if raw is None and f.env and environ.get(f.env) not in (None, ""):
            raw, source = environ[f.env], f.env
        if raw is None and f.name in from_yaml:
            raw, source = from_yaml[f.name], f"{config}: {f.name}"
        if raw is None:
            values[f.name] = f.default
            continue
        try:
            values[f.name] = f.parse(raw)
        except SettingsError as exc:
            raise SettingsError(f"{source}: {exc}") from exc
    return values


def settings_fields() -> set[str]:
    return {f.name for f in fields(Settings)}
