"""Dataset card (README.md with a Hub YAML header) and manifest.json for an export.

    cai export --constitution harmless --out exports/harmless   # writes both next to the data

Pure rendering: every fact comes from `cai.export_facts` (flows/export.py reads the store for it), from the
data, never from the clock, so exporting the same rows twice gives byte-identical files.
The YAML header carries what the Hub reads (license, task_categories, tags, configs with their
data_files, dataset_info with the features) plus our own `cai_factory:` block for tools.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from cai import dataset_schema as schema

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
BINS = 10


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def label_prob_stats(values: list[float]) -> dict[str, Any]:
    """Count, mean, min/max, quantiles and a 10-bin histogram over [0, 1] (the last bin holds 1.0)."""
    if not values:
        return {"count": 0}
    v = sorted(values)
    hist = [0] * BINS
    for x in v:
        hist[min(int(x * BINS), BINS - 1)] += 1
    return {
        "count": len(v),
        "mean": round(sum(v) / len(v), 6),
        "min": round(v[0], 6),
        "max": round(v[-1], 6),
        "quantiles": {f"p{round(q * 100)}": round(_quantile(v, q), 6) for q in QUANTILES},
        "histogram": {"bin_edges": [round(i / BINS, 2) for i in range(BINS + 1)], "counts": hist},
    }


def size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


def header(facts: dict[str, Any], data_files: dict[str, str]) -> dict[str, Any]:
    """The YAML metadata: what the Hub reads, then the cai_factory block."""
    from datasets import DatasetInfo
    from datasets.info import DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from huggingface_hub import DatasetCardData

    counts, c = facts["counts"], facts["constitution"]
    configs, infos = [], {}
    for name, (all_splits, default) in schema.CONFIGS.items():
        # only the splits written: a config naming an empty split (no files) fails load_dataset
        splits = tuple(s for s in all_splits if counts[s])
        if not splits:  # e.g. `--method ai`: no sft rows at all
            continue
        entry: dict[str, Any] = {"config_name": name}
        if default:
            entry["default"] = True
        entry["data_files"] = [{"split": s, "path": data_files[s]} for s in splits]
        configs.append(entry)
        split_dict = SplitDict()
        for s in splits:
            split_dict.add(SplitInfo(s, num_examples=counts[s]))
        infos[name] = DatasetInfo(features=schema.SPLITS[splits[0]], splits=split_dict, config_name=name)
    card_data = DatasetCardData()
    DatasetInfosDict(infos).to_dataset_card_data(card_data)
    dataset_info = card_data.to_dict()["dataset_info"]
    # one config comes back as a dict, several as a list
    for info in dataset_info if isinstance(dataset_info, list) else [dataset_info]:
        # datasets writes num_bytes 0 for in-memory tables: say nothing instead
        for split in info["splits"]:
            split.pop("num_bytes", None)
    lp = facts["label_prob"]["all"]
    return {
        "license": facts["license"],
        "pretty_name": f"cai-factory {c['ref']}",
        "task_categories": ["text-generation"],
        "tags": ["constitutional-ai", "rlaif", "dpo", "sft", "synthetic", "cai-factory"],
        "size_categories": [size_category(sum(counts.values()))],
        "configs": configs,
        "dataset_info": dataset_info,
        "cai_factory": {
            "schema_version": facts["schema_version"],
            "constitution": {"name": c["name"], "version": c["version"], "sha256": c["sha256"]},
            "counts": counts,
            "counts_by_method": facts["counts_by_method"],
            "cut": facts["cut"],  # replies the token cap stopped, per split: see the *_cut columns
            "prompts": facts["prompts"],
            "label_prob": {k: lp[k] for k in ("count", "mean", "min", "max") if k in lp},
            "policy_models": sorted(facts["models"]["policy"]),
            "judge_models": sorted(facts["models"]["judge"]),
            "selection": {k: v for k, v in facts["selection"].items() if v not in (None, [], False, {})},
            "test_fraction": facts["test_fraction"],
            "created": facts["created"],
            "command": facts["command"],
        },
    }


def _fence(text: str, lang: str = "") -> str:
    """A code fence longer than any backtick run inside `text`, so user text cannot close it."""
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{ticks}{lang}\n{text.rstrip(chr(10))}\n{ticks}"


class _Md(str):
    """Markdown this module wrote (a code span, a description): goes into the card as it is."""


# a stored value made only of these is shown as it is; anything else (markup, HTML, a link, a line
# break) becomes a code span, where a Markdown renderer reads nothing
_PLAIN = re.compile(r"[A-Za-z0-9 .,/@+=-]*")


def _v(value: Any) -> _Md:
    """A stored value (a tag, model, run id, method, name) as card text that cannot be markup."""
    if isinstance(value, _Md):
        return value
    text = str(value)
    if _PLAIN.fullmatch(text) and "www." not in text.lower() and not text.startswith(("-", "+")):
        return _Md(text)
    return _code(text)


def _code(text: Any) -> _Md:
    """Any text as one inline code span on one line, fenced so it cannot close the span."""
    one = " ".join(str(text).split())
    ticks = "`" * (1 + max((len(m) for m in re.findall(r"`+", one)), default=0))
    pad = " " if one.startswith("`") or one.endswith("`") or not one.strip() else ""
    return _Md(f"{ticks}{pad}{one}{pad}{ticks}")


def _table(head: list[Any], rows: list[list[Any]]) -> str:
    """A Markdown table: every cell a stored value (`_v`) or our own `_Md`, on one line, pipes escaped."""
    def cell(x: Any) -> str:
        text = x if isinstance(x, _Md) or isinstance(x, int | float) else _v(x)
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _histogram(stats: dict[str, Any]) -> str:
    counts = stats["histogram"]["counts"]
    edges = stats["histogram"]["bin_edges"]
    top = max(counts) or 1
    return "\n".join(f"{edges[i]:.1f}-{edges[i + 1]:.1f} {'#' * round(30 * n / top):<30} {n}"
                     for i, n in enumerate(counts))


# what each pair method is, in the words the card uses; the card lists only the methods it holds
METHODS = {
    "revision": "SL-CAI revisions: the model's own answer after critique and revision under a principle, "
                "chosen over its first answer",
    "ai": "AI-labelled RL-CAI pairs: two of the model's answers, ordered by the feedback model's judgment "
          "under the constitution's preference questions (both orders, soft label)",
    "contrastive": "contrastive pairs: a reply the governing principle teaches (one of its `examples`) chosen "
                   "over the model's own plain answer to a request that principle says to refuse",
    "helpful": "helpfulness pairs: the model's own plain answer chosen over a needless refusal the governing "
               "principle names (one of its `counter_examples`), on a request it says to answer",
    "best-of-n": "best-of-N pairs: the highest and lowest of N model answers under a trained reward model",
}


def _intro(facts: dict[str, Any]) -> list[str]:
    c = facts["constitution"]
    by_method: dict[str, int] = {}
    for split in ("train_prefs", "test_prefs"):
        for m, n in facts["counts_by_method"].get(split, {}).items():
            by_method[m] = by_method.get(m, 0) + n
    made = "; ".join(f"{n} {METHODS.get(m) or _v(m)}" for m, n in sorted(by_method.items(), key=lambda x: -x[1]))
    out = [f"# {_v(c['ref'])}: Constitutional AI data from cai-factory", "",
           f"Supervised (`*_sft`) and preference (`*_prefs`) data generated under the constitution "
           f"**{_v(c['name'])}**, version **{_v(c['version'])}**, by cai-factory. What the pairs are: {made}.", "",
           "```python", "from datasets import load_dataset", "",
           "# OWNER/NAME on the Hub, or the local export directory",
           'prefs = load_dataset("OWNER/NAME", "prefs")  # train_prefs, test_prefs: prompt, chosen, rejected',
           'sft = load_dataset("OWNER/NAME", "sft")      # train_sft, test_sft: messages', "```", ""]
    if facts["format"] == "arrow":
        out += ["Locally, `datasets.load_from_disk(DIR)` returns every split at once.", ""]
    return out + ["The preference splits are in TRL's conversational format and feed `DPOTrainer` without "
                  "a column mapping; the SFT splits feed `SFTTrainer`.", ""]


def _counts(facts: dict[str, Any]) -> list[str]:
    by_method = facts["counts_by_method"]
    methods = sorted({m for per in by_method.values() for m in per})
    rows = [[s, facts["counts"][s]] + [by_method[s].get(m, 0) for m in methods] for s in schema.SPLITS]
    out = ["## Counts", "", _table(["split", "rows"] + methods, rows), "",
           f"Prompts: {facts['prompts']['train']} train, {facts['prompts']['test']} test. A prompt's split "
           f"is a hash of its id (test fraction {facts['test_fraction']}), so it never moves as data is "
           f"added and no prompt is in both halves: `{facts['split_rule']}`.", ""]
    moved = facts.get("moved_to_test") or []
    if moved:
        out += [f"The hash rule put none of these {facts['prompts']['train'] + len(moved)} prompts in test, so "
                f"the {len(moved)} with the lowest hash buckets were moved there, to give this small export a "
                "test split; a later export with more prompts may return them to train.", ""]
    empty = [s for s in schema.SPLITS if not facts["counts"][s]]
    if empty:
        out += ["Not written, because they have no rows (neither `load_from_disk` nor `load_dataset` can read "
                "an empty split): " + ", ".join(f"`{s}`" for s in empty) + ".", ""]
    statuses = facts["counts_by_status"]
    if set(statuses) - {"ok"}:
        out += ["Pair status: " + ", ".join(f"{_v(k)} {n}" for k, n in statuses.items()), ""]
    return out + _cut(facts)


def _cut(facts: dict[str, Any]) -> list[str]:
    """How many replies the generator's token cap stopped, and what a trainer should do with them."""
    counts, cut = facts["counts"], facts["cut"]
    pairs = sum(counts[s] for s in schema.CONFIGS["prefs"][0])
    sft = sum(counts[s] for s in schema.CONFIGS["sft"][0])
    chosen = sum(cut[s]["chosen"] for s in schema.CONFIGS["prefs"][0])
    rejected = sum(cut[s]["rejected"] for s in schema.CONFIGS["prefs"][0])
    responses = sum(cut[s]["response"] for s in schema.CONFIGS["sft"][0])
    if not chosen + rejected + responses:
        return ["Cut replies: none. The generator's token cap stopped no reply in this export "
                "(every `chosen_cut`, `rejected_cut` and `response_cut` is false).", ""]
    return [f"Cut replies (the generator's token cap stopped them before the model finished; the row's "
            f"`chosen_cut`, `rejected_cut` or `response_cut` is true): {chosen} chosen and {rejected} rejected "
            f"of the {pairs} preference pairs, {responses} of the {sft} SFT replies. " + schema.CUT_ADVICE, ""]


