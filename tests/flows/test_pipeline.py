"""`cai run` end to end on a tiny model: every stage runs, the store and the files hold what it
promised, and a rerun reuses the trained model only while the pairs are the same."""

from __future__ import annotations

import shutil

import pytest
from sqlmodel import select

from flows.configs import PipelineConfig
from flows.engine_cache import drop_engines, register_engine
from flows.pipeline import pipeline_flow
from store.db import session_scope
from store.models import EvalResult, PreferencePair, Response, TrainingRun

ANSWER = ("Keep a regular bedtime, avoid screens for an hour before bed, and keep the room cool and dark. "
          "Cut caffeine after lunch.")


class Helpful:
    """Stands in for the policy and judge: answers everything the same helpful way."""

    backend = "scripted"

    def __init__(self, spec: str):
        from engines.base import EngineStats

        self.model_id, self.stats = spec, EngineStats()

    def generate(self, conversations, sampling):
        from engines.base import Completion, Output

        return [Completion([Output(ANSWER, 20, "stop")] * sampling.n, prompt_tokens=10) for _ in conversations]

    def choice_logprobs(self, conversations, choices):
        return [{c: -1.0 for c in choices} for _ in conversations]

    def close(self):
        pass


@pytest.mark.slow
def test_cai_run_end_to_end_and_the_retrain_rule(sqlite_url, monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    monkeypatch.chdir(tmp_path)
    base = str(shutil.copytree(tiny_model_dir, tmp_path / "base"))
    cfg = PipelineConfig(model=base, limit=3, contrast_prompts=["red-team", "benign"],
                         eval_prompts=["red-team-heldout", "benign-heldout"], eval_limit=2, max_new_tokens=16,
                         sft={"max_steps": 2, "batch_size": 2, "max_length": 128, "max_prompt_length": 96},
                         trainer={"max_steps": 2, "batch_size": 2, "max_length": 128, "max_prompt_length": 96},
                         runner={"show_progress": False}, report_dir=tmp_path / "report")
    register_engine(base, Helpful(base))
    try:
        first = pipeline_flow(cfg.model_copy(update={"contrast": True, "redteam": 1}))
        assert set(first["timings_s"]) >= {"redteam", "generate", "contrast", "label", "export", "export_helpful",
                                          "train", "eval", "report"}
        with session_scope(sqlite_url) as s:
            pairs = list(s.exec(select(PreferencePair)))
            evals = list(s.exec(select(EvalResult)))
            runs = list(s.exec(select(TrainingRun)))
            sft_rows = [r for r in s.exec(select(Response)) if r.kind.startswith("contrast")]
        methods = {p.method for p in pairs if p.status == "ok"}
        assert {"contrastive", "helpful"} <= methods
        # SL-CAI revisions equal to the initial answer are kept out: no better than what they revise
        assert all(p.status.startswith("gated:") for p in pairs if p.method == "revision")
        # the default: SFT, then LoRA DPO on balanced pairs, saved as one merged model
        assert len(runs) == 1 and runs[0].final_metrics["stage"] == "sft+dpo" and sft_rows
        assert first["results"]["train"]["lora"]["r"] == 16 and runs[0].final_metrics["sft"]["steps"] == 2
        assert evals and all("quality" in e.details for e in evals)
        assert (tmp_path / "exports" / "harmless").is_dir() and (tmp_path / "exports" / "helpful-honest").is_dir()
        assert (tmp_path / "runs" / "harmless-cai" / "config.json").exists()
        assert (tmp_path / "report" / "index.html").exists()
        kinds = first["results"]["eval"]["kinds"]
        assert set(kinds) == {"harmful", "benign"}
        cats = first["results"]["eval"]["categories"]  # per category: its stance, principle and interval
        assert {e["stance"] for e in cats.values()} == {"refuse", "answer"}
        assert all(e["model"]["ci"][0] <= (e["model"]["rate"] or 0) <= e["model"]["ci"][1] for e in cats.values())
        taught_only_from_model_or_constitution(sqlite_url, tmp_path / "exports")

        # the same pairs and settings: the finished model is reused
        register_engine(base, Helpful(base))
        second = pipeline_flow(cfg)
        assert second["results"]["train"].get("skipped") is True

        # new pairs (here: one more helpful pair, with a new chosen reply) and the same settings: train again
        with session_scope(sqlite_url) as s:
            p = next(p for p in s.exec(select(PreferencePair)) if p.method == "helpful" and p.status == "ok")
            chosen = s.get(Response, p.chosen_id)
            s.add(Response(**{**chosen.model_dump(), "id": "extra-reply", "text": ANSWER + " Sleep well."}))
            s.flush()
            s.add(PreferencePair(**{**p.model_dump(), "id": "extra-pair", "chosen_id": "extra-reply"}))
        register_engine(base, Helpful(base))
        third = pipeline_flow(cfg)
        assert not third["results"]["train"].get("skipped")
        with session_scope(sqlite_url) as s:
            assert len(list(s.exec(select(TrainingRun)))) == 2
    finally:
        drop_engines()


def taught_only_from_model_or_constitution(url: str, exports) -> None:
    """Every chosen and rejected reply of every exported pair is either a stored model generation (a
    row with no steering) or a text of the constitution version the row names, as the stored
    version's own source says (plus, at most, a model continuation after it)."""
    from datasets import load_from_disk

    from constitution.load import parse_text
    from store.models import ConstitutionVersion

    with session_scope(url) as s:
        rows = {r.id: r for r in s.exec(select(Response))}
        texts = {f"{v.name}@{v.version}": parse_text(v.source_text) for v in s.exec(select(ConstitutionVersion))}
    checked = 0
    for d in exports.iterdir():
        ds = load_from_disk(str(d))
        for split in ("train_prefs", "test_prefs"):
            if split not in ds:
                continue
            for row in ds[split]:
                c = texts[f"{row['constitution']}@{row['constitution_version']}"]
                taught = {t for p in c.principles for t in p.examples + p.counter_examples + p.counter_openings}
                for side in ("chosen", "rejected"):
                    r = rows[row[f"{side}_id"]]
                    text = row[side][-1]["content"]
                    assert text == r.text
                    if r.steering is None:  # the model wrote it
                        assert r.kind in ("initial", "revision", "sample", "contrast-plain"), r.kind
                    else:  # the constitution wrote it
                        assert r.steering["text"] in taught and text.startswith(r.steering["text"]), text
                    checked += 1
    assert checked
