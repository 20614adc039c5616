"""Model versions of refund_classifier: serve, roll out, roll back, list and retire them.

Every change goes through TorchServe's management API (via serving.client, so token
authorization may be on or off). A rollout never takes the model down: the new version is
registered beside the serving one, tested through its versioned endpoint, and only then made
the default with `set-default`, which TorchServe applies atomically to the next request;
the previous default stays registered, so requests already routed to it finish and a
rollback is one `set-default` back.

TorchServe forgets all of this when it restarts (we start it with --ncs: no config snapshots,
so a restart loads exactly what it is told). What it must be told lives in a state file beside
the archives, `<model_store>/refund_classifier.versions.json`:

    {"model": "refund_classifier", "default": "2", "history": ["1", "2"],
     "versions": {"1": {"archive": "refund_classifier-1.mar", "registered_at": "...", "promoted_at": "..."}, ...}}

`history` lists the defaults in the order they were promoted (each once; the last is the
default); `rollback` steps back along it. `python -m serving up` reads the file, starts
TorchServe with the recorded default and registers the other recorded versions again.

A switch is two steps, `set-default` in TorchServe and the state file on disk, and a crash can
fall between them. So the switch is recorded as an intent first (`"switching": {"to": V,
"from": W, "action": "rollout"|"rollback"}`), then made in TorchServe, then recorded as done.
Whoever next takes the state file (`serving up`, a rollout, a rollback) finishes an intent it
finds: the switch was decided (a candidate that passed its test, a rollback asked for), so it is
completed, never silently undone by a restart that serves the old default.
See docs/ROLLOUTS.md.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import requests

from serving import archive as archive_mod
from serving.archive import OTHER_LABEL, Archive, ArchiveError, archive_name, archive_sample
from serving.client import Refused, Transient
from serving.torchserve import MODEL_NAME, TorchServe, TorchServeError, archives, latest_archive, version_key

STATE_SUFFIX = ".versions.json"
DEFAULT_TOLERANCE = 0.02
DEFAULT_LIMIT = 500
REGISTER_TIMEOUT_S = 600.0


class RolloutError(RuntimeError):
    pass


class StoreNotWritable(RolloutError):
    pass


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _test_hook(point: str) -> None:
    """SERVING_TEST_HOOK=crash@POINT: SIGKILL ourselves there (only tests set it)."""
    if os.environ.get("SERVING_TEST_HOOK") == f"crash@{point}":
        os.kill(os.getpid(), signal.SIGKILL)


# -- archives --------------------------------------------------------------------------------

def read_archive(path: Path) -> Archive:
    """serving.archive.read_archive, its errors as RolloutError (what `python -m serving` reports)."""
    try:
        return archive_mod.read_archive(path)
    except ArchiveError as exc:
        raise RolloutError(str(exc)) from exc


def resolve_archive(ts: TorchServe, spec: str | Path) -> Archive:
    """An archive given as a path or a bare file name; it must sit in the model store, since
    TorchServe registers archives by their file name there (nothing else passes allowed_urls)."""
    spec = Path(spec)
    path = spec if spec.is_absolute() or spec.parent != Path(".") else ts.model_store / spec
    path = path.resolve()
    if path.parent != ts.model_store:
        raise RolloutError(f"{spec} is not in the model store {ts.model_store}: copy it there first "
                           f"(TorchServe registers archives by file name from its model store)")
    archive = read_archive(path)
    if archive.model != MODEL_NAME:
        raise RolloutError(f"{path.name} holds model {archive.model!r}, not {MODEL_NAME!r}")
    expected = archive_name(archive.version)
    if path.name != expected:
        raise RolloutError(f"{path.name} says it is version {archive.version!r} (MAR-INF/MANIFEST.json); "
                           f"the store names each archive after its version: expected {expected}")
    return archive


# -- the labelled sample ---------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    name: str
    label: str
    data: bytes


def read_labels(csv_path: Path) -> dict[str, str]:
    """{id: articleType} from a Kaggle styles.csv. Its last column may hold unquoted commas, so a
    row splits on the first len(header)-1 commas only. Serving reads just these two columns
    and keeps its own ten lines for them rather than depend on training's catalogue code."""
    labels = {}
    with open(csv_path, encoding="utf-8", errors="replace", newline="") as f:
        header = [h.strip() for h in f.readline().rstrip("\r\n").split(",")]
        if "id" not in header or "articleType" not in header:
            raise RolloutError(f"{csv_path}: needs the columns id and articleType; the header is {header}")
        i, j = header.index("id"), header.index("articleType")
        for line in f:
            cells = [c.strip() for c in line.rstrip("\r\n").split(",", len(header) - 1)]
            if len(cells) > max(i, j) and cells[i].isdigit() and cells[j] not in ("", "NA"):
                labels[cells[i]] = cells[j]
    return labels