def _label_probs(facts: dict[str, Any]) -> list[str]:
    rows = []
    for key, st in facts["label_prob"].items():
        if st["count"]:
            q = st["quantiles"]
            rows.append([key, st["count"], st["mean"], st["min"], q["p10"], q["p25"], q["p50"], q["p75"],
                         q["p90"], st["max"]])
    out = ["## Label probability", "", f"`label_prob`: {schema.DESCRIPTIONS['label_prob']}.", "",
           _table(["pairs", "n", "mean", "min", "p10", "p25", "p50", "p75", "p90", "max"], rows), ""]
    if facts["label_prob"]["all"]["count"]:
        out += [_fence(_histogram(facts["label_prob"]["all"]), "text"), ""]
    return out


def _engine_label(run: dict[str, Any]) -> str:
    """The backend a run asked for, then the device and dtype it computed in: `hf cpu bfloat16`."""
    found = run.get("engine_facts") or {}
    return " ".join(str(v) for v in [run["engine"], found.get("device"), found.get("dtype")] if v)


def _models(facts: dict[str, Any]) -> list[str]:
    models = facts["models"]
    rows = ([["policy (pairs)", m, n] for m, n in models["policy"].items()]
            + [["wrote responses", m, n] for m, n in models["responses"].items()]
            + [["judge (pairs)", m, n] for m, n in models["judge"].items()])
    out = ["## Models and sampling", "", _table(["role", "model", "rows"], rows), ""]
    if facts["sampling"]:
        settings = [[_code(json.dumps(s['settings'], sort_keys=True)), s["responses"]]
                    for s in facts["sampling"]]
        out += ["Sampling settings of the chosen and rejected responses:", "",
                _table(["settings", "responses"], settings), ""]
    if facts["runs"]:
        runs = [[r["id"], r["flow"], r["model"], _engine_label(r)] for r in facts["runs"]]
        out += ["Runs that made these rows (full configs in `manifest.json`):", "",
                _table(["run", "flow", "model", "engine"], runs), ""]
    return out


