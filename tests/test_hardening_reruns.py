"""Issue 13 item 12, what was left: reruns against a store that already holds rows.

- Editing one preference principle's wording redoes only the judgments that used it; every other
  judgment is reused, and the new version's pairs average the new judgments with the old ones.
- A second round of generate / label / contrast / export with other settings (more prompts, another
  tag, more rounds and samples) adds rows and leaves every row stored before exactly as it was.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from fakes import ScriptedEngine
from sqlmodel import select
from test_hardening_cli import TINY, invoke, runner  # noqa: F401 - runner is a fixture

from cai import judge
from flows.engine_cache import drop_engines, register_engine
from store.db import session_scope
from store.models import Judgment, PreferencePair, Prompt, PromptTag, Response

EDITED = "EDITED WORDING"


def _logprobs(conv, choice):
    """A judge whose verdict depends on the principle's wording, so an edit changes its labels: it
    prefers the option with the smaller text under the edited wording, the larger one otherwise."""
    user = conv[0]["content"]
    a, b = user.split("(A) ", 1)[1].split("\n\n(B) ", 1)
    p_a = 0.8 if (a < b) == (EDITED in user) else 0.2
    return math.log(p_a if choice == judge.CHOICE_A else 1.0 - p_a)


def _judgments(url: str) -> dict[str, tuple]:
    with session_scope(url) as s:
        return {j.id: (j.principle_id, j.principle_hash, j.pair_key, j.order, j.prob_x, j.constitution_version)
                for j in s.exec(select(Judgment))}


def _pairs(url: str) -> dict[str, PreferencePair]:
    with session_scope(url) as s:
        return {p.id: p for p in s.exec(select(PreferencePair))}


def test_editing_one_preference_principle_redoes_only_its_judgments(sqlite_url, monkeypatch, tmp_path):
    from flows.label import label_flow, make_config

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    path = tmp_path / "harmless.yaml"
    path.write_text((Path(__file__).parents[1] / "constitution" / "harmless.yaml").read_text())
    eng = ScriptedEngine(logprobs=_logprobs)
    register_engine("scripted", eng)
    try:
        cfg = make_config(constitution=str(path), policy="scripted", judge="scripted", prompts=["red-team"],
                          limit=3, samples=3, principles_per_pair=2, calibrate=False,
                          runner={"show_progress": False})
        first = label_flow(cfg)
        j1, p1 = _judgments(sqlite_url), _pairs(sqlite_url)
        with session_scope(sqlite_url) as s:
            samples = {r.id: r.text for r in s.exec(select(Response))}
        # the principle used by the fewest pairs (but by some), so the edit touches some, not all
        uses: dict[str, set[str]] = {}
        for pid, _, pkey, _, _, _ in j1.values():
            uses.setdefault(pid, set()).add(pkey)
        edited = min(uses, key=lambda k: (len(uses[k]), k))
        n_pairs = len(p1)
        assert first["pairs"] == n_pairs and 0 < len(uses[edited]) < n_pairs

        doc = yaml.safe_load(path.read_text())
        for pref in doc["preferences"]:
            if pref["id"] == edited:
                pref["question"] = f"{EDITED}: {pref['question']}"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        scored = len(eng.scored)
        second = label_flow(cfg)
    finally:
        drop_engines()

    j2, p2 = _judgments(sqlite_url), _pairs(sqlite_url)
    new = {k: v for k, v in j2.items() if k not in j1}
    redo = [k for k, v in j1.items() if v[0] == edited]
    # every judgment stored before is still there, unchanged; only the edited principle's are new
    assert {k: j2[k] for k in j1} == j1
    assert len(new) == len(redo) and {v[0] for v in new.values()} == {edited}
    assert {(v[2], v[3]) for v in new.values()} == {(j1[k][2], j1[k][3]) for k in redo}
    assert len(eng.scored) - scored == len(redo)  # the judge scored only those
    # new judgments, and a new pair only where the edited question was asked: a pair whose judgments
    # did not change is the same pair under the new version, not minted again
    assert second["computed"] == len(redo) + len(uses[edited])
    with session_scope(sqlite_url) as s:  # no sample was redone: the candidates do not depend on it
        assert {r.id: r.text for r in s.exec(select(Response))} == samples

    assert {k: (v.label_prob, v.chosen_id, v.details) for k, v in p2.items() if k in p1} == \
        {k: (v.label_prob, v.chosen_id, v.details) for k, v in p1.items()}
    fresh = {v.details["pair_key"]: v for k, v in p2.items() if k not in p1}
    old = {v.details["pair_key"]: v for v in p1.values()}
    assert set(fresh) == uses[edited] and second["pairs"] == n_pairs
    changed = 0
    for pkey, pair in fresh.items():
        assert pair.constitution_version != old[pkey].constitution_version
        ids = pair.details["judgments"]
        assert all(i in j2 for i in ids) and len(ids) == len(old[pkey].details["judgments"])
        assert {i for i in ids if i not in j1} == {i for i in ids if j2[i][0] == edited} != set()
        assert pair.details["prob_x"] == pytest.approx(sum(j2[i][4] for i in ids) / len(ids))
        changed += pair.details["prob_x"] != pytest.approx(old[pkey].details["prob_x"])
    assert changed == len(uses[edited])  # the edited wording moved those labels
    # under the new version every prompt pair counts once: the unchanged ones carried over, the rest new
    from store.models import ConstitutionVersion
    from training.data import PairFilter, select_pairs

    with session_scope(sqlite_url) as s:
        newest = max(s.exec(select(ConstitutionVersion).where(ConstitutionVersion.name == "harmless")),
                     key=lambda r: r.created_at).version
        current = select_pairs(s, PairFilter(constitution=f"harmless@{newest}", methods=("ai",),
                                             statuses=tuple({p.status for p in p2.values()})))
    assert len(current) == n_pairs and {e.id for e in current} == (set(p1) - {v.id for k, v in old.items()
                                                                             if k in fresh}) | {
        v.id for v in fresh.values()}


# --- a second round with other settings keeps every row stored before -------------------

home = __import__("test_hardening_cli").home  # a work dir with tiny.yaml (fixture)
TABLES = (Prompt, PromptTag, Response, Judgment, PreferencePair)


def _rows(url: str) -> dict[str, dict]:
    """Every stored row of the data tables, keyed by its primary key, as all its column values."""
    out: dict[str, dict] = {}
    with session_scope(url) as s:
        for m in TABLES:
            keys = [c.name for c in m.__table__.primary_key.columns]
            out[m.__tablename__] = {tuple(getattr(r, k) for k in keys): r.model_dump() for r in s.exec(select(m))}
    return out


def _round(runner, prompts: str, rounds: str, samples: str, out: str, *export) -> None:  # noqa: F811
    for args in (
        ["generate", "--model", "scripted", "--constitution", "tiny", "--prompts", prompts, "--rounds", rounds],
        ["label", "--constitution", "tiny", "--prompts", prompts, "--policy", "scripted", "--judge", "judge",
         "--source", "samples", "--samples", samples],
        ["contrast", "--model", "scripted", "--prompts", prompts, "--constitutions", "tinygov"],
        ["export", "--constitution", "tinygov", "--out", out, *export],
    ):
        r = invoke(runner, *args)
        assert r.exit_code == 0, (args, r.output)


def test_a_second_round_with_other_settings_keeps_every_stored_row(runner, home, sqlite_url, monkeypatch):  # noqa: F811
    from test_hardening_cli import seed

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    register_engine("scripted", ScriptedEngine())
    register_engine("judge", ScriptedEngine(logprobs=_logprobs))
    try:
        seed(sqlite_url, n=3, tag="before")
        _round(runner, "before", "1", "2", "exports/one")
        before = _rows(sqlite_url)
        assert all(before[m.__tablename__] for m in TABLES), {k: len(v) for k, v in before.items()}
        # more prompts (three of them already stored, now also tagged `after`), another tag, more
        # rounds and samples, another export setting; then the first export directory written again
        seed(sqlite_url, n=6, tag="after")
        _round(runner, "before,after", "2", "3", "exports/two", "--set", "test_fraction=0.5")
        r = invoke(runner, "export", "--constitution", "tinygov", "--out", "exports/one")
        assert r.exit_code == 0, r.output
    finally:
        drop_engines()
    after = _rows(sqlite_url)
    for table, rows in before.items():
        gone = [k for k in rows if k not in after[table]]
        changed = [k for k in rows if k in after[table] and after[table][k] != rows[k]]
        assert not gone and not changed, f"{table}: {len(gone)} rows gone, {len(changed)} changed"
        assert len(after[table]) > len(rows), f"{table}: the second round added no rows"