def read_sample(folder: Path, *, limit: int | None = DEFAULT_LIMIT) -> list[Example]:
    """A Kaggle-layout folder (styles.csv + images/<id>.jpg) -> labelled examples, sorted by id,
    thinned evenly to `limit` so that a large test split still gives a quick smoke test."""
    folder = Path(folder)
    if not (folder / "styles.csv").is_file():
        raise RolloutError(f"the sample {folder} is not a Kaggle-layout folder: {folder / 'styles.csv'} does not exist")
    labels = read_labels(folder / "styles.csv")
    ids = sorted((i for i in labels if (folder / "images" / f"{i}.jpg").is_file()), key=int)
    if not ids:
        raise RolloutError(f"the sample {folder} holds no labelled image (styles.csv rows with images/<id>.jpg)")
    if limit and len(ids) > limit:
        ids = [ids[k * len(ids) // limit] for k in range(limit)]
    return [Example(f"{i}.jpg", labels[i], (folder / "images" / f"{i}.jpg").read_bytes()) for i in ids]


# -- the state file --------------------------------------------------------------------------

@dataclass
class State:
    path: Path
    default: str | None = None
    history: list[str] = field(default_factory=list)
    versions: dict[str, dict] = field(default_factory=dict)
    switching: dict | None = None  # an intent: {"action", "to", "from", "at"} until the switch is recorded

    @classmethod
    def load(cls, model_store: Path, model: str = MODEL_NAME) -> "State":
        path = Path(model_store) / f"{model}{STATE_SUFFIX}"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        except ValueError as exc:
            raise RolloutError(f"the state file {path} is not valid JSON ({exc}); fix or remove it") from exc
        return cls(path, raw.get("default"), list(raw.get("history", [])), dict(raw.get("versions", {})),
                   raw.get("switching"))

    def save(self) -> None:
        body = {"model": MODEL_NAME, "default": self.default, "history": self.history, "versions": self.versions}
        if self.switching:
            body["switching"] = self.switching
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            partial.write_text(json.dumps(body, indent=1) + "\n")
            partial.replace(self.path)  # atomic: a reader sees the old file or the new one
        except OSError as exc:
            raise StoreNotWritable(f"cannot write the state file {self.path} ({exc}): rollouts record the "
                                   f"default there, so the model store must be writable") from exc

    def record(self, archive: Archive, registered_at: str | None = None) -> None:
        """Note that `archive` is registered; `registered_at` replaces an earlier registration's time."""
        info = self.versions.setdefault(archive.version, {"registered_at": registered_at or now()})
        info["archive"] = archive.name
        if registered_at:
            info["registered_at"] = registered_at

    def promote(self, version: str) -> None:
        if version in self.history:
            self.history.remove(version)
        self.history.append(version)
        self.default = version
        self.versions.setdefault(version, {"archive": f"{MODEL_NAME}-{version}.mar", "registered_at": now()})
        self.versions[version]["promoted_at"] = now()


@contextmanager
def locked(ts: TorchServe) -> Iterator[State]:
    """The state file, under an exclusive lock: two rollouts never interleave."""
    lock_path = ts.model_store / f"{MODEL_NAME}{STATE_SUFFIX}.lock"
    try:
        ts.model_store.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "a")
    except OSError as exc:
        raise StoreNotWritable(f"cannot write beside the archives in {ts.model_store} ({exc}): rollouts record "
                               f"the default in {MODEL_NAME}{STATE_SUFFIX} there, so the model store must be writable") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield State.load(ts.model_store)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- the management API ----------------------------------------------------------------------

def _check(r: requests.Response, what: str) -> requests.Response:
    if r.status_code >= 300:
        try:
            detail = r.json().get("message", r.text)
        except ValueError:
            detail = r.text
        raise RolloutError(f"{what}: TorchServe answered {r.status_code}: {detail.strip()[:500]}")
    return r


def registered(ts: TorchServe) -> dict[str, dict]:
    """{version: TorchServe's description} of every registered version, oldest version first."""
    r = ts.client.management("GET", f"models/{MODEL_NAME}/all", timeout=30)
    if r.status_code == 404:
        return {}
    found = {str(d["modelVersion"]): d for d in _check(r, "listing versions").json()}
    return dict(sorted(found.items(), key=lambda kv: version_key(kv[0])))


def current_default(ts: TorchServe) -> str | None:
    """The version `/predictions/refund_classifier` goes to now (GET /models/NAME describes the default)."""
    r = ts.client.management("GET", f"models/{MODEL_NAME}", timeout=30)
    if r.status_code == 404:
        return None
    return str(_check(r, "describing the default version").json()[0]["modelVersion"])


def register(ts: TorchServe, archive: Archive, *, workers: int | None = None, wait_s: float = REGISTER_TIMEOUT_S) -> None:
    """Register `archive` synchronously, with its workers and batching, and wait for a READY worker."""
    cfg = archive.config
    params = {
        "url": archive.name,  # a file name in the model store
        "model_name": MODEL_NAME,
        "initial_workers": workers or cfg.get("minWorkers", 1),
        "batch_size": cfg.get("batchSize", 1),
        "max_batch_delay": cfg.get("maxBatchDelay", 100),
        "response_timeout": cfg.get("responseTimeout", 120),
        "synchronous": "true",
    }
    r = ts.client.management("POST", "models", params=params, timeout=wait_s)
    _check(r, f"registering {archive.name}")
    ts.wait_ready(MODEL_NAME, archive.version, wait_s=wait_s)


def unregister(ts: TorchServe, version: str) -> None:
    r = ts.client.management("DELETE", f"models/{MODEL_NAME}/{version}", timeout=120)
    if r.status_code != 404:
        _check(r, f"unregistering version {version}")


def _unregister_quietly(ts: TorchServe, version: str) -> None:
    try:
        unregister(ts, version)
    except (RolloutError, requests.RequestException):
        pass  # the error being raised already says what went wrong


def set_default(ts: TorchServe, version: str) -> None:
    _check(ts.client.management("PUT", f"models/{MODEL_NAME}/{version}/set-default", timeout=30),
           f"making version {version} the default")


def switch(ts: TorchServe, state: State, action: str, version: str, previous: str | None) -> None:
    """Make `version` the default: intent on disk, then TorchServe; the caller records it as done
    (state.promote or the like, then save, which clears the intent)."""
    state.switching = {"action": action, "to": version, "from": previous, "at": now()}
    state.save()
    try:
        set_default(ts, version)
    except BaseException:  # refused: nothing switched, nothing to finish later
        state.switching = None
        state.save()
        raise
    _test_hook(f"after_set_default_{action}")
    state.switching = None


def finish_interrupted_switch(ts: TorchServe | None, state: State, log=print, *, save: bool = True) -> None:
    """Complete a switch whose intent is on disk (a crash fell between set-default and the state file).
    With `ts` up, TorchServe is made to serve it too; without, only the state file is brought up to date."""
    intent = state.switching
    if not intent:
        return
    target = str(intent["to"])
    log(f"serving: finishing an interrupted {intent.get('action', 'switch')} of {MODEL_NAME} to version {target} "
        f"(from {intent.get('from')}, started {intent.get('at')})")
    if ts is not None:
        live = registered(ts)
        if target not in live:
            register(ts, resolve_archive(ts, state.versions.get(target, {}).get("archive", f"{MODEL_NAME}-{target}.mar")))
        if current_default(ts) != target:
            set_default(ts, target)
    if intent.get("action") == "rollback":
        state.history = [v for v in state.history if v != intent.get("from")]
    state.promote(target)  # records the version too, if the state file did not know it
    state.switching = None
    if save:
        state.save()


# -- smoke test ------------------------------------------------------------------------------

@dataclass
class Score:
    """Two figures. Top-1 over the sample's in-category images, so that versions with and without
    the `other` output compare like with like on the refund categories. And, where the sample has
    images labelled `other` (out-of-category products, or photos a reviewer decided are "not a
    refund category"), top-1 over all its images, an `other` image counted right when the version
    answers `other` (in_category false): on reviewed traffic, a version that cannot say "not a
    refund category" is wrong on those."""

    version: str
    n: int = 0
    correct: int = 0  # in-category images answered their label
    rejected: int = 0  # the handler refused the image (serving.client.Answer with ok False)
    failed: int = 0  # no verdict (5xx, no answer, no such version: see serving.client.read_answer), or another version answered
    errors: list[str] = field(default_factory=list)
    outside: int = 0  # out-of-category images (of n)
    outside_other: int = 0  # ... answered "other" without needs_review
    outside_review: int = 0  # ... sent to review (needs_review, whatever the label)
    outside_correct: int = 0  # ... answered "other" (in_category false), sent to review or not

    @property
    def overall(self) -> float:
        """Top-1 over every image of the sample, `other` right when answered `other`."""
        return (self.correct + self.outside_correct) / self.n if self.n else 0.0

    @property
    def in_category(self) -> int:
        return self.n - self.outside

    @property
    def accuracy(self) -> float:
        return self.correct / self.in_category if self.in_category else 0.0

    @property
    def outside_handled(self) -> float:
        """Share of the out-of-category images answered "other" or sent to review."""
        return (self.outside_other + self.outside_review) / self.outside if self.outside else float("nan")


def score(ts: TorchServe, version: str, sample: list[Example], *, concurrency: int = 8) -> Score:
    """Top-1 of `version` on the sample's in-category images, and the routing of its images
    labelled `other`, asked through its versioned endpoint."""
    result = Score(version)

    def ask(ex: Example):
        try:
            return ex, ts.client.classify(f"{MODEL_NAME}/{version}", ex.data)
        except (Transient, Refused, requests.RequestException) as exc:
            return ex, exc

    with ThreadPoolExecutor(max_workers=concurrency) as pool:  # fill the server-side batches
        for ex, answer in pool.map(ask, sample):
            result.n += 1
            outside = ex.label == OTHER_LABEL
            result.outside += outside
            if isinstance(answer, Exception):  # no verdict on the image: the version does not work
                result.failed += 1
                result.errors.append(f"{ex.name}: {answer}")
            elif not answer.ok:
                result.rejected += 1
            elif str(answer.body.get("version")) != version:
                result.failed += 1
                result.errors.append(f"{ex.name}: answered by version {answer.body.get('version')!r}, not {version!r}")
            elif outside:
                review = answer.body.get("needs_review") is True
                said_other = answer.body.get("label") == OTHER_LABEL or answer.body.get("in_category") is False
                result.outside_review += review
                result.outside_other += said_other and not review
                result.outside_correct += said_other
            else:
                result.correct += answer.body.get("label") == ex.label
    return result


def comparison_table(candidate: Score, default: Score | None) -> str:
    head = ("version", "role", "correct", "top-1", "rejected", "failed")
    with_outside = candidate.outside or (default is not None and default.outside)
    rows = [head + (("all, other right", "outside: other / review") if with_outside else ())]
    for s, role in ((default, "default"), (candidate, "candidate")):
        if s is not None:
            row = (s.version, role, f"{s.correct}/{s.in_category}", f"{s.accuracy:.3f}", str(s.rejected), str(s.failed))
            if with_outside:
                row += (f"{s.correct + s.outside_correct}/{s.n} {s.overall:.3f}",
                        f"{s.outside_other} / {s.outside_review} of {s.outside}")
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)


