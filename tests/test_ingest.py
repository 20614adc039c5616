"""Ingestion into a real PostgreSQL from a real TorchServe: results, bad inputs, settings, reports.

After each run the exactly-once invariant is checked (`assert_exactly_once` in ingest_helpers.py).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import psycopg2
import pytest
from PIL import Image

from ingest import db
from ingest import report as report_mod
from ingest.job import Job
from ingest.journal import FileRow, PredictionRow
from ingest.outcomes import EXIT_CODES, IngestError, Item, Outcome, Summary, TorchServeDown, TorchServeRefused, exit_code_for
from ingest.schedule import Cron, CronError, next_due
from ingest.settings import FIELDS, Settings, SettingsError, add_arguments, resolve, settings_fields
from ingest.store import DatabaseDown, LockBusy, LockLost
from ingest_helpers import FAST, assert_exactly_once, cli, fetch, fill_inbox, ingest_env, sha, snapshot, start_cli, wait_for
from serving.client import MULTIPART_PART_OVERHEAD
from serving.paths import REPO_ROOT
from serving.torchserve import free_port
from training.catalogue import read_styles


def settings_for(inbox: Path, url: str, ts_url: str, **kw) -> Settings:
    # incomplete_grace=0: the truncated and empty photos these tests write are quarantined at once
    # (test_ingest_poison.py tests the grace).
    base = dict(inbox=inbox, database_url=url, torchserve_url=ts_url, min_age=0, settle=0, batch_size=5, concurrency=4,
                incomplete_grace=0, progress=False)
    return Settings(**{**base, **kw})


# -- images that the handler must reject ---------------------------------------------------

def huge_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels: rejected before it is decoded."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17]))
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


# -- the happy path ---------------------------------------------------------------------------

@pytest.mark.integration
def test_ingest_records_one_row_per_image(torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    originals = fill_inbox(inbox, unseen_images)
    good = next(iter(sorted((unseen_images / "images").glob("*.jpg")))).read_bytes()
    (inbox / "broken.jpg").write_bytes(good[: len(good) // 2])  # a truncated JPEG
    originals = snapshot(inbox)

    summary = Job(settings_for(inbox, database_url, torchserve.inference_url)).run()
    n = len(originals) - 1
    assert (summary.processed, summary.quarantined, summary.duplicates, summary.failed, summary.exit_code) == (n, 1, 0, 0, 0)
    where = assert_exactly_once(database_url, inbox, originals)
    assert where["quarantine"] == {"broken.jpg"} and len(where["processed"]) == n

    truth = {f"{r['id']}.jpg": r["articleType"] for r in read_styles(unseen_images / "styles.csv")[0]}
    rows = fetch(database_url, "SELECT filename, label, confidence, model_version, status, error_code, topk, original_path, size_bytes FROM predictions")
    by_name = {r[0]: r for r in rows}
    bad = by_name.pop("broken.jpg")
    assert bad[4] == "rejected" and bad[1] is None and bad[5] == "corrupt"
    assert all(r[4] == "ok" and r[3] == "1" and len(r[6]) == 5 and r[7] == f"batch-a/{name}" for name, r in by_name.items())
    assert sum(r[1] == truth[name] for name, r in by_name.items()) / len(by_name) >= 0.8
    (status, counts), = fetch(database_url, "SELECT status, counts FROM ingest_runs")
    assert status == "succeeded" and counts["processed"] == n and counts["quarantined"] == 1
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert (tmp_path / "processed" / day / "batch-a").is_dir()


@pytest.mark.integration
def test_several_photos_per_request_each_keep_their_own_outcome(torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, unseen_images, n=10)
    photos = sorted((inbox / "batch-a").iterdir())
    data = photos[4].read_bytes()
    (inbox / "batch-a" / photos[4].name).write_bytes(data[: len(data) // 2])  # truncated, amid good ones
    (inbox / "batch-a" / "zz copy.jpg").write_bytes(photos[0].read_bytes())  # a duplicate in flight
    originals = snapshot(inbox)
    log = torchserve.log_dir / "model_log.log"
    start = log.stat().st_size

    run = cli(inbox, ingest_env(torchserve.inference_url, database_url), "--photos-per-request", "4")
    assert run.returncode == 0, run.stderr[-2000:]
    where = assert_exactly_once(database_url, inbox, originals)
    assert where["quarantine"] == {f"batch-a/{photos[4].name}"} and not where["inbox"]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["processed"], summary["duplicates"], summary["quarantined"], summary["failed"]) == (9, 1, 1, 0)
    (code,), = fetch(database_url, "SELECT error_code FROM predictions WHERE status = 'rejected'")
    assert code == "corrupt"
    # the photos went several to a request: the handler saw more photos than requests
    batches = [(int(n), int(r)) for n, r in re.findall(r"batch of (\d+): .*?\((\d+) requests\)", log.read_text()[start:])]
    assert sum(n for n, _ in batches) == 10 and sum(r for _, r in batches) <= 3, batches


@pytest.mark.integration
def test_same_content_twice_is_recorded_once_and_both_leave(torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, unseen_images, n=4)
    first_name = sorted((inbox / "batch-a").iterdir())[0].name
    photo = (inbox / "batch-a" / first_name).read_bytes()
    (inbox / "copy of it.jpg").write_bytes(photo)  # same content, same run
    originals = snapshot(inbox)
    s = settings_for(inbox, database_url, torchserve.inference_url)
    first = Job(s).run()
    assert (first.processed, first.duplicates) == (4, 1)
    assert_exactly_once(database_url, inbox, originals)

    # Later: the same content again, under a third name -> noted as a duplicate, moved, no new row.
    (inbox / "again.jpg").write_bytes(photo)
    originals["again.jpg"] = sha(photo)
    second = Job(s).run()
    assert (second.processed, second.duplicates) == (0, 1)
    assert_exactly_once(database_url, inbox, originals)
    dups = fetch(database_url, "SELECT relative_path FROM ingest_files WHERE duplicate ORDER BY id")
    # A folder's files come before its subfolders: "copy of it.jpg" was first, batch-a's copy the duplicate.
    assert [r[0] for r in dups] == [f"batch-a/{first_name}", "again.jpg"]
    (n_rows,), = fetch(database_url, "SELECT count(*) FROM predictions")
    assert n_rows == 4


@pytest.mark.integration
def test_bad_inputs(torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, unseen_images, n=3)
    good = sorted((inbox / "batch-a").iterdir())[0].read_bytes()
    (inbox / "zero.jpg").write_bytes(b"")
    (inbox / "notes.jpg").write_text("a text file named like a photo\n")
    (inbox / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (inbox / "huge.png").write_bytes(huge_png())
    (inbox / "scan.pdf").write_bytes(b"%PDF-1.4 not a photo")  # unsupported extension: stays
    (inbox / "ünïcode folder").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buf, "JPEG")
    (inbox / "ünïcode folder" / "photo with spaces ✓.jpg").write_bytes(buf.getvalue())
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(good[::-1])
    (inbox / "link.jpg").symlink_to(outside)  # never followed out of the inbox
    (inbox / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(inbox / "pipe.jpg")  # not a regular file: must not hang the reader
    limit = max(p.stat().st_size for p in (inbox / "batch-a").iterdir()) + 1000
    (inbox / "big.jpg").write_bytes(good + b"\0" * (limit + 1 - len(good)))  # over --max-bytes
    (inbox / ".hidden.jpg").write_bytes(good)
    originals = snapshot(inbox)

    s = settings_for(inbox, database_url, torchserve.inference_url, max_bytes=limit)
    summary = Job(s).run()
    where = assert_exactly_once(database_url, inbox, originals)
    assert where["quarantine"] == {"zero.jpg", "notes.jpg", "truncated.jpg", "huge.png", "big.jpg"}
    assert where["processed"] == {r for r in originals if r.startswith("batch-a/")} | {"ünïcode folder/photo with spaces ✓.jpg"}
    assert where["inbox"] == {"scan.pdf", ".hidden.jpg"}
    assert (inbox / "link.jpg").is_symlink() and outside.read_bytes() == good[::-1]  # left alone, target untouched
    assert (inbox / "pipe.jpg").exists()
    codes = dict(fetch(database_url, "SELECT filename, error_code FROM predictions WHERE status = 'rejected'"))
    assert codes == {"zero.jpg": "empty", "notes.jpg": "not_an_image", "truncated.jpg": "corrupt",
                     "huge.png": "too_many_pixels", "big.jpg": "too_large"}
    assert summary.skipped == Counter({"unsupported": 1, "symlink": 2, "not_a_file": 1, "hidden": 1})
    assert summary.exit_code == 0
    # Nothing was recorded for what was skipped: the secret behind the link never reached TorchServe.
    assert not fetch(database_url, "SELECT 1 FROM predictions WHERE sha256 = %(s)s", {"s": sha(good[::-1])})

    # Left for a reason that does not pass by itself, for longer than --stuck-after: named, and exit 1
    long_ago = time.time() - 2 * 3600
    for name in ("scan.pdf", "link.jpg", "linkdir", "pipe.jpg", ".hidden.jpg"):
        os.utime(inbox / name, (long_ago, long_ago), follow_symlinks=False)
    again = Job(settings_for(inbox, database_url, torchserve.inference_url, max_bytes=limit)).run()
    assert (again.status, again.exit_code) == ("succeeded", 1)
    assert sorted((rel, reason) for rel, reason, _ in again.waited_too_long) == [
        ("link.jpg", "symlink"), ("linkdir", "symlink"), ("pipe.jpg", "not_a_file"), ("scan.pdf", "unsupported")]
    assert "4 left longer than --stuck-after" in again.line() and "scan.pdf (unsupported)" in again.line()
    runs = report_mod.collect(database_url, since=datetime(2000, 1, 1, tzinfo=timezone.utc), limit=5, sections=["runs"])["runs"]
    latest = dict(zip(runs["columns"], runs["rows"][0]))
    assert latest["waited_too_long"] == 4 and "pipe.jpg (not_a_file)" in latest["waited_too_long_names"]
    assert latest["skipped"] == "hidden 1, not_a_file 1, symlink 2, unsupported 1"
    assert latest["pending_moves"] == latest["move_failed"] == latest["recovery_failed"] == 0


@pytest.mark.integration
def test_unreadable_file_stays_in_the_inbox(torchserve, database_url, tmp_path, unseen_images):
    if os.geteuid() == 0:
        pytest.skip("as root, chmod 000 does not stop reads; the FIFO in test_bad_inputs covers an unopenable file")
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, unseen_images, n=2)
    locked = sorted((inbox / "batch-a").iterdir())[0]
    locked.chmod(0)
    try:
        summary = Job(settings_for(inbox, database_url, torchserve.inference_url)).run()
        assert summary.skipped["unreadable"] == 1 and locked.exists() and summary.processed == 1
    finally:
        locked.chmod(0o644)


@pytest.mark.integration
def test_file_still_being_written_waits_for_the_next_run(torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, unseen_images, n=2)
    for p in (inbox / "batch-a").iterdir():  # settled long ago
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    growing = inbox / "growing.jpg"
    fresh = inbox / "fresh.jpg"
    good = sorted((inbox / "batch-a").iterdir())[0].read_bytes()
    fresh.write_bytes(good[::-1] + b"x")  # young but unchanged for --settle: taken, fails to decode, left: it may still grow
    growing.write_bytes(good[:100])
    import threading

    done = threading.Event()

    def writer():
        for i in range(100, len(good), max(1, len(good) // 40)):
            if done.is_set():
                break
            with open(growing, "ab") as f:
                f.write(good[i: i + max(1, len(good) // 40)])
            time.sleep(0.05)
    t = threading.Thread(target=writer)
    t.start()
    try:
        summary = Job(settings_for(inbox, database_url, torchserve.inference_url, min_age=60, settle=0.5)).run()
    finally:
        done.set()
        t.join()
    assert summary.skipped["not_settled"] == 1 and growing.exists()
    assert summary.processed == 2 and summary.quarantined == 0 and summary.skipped["incomplete"] == 1 and fresh.exists()


@pytest.mark.integration
def test_torchserve_down_stops_cleanly(database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    originals = fill_inbox(inbox, unseen_images, n=3)
    r = cli(inbox, ingest_env(f"http://127.0.0.1:{free_port()}", database_url), "--retries", "3", "--backoff", "0.05")
    assert r.returncode == 3, r.stderr
    assert "stays unavailable after 3 attempts" in r.stdout
    assert snapshot(inbox) == originals  # everything waits for the next run
    (status, error), = fetch(database_url, "SELECT status, error FROM ingest_runs")
    assert status == "failed" and "unavailable" in error


@pytest.mark.integration
def test_unknown_model_stops_without_quarantining(torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    originals = fill_inbox(inbox, unseen_images, n=3)
    summary = Job(settings_for(inbox, database_url, torchserve.inference_url, model="no_such_model")).run()
    assert summary.exit_code == 3 and "no model 'no_such_model'" in summary.error
    assert snapshot(inbox) == originals and not (tmp_path / "quarantine").exists()


@pytest.mark.integration
def test_two_runs_at_once(torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    originals = fill_inbox(inbox, unseen_images, n=8)
    env = ingest_env(torchserve.inference_url, database_url)
    # Deterministic: the first run holds the lock (paused); the second exits at once, touching nothing.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    first = start_cli(inbox, {**env, "INGEST_TEST_HOOK": "pause@after_read", "INGEST_TEST_HOOK_DIR": str(hooks)})
    wait_for(hooks / "paused-after_read", first)
    t0 = time.monotonic()
    second = cli(inbox, env)
    assert second.returncode == 75 and time.monotonic() - t0 < 15
    assert "another ingest run holds the ingest lock: run 1" in second.stderr
    (hooks / "resume-after_read").touch()
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert_exactly_once(database_url, inbox, originals)

    # And really at once, on a fresh inbox: whichever order they get, nothing is done twice.
    inbox2 = tmp_path / "at-once" / "inbox"
    fill_inbox(inbox2, unseen_images)
    originals2 = snapshot(inbox2)
    procs = [start_cli(inbox2, env) for _ in range(2)]
    codes = sorted(p.wait(timeout=60) for p in procs)
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert codes in ([0, 0], [0, 75])
    where = assert_exactly_once(database_url, inbox2, originals2)
    assert not where["inbox"]


# -- schema -------------------------------------------------------------------------------------

SCHEMA_SQL = """
SELECT 'column', table_name || '.' || column_name || ' ' || data_type || ' null=' || is_nullable || ' default=' || coalesce(column_default, '')
FROM information_schema.columns WHERE table_schema = 'public' AND table_name <> 'schema_migrations'
UNION ALL
SELECT 'constraint', conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text <> 'schema_migrations'
UNION ALL
SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename <> 'schema_migrations'
UNION ALL
SELECT 'trigger', pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'function', proname || '(' || pg_get_function_arguments(oid) || ') ' || prosrc
FROM pg_proc WHERE pronamespace = 'public'::regnamespace
ORDER BY 1, 2
"""


@pytest.mark.integration
def test_migrations_in_order_equal_the_current_schema(pg_cluster, database_url):
    numbers = [n for n, _, _ in db.migrations()]
    assert numbers == list(range(1, len(numbers) + 1)), "migrations must be numbered 001, 002, ... without gaps"
    assert db.migrate(database_url) == []  # the template already has them all
    names = [r[0] for r in fetch(database_url, "SELECT name FROM schema_migrations ORDER BY version")]
    assert names == [name for _, name, _ in db.migrations()]

    fresh = "schema_" + os.urandom(6).hex()
    conn = psycopg2.connect(pg_cluster.url("postgres"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{fresh}"')
        with db.connect(pg_cluster.url(fresh)) as c, c.cursor() as cur:
            cur.execute(db.load_query("schema"))
        assert fetch(pg_cluster.url(fresh), SCHEMA_SQL) == fetch(database_url, SCHEMA_SQL)
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')
        conn.close()


# -- report ---------------------------------------------------------------------------------------

@pytest.mark.integration
def test_report_formats(torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, unseen_images, n=5)
    (inbox / "notes.jpg").write_text("not a photo")
    Job(settings_for(inbox, database_url, torchserve.inference_url)).run()
    env = {**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(REPO_ROOT)}

    def report(*args):
        r = subprocess.run([sys.executable, "-m", "ingest", "report", *args], env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    doc = json.loads(report("--format", "json"))
    assert set(doc) == set(report_mod.SECTIONS)
    assert sum(r["images"] for r in doc["by_day"]) == 6
    assert [(r["reason"], r["images"]) for r in doc["failures"]] == [("not_an_image", 1)]
    assert doc["runs"][0]["processed"] == 5 and doc["runs"][0]["status"] == "succeeded"
    n_review = fetch(database_url, "SELECT count(*) FROM predictions WHERE needs_review")[0][0]
    assert len(doc["review_queue"]) == n_review
    table = report("--since", "2020-01-01")
    assert "== Photos per day and category ==" in table and "rejected:not_an_image" in table
    csv_text = report("--format", "csv", "--section", "failures")
    assert csv_text.splitlines()[0].startswith("reason,model_version,images") and "not_an_image,1,1" in csv_text
    assert json.loads(report("--format", "json", "--since", "2999-01-01"))["by_day"] == []
    latest = report("--latest", "3")  # what `make demo` prints last
    assert "== Latest predictions ==" in latest
    assert len(latest.split("== Latest predictions ==")[1].strip().splitlines()) == 2 + 3


# -- settings, schedule (no services) --------------------------------------------------------

def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_settings_flags_beat_environment_beat_yaml(tmp_path):
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text("inbox: /from/yaml\nbatch-size: 7\nconcurrency: 3\nmin_age: 1m\nmodel: refund_classifier/2\n")
    env = {"INGEST_CONCURRENCY": "5", "INGEST_MIN_AGE": "90s"}
    values = resolve(_parse(["--config", str(cfg), "--min-age", "5"]), env)
    assert (values["inbox"], values["batch_size"], values["concurrency"], values["min_age"], values["model"]) == \
        (Path("/from/yaml"), 7, 5, 5.0, "refund_classifier/2")
    assert resolve(_parse([]), {"INGEST_CONFIG": str(cfg)})["batch_size"] == 7
    assert resolve(_parse([]), {})["concurrency"] == 64
    with pytest.raises(SettingsError, match="Invalid setting 'bach_size'.*choose from"):
        cfg.write_text("bach_size: 3\n")
        resolve(_parse(["--config", str(cfg)]), {})
    with pytest.raises(SettingsError, match="INGEST_TIMEOUT: Invalid duration 'soon'"):
        resolve(_parse([]), {"INGEST_TIMEOUT": "soon"})
    with pytest.raises(SettingsError, match="same folder"):
        Settings(inbox=tmp_path, database_url="x", processed=tmp_path / "a", quarantine=tmp_path / "a")


def test_settings_defaults_are_the_fields_defaults(tmp_path):
    """The dataclass and the flags/env/YAML table state each default once: they cannot disagree."""
    built = Settings(inbox=tmp_path / "inbox", database_url="x", torchserve_url="http://ts.invalid")
    resolved = resolve(_parse([]), {})
    for f in FIELDS:
        if f.name not in ("inbox", "database_url", "torchserve_url", "processed", "quarantine"):
            assert getattr(built, f.name) == f.default == resolved[f.name], f.name
    assert {f.name for f in FIELDS} == settings_fields() - {"extra"}
    with pytest.raises(SettingsError, match="no TorchServe address"):
        Job(Settings(inbox=tmp_path / "inbox", database_url="x"))


def test_requests_stay_under_the_photo_count_and_the_byte_cap(tmp_path):
    kib = 1024
    s = Settings(inbox=tmp_path / "inbox", database_url="x", torchserve_url="http://ts.invalid",
                 photos_per_request=4, max_request_bytes=3 * (10 * kib + MULTIPART_PART_OVERHEAD))
    job = Job(s)

    def photo(size: int) -> Outcome:
        return Outcome(Item(None, b"\0" * size, str(size), size, datetime.now(timezone.utc)))
    sizes = [kib] * 6 + [10 * kib] * 4 + [40 * kib] + [kib]  # 40 KiB: over the cap alone
    requests = [[o.item.size for o in r] for r in job._requests([photo(n) for n in sizes])]
    assert requests == [[kib] * 4, [kib, kib, 10 * kib, 10 * kib], [10 * kib, 10 * kib], [40 * kib], [kib]]
    assert [[o.item.size for o in r] for r in Job(Settings(**{**s.__dict__, "photos_per_request": 1}))._requests(
        [photo(n) for n in sizes[:3]])] == [[kib]] * 3  # 1: today's one photo per request
    assert resolve(_parse([]), {"INGEST_PHOTOS_PER_REQUEST": "2"})["photos_per_request"] == 2


def test_exit_codes_are_decided_in_one_table():
    assert exit_code_for(LockBusy("held")) == 75
    assert exit_code_for(DatabaseDown("gone")) == exit_code_for(LockLost("taken")) == 4
    assert exit_code_for(TorchServeDown("down")) == exit_code_for(TorchServeRefused("no model")) == 3
    assert exit_code_for(SettingsError("bad")) == exit_code_for(CronError("bad")) == 2
    assert exit_code_for(IngestError("other")) == 1
    assert set(EXIT_CODES) == {0, 1, 2, 3, 4, 75}
    for fatal, stopped, failed, expected in [(None, False, 0, ("succeeded", 0)), (None, False, 2, ("succeeded", 1)),
                                             (None, True, 2, ("stopped", 0)), (TorchServeDown("x"), True, 0, ("failed", 3))]:
        s = Summary(failed=failed)
        s.conclude(fatal, stopped=stopped)
        assert (s.status, s.exit_code) == expected
    # a stop (SIGTERM) that left moves unfinished is not a clean exit
    for unfinished in ({"move_failed": 1}, {"recovery_failed": 1}):
        s = Summary(**unfinished)
        s.conclude(None, stopped=True)
        assert (s.status, s.exit_code) == ("stopped", 1)
    s = Summary(waited_too_long=[("scan.pdf", "unsupported", 7200.0)])
    s.conclude(None, stopped=False)
    assert (s.status, s.exit_code) == ("succeeded", 1)


def test_journal_rows_match_the_insert_columns():
    """execute_values fills `VALUES %s` by position: the named tuples must list the columns in order."""
    for row, query in ((PredictionRow, "insert_predictions"), (FileRow, "insert_files")):
        sql = "\n".join(line for line in db.load_query(query).splitlines() if not line.startswith("--"))
        columns = [c.strip() for c in sql[sql.index("(") + 1: sql.index(")")].split(",")]
        assert list(row._fields) == columns, query


def test_cron_expressions():
    t = datetime(2026, 11, 26, 10, 7, 30, tzinfo=timezone.utc)  # a Thursday
    assert Cron.parse("*/15 * * * *").next_after(t) == datetime(2026, 11, 26, 10, 15, tzinfo=timezone.utc)
    assert Cron.parse("0 2 * * *").next_after(t) == datetime(2026, 11, 27, 2, 0, tzinfo=timezone.utc)
    assert Cron.parse("30 8 * * mon-fri").next_after(datetime(2026, 11, 27, 9, 0, tzinfo=timezone.utc)) == \
        datetime(2026, 11, 30, 8, 30, tzinfo=timezone.utc)
    assert Cron.parse("0 0 1 jan *").next_after(t) == datetime(2027, 1, 1, tzinfo=timezone.utc)
    for bad in ("* * * *", "61 * * * *", "*/0 * * * *", "0 0 * * funday"):
        with pytest.raises(CronError):
            Cron.parse(bad)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert next_due(start, start, every_s=900, cron=None) == datetime(2026, 1, 1, 0, 15, tzinfo=timezone.utc)


@pytest.mark.integration
def test_schedule_runs_and_stops_on_sigterm(torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    originals = fill_inbox(inbox, unseen_images, n=3)
    env = ingest_env(torchserve.inference_url, database_url)
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "schedule", "--every", "1s", "--inbox", str(inbox), *FAST],
                            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(fetch(database_url, "SELECT 1 FROM ingest_runs WHERE status = 'succeeded'")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert '"event": "schedule_stop"' in err
    assert_exactly_once(database_url, inbox, originals)
    assert all(r[0] in ("succeeded", "stopped") for r in fetch(database_url, "SELECT status FROM ingest_runs"))


@pytest.mark.integration
def test_file_appearing_during_the_run(torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    photos = sorted((unseen_images / "images").glob("*.jpg"))
    originals = fill_inbox(inbox, unseen_images, n=12)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    env = ingest_env(torchserve.inference_url, database_url)
    proc = start_cli(inbox, {**env, "INGEST_TEST_HOOK": "pause@after_commit", "INGEST_TEST_HOOK_DIR": str(hooks)})
    wait_for(hooks / "paused-after_commit", proc)
    # One in a folder the walk has listed already, one in a folder it has not reached yet.
    shutil.copy(photos[12], inbox / "batch-a" / "late.jpg")
    (inbox / "zz-late").mkdir()
    shutil.copy(photos[13], inbox / "zz-late" / "late.jpg")
    originals.update({"batch-a/late.jpg": sha(photos[12].read_bytes()), "zz-late/late.jpg": sha(photos[13].read_bytes())})
    (hooks / "resume-after_commit").touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    first = assert_exactly_once(database_url, inbox, originals)
    assert "batch-a/late.jpg" in first["inbox"]  # its folder was listed before it came: next run
    assert cli(inbox, env).returncode == 0
    assert not assert_exactly_once(database_url, inbox, originals)["inbox"]
