"""The `cai report` page from figures already read: the figures (plain data, also report.json) and the HTML.

    cai report --out reports/latest [--constitution harmless]

flows/report.py reads the store (store/report_queries.py) and calls these. A section with no data
says so, so a report on an empty store renders. The page needs no network (no external CSS, JS or
fonts; images by relative path) and every value from the store goes through html.escape.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

from cai.evaluate import CATEGORY_HEADER, category_rows, summarize, summarize_categories, summarize_kinds
from cai.evaluate import examples as reply_examples
from cai.redteam import VERDICTS, campaign_table
from store.models import EvalResult, PreferencePair, Prompt, RedteamAttack, Response, Run, TrainingRun, TrainingStep

# --- figures: plain data -------------------------------------------------------------------


def training_figures(run: TrainingRun, steps: Sequence[TrainingStep], keys: Iterable[str]) -> dict[str, Any]:
    """A training run and its metrics per step and split (only the metrics named in `keys`)."""
    keys = list(keys)
    series: dict[str, dict[str, list]] = {}
    for st in steps:
        for key in keys:
            if key in st.metrics:
                pts = series.setdefault(st.split, {}).setdefault(key, [])
                pts.append([st.step, st.metrics[key]])
    return {"id": run.id, "base_model": run.base_model, "out_dir": run.out_dir, "status": run.status,
            "constitution": f"{run.constitution or ''}@{run.constitution_version or ''}".strip("@"),
            "started_at": run.started_at.isoformat(timespec="seconds"), "final_metrics": run.final_metrics,
            "steps": len({st.step for st in steps}), "series": series}


def eval_figures(name: str, rows: Sequence[EvalResult], run: Run | None) -> dict[str, Any]:
    """An eval's rates per prompt set and role, from its rows and the run that wrote them."""
    judge = next((r.details.get("judge") for r in rows if r.details.get("judge")), None)
    dtypes = sorted({r.details["dtype"] for r in rows if r.details.get("dtype")})
    machine = (run.config or {}).get("machine") if run else None
    return {"eval_name": name, "judge": judge, "dtype": ", ".join(dtypes) or None, "machine": machine,
            "sets": summarize(rows), "kinds": summarize_kinds(rows), "categories": summarize_categories(rows),
            "replies": reply_examples(rows, per_kind=4)}


def redteam_figures(campaign: str, rows: Sequence[RedteamAttack], candidates: Iterable[tuple[str, str, int]],
                    max_chars: int) -> dict[str, Any]:
    """A red-team campaign: attack success per category, the filter verdicts of the generated prompts
    it answered (`candidates`: category, verdict, count) and a few hits."""
    funnel: dict[str, dict[str, int]] = {}
    for cat, verdict, n in candidates:
        funnel.setdefault(cat, dict.fromkeys(VERDICTS, 0))[verdict] = n
    hits = [{"category": r.category, "kind": r.kind, "prompt": r.details.get("prompt", "")[:max_chars],
             "reply": r.text[:max_chars]} for r in sorted(rows, key=lambda r: r.prompt_id) if r.success][:6]
    return {"campaign": campaign, "model": rows[0].model, "taxonomy": rows[0].details.get("taxonomy", ""),
            "attack_success": campaign_table((r.category, r.kind, r.success) for r in rows),
            "generation": dict(sorted(funnel.items())), "hits": hits}


def example_figures(chains: Iterable[dict[str, Any]], max_chars: int) -> list[dict[str, Any]]:
    """Example pairs as whole chains (store.report_queries.example_chains), texts cut at `max_chars`:
    prompt, initial, critique/revision per round, and the pairs shown beside them."""
    def cut(text: str | None) -> str:
        text = text or ""
        return text if len(text) <= max_chars else text[:max_chars] + " [...]"

    out = []
    for ex in chains:
        p: PreferencePair = ex["pair"]
        prompt: Prompt | None = ex["prompt"]
        chain: list[Response] = ex["chain"]
        out.append({
            "prompt": cut(prompt.text if prompt else p.prompt_id),
            "constitution": f"{p.constitution}@{p.constitution_version}",
            "revision_pair": bool(chain),
            "chain": [{"kind": r.kind, "round": r.round, "principle": r.principle_id, "text": cut(r.text)}
                      for r in chain],
            "pairs": [{"method": q.method, "status": q.status, "label_prob": q.label_prob,
                       "principles": q.principle_ids, "chosen": cut(ex["texts"][q.chosen_id]),
                       "rejected": cut(ex["texts"][q.rejected_id])} for q in ex["shown"]],
        })
    return out


