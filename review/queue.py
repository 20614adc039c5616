"""The review queue in PostgreSQL: reviewers, claims with a lease, decisions. No Flask here.

Items are queued by the database itself (ingest/sql/004_review.sql: a trigger on predictions),
one per photo content (sha256), so a decision covers every prediction row of that content.
A reviewer claims the oldest open item for `lease_s` seconds; an item nobody decides before its
lease runs out goes back to the queue for the next claimer. A decision on a decided item is a
change: a new row that names the one it supersedes, so the history stays.

Quality is measured two ways (migration 008). A share of decided items (audit items by default)
waits for a second opinion from another reviewer, who is shown the item as if undecided; if the two
differ, a third reviewer's opinion settles it by majority. And a share of what a reviewer is shown
(gold_share) is gold: a settled photo of known label (a catalogue's, or one two reviewers agreed
on blind) they have not seen, shown like any other item, their answer scored. Where an item stands
is computed in PostgreSQL (review_settle) after every decision, opinion and undo.
"""
from __future__ import annotations

import hashlib
import os
import random
import secrets
from dataclasses import dataclass
from pathlib import Path

import psycopg2.errors
from werkzeug.security import check_password_hash, generate_password_hash

from ingest import db

# The label of "not a refund category" (serving.archive.OTHER_LABEL; the model's `other` output).
from serving.archive import OTHER_LABEL

DEFAULT_LEASE_S = 600
UNDO_WINDOW_S = 120  # how long after a decision its reviewer can take it back (key z)
ORDERS = ("oldest", "uncertain")  # which open item a reviewer gets next
OUTCOMES = ("category", "other", "unusable")
# werkzeug's scrypt (n=2**15, r=8, p=1), salted: a standard KDF.
PASSWORD_METHOD = "scrypt"


