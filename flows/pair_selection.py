"""The preference pairs a config's PairSelection fields (flows/configs.py) select: what `cai train`,
`cai reward train`, `cai reward score` and the pipeline's "already trained?" check read.

    examples, refs = load_examples(cfg)   # PairExamples, and the name@version they were made under

From the store (training/data.py: select_pairs under pair_filter(cfg)), or from cfg.dataset (a directory
`cai export --out DIR` wrote, or JSONL) filtered by the same settings on the rows' provenance
columns; then people's verdicts (`--reviewed`, `--people-order`) and `--limit`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from cai import review
from cai.prompts import json_lines, load_saved_dataset, saved_dataset_error
from constitution.load import split_refs
from flows.common import UserError
from flows.configs import PairSelection
from store.db import session_scope
from store.reviews import verdict_rows
from training.data import (
    PairExample,
    PairFilter,
    constitution_versions,
    examples_from_records,
    label_prob,
    select_pairs,
)


def _read_records(cfg: PairSelection) -> list[tuple[str, Any]]:
    """(where, record) for each row of cfg.dataset: `file:line` for JSONL, `--dataset DIR: record i`."""
    path = Path(cfg.dataset or "")
    if not path.exists():
        raise UserError(f"--dataset {path}: no such file or directory")
    if path.is_dir():  # save_to_disk output, e.g. `cai export --out DIR`
        from pyarrow import ArrowException

        expected = ("a directory written by `cai export --out DIR` (format arrow) or Dataset.save_to_disk, "
                    "or a JSONL file of preference pairs")
        ds = load_saved_dataset(path, "--dataset ", expected)
        if hasattr(ds, "keys"):
            if cfg.dataset_split not in ds:
                raise UserError(f"--dataset {path}: no split {cfg.dataset_split!r} "
                                f"(has {', '.join(ds.keys())})")
            ds = ds[cfg.dataset_split]
        try:  # arrow files are memory-mapped: a damaged one can fail only as its rows are read
            return [(f"--dataset {path}: record {i}", r) for i, r in enumerate(ds)]
        except (OSError, ArrowException) as exc:
            raise saved_dataset_error(path, exc, "--dataset ", expected) from None
    return [(f"{path}:{n}", row) for n, row in json_lines(path)]


def _record_matches(r: dict[str, Any], cfg: PairSelection, where: str) -> bool:
    """The store filters, applied to exported rows (which carry the same provenance columns)."""
    if not isinstance(r, dict):
        raise UserError(f"{where}: expected an object with prompt, chosen, rejected, got "
                        f"{'null' if r is None else type(r).__name__}")
    try:
        p = label_prob(r, where)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if cfg.methods and r.get("method") and r["method"] not in cfg.methods:
        return False
    if cfg.statuses and r.get("status") and r["status"] not in cfg.statuses:
        return False
    if cfg.min_label_prob is not None and p is not None and p < cfg.min_label_prob:
        return False
    if cfg.constitution and r.get("constitution"):
        if not any(r["constitution"] == name and str(r.get("constitution_version") or "").startswith(version or "")
                   for name, version in split_refs(cfg.constitution)):
            return False
    return True


def pair_filter(cfg: PairSelection) -> PairFilter:
    """The stored pairs a training (or scoring) config selects: `cai train`, `cai reward train` and
    `cai reward score` share these four settings."""
    return PairFilter(constitution=cfg.constitution, methods=tuple(cfg.methods), statuses=tuple(cfg.statuses),
                      min_label_prob=cfg.min_label_prob)


def load_examples(cfg: PairSelection, url: str | None = None) -> tuple[list[PairExample], list[str]]:
    """The selected pairs (from the store, or cfg.dataset) and the constitution versions
    (name@version) they were made under; a one-line UserError if nothing matches."""
    if cfg.dataset:
        named = [(w, r) for w, r in _read_records(cfg) if _record_matches(r, cfg, w)]
        records = [r for _, r in named]
        try:
            examples = reviewed_examples(examples_from_records(records, [w for w, _ in named]), cfg,
                                         url)[:cfg.limit or None]
        except ValueError as exc:
            raise UserError(str(exc)) from None
        used = {e.id for e in examples}
        refs = sorted({f"{r['constitution']}@{r.get('constitution_version', '')}" for r in records
                       if r.get("constitution") and str(r.get("id") or r.get("pair_id") or "") in used})
        where = f"{cfg.dataset} (split {cfg.dataset_split})"
    else:
        with session_scope(url) as s:
            examples = reviewed_examples(select_pairs(s, pair_filter(cfg)), cfg, url, s)[:cfg.limit or None]
            refs = constitution_versions(s, [e.id for e in examples])
        where = "the store"
    if not examples:
        reviewed = f", reviewed {cfg.reviewed}" if cfg.reviewed != "any" else ""
        raise UserError(f"no preference pairs match {pair_filter(cfg).describe()}{reviewed} in {where}; "
                        "make some with `cai generate` / `cai label`, or loosen the filters")
    return examples, refs


def reviewed_examples(examples: list[PairExample], cfg: PairSelection, url: str | None = None,
                      session=None) -> list[PairExample]:
    """The pairs `--reviewed` keeps, by their pair ids' verdicts in the store (cai review); a pair
    people flipped, with `--people-order`, swapped, its label the share of people preferring it."""
    if cfg.reviewed == "any" and not cfg.people_order:
        return examples
    if session is None:
        with session_scope(url) as s:
            return reviewed_examples(examples, cfg, url, s)
    ids = [e.id for e in examples]
    decision = review.decide(ids, map(review.verdict_from_row, verdict_rows(session, pair_ids=ids)),
                             cfg.reviewed, cfg.people_order)
    out = []
    for e in examples:
        if e.id in decision.flip:
            out.append(replace(e, chosen=e.rejected, rejected=e.chosen, chosen_ended=e.rejected_ended,
                               rejected_ended=e.chosen_ended, label_prob=decision.flip[e.id]))
        elif e.id in decision.keep:
            out.append(e)
    return out
