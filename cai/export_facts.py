"""What an export's card and manifest say, from the selection and what the store said of it: no reads, no clock.

    cai export --constitution harmless --out exports/harmless   # README.md and manifest.json hold these facts

flows/export.py reads the store (store/export_queries.py) and calls `card_facts`, then adds
`taught_facts` of the written splits; cai/card.py renders the card and manifest from the result.
Everything comes from the data, so re-exporting the same store gives the same files.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections import Counter
from datetime import datetime
from typing import Any

from cai import dataset_schema as schema
from cai.card import label_prob_stats
from cai.export_rows import Plan, Selection
from store.keys import naive_utc
from store.models import ConstitutionVersion


def command_line(config: Any) -> str:
    """The command that selects these rows (config: an ExportConfig, flows/configs.py); destinations
    (--out, --push-to-hub) are left out so the card does not change with where it was written."""
    defaults = type(config).model_fields
    parts = ["cai", "export", "--constitution", config.constitution]
    parts += [a for m in config.methods for a in ("--method", m)]
    parts += [a for t in config.tags for a in ("--tag", t)]
    for opt, val in (("--min-label-prob", config.min_label_prob), ("--min-margin", config.min_margin)):
        if val is not None:
            parts += [opt, repr(val)]
    for opt, when in (("--since", config.since), ("--until", config.until)):
        if when is not None:
            parts += [opt, when.isoformat()]
    for opt, on in (("--include-ties", config.include_ties),
                    ("--include-inconsistent", config.include_inconsistent),
                    ("--include-quarantined", config.include_quarantined)):
        if on:
            parts.append(opt)
    if config.reviewed != "any":
        parts += ["--reviewed", config.reviewed]
    if config.people_order:
        parts.append("--people-order")
    if config.test_fraction != defaults["test_fraction"].default:
        parts += ["--test-fraction", repr(config.test_fraction)]
    if config.license != defaults["license"].default:
        parts += ["--license", config.license]
    parts += ["--format", config.format]
    return shlex.join(parts)


def iso(dt: datetime | None) -> str | None:
    return naive_utc(dt).replace(microsecond=0).isoformat() + "Z" if dt else None


def cut_counts(plan: Plan, cut: set[str]) -> dict[str, dict[str, int]]:
    """Per split, how many of its replies the token cap stopped: what the *_cut columns hold."""
    return {name: ({"chosen": sum(p.chosen_id in cut for p in pairs),
                    "rejected": sum(p.rejected_id in cut for p in pairs)} if name.endswith("_prefs")
                   else {"response": sum(p.chosen_id in cut for p in pairs)})
            for name, pairs in plan.items()}


def card_facts(config: Any, sel: Selection, plan: Plan, *, version_row: ConstitutionVersion | None,
               sampling: Counter, response_models: Counter, runs: list[dict[str, Any]], prompt_tags: Counter,
               cut: set[str], moved_to_test: list[str], split_rule: str) -> dict[str, Any]:
    """The card's and manifest's facts of an export (config: an ExportConfig). From the store: the
    constitution `version_row`, the replies' `sampling` settings (sorted JSON) and `response_models`
    counted, the `runs` behind pairs and replies, the `prompt_tags` counted, the `cut` reply ids, the
    test prompts `moved_to_test` by the small-set fallback and the held-out `split_rule` in words."""
    cv = version_row
    prefs = plan["train_prefs"] + plan["test_prefs"]
    created = [naive_utc(p.created_at) for p in sel.pairs]
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "generator": "cai-factory export",
        "constitution": {
            "name": sel.name, "version": sel.version, "ref": f"{sel.name}@{sel.version}",
            "sha256": cv.sha256 if cv else None, "source_path": cv.source_path if cv else None,
            "source_text": cv.source_text if cv else None,
            "principles": sorted(k for k in (cv.principle_hashes if cv else {}) if not k.startswith("pref:")),
        },
        "command": command_line(config),
        "format": config.format,
        "license": config.license,
        "selection": {
            "constitution": config.constitution, "methods": list(config.methods), "tags": list(config.tags),
            "min_label_prob": config.min_label_prob, "min_margin": config.min_margin,
            "since": iso(config.since), "until": iso(config.until), "include_ties": config.include_ties,
            "include_inconsistent": config.include_inconsistent,
            "include_quarantined": config.include_quarantined,
            "reviewed": None if config.reviewed == "any" else config.reviewed, "people_order": config.people_order,
            "pairs_available": sel.available, "pairs_selected": len(sel.pairs),
            "removed_by": dict(sel.removed),
        },
        "test_fraction": config.test_fraction,
        "split_rule": split_rule,
        # the hash put no prompt in test: these (lowest buckets) were moved there, see held_out_prompts
        "moved_to_test": moved_to_test,
        "counts": {name: len(r) for name, r in plan.items()},
        "splits_written": [name for name in schema.SPLITS if plan[name]],
        "counts_by_method": {name: dict(sorted(Counter(p.method for p in r).items()))
                             for name, r in plan.items()},
        "counts_by_status": dict(sorted(Counter(p.status for p in prefs).items())),
        # replies the generator's token cap stopped, per split (the rows' *_cut columns)
        "cut": cut_counts(plan, cut),
        "prompts": {half: len({p.prompt_id for p in plan[f"{half}_prefs"]}) for half in ("train", "test")},
        "label_prob": {"all": label_prob_stats([float(p.label_prob) for p in prefs])} | {
            m: label_prob_stats([float(p.label_prob) for p in prefs if p.method == m])
            for m in sorted({p.method for p in prefs})},
        "models": {
            "policy": dict(sorted(Counter(p.policy_model for p in sel.pairs).items())),
            "responses": dict(sorted(response_models.items())),
            "judge": dict(sorted(Counter(p.judge_model for p in sel.pairs if p.judge_model).items())),
        },
        "sampling": [{"settings": json.loads(k), "responses": n} for k, n in sorted(sampling.items())],
        "runs": runs,
        "principles_used": dict(sorted(Counter(i for p in sel.pairs for i in p.principle_ids or []).items())),
        "prompt_tags": dict(sorted(prompt_tags.items())),
        "created": {"first": iso(min(created)), "last": iso(max(created))},
        "review": sel.review,
    }


def taught_facts(data: Any, per_method: int = 2) -> dict[str, Any]:
    """What the exported pairs teach, read back from the written preference splits (a DatasetDict) a
    batch at a time: per principle the pairs and how many distinct chosen replies they hold (a
    harmlessness set of eight sentences repeated is of little use to anyone), the same overall, and the
    first pairs of each method, texts included, as examples."""
    principles: dict[str, dict[str, Any]] = {}
    distinct: dict[str, set[str]] = {}
    everything: set[str] = set()
    examples: dict[str, list[dict[str, Any]]] = {}
    pairs = 0
    for split in ("train_prefs", "test_prefs"):
        if split not in data:
            continue
        for batch in data[split].select_columns(["prompt", "chosen", "rejected", "principle_ids", "method",
                                                 "id"]).iter(batch_size=1000):
            for prompt, chosen, rejected, pids, method, pid_ in zip(*(batch[k] for k in (
                    "prompt", "chosen", "rejected", "principle_ids", "method", "id")), strict=True):
                pairs += 1
                text = chosen[-1]["content"]
                digest = hashlib.sha256(text.encode()).hexdigest()
                everything.add(digest)
                for pid in pids or ["(none recorded)"]:
                    entry = principles.setdefault(pid, {"pairs": 0, "methods": Counter()})
                    entry["pairs"] += 1
                    entry["methods"][method] += 1
                    distinct.setdefault(pid, set()).add(digest)
                if len(examples.setdefault(method, [])) < per_method:
                    examples[method].append({"id": pid_, "method": method, "principles": list(pids or []),
                                             "prompt": prompt[-1]["content"], "chosen": text,
                                             "rejected": rejected[-1]["content"]})
    for pid, entry in principles.items():
        entry["methods"] = dict(sorted(entry["methods"].items()))
        entry["distinct_chosen"] = len(distinct[pid])
    return {"principles": dict(sorted(principles.items())),
            "variety": {"pairs": pairs, "distinct_chosen": len(everything),
                        "distinct_per_pair": round(len(everything) / pairs, 4) if pairs else None},
            "examples": [ex for m in sorted(examples) for ex in sorted(examples[m], key=lambda e: e["id"])]}
