"""The PNG plots of `cai report` and `cai judge-report`: matplotlib lives here and nowhere else.

Each function takes the plain figures a report collected and writes PNGs into `out`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

DPO_PANELS = (("loss", "DPO loss"), ("rewards/margins", "reward margin (chosen - rejected)"),
              ("rewards/accuracies", "reward accuracy"))


def plot_judge(fig: dict[str, Any], out: Path) -> list[Path]:
    """Three PNGs: label-probability histogram, order-mean scatter, per-principle agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []

    f, ax = plt.subplots(figsize=(6, 4))
    edges, hist = fig["label_prob_hist"]["edges"], fig["label_prob_hist"]["counts"]
    ax.bar(edges[:-1], hist, width=edges[1] - edges[0], align="edge", edgecolor="black")
    ax.set(xlabel="label probability P(chosen better)", ylabel="pairs",
           title=f"{fig['pairs']} AI-labelled pairs")
    paths.append(out / "label_prob_hist.png")
    f.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(f)

    f, ax = plt.subplots(figsize=(5, 5))
    if fig["order_means"]:
        xs, ys = zip(*fig["order_means"], strict=True)
        ax.scatter(xs, ys, s=12, alpha=0.6)
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.axvline(0.5, color="grey", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean P(x better), x shown as (A)",
           ylabel="mean P(x better), x shown as (B)")
    pc = fig["position_consistency"]
    ax.set_title("position consistency " + (f"{pc:.0%}" if pc is not None else "n/a")
                 + " (consistent pairs: lower-left and upper-right)", fontsize=9)
    paths.append(out / "position_consistency.png")
    f.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(f)

    f, ax = plt.subplots(figsize=(7, 0.4 * max(len(fig["per_principle"]), 3) + 1))
    names = list(fig["per_principle"])
    ax.barh(names, [fig["per_principle"][n]["averaged_agreement"] or 0 for n in names],
            label="both orders averaged")
    ax.scatter([fig["per_principle"][n]["agreement"] or 0 for n in names], names, color="black", zorder=3,
               label="single judgments")
    ax.axvline(0.5, color="grey", lw=0.8)
    ax.set(xlim=(0, 1), xlabel="agreement with the pair's final label")
    ax.legend(loc="lower right", fontsize=8)
    paths.append(out / "principle_agreement.png")
    f.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(f)
    return paths


def _save(fig: Figure, path: Path) -> str:
    # Figure without pyplot: no global backend state, safe inside a long-running worker
    fig.savefig(path, dpi=100)
    return path.name


def _barh(ax, labels: list[str], values: list[float], title: str, xlabel: str) -> None:
    ax.barh(labels[::-1], values[::-1], color="#4c72b0")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="y", labelsize=8)


def plot_stages(data: dict[str, Any], out: Path) -> str | None:
    st = data["stages"]
    if not st["responses"] and not st["pairs"]:
        return None
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    a, b = fig.subplots(1, 2)
    _barh(a, [f"{r['kind']} {r['round']}" if r["kind"] in ("critique", "revision") else r["kind"]
              for r in st["responses"]], [r["count"] for r in st["responses"]], "responses per kind / round",
          "rows")
    _barh(b, [f"{p['method']} / {p['status']}" for p in st["pairs"]], [p["count"] for p in st["pairs"]],
          "preference pairs per method / status", "pairs")
    return _save(fig, out / "stages.png")


def plot_principles(data: dict[str, Any], out: Path) -> str | None:
    usage = data["principles"]
    if not usage:
        return None
    fig = Figure(figsize=(7, 0.35 * len(usage) + 1.2), layout="constrained")
    _barh(fig.subplots(), list(usage), list(usage.values()), "revisions per principle", "revisions")
    return _save(fig, out / "principles.png")


