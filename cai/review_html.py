"""The HTML of `cai review` (flows/review.py serves it): one pair, the queue list, the agreement page.

    cai review                      # the page; these functions write every byte of it

Pure functions returning strings. The queue's filters arrive as their query parameters (`q`,
store.reviews.filter_params), so links and forms carry them on. Every value from the store goes
through `esc` (html.escape); the page's only script is KEYS_JS, run under the nonce of the
response's Content-Security-Policy (`csp`). Nothing here reads the store.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

from cai import review
from store.models import PreferencePair

MAX_NOTE = 4000  # characters of a note; the form says so and the server cuts longer ones


def esc(value: Any) -> str:
    """Any value as HTML text (attribute-safe)."""
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
  function shown() { if (ai.open) form.elements["ai_shown"].value = "1"; }
  // "toggle" is dispatched later as a task: a verdict key pressed right after "i" must already see it shown
  ai.addEventListener("toggle", shown);
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
    if (e.key === "i") { ai.open = !ai.open; shown(); return; }
    var choice = keys[e.key];
    if (!choice) return;
    e.preventDefault();
    document.getElementById("btn-" + choice).click();
  });
})();
"""


def csp(nonce: str) -> str:
    """The Content-Security-Policy of a page: only its own style and script, by nonce."""
    return (f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; form-action 'self'; "
            "base-uri 'none'; frame-ancestors 'none'")


def page(title: str, body: str, nonce: str, script: str = "") -> str:
    js = f'<script nonce="{nonce}">{script}</script>' if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<style nonce="{nonce}">{CSS}</style></head><body>{body}{js}</body></html>\n')


def header(reviewer: str, q: dict[str, str], csrf: str) -> str:
    query = urlencode(q)
    return (f'<header><b>cai review</b><a href="/?{esc(query)}">review</a><a href="/queue?{esc(query)}">queue</a>'
            f'<a href="/stats">agreement</a><form method="post" action="/reviewer" id="who">'
            f'<input type="hidden" name="csrf" value="{esc(csrf)}"><label>reviewer '
            f'<input name="reviewer" value="{esc(reviewer)}" size="12" maxlength="64"></label> '
            f'<button>set</button></form></header>')


def _select(name: str, values: list[str], current: str, any_label: str = "any") -> str:
    opts = [f'<option value=""{" selected" if not current else ""}>{esc(any_label)}</option>']
    opts += [f'<option value="{esc(v)}"{" selected" if v == current else ""}>{esc(v)}</option>' for v in values]
    return f'<label>{esc(name)}<select name="{esc(name)}">{"".join(opts)}</select></label>'


