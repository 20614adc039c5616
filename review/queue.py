"""The review queue in PostgreSQL: reviewers, claims with a lease, decisions. No Flask here.

Items are queued by the database itself (ingest/sql/004_review.sql: a trigger on predictions),
one per photo content (sha256), so a decision covers every prediction row of that content.
A reviewer claims the oldest open item for `lease_s` seconds; an item nobody decides before its
lease runs out goes back to the queue for the next claimer. A decision on a decided item is a
change: a new row that names the one it supersedes, so the history stays.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

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


def set_audit_share(url: str, share: float) -> float:
    if not 0.0 <= share <= 1.0:
        raise ReviewError(f"Invalid audit share {share!r}; give a fraction between 0 and 1 (0.02 = 2 %)")
    with db.connect(url) as conn, conn.cursor() as cur:
        return _one(cur, "set_audit_share", {"share": share})[0]


# -- claims ----------------------------------------------------------------------------------------

def claim(url: str, reviewer_id: int, *, lease_s: int = DEFAULT_LEASE_S, order: str = "oldest") -> int | None:
    """The item this reviewer works on: the one they hold (lease renewed), else the next open one
    nobody holds, claimed now: the oldest, or with order "uncertain" the least confident answer.
    None: the queue is empty (or all of it is held by others)."""
    if order not in ORDERS:
        raise ReviewError(f"Invalid order {order!r}; one of {', '.join(ORDERS)}")
    params = {"reviewer_id": reviewer_id, "lease_s": lease_s, "order": order}
    with db.connect(url) as conn, conn.cursor() as cur:
        row = _one(cur, "claim_current", params) or _one(cur, "claim_next", params)
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
    """Record a decision on an item: `label` is a category, OTHER_LABEL ("not a refund category")
    or None ("photo unusable"). `replaces` is the decision the reviewer saw on the item (None: it
    was undecided). Returns the id of the item's decision.

    An open item held by someone else (lease still running) is refused. If the item's decision is
    no longer `replaces`, the decision is refused (LostUpdate, 409) and nothing is recorded, except
    when that newer decision is this reviewer's own with the same label: the form was sent twice,
    and the decision is recorded once. Otherwise a decided item gets a new decision that supersedes
    the current one. `categories`, when given, are the labels allowed."""
    if label is not None and label != OTHER_LABEL and categories is not None and label not in categories:
        raise ReviewError(f"Invalid category {label!r}; choose one of the model's categories, "
                          f"'not a refund category' or 'photo unusable'")
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("item_for_update"), {"item_id": item_id})
        if cur.fetchone() is None:
            raise ReviewError(f"no review item {item_id}", 404)
        cur.execute(load_query("item_current"), {"item_id": item_id})
        row = _dicts(cur)[0]
        decision_id = row["decision_id"]
        if decision_id != replaces:
            if decision_id is not None and row["decided_by_id"] == reviewer_id and row["decided_label"] == label:
                return decision_id  # the same form sent twice
            if decision_id is not None:
                raise LostUpdate(item_id, label, row)
        if decision_id is None and row["leased"] and row["claimed_by"] != reviewer_id:
            raise ReviewError(f"item {item_id} is being reviewed by someone else", 409)
        previous = row["decided_label"] if decision_id is not None else row["model_label"]
        new_id = _one(cur, "insert_decision", {
            "item_id": item_id, "sha256": row["sha256"], "reviewer_id": reviewer_id, "outcome": outcome_of(label),
            "label": label, "previous_label": previous, "supersedes": decision_id})[0]
        cur.execute(load_query("set_decision"), {"decision_id": new_id, "item_id": item_id})
    return new_id


def undo(url: str, reviewer_id: int, *, window_s: int = UNDO_WINDOW_S, lease_s: int = DEFAULT_LEASE_S) -> int:
    """Take back the reviewer's latest decision, made within `window_s`, still its item's current
    decision and not exported: it is removed, the item gets back the decision it replaced (or is
    open again, held by this reviewer, other held items given back). Returns the item's id."""
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("undo_last"), {"reviewer_id": reviewer_id})
        rows = _dicts(cur)
        if not rows:
            raise ReviewError("Nothing to undo: you have made no decision.", 409)
        last = rows[0]
        if not last["current"]:
            raise ReviewError(f"Nothing to undo: your last decision (item {last['item_id']}) was changed since.", 409)
        if last["age_s"] > window_s:
            raise ReviewError(f"Nothing to undo: your last decision (item {last['item_id']}) is older than "
                              f"{window_s // 60} min; change it from My decisions.", 409)
        if last["exported"]:
            raise ReviewError(f"Nothing to undo: your last decision (item {last['item_id']}) was exported already; "
                              f"change it from My decisions.", 409)
        if last["supersedes"] is None:
            cur.execute(load_query("release_claims"), {"reviewer_id": reviewer_id})
        cur.execute(load_query("undo_apply"), {"reviewer_id": reviewer_id, "lease_s": lease_s, "item_id": last["item_id"],
                                               "supersedes": last["supersedes"], "decision_id": last["id"]})
    return last["item_id"]


# -- reading ---------------------------------------------------------------------------------------

def item(url: str, item_id: int) -> dict | None:
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("item"), {"item_id": item_id})
        rows = _dicts(cur)
        if not rows:
            return None
        found = rows[0]
        cur.execute(load_query("item_decisions"), {"item_id": item_id})
        found["decisions"] = _dicts(cur)
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


def labels_seen(url: str, model_name: str, model_version: str) -> list[str]:
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(load_query("labels_seen"), {"model_name": model_name, "model_version": model_version})
        return [r[0] for r in cur.fetchall()]