def plot_training(data: dict[str, Any], out: Path) -> str | None:
    tr = data["training"]
    if not tr or not tr["series"]:
        return None
    fig = Figure(figsize=(12, 3.2), layout="constrained")
    for ax, (key, title) in zip(fig.subplots(1, len(DPO_PANELS)), DPO_PANELS, strict=True):
        for split, style in (("train", "-"), ("eval", "o--")):
            pts = tr["series"].get(split, {}).get(key)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=split, markersize=4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, out / "dpo.png")


def plot_eval(data: dict[str, Any], out: Path) -> str | None:
    ev = data["eval"]
    if not ev or not ev["sets"]:
        return None
    tags = list(ev["sets"])
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    width = 0.38
    for ax, key, title in ((axes[0], "refusal_rate", "refusal rate (before = baseline, after = model)"),
                           (axes[1], "win_rate", "win rate vs the other model")):
        for i, (role, label, colour) in enumerate((("baseline", "before (baseline)", "#999999"),
                                                   ("model", "after (model)", "#4c72b0"))):
            vals = [(ev["sets"][t].get(role) or {}).get(key) for t in tags]
            xs = [j + (i - 0.5) * width for j in range(len(tags))]
            ax.bar(xs, [v or 0 for v in vals], width, label=label, color=colour)
            for x, v in zip(xs, vals, strict=True):
                ax.text(x, (v or 0) + 0.02, "n/a" if v is None else f"{v:.0%}", ha="center", fontsize=8)
        ax.set_xticks(range(len(tags)), tags, fontsize=8)
        ax.set_ylim(0, 1.15)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
    axes[1].axhline(0.5, color="black", lw=0.8, ls=":")
    return _save(fig, out / "eval.png")


def plot_redteam(data: dict[str, Any], out: Path) -> str | None:
    rt = data.get("redteam")
    if not rt or not rt["attack_success"]:
        return None
    cats = list(rt["attack_success"])
    vals = [rt["attack_success"][c]["rate"] or 0 for c in cats]
    colours = ["#dd8452" if rt["attack_success"][c]["kind"] == "benign" else "#c44e52" for c in cats]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(cats)), vals, color=colours)
    for i, c in enumerate(cats):
        d = rt["attack_success"][c]
        ax.text(i, vals[i] + 0.02, f"{vals[i]:.0%}\n{d['hits']}/{d['n']}", ha="center", fontsize=8)
    ax.set_xticks(range(len(cats)), cats, fontsize=8, rotation=20, ha="right")
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("attack success")
    ax.set_title(f"red-team campaign {rt['campaign']}: harmful answered (red), benign look-alikes refused (orange)",
                 fontsize=10)
    return _save(fig, out / "redteam.png")


def plot_review(data: dict[str, Any], out: Path) -> str | None:
    """The judge's P(chosen better) against the share of people agreeing, with 95 % Wilson bars."""
    cal = (data.get("review") or {}).get("calibration") or []
    if not cal:
        return None
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    xs = [c["mean_label"] for c in cal]
    ys = [c["rate"] for c in cal]
    ax.errorbar(xs, ys, yerr=[[y - c["low"] for y, c in zip(ys, cal, strict=True)],
                              [c["high"] - y for y, c in zip(ys, cal, strict=True)]], fmt="o", capsize=3)
    for x, y, c in zip(xs, ys, cal, strict=True):
        ax.annotate(str(c["n"]), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="judge's P(chosen better), bin mean",
           ylabel="share of people agreeing (n beside each point)")
    ax.set_title("judge calibration against people", fontsize=10)
    return _save(fig, out / "review_calibration.png")


def plot_all(data: dict[str, Any], out: Path) -> dict[str, list[str]]:
    """section -> PNG file names written (relative to `out`)."""
    images: dict[str, list[str]] = {}
    for section, fn in (("stages", plot_stages), ("principles", plot_principles), ("training", plot_training),
                        ("eval", plot_eval), ("redteam", plot_redteam), ("review", plot_review)):
        name = fn(data, out)
        images[section] = [name] if name else []
    images["judge"] = [p.name for p in plot_judge(data["judge"], out)] if data["judge"] else []
    return images
