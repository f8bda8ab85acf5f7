"""Export preference pairs and revisions as a Hugging Face DatasetDict with a dataset card.

    cai export --constitution harmless --out exports/harmless
    cai export --constitution harmless@3f2a9c1b --method ai --min-margin 0.2 --format parquet --out exports/h
    HF_TOKEN=hf_... cai export --constitution harmless --out exports/h --push-to-hub me/harmless-cai --private

Which rows (`select_for_export`; the rules are in cai/export_rows.py, the reads in store/export_queries.py):
- `--constitution NAME` takes the newest version of NAME that has preference pairs (newest by
  when the store first saw the version); `NAME@VERSION` pins one version (a unique prefix works).
  One export is always one constitution version, so its card can show that version's text.
- `--method`, `--tag` (prompts with any of the tags), `--min-label-prob`, `--min-margin`
  (|p - 0.5|), `--since` (inclusive) / `--until` (exclusive) on the pair's created_at, in UTC.
- Ties, position-inconsistent pairs and pairs touching a quarantined item (the pair id or its
  chosen/rejected response id is a quarantined `failure.item_key`) are left out unless a flag
  includes them; the `status` column tells them apart.

What comes out (`build_export`): splits train_sft/test_sft (pairs whose chosen reply is one to teach,
dataset_schema.SFT_METHODS) and train_prefs/test_prefs (all selected pairs), rows sorted by id; an empty
split is left out (no client can load one). A prompt's split is a hash of its id (store/split.py). A
reply the token cap stopped is marked in its row's `*_cut` column and counted on the card. The same
store and options give byte-identical files; cai/export_facts.py gathers the card's facts, cai/card.py
renders it, flows/publish.py streams the rows into arrow files beside --out (`to_dataset_dict`: the
texts are read PAGE pairs at a time by `iter_rows`, never all at once), writes the export and pushes it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlmodel import Session

from cai import dataset_schema as schema
from cai import export_rows as rules
from cai import review
from cai.errors import validated
from cai.export_facts import card_facts, taught_facts
from constitution.load import split_ref
from flows.common import Timer, UserError, run_logger
from flows.configs import ExportConfig
from flows.orchestration import stage_flow, stage_task
from flows.output_dir import check_out
from flows.publish import hub_token, push_export, staging_dir, to_dataset_dict, write_export
from store import export_queries as q
from store.db import checkpoint_wal, mask_secrets, session_scope
from store.models import PreferencePair, Prompt, Response, Run
from store.pairs import latest_per_response_pair
from store.queries import pairs_under
from store.reviews import verdict_rows
from store.runs import recorded_run
from store.split import RULE, held_out_prompts, is_held_out

PAGE = 1000  # pairs whose prompts and texts are read per query while rows are written (iter_rows)


def make_config(**values: Any) -> ExportConfig:
    """An ExportConfig from keyword settings; a rejected one is a one-line UserError (what tests and scripts build)."""
    return validated(ExportConfig, **values)


def parse_when(value: str | None, option: str) -> datetime | None:
    """`2024-05-01` or `2024-05-01T12:00[:00][+02:00]`; naive means UTC."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise UserError(f"{option}: expected a date like 2024-05-01 or 2024-05-01T12:00, "
                        f"got {value!r}") from None


# --- selection -----------------------------------------------------------------------------

def resolve_version(session: Session, ref: str) -> tuple[str, str]:
    """(name, version) for NAME (newest version that has pairs) or NAME@VERSION (prefix ok)."""
    name, wanted = split_ref(ref.strip())
    dates = q.pair_dates(session, name)
    if not dates:
        raise UserError(f"constitution {ref}: the store has no preference pairs for {name!r} "
                        f"(constitutions with pairs: {', '.join(q.constitutions_with_pairs(session)) or 'none'}); "
                        "run `cai generate` / `cai label` first")
    return name, rules.pick_version(ref, name, wanted, dates, {} if wanted else q.version_dates(session, name))


