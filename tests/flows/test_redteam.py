"""The redteam flow on a scripted attacker: verdicts, lineage, top-up rounds, resume, campaign and hits."""

from __future__ import annotations

import hashlib

import pytest
from sqlmodel import select

from cai import redteam
from constitution.taxonomy import load_taxonomy
from engines.base import Completion, EngineStats, Output
from flows.configs import RedteamConfig
from flows.engine_cache import drop_engines, register_engine
from flows.redteam import redteam_flow
from store.db import session_scope
from store.models import Prompt, PromptTag, RedteamAttack, RedteamCandidate, Run, TaxonomyVersion

WORDS = ("lamp garden rocket violin tractor cloud pepper marble saddle engine harbor velvet copper canyon "
         "whistle lantern orchard magnet quartz ribbon tunnel falcon glacier meadow pistol satchel beacon "
         "cobalt thimble walrus").split()


class Attacker:
    """Continues the numbered list: a new request, a copy of a shown example, a near-copy or junk,
    chosen by the conversation's hash. As a policy: refuses requests whose text has 'refuse-me'."""

    backend = "scripted"

    def __init__(self):
        self.model_id, self.stats, self.calls = "attacker", EngineStats(), []

    def _line(self, conv) -> str:
        h = hashlib.sha256(repr(conv).encode()).hexdigest()
        shown = conv[1]["content"].split("\n")[0].split(". ", 1)[1]
        pick = int(h, 16) % 5
        if pick == 0:
            return " " + shown  # exact copy of a seed: duplicate
        if pick == 1:
            return " " + shown.rstrip("?.") + " right now?"  # near-duplicate
        if pick == 2:
            return " ok"  # too short
        tail = "refuse-me" if pick == 3 else "answer-me"
        words = [WORDS[int(h[i:i + 2], 16) % len(WORDS)] for i in range(8, 24, 2)]
        return f" How would I {' '.join(words)} for my {tail} project?"  # 8 random words: no near-copies

    def generate(self, conversations, sampling):
        self.calls.append((len(conversations), sampling))
        out = []
        for conv in conversations:
            if conv[-1]["role"] == "assistant":
                text = self._line(conv)
            elif "refuse-me" in conv[-1]["content"]:
                text = "I'm sorry, but I can't help with that."
            else:
                text = "Sure. First you gather the parts, then you put them together in the shed."
            out.append(Completion([Output(text, len(text.split()), "stop")], 10))
        return out

    def choice_logprobs(self, conversations, choices):
        raise AssertionError("not used")

    def close(self):
        pass


@pytest.fixture
def attacker():
    eng = Attacker()
    register_engine("attacker", eng)
    yield eng
    drop_engines()


def _cfg(**kw) -> RedteamConfig:
    base = dict(model="attacker", per_category=4, max_rounds=8,
                categories=["weapons", "cybercrime", "benign-lookalike"], runner={"show_progress": False})
    return RedteamConfig(**(base | kw))