# -- commands --------------------------------------------------------------------------------

@dataclass
class Outcome:
    promoted: bool
    version: str
    previous: str | None
    candidate: Score
    default: Score | None
    sample_from: str
    reason: str
    notes: list[str] = field(default_factory=list)  # what the sample holds that the figures do not show

    def report(self) -> str:
        head = f"rollout: {MODEL_NAME} version {self.version} on {self.candidate.n} images ({self.sample_from})"
        verdict = (f"promoted: version {self.version} is now the default" if self.promoted
                   else f"refused: version {self.version} unregistered; "
                        + (f"the default stays {self.previous}" if self.previous else f"{MODEL_NAME} has no version now"))
        errors = "".join(f"\n  ! {e}" for e in self.candidate.errors[:5])
        notes = "".join(f"\n  note: {n}" for n in self.notes)
        return f"{head}\n{comparison_table(self.candidate, self.default)}{errors}{notes}\n{self.reason}\n{verdict}"


def rollout(ts: TorchServe, archive_spec: str | Path, *, sample_dir: Path | None = None,
            tolerance: float = DEFAULT_TOLERANCE, workers: int | None = None, limit: int | None = DEFAULT_LIMIT,
            log=print) -> Outcome:
    """Register, smoke-test against the current default, then promote or unregister."""
    if tolerance < 0:
        raise RolloutError(f"Invalid --tolerance {tolerance}: use a share of top-1 accuracy >= 0, e.g. 0.02")
    archive = resolve_archive(ts, archive_spec)
    if not ts.healthy():
        raise RolloutError(f"TorchServe does not answer at {ts.inference_url}: start it first (python -m serving up)")
    with locked(ts) as state, _sample(archive, sample_dir) as (folder, sample_from):
        sample = read_sample(folder, limit=limit)
        notes = sample_notes(folder, sample, archive)
        state.save()  # a read-only store fails here, before anything changes, not after the switch
        finish_interrupted_switch(ts, state, log)
        versions = registered(ts)
        if archive.version in versions:
            raise RolloutError(f"version {archive.version} is already registered "
                               f"(registered: {', '.join(versions)}); export the new model as a new version")
        previous = current_default(ts)
        log(f"rollout: registering {archive.name} (workers {workers or archive.config.get('minWorkers', 1)}, "
            f"batch {archive.config.get('batchSize', 1)}, delay {archive.config.get('maxBatchDelay', 100)} ms)")
        started, registered_at = time.monotonic(), now()
        try:
            register(ts, archive, workers=workers)
        except (RolloutError, TorchServeError, requests.RequestException):
            _unregister_quietly(ts, archive.version)  # a half-registered version must not linger
            raise
        log(f"rollout: version {archive.version} ready after {time.monotonic() - started:.1f}s; "
            f"testing it{' and the default ' + previous if previous else ''} on {len(sample)} images")
        try:
            candidate = score(ts, archive.version, sample)
            baseline = score(ts, previous, sample) if previous else None
        except BaseException:
            _unregister_quietly(ts, archive.version)
            raise
        promoted, reason = judge(candidate, baseline, tolerance)
        if promoted:
            state.record(archive, registered_at)
            switch(ts, state, "rollout", archive.version, previous)
            if previous and previous not in state.history:  # served before the state file knew it
                state.history.append(previous)
            state.promote(archive.version)
            state.save()
        else:
            unregister(ts, archive.version)
        return Outcome(promoted, archive.version, previous, candidate, baseline, sample_from, reason, notes)


