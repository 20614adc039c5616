"""Reviewers whose quality is measured, against a real PostgreSQL: second opinions (blind, a third
on disagreement, settled by majority, kappa per pair, the settled label in the audit precision
and the export) and gold items (shown like any other item, scored per reviewer with an interval).
The same in a real browser is in test_review_web.py."""
from __future__ import annotations

import csv
import hashlib
import math
from datetime import datetime, timezone

import psycopg2
import pytest

from ingest import report
from review import queue
from review.app import create_app
from review.export import export
from review_support import Rows, fetch, post_login, sha_with_point

pytestmark = pytest.mark.integration

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
PASSWORD = "correct horse battery"
NEVER, ALWAYS = 0.99, 0.0  # the die of queue.claim against the gold share


@pytest.fixture
def rows(database_url, tmp_path):
    return Rows(database_url, tmp_path / "processed")


@pytest.fixture
def team(database_url) -> dict[str, int]:
    return {name: queue.add_reviewer(database_url, name, PASSWORD)[0] for name in ("alice", "bob", "carol", "dave")}


def audited(rows, seed: int, label: str = "Tshirts") -> dict:
    """A confidently accepted answer whose content is in the audit sample: queued as audit."""
    return rows.add(seed, label=label, confidence=0.99, needs_review=False, sha256=sha_with_point(True, seed))


def claim(url, reviewer, draw=NEVER):
    return queue.claim(url, reviewer, draw=draw)


def decided(url: str, rows, team, seed: int = 1, label: str = "Tshirts") -> tuple[int, int]:
    """An audit item (the model said Tshirts) claimed and decided by alice: (item, decision)."""
    audited(rows, seed)
    item = claim(url, team["alice"])
    return item, queue.decide(url, item, team["alice"], label)


def agreed(url: str, rows, team) -> int:
    """An audit item alice decided and bob, asked for the second opinion, agreed with: settled."""
    item, _ = decided(url, rows, team)
    assert claim(url, team["bob"]) == item
    queue.decide(url, item, team["bob"], "Tshirts")
    return item


def section(url: str, name: str) -> list[dict]:
    data = report.collect(url, since=EPOCH, limit=100, sections=[name])[name]
    return [dict(zip(data["columns"], row)) for row in data["rows"]]


def stage(url: str, item: int) -> tuple:
    return fetch(url, "SELECT stage, settled_how, settled_label FROM review_items WHERE id = %(i)s", {"i": item})[0]


def expire_leases(url: str) -> None:
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("UPDATE review_items SET lease_until = now() - interval '1 s' WHERE lease_until IS NOT NULL")
    finally:
        conn.close()


def wilson(k: int, n: int) -> tuple[float, float]:
    z, p = 1.96, k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


# -- second opinions ----------------------------------------------------------------------------------

def test_an_audit_item_goes_to_a_second_reviewer_blind_and_agreement_settles_it(database_url, rows, team, tmp_path):
    a = audited(rows, 1)
    item = claim(database_url, team["alice"])
    queue.decide(database_url, item, team["alice"], "Tshirts")
    assert stage(database_url, item) == ("second", None, None)
    assert claim(database_url, team["alice"]) is None, "the first reviewer does not give the second opinion"

    assert claim(database_url, team["bob"]) == item
    shown = queue.view(database_url, item, team["bob"])
    assert shown["blind"] and shown["decision_id"] is None and shown["decided_by"] is None and shown["decisions"] == []
    assert not queue.view(database_url, item, team["alice"])["blind"], "she sees her own decision"
    assert queue.view(database_url, item, team["carol"])["blind"], "nor does anyone else who may be asked"
    queue.decide(database_url, item, team["bob"], "Tshirts")
    assert stage(database_url, item) == ("settled", "agreement", "Tshirts")
    assert fetch(database_url, "SELECT round, label FROM review_opinions") == [(2, "Tshirts")]
    assert fetch(database_url, "SELECT sha256, label, source FROM review_gold") == [(a["sha256"], "Tshirts", "agreement")]
    assert claim(database_url, team["carol"]) is None, "settled: it waits for nobody"

    (audit,) = section(database_url, "review_audit")
    assert (audit["audited"], audit["correct"]) == (1, 1)
    (opinions,) = section(database_url, "review_opinions")
    assert (opinions["sent"], opinions["agreed"], opinions["awaiting_second"]) == (1, 1, 0)


