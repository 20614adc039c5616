"""python -m review: its command line, the background server (`up`, and `serving down` stopping
it), add-reviewer, export, and `ingest report`'s review section, as a user runs them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from review import queue
from review.__main__ import get_args_parser
from review_support import Rows
from serving.paths import REPO_ROOT
from serving.torchserve import free_port


def test_serve_binds_to_loopback_by_default(monkeypatch):
    monkeypatch.delenv("REVIEW_HOST", raising=False)
    args = get_args_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.lease == queue.DEFAULT_LEASE_S
    assert get_args_parser().parse_args(["audit-share", "5%"]).share == pytest.approx(0.05)
    assert get_args_parser().parse_args(["audit-share", "0.1"]).share == pytest.approx(0.1)


def run(env: dict, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO_ROOT, input=stdin,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def env(database_url, tmp_path):
    e = {**os.environ, "DATABASE_URL": database_url, "RC_STATE_DIR": str(tmp_path / "state"),
         "PYTHONPATH": str(REPO_ROOT)}
    e.pop("REVIEW_SECRET_KEY", None)
    return e


@pytest.mark.integration
def test_up_in_the_background_and_serving_down_stops_it(env, database_url, tmp_path):
    r = run(env, "review", "add-reviewer", "carol", "--password-file", "-", stdin="carol's password\n")
    assert r.returncode == 0 and "reviewer carol created" in r.stdout, r.stderr
    assert queue.authenticate(database_url, "carol", "carol's password") is not None
    r = run(env, "review", "add-reviewer", "carol", "--password-file", "-", stdin="another password\n")
    assert r.returncode == 1 and "exists already" in r.stderr
    r = run(env, "review", "add-reviewer", "carol", "--generate-password", "--replace")
    assert r.returncode == 0 and "password: " in r.stdout
    password = r.stdout.rsplit("password: ", 1)[1].strip()
    assert queue.authenticate(database_url, "carol", password) is not None

    port = free_port()
    pid_file = tmp_path / "state" / "review" / "review.pid"
    r = run(env, "review", "up", "--port", str(port))
    try:
        assert r.returncode == 0, r.stderr
        assert f"review: up at http://127.0.0.1:{port}/" in r.stdout
        pid = int(pid_file.read_text().split()[0])
        assert requests.get(f"http://127.0.0.1:{port}/login", timeout=5).status_code == 200
        assert f"review: running at http://127.0.0.1:{port}/" in run(env, "serving", "status").stdout
        again = run(env, "review", "up", "--port", str(port))
        assert again.returncode == 0 and int(pid_file.read_text().split()[0]) == pid, "one server, not two"
    finally:
        down = run(env, "serving", "down")
        if pid_file.exists():  # not stopped: do not leave it running after the test
            os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)
    assert down.returncode == 0 and "review: stopped" in down.stdout, down.stderr
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/login", timeout=5)
    assert "was not running" in run(env, "review", "down").stdout


@pytest.mark.integration
def test_export_and_report_from_the_command_line(env, database_url, tmp_path):
    rows = Rows(database_url, tmp_path / "processed")
    rows.add(1, label="Tshirts")
    rows.add(2, label="Jeans")
    alice = queue.add_reviewer(database_url, "alice", "alice-password")[0]
    first = queue.decide(database_url, queue.claim(database_url, alice), alice, "Tshirts")
    queue.decide(database_url, queue.claim(database_url, alice), alice, None)

    r = run(env, "review", "export", "--out", str(tmp_path / "export"))
    assert r.returncode == 0, r.stderr
    assert "1 photos" in r.stdout and "Tshirts 1" in r.stdout
    assert (tmp_path / "export" / "styles.csv").read_text() == f"id,articleType\n{first},Tshirts\n"
    r = run(env, "review", "export", "--out", str(tmp_path / "export"))
    assert r.returncode == 1 and "holds a catalogue already" in r.stderr
    r = run(env, "review", "export", "--out", str(tmp_path / "x"), "--since", "yesterday")
    assert r.returncode == 2 and "Invalid --since 'yesterday'" in r.stderr

    r = run(env, "ingest", "report")
    assert r.returncode == 0, r.stderr
    for title in ("Review desk: open items", "Review desk: decisions per day", "Review desk: measured precision"):
        assert f"== {title}" in r.stdout
    doc = json.loads(run(env, "ingest", "report", "--format", "json").stdout)
    assert doc["review_open"] == [{"open": 0, "open_audit": 0, "awaiting_opinion": 0, "held_now": 0, "oldest_received": None}]
    assert [(d["decisions"], d["category"], d["unusable"]) for d in doc["review_per_day"]] == [(2, 1, 1)]


def test_ingest_and_serving_load_without_flask_or_torch():
    """`ingest report` (its review section included) and `serving down` (which stops the review
    desk) import neither the review desk's Flask code nor torch; nor do review's CLI, queue and export."""
    code = ("import sys, ingest.__main__, ingest.report, serving.__main__, review.process, review.queue, "
            "review.export, review.__main__; "
            "print(sorted(m for m in ('flask', 'flask_wtf', 'review.app', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_category_list_comes_from_the_versions_archive(tmp_path):
    """The classes of the archive that answered (`other` offered apart), read again when the file
    changes; no database is asked while the archive is at hand."""
    import zipfile

    from review.categories import Categories

    def write_archive(classes: list[str]) -> None:
        with zipfile.ZipFile(tmp_path / "refund_classifier-2.mar", "w") as z:
            z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {
                "modelName": "refund_classifier", "modelVersion": "2", "serializedFile": "weights.pt"}}))
            z.writestr("index_to_name.json", json.dumps({str(i): c for i, c in enumerate(classes)}))

    write_archive(["Tshirts", "Belts", "other"])
    cats = Categories("postgresql://nowhere.invalid/none", tmp_path)
    assert cats.for_version("refund_classifier", "2") == ["Belts", "Tshirts"]
    write_archive(["Tshirts", "Belts", "Caps", "other"])
    os.utime(tmp_path / "refund_classifier-2.mar", (1, 1))
    assert cats.for_version("refund_classifier", "2") == ["Belts", "Caps", "Tshirts"]


@pytest.mark.integration
def test_gold_photos_a_lead_and_the_quality_settings_from_the_command_line(env, database_url, tmp_path):
    rows = Rows(database_url, tmp_path / "processed")
    taken_in = rows.add(1, label="Jeans", confidence=0.99, needs_review=False)
    catalogue = tmp_path / "test-split"
    (catalogue / "Jeans").mkdir(parents=True)
    (catalogue / "Jeans" / "a.jpg").write_bytes(taken_in["data"])
    (catalogue / "Jeans" / "notes.txt").write_text("not a photo")
    (catalogue / "other").mkdir()
    (catalogue / "other" / "b.jpg").write_bytes(b"a photo the inbox never saw")
    misspelt = rows.add(2, label="Jeans", confidence=0.99, needs_review=False)
    (catalogue / "Jeanz").mkdir()
    (catalogue / "Jeanz" / "c.jpg").write_bytes(misspelt["data"])
    r = run(env, "review", "gold", str(catalogue))
    assert r.returncode == 0, r.stderr
    assert "1 photos added, 0 gold already, 1 not taken in by the inbox yet, 1 in a folder that is not one" in r.stdout
    assert f"not recorded: {catalogue / 'other' / 'b.jpg'}" in r.stdout
    assert f"unknown category: {catalogue / 'Jeanz' / 'c.jpg'} ('Jeanz' is not a category" in r.stdout
    assert queue.prediction_of(database_url, misspelt["sha256"]) == ("refund_classifier", "1")
    assert "0 photos added, 1 gold already" in run(env, "review", "gold", str(catalogue)).stdout
    r = run(env, "review", "gold", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "is not a folder" in r.stderr

    queue.add_reviewer(database_url, "lena", "lena's password")
    r = run(env, "review", "lead", "lena")
    assert r.returncode == 0 and "lena is a lead" in r.stdout
    assert "lead" in run(env, "review", "reviewers").stdout.splitlines()[0]
    assert run(env, "review", "lead", "nobody").returncode == 1

    r = run(env, "review", "quality", "--gold-share", "5%", "--second-opinion-audit", "off")
    assert r.returncode == 0 and "gold items 5.00%" in r.stdout and "every audit item" not in r.stdout
    r = run(env, "review", "quality", "--second-opinion-share", "2")
    assert r.returncode == 1 and "Invalid second-opinion share" in r.stderr
    r = run(env, "ingest", "report", "--format", "json")
    doc = json.loads(r.stdout)
    assert doc["review_gold"] == [] and doc["review_kappa"] == [] and doc["review_opinions"][0]["sent"] == 0