def filters_form(action: str, q: dict[str, str], options: dict[str, list[str]], queues: Sequence[str]) -> str:
    queue = "".join(f'<option value="{n}"{" selected" if n == q["queue"] else ""}>{n}</option>' for n in queues)
    statuses = sorted(set(options["status"]) | ({"gated"} if any(s.startswith("gated:") for s in options["status"])
                                                 else set()))
    return (f'<form id="filters" method="get" action="{action}">'
            + _select("method", options["method"], q["method"]) + _select("status", statuses, q["status"])
            + _select("principle", options["principle"], q["principle"])
            + _select("version", options["version"], q["version"])
            + _select("tag", options["tag"], q["tag"])
            + f'<label>P(chosen) from<input name="label_min" value="{esc(q["label_min"])}"></label>'
            + f'<label>to<input name="label_max" value="{esc(q["label_max"])}"></label>'
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
    return " · ".join(esc(p) for p in parts if p)


def _factory_label(v: dict[str, Any], left: str) -> str:
    """The fold with the factory's label, in left/right terms (what the person sees)."""
    pair: PreferencePair = v["pair"]
    side = {left: "left", review.other(left): "right"}
    d = pair.details or {}
    rows = [f"<li>the factory chose the <b>{side['chosen']}</b> reply ({esc(pair.method)}); P(chosen better) "
            f"= {pair.label_prob:.3f}; status {esc(pair.status)}</li>"]
    if pair.judge_model:
        rows.append(f"<li>judge {esc(pair.judge_model)}</li>")
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
        rows.append(f"<li>{esc(j['principle'])}: P(chosen better) {p:.3f}, chosen shown "
                    f"{'first' if shown_first else 'second'}</li>")
    if "scores" in d:
        scores = d["scores"] or {}
        rows.append(f"<li>reward scores: chosen {scores.get(pair.chosen_id, float('nan')):.3f}, rejected "
                    f"{scores.get(pair.rejected_id, float('nan')):.3f} (of {esc(d.get('n'))} samples)</li>")
    for s in ("chosen", "rejected"):
        steer = v["replies"][s]["steering"]
        if steer:
            rows.append(f"<li>the {side[s]} reply was steered ({esc(steer.get('kind'))}): "
                        f"<q>{esc(steer.get('text'))}</q></li>")
    rows.append(f"<li>written as: left {esc(v['replies'][left]['kind'])} by {esc(v['replies'][left]['model'])}, "
                f"right {esc(v['replies'][review.other(left)]['kind'])} by "
                f"{esc(v['replies'][review.other(left)]['model'])}</li>")
    if d.get("chain"):
        rows.append(f"<li>revision chain of {len(d['chain'])} replies: the {side['chosen']} reply is the last "
                    "revision, the other the first answer</li>")
    return ("<details id=\"ai\"><summary>The factory's label (press <kbd>i</kbd>; opening it is recorded with "
            f"your verdict)</summary><ul>{''.join(rows)}</ul></details>")


def pair_html(v: dict[str, Any], left: str, q: dict[str, str], csrf: str, reviewer: str) -> str:
    pair: PreferencePair = v["pair"]
    right = review.other(left)
    principles = "".join(f"<li><b>{esc(p)}</b>: {esc(v['principles'].get(p, ''))}</li>"
                         for p in pair.principle_ids or [])
    turns = "".join(f'<div class="role">{esc(m.get("role"))}</div><div class="text">{esc(m.get("content"))}</div>'
                    for m in v["messages"])
    sides = "".join(
        f'<section class="reply" id="reply-{name}"><h3>{name.title()} <kbd>{key}</kbd></h3>'
        f'<div class="text">{esc(v["replies"][s]["text"])}</div><div class="gates">{_gates(v["replies"][s])}</div>'
        f"</section>" for name, s, key in (("left", left, "1"), ("right", right, "2")))
    hidden = "".join(f'<input type="hidden" name="{k}" value="{esc(val)}">' for k, val in q.items())
    buttons = "".join(f'<button type="submit" name="choice" value="{c}" id="btn-{c}">{label} <kbd>{k}</kbd></button>'
                      for c, label, k in (("left", "Left is better", "1"), ("right", "Right is better", "2"),
                                          ("tie", "Tie", "3"), ("both-bad", "Both bad", "4"), ("skip", "Skip", "0")))
    mine = [r for r in v["reviews"] if r.reviewer == reviewer and r.verdict != "skip"]
    others = len({r.reviewer for r in v["reviews"] if r.verdict != "skip"} - {reviewer})
    # your last verdict in today's sides (never "chosen": that would show the factory's label)
    before = (f"you judged this pair before ({esc(review.choice_for(mine[-1].verdict, left))}); your new verdict "
              "replaces it. " if mine else "")
    return (f'<main id="pair" data-pair="{esc(pair.id)}" data-left="{esc(left)}">'
            f'<p class="meta">pair <code>{esc(pair.id)}</code> · {esc(pair.method)} · status {esc(pair.status)} · '
            f'{esc(pair.constitution)}@{esc(pair.constitution_version)} · '
            f'prompt tags {esc(", ".join(v["tags"]) or "none")}'
            f'{" · category " + esc(v["category"]) if v["category"] else ""}</p>'
            + (f'<ul class="meta">{principles}</ul>' if principles else "")
            + f'<section class="prompt">{turns}</section><div class="sides">{sides}</div>'
            + _factory_label(v, left)
            + '<form id="verdict" method="post" action="/verdict">'
            f'<input type="hidden" name="pair" value="{esc(pair.id)}">'
            f'<input type="hidden" name="left" value="{esc(left)}">'
            f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
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
        return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")

    o = st["overall"]
    out = [f'<h2>Agreement with the factory</h2><p class="meta">{o["verdicts"]} verdicts on {o["pairs"]} pairs by '
           f'{_people(len(st["reviewers"]))} ({esc(", ".join(st["reviewers"]))}); each person\'s latest verdict per '
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


def queue_html(pairs: list[PreferencePair], texts: dict[str, str], reviews: dict[str, int], q: dict[str, str],
               after: str | None, more: bool) -> str:
    rows = "".join(
        f'<tr><td><a href="/?{esc(urlencode(q | {"pair": p.id}))}"><code>{esc(p.id[:12])}</code></a></td>'
        f"<td>{esc(p.method)}</td><td>{esc(p.status)}</td><td>{p.label_prob:.3f}</td>"
        f"<td>{esc(', '.join(map(str, p.principle_ids or [])))}</td><td>{reviews.get(p.id, 0)}</td>"
        f"<td>{esc(texts.get(p.prompt_id, '')[:140])}</td></tr>" for p in pairs)
    nav = (f'<a href="/queue?{esc(urlencode(q))}">first page</a> '
           + (f'<a id="next-page" href="/queue?{esc(urlencode(q | {"after": pairs[-1].id}))}">next page</a>'
              if more else ""))
    return ("<table><tr><th>pair</th><th>method</th><th>status</th><th>P(chosen)</th><th>principles</th>"
            f"<th>verdicts</th><th>prompt</th></tr>{rows}</table><p>{nav}</p>"
            + ("" if pairs or after else '<p class="meta">No pair matches these filters.</p>'))




# --- the pages: what each route of flows/review.py answers --------------------------------------------------

def errors(*problems: str) -> str:
    return "".join(f'<p class="error">{esc(p)}</p>' for p in problems if p)


def top(reviewer: str, q: dict[str, str], csrf: str, action: str, options: dict[str, list[str]],
        queues: Sequence[str]) -> str:
    """The header and the filters form every page but the agreement page opens with."""
    return header(reviewer, q, csrf) + filters_form(action, q, options, queues)


def pair_page(nonce: str, head: str, problems: Sequence[str], n: int, q: dict[str, str], reviewer: str,
                v: dict[str, Any] | None, left: str, csrf: str) -> str:
    """One pair to judge (v, `left` the side shown left), or the note that none is left."""
    body = (head + errors(*problems)
            + f'<p class="meta">{n} pairs match these filters (queue {esc(q["queue"])}, reviewer {esc(reviewer)}).</p>')
    if v is None:
        return page("cai review", body + '<p id="done">Nothing to review here: every pair matching these filters '
                    "is done, or none matches. Change the filters above.</p>", nonce)
    return page("cai review", body + pair_html(v, left, q, csrf, reviewer), nonce, KEYS_JS)


def queue_list_page(nonce: str, head: str, problems: Sequence[str], n: int, page_size: int, pairs: list[PreferencePair],
               texts: dict[str, str], reviews: dict[str, int], q: dict[str, str], after: str | None,
               more: bool) -> str:
    body = (head + errors(*problems) + f'<p class="meta">{n} pairs match; {page_size} a page, in pair id order.</p>'
            + queue_html(pairs, texts, reviews, q, after, more))
    return page("cai review: queue", body, nonce)


def agreement_page(nonce: str, reviewer: str, q: dict[str, str], csrf: str, st: dict[str, Any]) -> str:
    return page("cai review: agreement", header(reviewer, q, csrf) + stats_html(st), nonce)