def test_an_item_waiting_for_its_second_opinion_counts_nowhere_yet(database_url, rows, team, tmp_path):
    item, _ = decided(database_url, rows, team)
    assert section(database_url, "review_audit") == []
    summary = export(database_url, tmp_path / "export", since=EPOCH)
    assert summary.written == 0 and summary.skipped == {"awaiting_opinion": 1}
    (waiting,) = section(database_url, "review_open")
    assert (waiting["open"], waiting["awaiting_opinion"]) == (0, 1)


def test_a_disagreement_goes_to_a_third_reviewer_and_the_majority_settles_it(database_url, rows, team, tmp_path):
    """The model said Tshirts; alice agreed, bob and carol said Shirts: the settled label is Shirts,
    so the audit counts the model wrong and the export writes Shirts, though alice's decision stands."""
    item, decision = decided(database_url, rows, team)
    assert claim(database_url, team["bob"]) == item
    queue.decide(database_url, item, team["bob"], "Shirts")
    assert stage(database_url, item) == ("third", None, None)
    assert claim(database_url, team["alice"]) is None and claim(database_url, team["bob"]) is None
    assert claim(database_url, team["carol"]) == item
    queue.decide(database_url, item, team["carol"], "Shirts")
    assert stage(database_url, item) == ("settled", "majority", "Shirts")
    assert fetch(database_url, "SELECT decision_id FROM review_items") == [(decision,)]
    assert fetch(database_url, "SELECT count(*) FROM review_gold") == [(0,)], "gold needs two reviewers agreeing at once"

    (audit,) = section(database_url, "review_audit")
    assert (audit["audited"], audit["correct"]) == (1, 0), "the settled label, not alice's decision"
    out = tmp_path / "export"
    assert export(database_url, out, since=EPOCH).written == 1
    with open(out / "styles.csv", newline="") as f:
        assert list(csv.reader(f))[1:] == [[str(decision), "Shirts"]]


def test_three_answers_three_ways_settle_without_a_majority(database_url, rows, team, tmp_path):
    audited(rows, 1)
    item = claim(database_url, team["alice"])
    for name, label in (("alice", "Tshirts"), ("bob", "Shirts"), ("carol", None)):
        assert claim(database_url, team[name]) in (item, None)
        queue.decide(database_url, item, team[name], label)
    assert stage(database_url, item) == ("settled", "no majority", None)
    assert queue.no_majority(database_url)[0]["id"] == item
    assert section(database_url, "review_audit") == []
    assert export(database_url, tmp_path / "export", since=EPOCH).skipped == {"no_majority": 1}
    (opinions,) = section(database_url, "review_opinions")
    assert opinions["no_majority"] == 1


def test_a_decision_is_final_once_another_reviewer_gave_an_opinion(database_url, rows, team):
    item, mine = decided(database_url, rows, team)
    queue.decide(database_url, item, team["alice"], "Jeans", replaces=mine)  # before any opinion: a change
    changed = fetch(database_url, "SELECT decision_id FROM review_items")[0][0]
    assert stage(database_url, item)[0] == "second"
    claim(database_url, team["bob"])
    queue.decide(database_url, item, team["bob"], "Shirts")
    with pytest.raises(queue.ReviewError, match="final") as refused:
        queue.decide(database_url, item, team["alice"], "Shirts", replaces=changed)
    assert refused.value.status == 409
    with pytest.raises(queue.ReviewError, match="final"):
        queue.decide(database_url, item, team["bob"], "Jeans")
    assert queue.decide(database_url, item, team["bob"], "Shirts") == fetch(
        database_url, "SELECT id FROM review_opinions")[0][0], "bob's form sent twice: recorded once"
    assert fetch(database_url, "SELECT count(*) FROM review_decisions") == [(2,)]
    assert fetch(database_url, "SELECT count(*) FROM review_opinions") == [(1,)]
    assert [(h["label"], h["current"], h["final"]) for h in queue.history(database_url, team["alice"])] == [
        ("Jeans", True, True), ("Tshirts", False, True)], "My decisions: no change link once an opinion exists"
    assert [(h["item_id"], h["label"], h["final"], h["reason"]) for h in queue.history(database_url, team["bob"])] == [
        (item, "Shirts", True, "audit")]


