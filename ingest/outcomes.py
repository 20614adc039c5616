"""What a run deals in and ends with: a photo taken from the inbox (`Item`), what becomes of it
(`Outcome`), the run's `Summary`, the errors that stop a run, and the exit status of
`python -m ingest run`, decided here and nowhere else (`EXIT_CODES`, `exit_code_for`, `conclude`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from ingest import files
from ingest.schedule import CronError
from ingest.settings import SettingsError
from ingest.store import DatabaseDown, LockBusy, LockLost

# -- errors ----------------------------------------------------------------------------------


class IngestError(RuntimeError):
    """Stops the run: no new file is taken; what has an answer is still recorded and moved."""


class TorchServeDown(IngestError):
    """TorchServe stayed unavailable through every retry."""


class TorchServeRefused(IngestError):
    """Not about one photo: the model is missing, or the token is refused. Stops the run."""


class RunFailed(IngestError):
    """An unexpected error that is not about one photo: the run ends `failed` with it recorded
    (exit 1; what is left waits for the next run), never with a run row left 'running'."""


class FileFailed(Exception):
    """TorchServe could not classify this one photo (after retries); it stays in the inbox."""


# -- exit codes ------------------------------------------------------------------------------

EXIT_DONE = 0
EXIT_LEFT = 1
EXIT_SETTINGS = 2
EXIT_TORCHSERVE = 3
EXIT_DATABASE = 4
EXIT_LOCKED = 75  # EX_TEMPFAIL: try again later

EXIT_CODES = {
    EXIT_DONE: "done (rejected photos were quarantined: that is not an error)",
    EXIT_LEFT: ("some photos could not be classified, recorded or moved and stay for the next run (a stopped run too, where "
                "moves were left unfinished); files left in the inbox for a lasting reason (unreadable, symlink, not a file, "
                "unsupported) for longer than --stuck-after; or the run failed unexpectedly"),
    EXIT_SETTINGS: "bad settings",
    EXIT_TORCHSERVE: "TorchServe unavailable or refusing",
    EXIT_DATABASE: "PostgreSQL unavailable",
    EXIT_LOCKED: "another run holds the ingest lock (nothing was done; under Kubernetes the Job ends Failed)",
}

# The error that ended a run -> its exit status; the first matching row wins.
_EXIT_FOR_ERROR: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    (LockBusy, EXIT_LOCKED),
    ((DatabaseDown, LockLost), EXIT_DATABASE),
    ((TorchServeDown, TorchServeRefused), EXIT_TORCHSERVE),
    ((SettingsError, CronError), EXIT_SETTINGS),
    (IngestError, EXIT_LEFT),
)


def exit_code_for(error: BaseException) -> int:
    for types, code in _EXIT_FOR_ERROR:
        if isinstance(error, types):
            return code
    raise TypeError(f"no exit code for {type(error).__name__}: {error}")


def exit_codes_help() -> str:
    return "Exit codes of `run`:\n" + "\n".join(f"  {code:<3} {what}" for code, what in EXIT_CODES.items())


# -- results ---------------------------------------------------------------------------------

@dataclass
class Item:
    """A settled photo read from the inbox; data is dropped (None) once it is not needed any more."""

    entry: files.Entry
    data: bytes | None
    sha256: str
    size: int
    received_at: datetime


class KnownRow(NamedTuple):
    """The row that already records a content for the model (Journal.known)."""

    prediction_id: int
    status: str  # ok | rejected
    error_code: str | None
    error: str | None


@dataclass
class Outcome:
    """What becomes of one file: a new row (`body`), or a reference to an existing one (`known`/`leader`)."""

    item: Item
    body: dict | None = None  # the answer to record (200 or a rejection)
    ok: bool = False
    known: KnownRow | None = None  # the row that already existed before this run asked
    leader: "Outcome | None" = None  # same content earlier in this run
    prediction_id: int | None = None
    status: str | None = None  # ok | rejected, once known
    duplicate: bool = False


class Skipped(Counter):
    """Files left in the inbox, counted by reason; `lasting`: (relative path, reason, mtime) of those
    left for a reason that does not pass by itself (ingest.inbox.LASTING), so that the run can name
    the ones that waited too long."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lasting: list[tuple[str, str, float | None]] = []


