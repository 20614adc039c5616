"""The review queue against a real PostgreSQL: queueing, claims and leases, concurrent reviewers,
decisions and their history, a decision covering every row of a content, the audit sample, the
report's review section, and the export."""
from __future__ import annotations

import csv
import hashlib
import json
import threading
from datetime import datetime, timezone

import psycopg2
import pytest
from PIL import Image

from ingest import report
from review import queue
from review.export import ExportError, export
from review_support import Rows, fetch, image_bytes, sha_with_point

pytestmark = pytest.mark.integration

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def rows(database_url, tmp_path):
    return Rows(database_url, tmp_path / "processed")


@pytest.fixture
def alice(database_url):
    return queue.add_reviewer(database_url, "alice", "alice-password")[0]


@pytest.fixture
def bob(database_url):
    return queue.add_reviewer(database_url, "bob", "bob-password")[0]


def expire_leases(url: str) -> None:
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE review_items SET lease_until = now() - interval '1 second' WHERE lease_until IS NOT NULL")
    conn.close()


def item_of(url: str, sha256: str) -> int:
    return fetch(url, "SELECT id FROM review_items WHERE sha256 = %(s)s", {"s": sha256})[0][0]


# -- reviewers --------------------------------------------------------------------------------------

def test_reviewer_passwords_are_hashed_with_a_kdf_and_checked(database_url, alice):
    (stored,) = fetch(database_url, "SELECT password_hash FROM reviewers WHERE name = 'alice'")[0]
    assert stored.startswith("scrypt:") and "alice-password" not in stored
    assert queue.authenticate(database_url, "alice", "alice-password") == queue.Reviewer(alice, "alice")
    assert queue.authenticate(database_url, "alice", "wrong-password") is None
    assert queue.authenticate(database_url, "nobody", "alice-password") is None
    with pytest.raises(queue.ReviewError, match="exists already"):
        queue.add_reviewer(database_url, "alice", "another-password")
    queue.add_reviewer(database_url, "alice", "another-password", replace=True)
    assert queue.authenticate(database_url, "alice", "another-password") is not None
    with pytest.raises(queue.ReviewError, match="Invalid reviewer name"):
        queue.add_reviewer(database_url, "al ice", "long-enough")


# -- queueing ---------------------------------------------------------------------------------------

def test_needs_review_predictions_are_queued_once_per_content(database_url, rows):
    a = rows.add(1, needs_review=True)
    rows.add(2, needs_review=False, sha256=sha_with_point(False, 2))  # accepted, outside the audit sample
    rows.add(1, needs_review=True, version="2", data=a["data"])  # the same content, another version
    got = fetch(database_url, "SELECT sha256, reason, prediction_id FROM review_items")
    assert got == [(a["sha256"], "needs_review", a["prediction_id"])]


def insert_accepted(database_url: str, shas: list[str]) -> None:
    """Confidently accepted predictions of these contents, in one transaction (no photos on disk)."""
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        for s in shas:
            cur.execute("""INSERT INTO predictions (sha256, original_path, filename, size_bytes, label, confidence, topk,
                               needs_review, model_name, model_version, received_at, status)
                           VALUES (%(s)s, '/x', 'x.jpg', 1, 'Tshirts', 0.99, '[]', false, 'refund_classifier', '1', now(), 'ok')""",
                        {"s": s})
    conn.close()


def test_audit_share_is_deterministic_from_the_sha256(database_url):
    """2000 accepted predictions: those whose sha256 falls below the share are queued as audit,
    exactly the ones the rule picks (so a rerun picks the same), about 2 % of them."""
    shas = [hashlib.sha256(f"photo {i}".encode()).hexdigest() for i in range(2000)]
    expected = {s for s in shas if int(s[:8], 16) / 2**32 < 0.02}
    insert_accepted(database_url, shas)
    got = dict(fetch(database_url, "SELECT sha256, reason FROM review_items"))
    assert set(got) == expected and set(got.values()) == {"audit"}
    assert 20 <= len(expected) <= 60  # 2 % of 2000 = 40
    # A configurable share: 10 % from now on.
    assert queue.set_audit_share(database_url, 0.10) == 0.10
    later = [hashlib.sha256(f"later {i}".encode()).hexdigest() for i in range(500)]
    insert_accepted(database_url, later)
    queued_later = {r[0] for r in fetch(database_url, "SELECT sha256 FROM review_items")} & set(later)
    assert queued_later == {s for s in later if int(s[:8], 16) / 2**32 < 0.10}
    with pytest.raises(queue.ReviewError, match="between 0 and 1"):
        queue.set_audit_share(database_url, 2.0)


# -- claims and leases ------------------------------------------------------------------------------

