"""`cai review`: a local web page where people check the factory's pairs; each verdict is a store.Review row.

    cai review                                      # http://127.0.0.1:8765/, your login name as reviewer
    cai review --method ai --label-max 0.7          # open on the judge's least sure AI pairs
    cai review --host 0.0.0.0                       # a team: prints a URL with the token it requires
    cai review stats | cai review export --out r.jsonl | cai review import r.jsonl

The page shows one pair at a time: the prompt, both replies side by side in a random left/right
order (recorded with the verdict), and what the factory knows (principles, gates, and, behind a
fold the person opens with `i`, its label in both orders; whether they opened it is recorded too).
Keys: 1 or Left arrow, 2 or Right arrow, 3 or t (tie), 4 or b (both bad), 0 or s (skip), n (note).
Queries are keyset-paged (store/reviews.py), so a store of 100k pairs answers as fast as a small one.
The HTML is flows/review_page.py; stats and JSONL export/import are flows/review_io.py.

Who may use it: bound to loopback, only pages whose Host is a loopback name are served (a web
page elsewhere cannot reach it through DNS rebinding); bound to any other address, every request
must carry the token printed at start (CAI_REVIEW_TOKEN, or a fresh random one), which a first
visit with `?token=` turns into a cookie. Every state-changing request is a POST that must carry
the page's anti-forgery value and, when the browser sends them, a same-origin Origin and
Sec-Fetch-Site; a script on another site can do neither. Every stored text is HTML-escaped and the
page's own script runs under a nonce-only Content-Security-Policy.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from cai import review
from cai.errors import UserError
from flows.configs import ReviewConfig
from flows.review_page import (
    KEYS_JS,
    MAX_NOTE,
    esc,
    filter_params,
    filters_form,
    header,
    page,
    pair_html,
    queue_html,
    stats_html,
)
from store.db import session_scope
from store.models import PreferencePair, Review, utcnow
from store.reviews import (
    QUEUES,
    QueueFilter,
    add_reviews,
    count,
    facets,
    next_pair,
    pair_view,
    prompt_texts,
    queue_page,
    review_counts,
    verdict_rows,
)

TOKEN_ENV = "CAI_REVIEW_TOKEN"
TOKEN_COOKIE = "cai_review_token"
REVIEWER_COOKIE = "cai_reviewer"
MAX_BODY = 64 * 1024  # a verdict form is a few hundred bytes; a note at most MAX_NOTE characters
FACETS_S = 60.0  # how long the filters' choices are reused before the store is asked again
FILTERS = ("method", "status", "principle", "version", "tag", "label_min", "label_max", "queue")


def is_loopback(host: str) -> bool:
    """localhost, 127.x.y.z or ::1 (brackets allowed)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hostname(host_header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8765` -> `::1`, `localhost:80` -> `localhost`."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


@dataclass(frozen=True)
class Settings:
    """What the running page needs: the store, who reviews by default, and its secrets (never logged)."""

    database_url: str | None
    reviewer: str
    defaults: QueueFilter
    page_size: int
    loopback: bool
    token: str | None  # required on every request when set
    secret: bytes  # the anti-forgery value is derived from it


def settings(cfg: ReviewConfig, token: str | None, reviewer: str) -> Settings:
    loopback = is_loopback(cfg.host)
    if not loopback and not token:
        raise UserError(f"--host {cfg.host}: any address but loopback requires a token (set {TOKEN_ENV} or let "
                        "`cai review` make one)")
    return Settings(cfg.database_url, review.check_reviewer(reviewer), cfg.queue_filter(), cfg.page_size,
                    loopback, token, secrets.token_bytes(32))


# --- the queue's filters, as query parameters ---------------------------------------------------------

def _float(value: str | None, name: str) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{name}: expected a number between 0 and 1, got {value!r}") from None
    if not 0 <= x <= 1:
        raise ValueError(f"{name}: expected a number between 0 and 1, got {value!r}")
    return x


def filter_from(params: dict[str, str], defaults: QueueFilter, reviewer: str) -> QueueFilter:
    """The queue filter a request names; parameters it leaves out keep the defaults `cai review` started with."""
    f = replace(defaults, reviewer=reviewer)
    if not any(k in params for k in FILTERS):
        return f
    queue = params.get("queue") or defaults.queue
    if queue not in QUEUES:
        raise ValueError(f"queue: expected one of {', '.join(QUEUES)}, got {queue!r}")
    return replace(f, method=params.get("method", ""), status=params.get("status", ""),
                   principle=params.get("principle", ""), version=params.get("version", ""),
                   tag=params.get("tag", ""), label_min=_float(params.get("label_min"), "label_min"),
                   label_max=_float(params.get("label_max"), "label_max"), queue=queue)


# --- the app -----------------------------------------------------------------------------------------------

def csrf_value(s: Settings) -> str:
    return hmac.new(s.secret, b"cai-review-form", hashlib.sha256).hexdigest()


def make_app(s: Settings):
    """The FastAPI app of the page (tests drive it with a TestClient, `serve` with uvicorn)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    csrf = csrf_value(s)
    cached: dict[str, Any] = {}

    def options(session) -> dict[str, list[str]]:
        """The filters' choices, re-read at most every FACETS_S seconds (five grouped scans of the store)."""
        if cached.get("at", -FACETS_S) < time.monotonic() - FACETS_S:
            cached.update(at=time.monotonic(), facets=facets(session))
        return cached["facets"]

    def deny(status: int, why: str) -> Response:
        return PlainTextResponse(f"cai review: {why}\n", status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = hostname(request.headers.get("host") or "")
        if s.loopback and not is_loopback(host):
            return deny(400, f"this page answers only at a loopback address (Host {host!r} refused)")
        given = request.query_params.get("token")
        if s.token is not None:
            auth = request.headers.get("authorization", "")
            bearer = auth[7:] if auth.lower().startswith("bearer ") else ""
            sent = given or request.cookies.get(TOKEN_COOKIE) or bearer
            if not sent or not hmac.compare_digest(sent.encode(), s.token.encode()):
                return deny(401, "this page needs the token `cai review` printed at start (open the URL it printed)")
        if request.method == "POST":
            origin = request.headers.get("origin")
            fetch_site = request.headers.get("sec-fetch-site")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                return deny(403, "a form from another site cannot change verdicts here")
            if fetch_site and fetch_site not in ("same-origin", "none"):
                return deny(403, "a form from another site cannot change verdicts here")
        if given is not None and request.method == "GET":  # the token goes into a cookie, out of the address bar
            params = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            response: Response = RedirectResponse(f"{request.url.path}?{urlencode(params)}", status_code=303)
            if s.token is not None:
                response.set_cookie(TOKEN_COOKIE, s.token, httponly=True, samesite="strict")
        else:
            response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        # not no-referrer: under it Chromium sends `Origin: null` with the page's own forms, which the
        # check above must refuse; same-origin sends nothing to other sites
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Cache-Control"] = "no-store"
        response.headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
        return response

    def reviewer_of(request: Request) -> str:
        try:
            return review.check_reviewer(request.cookies.get(REVIEWER_COOKIE) or s.reviewer)
        except ValueError:
            return s.reviewer

    def html_page(title: str, body: str, nonce: str, script: str = "", status: int = 200) -> HTMLResponse:
        csp = (f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; form-action 'self'; "
               "base-uri 'none'; frame-ancestors 'none'")
        return HTMLResponse(page(title, body, nonce, script), status_code=status,
                            headers={"Content-Security-Policy": csp})

    def parsed(request: Request) -> tuple[QueueFilter | None, str]:
        reviewer = reviewer_of(request)
        try:
            return filter_from(dict(request.query_params), s.defaults, reviewer), ""
        except ValueError as exc:
            return None, str(exc)

    async def form(request: Request) -> dict[str, str] | Response:
        """The posted form's fields, or the refusal: too large, or without the page's anti-forgery value."""
        body = await request.body()
        if len(body) > MAX_BODY:
            return deny(413, f"the form is larger than {MAX_BODY // 1024} KiB; shorten the note")
        data = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        if not hmac.compare_digest(data.get("csrf", "").encode(), csrf.encode()):
            return deny(403, "the form's anti-forgery value is missing or wrong: reload the page")
        return data

    @app.get("/")
    def review_page(request: Request):
        nonce = secrets.token_urlsafe(16)
        f, problem = parsed(request)
        reviewer = reviewer_of(request)
        f = f or replace(s.defaults, reviewer=reviewer)
        with session_scope(s.database_url) as session:
            choices = options(session)
            wanted = request.query_params.get("pair")
            pair = session.get(PreferencePair, wanted) if wanted else next_pair(
                session, f, request.query_params.get("after") or None)
            v = pair_view(session, pair.id) if pair else None
            n = count(session, f)
        head = header(reviewer, f, csrf) + filters_form("/", f, choices)
        note = f'<p class="error">{esc(problem)}</p>' if problem else ""
        if wanted and pair is None:
            note += f'<p class="error">no pair {esc(wanted)} in the store</p>'
        summary = f'<p class="meta">{n} pairs match these filters (queue {esc(f.queue)}, reviewer {esc(reviewer)}).</p>'
        if v is None:
            body = head + note + summary + '<p id="done">Nothing to review here: every pair matching these ' \
                                           "filters is done, or none matches. Change the filters above.</p>"
            return html_page("cai review", body, nonce)
        left = secrets.choice(review.SIDES)  # the random side, recorded with the verdict
        return html_page("cai review", head + note + summary + pair_html(v, left, f, csrf, reviewer), nonce, KEYS_JS)

    @app.post("/verdict")
    async def verdict(request: Request):
        data = await form(request)
        if isinstance(data, Response):
            return data
        reviewer = reviewer_of(request)
        try:
            f = filter_from(data, s.defaults, reviewer)
            left = data.get("left", "")
            choice = data.get("choice", "")
            verdict = review.verdict_for(choice, left)
        except ValueError as exc:
            return deny(400, str(exc))
        note = (data.get("note") or "").strip()[:MAX_NOTE] or None
        pid = data.get("pair", "")
        with session_scope(s.database_url) as session:
            if session.get(PreferencePair, pid) is None:
                return deny(404, f"no pair {pid!r} in the store")
            now = utcnow()
            add_reviews(session, [Review(id=review.review_key(pid, reviewer, now, verdict, left, note), pair_id=pid,
                                         reviewer=reviewer, verdict=verdict, left=left, note=note,
                                         ai_shown=data.get("ai_shown") == "1", source="page", created_at=now)])
        return RedirectResponse("/?" + urlencode(filter_params(f) | {"after": pid}), status_code=303)

    @app.post("/reviewer")
    async def set_reviewer(request: Request):
        data = await form(request)
        if isinstance(data, Response):
            return data
        try:
            name = review.check_reviewer(data.get("reviewer", ""))
        except ValueError as exc:
            return deny(400, str(exc))
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(REVIEWER_COOKIE, name, httponly=True, samesite="strict", max_age=365 * 24 * 3600)
        return response

    @app.get("/queue")
    def queue(request: Request):
        nonce = secrets.token_urlsafe(16)
        f, problem = parsed(request)
        reviewer = reviewer_of(request)
        f = f or replace(s.defaults, reviewer=reviewer)
        after = request.query_params.get("after") or None
        with session_scope(s.database_url) as session:
            choices = options(session)
            pairs = queue_page(session, f, after, s.page_size + 1)
            more, pairs = len(pairs) > s.page_size, pairs[:s.page_size]
            texts = prompt_texts(session, pairs)
            reviews = review_counts(session, pairs)
            n = count(session, f)
        body = (header(reviewer, f, csrf) + filters_form("/queue", f, choices)
                + (f'<p class="error">{esc(problem)}</p>' if problem else "")
                + f'<p class="meta">{n} pairs match; {s.page_size} a page, in pair id order.</p>'
                + queue_html(pairs, texts, reviews, f, after, more))
        return html_page("cai review: queue", body, nonce)

    @app.get("/stats")
    def stats_page(request: Request):
        nonce = secrets.token_urlsafe(16)
        reviewer = reviewer_of(request)
        with session_scope(s.database_url) as session:
            st = review.compute(review.verdict_from_row(r) for r in verdict_rows(session))
        body = header(reviewer, replace(s.defaults, reviewer=reviewer), csrf) + stats_html(st)
        return html_page("cai review: agreement", body, nonce)

    return app


# --- serving -----------------------------------------------------------------------------------------------

def bind(host: str, port: int) -> tuple[socket.socket, str]:
    """A listening socket and the page's base URL (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                        "choose another --port (0 picks a free one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    name = host.strip("[]")
    if name in ("0.0.0.0", "::"):  # every address: show one the team can type
        name = socket.gethostname()
    shown = f"[{name}]" if ":" in name else name
    return sock, f"http://{shown}:{sock.getsockname()[1]}/"


def serve(app, sock: socket.socket) -> None:
    """Serve until Ctrl+C or SIGTERM (uvicorn handles both and finishes the request in flight)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    server.run(sockets=[sock])