def _taught(facts: dict[str, Any]) -> list[str]:
    """Per principle what the exported pairs teach, how varied their chosen replies are, and examples."""
    principles, variety = facts.get("principles") or {}, facts.get("variety") or {}
    if not principles:
        return []
    rows = [[_code(pid), e["pairs"], _Md(", ".join(f"{_v(m)} {n}" for m, n in e["methods"].items())),
             e["distinct_chosen"], f"{e['distinct_chosen'] / e['pairs']:.2f}"] for pid, e in principles.items()]
    out = ["## Principles and what they teach", "",
           _table(["principle", "pairs", "methods", "distinct chosen replies", "per pair"], rows), "",
           f"Overall {variety['distinct_chosen']} distinct chosen replies in {variety['pairs']} preference pairs "
           f"({variety['distinct_per_pair']} per pair). A contrastive pair's chosen reply is one of its "
           "principle's examples, so that principle's row can hold no more distinct replies than it has "
           "examples; a plain model reply is distinct almost every time.", ""]
    if facts.get("examples"):
        out += ["Examples (the first exported pairs of each method, by id):", ""]
        for ex in facts["examples"]:
            who = ", ".join(map(_v, ex["principles"])) or "no principle recorded"
            out += [f"- **{_v(ex['method'])}** ({who}), prompt: {_quote(ex['prompt'])}",
                    f"  - chosen: {_quote(ex['chosen'])}", f"  - rejected: {_quote(ex['rejected'])}"]
        out.append("")
    return out


