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
import html
import ipaddress
import json
import secrets
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from cai import review
from cai.errors import UserError
from flows.configs import ReviewConfig
from store.db import session_scope
from store.models import PreferencePair, Prompt, Review, utcnow
from store.reviews import (
    QUEUES,
    QueueFilter,
    add_reviews,
    chosen_ids,
    count,
    current_verdicts,
    export_rows,
    facets,
    next_pair,
    pair_view,
    queue_page,
    verdict_rows,
)

TOKEN_ENV = "CAI_REVIEW_TOKEN"
TOKEN_COOKIE = "cai_review_token"
REVIEWER_COOKIE = "cai_reviewer"
MAX_BODY = 64 * 1024  # a verdict form is a few hundred bytes; a note at most MAX_NOTE characters
MAX_NOTE = 4000
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


def default_filter(cfg: ReviewConfig) -> QueueFilter:
    return QueueFilter(method=cfg.method or "", status=cfg.status or "", principle=cfg.principle or "",
                       version=cfg.constitution or "", tag=cfg.tag or "", label_min=cfg.label_min,
                       label_max=cfg.label_max, queue=cfg.queue)


def settings(cfg: ReviewConfig, token: str | None, reviewer: str) -> Settings:
    loopback = is_loopback(cfg.host)
    if not loopback and not token:
        raise UserError(f"--host {cfg.host}: any address but loopback requires a token (set {TOKEN_ENV} or let "
                        "`cai review` make one)")
    return Settings(cfg.database_url, review.check_reviewer(reviewer), default_filter(cfg), cfg.page_size,
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


def filter_params(f: QueueFilter) -> dict[str, str]:
    return {"method": f.method, "status": f.status, "principle": f.principle, "version": f.version, "tag": f.tag,
            "label_min": "" if f.label_min is None else f"{f.label_min:g}",
            "label_max": "" if f.label_max is None else f"{f.label_max:g}", "queue": f.queue}


# --- HTML ------------------------------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; margin: 0 auto; max-width: 1400px;
       padding: .6rem 1rem 2rem; color: #222; line-height: 1.4; }
header { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; border-bottom: 1px solid #ccc;
         padding-bottom: .4rem; }
header form { display: inline; margin: 0; } a { color: #1d4f91; }
#filters { display: flex; gap: .5rem; flex-wrap: wrap; align-items: end; margin: .6rem 0; font-size: .85rem; }
#filters label { display: flex; flex-direction: column; } #filters input { width: 5rem; }
.meta { color: #555; font-size: .85rem; } .error { color: #a00; font-weight: bold; }
.prompt, .reply { border: 1px solid #ddd; border-radius: 4px; padding: .4rem .8rem; margin: .4rem 0; }
.prompt { background: #f6f8fb; } .role { font-weight: bold; font-size: .8rem; color: #555; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font-size: .95rem; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.reply h3 { margin: .2rem 0; font-size: 1rem; } .gates { font-size: .8rem; color: #555; margin-top: .4rem; }
details#ai { margin: .6rem 0; border: 1px dashed #aaa; padding: .3rem .8rem; }
#verdict { position: sticky; bottom: 0; background: #fff; border-top: 1px solid #ccc; padding: .5rem 0; }
#verdict textarea { width: 100%; height: 2.6rem; box-sizing: border-box; }
#verdict button { margin: .3rem .3rem 0 0; padding: .35rem .8rem; }
kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 .25rem; font-size: .8rem; background: #f4f4f4; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .85rem; }
th, td { border: 1px solid #ccc; padding: .2rem .5rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
"""

KEYS_JS = """
(function () {
  var form = document.getElementById("verdict");
  if (!form) return;
  var ai = document.getElementById("ai"), sent = false;
  ai.addEventListener("toggle", function () { if (ai.open) form.elements["ai_shown"].value = "1"; });
  form.addEventListener("submit", function (e) { if (sent) e.preventDefault(); sent = true; });
  var keys = {"1": "left", "ArrowLeft": "left", "2": "right", "ArrowRight": "right", "3": "tie", "t": "tie",
              "4": "both-bad", "b": "both-bad", "0": "skip", "s": "skip"};
  document.addEventListener("keydown", function (e) {
    var t = e.target, tag = t && t.tagName;
    if (tag === "TEXTAREA" || tag === "INPUT" || tag === "SELECT") {
      if (e.key === "Escape") t.blur();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey || sent) return;
    if (e.key === "n") { e.preventDefault(); document.getElementById("note").focus(); return; }
    if (e.key === "i") { ai.open = !ai.open; return; }
    var choice = keys[e.key];
    if (!choice) return;
    e.preventDefault();
    document.getElementById("btn-" + choice).click();
  });
})();
"""


def page(title: str, body: str, nonce: str, script: str = "") -> str:
    js = f'<script nonce="{nonce}">{script}</script>' if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<style nonce="{nonce}">{CSS}</style></head><body>{body}{js}</body></html>\n')


def _header(s: Settings, reviewer: str, f: QueueFilter, csrf: str) -> str:
    q = urlencode(filter_params(f))
    return (f'<header><b>cai review</b><a href="/?{_e(q)}">review</a><a href="/queue?{_e(q)}">queue</a>'
            f'<a href="/stats">agreement</a><form method="post" action="/reviewer" id="who">'
            f'<input type="hidden" name="csrf" value="{_e(csrf)}"><label>reviewer '
            f'<input name="reviewer" value="{_e(reviewer)}" size="12" maxlength="64"></label> '
            f'<button>set</button></form></header>')


def _select(name: str, values: list[str], current: str, any_label: str = "any") -> str:
    opts = [f'<option value=""{" selected" if not current else ""}>{_e(any_label)}</option>']
    opts += [f'<option value="{_e(v)}"{" selected" if v == current else ""}>{_e(v)}</option>' for v in values]
    return f'<label>{_e(name)}<select name="{_e(name)}">{"".join(opts)}</select></label>'


def _filters_form(action: str, f: QueueFilter, options: dict[str, list[str]]) -> str:
    queue = "".join(f'<option value="{q}"{" selected" if q == f.queue else ""}>{q}</option>' for q in QUEUES)
    statuses = sorted(set(options["status"]) | ({"gated"} if any(s.startswith("gated:") for s in options["status"])
                                                 else set()))
    return (f'<form id="filters" method="get" action="{action}">'
            + _select("method", options["method"], f.method) + _select("status", statuses, f.status)
            + _select("principle", options["principle"], f.principle)
            + _select("version", options["version"], f.version)
            + _select("tag", options["tag"], f.tag)
            + f'<label>P(chosen) from<input name="label_min" value="{_e(filter_params(f)["label_min"])}"></label>'
            + f'<label>to<input name="label_max" value="{_e(filter_params(f)["label_max"])}"></label>'
            + f'<label>queue<select name="queue">{queue}</select></label><button>apply</button></form>')


def _gates(reply: dict[str, Any]) -> str:
    q = reply["quality"] or {}
    parts = [f"{q['words']} words" if "words" in q else ""]
    if q.get("failed"):
        parts.append("failed gates: " + ", ".join(map(str, q["failed"])))
    if "refused" in q:
        parts.append("refuses" if q["refused"] else "does not refuse")
    if reply["finish_reason"] == "length":
        parts.append("cut by the token cap")
    if q.get("repeated_trigrams"):
        parts.append(f"repeated trigrams {q['repeated_trigrams']:.2f}")
    return " · ".join(_e(p) for p in parts if p)


def _factory_label(v: dict[str, Any], left: str) -> str:
    """The fold with the factory's label, in left/right terms (what the person sees)."""
    pair: PreferencePair = v["pair"]
    side = {left: "left", review.other(left): "right"}
    d = pair.details or {}
    rows = [f"<li>the factory chose the <b>{side['chosen']}</b> reply ({_e(pair.method)}); P(chosen better) "
            f"= {pair.label_prob:.3f}; status {_e(pair.status)}</li>"]
    if pair.judge_model:
        rows.append(f"<li>judge {_e(pair.judge_model)}</li>")
    if "mean_xy" in d and "mean_yx" in d:  # mean_xy: P(x better) with x shown first; mean_yx: with y first
        if d.get("x_id") == pair.chosen_id:
            first, second = d["mean_xy"], d["mean_yx"]
        else:
            first, second = 1 - d["mean_yx"], 1 - d["mean_xy"]
        rows.append(f"<li>P(chosen better), both orders: {first:.3f} with the chosen reply shown first, "
                    f"{second:.3f} with it shown second</li>")
    for j in sorted(v["judgments"], key=lambda j: (j["principle"], (j["order"] == "xy") != j["x_is_chosen"])):
        p = j["prob_x"] if j["x_is_chosen"] else 1 - j["prob_x"]
        shown_first = (j["order"] == "xy") == j["x_is_chosen"]
        rows.append(f"<li>{_e(j['principle'])}: P(chosen better) {p:.3f}, chosen shown "
                    f"{'first' if shown_first else 'second'}</li>")
    if "scores" in d:
        scores = d["scores"] or {}
        rows.append(f"<li>reward scores: chosen {scores.get(pair.chosen_id, float('nan')):.3f}, rejected "
                    f"{scores.get(pair.rejected_id, float('nan')):.3f} (of {_e(d.get('n'))} samples)</li>")
    for s in ("chosen", "rejected"):
        steer = v["replies"][s]["steering"]
        if steer:
            rows.append(f"<li>the {side[s]} reply was steered ({_e(steer.get('kind'))}): "
                        f"<q>{_e(steer.get('text'))}</q></li>")
    rows.append(f"<li>written as: left {_e(v['replies'][left]['kind'])} by {_e(v['replies'][left]['model'])}, "
                f"right {_e(v['replies'][review.other(left)]['kind'])} by "
                f"{_e(v['replies'][review.other(left)]['model'])}</li>")
    if d.get("chain"):
        rows.append(f"<li>revision chain of {len(d['chain'])} replies: the {side['chosen']} reply is the last "
                    "revision, the other the first answer</li>")
    return ("<details id=\"ai\"><summary>The factory's label (press <kbd>i</kbd>; opening it is recorded with "
            f"your verdict)</summary><ul>{''.join(rows)}</ul></details>")


def pair_html(v: dict[str, Any], left: str, f: QueueFilter, csrf: str, reviewer: str) -> str:
    pair: PreferencePair = v["pair"]
    right = review.other(left)
    principles = "".join(f"<li><b>{_e(p)}</b>: {_e(v['principles'].get(p, ''))}</li>"
                         for p in pair.principle_ids or [])
    turns = "".join(f'<div class="role">{_e(m.get("role"))}</div><div class="text">{_e(m.get("content"))}</div>'
                    for m in v["messages"])
    sides = "".join(
        f'<section class="reply" id="reply-{name}"><h3>{name.title()} <kbd>{key}</kbd></h3>'
        f'<div class="text">{_e(v["replies"][s]["text"])}</div><div class="gates">{_gates(v["replies"][s])}</div>'
        f"</section>" for name, s, key in (("left", left, "1"), ("right", right, "2")))
    hidden = "".join(f'<input type="hidden" name="{k}" value="{_e(val)}">' for k, val in filter_params(f).items())
    buttons = "".join(f'<button type="submit" name="choice" value="{c}" id="btn-{c}">{label} <kbd>{k}</kbd></button>'
                      for c, label, k in (("left", "Left is better", "1"), ("right", "Right is better", "2"),
                                          ("tie", "Tie", "3"), ("both-bad", "Both bad", "4"), ("skip", "Skip", "0")))
    mine = [r for r in v["reviews"] if r.reviewer == reviewer and r.verdict != "skip"]
    others = len({r.reviewer for r in v["reviews"] if r.verdict != "skip"} - {reviewer})
    # your last verdict in today's sides (never "chosen": that would show the factory's label)
    before = (f"you judged this pair before ({_e(review.choice_for(mine[-1].verdict, left))}); your new verdict "
              "replaces it. " if mine else "")
    return (f'<main id="pair" data-pair="{_e(pair.id)}" data-left="{_e(left)}">'
            f'<p class="meta">pair <code>{_e(pair.id)}</code> · {_e(pair.method)} · status {_e(pair.status)} · '
            f'{_e(pair.constitution)}@{_e(pair.constitution_version)} · '
            f'prompt tags {_e(", ".join(v["tags"]) or "none")}'
            f'{" · category " + _e(v["category"]) if v["category"] else ""}</p>'
            + (f'<ul class="meta">{principles}</ul>' if principles else "")
            + f'<section class="prompt">{turns}</section><div class="sides">{sides}</div>'
            + _factory_label(v, left)
            + '<form id="verdict" method="post" action="/verdict">'
            f'<input type="hidden" name="pair" value="{_e(pair.id)}">'
            f'<input type="hidden" name="left" value="{_e(left)}"><input type="hidden" name="csrf" value="{_e(csrf)}">'
            f'<input type="hidden" name="ai_shown" value="0">{hidden}'
            f'<textarea name="note" id="note" maxlength="{MAX_NOTE}" placeholder="optional note (n; Esc leaves it)">'
            f"</textarea>{buttons}"
            f'<p class="meta">{before}{others} other {"person has" if others == 1 else "people have"} judged this '
            "pair.</p></form></main>")


def _people(n: int) -> str:
    return f"{n} {'person' if n == 1 else 'people'}"


def stats_html(st: dict[str, Any]) -> str:
    def interval(a: dict[str, Any]) -> str:
        if not a["n"]:
            return "n/a"
        return (f"{100 * a['rate']:.1f} % ({a['k']} of {a['n']}; 95 % CI {100 * a['low']:.1f} to "
                f"{100 * a['high']:.1f} %)")

    def table(head: list[str], rows: list[list[Any]]) -> str:
        return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")

    o = st["overall"]
    out = [f'<h2>Agreement with the factory</h2><p class="meta">{o["verdicts"]} verdicts on {o["pairs"]} pairs by '
           f'{_people(len(st["reviewers"]))} ({_e(", ".join(st["reviewers"]))}); each person\'s latest verdict per '
           f'pair, skips left out ({st["skips"]} skips stored). Agreement counts the verdicts that prefer one '
           "reply.</p>",
           table(["figure", "value"], [["agreement with the factory", interval(o["agreement"])],
                                       ["given before opening the factory's label", interval(st["blind"])],
                                       ["ties / both bad", f"{o['tie']} / {o['both_bad']}"],
                                       ["people agreeing with each other", interval(st["human_human"])],
                                       ["verdicts picking the left reply", interval(st["picked_left"])]])]
    for title, key in (("method", "by_method"), ("principle", "by_principle"), ("judge model", "by_judge"),
                       ("status", "by_status")):
        out.append(table([title, "verdicts", "pairs", "agreement", "ties", "both bad"],
                         [[k, g["verdicts"], g["pairs"], interval(g["agreement"]), g["tie"], g["both_bad"]]
                          for k, g in st[key].items()]))
    if st["calibration"]:
        out += ["<h3>Judge calibration: P(chosen better) against people agreeing</h3>",
                table(["bin", "mean P", "people agreeing"],
                      [[f"{c['bin'][0]:.1f}-{c['bin'][1]:.1f}", f"{c['mean_label']:.3f}", interval(c)]
                       for c in st["calibration"]])]
    return "".join(out)


def queue_html(pairs: list[PreferencePair], texts: dict[str, str], reviews: dict[str, int], f: QueueFilter,
               after: str | None, more: bool) -> str:
    q = filter_params(f)
    rows = "".join(
        f'<tr><td><a href="/?{_e(urlencode(q | {"pair": p.id}))}"><code>{_e(p.id[:12])}</code></a></td>'
        f"<td>{_e(p.method)}</td><td>{_e(p.status)}</td><td>{p.label_prob:.3f}</td>"
        f"<td>{_e(', '.join(map(str, p.principle_ids or [])))}</td><td>{reviews.get(p.id, 0)}</td>"
        f"<td>{_e(texts.get(p.prompt_id, '')[:140])}</td></tr>" for p in pairs)
    nav = (f'<a href="/queue?{_e(urlencode(q))}">first page</a> '
           + (f'<a id="next-page" href="/queue?{_e(urlencode(q | {"after": pairs[-1].id}))}">next page</a>'
              if more else ""))
    return ("<table><tr><th>pair</th><th>method</th><th>status</th><th>P(chosen)</th><th>principles</th>"
            f"<th>verdicts</th><th>prompt</th></tr>{rows}</table><p>{nav}</p>"
            + ("" if pairs or after else '<p class="meta">No pair matches these filters.</p>'))


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

    async def form(request: Request) -> dict[str, str] | None:
        body = await request.body()
        if len(body) > MAX_BODY:
            return None
        data = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        return data if hmac.compare_digest(data.get("csrf", "").encode(), csrf.encode()) else None

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
        head = _header(s, reviewer, f, csrf) + _filters_form("/", f, choices)
        note = f'<p class="error">{_e(problem)}</p>' if problem else ""
        if wanted and pair is None:
            note += f'<p class="error">no pair {_e(wanted)} in the store</p>'
        summary = f'<p class="meta">{n} pairs match these filters (queue {_e(f.queue)}, reviewer {_e(reviewer)}).</p>'
        if v is None:
            body = head + note + summary + '<p id="done">Nothing to review here: every pair matching these ' \
                                           "filters is done, or none matches. Change the filters above.</p>"
            return html_page("cai review", body, nonce)
        left = secrets.choice(review.SIDES)  # the random side, recorded with the verdict
        return html_page("cai review", head + note + summary + pair_html(v, left, f, csrf, reviewer), nonce, KEYS_JS)

    @app.post("/verdict")
    async def verdict(request: Request):
        data = await form(request)
        if data is None:
            return deny(403, "the form's anti-forgery value is missing or wrong: reload the page")
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
        if data is None:
            return deny(403, "the form's anti-forgery value is missing or wrong: reload the page")
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
            texts = _prompt_texts(session, pairs)
            reviews = _review_counts(session, pairs)
            n = count(session, f)
        body = (_header(s, reviewer, f, csrf) + _filters_form("/queue", f, choices)
                + (f'<p class="error">{_e(problem)}</p>' if problem else "")
                + f'<p class="meta">{n} pairs match; {s.page_size} a page, in pair id order.</p>'
                + queue_html(pairs, texts, reviews, f, after, more))
        return html_page("cai review: queue", body, nonce)

    @app.get("/stats")
    def stats_page(request: Request):
        nonce = secrets.token_urlsafe(16)
        reviewer = reviewer_of(request)
        with session_scope(s.database_url) as session:
            st = review.compute(review.verdict_from_row(r) for r in verdict_rows(session))
        body = _header(s, reviewer, replace(s.defaults, reviewer=reviewer), csrf) + stats_html(st)
        return html_page("cai review: agreement", body, nonce)

    return app


def _prompt_texts(session, pairs: list[PreferencePair]) -> dict[str, str]:
    from sqlmodel import col, select

    ids = list({p.prompt_id for p in pairs})
    return dict(session.exec(select(Prompt.id, Prompt.text).where(col(Prompt.id).in_(ids))).all()) if ids else {}


def _review_counts(session, pairs: list[PreferencePair]) -> dict[str, int]:
    from sqlalchemy import func
    from sqlmodel import col, select

    ids = [p.id for p in pairs]
    if not ids:
        return {}
    return dict(session.exec(select(Review.pair_id, func.count()).where(col(Review.pair_id).in_(ids),
                                                                         Review.verdict != "skip")
                             .group_by(Review.pair_id)).all())


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


# --- stats, export, import ------------------------------------------------------------------------------------

def stats(database_url: str | None = None, constitution: str | None = None) -> dict[str, Any]:
    with session_scope(database_url) as session:
        return review.compute(review.verdict_from_row(r) for r in verdict_rows(session, constitution=constitution))


def export_records(cfg: ReviewConfig, out: Path, limit: int | None = None) -> int:
    """The queue's pairs (cfg's filters, queue `all` unless set) as JSONL records; returns how many."""
    f = default_filter(cfg)
    if "queue" not in cfg.model_fields_set:  # a file for another tool: every pair, reviewed or not
        f = replace(f, queue="all")
    n = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    with session_scope(cfg.database_url) as session, tmp.open("w", encoding="utf-8", newline="\n") as fh:
        batch: list[tuple[PreferencePair, list[dict[str, Any]], dict[str, str]]] = []

        def flush() -> None:
            ids = [p.id for p, _, _ in batch]
            per: dict[str, list[review.Verdict]] = {}
            for row in verdict_rows(session, pair_ids=ids):
                v = review.verdict_from_row(row)
                per.setdefault(v.pair_id, []).append(v)
            for p, messages, texts in batch:
                fh.write(json.dumps(review.to_record(p, messages, texts, per.get(p.id, [])), ensure_ascii=False) + "\n")
            batch.clear()

        for item in export_rows(session, f, limit):
            batch.append(item)
            n += 1
            if len(batch) >= 500:
                flush()
        flush()
    tmp.replace(out)
    return n


def import_records(path: Path, database_url: str | None = None) -> dict[str, int]:
    """People's verdicts from JSONL records (`cai review export`, or another tool's records of the same
    shape). Every line is checked before anything is written; a verdict that is already the reviewer's
    current one on that pair is skipped, so importing a file twice adds nothing."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    records: list[tuple[int, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{n}: not JSON ({exc.msg})") from None
    source = f"import:{path.name}"
    with session_scope(database_url) as session:
        known = chosen_ids(session, [r.get("id") for _, r in records if isinstance(r, dict)
                                     and isinstance(r.get("id"), str)])
        verdicts: list[review.Imported] = []
        for n, rec in records:
            try:
                verdicts += review.from_record(rec, known)
            except ValueError as exc:
                raise UserError(f"{path}:{n}: {exc}; nothing was imported") from None
        current = current_verdicts(session, [v.pair_id for v in verdicts])
        now = utcnow()
        rows, same = [], 0
        for v in verdicts:
            if current.get((v.pair_id, v.reviewer)) == (v.verdict, v.note):
                same += 1
                continue
            current[(v.pair_id, v.reviewer)] = (v.verdict, v.note)
            rows.append(Review(id=review.review_key(v.pair_id, v.reviewer, now, v.verdict, v.left, v.note, source),
                               pair_id=v.pair_id, reviewer=v.reviewer, verdict=v.verdict, left=v.left, note=v.note,
                               source=source, created_at=now))
        added = add_reviews(session, rows)
    return {"records": len(records), "verdicts": len(verdicts), "added": added, "already_known": same}