@contextmanager
def _sample(archive: Archive, sample_dir: Path | None):
    if sample_dir is not None:
        yield Path(sample_dir), f"sample {sample_dir}"
        return
    with archive_sample(archive) as folder:
        if folder is None:
            raise RolloutError(f"{archive.name} carries no sample (sample/styles.csv + sample/images/ inside the "
                               f"archive): pass --sample DIR, a Kaggle-layout folder (styles.csv + images/<id>.jpg)")
        yield folder, f"the sample inside {archive.name}"


def judge(candidate: Score, default: Score | None, tolerance: float) -> tuple[bool, str]:
    """Promote when the candidate answered, and neither of its figures (top-1 on the refund
    categories; on a sample with `other` images, top-1 over all of them) is more than
    `tolerance` below the default's."""
    if candidate.failed:
        return False, f"version {candidate.version} failed {candidate.failed} of {candidate.n} requests"
    if candidate.rejected == candidate.n:
        return False, f"version {candidate.version} rejected every image of the sample"
    if default is None:
        return True, "no default version to compare with: the first version is promoted when it answers"
    figures = [("top-1", candidate.accuracy, default.accuracy)]
    if candidate.outside:
        figures.append((f"top-1 over all images ({OTHER_LABEL!r} right when answered {OTHER_LABEL!r})",
                        candidate.overall, default.overall))
    for name, mine, theirs in figures:
        if theirs - mine > tolerance + 1e-9:
            return False, f"{name} {mine:.3f} is {theirs - mine:.3f} below the default's {theirs:.3f} (tolerance {tolerance:.3f})"
    return True, ("; ".join(f"{name} {mine:.3f} vs the default's {theirs:.3f}" for name, mine, theirs in figures)
                  + f": not worse beyond the tolerance {tolerance:.3f}")


