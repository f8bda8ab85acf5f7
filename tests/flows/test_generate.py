"""The SL-CAI generate flow: rows, revision pairs, resume, failures, incremental edits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fakes import ScriptedEngine
from sqlmodel import select

from cai import sl_cai
from constitution.load import load_file
from flows.engine_cache import drop_engines, register_engine
from flows.generate import GenerateConfig, generate_flow
from store.db import session_scope
from store.models import Failure, PreferencePair, Prompt, Response, Run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def constitution_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "constitution"
    d.mkdir()
    shutil.copy(REPO / "constitution" / "harmless.yaml", d / "harmless.yaml")
    monkeypatch.setenv("CAI_CONSTITUTION_DIR", str(d))
    return d


@pytest.fixture
def scripted():
    eng = ScriptedEngine()
    register_engine("scripted", eng)
    yield eng
    drop_engines()


def _cfg(**kw) -> GenerateConfig:
    base = dict(model="scripted", prompts=["red-team"], limit=5, rounds=2, runner={"show_progress": False})
    return GenerateConfig(**(base | kw))


def _rows(url=None):
    with session_scope(url) as s:
        return {r.id: r for r in s.exec(select(Response))}


def test_flow_stores_every_row_and_revision_pairs(use_db, scripted, constitution_dir):
    c = load_file(constitution_dir / "harmless.yaml")
    summary = generate_flow(_cfg())
    assert summary["engine"] == {"backend": "scripted"}  # the hf engine adds device and dtype
    rows = _rows()
    kinds = sorted((r.kind, r.round) for r in rows.values())
    assert kinds.count(("initial", 0)) == 5
    for r in (1, 2):
        assert kinds.count(("critique", r)) == 5 and kinds.count(("revision", r)) == 5
    from constitution.govern import Governance

    gov = Governance([c])
    with session_scope() as s:
        categories = {p.id: p.category for p in s.exec(select(Prompt))}
    for row in rows.values():
        assert row.model == "scripted" and row.constitution_version == c.version
        assert row.run_id == summary["run_id"] and row.sampling["seed"] == 0
        if row.kind == "initial":
            assert row.parent_id is None and row.conversation[-1]["role"] == "user"
            continue
        # round 1 critiques under the principle that governs the prompt's category; later rounds draw
        rule = gov.rule(categories[row.prompt_id])
        principle = sl_cai.draw_principle(c, 0, row.prompt_id, row.round, rule.principle.id if rule else None)
        if row.round == 1:
            assert rule and principle == rule.principle
        # the conversation opens with that principle's few-shot examples (and no other principle's)
        prefix = sl_cai.few_shot_prefix(c, principle)
        assert row.conversation[: len(prefix)] == prefix
        assert row.principle_id == principle.id and row.principle_hash == principle.hash
        parent = rows[row.parent_id]
        assert parent.prompt_id == row.prompt_id
        assert parent.kind == ("initial" if row.round == 1 else "revision")
        if row.kind == "critique":
            assert row.conversation[-1]["content"] == principle.critique
        else:
            crit = rows[row.critique_id]
            assert row.critique == crit.text and crit.parent_id == row.parent_id
            assert row.conversation[-1]["content"] == principle.revision
            assert row.conversation[-2]["content"] == crit.text
    with session_scope() as s:
        pairs = s.exec(select(PreferencePair)).all()
        run = s.get(Run, summary["run_id"])
    assert len(pairs) == 5 and run.status == "completed" and run.config["rounds"] == 2
    for p in pairs:
        chosen, rejected = rows[p.chosen_id], rows[p.rejected_id]
        assert (chosen.kind, chosen.round, rejected.kind) == ("revision", 2, "initial")
        assert p.method == "revision" and p.label_prob == 1.0 and p.constitution_version == c.version
        assert p.principle_ids == [rows[i].principle_id for i in p.details["chain"] if rows[i].kind == "revision"]


def test_rerun_does_no_model_work(sqlite_url, monkeypatch, scripted, constitution_dir):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    generate_flow(_cfg())
    before = _rows()
    calls = scripted.stats.calls
    again = generate_flow(_cfg())
    assert scripted.stats.calls == calls, "a rerun must not call the engine"
    assert again["computed"] == 0 and again["new_pairs"] == 0
    assert {k: r.text for k, r in _rows().items()} == {k: r.text for k, r in before.items()}


def test_failures_are_recorded_and_quarantined_without_stopping(sqlite_url, monkeypatch, constitution_dir):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    # the engine returns empty text for one prompt's initial answer, every time
    with session_scope(sqlite_url) as s:
        from flows.common import ensure_tags
        from store.queries import prompts_for_tags

        ensure_tags(s, ["red-team"])
    with session_scope(sqlite_url) as s:
        victim = prompts_for_tags(s, ["red-team"])[2]
    eng = ScriptedEngine(fail_when=lambda conv: conv == victim.messages)
    register_engine("scripted", eng)
    try:
        summary = generate_flow(_cfg())
    finally:
        drop_engines()
    with session_scope(sqlite_url) as s:
        fails = s.exec(select(Failure)).all()
        pairs = s.exec(select(PreferencePair)).all()
    assert len(fails) == 1 and fails[0].stage == "generate.initial"
    assert fails[0].attempts == 3 and fails[0].quarantined and "empty output" in fails[0].error
    assert summary["stages"]["generate.initial"]["quarantined"] == 1
    # the other four prompts went all the way through
    assert len(pairs) == 4 and victim.id not in {p.prompt_id for p in pairs}
    from store.status import collect

    with session_scope(sqlite_url) as s:
        assert collect(s)["failures"]["quarantined"] == 1


def test_editing_one_principle_regenerates_only_its_rows(sqlite_url, monkeypatch, scripted, constitution_dir):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    cfg = _cfg(limit=12)
    old = load_file(constitution_dir / "harmless.yaml")
    generate_flow(cfg)
    old_rows = _rows()
    # edit the principle drawn most often in round 1 (one the few-shot examples do not use: editing
    # those changes the shared prefix, so every critique is rightly redone)
    in_few_shot = {ex.principle for ex in old.few_shot}
    used = [r.principle_id for r in old_rows.values() if r.kind == "critique" and r.principle_id not in in_few_shot]
    target = max(set(used), key=used.count)
    path = constitution_dir / "harmless.yaml"
    text = path.read_text()
    old_critique = old.principle(target).critique
    assert old_critique[:40] in text.replace("\n      ", " ")
    new_data = old.content()
    for p in new_data["principles"]:
        if p["id"] == target:
            p["critique"] = p["critique"] + " Be specific about who could be hurt."
    import yaml

    path.write_text(yaml.safe_dump(new_data, sort_keys=False))
    new = load_file(path)
    assert new.version != old.version and new.principle(target).hash != old.principle(target).hash

    sent_before = len(scripted.generated)
    generate_flow(cfg)
    new_rows = {k: r for k, r in _rows().items() if k not in old_rows}
    # old rows untouched, still tied to the old version
    assert all(_rows()[k].text == r.text for k, r in old_rows.items())
    assert {r.constitution_version for r in old_rows.values()} == {old.version}
    assert new_rows and {r.constitution_version for r in new_rows.values()} == {new.version}
    # every new row descends from a critique under the edited principle, and nothing else was redone
    def touched(row: Response) -> bool:
        while row is not None:
            if row.kind == "critique" and row.principle_id == target:
                return True
            row = new_rows.get(row.critique_id) if row.kind == "revision" else new_rows.get(row.parent_id)
        return False

    assert all(touched(r) for r in new_rows.values())
    assert len(scripted.generated) - sent_before == len(new_rows)
    prompts_with_target = {r.prompt_id for r in old_rows.values() if r.kind == "critique" and r.principle_id == target}
    assert {r.prompt_id for r in new_rows.values()} == prompts_with_target
    with session_scope(sqlite_url) as s:
        versions = {(p.constitution_version) for p in s.exec(select(PreferencePair))}
    assert versions == {old.version, new.version}


def test_a_constitution_edited_mid_run_does_not_mix_versions(use_db, constitution_dir):
    """The run resolves its constitution once: editing the file while it runs changes nothing in it."""
    path = constitution_dir / "harmless.yaml"
    original = load_file(path)

    class Editing(ScriptedEngine):
        def generate(self, conversations, sampling):
            if not getattr(self, "edited", False):
                self.edited = True
                import yaml

                doc = yaml.safe_load(path.read_text(encoding="utf-8"))
                doc["principles"][0]["critique"] = "Edited mid-run. " + doc["principles"][0]["critique"]
                path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
            return super().generate(conversations, sampling)

    eng = Editing()
    register_engine("scripted", eng)
    try:
        summary = generate_flow(_cfg(limit=3, rounds=1))
    finally:
        drop_engines()
    assert load_file(path).version != original.version  # the file did change
    with session_scope() as s:
        versions = {r.constitution_version for r in s.exec(select(Response))}
        run = s.get(Run, summary["run_id"])
    assert versions == {original.version} and run.config["constitution"] == original.ref