def test_an_opinion_is_given_only_on_an_item_claimed_for_it(database_url, rows, team):
    """Never from a page seen otherwise: a lead (who sees the decision on a page they do not hold)
    cannot answer it as a blind opinion, even once the holder's lease ran out."""
    item, _ = decided(database_url, rows, team)
    assert claim(database_url, team["bob"]) == item
    with pytest.raises(queue.ReviewError, match="waits for another reviewer's opinion"):
        queue.decide(database_url, item, team["carol"], "Tshirts")
    queue.set_lead(database_url, "dave")
    expire_leases(database_url)
    assert fetch(database_url, "SELECT claimed_by, lease_until < now() FROM review_items") == [(team["bob"], True)]
    assert not queue.view(database_url, item, team["dave"])["blind"], "a lead not holding it sees it whole"
    with pytest.raises(queue.ReviewError, match="waits for another reviewer's opinion"):
        queue.decide(database_url, item, team["dave"], "Tshirts")
    assert fetch(database_url, "SELECT count(*) FROM review_opinions") == [(0,)]
    queue.decide(database_url, item, team["bob"], "Tshirts")  # bob still holds it, lease run out or not
    assert stage(database_url, item)[1] == "agreement"
    audited(rows, 2)
    other = claim(database_url, team["alice"])
    queue.decide(database_url, other, team["alice"], "Tshirts")
    assert claim(database_url, team["dave"]) == other
    assert queue.view(database_url, other, team["dave"])["blind"], "a lead asked for an opinion is blind too"


def test_an_opinion_giver_stays_blind_after_answering_so_undo_teaches_nothing(database_url, rows, team):
    item, _ = decided(database_url, rows, team)
    claim(database_url, team["bob"])
    queue.decide(database_url, item, team["bob"], "Shirts")
    assert queue.view(database_url, item, team["bob"])["blind"], "alice's decision stays hidden from bob"
    assert queue.undo(database_url, team["bob"]) == (item, True)
    assert queue.view(database_url, item, team["bob"])["blind"]


def test_undoing_a_change_of_a_decision_waiting_for_its_opinion_leaves_the_item_to_others(database_url, rows, team):
    item, first = decided(database_url, rows, team)
    queue.decide(database_url, item, team["alice"], "Shirts", replaces=first)
    assert queue.undo(database_url, team["alice"]) == (item, False)
    assert fetch(database_url, "SELECT stage, claimed_by, decision_id FROM review_items") == [("second", None, first)]
    assert claim(database_url, team["alice"]) is None and claim(database_url, team["bob"]) == item


def test_a_page_seen_with_its_answers_is_never_a_gold_item_for_that_reviewer(database_url, rows, team):
    item = agreed(database_url, rows, team)
    rows.add(2)
    assert not queue.view(database_url, item, team["carol"])["blind"], "settled: carol may look"
    assert claim(database_url, team["carol"], draw=ALWAYS) != item, "but then it is no test of her"
    queue.release(database_url, team["carol"])
    assert claim(database_url, team["dave"], draw=ALWAYS) == item