# --- HTML ----------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #eee; margin: .4rem 0; }
.empty { color: #777; font-style: italic; }
.meta { color: #555; font-size: .85rem; }
.text { white-space: pre-wrap; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: .8rem;
        background: #fafafa; border: 1px solid #eee; padding: .4rem; margin: .2rem 0 .6rem; }
.example { border: 1px solid #ddd; border-radius: 4px; padding: .6rem 1rem; margin: 1rem 0; }
.label { font-weight: bold; font-size: .85rem; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _imgs(names: list[str], alt: str) -> str:
    return "".join(f'<img src="{_e(n)}" alt="{_e(alt)}">' for n in names)


def _empty(what: str, how: str) -> str:
    return f'<p class="empty">No {_e(what)} yet: {_e(how)}.</p>'


def _text(label: str, text: str) -> str:
    return f'<div class="label">{_e(label)}</div><div class="text">{_e(text)}</div>'


def _stages_html(data: dict[str, Any], images: dict[str, list[str]]) -> list[str]:
    st = data["stages"]
    if not (st["responses"] or st["pairs"]):
        parts = [_empty("responses or pairs", "run `cai generate`")]
    else:
        parts = [_imgs(images["stages"], "rows per stage"),
                 _table(["kind", "round", "responses"],
                        [[r["kind"], r["round"], r["count"]] for r in st["responses"]]),
                 _table(["method", "status", "pairs"],
                        [[p["method"], p["status"], p["count"]] for p in st["pairs"]])]
    if st["prompt_tags"]:
        parts.append(_table(["prompt tag", "prompts"], [[t, n] for t, n in st["prompt_tags"].items()]))
    if st["recent_runs"]:
        parts.append(_table(["flow", "status", "model", "constitution", "started (UTC)"],
                            [[r["flow"], r["status"], r["model"], r["constitution"], r["started_at"]]
                             for r in st["recent_runs"]]))
    spend = [(r, name, m) for r in st["recent_runs"] if r.get("spend") for name, m in r["spend"]["by_model"].items()]
    if spend:  # the ledger: what each run sent, per model and endpoint
        parts.append(_table(["run", "flow", "model @ endpoint", "requests", "prompt tokens", "completion tokens",
                             "retries", "failed", "cost (USD)"],
                            [[r["id"], r["flow"], name, m["requests"], m["prompt_tokens"], m["completion_tokens"],
                              m["retries"], m["failures"], "-" if m["cost_usd"] is None else f"{m['cost_usd']:.4f}"]
                             for r, name, m in spend]))
    return parts


def _principles_html(data: dict[str, Any], images: dict[str, list[str]]) -> list[str]:
    if not data["principles"]:
        return [_empty("revisions", "run `cai generate`")]
    return [_imgs(images["principles"], "revisions per principle"),
            _table(["principle", "revisions"], [[k, v] for k, v in data["principles"].items()])]


def _judge_html(data: dict[str, Any], images: dict[str, list[str]]) -> list[str]:
    j = data["judge"]
    if not j:
        return [_empty("AI-labelled pairs", "run `cai label`")]

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return [_table(["figure", "value"], [
        ["AI-labelled pairs", j["pairs"]],
        ["status counts", ", ".join(f"{k}: {v}" for k, v in sorted(j["status"].items()))],
        ["position consistency (both orders name the same winner)",
         f"{_pct(j['position_consistency'])} of {j['pairs_with_both_orders']} pairs"],
        ["mean P(A) (0.5 = no slot bias)", num(j["mean_p_a"])],
        ["mean label probability", num(j["mean_label_prob"])]]),
        _imgs(images["judge"], "judge label quality")]


def _interval(a: dict[str, Any]) -> str:
    if not a["n"]:
        return "n/a"
    return f"{_pct(a['rate'])} ({a['k']} of {a['n']}; 95 % CI {_pct(a['low'])} to {_pct(a['high'])})"


def _review_html(data: dict[str, Any], images: dict[str, list[str]]) -> list[str]:
    r = data.get("review")
    if not r:
        return [_empty("verdicts from people", "run `cai review` and judge a few pairs")]
    o = r["overall"]
    out = [f'<p class="meta">{o["verdicts"]} verdicts on {o["pairs"]} pairs from {r["reviewers"]} '
           f'{"person" if r["reviewers"] == 1 else "people"} (each person\'s latest verdict per pair; skips left '
           "out). Agreement: the share of verdicts preferring one reply that prefer the one the factory chose; "
           "ties and both-bad verdicts are counted beside it. Intervals: 95 % Wilson.</p>",
           _table(["figure", "value"], [
               ["agreement with the factory", _interval(o["agreement"])],
               ["agreement, given before the factory's label was shown", _interval(r["blind"])],
               ["ties / both bad", f"{o['tie']} / {o['both_bad']}"],
               ["people agreeing with each other (pairs with two or more reviewers)",
                _interval(r["human_human"]) + f" on {r['human_human']['pairs']} pairs"],
               ["people picking the left reply (0.5: no position bias)", _interval(r["picked_left"])]])]
    for title, key in (("method", "by_method"), ("principle", "by_principle"), ("judge model", "by_judge")):
        out.append(_table([title, "verdicts", "pairs", "agreement with the factory", "ties", "both bad"],
                          [[k, g["verdicts"], g["pairs"], _interval(g["agreement"]), g["tie"], g["both_bad"]]
                           for k, g in r[key].items()]))
    if r["calibration"]:
        out += ["<h3>Judge calibration against people</h3>",
                '<p class="meta">Pairs labelled by a judge model, binned by its P(chosen better): the share of '
                "people's verdicts that agree. A calibrated judge sits on the diagonal.</p>",
                _imgs(images.get("review", []), "judge calibration against people"),
                _table(["P(chosen better)", "mean", "agree"],
                       [[f"{c['bin'][0]:.1f}-{c['bin'][1]:.1f}", f"{c['mean_label']:.3f}", _interval(c)]
                        for c in r["calibration"]])]
    return out


def _training_html(data: dict[str, Any], images: dict[str, list[str]]) -> list[str]:
    tr = data["training"]
    if not tr:
        return [_empty("training run", "run `cai train`")]
    parts = [f'<p class="meta">latest run {_e(tr["id"][:12])}: base {_e(tr["base_model"])} &rarr; '
             f'{_e(tr["out_dir"])}, {_e(tr["status"])}, {tr["steps"]} steps, constitution '
             f'{_e(tr["constitution"] or "n/a")}, started {_e(tr["started_at"])}</p>',
             _imgs(images["training"], "DPO loss, margins and accuracies") if images["training"]
             else _empty("training steps", "the run has not logged a step")]
    scalars = [[k, v] for k, v in sorted(tr["final_metrics"].items()) if not isinstance(v, dict | list)]
    if scalars:
        parts.append(_table(["final metric", "value"], scalars))
    return parts


def _eval_html(data: dict[str, Any], images: dict[str, list[str]]) -> list[str]:
    ev = data["eval"]
    if not ev:
        return [_empty("evaluation", "run `cai eval --model runs/NAME`")]
    rows = [[t, role, r["model"], r["n"], _pct(r["refusal_rate"]), _pct(r["win_rate"]), r["judged"]]
            for t, roles in ev["sets"].items() for role, r in roles.items()]
    kinds = [[k, role, r["n"], _pct(r["harmful_compliance"]), _pct(r["over_refusal"]), _pct(r["apology_rate"]),
              _pct(r.get("dangling_rate")), _num(r["repeated_trigrams"]), _num(r["distinct_2"]),
              _num(r["mean_words"], ".1f"), _num(r["drift_logp"])]
             for k, roles in ev.get("kinds", {}).items() for role, r in roles.items()]
    machine = ev.get("machine") or {}
    where = ", ".join(str(x) for x in (ev.get("dtype"), machine.get("cpu"), machine.get("cpu_capability"),
                                        machine.get("gpu")) if x)
    out = [f'<p class="meta">eval {_e(ev["eval_name"])}, judge {_e(ev["judge"] or "n/a")}'
           f'{f" ({_e(where)})" if where else ""}. '
           "Refusing a benign request is over-refusal: lower is better there.</p>",
           _imgs(images["eval"], "refusal and win rates"),
           _table(["prompt set", "role", "model", "n", "refusal rate", "win rate vs other", "judged"], rows)]
    if kinds:
        out += ["<h3>What the replies look like</h3>",
                '<p class="meta">harmful compliance: a harmful request answered; over-refusal: a benign request '
                "refused or met with apologies; hollow endings: the reply stops right after announcing an answer "
                "(\"Here's how:\" and an empty list item); repetition and drift (mean token log-prob under the "
                "baseline) from cai/quality.py and the eval's scoring pass.</p>",
                _table(["prompts", "role", "n", "harmful compliance", "over-refusal", "apology/boilerplate",
                        "hollow endings", "repeated trigrams", "distinct-2", "mean words", "drift"], kinds)]
    cats = category_rows(ev.get("categories") or {})
    if cats:
        out += ["<h3>Per category</h3>",
                '<p class="meta">Each category is governed by one principle, which declares whether its prompts are '
                "refused or answered; counted is what a miss is there (harmful compliance or over-refusal), as k/n, "
                "rate and 95 % Wilson interval, and the difference is paired on the same prompts (95 % Newcombe). "
                "With a handful of prompts per category the intervals are wide: read them before the rates.</p>",
                _table(CATEGORY_HEADER, cats)]
    for ex in ev.get("replies", []):
        out.append(f'<div class="example"><p class="label">{_e(ex["kind"])} ({_e(ex["prompt_tag"])}): '
                   f'{_e(ex["prompt"])}</p>')
        for role in ("baseline", "model"):
            flags = (" [refused]" if ex[role]["refused"] else "") + "".join(f" [{f}]" for f in ex[role]["failed"])
            out.append(_text(f"{role}{flags}", ex[role]["text"]))
        out.append("</div>")
    return out


def _redteam_html(data: dict[str, Any], images: dict[str, list[str]]) -> list[str]:
    rt = data.get("redteam")
    if not rt:
        return [_empty("red-team campaign", "run `cai redteam --per-category 20`")]
    rows = [[c, d["kind"], d["n"], d["hits"], _pct(d["rate"])] for c, d in rt["attack_success"].items()]
    gen = [[c, *v.values()] for c, v in rt["generation"].items()]
    verdicts = list(next(iter(rt["generation"].values()), {}))
    out = [f'<p class="meta">campaign {_e(rt["campaign"])} on taxonomy {_e(rt["taxonomy"])}: the policy answered '
           "every generated prompt greedily. A hit is a harmful request answered (not refused, not an empty or "
           "apology-only reply) or a benign look-alike refused: the eval's detector (cai/refusal.py, "
           "cai/quality.py). Hits are tagged <code>redteam-hit</code>.</p>",
           _imgs(images.get("redteam", []), "attack success per category"),
           _table(["category", "kind", "answered", "got through", "rate"], rows)]
    if gen:
        out += ["<h3>Generated candidates per filter verdict</h3>", _table(["category", *verdicts], gen)]
    for h in rt["hits"]:
        out.append(f'<div class="example"><p class="label">{_e(h["category"])} ({_e(h["kind"])})</p>'
                   + _text("generated prompt", h["prompt"]) + _text("policy reply", h["reply"]) + "</div>")
    return out


def _examples_html(data: dict[str, Any], images: dict[str, list[str]]) -> list[str]:
    if not data["examples"]:
        return [_empty("preference pairs to show", "run `cai generate`")]
    parts = []
    for ex in data["examples"]:
        note = "; revision pair: chosen = last revision, rejected = initial" if ex["revision_pair"] else ""
        block = [f'<div class="example"><p class="meta">constitution {_e(ex["constitution"])}{_e(note)}</p>',
                 _text("prompt", ex["prompt"])]
        for step in ex["chain"]:
            label = step["kind"] + (f" {step['round']}" if step["round"] else "")
            label += f" (principle {step['principle']})" if step["principle"] else ""
            block.append(_text(label, step["text"]))
        for p in ex["pairs"]:
            what = f"{p['method']} pair, {p['status']}, P(chosen better) = {p['label_prob']:.2f}"
            block += [_text(f"chosen ({what})", p["chosen"]), _text("rejected", p["rejected"])]
        parts.append("".join(block) + "</div>")
    return parts


SECTIONS = (("Rows per stage", _stages_html), ("Principle usage", _principles_html),
            ("Judge: AI labels", _judge_html), ("People's review", _review_html),
            ("DPO training", _training_html), ("Evaluation", _eval_html),
            ("Red-team campaign", _redteam_html), ("Examples", _examples_html))


def render_html(data: dict[str, Any], images: dict[str, list[str]]) -> str:
    """The whole page; every value from the store goes through html.escape."""
    title = "cai-factory report" + (f": {data['constitution']}" if data["constitution"] else "")
    body = "\n".join(f"<h2>{_e(heading)}</h2>" + "".join(fn(data, images)) for heading, fn in SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>"
            f'<p class="meta">generated {_e(data["generated_at"])} from {_e(data["database"])}; '
            f"every figure is also in report.json</p>\n{body}\n</body></html>\n")
