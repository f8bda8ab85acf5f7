"""Issue 34, items 5-11: training outputs, resume, the reference cache, regating, reward scoring,
submit and the pipeline's finished-training check."""

from __future__ import annotations

from test_train import store_pairs
from typer.testing import CliRunner

from flows.cli import app


def test_reward_score_refuses_a_causal_lm_directory(sqlite_url, tiny_model_dir, monkeypatch):
    """A plain causal LM would load with a fresh zero head and score every reply 0.000, rc 0."""
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    store_pairs(sqlite_url, n=2)
    res = CliRunner().invoke(app, ["reward", "score", "--model", str(tiny_model_dir)])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert f"--model {tiny_model_dir}: not a reward model directory" in out and "Traceback" not in out


def test_submit_refuses_shards_for_flows_that_claim_no_work(monkeypatch):
    """Two `train` runs would write one --out together (they raced on model.safetensors)."""
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens: refused before asking
    for deployment in ("train/nightly", "export/x", "pipeline/all"):
        res = CliRunner().invoke(app, ["submit", deployment, "--shards", "2"])
        out = " ".join(res.output.split())
        assert res.exit_code == 2 and "claims no work" in out and "--shards 1" in out, res.output
        assert len(res.output.strip().splitlines()) <= 2  # one line (rich may wrap it once)
    res = CliRunner().invoke(app, ["submit", "generate/nightly", "--shards", "2"])  # claims: the server is asked
    assert res.exit_code == 2 and "cannot reach the Prefect server" in res.output, res.output


def test_pipeline_recognises_a_finished_adapter_only_training(sqlite_url, tmp_path, monkeypatch):
    """--set stage=dpo with LoRA leaves only the adapter in --out (no config.json): every `cai run`
    retrained it."""
    from flows.configs import PipelineConfig
    from flows.pair_selection import load_examples
    from flows.pipeline import _finished_training, stage_configs
    from store.db import session_scope
    from store.models import TrainingRun, utcnow
    from training.data import selection_hash

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    store_pairs(sqlite_url, n=4, constitution="harmless")
    out = tmp_path / "m"
    tcfg = stage_configs(PipelineConfig(model_dir=str(out), stage="dpo", trainer={"lora": {"r": 4}}))["train"]
    tcfg = tcfg.model_copy(update={"constitution": "harmless"})
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"")
    with session_scope(sqlite_url) as s:
        s.add(TrainingRun(id="tr-a", base_model="m", out_dir=str(out.resolve()), config=tcfg.model_dump(),
                          status="completed", finished_at=utcnow(),
                          data_selection={"pairs_hash": selection_hash(load_examples(tcfg)[0])}))
    assert _finished_training(tcfg)["training_run_id"] == "tr-a"


def _sft_dpo(tiny_model_dir, out, **kw):
    from test_train import config

    cfg = config(tiny_model_dir, out, stage="sft+dpo", max_steps=1, lr=1e-2, **kw)
    return cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"lr": 3e-3, "max_steps": 2, "batch_size": 4,
                                                                   "max_length": 64, "max_prompt_length": 48})})


def test_sft_dpo_never_reuses_the_reference_logps_of_another_sft_model(sqlite_url, tiny_model_dir, tmp_path):
    """Same pairs and SFT settings, another split (eval_fraction): another SFT model, so the cached
    reference log-probs of the first run are not its reference; DPO's step 1 has policy == reference."""
    import math

    from sqlmodel import select

    from flows.train import run_training
    from store.db import session_scope
    from store.models import TrainingStep

    store_pairs(sqlite_url, n=8)
    run_training(_sft_dpo(tiny_model_dir, tmp_path / "a", eval_fraction=0.25), url=sqlite_url)
    second = run_training(_sft_dpo(tiny_model_dir, tmp_path / "b", eval_fraction=0), url=sqlite_url)
    assert second["ref_reused"] == 0
    with session_scope(sqlite_url) as s:
        first_step = s.exec(select(TrainingStep).where(TrainingStep.training_run_id == second["training_run_id"],
                                                       TrainingStep.split == "train", TrainingStep.step == 1)).one()
    assert abs(first_step.metrics["loss"] - math.log(2)) < 1e-4
    assert abs(first_step.metrics["rewards/margins"]) < 1e-4


def test_training_output_holds_only_the_new_model(sqlite_url, tiny_model_dir, tmp_path):
    """An adapter over earlier full weights (or full weights over an adapter and merged/) was loaded
    together with the stale files; now --out holds exactly what the last run wrote."""
    import pytest
    from test_train import config

    from engines.bundled import is_adapter_dir
    from flows.common import UserError
    from flows.train import run_training

    store_pairs(sqlite_url, n=4)
    out = tmp_path / "x"
    lora = {"lora": {"r": 4, "alpha": 8}}
    run_training(config(tiny_model_dir, out, max_steps=1, eval_fraction=0, merge_lora=True, **lora), url=sqlite_url)
    assert is_adapter_dir(out) and (out / "merged" / "model.safetensors").exists()
    run_training(config(tiny_model_dir, out, max_steps=1, eval_fraction=0), url=sqlite_url)  # full weights
    assert (out / "model.safetensors").exists() and (out / "training_run.json").exists()
    assert not (out / "adapter_config.json").exists() and not (out / "merged").exists()
    run_training(config(tiny_model_dir, out, max_steps=1, eval_fraction=0, **lora), url=sqlite_url)
    assert is_adapter_dir(out) and not (out / "model.safetensors").exists() and not (out / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".x.")] == []  # no temporary left

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a person's file")
    with pytest.raises(UserError, match="not a training output"):
        run_training(config(tiny_model_dir, mine, max_steps=1, eval_fraction=0), url=sqlite_url)
    assert (mine / "notes.txt").read_text() == "a person's file"