def test_the_share_of_needs_review_items_with_a_second_opinion_is_a_setting(database_url, rows, team):
    got = queue.set_quality(database_url, second_opinion_share=1.0, second_opinion_audit=False)
    assert (got["second_opinion_share"], got["second_opinion_audit"], got["gold_share"]) == (1.0, False, 0.02)
    rows.add(1)  # needs review
    audited(rows, 2)
    for _ in range(2):
        queue.decide(database_url, claim(database_url, team["alice"]), team["alice"], "Tshirts")
    assert fetch(database_url, "SELECT reason, stage FROM review_items ORDER BY id") == [
        ("needs_review", "second"), ("audit", "second")]
    queue.set_quality(database_url, second_opinion_share=0.0)
    rows.add(3)
    queue.decide(database_url, claim(database_url, team["alice"]), team["alice"], "Tshirts")
    assert fetch(database_url, "SELECT stage FROM review_items ORDER BY id DESC LIMIT 1") == [("settled",)], \
        "chosen when first decided: the earlier items keep waiting"
    with pytest.raises(queue.ReviewError, match="second-opinion share"):
        queue.set_quality(database_url, second_opinion_share=1.5)


def test_cohens_kappa_per_pair_of_reviewers(database_url, rows, team):
    """alice T T S S, bob T S S S: observed 3/4, chance 1/2 x 1/4 + 1/2 x 3/4 = 1/2, kappa 0.5. The
    one disagreement goes to carol, who sides with bob: alice-carol 0/1, bob-carol 1/1."""
    queue.set_quality(database_url, second_opinion_share=1.0)
    for seed in range(4):
        rows.add(seed)
    for first, second in (("Tshirts", "Tshirts"), ("Tshirts", "Shirts"), ("Shirts", "Shirts"), ("Shirts", "Shirts")):
        item = claim(database_url, team["alice"])
        queue.decide(database_url, item, team["alice"], first)
        assert claim(database_url, team["bob"]) == item
        queue.decide(database_url, item, team["bob"], second)
    queue.decide(database_url, claim(database_url, team["carol"]), team["carol"], "Shirts")
    kappa = {(r["reviewer_a"], r["reviewer_b"]): r for r in section(database_url, "review_kappa")}
    assert set(kappa) == {("alice", "bob"), ("alice", "carol"), ("bob", "carol")}
    ab = kappa[("alice", "bob")]
    assert (ab["photos"], float(ab["agreement"]), float(ab["kappa"])) == (4, 0.75, 0.5)
    assert (kappa[("alice", "carol")]["photos"], float(kappa[("alice", "carol")]["agreement"])) == (1, 0.0)
    assert kappa[("bob", "carol")]["kappa"] is None, "one photo, one label: chance alone agrees fully"


# -- gold items ---------------------------------------------------------------------------------------

def test_catalogue_photos_become_gold_once_taken_in(database_url, rows, team):
    accepted = rows.add(1, label="Jeans", confidence=0.99, needs_review=False, sha256=sha_with_point(False, 1))
    assert fetch(database_url, "SELECT count(*) FROM review_items") == [(0,)]
    assert queue.add_gold(database_url, accepted["sha256"], "Jeans") == "added"
    assert queue.add_gold(database_url, accepted["sha256"], "Shirts") == "known"
    assert queue.add_gold(database_url, hashlib.sha256(b"never ingested").hexdigest(), "Jeans") == "not recorded"
    assert fetch(database_url, "SELECT reason, stage, settled_how, settled_label FROM review_items") == [
        ("gold", "settled", "catalogue", "Jeans")]
    assert claim(database_url, team["alice"]) is None, "a catalogue photo is in no queue of its own"