def sample_notes(folder: Path, sample: list[Example], archive: Archive) -> list[str]:
    """What a reader of the figures should know about the sample: rows skipped for want of their
    image, and labels the candidate has no output for (those images count as misses for it)."""
    notes = []
    rows = read_labels(Path(folder) / "styles.csv")
    missing = sum(not (Path(folder) / "images" / f"{i}.jpg").is_file() for i in rows)
    if missing:
        notes.append(f"{missing} of the {len(rows)} labelled rows of {Path(folder) / 'styles.csv'} have no "
                     f"images/<id>.jpg: left out")
    try:
        classes = set(archive.classes())
    except (ArchiveError, KeyError, ValueError):  # an archive without index_to_name.json: nothing to check against
        return notes
    unknown: dict[str, int] = {}
    for ex in sample:
        if ex.label != OTHER_LABEL and ex.label not in classes:
            unknown[ex.label] = unknown.get(ex.label, 0) + 1
    if unknown:
        listed = ", ".join(f"{label!r} ({n})" for label, n in sorted(unknown.items()))
        notes.append(f"{sum(unknown.values())} images are labelled with a category version {archive.version} has no "
                     f"output for, so they count as its misses: {listed}")
    return notes


def rollback(ts: TorchServe, *, log=print) -> tuple[str, str]:
    """Make the previous default the default again. Returns (from, to)."""
    with locked(ts) as state:
        finish_interrupted_switch(ts, state, log)
        live = current_default(ts)
        if live is None:
            raise RolloutError(f"{MODEL_NAME} is not registered: nothing to roll back")
        history = [v for v in state.history if v != live]
        if not history:
            raise RolloutError(f"no earlier default of {MODEL_NAME} is recorded in {state.path} "
                               f"(history: {state.history or 'empty'}); nothing to roll back to")
        target = history[-1]
        versions = registered(ts)
        if target not in versions:  # retired meanwhile: register it again from its archive
            archive = resolve_archive(ts, state.versions.get(target, {}).get("archive", f"{MODEL_NAME}-{target}.mar"))
            log(f"rollback: version {target} is not registered; registering {archive.name}")
            register(ts, archive)
            state.record(archive, now())
        else:
            ts.wait_ready(MODEL_NAME, target, wait_s=120)
        switch(ts, state, "rollback", target, live)
        state.history = history  # the rolled-back version stays registered (not default) until retired
        state.default = target
        state.versions.setdefault(target, {"archive": f"{MODEL_NAME}-{target}.mar", "registered_at": now()})
        state.versions[target]["promoted_at"] = now()
        state.save()
        return live, target