class ReviewError(RuntimeError):
    """A request the queue refuses; `status` is the HTTP status the web page answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class LostUpdate(ReviewError):
    """The item's decision changed since the form was shown: another reviewer's is kept, yours is not recorded."""

    def __init__(self, item_id: int, yours: str | None, theirs: dict):
        who = theirs["decided_by"]
        super().__init__(f"item {item_id} was decided by {who} as {describe(theirs['decided_label'])} while you "
                         f"were looking at it; your decision ({describe(yours)}) was not recorded", 409)
        self.item_id, self.yours, self.theirs = item_id, yours, theirs


def load_query(name: str) -> str:
    return db.load_query(name, package="review.sql")


def _one(cur, name: str, params: dict):
    cur.execute(load_query(name), params)
    return cur.fetchone()


def _dicts(cur) -> list[dict]:
    cols = [d.name for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


# -- reviewers -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reviewer:
    id: int
    name: str
    lead: bool = False  # sees the reviewers' measures (/lead) and every item's decisions


def add_reviewer(url: str, name: str, password: str, *, replace: bool = False) -> tuple[int, bool]:
    """(id, created). An existing name keeps its password unless `replace`."""
    if len(password) < 8:
        raise ReviewError("a password needs at least 8 characters")
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._@-" for c in name) or not name.isascii():
        raise ReviewError(f"Invalid reviewer name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-'")
    with db.connect(url) as conn, conn.cursor() as cur:
        row = _one(cur, "add_reviewer", {"name": name, "password_hash": generate_password_hash(password, PASSWORD_METHOD),
                                         "replace": replace})
    if row is None:
        raise ReviewError(f"reviewer {name!r} exists already; --replace sets a new password")
    return row[0], row[1]


def authenticate(url: str, name: str, password: str) -> Reviewer | None:
    with db.connect(url) as conn, conn.cursor() as cur:
        row = _one(cur, "reviewer_by_name", {"name": name})
    if row is None:
        # Spend the same time as a real check, so a wrong name is not told apart from a wrong password.
        check_password_hash(_DUMMY_HASH, password)
        return None
    rid, rname, pw_hash, active = row
    if not check_password_hash(pw_hash, password) or not active:
        return None
    return Reviewer(rid, rname)


_DUMMY_HASH = generate_password_hash(os.urandom(16).hex(), PASSWORD_METHOD)


# -- sessions --------------------------------------------------------------------------------------

SESSION_LIFETIME_S = 12 * 3600  # from login; not renewed by use


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def start_session(url: str, reviewer_id: int, *, address: str | None = None,
                  lifetime_s: int = SESSION_LIFETIME_S) -> str | None:
    """A new session for a reviewer just authenticated: the token for the cookie (PostgreSQL keeps
    its sha256 alone). None: the account was deactivated in the meantime."""
    token = secrets.token_urlsafe(32)
    with db.connect(url) as conn, conn.cursor() as cur:
        row = _one(cur, "session_start", {"reviewer_id": reviewer_id, "token_sha256": _token_hash(token),
                                          "address": address, "lifetime_s": lifetime_s})
    return token if row else None


def session_reviewer(url: str, token: str) -> Reviewer | None:
    """The reviewer of a valid session: not ended, not expired, the account active, its password unchanged."""
    with db.connect(url) as conn, conn.cursor() as cur:
        row = _one(cur, "session_reviewer", {"token_sha256": _token_hash(token)})
    return Reviewer(*row) if row else None


def end_session(url: str, token: str) -> None:
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("session_end"), {"token_sha256": _token_hash(token)})


def deactivate(url: str, name: str) -> tuple[int, int]:
    """Shut an account: no more logins, its sessions end now, its held items go back to the queue.
    Returns (sessions ended, items given back)."""
    with db.connect(url) as conn, conn.cursor() as cur:
        found, ended, released = _one(cur, "deactivate_reviewer", {"name": name})
    if not found:
        raise ReviewError(f"no reviewer {name!r}", 404)
    return ended, released


def reviewers(url: str) -> list[dict]:
    """Every reviewer: active, created, last login, decisions, open sessions."""
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("reviewers"))
        return _dicts(cur)


def _check_share(name: str, share: float | None) -> None:
    if share is not None and not 0.0 <= share <= 1.0:
        raise ReviewError(f"Invalid {name} {share!r}; give a fraction between 0 and 1 (0.02 = 2 %)")


def set_audit_share(url: str, share: float) -> float:
    _check_share("audit share", share)
    with db.connect(url) as conn, conn.cursor() as cur:
        return _one(cur, "set_audit_share", {"share": share})[0]


def settings(cur) -> dict:
    cur.execute(load_query("settings"))
    return _dicts(cur)[0]


def set_quality(url: str, *, gold_share: float | None = None, second_opinion_share: float | None = None,
                second_opinion_audit: bool | None = None) -> dict:
    """Change the quality settings given (the others stay); returns all the review settings."""
    _check_share("gold share", gold_share)
    _check_share("second-opinion share", second_opinion_share)
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("set_quality"),
                    {"gold": gold_share, "second": second_opinion_share, "audit": second_opinion_audit})
        return settings(cur)


def set_lead(url: str, name: str, lead: bool = True) -> None:
    """A lead sees the reviewers' measures (/lead) and every item's decisions."""
    with db.connect(url) as conn, conn.cursor() as cur:
        if _one(cur, "set_lead", {"lead": lead, "name": name}) is None:
            raise ReviewError(f"no reviewer {name!r}", 404)


def prediction_of(url: str, sha256: str) -> tuple[str, str] | None:
    """(model name, version) of the first answer recorded for a content, or None."""
    with db.connect(url) as conn, conn.cursor() as cur:
        row = _one(cur, "prediction_of", {"sha256": sha256})
    return (row[0], row[1]) if row else None


def add_gold(url: str, sha256: str, label: str) -> str:
    """A catalogue photo of known `label` (a category or OTHER_LABEL), by its content's sha256:
    "added", "known" (gold already), or "not recorded" (no prediction of that content yet: ingest
    the photo first)."""
    with db.connect(url) as conn, conn.cursor() as cur:
        recorded, added = _one(cur, "add_gold", {"sha256": sha256, "label": label, "outcome": outcome_of(label)})
    return "added" if added else "known" if recorded else "not recorded"


# -- claims ----------------------------------------------------------------------------------------

def claim(url: str, reviewer_id: int, *, lease_s: int = DEFAULT_LEASE_S, order: str = "oldest",
          draw: float | None = None) -> int | None:
    """The item this reviewer works on: the gold item shown to them and not answered, else the
    item they hold (lease renewed), else the next item nobody holds that waits for them (a first
    decision, or an opinion on an item they have not answered): the oldest, or with order
    "uncertain" the least confident answer, claimed now. With probability gold_share (`draw`,
    uniform in [0, 1), is the die) a gold item they have not seen is shown instead of that next
    item, which stays in the queue; only when there is one, so that a gold item never shows up in
    an empty queue. None: nothing waits for this reviewer."""
    if order not in ORDERS:
        raise ReviewError(f"Invalid order {order!r}; one of {', '.join(ORDERS)}")
    params = {"reviewer_id": reviewer_id, "lease_s": lease_s, "order": order}
    with db.connect(url) as conn, conn.cursor() as cur:
        row = _one(cur, "claim_current", params)
        if row is None:
            row = _one(cur, "claim_next", params)
            if row is not None and (random.random() if draw is None else draw) < settings(cur)["gold_share"]:
                gold = _one(cur, "claim_gold", params)
                if gold is not None:
                    cur.execute(load_query("unclaim"), {"item_id": row[0]})
                    row = gold
    return row[0] if row else None


def release(url: str, reviewer_id: int) -> None:
    """Give back every open item the reviewer holds (logout)."""
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("release_claims"), {"reviewer_id": reviewer_id})


# -- decisions -------------------------------------------------------------------------------------

def describe(label: str | None) -> str:
    if label is None:
        return "photo unusable"
    return "not a refund category" if label == OTHER_LABEL else repr(label)


def outcome_of(label: str | None) -> str:
    if label is None:
        return "unusable"
    return "other" if label == OTHER_LABEL else "category"


def decide(url: str, item_id: int, reviewer_id: int, label: str | None, *, replaces: int | None = None,
           categories: list[str] | None = None) -> int:
    """Record what a reviewer answers on an item: `label` is a category, OTHER_LABEL ("not a refund
    category") or None ("photo unusable"). `replaces` is the decision the reviewer saw on the item
    (None: it was shown undecided). Returns the id of the row recorded (or found, for a form sent
    twice).

    What the answer is depends on what the item is to this reviewer: on a gold item shown to them,
    their scored gold answer; on an item waiting for a second or third opinion that they have not
    answered and claimed from the queue, that opinion (refused otherwise); otherwise a decision. An
    open item held by someone else (lease still running) is refused. If the item's decision is no
    longer `replaces`, the decision is refused (LostUpdate, 409) and nothing is recorded, except
    when that newer decision is this reviewer's own with the same label: the form was sent twice,
    and the decision is recorded once. A decided item gets a new decision that supersedes the
    current one, until another reviewer has given an opinion on it: then it is final.
    `categories`, when given, are the labels allowed."""
    if label is not None and label != OTHER_LABEL and categories is not None and label not in categories:
        raise ReviewError(f"Invalid category {label!r}; choose one of the model's categories, "
                          f"'not a refund category' or 'photo unusable'")
    answer = {"item_id": item_id, "reviewer_id": reviewer_id, "outcome": outcome_of(label), "label": label}
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("item_for_update"), {"item_id": item_id})
        if cur.fetchone() is None:
            raise ReviewError(f"no review item {item_id}", 404)
        gold = _one(cur, "gold_answer", answer)
        if gold is not None:
            return gold[0]
        cur.execute(load_query("item_current"), {"item_id": item_id, "reviewer_id": reviewer_id})
        row = _dicts(cur)[0]
        for given, given_label in ((row["my_gold_id"], row["my_gold_label"]), (row["my_opinion_id"], row["my_opinion_label"])):
            if given is not None:
                if given_label == label and replaces is None:
                    return given  # the same form sent twice
                raise ReviewError(f"You answered item {item_id} already ({describe(given_label)}); that answer is final.", 409)
        if row["stage"] in ("second", "third") and not row["my_decision"]:
            if row["claimed_by"] != reviewer_id:  # given on an item claimed blind, never from a page seen otherwise
                raise ReviewError(f"item {item_id} waits for another reviewer's opinion; take your next item from Review", 409)
            new_id = _one(cur, "insert_opinion", {**answer, "round": 2 if row["stage"] == "second" else 3})[0]
            cur.execute(load_query("settle"), {"item_id": item_id})
            return new_id
        decision_id = row["decision_id"]
        if decision_id != replaces:
            if decision_id is not None and row["decided_by_id"] == reviewer_id and row["decided_label"] == label:
                return decision_id  # the same form sent twice
            if decision_id is not None:
                raise LostUpdate(item_id, label, row)
        if row["stage"] == "settled" and decision_id is None:
            raise ReviewError(f"item {item_id} is a photo of known label, not open for a decision", 409)
        if row["opinions"]:
            raise ReviewError(f"item {item_id} was settled with another reviewer's opinion; its decision is final", 409)
        if decision_id is None and row["leased"] and row["claimed_by"] != reviewer_id:
            raise ReviewError(f"item {item_id} is being reviewed by someone else", 409)
        previous = row["decided_label"] if decision_id is not None else row["model_label"]
        new_id = _one(cur, "insert_decision", {
            **answer, "sha256": row["sha256"], "previous_label": previous, "supersedes": decision_id})[0]
        cur.execute(load_query("set_decision"), {"decision_id": new_id, "item_id": item_id, "first": decision_id is None})
    return new_id


def undo(url: str, reviewer_id: int, *, window_s: int = UNDO_WINDOW_S, lease_s: int = DEFAULT_LEASE_S) -> tuple[int, bool]:
    """Take back the reviewer's latest answer (a decision, an opinion or a gold answer), given
    within `window_s`, still in force, not exported and with nothing built on it since (another
    reviewer's opinion on a decision; a gold answer on a photo an agreement made gold). It is
    removed: the item gets back the decision it replaced, or waits again, held by this reviewer
    (other held items given back), blind as before for an opinion or a gold answer. Returns (the
    item's id, whether it waits for this reviewer)."""
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("undo_last"), {"reviewer_id": reviewer_id})
        rows = _dicts(cur)
        if not rows:
            raise ReviewError("Nothing to undo: you have made no decision.", 409)
        cur.execute(load_query("item_for_update"), {"item_id": rows[0]["item_id"]})
        cur.execute(load_query("undo_last"), {"reviewer_id": reviewer_id})  # again, with the item locked
        last = _dicts(cur)[0]
        item_id = last["item_id"]
        if (last["kind"], last["id"]) != (rows[0]["kind"], rows[0]["id"]):
            raise ReviewError("Nothing undone: your last answer changed meanwhile; try again.", 409)
        if not last["current"]:
            raise ReviewError(f"Nothing to undo: your last decision (item {item_id}) was changed since.", 409)
        if last["age_s"] > window_s:
            raise ReviewError(f"Nothing to undo: your last decision (item {item_id}) is older than "
                              f"{window_s // 60} min" + ("; change it from My decisions." if last["kind"] == "decision" else "."), 409)
        if last["exported"]:
            raise ReviewError(f"Nothing to undo: your last decision (item {item_id}) was exported already; "
                              f"change it from My decisions.", 409)
        if last["built_on"]:
            raise ReviewError(f"Nothing to undo: another reviewer has answered on item {item_id} since.", 409)
        if last["kind"] != "decision" or last["supersedes"] is None:
            cur.execute(load_query("release_claims"), {"reviewer_id": reviewer_id})
        if last["kind"] == "decision":
            cur.execute(load_query("undo_apply"), {"item_id": item_id, "supersedes": last["supersedes"],
                                                   "decision_id": last["id"]})
        elif last["kind"] == "opinion":
            try:
                cur.execute(load_query("undo_opinion"), {"item_id": item_id, "opinion_id": last["id"]})
            except psycopg2.errors.ForeignKeyViolation:  # shown as gold to someone just now
                raise ReviewError(f"Nothing to undo: another reviewer has answered on item {item_id} since.", 409) from None
        else:
            cur.execute(load_query("undo_gold"), {"answer_id": last["id"]})
            return item_id, True
        if last["kind"] == "decision" and last["supersedes"] is not None:
            return item_id, False  # the decision it changed is back: nothing waits for this reviewer
        held = _one(cur, "hold_item", {"item_id": item_id, "reviewer_id": reviewer_id, "lease_s": lease_s})
    return item_id, held is not None


# -- reading ---------------------------------------------------------------------------------------

def _item(cur, item_id: int) -> dict | None:
    cur.execute(load_query("item"), {"item_id": item_id})
    rows = _dicts(cur)
    if not rows:
        return None
    found = rows[0]
    cur.execute(load_query("item_decisions"), {"item_id": item_id})
    found["decisions"] = _dicts(cur)
    return found


def item(url: str, item_id: int) -> dict | None:
    with db.connect(url) as conn, conn.cursor() as cur:
        return _item(cur, item_id)


def view(url: str, item_id: int, reviewer_id: int) -> dict | None:
    """An item as this reviewer is shown it. Blind (shown as undecided: no decision, no history)
    where it is a gold item shown to them, or an item waiting for an opinion that they did not
    decide (for a lead, one they hold). A settled item shown with its answers is noted
    (review_item_views): it is never a gold item for that reviewer."""
    with db.connect(url) as conn, conn.cursor() as cur:
        found = _item(cur, item_id)
        if found is None:
            return None
        cur.execute(load_query("task"), {"item_id": item_id, "reviewer_id": reviewer_id})
        task = _dicts(cur)[0]
        waiting = task["stage"] in ("second", "third")
        found["blind"] = bool(task["gold_held"] or (waiting and not task["decided"] and (task["mine"] or not task["lead"])))
        if not found["blind"] and task["stage"] == "settled":
            cur.execute(load_query("note_view"), {"item_id": item_id, "reviewer_id": reviewer_id})
    if found["reason"] == "gold":  # a catalogue photo: shown as the prediction that recorded it was
        found["reason"] = "needs_review" if found["needs_review"] else "audit"
    if found["blind"]:
        found.update(decision_id=None, outcome=None, decided_label=None, decided_at=None, decided_by=None, decisions=[])
    return found


def photo_path(url: str, item_id: int) -> Path | None:
    """The file of an item's photo, as PostgreSQL recorded it (never a path from a request)."""
    from ingest.journal import path_from_row

    with db.connect(url) as conn, conn.cursor() as cur:
        row = _one(cur, "photo_path", {"item_id": item_id})
    return path_from_row(row[0], row[1]) if row else None


def photo_pruned(url: str, item_id: int):
    """When retention (ingest prune) removed the photo of an item, or None."""
    with db.connect(url) as conn, conn.cursor() as cur:
        row = _one(cur, "photo_pruned", {"item_id": item_id})
    return row[0] if row else None


def queue_by_label(url: str) -> list[dict]:
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("queue_by_label"))
        return _dicts(cur)


def history(url: str, reviewer_id: int, *, limit: int = 200) -> list[dict]:
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("history"), {"reviewer_id": reviewer_id, "limit": limit})
        return _dicts(cur)


def no_majority(url: str, *, limit: int = 200) -> list[dict]:
    """Items three reviewers answered three ways, newest first: for a lead to look at."""
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("no_majority"), {"limit": limit})
        return _dicts(cur)


def labels_seen(url: str, model_name: str, model_version: str) -> list[str]:
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("labels_seen"), {"model_name": model_name, "model_version": model_version})
        return [r[0] for r in cur.fetchall()]