def test_db_regate_gates_pairs_made_before_the_gates(sqlite_url, monkeypatch):
    """A store upgraded from before the gates (migration 0002 adds Response.quality, NULL) kept every
    pair `ok`, so degenerate chosen replies were exported and trained; `cai db regate` assesses them
    as a pair made now would be, and leaves pairs made with the gates as they are."""
    from store.db import session_scope
    from store.keys import content_hash
    from store.models import PreferencePair, Prompt, Response
    from store.upsert import insert_ignore

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    good = "Pack glasses in paper and put heavy things at the bottom of small boxes. Label each box by room."
    bad = "the cat sat on the mat " * 15
    with session_scope(sqlite_url) as s:
        for i, (chosen, rejected, quality) in enumerate([(bad, good, None), (good, bad, None),
                                                         (bad, good, {"failed": []})]):
            messages = [{"role": "user", "content": f"How do I pack a kitchen, take {i}?"}]
            pid = content_hash("prompt", messages)
            insert_ignore(s, Prompt, [Prompt(id=pid, text=messages[-1]["content"], messages=messages)])
            insert_ignore(s, Response, [
                Response(id=f"c{i}", prompt_id=pid, kind="initial", conversation=messages, text=chosen, model="m",
                         quality=quality),
                Response(id=f"r{i}", prompt_id=pid, kind="initial", conversation=messages, text=rejected, model="m",
                         quality=quality)])
            insert_ignore(s, PreferencePair, [PreferencePair(id=f"p{i}", prompt_id=pid, chosen_id=f"c{i}",
                                                             rejected_id=f"r{i}", method="ai", constitution="harmless",
                                                             constitution_version="old")])
    res = CliRunner().invoke(app, ["db", "regate"])
    assert res.exit_code == 0, res.output
    assert "2 pairs made before the gates checked, 1 gated (gated:repetition 1)" in " ".join(res.output.split())
    with session_scope(sqlite_url) as s:
        assert [s.get(PreferencePair, f"p{i}").status for i in range(3)] == ["gated:repetition", "ok", "ok"]
    res = CliRunner().invoke(app, ["db", "regate"])  # idempotent: nothing left to move
    assert res.exit_code == 0 and "1 pairs made before the gates checked, 0 gated" in res.output, res.output


def test_resume_continues_only_an_unfinished_run_with_the_same_settings(sqlite_url, tiny_model_dir, tmp_path,
                                                                        monkeypatch):
    """A completed run's checkpoints were kept and resumed (at another learning rate, overwriting its
    TrainingRun row), and a new run's own checkpoints were rotated away by the older, higher steps."""
    import pytest
    from sqlmodel import select
    from test_train import config, killed_at_save

    from flows.common import UserError
    from flows.train import run_training
    from store.db import session_scope
    from store.models import Run, TrainingRun
    from training.checkpoint import latest_checkpoint, read_meta

    store_pairs(sqlite_url, n=4)
    out = tmp_path / "run"
    finished = run_training(config(tiny_model_dir, out, max_steps=3, checkpoint_every=1, eval_fraction=0),
                            url=sqlite_url)
    with pytest.raises(UserError, match=f"belongs to training run {finished['training_run_id']}, which finished"):
        run_training(config(tiny_model_dir, out, max_steps=3, checkpoint_every=1, eval_fraction=0, lr=5e-3,
                            resume=True), url=sqlite_url)

    killed_at_save(monkeypatch)  # a new run dies after its last step: its checkpoint step-1 stays
    with pytest.raises(RuntimeError, match="killed"):
        run_training(config(tiny_model_dir, out, max_steps=2, checkpoint_every=1, eval_fraction=0), url=sqlite_url)
    with session_scope(sqlite_url) as s:
        killed_row = s.exec(select(TrainingRun).where(TrainingRun.status == "failed")).one()
        killed, run = killed_row.id, s.get(Run, killed_row.run_id)
    # one lifecycle (store/runs.py: recorded_run): the Run fails with the error, its TrainingRun with it,
    # and the half-written model directory is gone
    assert run.status == "failed" and run.summary["error"] == "RuntimeError: killed" and run.finished_at
    assert f"its run {run.id} ended failed" in killed_row.final_metrics["error"] and killed_row.finished_at
    assert not list(out.resolve().parent.glob(f".{out.name}.partial-*"))
    found = latest_checkpoint(out / "checkpoints")
    assert found[1] == 1 and read_meta(found[0])["training_run_id"] == killed  # not the finished run's step-2

    with pytest.raises(UserError, match=r"trained with trainer\.lr=0\.001, this run has trainer\.lr=0\.005"):
        run_training(config(tiny_model_dir, out, max_steps=2, checkpoint_every=1, eval_fraction=0, lr=5e-3,
                            resume=True), url=sqlite_url)
    again = run_training(config(tiny_model_dir, out, max_steps=2, checkpoint_every=1, eval_fraction=0, resume=True),
                         url=sqlite_url)
    assert again["resumed_from"] == 1 and again["training_run_id"] == killed
    with session_scope(sqlite_url) as s:
        row = s.get(TrainingRun, finished["training_run_id"])
        assert row.status == "completed" and row.config["trainer"]["max_steps"] == 3  # untouched