def retire(ts: TorchServe, keep: int, *, log=print) -> list[str]:
    """Unregister every version but the `keep` latest defaults (the current one included). Archives stay."""
    if keep < 1:
        raise RolloutError(f"Invalid --keep {keep}: keep at least 1 (the default)")
    with locked(ts) as state:
        live = current_default(ts)
        order = [v for v in state.history if v != live] + ([live] if live else [])
        kept = order[-keep:]
        retired = []
        for version in registered(ts):
            if version not in kept:
                drain(ts, version)
                unregister(ts, version)
                retired.append(version)
                log(f"retire: unregistered version {version} (its archive stays in {ts.model_store})")
        state.history = [v for v in order if v in kept]
        state.versions = {v: info for v, info in state.versions.items() if v in kept}
        state.default = live or state.default
        state.save()
        return retired


def drain(ts: TorchServe, version: str, *, wait_s: float = 60.0) -> None:
    """Wait until no request is queued for `version`: requests routed to it just before it stopped
    being the default must finish before its workers go."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        r = ts.client.management("GET", f"models/{MODEL_NAME}/{version}", timeout=30)
        if r.status_code != 200 or all(d.get("jobQueueStatus", {}).get("pendingRequests", 0) == 0 for d in r.json()):
            return
        time.sleep(0.2)


@dataclass
class VersionRow:
    version: str
    default: bool
    archive: str
    registered_at: str
    promoted_at: str
    workers: str


def versions(ts: TorchServe) -> tuple[list[VersionRow], bool]:
    """Every version: from TorchServe when it is up (live=True), else from the state file."""
    state = State.load(ts.model_store)
    live = ts.healthy()
    rows = []
    if live:
        default = current_default(ts)
        for v, d in registered(ts).items():
            info = state.versions.get(v, {})
            ready = sum(w.get("status") == "READY" for w in d.get("workers", []))
            rows.append(VersionRow(v, v == default, d.get("modelUrl", info.get("archive", "?")),
                                   info.get("registered_at", "?"), info.get("promoted_at", ""),
                                   f"{ready}/{len(d.get('workers', []))} ready"))
    else:
        for v, info in sorted(state.versions.items(), key=lambda kv: version_key(kv[0])):
            rows.append(VersionRow(v, v == state.default, info.get("archive", "?"), info.get("registered_at", "?"),
                                   info.get("promoted_at", ""), "-"))
    return rows, live


def serve(ts: TorchServe, archive_spec: str | Path | None = None, *, log=print) -> str:
    """Start TorchServe serving `archive_spec`, else the recorded default, else the newest archive;
    register the other recorded versions again (so that a rollback still works) and record the default.
    A read-only model store (a replica's mount) is served as it is, without recording anything."""
    try:
        with locked(ts) as state:
            version = _serve(ts, state, archive_spec, log)
            state.save()
            return version
    except StoreNotWritable as exc:
        log(f"serving: {exc}; serving without recording the default")
        return _serve(ts, State.load(ts.model_store), archive_spec, log)


def _serve(ts: TorchServe, state: State, archive_spec, log) -> str:
    if archive_spec is None and state.switching:
        finish_interrupted_switch(None, state, log, save=False)  # decided: serve what it switched to
    elif state.switching:
        log(f"serving: {archive_spec} given; the interrupted switch to version {state.switching.get('to')} is dropped")
        state.switching = None
    store = archives(ts.model_store)
    if archive_spec is not None:
        default = resolve_archive(ts, archive_spec)
    elif state.default and state.default in store:
        default = resolve_archive(ts, store[state.default])
    else:
        newest = latest_archive(ts.model_store)
        if newest is None:
            raise RolloutError(f"no {MODEL_NAME}-*.mar in {ts.model_store}: export one (python -m training.export ...)")
        if state.default:
            log(f"serving: the recorded default {state.default} has no archive in {ts.model_store}; serving the newest, {newest.name}")
        default = resolve_archive(ts, newest)
    ts.start([f"{MODEL_NAME}={default.name}"])  # registered first, so it is the default
    live = registered(ts)
    for version, info in state.versions.items():
        if version in live or version == default.version:
            continue
        name = info.get("archive", f"{MODEL_NAME}-{version}.mar")
        if not (ts.model_store / name).is_file():
            log(f"serving: recorded version {version} has no archive {name} in {ts.model_store}; skipped")
            continue
        try:
            register(ts, resolve_archive(ts, name))
        except (RolloutError, TorchServeError) as exc:  # the default serves; a lost rollback target is no outage
            log(f"serving: could not register recorded version {version} again: {exc}")
    if current_default(ts) != default.version:  # TorchServe was already up with another default
        if default.version not in registered(ts):
            register(ts, default)
        set_default(ts, default.version)
    state.record(default)
    if state.default != default.version:
        state.promote(default.version)
    return default.version