def select_for_export(session: Session, config: ExportConfig) -> rules.Selection:
    """The pairs of one constitution version the export options keep, with what each filter removed
    (their rows; the texts are read later, a page at a time). Not training.data.select_pairs, which reads
    the pairs `cai train` learns from, texts included."""
    name, version = resolve_version(session, config.constitution)
    # the pairs made under this version, and those made earlier from principles it leaves unchanged
    stored = pairs_under(session, name, version)
    tagged = q.tagged_prompts(session, config.tags) if config.tags else set()
    bad = set() if config.include_quarantined else q.quarantined_keys(session)
    sel = rules.filter_pairs(name, version, len(stored), latest_per_response_pair(stored), config, tagged, bad)
    verdicts = [review.verdict_from_row(row) for row in verdict_rows(session, pair_ids=[p.id for p in sel.pairs])]
    sel = rules.apply_reviews(sel, verdicts, config.reviewed, config.people_order)
    if not sel.pairs:
        raise UserError(rules.nothing_left(sel))
    return sel


# --- rows and splits -----------------------------------------------------------------------

def plan_export(sel: rules.Selection, test_fraction: float) -> rules.Plan:
    """Which pair gives a row of which split: the held-out prompts (store/split.py) go to test."""
    return rules.plan_splits(sel.pairs, held_out_prompts((p.prompt_id for p in sel.pairs), test_fraction))


def iter_rows(session: Session, split: str, pairs: Sequence[PreferencePair], page: int | None = None
              ) -> Iterator[dict[str, Any]]:
    """The rows of one split, in the order of `pairs`, shaped exactly as dataset_schema declares.

    The prompts and response texts are read PAGE pairs at a time, so memory holds one page of
    texts however large the store is.
    """
    page = page or PAGE
    prefs = split.endswith("_prefs")
    row = rules.prefs_row if prefs else rules.sft_row
    for start in range(0, len(pairs), page):
        chunk = pairs[start:start + page]
        prompts = q.column_by_ids(session, Prompt.messages, (p.prompt_id for p in chunk))
        # text and finish_reason in one query: a reply the token cap stopped is marked *_cut
        replies = q.column_by_ids(session, Response.text, (i for p in chunk
                                                           for i in ((p.chosen_id, p.rejected_id) if prefs
                                                                     else (p.chosen_id,))),
                                  Response.finish_reason)
        texts = {i: text for i, (text, _) in replies.items()}
        cut = {i for i, (_, finish) in replies.items() if schema.is_cut(finish)}
        for p in chunk:
            yield row(p, prompts[p.prompt_id], texts, cut)


def build_rows(session: Session, sel: rules.Selection, test_fraction: float) -> dict[str, list[dict[str, Any]]]:
    """Every row per split as lists, sorted by id (all in memory: for tests and small looks)."""
    return {name: list(iter_rows(session, name, pairs)) for name, pairs in plan_export(sel, test_fraction).items()}


# --- facts for the card and manifest -------------------------------------------------------

def collect_facts(session: Session, config: ExportConfig, sel: rules.Selection, plan: rules.Plan) -> dict[str, Any]:
    """What the card and manifest say, all taken from the data (no clock), so re-exports match."""
    replies = [i for p in sel.pairs for i in (p.chosen_id, p.rejected_id)]
    sampling, response_models, response_runs = q.response_facts(session, replies)
    return card_facts(
        config, sel, plan, version_row=q.constitution_version(session, sel.name, sel.version),
        sampling=sampling, response_models=response_models,
        runs=q.run_facts(session, (i for i in {p.run_id for p in sel.pairs} | response_runs if i)),
        prompt_tags=q.tag_counts(session, {p.prompt_id for p in sel.pairs}),
        cut=q.finished_by(session, replies, schema.CUT_FINISH_REASON),
        moved_to_test=sorted(p for p in {p.prompt_id for p in plan["test_prefs"]}
                             if not is_held_out(p, config.test_fraction)),
        split_rule=RULE)


