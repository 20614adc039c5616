"""The review desk's web pages (Flask, server-rendered; the one module that imports Flask).

Every page but the login page needs a logged-in reviewer (else: a redirect to /login); every POST
carries a CSRF token (Flask-WTF's CSRFProtect); the session is Flask's signed cookie. Photos are
read from the path PostgreSQL recorded for the item (ingest_files.dest_path), never from a path
in the request.
"""
from __future__ import annotations

import io
import logging
import math
import os
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, abort, flash, g, redirect, render_template, request, send_file, session, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect
from PIL import Image, UnidentifiedImageError
from psycopg2 import InterfaceError, OperationalError
from werkzeug.middleware.proxy_fix import ProxyFix

from ingest import report
from review import queue
from review.categories import Categories
from review.throttle import LoginThrottle, Refusal
from serving.archive import OTHER_LABEL

SECRET_ENV = "REVIEW_SECRET_KEY"
# Formats a browser shows as they are; anything else is re-encoded to JPEG on the way out.
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
OPEN_PAGES = {"login", "login_post", "static"}
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# The decide form's buttons: a label, or one of these.
CHOICE_OTHER, CHOICE_UNUSABLE, CHOICE_SEARCH = ":other", ":unusable", ":search"
log = logging.getLogger("review")


def secret_key(state: Path) -> bytes:
    """REVIEW_SECRET_KEY, else a key generated once into STATE/secret_key (mode 0600) and reused,
    so sessions survive a restart and several server processes on one state folder agree."""
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV].encode()
    path = state / "secret_key"
    state.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes().strip()
        if len(key) < 32:
            raise RuntimeError(f"{path} holds no usable secret key (under 32 bytes); delete it to make a new one")
        return key
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path.read_bytes().strip()


def _safe_next(target: str | None) -> str:
    """Only a path on this site (no scheme, no host, no //) is followed after login."""
    if target and target.startswith("/") and not target.startswith("//") and not urlsplit(target).netloc and "\\" not in target:
        return target
    return url_for("review")


def _decision_id(text: str) -> int | None:
    """The form's `replaces`: the decision shown with the item, empty where it was undecided."""
    if not text:
        return None
    if not text.isdigit():
        raise queue.ReviewError(f"Invalid decision id {text!r} in the form; reload the page")
    return int(text)


def _wait(seconds: int) -> str:
    return f"{seconds} s" if seconds < 120 else f"{math.ceil(seconds / 60)} min"


def _age(delta) -> str:
    if delta is None:
        return ""
    s = int(delta.total_seconds())
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 60} min"