def test_a_gold_item_is_shown_like_any_other_and_scored_per_reviewer(database_url, rows, team):
    photo = rows.add(1, label="Jeans", confidence=0.99, needs_review=False, sha256=sha_with_point(False, 1))
    queue.add_gold(database_url, photo["sha256"], "Jeans")
    (gold_item,) = fetch(database_url, "SELECT id FROM review_items")[0]
    rows.add(2)  # an ordinary item, waiting
    assert claim(database_url, team["alice"], draw=0.5) != gold_item, "the die above the 2 % share: no gold"
    queue.release(database_url, team["alice"])

    assert claim(database_url, team["bob"], draw=ALWAYS) == gold_item
    shown = queue.view(database_url, gold_item, team["bob"])
    assert shown["blind"] and shown["reason"] == "audit" and shown["decision_id"] is None
    assert claim(database_url, team["bob"], draw=ALWAYS) == gold_item, "held until answered"
    queue.decide(database_url, gold_item, team["bob"], "Jeans")
    assert claim(database_url, team["bob"], draw=ALWAYS) != gold_item, "shown to each reviewer once"
    queue.release(database_url, team["bob"])
    assert claim(database_url, team["alice"], draw=ALWAYS) == gold_item
    queue.decide(database_url, gold_item, team["alice"], "Shirts")
    assert claim(database_url, team["carol"], draw=ALWAYS) == gold_item
    queue.decide(database_url, gold_item, team["carol"], queue.OTHER_LABEL)

    assert fetch(database_url, "SELECT count(*) FROM review_decisions") == [(0,)], "a gold answer is not a decision"
    assert fetch(database_url, "SELECT stage, settled_label FROM review_items WHERE id = %(i)s",
                 {"i": gold_item}) == [("settled", "Jeans")]
    gold = {r["reviewer"]: r for r in section(database_url, "review_gold")}
    assert {name: (r["gold_answered"], r["correct"]) for name, r in gold.items()} == {
        "alice": (1, 0), "bob": (1, 1), "carol": (1, 0)}
    assert (float(gold["bob"]["ci95_low"]), float(gold["bob"]["ci95_high"])) == pytest.approx(wilson(1, 1), abs=1e-3)
    assert float(gold["alice"]["ci95_high"]) == pytest.approx(wilson(0, 1)[1], abs=1e-3)


def test_an_agreement_makes_gold_for_everyone_but_the_two_who_agreed(database_url, rows, team):
    item = agreed(database_url, rows, team)
    assert claim(database_url, team["carol"], draw=ALWAYS) is None, "never a gold item in an empty queue"
    rows.add(2)  # an item waiting: now a gold item may be shown instead
    for name in ("alice", "bob"):
        assert claim(database_url, team[name], draw=ALWAYS) not in (item, None)
        queue.release(database_url, team[name])
    assert claim(database_url, team["carol"], draw=ALWAYS) == item
    assert queue.view(database_url, item, team["carol"])["blind"], "alice's and bob's answers hidden"
    queue.decide(database_url, item, team["carol"], "Tshirts")
    assert fetch(database_url, "SELECT correct FROM review_gold_answers") == [(True,)]
    assert fetch(database_url, "SELECT count(*) FROM review_decisions") == [(1,)]


def test_a_catalogue_photo_is_not_open_for_a_decision(database_url, rows, team):
    photo = rows.add(1, label="Jeans", confidence=0.99, needs_review=False, sha256=sha_with_point(False, 1))
    queue.add_gold(database_url, photo["sha256"], "Jeans")
    (item,) = fetch(database_url, "SELECT id FROM review_items")[0]
    with pytest.raises(queue.ReviewError, match="known label") as refused:
        queue.decide(database_url, item, team["alice"], "Jeans")
    assert refused.value.status == 409
    assert fetch(database_url, "SELECT count(*) FROM review_decisions") == [(0,)]


def test_logout_forgets_a_gold_item_shown_and_not_answered(database_url, rows, team):
    photo = rows.add(1, label="Jeans", confidence=0.99, needs_review=False, sha256=sha_with_point(False, 1))
    queue.add_gold(database_url, photo["sha256"], "Jeans")
    rows.add(2)
    item = claim(database_url, team["alice"], draw=ALWAYS)
    queue.release(database_url, team["alice"])
    assert fetch(database_url, "SELECT count(*) FROM review_gold_answers") == [(0,)]
    assert claim(database_url, team["alice"], draw=ALWAYS) == item, "shown again later"


