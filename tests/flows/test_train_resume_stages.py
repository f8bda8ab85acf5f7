"""`--resume` for every training stage (issue 31): SFT's checkpoints in out/checkpoints/sft, a finished SFT
stage loaded rather than trained again under sft+dpo, and `cai reward train --checkpoint-every/--resume`."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from sqlmodel import select
from test_train import config, killed_at_save, store_pairs
from typer.testing import CliRunner

from flows.cli import app
from flows.common import UserError
from flows.train import run_training
from store.db import session_scope
from store.models import TrainingRun, TrainingStep
from training.checkpoint import META_FILE, latest_checkpoint


def _sft_dpo(tiny_model_dir, out, **kw):
    cfg = config(tiny_model_dir, out, stage="sft+dpo", max_steps=3, lr=1e-2, checkpoint_every=1, eval_fraction=0,
                 **kw)
    return cfg.model_copy(update={"sft": cfg.sft.model_copy(update={
        "lr": 3e-3, "max_steps": 3, "batch_size": 2, "checkpoint_every": 1, "max_length": 64,
        "max_prompt_length": 48})})


def _weights(out):
    return load_file(str(out / "model.safetensors"))


def test_sft_dpo_resumes_in_either_stage_and_ends_as_an_uninterrupted_run(sqlite_url, tiny_model_dir, tmp_path,
                                                                          monkeypatch):
    store_pairs(sqlite_url, n=8)
    straight = run_training(_sft_dpo(tiny_model_dir, tmp_path / "straight"), url=sqlite_url)
    out = tmp_path / "run"

    # killed as DPO starts: SFT's finished stage is a checkpoint, and --resume finds it (no DPO one yet)
    import flows.train

    real = flows.train.train_dpo

    def killed_dpo(*a, **kw):
        monkeypatch.setattr(flows.train, "train_dpo", real)
        raise RuntimeError("killed")

    monkeypatch.setattr(flows.train, "train_dpo", killed_dpo)
    with pytest.raises(RuntimeError, match="killed"):
        run_training(_sft_dpo(tiny_model_dir, out), url=sqlite_url)
    found = latest_checkpoint(out / "checkpoints" / "sft")
    assert found[1] == 3 and latest_checkpoint(out / "checkpoints") is None
    # a setting newer than a checkpoint is taken as the default the version that wrote it had
    meta_file = found[0] / META_FILE
    meta = json.loads(meta_file.read_text())
    del meta["meta"]["settings"]["sft.train_batch_tokens"]
    meta_file.write_text(json.dumps(meta))

    killed_at_save(monkeypatch)  # resumed, and killed again after DPO's last step: its step-2 is there
    with pytest.raises(RuntimeError, match="killed"):
        run_training(_sft_dpo(tiny_model_dir, out, resume=True), url=sqlite_url)
    assert latest_checkpoint(out / "checkpoints")[1] == 2

    again = run_training(_sft_dpo(tiny_model_dir, out, resume=True), url=sqlite_url)
    assert again["sft"]["resumed_from"] == 3 and again["resumed_from"] == 2 and again["steps"] == 3
    assert again["ref_computed"] == 0  # the loaded SFT weights are the ones the reference log-probs were keyed by
    assert again["sft"]["final_train"] == straight["sft"]["final_train"]
    a, b = _weights(tmp_path / "straight"), _weights(out)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    with session_scope(sqlite_url) as s:
        runs = s.exec(select(TrainingRun).where(TrainingRun.out_dir == str(out.resolve()))).all()
        assert [r.status for r in runs] == ["completed"] and runs[0].id == again["training_run_id"]
        steps = s.exec(select(TrainingStep).where(TrainingStep.training_run_id == runs[0].id)).all()
        assert sorted((r.split, r.step) for r in steps if r.split.endswith("train")) == [
            ("sft-train", 1), ("sft-train", 2), ("sft-train", 3), ("train", 1), ("train", 2), ("train", 3)]


def test_sft_alone_resumes_and_refuses_a_finished_run(sqlite_url, tiny_model_dir, tmp_path, monkeypatch):
    store_pairs(sqlite_url)
    out = tmp_path / "sft"
    cfg = config(tiny_model_dir, out, stage="sft", eval_fraction=0)
    cfg = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={
        "max_steps": 3, "batch_size": 2, "checkpoint_every": 1, "max_length": 64, "max_prompt_length": 48})})
    killed_at_save(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        run_training(cfg, url=sqlite_url)
    again = run_training(cfg.model_copy(update={"resume": True}), url=sqlite_url)
    assert again["stage"] == "sft" and again["sft"]["resumed_from"] == 2 and again["steps"] == 3
    with pytest.raises(UserError, match="which finished; drop --resume"):
        run_training(cfg.model_copy(update={"resume": True}), url=sqlite_url)


def test_cli_reward_train_checkpoints_and_resumes(sqlite_url, tiny_model_dir, tmp_path, monkeypatch):
    import training.reward

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    store_pairs(sqlite_url, n=8)
    out = tmp_path / "rm"
    args = ["reward", "train", "--base", str(tiny_model_dir), "--max-steps", "4", "--lr", "1e-3", "--head-lr",
            "1e-2", "--batch-size", "2", "--grad-accum", "2", "--max-length", "64", "--max-prompt-length", "48",
            "--eval-fraction", "0", "--checkpoint-every", "1", "--out", str(out)]
    real = training.reward.save_reward_model

    def killed(*a, **kw):
        monkeypatch.setattr(training.reward, "save_reward_model", real)
        raise RuntimeError("killed")

    monkeypatch.setattr(training.reward, "save_reward_model", killed)
    assert CliRunner().invoke(app, args).exit_code != 0
    assert latest_checkpoint(out / "checkpoints")[1] == 3
    res = CliRunner().invoke(app, [*args, "--resume", "--lr", "5e-3"])
    assert res.exit_code == 2 and "trained with reward.lr=0.001, this run has reward.lr=0.005" in res.output, res.output
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "training_run.json").read_text())["summary"]
    assert summary["resumed_from"] == 3 and summary["steps"] == 4
    with session_scope(sqlite_url) as s:
        tr = s.get(TrainingRun, summary["training_run_id"])
        assert tr.status == "completed"
        steps = s.exec(select(TrainingStep).where(TrainingStep.training_run_id == tr.id)).all()
        assert sorted(r.step for r in steps) == [1, 2, 3, 4]
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 2 and "which finished" in res.output, res.output