def test_claims_go_oldest_first_and_a_reload_keeps_the_same_item(database_url, rows, alice, bob):
    newer, older = rows.add(5), rows.add(3)
    first = queue.claim(database_url, alice)
    assert first == item_of(database_url, older["sha256"])
    assert queue.claim(database_url, alice) == first, "a reload gives the reviewer the item they hold"
    assert queue.claim(database_url, bob) == item_of(database_url, newer["sha256"])
    assert queue.claim(database_url, bob) == item_of(database_url, newer["sha256"])
    carol = queue.add_reviewer(database_url, "carol", "carol-password")[0]
    assert queue.claim(database_url, carol) is None, "everything is held"


def test_an_item_whose_photo_is_not_moved_yet_is_not_offered(database_url, rows, alice):
    rows.add(1, moved=False)
    assert queue.claim(database_url, alice) is None


def test_an_abandoned_claim_returns_to_the_queue_after_its_lease(database_url, rows, alice, bob):
    rows.add(1)
    held = queue.claim(database_url, alice, lease_s=600)
    assert queue.claim(database_url, bob) is None
    with pytest.raises(queue.ReviewError, match="someone else") as refused:
        queue.decide(database_url, held, bob, "Tshirts")
    assert refused.value.status == 409
    expire_leases(database_url)
    assert queue.claim(database_url, bob) == held, "the lease ran out: the item is back in the queue"
    with pytest.raises(queue.ReviewError, match="someone else"):
        queue.decide(database_url, held, alice, "Tshirts")
    queue.decide(database_url, held, bob, "Shirts")
    assert fetch(database_url, "SELECT reviewer_id, label FROM review_decisions") == [(bob, "Shirts")]


def test_logout_releases_the_claim(database_url, rows, alice, bob):
    rows.add(1)
    held = queue.claim(database_url, alice)
    queue.release(database_url, alice)
    assert queue.claim(database_url, bob) == held


def test_concurrent_reviewers_never_get_the_same_item(database_url, rows):
    """Eight reviewers claim, decide and claim again, in parallel threads, until the queue is empty:
    every item is claimed by exactly one of them and decided exactly once."""
    n_items, n_reviewers = 40, 8
    for seed in range(n_items):
        rows.add(seed)
    reviewers = [queue.add_reviewer(database_url, f"r{i}", "password-" + str(i))[0] for i in range(n_reviewers)]
    claimed: dict[int, list[int]] = {r: [] for r in reviewers}
    errors = []
    start = threading.Barrier(n_reviewers)

    def work(reviewer: int):
        try:
            start.wait()
            while (item := queue.claim(database_url, reviewer)) is not None:
                claimed[reviewer].append(item)
                queue.decide(database_url, item, reviewer, "Tshirts")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in reviewers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    all_claims = [i for items in claimed.values() for i in items]
    assert len(all_claims) == len(set(all_claims)) == n_items
    assert fetch(database_url, "SELECT count(*), count(DISTINCT item_id) FROM review_decisions") == [(n_items, n_items)]


# -- decisions --------------------------------------------------------------------------------------

def test_a_changed_decision_keeps_its_history(database_url, rows, alice, bob):
    a = rows.add(1, label="Tshirts")
    item = queue.claim(database_url, alice)
    first = queue.decide(database_url, item, alice, "Shirts")
    assert queue.claim(database_url, alice) is None, "decided: out of the queue"
    second = queue.decide(database_url, item, bob, queue.OTHER_LABEL, replaces=first)
    third = queue.decide(database_url, item, alice, None, replaces=second)
    got = fetch(database_url, """SELECT id, reviewer_id, outcome, label, previous_label, supersedes
                                 FROM review_decisions ORDER BY id""")
    assert got == [(first, alice, "category", "Shirts", "Tshirts", None),
                   (second, bob, "other", "other", "Shirts", first),
                   (third, alice, "unusable", None, "other", second)]
    assert fetch(database_url, "SELECT decision_id FROM review_items") == [(third,)]
    assert [d["id"] for d in queue.item(database_url, item)["decisions"]] == [first, second, third]
    assert [(h["id"], h["current"]) for h in queue.history(database_url, alice)] == [(third, True), (first, False)]
    del a


def test_a_decision_covers_every_row_of_the_same_content(database_url, rows, alice):
    """Three prediction rows of one photo (versions 1, 2, 3; two of them unsure): one item, one
    decision, and the report sees that decision for each of the rows."""
    a = rows.add(1, label="Tshirts", needs_review=True, version="1")
    rows.add(1, label="Shirts", needs_review=True, version="2", data=a["data"])
    rows.add(1, label="Shirts", confidence=0.99, needs_review=False, version="3", data=a["data"])
    assert fetch(database_url, "SELECT count(*) FROM review_items") == [(1,)]
    item = queue.claim(database_url, alice)
    queue.decide(database_url, item, alice, "Shirts")
    assert queue.claim(database_url, alice) is None
    data = report.collect(database_url, since=EPOCH, limit=100, sections=["review_agreement"])
    cols = data["review_agreement"]["columns"]
    got = {(r[cols.index("model_version")], r[cols.index("predicted")]): (r[cols.index("decided")], r[cols.index("agreed")])
           for r in data["review_agreement"]["rows"]}
    assert got == {("1", "Tshirts"): (1, 0), ("2", "Shirts"): (1, 1), ("3", "Shirts"): (1, 1)}