# -- undo -------------------------------------------------------------------------------------------------

def test_undo_takes_back_an_opinion_and_a_gold_answer(database_url, rows, team):
    item = agreed(database_url, rows, team)
    assert fetch(database_url, "SELECT count(*) FROM review_gold") == [(1,)]
    with pytest.raises(queue.ReviewError, match="answered on item"):
        queue.undo(database_url, team["alice"])  # bob's opinion is built on her decision
    assert queue.undo(database_url, team["bob"]) == (item, True)
    assert stage(database_url, item) == ("second", None, None)
    assert fetch(database_url, "SELECT count(*) FROM review_opinions UNION ALL SELECT count(*) FROM review_gold") == [(0,), (0,)]
    assert claim(database_url, team["carol"]) is None, "held by bob again"
    assert claim(database_url, team["bob"]) == item
    queue.decide(database_url, item, team["bob"], "Tshirts")

    rows.add(2)
    gold_item = claim(database_url, team["carol"], draw=ALWAYS)
    assert gold_item == item
    queue.decide(database_url, gold_item, team["carol"], "Shirts")
    with pytest.raises(queue.ReviewError, match="answered on item"):
        queue.undo(database_url, team["bob"]), "carol's gold answer is built on the agreement"
    assert queue.undo(database_url, team["carol"]) == (gold_item, True)
    assert fetch(database_url, "SELECT answered_at, correct FROM review_gold_answers") == [(None, None)]
    assert claim(database_url, team["carol"], draw=NEVER) == gold_item, "shown again, to answer"
    queue.decide(database_url, gold_item, team["carol"], "Tshirts")
    assert fetch(database_url, "SELECT correct FROM review_gold_answers") == [(True,)]


# -- the pages ------------------------------------------------------------------------------------------

def test_pages_hide_what_a_blind_reviewer_must_not_see_and_a_lead_sees_the_measures(database_url, rows, team, tmp_path):
    app = create_app(database_url, state=tmp_path / "state")
    item, _ = decided(database_url, rows, team, label="Sandals")  # not among the top-k the page lists

    def page(name: str, path: str):
        client = app.test_client()
        assert post_login(client, name, PASSWORD).status_code == 302
        r = client.get(path)
        return r.status_code, r.get_data(as_text=True)

    status, html = page("alice", f"/items/{item}")
    assert status == 200 and "Sandals by alice" in html
    for name in ("bob", "carol"):  # either may be asked for the second opinion
        status, html = page(name, f"/items/{item}")
        assert status == 200 and "alice" not in html and "Sandals" not in html and "Decided" not in html and "Settled" not in html and 'name="replaces" value=""' in html
    assert page("bob", "/lead")[0] == 403
    queue.set_lead(database_url, "dave")
    status, html = page("dave", f"/items/{item}")
    assert "Sandals by alice" in html, "a lead sees every decision"
    claim(database_url, team["bob"])
    queue.decide(database_url, item, team["bob"], "Sandals")
    status, html = page("dave", f"/items/{item}")
    assert "Sandals (agreement)" in html and "<td>bob</td><td>second opinion</td>" in html
    status, html = page("dave", "/lead")
    assert status == 200
    assert '<table class="report" id="review_kappa">' in html and "<td>alice</td><td>bob</td><td>1</td><td>1.000</td>" in html
    with pytest.raises(queue.ReviewError, match="no reviewer"):
        queue.set_lead(database_url, "nobody")


# -- the upgrade ----------------------------------------------------------------------------------------

