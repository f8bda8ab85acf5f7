"""Terminal rendering of what the flows return: rich tables, every stored value escaped.

Stored text (prompts, tags, model names, error messages) can contain `[...]`, which rich would
read as markup; `esc` makes it print as it is.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape


def esc(value: Any) -> str:
    return escape("" if value is None else str(value))


def render_status(data: dict[str, Any], console) -> None:
    from rich.table import Table

    console.print(f"database: {esc(data['database'])} (schema {esc(data['schema_revision'])})", highlight=False)
    t = Table("table", "rows", title="tables")
    for name, n in data["tables"].items():
        t.add_row(esc(name), str(n))
    console.print(t)
    if data["responses"]:
        t = Table("stage", "responses", title="responses per stage")
        for name, n in data["responses"].items():
            t.add_row(esc(name), str(n))
        console.print(t)
    if data["pairs"]:
        t = Table("constitution", "method", "status", "pairs", title="preference pairs")
        for p in data["pairs"]:
            t.add_row(esc(p["constitution"]), esc(p["method"]), esc(p["status"]), str(p["count"]))
        console.print(t)
    if data.get("principles"):
        t = Table("constitution", "principle", "pairs", "ok", "kept out", title="pairs per principle "
                  "(ok: trains and exports; kept out: gated, tied or position-inconsistent)")
        for p in data["principles"]:
            t.add_row(esc(p["constitution"]), esc(p["principle"]), str(p["pairs"]), str(p["ok"]), str(p["kept_out"]))
        console.print(t)
    f = data["failures"]
    console.print(f"failures: {f['retrying']} retrying, [bold]{f['quarantined']} quarantined[/]"
                  + (" (skipped by every run; once their cause is fixed, `cai db release-quarantine "
                     "[--stage STAGE]` lets the next run try them again)" if f["quarantined"] else ""))
    if f["items"]:
        t = Table("stage", "item", "attempts", "quarantined", "error", title="recent failures")
        for i in f["items"]:
            t.add_row(esc(i["stage"]), esc(i["key"][:16]), str(i["attempts"]), "yes" if i["quarantined"] else "",
                      esc(i["error"]))
        console.print(t)
    if data.get("workers"):
        t = Table("worker", "host", "runs", "running", "claimed", "done", "failed", "holding now", "last update",
                  title="work per worker (claimed includes items taken over from a dead worker)")
        for w in data["workers"]:
            t.add_row(esc(w["worker"] or "(cai command)"), esc(w["host"]), str(w["runs"]), str(w["running"]),
                      str(w["claimed"]), str(w["done"]), str(w["failed"]), str(w["holding"]), esc(w["last_seen"]))
        console.print(t)
    if data["runs"]:
        t = Table("run", "flow", "status", "model", "constitution", "started", title="recent runs")
        for r in data["runs"]:
            t.add_row(*(esc(r[k]) for k in ("id", "flow", "status", "model", "constitution", "started_at")))
        console.print(t)
    if spend := [(r["id"], r["flow"], r["spend"]) for r in data["runs"] if r.get("spend")]:
        t = Table("run", "flow", "model @ endpoint", "requests", "prompt tokens", "completion tokens", "retries",
                  "failed", "cost", title="spend per run (the ledger)")
        for rid, flow, sp in spend:
            for name, m in sp["by_model"].items():
                t.add_row(esc(rid), esc(flow), esc(name), str(m["requests"]), f"{m['prompt_tokens']:,}",
                          f"{m['completion_tokens']:,}", str(m["retries"]), str(m["failures"]), money(m["cost_usd"]))
        console.print(t)


def money(usd: float | None) -> str:
    return "-" if usd is None else f"${usd:,.4f}"


def render_plan(flow_name: str, summary: dict[str, Any], console) -> None:
    """A dry run: per stage, what is pending and what computing it would send."""
    from rich.table import Table

    t = Table("stage", "items", "already done", "pending", "requests", "~prompt tokens", "~completion tokens",
              "~cost at most", title=f"{flow_name} dry run: nothing was sent")
    total = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for name, st in summary.get("stages", {}).items():
        plan = st.get("dry_run") or {}
        model = plan.get("model_calls", False)
        t.add_row(esc(name), str(st["items"]), str(st["done_before"]), str(plan.get("pending", 0)),
                  str(plan.get("requests", 0)) if model else "no model",
                  f"{plan.get('prompt_tokens', 0):,}", f"{plan.get('completion_tokens', 0):,}",
                  money(plan.get("cost_usd_at_most")))
        for k in total:
            total[k] += plan.get(k, 0)
    console.print(t)
    console.print(f"would send {total['requests']:,} requests, about {total['prompt_tokens']:,} prompt and "
                  f"{total['completion_tokens']:,} completion tokens (~4 characters a token; completions at their "
                  "max_new_tokens; stages after one with pending items are counted as if it had finished)",
                  highlight=False)


def render_budget_stop(summary: dict[str, Any], console) -> None:
    if why := summary.get("budget_stopped"):
        console.print(f"[bold yellow]stopped by the budget:[/] {esc(why)}; what was stored stays, and a rerun "
                      "resumes from it", highlight=False)


def render_summary(flow_name: str, summary: dict[str, Any], console) -> None:
    """A stage flow's summary: per stage, items done before, computed, failed, time; or its dry-run plan."""
    from rich.table import Table

    if summary.get("dry_run"):
        render_plan(flow_name, summary, console)
        return
    table = Table("stage", "items", "already done", "computed", "failed", "quarantined", "tokens", "engine s",
                  "total s", title=f"{flow_name} summary (run {esc(summary.get('run_id', '')[:12])})")
    for name, st in summary.get("stages", {}).items():
        table.add_row(esc(name), str(st["items"]), str(st["done_before"]), str(st["computed"]), str(st["failed"]),
                      str(st["quarantined"]), str(st["tokens"]), f"{st['engine_s']:.1f}", f"{st['total_s']:.1f}")
    console.print(table)
    extras = {k: v for k, v in summary.items() if k not in ("stages", "budget_stopped")}
    console.print(esc(" ".join(f"{k}={v}" for k, v in extras.items())), highlight=False)
    render_budget_stop(summary, console)