def create_app(database_url: str, *, state: Path, lease_s: int = queue.DEFAULT_LEASE_S,
               model_store: Path | None = None, secure_cookies: bool = False,
               throttle: LoginThrottle | None = None, proxies: int = 0, order: str = "oldest") -> Flask:
    """The desk's Flask app. `proxies`: how many reverse proxies in front set X-Forwarded-For and
    X-Forwarded-Proto (0: the client's address is the connection's)."""
    app = Flask(__name__)
    if proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)
    app.config.update(
        SECRET_KEY=secret_key(state),
        SESSION_COOKIE_NAME="review_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure_cookies,
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=queue.SESSION_LIFETIME_S),
        SESSION_REFRESH_EACH_REQUEST=False,  # the session ends 12 h after login, however it is used
        WTF_CSRF_TIME_LIMIT=queue.SESSION_LIFETIME_S,
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    CSRFProtect(app)
    categories = Categories(database_url, model_store)
    throttle = throttle or LoginThrottle()
    app.jinja_env.filters["age"] = _age
    app.jinja_env.globals["OTHER_LABEL"] = OTHER_LABEL
    app.jinja_env.globals["undo_min"] = queue.UNDO_WINDOW_S // 60

    @app.before_request
    def require_login():
        g.reviewer = None
        token = session.get("token")
        if token and request.endpoint != "static":
            g.reviewer = queue.session_reviewer(database_url, token)
            if g.reviewer is None:  # logged out elsewhere, expired, deactivated or a new password
                session.clear()
                flash("Your session has ended: log in again.")
        if g.reviewer is None and request.endpoint not in OPEN_PAGES:
            return redirect(url_for("login", next=(request.full_path if request.query_string else request.path) if request.method == "GET" else None))

    @app.after_request
    def headers(response):
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        if request.endpoint != "static":
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(CSRFError)
    def csrf_refused(exc):
        return render_template("error.html", title="Refused", message=(
            f"This form's security token was refused ({exc.description}). Reload the page and try again.")), 400

    @app.errorhandler(queue.ReviewError)
    def review_refused(exc):
        return render_template("error.html", title="Not recorded", message=str(exc)), exc.status

    @app.errorhandler(queue.LostUpdate)
    def lost_update(exc):
        return render_template("conflict.html", exc=exc, describe=queue.describe), 409

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def database_down(exc):
        log.error("%s %s: the database could not be reached: %s", request.method, request.path, str(exc).strip())
        what = ("Your decision was not recorded." if request.endpoint == "decide"
                else "Nothing was recorded." if request.method == "POST" else "")
        return render_template("error.html", title="Database unavailable", message=(
            f"The review desk cannot reach its database just now. {what} Try again in a minute; "
            f"if this persists, tell whoever runs the desk.").replace("  ", " ")), 503

    @app.get("/login")
    def login():
        if g.reviewer is not None:
            return redirect(url_for("review"))
        return render_template("login.html", next=request.args.get("next", ""))

    @app.post("/login")
    def login_post():
        name, password = request.form.get("name", ""), request.form.get("password", "")
        address = request.remote_addr or "unknown"
        refused = throttle.refusal(name, address)
        slot = refused is None and throttle.check_slot()
        if refused is None and not slot:
            refused = Refusal("too many logins at once", 5)
        if refused is not None:
            log.warning("login refused for %r from %s: %s (retry after %d s)", name, address, refused.reason,
                        refused.retry_after_s)
            return render_template("login.html", error=f"Too many attempts ({refused.reason}): try again in "
                                   f"{_wait(refused.retry_after_s)}.", name=name, next=request.form.get("next", "")), \
                429, {"Retry-After": str(refused.retry_after_s)}
        try:
            reviewer = queue.authenticate(database_url, name, password) if name and password else None
        finally:
            throttle.release_slot()
        token = queue.start_session(database_url, reviewer.id, address=address) if reviewer else None
        if token is None:
            throttle.failed(name, address)
            log.warning("login refused for %r from %s: wrong name or password", name, address)
            return render_template("login.html", error="Wrong name or password.", name=name,
                                   next=request.form.get("next", "")), 401
        throttle.succeeded(name)
        log.info("login: %s from %s", reviewer.name, address)
        session.clear()
        session.permanent = True
        session["token"] = token
        return redirect(_safe_next(request.form.get("next")))

    @app.post("/logout")
    def logout():
        queue.release(database_url, g.reviewer.id)
        queue.end_session(database_url, session["token"])
        session.clear()
        return redirect(url_for("login"))

    @app.get("/")
    def index():
        return redirect(url_for("review"))

    def render_item(item_id: int, *, claimed: bool):
        item = queue.view(database_url, item_id, g.reviewer.id)
        if item is None:
            abort(404)
        topk = (item["topk"] or [])[:5]
        cats = categories.for_version(item["model_name"], item["model_version"])
        return render_template("item.html", item=item, topk=topk, categories=cats, claimed=claimed,
                               lease_s=lease_s)

    @app.get("/review")
    def review():
        item_id = queue.claim(database_url, g.reviewer.id, lease_s=lease_s, order=order)
        if item_id is None:
            return render_template("empty.html", rows=queue.queue_by_label(database_url))
        return render_item(item_id, claimed=True)

    @app.get("/items/<int:item_id>")
    def show_item(item_id: int):
        return render_item(item_id, claimed=False)

    @app.post("/items/<int:item_id>/decide")
    def decide(item_id: int):
        choice = request.form.get("decision", "")
        if choice == CHOICE_OTHER:
            label = OTHER_LABEL
        elif choice == CHOICE_UNUSABLE:
            label = None
        elif choice == CHOICE_SEARCH:
            label = request.form.get("search_label", "").strip()
            if not label:
                raise queue.ReviewError("Type or pick a category in the search field first.")
        elif choice:
            label = choice
        else:
            raise queue.ReviewError("No decision in the form.")
        item = queue.item(database_url, item_id)
        if item is None:
            abort(404)
        allowed = set(categories.for_version(item["model_name"], item["model_version"]))
        allowed |= {t["label"] for t in item["topk"] or []}
        replaces = _decision_id(request.form.get("replaces", ""))
        queue.decide(database_url, item_id, g.reviewer.id, label, replaces=replaces, categories=sorted(allowed))
        if replaces is not None:
            flash(f"Item {item_id}: decision changed.")
            return redirect(url_for("history"))
        return redirect(url_for("review"))

    @app.post("/undo")
    def undo():
        item_id, waiting = queue.undo(database_url, g.reviewer.id, lease_s=lease_s)
        flash(f"Item {item_id}: your decision was taken back.")
        return redirect(url_for("review") if waiting else url_for("show_item", item_id=item_id))

    @app.get("/items/<int:item_id>/photo")
    def photo(item_id: int):
        path = queue.photo_path(database_url, item_id)
        if path is None:
            pruned = queue.photo_pruned(database_url, item_id)
            if pruned is not None:  # retention removed it: say so (the rows and decisions are kept)
                return (f"This photo was removed by retention (ingest prune) on {pruned:%Y-%m-%d}; its records are kept.",
                        410, {"Content-Type": "text/plain; charset=utf-8"})
            abort(404)
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                if im.format in BROWSER_FORMATS:
                    return send_file(io.BytesIO(data), mimetype=BROWSER_FORMATS[im.format], max_age=0)
                im.load()
                buf = io.BytesIO()
                im.convert("RGB").save(buf, "JPEG", quality=90)
        except FileNotFoundError:
            abort(404)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            abort(415)
        buf.seek(0)
        return send_file(buf, mimetype="image/jpeg", max_age=0)

    @app.get("/queue")
    def queue_view():
        rows = queue.queue_by_label(database_url)
        return render_template("queue.html", rows=rows, total=sum(r["open"] for r in rows))

    @app.get("/history")
    def history():
        return render_template("history.html", rows=queue.history(database_url, g.reviewer.id))

    @app.get("/lead")
    def lead():
        """For a lead: each reviewer's accuracy on gold items, agreement per pair, second opinions,
        and the photos three reviewers answered three ways."""
        if not g.reviewer.lead:
            abort(403)
        data = report.collect(database_url, since=EPOCH, limit=100,
                              sections=["review_gold", "review_kappa", "review_opinions", "review_audit"])
        return render_template("lead.html", data=data, titles={k: v[1] for k, v in report.SECTIONS.items()},
                               unsettled=queue.no_majority(database_url))

    return app
