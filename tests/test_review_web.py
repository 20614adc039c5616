"""The review desk's web pages: in-process (Flask's test client) for the rules every page keeps,
and end to end in a real browser (Debian's Chromium driven by Playwright) against
`python -m review serve` and a real PostgreSQL."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from review import queue
from review.app import create_app
from review_support import Rows, csrf_of, fetch, image_bytes, post_login, sha_with_point
from serving.paths import REPO_ROOT
from serving.torchserve import free_port

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "correct horse battery"


@pytest.fixture
def rows(database_url, tmp_path):
    return Rows(database_url, tmp_path / "processed")


@pytest.fixture
def client(database_url, tmp_path):
    app = create_app(database_url, state=tmp_path / "state")
    queue.add_reviewer(database_url, "alice", PASSWORD)
    return app.test_client()


def log_in(client) -> None:
    r = post_login(client, "alice", PASSWORD)
    assert r.status_code == 302 and r.headers["Location"] == "/review"


# -- in process -------------------------------------------------------------------------------------

def test_no_page_without_login(client, rows):
    rows.add(1)
    for path in ("/", "/review", "/queue", "/history", "/items/1", "/items/1/photo"):
        r = client.get(path)
        assert r.status_code == 302 and r.headers["Location"].startswith("/login"), path
    # a POST without a session is refused before anything is recorded (no token: CSRF; and no login)
    assert client.post("/items/1/decide", data={"decision": "Tshirts"}).status_code in (302, 400)
    assert client.post("/logout").status_code in (302, 400)
    r = client.get("/login")
    assert r.status_code == 200 and "Log in" in r.get_data(as_text=True)


def test_login_refuses_a_wrong_password_and_a_foreign_next(client):
    token = csrf_of(client.get("/login").get_data(as_text=True))
    r = client.post("/login", data={"name": "alice", "password": "wrong password", "csrf_token": token})
    assert r.status_code == 401 and "Wrong name or password" in r.get_data(as_text=True)
    assert client.get("/queue").status_code == 302
    r = client.post("/login", data={"name": "alice", "password": PASSWORD, "csrf_token": token,
                                    "next": "//evil.example/x"})
    assert r.headers["Location"] == "/review", "only a path on this site is followed"


def test_a_post_without_the_right_csrf_token_is_refused(client, rows, database_url):
    rows.add(1)
    log_in(client)
    page = client.get("/review").get_data(as_text=True)
    item = re.search(r'action="/items/(\d+)/decide"', page).group(1)
    good = csrf_of(page)
    # One character of the signature changed, far from its last character (whose low bits base64
    # ignores, so a change there can leave the signature the same).
    forged = good[:-5] + ("A" if good[-5] != "A" else "B") + good[-4:]
    for token in (None, "forged-token", forged):
        data = {"decision": "Tshirts", **({"csrf_token": token} if token else {})}
        r = client.post(f"/items/{item}/decide", data=data)
        assert r.status_code == 400 and "security token was refused" in r.get_data(as_text=True)
    assert fetch(database_url, "SELECT count(*) FROM review_decisions") == [(0,)]
    r = client.post(f"/items/{item}/decide", data={"decision": "Tshirts", "csrf_token": good})
    assert r.status_code == 302
    assert fetch(database_url, "SELECT label FROM review_decisions") == [("Tshirts",)]


def test_the_photo_comes_from_the_path_postgresql_recorded(client, rows, database_url, tmp_path):
    png = rows.add(1, data=image_bytes(1, "PNG"), suffix=".png")
    tiff = rows.add(2, data=image_bytes(2, "TIFF"), suffix=".tif")
    log_in(client)
    items = dict(fetch(database_url, "SELECT sha256, id FROM review_items"))
    r = client.get(f"/items/{items[png['sha256']]}/photo")
    assert r.status_code == 200 and r.mimetype == "image/png" and r.data == png["data"]
    r = client.get(f"/items/{items[tiff['sha256']]}/photo")
    assert r.status_code == 200 and r.mimetype == "image/jpeg" and r.data[:3] == b"\xff\xd8\xff", "re-encoded for the browser"
    for path in ("/items/999/photo", "/items/..%2f..%2fetc%2fpasswd/photo", "/items/1/photo?path=/etc/passwd"):
        r = client.get(path)
        assert r.status_code == 404 or (r.status_code == 200 and r.data == png["data"]), path
    assert client.get("/items/999/photo").status_code == 404


def test_a_decision_outside_the_category_list_is_refused(client, rows, database_url):
    rows.add(1)
    log_in(client)
    page = client.get("/review").get_data(as_text=True)
    item = re.search(r'action="/items/(\d+)/decide"', page).group(1)
    r = client.post(f"/items/{item}/decide", data={"decision": ":search", "search_label": "Spaceships",
                                                   "csrf_token": csrf_of(page)})
    assert r.status_code == 400 and "Invalid category" in r.get_data(as_text=True)
    r = client.post(f"/items/{item}/decide", data={"decision": ":search", "search_label": "Jeans",
                                                   "csrf_token": csrf_of(page)})
    assert r.status_code == 302
    assert fetch(database_url, "SELECT outcome, label FROM review_decisions") == [("category", "Jeans")]


def test_the_generated_secret_key_is_kept_0600(database_url, tmp_path, monkeypatch):
    monkeypatch.delenv("REVIEW_SECRET_KEY", raising=False)
    first = create_app(database_url, state=tmp_path / "state").secret_key
    key_file = tmp_path / "state" / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert create_app(database_url, state=tmp_path / "state").secret_key == first, "reused after a restart"
    monkeypatch.setenv("REVIEW_SECRET_KEY", "k" * 40)
    assert create_app(database_url, state=tmp_path / "state").secret_key == b"k" * 40


# -- a real browser ---------------------------------------------------------------------------------

@pytest.fixture
def review_server(database_url, tmp_path):
    """`python -m review serve` on a free port of 127.0.0.1, its state in tmp_path."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "RC_STATE_DIR": str(tmp_path / "state"),
           "PYTHONPATH": str(REPO_ROOT)}
    env.pop("REVIEW_SECRET_KEY", None)
    log = open(tmp_path / "review.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "review", "serve", "--port", str(port),
                             "--model-store", str(tmp_path / "no-model-store")],
                            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                if requests.get(url + "/login", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, (tmp_path / "review.log").read_text()
            assert time.monotonic() < deadline, "the review server did not start: " + (tmp_path / "review.log").read_text()[-2000:]
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium); the browser test needs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def log_in_page(browser, base: str, name: str, *, bypass_csp: bool = False):
    """A new browser context's page, logged in as `name` through the login form."""
    page = browser.new_context(bypass_csp=bypass_csp).new_page()
    page.goto(base + "/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    with page.expect_navigation():
        page.click("button[type=submit]")
    return page


def test_review_in_a_real_browser(browser, review_server, rows, database_url):
    labels = ["Tshirts", "Jeans", "Watches", "Sandals"]
    added = [rows.add(seed, label=label) for seed, label in enumerate(labels)]
    queue.add_reviewer(database_url, "alice", PASSWORD)
    page = browser.new_page()

    # a page without login: redirected to the login page
    page.goto(review_server + "/queue")
    assert "/login" in page.url and page.locator("h1").inner_text() == "Log in"
    page.fill("input[name=name]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    assert page.url.endswith("/queue"), "back to the page asked for"
    assert page.locator("#total").inner_text() == "4"

    def current_item() -> int:
        page.goto(review_server + "/review")
        return int(page.locator("#item").get_attribute("data-item"))

    def ids() -> dict[str, int]:
        return dict(fetch(database_url, "SELECT sha256, id FROM review_items"))

    # 1: by key "1" (the model's first answer)
    first = current_item()
    assert first == ids()[added[0]["sha256"]], "the oldest first"
    assert page.locator("img#photo").evaluate("img => img.complete && img.naturalWidth") == 64
    assert page.locator("ol.topk li").count() == 5
    with page.expect_navigation():
        page.keyboard.press("1")
    # 2: by key "2" (the second answer)
    second = int(page.locator("#item").get_attribute("data-item"))
    assert second == ids()[added[1]["sha256"]]
    with page.expect_navigation():
        page.keyboard.press("2")
    # 3: by click, "not a refund category"
    third = int(page.locator("#item").get_attribute("data-item"))
    with page.expect_navigation():
        page.click("button[value=':other']")
    decided = fetch(database_url, "SELECT item_id, outcome, label, previous_label FROM review_decisions ORDER BY id")
    # key 2 on a "Jeans" answer: its second answer, "Tshirts" (review_support.Rows writes the top-5)
    assert decided == [(first, "category", "Tshirts", "Tshirts"), (second, "category", "Tshirts", "Jeans"),
                       (third, "other", "other", "Watches")]

    # the queue shrank to one
    page.goto(review_server + "/queue")
    assert page.locator("#total").inner_text() == "1"
    page.goto(review_server + "/history")
    assert page.locator("table.history tbody tr").count() == 3

    # a POST with a wrong CSRF token: refused, nothing recorded
    page.goto(review_server + "/review")
    page.locator("input[name=csrf_token]").first.evaluate("e => { for (const i of document.querySelectorAll('input[name=csrf_token]')) i.value = 'forged' }")
    page.click("button[value=':unusable']")
    assert page.locator("#error").is_visible() and "security token was refused" in page.locator("#error").inner_text()
    assert len(fetch(database_url, "SELECT id FROM review_decisions")) == 3

    # the search field decides a category that is not among the top-5
    page.goto(review_server + "/review")
    page.keyboard.press("/")
    assert "Heels" not in page.locator("ol.topk").inner_text()
    page.keyboard.type("Heels")
    with page.expect_navigation():
        page.keyboard.press("Enter")  # the typed category, not the form's first button
    assert page.locator("#empty").is_visible()
    assert fetch(database_url, "SELECT label FROM review_decisions ORDER BY id DESC LIMIT 1") == [("Heels",)]
    page.goto(review_server + "/queue")
    assert page.locator("#total").inner_text() == "0"

    # logged out: redirected again
    page.click("#logout")
    page.goto(review_server + "/review")
    assert "/login" in page.url


def test_a_team_in_a_real_browser(browser, review_server, rows, database_url):
    """Throttled login, a revoked session, a lost update, a double submit and undo by key, each in
    Chromium against `python -m review serve` (waitress) and PostgreSQL."""
    for seed, label in enumerate(["Tshirts", "Jeans", "Watches"]):
        rows.add(seed, label=label)
    for name in ("alice", "bob", "carol"):
        queue.add_reviewer(database_url, name, PASSWORD)

    def logged_in(name: str):
        # bypass_csp: the page's own policy (connect-src 'none') would refuse the test's fetch() of a form, below
        return log_in_page(browser, review_server, name, bypass_csp=True)

    def decisions() -> list[tuple]:
        return fetch(database_url, "SELECT item_id, label FROM review_decisions ORDER BY id")

    # a name hammered with wrong passwords: 429, and the right password is not even checked meanwhile
    page = browser.new_context().new_page()
    statuses = []
    for password in ["wrong password"] * 5 + [PASSWORD]:
        page.goto(review_server + "/login")
        page.fill("input[name=name]", "carol")
        page.fill("input[name=password]", password)
        with page.expect_navigation() as nav:
            page.click("button[type=submit]")
        statuses.append(nav.value.status)
    assert statuses == [401] * 5 + [429]
    assert "Too many attempts" in page.locator("p.error").inner_text()

    # a session revoked while open: the next page asks for a login
    bob = logged_in("bob")
    bob.goto(review_server + "/queue")
    assert bob.url.endswith("/queue")
    subprocess.run([sys.executable, "-m", "review", "deactivate", "bob"], check=True, cwd=REPO_ROOT,
                   env={**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True)
    bob.goto(review_server + "/queue")
    assert "/login" in bob.url and "Your session has ended" in bob.locator("p.flash").inner_text()

    # undo by key: alice decides with "1", then "z" shows the same item again and nothing is recorded
    alice = logged_in("alice")
    alice.goto(review_server + "/review")
    first = int(alice.locator("#item").get_attribute("data-item"))
    with alice.expect_navigation():
        alice.keyboard.press("1")
    assert decisions() == [(first, "Tshirts")]
    with alice.expect_navigation():
        alice.keyboard.press("z")
    assert int(alice.locator("#item").get_attribute("data-item")) == first
    assert "taken back" in alice.locator("p.flash").inner_text()
    assert decisions() == []

    # a lost update: dave (another tab: the same item, undecided) decides after alice did
    queue.add_reviewer(database_url, "dave", PASSWORD)
    dave = logged_in("dave")
    dave.goto(review_server + f"/items/{first}")
    with alice.expect_navigation():
        alice.keyboard.press("1")
    with dave.expect_navigation() as nav:
        dave.keyboard.press("2")
    assert nav.value.status == 409
    assert "decided meanwhile" in dave.locator("h1").inner_text()
    assert "alice" in dave.locator("#conflict").inner_text()
    assert decisions() == [(first, "Tshirts")]

    # the same form posted twice at once (what the page's script prevents, sent by hand): one decision
    alice.goto(review_server + "/review")
    second = int(alice.locator("#item").get_attribute("data-item"))
    statuses = alice.evaluate("""async () => {
        const form = document.getElementById('decide');
        const data = () => { const d = new FormData(form); d.set('decision', ':other'); return d; };
        const sent = await Promise.all([fetch(form.action, {method: 'POST', body: data(), redirect: 'manual'}),
                                        fetch(form.action, {method: 'POST', body: data(), redirect: 'manual'})]);
        return sent.map(r => r.type === 'opaqueredirect' ? 302 : r.status);
    }""")
    assert statuses == [302, 302]
    assert decisions() == [(first, "Tshirts"), (second, "other")]


def test_second_opinions_and_gold_items_in_a_real_browser(browser, review_server, rows, database_url):
    """In Chromium: an audit decision goes to a second reviewer who is not shown it, their agreement
    is reported on the lead's page; a gold photo is shown like any other item and each answer scored."""
    audit = rows.add(1, label="Tshirts", confidence=0.99, needs_review=False, sha256=sha_with_point(True, 1))
    gold = rows.add(2, label="Jeans", confidence=0.99, needs_review=False, sha256=sha_with_point(False, 2))
    assert queue.add_gold(database_url, gold["sha256"], "Jeans") == "added"
    for seed in (3, 4):  # needs review, received later: a gold item is shown instead of one of these
        rows.add(seed, label="Watches")
    for name in ("alice", "bob", "lena"):
        queue.add_reviewer(database_url, name, PASSWORD)
    queue.set_lead(database_url, "lena")
    queue.set_quality(database_url, gold_share=0.0)
    (audit_item,), (gold_item,) = fetch(database_url, "SELECT id FROM review_items WHERE reason <> 'needs_review' ORDER BY reason")

    def logged_in(name: str):
        return log_in_page(browser, review_server, name)

    def decide(page, key: str) -> None:
        with page.expect_navigation():
            page.keyboard.press(key)

    alice = logged_in("alice")
    assert int(alice.locator("#item").get_attribute("data-item")) == audit_item
    decide(alice, "1")  # Tshirts, the model's answer
    assert int(alice.locator("#item").get_attribute("data-item")) != audit_item, "she does not give the second opinion"

    bob = logged_in("bob")
    assert int(bob.locator("#item").get_attribute("data-item")) == audit_item, "the oldest item waiting for bob"
    body = bob.locator("body").inner_text()
    assert "alice" not in body and "Decided" not in body and bob.locator("table.decisions").count() == 0, \
        "the first decision is hidden"
    assert bob.locator("#decide input[name=replaces]").get_attribute("value") == ""
    decide(bob, "1")
    assert fetch(database_url, "SELECT stage, settled_how FROM review_items WHERE id = %(i)s",
                 {"i": audit_item}) == [("settled", "agreement")]

    queue.set_quality(database_url, gold_share=1.0)  # every new claim a gold item where one is left
    for (reviewer,) in fetch(database_url, "SELECT id FROM reviewers"):
        queue.release(database_url, reviewer)  # the items alice and bob hold since their last decision
    alice.goto(review_server + "/review")
    assert int(alice.locator("#item").get_attribute("data-item")) == gold_item
    assert alice.locator("#decide").count() == 1 and "Decided" not in alice.locator("body").inner_text()
    decide(alice, "1")  # Jeans: right
    bob.goto(review_server + "/review")
    assert int(bob.locator("#item").get_attribute("data-item")) == gold_item
    decide(bob, "n")  # not a refund category: wrong
    assert fetch(database_url, """SELECT r.name, a.correct FROM review_gold_answers a JOIN reviewers r ON r.id = a.reviewer_id
                                  ORDER BY r.name""") == [("alice", True), ("bob", False)]

    assert bob.locator("nav a[href='/lead']").count() == 0
    lena = logged_in("lena")
    lena.click("nav a[href='/lead']")
    gold_rows = lena.locator("#review_gold tbody tr").all_inner_texts()
    assert [r.split("\t")[:3] for r in gold_rows] == [["alice", "1", "1"], ["bob", "1", "0"]]
    assert lena.locator("#review_kappa tbody tr").inner_text().split("\t")[:4] == ["alice", "bob", "1", "1.000"]
    assert lena.locator("#review_opinions tbody tr").inner_text().split("\t")[:4] == ["1", "0", "0", "1"]