def test_a_category_outside_the_models_list_is_refused(database_url, rows, alice):
    rows.add(1)
    item = queue.claim(database_url, alice)
    with pytest.raises(queue.ReviewError, match="Invalid category 'Spaceships'"):
        queue.decide(database_url, item, alice, "Spaceships", categories=["Shirts", "Tshirts"])
    assert fetch(database_url, "SELECT count(*) FROM review_decisions") == [(0,)]
    with pytest.raises(queue.ReviewError, match="no review item 999") as missing:
        queue.decide(database_url, 999, alice, "Shirts")
    assert missing.value.status == 404


# -- the report -------------------------------------------------------------------------------------

def test_review_report_sections_on_empty_review_tables(database_url):
    data = report.collect(database_url, since=EPOCH, limit=100, sections=list(report.REVIEW_SECTIONS))
    assert set(data) == set(report.REVIEW_SECTIONS)
    assert data["review_open"]["rows"] == [[0, 0, 0, 0, None]]
    assert data["review_opinions"]["rows"] == [[0, 0, 0, 0, 0, 0]]
    for name in ("review_per_day", "review_agreement", "review_audit", "review_accuracy", "review_kappa", "review_gold"):
        assert data[name]["rows"] == [], name


def test_audit_precision_per_version_with_a_wilson_interval(database_url, rows, alice):
    """Version 1: 10 audited accepted answers, 8 right; version 2: 4 of 4. Plus one unsure item,
    decided against the model (reviewed accuracy 0/1), and one audited photo unusable (left out).
    One reviewer each (no second opinions: test_review_quality has those)."""
    queue.set_quality(database_url, second_opinion_audit=False)
    seed = 0
    for version, right, wrong in (("1", 8, 2), ("2", 4, 0)):
        for n in range(right + wrong):
            seed += 1
            rows.add(seed, label="Tshirts", confidence=0.99, needs_review=False, version=version,
                     sha256=sha_with_point(True, seed))
            item = queue.claim(database_url, alice)
            queue.decide(database_url, item, alice, "Tshirts" if n < right else "Shirts")
    rows.add(100, label="Jeans", needs_review=True)
    queue.decide(database_url, queue.claim(database_url, alice), alice, "Shirts")
    rows.add(101, label="Jeans", confidence=0.99, needs_review=False, sha256=sha_with_point(True, 101))
    queue.decide(database_url, queue.claim(database_url, alice), alice, None)

    data = report.collect(database_url, since=EPOCH, limit=100, sections=["review_audit", "review_accuracy", "review_open"])
    cols = data["review_audit"]["columns"]
    audit = {r[cols.index("model_version")]: dict(zip(cols, r)) for r in data["review_audit"]["rows"]}
    assert set(audit) == {"1", "2"}
    assert (audit["1"]["audited"], audit["1"]["correct"]) == (10, 8)
    assert float(audit["1"]["precision"]) == pytest.approx(0.8)
    # Wilson score interval, z = 1.96: 8/10 -> [0.490, 0.943]; 4/4 -> [0.510, 1.000]
    assert (float(audit["1"]["ci95_low"]), float(audit["1"]["ci95_high"])) == pytest.approx((0.490, 0.943), abs=1e-3)
    assert (float(audit["2"]["ci95_low"]), float(audit["2"]["ci95_high"])) == pytest.approx((0.510, 1.0), abs=1e-3)
    cols = data["review_accuracy"]["columns"]
    acc = [dict(zip(cols, r)) for r in data["review_accuracy"]["rows"]]
    assert [(a["model_version"], a["reviewed"], a["correct"]) for a in acc] == [("1", 1, 0)]
    assert data["review_open"]["rows"] == [[0, 0, 0, 0, None]]


# -- export -----------------------------------------------------------------------------------------