def _quote(text: str, limit: int = 240) -> str:
    """A stored text as one inline code span: cut, on one line, fenced so it cannot break the markdown."""
    one = " ".join(text.split())
    return _code(one if len(one) <= limit else one[:limit - 1] + "\u2026")


def _constitution(facts: dict[str, Any]) -> list[str]:
    c = facts["constitution"]
    used = ", ".join(f"{_code(k)} {n}" for k, n in facts["principles_used"].items()) or "none recorded"
    missing = "_The store has no text for this version._"
    text = _fence(c["source_text"], "yaml") if c["source_text"] else missing
    return ["## Constitution", "", f"{_code(c['ref'])} (sha256 {_code(c['sha256'])}). Principles used: {used}.", "",
            text, ""]


def _provenance(facts: dict[str, Any]) -> list[str]:
    c, sel = facts["constitution"], facts["selection"]
    # the reasons are our words, except a stored pair status (`status gated:x`)
    removed = "; ".join(f"{'status ' + _v(k[7:]) if k.startswith('status ') else k} removed {n}"
                        for k, n in sel["removed_by"].items())
    out = ["## How it was made", "", _fence(facts["command"], "bash"), "",
           f"To rebuild exactly these rows later, pin the version: {_code('--constitution ' + c['ref'])}. "
           f"{sel['pairs_selected']} of {sel['pairs_available']} stored pairs of this version were selected"
           + (f" ({removed})" if removed else "") + ". Ties, position-inconsistent pairs and pairs touching "
           "quarantined items are left out unless the command includes them. "
           f"Pairs created {_v(facts['created']['first'])} to {_v(facts['created']['last'])}.", ""]
    if facts["prompt_tags"]:
        out += ["Prompt sets (tags): " + ", ".join(f"{_code(t)} {n}" for t, n in facts["prompt_tags"].items()), ""]
    columns = [[_code(k), _Md(v)] for k, v in schema.DESCRIPTIONS.items()]
    return out + ["## Columns", "", _table(["column", "meaning"], columns), "",
                  "`manifest.json` has the same facts for machines, with the sha256 of every data file.", ""]


def render_card(facts: dict[str, Any], data_files: dict[str, str]) -> str:
    meta = yaml.safe_dump(header(facts, data_files), sort_keys=False, allow_unicode=True, width=100)
    body = (_intro(facts) + _counts(facts) + _taught(facts) + _label_probs(facts) + _models(facts)
            + _constitution(facts) + _provenance(facts))
    return f"---\n{meta}---\n" + "\n".join(body)


def render_manifest(facts: dict[str, Any]) -> str:
    return json.dumps(facts, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