def test_items_decided_before_the_upgrade_are_settled_by_one_reviewer(pg_cluster, tmp_path):
    """Migration 008 over a desk in use: a decided item is settled with its decision's label; an
    undecided one waits for its first decision; the desk works on both afterwards."""
    from ingest import db

    name = "upgrade_" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:10]
    admin = psycopg2.connect(pg_cluster.url("postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = pg_cluster.url(name)
    try:
        with db.connect(url) as conn, conn.cursor() as cur:
            for number, _, sql in db.migrations():
                if number < 8:
                    cur.execute(sql)
            cur.execute("""CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                               applied_at timestamptz NOT NULL DEFAULT now())""")
            cur.execute("INSERT INTO schema_migrations (version, name) SELECT n, 'before' FROM generate_series(1, 7) n")
        rows = Rows(url, tmp_path / "processed")
        rows.add(1), rows.add(2)
        with db.connect(url) as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO reviewers (name, password_hash) VALUES ('alice', 'x') RETURNING id")
            alice = cur.fetchone()[0]
            cur.execute("""INSERT INTO review_decisions (item_id, sha256, reviewer_id, outcome, label)
                           SELECT id, sha256, %(r)s, 'category', 'Jeans' FROM review_items ORDER BY id LIMIT 1
                           RETURNING id, item_id""", {"r": alice})
            decision, decided = cur.fetchone()
            cur.execute("UPDATE review_items SET decision_id = %(d)s, decided_at = now() WHERE id = %(i)s",
                        {"d": decision, "i": decided})
        assert [n for n in db.migrate(url)] == [name for number, name, _ in db.migrations() if number >= 8]
        assert fetch(url, "SELECT stage, settled_how, settled_label FROM review_items ORDER BY id") == [
            ("settled", "one reviewer", "Jeans"), ("first", None, None)]
        item = queue.claim(url, alice, draw=NEVER)
        assert item != decided
        queue.decide(url, item, alice, "Shirts")
        assert fetch(url, "SELECT stage FROM review_items ORDER BY id") == [("settled",), ("settled",)]
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# -- export and retention read the settled label ------------------------------------------------------

def test_export_since_counts_from_when_a_label_settled_and_never_writes_a_catalogue_photo(database_url, rows, team, tmp_path):
    item, decision = decided(database_url, rows, team)
    first = export(database_url, tmp_path / "export-1", since=EPOCH)
    assert first.skipped == {"awaiting_opinion": 1}
    since = fetch(database_url, "SELECT now()")[0][0]
    claim(database_url, team["bob"])
    queue.decide(database_url, item, team["bob"], "Tshirts")  # settles after the first export
    later = export(database_url, tmp_path / "export-2", since=since)
    assert later.written == 1, "decided before --since, settled after it: in the next export"

    test_photo = rows.add(2, label="Jeans")  # a test-split photo the inbox took in, which needed review
    assert queue.add_gold(database_url, test_photo["sha256"], "Jeans") == "added"
    queue.decide(database_url, claim(database_url, team["carol"]), team["carol"], "Jeans")
    third = export(database_url, tmp_path / "export-3", since=EPOCH)
    assert third.skipped == {"catalogue_gold": 1} and third.written == 1
    with open(tmp_path / "export-3" / "styles.csv", newline="") as f:
        assert list(csv.reader(f))[1:] == [[str(decision), "Tshirts"]]


def test_retention_keeps_a_photo_until_its_settled_label_is_exported(database_url, rows, team):
    from ingest import prune as prune_mod

    def point(seed: int) -> float:
        from review_support import image_bytes
        return int(hashlib.sha256(image_bytes(seed)).hexdigest()[:8], 16) / 2**32

    seed = next(s for s in range(1, 10000) if point(s) < 0.02)  # a real content in the audit sample
    photo = rows.add(seed, label="Tshirts", confidence=0.99, needs_review=False)
    item = claim(database_url, team["alice"])
    queue.decide(database_url, item, team["alice"], None)  # unusable: alone, never exported
    for name in ("bob", "carol"):
        claim(database_url, team[name])
        queue.decide(database_url, item, team[name], "Tshirts")
    assert stage(database_url, item) == ("settled", "majority", "Tshirts")
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE ingest_files SET moved_at = now() - interval '100 days'")
    conn.close()
    summary = prune_mod.prune(database_url, 90 * 86400.0)
    assert summary.kept_unexported == 1 and photo["path"].exists(), "its settled label is still to export"