def test_export_writes_the_kaggle_layout(database_url, rows, alice, tmp_path):
    jpeg = rows.add(1, label="Tshirts")
    png = rows.add(2, label="Shirts", data=image_bytes(2, "PNG"), suffix=".png")
    rows.add(3, label="Jeans")
    changed = rows.add(4, label="Watches")
    rows.add(5, label="Heels")  # left undecided
    decided = {}
    for expected in (jpeg, png):
        item = queue.claim(database_url, alice)
        decided[expected["sha256"]] = queue.decide(database_url, item, alice, "Tshirts" if expected is jpeg else "Shirts")
    queue.decide(database_url, queue.claim(database_url, alice), alice, None)  # unusable: not exported
    item = queue.claim(database_url, alice)
    first = queue.decide(database_url, item, alice, "Watches")
    decided[changed["sha256"]] = queue.decide(database_url, item, alice, queue.OTHER_LABEL, replaces=first)  # changed: latest only

    out = tmp_path / "export"
    summary = export(database_url, out, since=EPOCH)
    assert (summary.written, summary.copied, summary.converted) == (3, 2, 1)
    with open(out / "styles.csv", newline="") as f:
        got = list(csv.reader(f))
    assert got[0] == ["id", "articleType"]
    expected_rows = [[str(decided[jpeg["sha256"]]), "Tshirts"], [str(decided[png["sha256"]]), "Shirts"],
                     [str(decided[changed["sha256"]]), "other"]]
    assert sorted(got[1:]) == sorted(expected_rows)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{r[0]}.jpg" for r in expected_rows)
    assert (out / "images" / f"{decided[jpeg['sha256']]}.jpg").read_bytes() == jpeg["data"], "JPEG copied as it is"
    with Image.open(out / "images" / f"{decided[png['sha256']]}.jpg") as im:
        assert im.format == "JPEG" and im.size == (64, 48)
    # training reads it as a catalogue
    from training.catalogue import list_items

    items, skipped = list_items(out)
    assert sorted((i.id, i.label) for i in items) == sorted((r[0], r[1]) for r in expected_rows) and not skipped
    # since: none of today's decisions were made in 2999; an existing catalogue is not overwritten
    assert export(database_url, tmp_path / "later", since=datetime(2999, 1, 1, tzinfo=timezone.utc)).written == 0
    assert (tmp_path / "later" / "styles.csv").read_text() == "id,articleType\n"
    with pytest.raises(ExportError, match="holds a catalogue already"):
        export(database_url, out, since=EPOCH)


def test_export_skips_a_photo_gone_from_disk(database_url, rows, alice, tmp_path):
    a = rows.add(1)
    queue.decide(database_url, queue.claim(database_url, alice), alice, "Tshirts")
    a["path"].unlink()
    summary = export(database_url, tmp_path / "export", since=EPOCH)
    assert summary.written == 0 and summary.skipped == {"file_missing": 1}
    assert json.dumps(summary.skipped)


def test_the_ingestion_journal_feeds_the_queue(database_url, tmp_path, alice):
    """Rows written by the ingest job's own code (Journal.record: a batch in one statement) enter
    the queue: the unsure answers, and an accepted one whose content is in the audit sample; the
    photo is offered once its move is recorded."""
    from ingest import files
    from ingest.journal import Journal
    from ingest.outcomes import Item, Outcome
    from ingest.settings import Settings
    from ingest.store import Store

    def outcome(name: str, body: dict) -> Outcome:
        data = name.encode()
        entry = files.Entry(tmp_path / "inbox" / name, name, len(data), 0, 0)
        return Outcome(Item(entry, None, hashlib.sha256(data).hexdigest(), len(data), datetime.now(timezone.utc)),
                       body=body, ok=True)

    def point(name: str) -> float:
        return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32

    audited = next(f"a{i}.jpg" for i in range(10000) if point(f"a{i}.jpg") < 0.02)
    skipped = next(f"s{i}.jpg" for i in range(10000) if point(f"s{i}.jpg") >= 0.02)
    sure = {"label": "Tshirts", "confidence": 0.99, "topk": [{"label": "Tshirts", "p": 0.99}], "needs_review": False,
            "model": "refund_classifier", "version": "1"}
    unsure = {**sure, "confidence": 0.4, "topk": [{"label": "Tshirts", "p": 0.4}], "needs_review": True}
    (tmp_path / "inbox").mkdir()
    journal = Journal(Store(database_url), Settings(inbox=tmp_path / "inbox", database_url=database_url))
    journal.start_run()
    written = journal.record([outcome("u1.jpg", unsure), outcome("u2.jpg", unsure), outcome(audited, sure),
                              outcome(skipped, sure)])
    got = dict(fetch(database_url, "SELECT p.filename, i.reason FROM review_items i JOIN predictions p ON p.id = i.prediction_id"))
    assert got == {"u1.jpg": "needs_review", "u2.jpg": "needs_review", audited: "audit"}
    assert queue.claim(database_url, alice) is None, "no photo moved yet"
    journal.mark([m.file_id for m in written.plan], "moved")
    assert queue.claim(database_url, alice) is not None