@dataclass
class Summary:
    run_id: int | None = None
    status: str = "running"
    taken: int = 0
    processed: int = 0
    duplicates: int = 0
    quarantined: int = 0
    failed: int = 0
    retried: int = 0
    recovered: int = 0
    move_failed: int = 0
    recovery_failed: int = 0  # an earlier run's moves that could not be finished now: left pending
    worker_died: int = 0  # requests TorchServe answered "Worker died." (ingest.predict isolates their photos)
    pruned: int = 0  # photos --prune-after removed after the run
    skipped: Counter = field(default_factory=Skipped)
    # Files left for a lasting reason, modified longer than --stuck-after ago: (relative path, reason, age s)
    waited_too_long: list = field(default_factory=list)
    elapsed_s: float = 0.0
    error: str | None = None
    exit_code: int = 0

    @property
    def images_per_s(self) -> float:
        done = self.processed + self.duplicates + self.quarantined
        return done / self.elapsed_s if self.elapsed_s else 0.0

    def counts(self) -> dict:
        return {"taken": self.taken, "processed": self.processed, "duplicates": self.duplicates,
                "quarantined": self.quarantined, "failed": self.failed, "retried": self.retried,
                "recovered": self.recovered, "move_failed": self.move_failed,
                "recovery_failed": self.recovery_failed, "worker_died": self.worker_died, "pruned": self.pruned,
                "skipped": dict(self.skipped),
                "waited_too_long": len(self.waited_too_long),
                "waited_too_long_names": [f"{rel} ({reason})" for rel, reason, _ in self.waited_too_long[:20]],
                "elapsed_s": round(self.elapsed_s, 3), "images_per_s": round(self.images_per_s, 2)}

    def line(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "0"
        return (f"run {self.run_id} {self.status}: {self.processed} processed, {self.duplicates} duplicates, "
                f"{self.quarantined} quarantined, {self.failed} failed (left in the inbox), {self.retried} retried, "
                f"{self.recovered} recovered from an earlier run"
                f"{f' ({self.recovery_failed} left pending)' if self.recovery_failed else ''}"
                f"{f'; the worker died on {self.worker_died} requests' if self.worker_died else ''}; skipped: {skipped}"
                f"{self._waited_line()}; "
                f"{self.elapsed_s:.1f}s, {self.images_per_s:.1f} images/s")

    def _waited_line(self) -> str:
        if not self.waited_too_long:
            return ""
        names = ", ".join(f"{rel} ({reason})" for rel, reason, _ in self.waited_too_long[:5])
        more = f" and {len(self.waited_too_long) - 5} more" if len(self.waited_too_long) > 5 else ""
        return f"; {len(self.waited_too_long)} left longer than --stuck-after, for a person to act on: {names}{more}"

    def conclude(self, fatal: BaseException | None, *, stopped: bool) -> None:
        """Status and exit code of a run that has ended (before its end is recorded). A graceful stop
        (SIGTERM) exits 0 (what was not taken waits for the next run, as it would on any schedule),
        unless moves it owed were left unfinished: a recorded photo whose move failed, or an earlier
        run's move it could not finish. A finished run exits 1 for those, for photos left without an
        answer, and for files left for a lasting reason for longer than --stuck-after."""
        if fatal is not None:
            self.status, self.error, self.exit_code = "failed", str(fatal), exit_code_for(fatal)
        elif stopped:
            self.status = "stopped"
            self.exit_code = EXIT_LEFT if (self.move_failed or self.recovery_failed) else EXIT_DONE
        else:
            self.status = "succeeded"
            left = self.failed or self.move_failed or self.recovery_failed or self.waited_too_long
            self.exit_code = EXIT_LEFT if left else EXIT_DONE
