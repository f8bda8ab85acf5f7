"""`cai review`: a local web page where people check the factory's pairs; each verdict is a store.Review row.

    cai review                                      # http://127.0.0.1:8765/, your login name as reviewer
    cai review --method ai --label-max 0.7          # open on the judge's least sure AI pairs
    cai review --host 0.0.0.0                       # a team: prints a URL with the token it requires
    cai review stats | cai review export --out r.jsonl | cai review import r.jsonl

The page shows one pair at a time: the prompt, both replies side by side in a random left/right
order (recorded with the verdict), and what the factory knows (principles, gates, and, behind a
fold the person opens with `i`, its label in both orders; whether they opened it is recorded too).
Keys: 1 or Left arrow, 2 or Right arrow, 3 or t (tie), 4 or b (both bad), 0 or s (skip), n (note).

This module is the app: a guard that applies cai/review_access.py (who may ask) to every request, and
five routes that each read the request, the store (store/reviews.py: keyset-paged, so 100k pairs answer
as fast as a few) and answer with a page of cai/review_html.py. Stats and JSONL are flows/review_io.py.
"""

from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from cai import review, review_html
from cai import review_access as access
from cai.errors import UserError
from cai.review_access import is_loopback as is_loopback  # `cai review` asks whether its host needs a token
from flows.configs import ReviewConfig
from store.db import session_scope
from store.models import PreferencePair, utcnow
from store.reviews import (
    QUEUES,
    QueueFilter,
    add_reviews,
    count,
    facets,
    filter_from,
    filter_params,
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
MAX_BODY = 64 * 1024  # a verdict form is a few hundred bytes; a note at most review_html.MAX_NOTE characters
FACETS_S = 60.0  # how long the filters' choices are reused before the store is asked again


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
    loopback = access.is_loopback(cfg.host)
    if not loopback and not token:
        raise UserError(f"--host {cfg.host}: any address but loopback requires a token (set {TOKEN_ENV} or let "
                        "`cai review` make one)")
    return Settings(cfg.database_url, review.check_reviewer(reviewer), cfg.queue_filter(), cfg.page_size,
                    loopback, token, secrets.token_bytes(32))


# --- the app -----------------------------------------------------------------------------------------------

def make_app(s: Settings):
    """The FastAPI app of the page (tests drive it with a TestClient, `serve` with uvicorn)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    csrf = access.csrf_value(s.secret)
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
        given = request.query_params.get("token")
        auth = request.headers.get("authorization", "")
        sent = given or request.cookies.get(TOKEN_COOKIE) or (auth[7:] if auth.lower().startswith("bearer ") else "")
        refused = access.refusal(request.method, request.headers.get("host"), s.loopback, s.token, sent,
                                 request.headers.get("origin"), request.headers.get("sec-fetch-site"))
        if refused:
            return deny(*refused)
        if given is not None and request.method == "GET":  # the token goes into a cookie, out of the address bar
            params = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            response: Response = RedirectResponse(f"{request.url.path}?{urlencode(params)}", status_code=303)
            if s.token is not None:
                response.set_cookie(TOKEN_COOKIE, s.token, httponly=True, samesite="strict")
        else:
            response = await call_next(request)
        response.headers.update(access.HEADERS)
        response.headers.setdefault("Content-Security-Policy", access.DEFAULT_CSP)
        return response

    def reviewer_of(request: Request) -> str:
        try:
            return review.check_reviewer(request.cookies.get(REVIEWER_COOKIE) or s.reviewer)
        except ValueError:
            return s.reviewer

    def html(text: str, nonce: str) -> HTMLResponse:
        return HTMLResponse(text, headers={"Content-Security-Policy": review_html.csp(nonce)})

    def parsed(request: Request) -> tuple[QueueFilter, str, str]:
        """The filter the request names (the defaults, and the problem, when it names a wrong one), and who asks."""
        reviewer = reviewer_of(request)
        try:
            return filter_from(dict(request.query_params), s.defaults, reviewer), "", reviewer
        except ValueError as exc:
            return replace(s.defaults, reviewer=reviewer), str(exc), reviewer

    async def form(request: Request) -> dict[str, str] | Response:
        """The posted form's fields, or the refusal: too large, or without the page's anti-forgery value."""
        body = await request.body()
        if len(body) > MAX_BODY:
            return deny(413, f"the form is larger than {MAX_BODY // 1024} KiB; shorten the note")
        data = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        if not access.same(data.get("csrf", ""), csrf):
            return deny(403, "the form's anti-forgery value is missing or wrong: reload the page")
        return data

    @app.get("/")
    def review_page(request: Request):
        nonce = secrets.token_urlsafe(16)
        f, problem, reviewer = parsed(request)
        wanted = request.query_params.get("pair")
        with session_scope(s.database_url) as session:
            choices = options(session)
            pair = session.get(PreferencePair, wanted) if wanted else next_pair(
                session, f, request.query_params.get("after") or None)
            v = pair_view(session, pair.id) if pair else None
            n = count(session, f)
        left = secrets.choice(review.SIDES) if v is not None else ""  # the random side, recorded with the verdict
        missing = f"no pair {wanted} in the store" if wanted and pair is None else ""
        q = filter_params(f)
        head = review_html.top(reviewer, q, csrf, "/", choices, QUEUES)
        return html(review_html.pair_page(nonce, head, [problem, missing], n, q, reviewer, v, left, csrf), nonce)

    @app.post("/verdict")
    async def verdict(request: Request):
        data = await form(request)
        if isinstance(data, Response):
            return data
        reviewer = reviewer_of(request)
        left = data.get("left", "")
        try:
            f = filter_from(data, s.defaults, reviewer)
            verdict = review.verdict_for(data.get("choice", ""), left)
        except ValueError as exc:
            return deny(400, str(exc))
        note = (data.get("note") or "").strip()[:review_html.MAX_NOTE] or None
        pid = data.get("pair", "")
        with session_scope(s.database_url) as session:
            if session.get(PreferencePair, pid) is None:
                return deny(404, f"no pair {pid!r} in the store")
            add_reviews(session, [review.review_row(pid, reviewer, verdict, left, note, utcnow(),
                                                    ai_shown=data.get("ai_shown") == "1")])
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
        f, problem, reviewer = parsed(request)
        after = request.query_params.get("after") or None
        with session_scope(s.database_url) as session:
            choices = options(session)
            pairs = queue_page(session, f, after, s.page_size + 1)
            more, pairs = len(pairs) > s.page_size, pairs[:s.page_size]
            texts = prompt_texts(session, pairs)
            reviews = review_counts(session, pairs)
            n = count(session, f)
        q = filter_params(f)
        head = review_html.top(reviewer, q, csrf, "/queue", choices, QUEUES)
        return html(review_html.queue_list_page(nonce, head, [problem], n, s.page_size, pairs, texts, reviews, q,
                                                after, more), nonce)

    @app.get("/stats")
    def stats_page(request: Request):
        nonce = secrets.token_urlsafe(16)
        with session_scope(s.database_url) as session:
            st = review.compute(review.verdict_from_row(r) for r in verdict_rows(session))
        return html(review_html.agreement_page(nonce, reviewer_of(request), filter_params(s.defaults), csrf, st), nonce)

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