def build_export(session: Session, config: ExportConfig, staging: Path | None = None):
    """(DatasetDict, facts): the heart of the export, what tests call.

    The DatasetDict's arrow files go under `staging` (the caller removes it once they are
    written out); without one, a temporary directory removed when the DatasetDict is collected.
    """
    sel = select_for_export(session, config)
    plan = plan_export(sel, config.test_fraction)
    facts = collect_facts(session, config, sel, plan)
    rows = partial(iter_rows, session)
    if staging is None:
        staging = Path(tempfile.mkdtemp(prefix="cai-export-rows-"))
        data = to_dataset_dict(plan, rows, staging)
        weakref.finalize(data, shutil.rmtree, staging, ignore_errors=True)
    else:
        data = to_dataset_dict(plan, rows, staging)
    return data, facts | taught_facts(data)


# --- checks before a flow run --------------------------------------------------------------

def preflight(config: ExportConfig) -> None:
    """The checks that need no Prefect, so bad input fails in a second, before a flow run starts."""
    check_out(Path(config.out))
    if config.push_to_hub:
        hub_token(config.push_to_hub)
    with session_scope() as s:
        select_for_export(s, config)


# --- the Prefect flow ----------------------------------------------------------------------
# Thin: each task wraps one function above; the flow records a Run row and returns a summary.

# log_prints=False: under a parent flow with log_prints (the pipeline), Prefect's print capture
# defeats dill's stdout capture of dis.dis() inside datasets' fingerprinting, and every
# disassembled line would land in the run log
@stage_task(name="export-build", log_prints=False)
def build_task(config: ExportConfig, run_id: str, staging: Path):
    with session_scope() as s:
        data, facts = build_export(s, config, staging)
        run = s.get(Run, run_id)
        if run is not None:  # so `cai status` shows which version this run exported
            run.constitution = facts["constitution"]["name"]
            run.constitution_version = facts["constitution"]["version"]
            s.add(run)
    return data, facts


@stage_task(name="export-write", log_prints=False)
def write_task(data, facts: dict[str, Any], config: ExportConfig) -> dict[str, Any]:
    return write_export(data, facts, config.out, config.format)


@stage_task(name="export-push", log_prints=False)
def push_task(config: ExportConfig, ref: str) -> str:
    return push_export(config.out, config.push_to_hub or "", config.private, f"cai export {ref}")


@stage_flow(name="export", log_prints=False)
def export_flow(config: ExportConfig) -> dict[str, Any]:
    """Select pairs, build the DatasetDict, write it with its card, then push if asked."""
    log = run_logger()
    log.info("export config: %s", json.dumps(mask_secrets(config.model_dump(mode="json"))))
    timer = Timer()
    with recorded_run("export", config.model_dump(mode="json")) as run:
        run.summary = {"run_id": run.id, "out": str(config.out), "format": config.format}
        run.timings = timer.totals
        staging = staging_dir(config.out)
        try:
            with timer("build"):
                data, facts = build_task(config, run.id, staging)
            run.summary |= {"constitution": facts["constitution"]["ref"], "counts": facts["counts"]}
            log.info("export %s: %s", facts["constitution"]["ref"], facts["counts"])
            if config.test_fraction > 0 and not facts["counts"]["test_sft"] and not facts["counts"]["test_prefs"]:
                # the split is by prompt hash: with few prompts the test bucket can be empty, by design
                run.summary["warning"] = (
                    f"the test splits are empty: none of the {facts['prompts']['train']} prompts hashed into "
                    f"the test bucket (--test-fraction {config.test_fraction}); more prompts or a larger "
                    "--test-fraction fill it")
                log.warning(run.summary["warning"])
            with timer("write"):
                write_task(data, facts, config)
            if config.push_to_hub:
                with timer("push"):
                    run.summary["url"] = push_task(config, facts["constitution"]["ref"])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    try:  # the Run row is closed: fold SQLite's WAL into cai.db, so a copy of that one file has every row
        checkpoint_wal()
    except Exception as exc:  # noqa: BLE001 - the export is written; a reader holding the log is no failure
        log.warning("could not checkpoint the SQLite write-ahead log (%s); copy cai.db-wal along with cai.db", exc)
    return run.summary
