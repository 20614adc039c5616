"""The review desk for a team: sessions PostgreSQL can end, login throttling, no lost update, and
failures said plainly. Against a real PostgreSQL (the queue, and the pages through Flask's test
client); the same in a real browser is in test_review_web.py."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time

import psycopg2
import pytest

from review import queue
from review.app import create_app
from review.throttle import FailureWindow, LoginThrottle
from review_support import Rows, csrf_of, fetch, post_login
from serving.paths import REPO_ROOT
from serving.torchserve import free_port

PASSWORD = "correct horse battery"


def execute(url: str, sql: str) -> None:
    """One statement, committed."""
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- throttling, by itself ---------------------------------------------------------------------------

def test_a_key_is_refused_after_its_limit_until_the_oldest_failure_leaves_the_window():
    clock = Clock()
    window = FailureWindow(3, 60, clock=clock)
    for _ in range(2):
        window.fail("alice")
        clock.now += 10
    assert window.retry_after("alice") == 0
    window.fail("alice")  # third failure at t=1020; the first was at 1000
    assert window.retry_after("alice") == pytest.approx(40)
    assert window.retry_after("bob") == 0, "one name's failures are its own"
    clock.now += 40.5
    assert window.retry_after("alice") == 0


def test_remembered_keys_are_bounded():
    window = FailureWindow(1, 60, clock=Clock(), max_keys=100)
    for n in range(1000):
        window.fail(f"name-{n}")
    assert len(window._failures) == 100 and window.retry_after("name-999") > 0


def test_password_checks_at_once_are_bounded():
    throttle = LoginThrottle(checks_at_once=2, check_wait_s=0.05)
    assert throttle.check_slot() and throttle.check_slot()
    assert not throttle.check_slot(), "a third waits, then is refused"
    throttle.release_slot()
    assert throttle.check_slot()


def test_names_are_counted_without_case_and_addresses_apart():
    clock = Clock()
    throttle = LoginThrottle(name_limit=2, address_limit=3, window_s=60, clock=clock)
    throttle.failed("Alice", "10.0.0.1")
    throttle.failed("alice", "10.0.0.2")
    assert throttle.refusal("ALICE", "10.0.0.3").reason == "too many failed logins for this name"
    throttle.failed("bob", "10.0.0.1")
    throttle.failed("carol", "10.0.0.1")
    assert throttle.refusal("dave", "10.0.0.1").reason == "too many failed logins from this address"
    assert throttle.refusal("dave", "10.0.0.9") is None
    throttle.succeeded("alice")
    assert throttle.refusal("alice", "10.0.0.9") is None


@pytest.mark.parametrize("name, value, said", [("REVIEW_THREADS", "abc", "'abc' is not a whole number"),
                                               ("REVIEW_CONNECTION_LIMIT", "0", "0 is less than 1"),
                                               ("REVIEW_PORT", "70000", "70000 is not between 0 and 65535"),
                                               ("REVIEW_ORDER", "newest", "expected one of oldest, uncertain")])
def test_a_bad_server_setting_stops_the_desk_naming_it(monkeypatch, name, value, said):
    from review.__main__ import get_args_parser

    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        get_args_parser()
    assert str(stopped.value) == f"python -m review: {name}={value!r}: {said}" or said in str(stopped.value)
    assert name in str(stopped.value)


# -- sessions and accounts, against PostgreSQL ------------------------------------------------------------

@pytest.fixture
def rows(database_url, tmp_path):
    return Rows(database_url, tmp_path / "processed")


@pytest.fixture
def alice(database_url) -> int:
    return queue.add_reviewer(database_url, "alice", PASSWORD)[0]


@pytest.fixture
def bob(database_url) -> int:
    return queue.add_reviewer(database_url, "bob", PASSWORD)[0]


def test_a_session_ends_at_logout_at_deactivation_and_at_a_new_password(database_url, alice):
    token = queue.start_session(database_url, alice)
    assert queue.session_reviewer(database_url, token) == queue.Reviewer(alice, "alice")
    queue.end_session(database_url, token)
    assert queue.session_reviewer(database_url, token) is None, "logged out"

    token = queue.start_session(database_url, alice)
    queue.add_reviewer(database_url, "alice", "a new password", replace=True)
    assert queue.session_reviewer(database_url, token) is None, "a new password ends every session"

    token = queue.start_session(database_url, alice)
    other = queue.start_session(database_url, alice)
    assert queue.deactivate(database_url, "alice") == (2, 0)
    assert queue.session_reviewer(database_url, token) is None and queue.session_reviewer(database_url, other) is None
    assert queue.authenticate(database_url, "alice", "a new password") is None, "no login while deactivated"
    assert queue.start_session(database_url, alice) is None
    queue.add_reviewer(database_url, "alice", "yet another one", replace=True)
    assert queue.authenticate(database_url, "alice", "yet another one") is not None, "reactivated with a new password"


def test_a_session_expires_twelve_hours_after_login_however_it_is_used(database_url, alice):
    token = queue.start_session(database_url, alice)
    execute(database_url, "UPDATE review_sessions SET created_at = now() - interval '12 hours', "
                          "expires_at = now() - interval '1 second'")
    assert queue.session_reviewer(database_url, token) is None


def test_deactivation_gives_back_the_items_held(database_url, rows, alice, bob):
    rows.add(1)
    held = queue.claim(database_url, alice)
    assert queue.claim(database_url, bob) is None, "alice holds the only item"
    assert queue.deactivate(database_url, "alice") == (0, 1)
    assert queue.claim(database_url, bob) == held
    with pytest.raises(queue.ReviewError, match="no reviewer 'nobody'"):
        queue.deactivate(database_url, "nobody")


def test_the_reviewers_list(database_url, rows, alice, bob):
    rows.add(1)
    queue.start_session(database_url, alice)
    queue.decide(database_url, queue.claim(database_url, alice), alice, "Shirts")
    queue.deactivate(database_url, "bob")
    got = {r["name"]: r for r in queue.reviewers(database_url)}
    assert (got["alice"]["active"], got["alice"]["decisions"], got["alice"]["sessions"]) == (True, 1, 1)
    assert got["alice"]["last_login_at"] is not None and got["alice"]["last_decision_at"] is not None
    assert (got["bob"]["active"], got["bob"]["decisions"], got["bob"]["last_login_at"]) == (False, 0, None)
    assert got["bob"]["deactivated_at"] is not None


# -- decisions: no lost update, a double submit once ---------------------------------------------------------

def test_a_decision_on_an_item_decided_meanwhile_is_refused_and_nothing_recorded(database_url, rows, alice, bob):
    rows.add(1, label="Tshirts")
    item = queue.claim(database_url, alice)
    mine = queue.decide(database_url, item, alice, "Shirts")
    with pytest.raises(queue.LostUpdate) as refused:  # bob saw the item undecided
        queue.decide(database_url, item, bob, "Jeans", replaces=None)
    assert refused.value.status == 409
    assert (refused.value.theirs["decided_by"], refused.value.theirs["decided_label"], refused.value.yours) == ("alice", "Shirts", "Jeans")
    assert fetch(database_url, "SELECT id, label FROM review_decisions") == [(mine, "Shirts")]

    changed = queue.decide(database_url, item, bob, "Jeans", replaces=mine)  # bob saw alice's decision: a change
    with pytest.raises(queue.LostUpdate):  # alice changes from what she saw, which is no longer current
        queue.decide(database_url, item, alice, "Watches", replaces=mine)
    assert fetch(database_url, "SELECT decision_id FROM review_items") == [(changed,)]
    assert len(fetch(database_url, "SELECT id FROM review_decisions")) == 2


def test_a_form_sent_twice_records_one_decision(database_url, rows, alice):
    rows.add(1, label="Tshirts")
    item = queue.claim(database_url, alice)
    first = queue.decide(database_url, item, alice, "Shirts")
    assert queue.decide(database_url, item, alice, "Shirts") == first
    change = queue.decide(database_url, item, alice, "Jeans", replaces=first)
    assert queue.decide(database_url, item, alice, "Jeans", replaces=first) == change
    got = fetch(database_url, "SELECT label, supersedes FROM review_decisions ORDER BY id")
    assert got == [("Shirts", None), ("Jeans", first)], "one decision and one change, no change of a change"


def test_two_posts_of_one_form_at_once_record_one_decision(database_url, rows, alice):
    rows.add(1, label="Tshirts")
    item = queue.claim(database_url, alice)
    results, barrier = [], threading.Barrier(2)

    def send():
        barrier.wait()
        results.append(queue.decide(database_url, item, alice, "Shirts"))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(fetch(database_url, "SELECT id FROM review_decisions")) == 1


# -- undo, and the order of the queue ------------------------------------------------------------------------

def test_undo_takes_back_the_last_decision_and_holds_its_item_again(database_url, rows, alice, bob):
    rows.add(1)
    rows.add(2)
    first = queue.claim(database_url, alice)
    queue.decide(database_url, first, alice, "Shirts")
    second = queue.claim(database_url, alice)  # the next item follows at once
    assert queue.undo(database_url, alice) == (first, True)  # it waits for alice again
    assert fetch(database_url, "SELECT count(*) FROM review_decisions") == [(0,)]
    assert queue.claim(database_url, alice) == first, "shown again, held by alice"
    assert queue.claim(database_url, bob) == second, "the item alice held meanwhile went back to the queue"
    with pytest.raises(queue.ReviewError, match="made no decision"):
        queue.undo(database_url, alice)


def test_undoing_a_change_restores_the_decision_it_replaced(database_url, rows, alice):
    rows.add(1)
    item = queue.claim(database_url, alice)
    first = queue.decide(database_url, item, alice, "Shirts")
    queue.decide(database_url, item, alice, "Jeans", replaces=first)
    assert queue.undo(database_url, alice) == (item, False)  # decided again: waits for nobody
    assert fetch(database_url, "SELECT decision_id, claimed_by FROM review_items") == [(first, None)]
    assert fetch(database_url, "SELECT label FROM review_decisions") == [("Shirts",)]


def test_nothing_to_undo_once_too_old_changed_by_another_or_exported(database_url, rows, alice, bob):
    rows.add(1)
    item = queue.claim(database_url, alice)
    mine = queue.decide(database_url, item, alice, "Shirts")
    execute(database_url, "UPDATE review_decisions SET decided_at = now() - interval '1 hour'")
    with pytest.raises(queue.ReviewError, match="older than 2 min"):
        queue.undo(database_url, alice)
    execute(database_url, "UPDATE review_decisions SET decided_at = now(), exported_at = now()")
    with pytest.raises(queue.ReviewError, match="exported already"):
        queue.undo(database_url, alice)
    queue.decide(database_url, item, bob, "Jeans", replaces=mine)
    with pytest.raises(queue.ReviewError, match="was changed since"):
        queue.undo(database_url, alice)
    assert len(fetch(database_url, "SELECT id FROM review_decisions")) == 2


def test_the_queue_can_serve_the_least_confident_answer_first(database_url, rows, alice):
    sure, unsure, middling = rows.add(1, confidence=0.7), rows.add(2, confidence=0.3), rows.add(3, confidence=0.5)
    ids = dict(fetch(database_url, "SELECT sha256, id FROM review_items"))
    served = []
    for _ in range(3):
        served.append(queue.claim(database_url, alice, order="uncertain"))
        queue.decide(database_url, served[-1], alice, "Shirts")
    assert served == [ids[unsure["sha256"]], ids[middling["sha256"]], ids[sure["sha256"]]]
    older, surer = rows.add(4, confidence=0.2), rows.add(5, confidence=0.1)
    ids = dict(fetch(database_url, "SELECT sha256, id FROM review_items"))
    assert queue.claim(database_url, alice) == ids[older["sha256"]], "the default: the oldest first"
    with pytest.raises(queue.ReviewError, match="Invalid order"):
        queue.claim(database_url, alice, order="newest")
    del surer


# -- the pages ------------------------------------------------------------------------------------------------

def log_in(client, name: str = "alice", password: str = PASSWORD, address: str = "127.0.0.1"):
    return post_login(client, name, password, address)


@pytest.fixture
def app(database_url, tmp_path):
    return create_app(database_url, state=tmp_path / "state",
                      throttle=LoginThrottle(name_limit=3, address_limit=5, window_s=600))


def test_logins_are_throttled_per_name_and_per_address_with_429_and_retry_after(app, alice, bob, caplog):
    client = app.test_client()
    caplog.set_level(logging.WARNING, logger="review")
    for _ in range(3):
        assert log_in(client, password="wrong password").status_code == 401
    r = log_in(client)  # the right password, but the name is throttled now: not even checked
    assert r.status_code == 429 and 0 < int(r.headers["Retry-After"]) <= 600
    assert "Too many attempts" in r.get_data(as_text=True)
    assert log_in(client, "alice", address="10.1.1.1").status_code == 429, "the name, from any address"
    assert log_in(client, "bob", address="127.0.0.1").status_code == 302, "another name from the same address"
    for _ in range(2):
        assert log_in(app.test_client(), "carol", "wrong password", address="127.0.0.1").status_code == 401
    assert log_in(app.test_client(), "bob", address="127.0.0.1").status_code == 429, "the address is throttled"
    assert log_in(app.test_client(), "bob", address="10.2.2.2").status_code == 302
    refused = [r.getMessage() for r in caplog.records if "login refused" in r.getMessage()]
    assert any("'alice' from 127.0.0.1: wrong name or password" in m for m in refused)
    assert any("too many failed logins for this name" in m for m in refused)


def test_a_session_cookie_is_worth_nothing_after_logout_deactivation_or_a_new_password(app, database_url, rows, alice):
    rows.add(1)
    client = app.test_client()
    assert log_in(client).status_code == 302
    page = client.get("/review")
    assert page.status_code == 200
    cookie = client.get_cookie("review_session").value
    client.post("/logout", data={"csrf_token": csrf_of(page.get_data(as_text=True))})

    stolen = app.test_client()
    stolen.set_cookie("review_session", cookie)
    r = stolen.get("/review")
    assert r.status_code == 302 and r.headers["Location"].startswith("/login"), "the logged-out cookie, replayed"

    def ended(client) -> bool:
        r = client.get("/queue")
        return (r.status_code == 302 and r.headers["Location"].startswith("/login")
                and "Your session has ended" in client.get("/login").get_data(as_text=True))

    client = app.test_client()
    assert log_in(client).status_code == 302 and client.get("/queue").status_code == 200
    queue.deactivate(database_url, "alice")
    assert ended(client), "deactivated"
    assert log_in(app.test_client()).status_code == 401

    queue.add_reviewer(database_url, "alice", "second password", replace=True)  # reactivated
    client = app.test_client()
    assert log_in(client, password="second password").status_code == 302 and client.get("/queue").status_code == 200
    queue.add_reviewer(database_url, "alice", "third password", replace=True)
    assert ended(client), "a new password"


def test_the_session_cookie_is_not_renewed_by_use(app, alice):
    client = app.test_client()
    log_in(client)
    client.get("/queue")  # the first page after login stores its form token in the session
    for _ in range(2):
        r = client.get("/queue")
        assert r.status_code == 200 and "review_session" not in r.headers.get("Set-Cookie", "")


def test_a_lost_update_is_refused_with_409_showing_both_decisions(app, database_url, rows, alice, bob):
    rows.add(1, label="Tshirts")
    a, b = app.test_client(), app.test_client()
    log_in(a)
    log_in(b, "bob")
    page_a = a.get("/review").get_data(as_text=True)
    item = int(re.search(r'data-item="(\d+)"', page_a).group(1))
    page_b = b.get(f"/items/{item}").get_data(as_text=True)  # bob opens the same item, undecided
    assert 'name="replaces" value=""' in page_b
    assert a.post(f"/items/{item}/decide", data={"decision": "Shirts", "replaces": "",
                                                 "csrf_token": csrf_of(page_a)}).status_code == 302
    r = b.post(f"/items/{item}/decide", data={"decision": "Jeans", "replaces": "", "csrf_token": csrf_of(page_b)})
    assert r.status_code == 409
    text = r.get_data(as_text=True)
    assert "alice" in text and "&#39;Shirts&#39;" in text and "&#39;Jeans&#39;" in text and "not recorded" in text
    assert fetch(database_url, "SELECT label FROM review_decisions") == [("Shirts",)]
    # the same form twice (a double click that got past the page's script): one decision
    page_b = b.get(f"/items/{item}").get_data(as_text=True)
    current = re.search(r'name="replaces" value="(\d+)"', page_b).group(1)
    for _ in range(2):
        r = b.post(f"/items/{item}/decide", data={"decision": "Jeans", "replaces": current, "csrf_token": csrf_of(page_b)})
        assert r.status_code == 302
    assert fetch(database_url, "SELECT label FROM review_decisions ORDER BY id") == [("Shirts",), ("Jeans",)]


def test_a_database_outage_says_the_decision_was_not_recorded(app, database_url, rows, alice):
    rows.add(1, label="Tshirts")
    client = app.test_client()
    log_in(client)
    page = client.get("/review").get_data(as_text=True)
    item = int(re.search(r'data-item="(\d+)"', page).group(1))
    name = psycopg2.extensions.parse_dsn(database_url)["dbname"]
    admin = database_url.rsplit("/", 1)[0] + "/postgres"
    outage = f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {{}}'
    conn = psycopg2.connect(admin)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(outage.format("false"))
        r = client.post(f"/items/{item}/decide", data={"decision": "Shirts", "replaces": "", "csrf_token": csrf_of(page)})
        assert r.status_code == 503
        text = r.get_data(as_text=True)
        assert "cannot reach its database" in text and "Your decision was not recorded" in text
        assert client.get("/queue").status_code == 503
    finally:
        with conn.cursor() as cur:
            cur.execute(outage.format("true"))
        conn.close()
    assert fetch(database_url, "SELECT count(*) FROM review_decisions") == [(0,)]


# -- the server ------------------------------------------------------------------------------------------------

def start_serve(database_url, tmp_path, *flags):
    env = {**os.environ, "DATABASE_URL": database_url, "RC_STATE_DIR": str(tmp_path / "state"), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "review", "serve", "--port", str(free_port()), *flags],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def first_lines(proc, until: str, timeout_s: float = 60) -> str:
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if until in line:
            break
    proc.terminate()
    proc.wait(timeout=30)
    proc.stdout.close()
    return "".join(seen)


def test_a_bind_beyond_loopback_without_secure_cookies_warns_at_start(database_url, tmp_path):
    out = first_lines(start_serve(database_url, tmp_path, "--host", "0.0.0.0"), "serving on")
    assert "WARNING: listening on 0.0.0.0, beyond this machine, without --secure-cookies" in out
    assert "with waitress" in out
    for flags in (("--host", "127.0.0.1"), ("--host", "0.0.0.0", "--secure-cookies")):
        out = first_lines(start_serve(database_url, tmp_path, *flags), "serving on")
        assert "serving on" in out and "WARNING" not in out, flags