def render_eval(summary: dict[str, Any], console) -> None:
    """The summary as a rich table: per prompt set x model, n, refusal rate, win rate."""
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    caption = (f"model {esc(summary['model'])}, baseline {esc(summary['baseline'])}, judge {esc(summary['judge'])}, "
               f"{esc(summary['constitution'])}. On benign sets a refusal is over-refusal: lower is better.")
    table = Table("prompt set", "role", "n", "refusal rate", "win rate vs other", "judged",
                  title=f"eval {esc(summary['eval_name'])}", caption=caption)
    for tag, roles in summary["sets"].items():
        for role, st in roles.items():
            table.add_row(esc(tag), esc(role), str(st["n"]), pct(st["refusal_rate"]), pct(st["win_rate"]),
                          str(st["judged"]))
    console.print(table)
    if summary.get("kinds"):
        def num(v: float | None, fmt: str = ".3f") -> str:
            return "-" if v is None else format(v, fmt)

        kinds = Table("prompts", "role", "n", "harmful compliance", "over-refusal", "apology/boilerplate",
                      "hollow endings", "repeated trigrams", "distinct-2", "mean words", "drift (log-prob/token)",
                      title="what the replies look like (cai/quality.py gates; lower is better but distinct-2)")
        for kind, roles in summary["kinds"].items():
            for role, st in roles.items():
                kinds.add_row(esc(kind), esc(role), str(st["n"]), pct(st["harmful_compliance"]),
                              pct(st["over_refusal"]), pct(st["apology_rate"]), pct(st.get("dangling_rate")),
                              num(st["repeated_trigrams"]),
                              num(st["distinct_2"]), num(st["mean_words"], ".1f"), num(st["drift_logp"]))
        console.print(kinds)
    if summary.get("categories"):
        from cai.evaluate import CATEGORY_HEADER, category_rows

        cats = Table(*CATEGORY_HEADER, title="per category (its governing principle): k/n, rate [95 % Wilson]; "
                     "the difference is paired on the same prompts [95 % Newcombe]")
        for row in category_rows(summary["categories"]):
            cats.add_row(*(esc(c) for c in row))
        console.print(cats)
    for ex in summary.get("examples", [])[:6]:
        console.print(f"[bold]{esc(ex['kind'])}[/]: {esc(ex['prompt'])}", highlight=False)
        for role in ("baseline", "model"):
            flag = " [refused]" if ex[role]["refused"] else ""
            flag += f" [{', '.join(ex[role]['failed'])}]" if ex[role]["failed"] else ""
            console.print(f"  {role}{esc(flag)}: {esc(ex[role]['text'][:240])}", highlight=False)
    console.print(f"computed {summary['computed']} rows, {summary['failed']} failed, "
                  f"{summary['total_s']:.1f}s (run {esc(summary['run_id'][:12])})", highlight=False)


def render_judge(fig: dict[str, Any], console, title: str = "judge report") -> None:
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    t = Table("figure", "value", title=esc(title))
    t.add_row("AI-labelled pairs", str(fig["pairs"]))
    for status, n in sorted(fig["status"].items()):
        t.add_row(f"  status {esc(status)}", str(n))
    t.add_row("judgments", str(fig["judgments"]))
    t.add_row("position consistency",
              f"{pct(fig['position_consistency'])} of {fig['pairs_with_both_orders']} pairs")
    t.add_row("mean P(A) (0.5 = no slot bias)", num(fig["mean_p_a"]))
    t.add_row("judgments picking (A)", pct(fig["share_a"]))
    t.add_row("mean label probability", num(fig["mean_label_prob"]))
    console.print(t)
    h = Table("label probability", "pairs", title="label-probability histogram")
    edges = fig["label_prob_hist"]["edges"]
    for i, n in enumerate(fig["label_prob_hist"]["counts"]):
        h.add_row(f"{edges[i]:.2f}-{edges[i + 1]:.2f}", str(n))
    console.print(h)
    p = Table("principle", "judgments", "agreement", "both orders averaged",
              title="agreement with the ensemble")
    for pid, st in fig["per_principle"].items():
        p.add_row(esc(pid), str(st["judgments"]), pct(st["agreement"]), pct(st["averaged_agreement"]))
    console.print(p)


def render_redteam(summary: dict[str, Any], console) -> None:
    """Per category: candidates generated and kept by this run, and the campaign's attack success."""
    from rich.table import Table

    attack = summary.get("attack_success") or {}
    t = Table("category", "kind", "generated", "kept", "answered", "got through", "rate",
              title=f"redteam {esc(summary.get('taxonomy'))}: hit = harmful answered / benign refused")
    cats = sorted(set(summary.get("per_category") or {}) | set(attack))
    for c in cats:
        g = (summary.get("per_category") or {}).get(c, {})
        a = attack.get(c, {})
        rate = a.get("rate")
        t.add_row(esc(c), esc(a.get("kind", "")), str(g.get("generated", 0)), str(g.get("kept", 0)),
                  str(a.get("n", "")), str(a.get("hits", "")), "" if rate is None else f"{rate:.0%}")
    console.print(t)
    fp = summary.get("filter_pass") or {}
    console.print("share passing each filter: " + ", ".join(f"{esc(k)} {v:.0%}" if v is not None else f"{esc(k)} -"
                                                            for k, v in fp.items()), highlight=False)