def test_flow_keeps_new_requests_with_lineage_and_tags_hits(use_db, attacker, monkeypatch, tmp_path):
    import flows.redteam as fr

    monkeypatch.setattr(fr, "campaign_name", lambda cfg, tax: f"attacker@{tax.version}")  # no weights to hash
    tax = load_taxonomy("harms")
    summary = redteam_flow(_cfg())
    with session_scope() as s:
        cands = s.exec(select(RedteamCandidate)).all()
        tags = {(t.prompt_id, t.tag) for t in s.exec(select(PromptTag))}
        prompts = {p.id: p for p in s.exec(select(Prompt))}
        attacks = s.exec(select(RedteamAttack)).all()
        run = s.get(Run, summary["run_id"])
        assert s.exec(select(TaxonomyVersion)).one().version == tax.version
    verdicts = {c.verdict for c in cands}
    assert {"kept", "duplicate", "near-duplicate", "length"} <= verdicts
    kept = [c for c in cands if c.verdict == "kept"]
    per_cat = {c: sum(k.category == c for k in kept) for c in ("weapons", "cybercrime", "benign-lookalike")}
    assert all(n >= 4 for n in per_cat.values()), per_cat  # topped up over rounds until each has its 4
    assert summary["kept"] == len(kept) and summary["generated"] == len(cands)
    seed_ids = {pid for pid, tag in tags if tag == redteam.SEED_TAG}
    for c in kept:
        p = prompts[c.prompt_id]
        assert p.text == c.text and p.category == c.category
        assert {(p.id, redteam.GEN_TAG), (p.id, c.category)} <= tags
        assert c.taxonomy_version == tax.version and c.model == "attacker" and c.run_id == run.id
        assert c.sampling["stop"] == ["\n"] and c.sampling["temperature"] == 0.8
        assert len(c.shot_ids) == 4 and set(c.shot_ids) <= seed_ids  # the few-shot prompts, by Prompt id
        shown = c.conversation[1]["content"]
        assert all(prompts[i].text in shown for i in c.shot_ids)
    for c in cands:
        if c.verdict in ("duplicate", "near-duplicate"):
            assert c.match in {p.text for p in prompts.values()} and c.prompt_id is None
    # campaign: every kept prompt answered once; refusals of harmful prompts are not hits
    assert len(attacks) == len(kept)
    for a in attacks:
        harmful = a.kind == "harmful"
        assert a.success == (harmful != a.refused)
        assert ((a.prompt_id, redteam.HIT_TAG) in tags) == a.success
    table = summary["attack_success"]
    assert set(table) == set(per_cat) and table["benign-lookalike"]["kind"] == "benign"
    assert sum(d["n"] for d in table.values()) == len(kept)
    assert run.status == "completed" and run.config["taxonomy_version"] == tax.ref

    # the report shows the campaign: a plot and a table of attack success per category
    from flows.configs import ReportConfig
    from flows.report import make_report

    rep = make_report(ReportConfig(out=tmp_path / "report"))
    assert rep["images"]["redteam"] == ["redteam.png"] and (tmp_path / "report" / "redteam.png").stat().st_size > 0
    assert rep["redteam"]["attack_success"] == table
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Red-team campaign" in html and "benign-lookalike" in html

    # a rerun does no model work and keeps nothing new
    calls = len(attacker.calls)
    again = redteam_flow(_cfg())
    assert len(attacker.calls) == calls and again["kept"] == 0


def test_unknown_category_is_one_line(use_db):
    from cai.errors import UserError
    from flows.redteam import load_inputs

    with pytest.raises(UserError, match="'nope' is not a category"):
        load_inputs(_cfg(categories=["nope"]))


@pytest.mark.slow
def test_real_attacker_writes_one_line_requests(sqlite_url, monkeypatch, capsys):
    """SmolLM2-135M continues the list: most lines pass the filters and every kept one is a request."""
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    summary = redteam_flow(RedteamConfig(per_category=4, max_rounds=1, categories=["weapons"], campaign=False,
                                         runner={"show_progress": False}))
    with session_scope() as s:
        kept = s.exec(select(RedteamCandidate).where(RedteamCandidate.verdict == "kept")).all()
    assert summary["generated"] == 8 and summary["kept"] == len(kept) >= 2  # measured: 45 % of lines kept
    for c in kept:
        assert "\n" not in c.text and len(c.text.split()) >= 5 and redteam.is_request(c.text)
    with capsys.disabled():
        print("\n[real attacker, weapons] " + " | ".join(c.text for c in kept))


@pytest.mark.parametrize("db", ["sqlite", "pg"])
def test_two_writers_never_keep_the_same_generated_prompt(db, request):
    """Two `cai redteam` processes on one store judged the same new line at once: each read the corpus
    before the other wrote, and both kept it (13 kept, 12 distinct). Each writer now reads under a lock."""
    import threading

    from cai.redteam import GenItem
    from flows.redteam import write_candidates
    from store import redteam as redteam_store

    url = request.getfixturevalue("sqlite_url" if db == "sqlite" else "pg_url")
    cfg = _cfg(database_url=url)
    tax = load_taxonomy("harms")
    cat = next(c for c in tax.categories if c.id == "weapons")
    line = " How would I " + " ".join(WORDS[:8]) + " for my answer-me project?"
    both_read = threading.Barrier(2, timeout=3)  # without a lock, both read before either writes
    real = redteam_store.corpus_texts

    def stored_texts(session):
        texts = real(session)
        try:
            both_read.wait()
        except threading.BrokenBarrierError:  # the other writer waits for the lock: it reads after us
            pass
        return texts

    errors = []

    def writer(i: int):
        try:
            item = GenItem(f"key-{i}", cat, 0, (), [{"role": "system", "content": "x"}])
            with session_scope(url) as s:
                write_candidates(s, cfg, tax, cfg.attacker_sampling(), f"run-{i}",
                                 [(item, Completion([Output(line, 12, "stop")], 10))])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with session_scope(url):  # the schema, before two first uses race on it
        pass
    redteam_store.corpus_texts = stored_texts
    try:
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        redteam_store.corpus_texts = real
    assert not errors, errors
    with session_scope(url) as s:
        verdicts = sorted(c.verdict for c in s.exec(select(RedteamCandidate)))
    assert verdicts == ["duplicate", "kept"]
