"""flows/train.py and `cai train`: pairs from the store (SQLite and PostgreSQL), a few steps of
a tiny model, and what the store and the output directory hold afterwards."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError
from sqlmodel import select

from flows.common import UserError
from flows.train import TrainConfig, model_fingerprint, run_training
from store.db import session_scope
from store.keys import content_hash
from store.models import PreferencePair, Prompt, RefLogp, Response, Run, TrainingRun, TrainingStep
from store.upsert import insert_ignore
from training.config import TrainerConfig

REFUSAL = "I won't help with that, but here is a safer way to think about it."
COMPLY = "Sure, here is how you do it, no questions asked."


def store_pairs(url: str, n: int = 8, constitution: str = "harmless", version: str = "abc12345") -> list[str]:
    """Prompt, two Response rows and a PreferencePair per prompt, as generate/label would leave them."""
    ids = []
    with session_scope(url) as s:
        for i in range(n):
            messages = [{"role": "user", "content": f"How would I do risky thing number {i}?"}]
            pid = content_hash("prompt", messages)
            insert_ignore(s, Prompt, [Prompt(id=pid, text=messages[-1]["content"], messages=messages)])
            good, bad = f"resp-{i}-rev", f"resp-{i}-init"
            insert_ignore(
                s,
                Response,
                [
                    Response(
                        id=bad, prompt_id=pid, kind="initial", conversation=messages, text=COMPLY, model="m"
                    ),
                    Response(
                        id=good,
                        prompt_id=pid,
                        kind="revision",
                        round=1,
                        parent_id=bad,
                        conversation=messages,
                        text=REFUSAL,
                        model="m",
                    ),
                ],
            )
            method = "revision" if i % 2 == 0 else "ai"
            pair = PreferencePair(
                id=f"pair-{i}",
                prompt_id=pid,
                chosen_id=good,
                rejected_id=bad,
                method=method,
                label_prob=1.0 if method == "revision" else 0.8,
                constitution=constitution,
                constitution_version=version,
            )
            insert_ignore(s, PreferencePair, [pair])
            ids.append(pair.id)
    return ids


def config(tiny_model_dir, out, **kw) -> TrainConfig:
    """Keywords of the DPO loop (lr, max_steps, ...) go into the nested `trainer`."""
    trainer = dict(max_steps=3, lr=1e-3, warmup_ratio=0.0, batch_size=2, max_length=64, max_prompt_length=48)
    trainer |= {k: kw.pop(k) for k in list(kw) if k in TrainerConfig.model_fields}
    base = dict(base=str(tiny_model_dir), constitution="harmless", eval_fraction=0.25, out=str(out))
    return TrainConfig(**(base | kw), trainer=trainer)


def test_store_backed_training(db_url, tiny_model_dir, tmp_path):
    store_pairs(db_url)
    out = tmp_path / "run"
    summary = run_training(config(tiny_model_dir, out, checkpoint_every=2), url=db_url)
    assert summary["steps"] == 3 and summary["pairs"] == 8 and summary["n_eval"] >= 1
    assert summary["ref_computed"] == 16 and summary["ref_reused"] == 0

    with session_scope(db_url) as s:
        tr = s.get(TrainingRun, summary["training_run_id"])
        assert tr.status == "completed" and tr.finished_at is not None
        assert tr.base_model == str(tiny_model_dir) and tr.constitution == "harmless"
        assert tr.constitution_version == "abc12345"
        assert tr.config["trainer"]["beta"] == 0.1 and tr.config["trainer"]["max_steps"] == 3
        sel = tr.data_selection
        assert sel["pairs"] == 8 and sel["by_method"] == {"revision": 4, "ai": 4}
        assert sel["filters"]["constitution"] == "harmless" and sel["filters"]["methods"] == [
            "revision",
            "ai",
            "contrastive",
            "helpful",
            "best-of-n",
        ]
        assert sel["train"] + sel["eval"] == 8 and len(sel["pairs_hash"]) == 32
        assert tr.final_metrics["steps"] == 3 and "loss" in tr.final_metrics["train"]
        steps = s.exec(select(TrainingStep).where(TrainingStep.training_run_id == tr.id)).all()
        train_steps = sorted(r.step for r in steps if r.split == "train")
        assert train_steps == [1, 2, 3] and any(r.split == "eval" for r in steps)
        first_train = next(r for r in steps if r.split == "train")
        assert {"loss", "rewards/margins", "grad_norm", "lr", "tokens_per_s"} <= set(first_train.metrics)
        run = s.get(Run, summary["run_id"])
        assert run.status == "completed" and run.flow == "train" and run.constitution_version == "abc12345"
        refs = s.exec(select(RefLogp)).all()
        assert len(refs) == 16 and {r.ref_model for r in refs} == {model_fingerprint(tiny_model_dir)}

    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer_config.json").exists() and (out / "checkpoints" / "step-2").is_dir()
    assert json.loads((out / "training_run.json").read_text())["summary"]["steps"] == 3

    # the same pairs again: every reference log-prob comes from the store
    again = run_training(config(tiny_model_dir, tmp_path / "run2", max_steps=1), url=db_url)
    assert again["ref_computed"] == 0 and again["ref_reused"] == 16
    assert again["training_run_id"] != summary["training_run_id"]


def killed_at_save(monkeypatch):
    """The next run dies after its last step, before it saves the model: its checkpoints stay."""
    import flows.train

    real = flows.train.save_model

    def save_model(*a, **kw):
        monkeypatch.setattr(flows.train, "save_model", real)
        raise RuntimeError("killed")

    monkeypatch.setattr(flows.train, "save_model", save_model)


def test_resume_continues_the_same_training_run(sqlite_url, tiny_model_dir, tmp_path, monkeypatch):
    store_pairs(sqlite_url, n=4)
    out = tmp_path / "run"
    # it dies after step 2 (step 1 is the checkpoint: 2 is the last step), and is rerun with --resume
    killed_at_save(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        run_training(config(tiny_model_dir, out, max_steps=2, checkpoint_every=1, eval_fraction=0), sqlite_url)
    with session_scope(sqlite_url) as s:
        first = {"training_run_id": s.exec(select(TrainingRun)).one().id}
    again = run_training(
        config(tiny_model_dir, out, max_steps=2, checkpoint_every=1, eval_fraction=0, resume=True), sqlite_url
    )
    assert again["resumed_from"] == 1 and again["training_run_id"] == first["training_run_id"]
    assert again["ref_computed"] == 0
    with session_scope(sqlite_url) as s:
        steps = s.exec(
            select(TrainingStep).where(TrainingStep.training_run_id == first["training_run_id"])
        ).all()
        assert sorted(r.step for r in steps) == [1, 2]
        assert s.get(TrainingRun, first["training_run_id"]).status == "completed"


def test_no_pairs_is_one_clear_error(sqlite_url, tiny_model_dir, tmp_path):
    store_pairs(sqlite_url, n=2)
    with pytest.raises(
        UserError, match=r"no preference pairs match constitution=helpful-honest, method in \(ai\)"
    ):
        run_training(
            config(tiny_model_dir, tmp_path, constitution="helpful-honest", methods=["ai"]), sqlite_url
        )
    with pytest.raises(ValidationError, match="loss_type"):  # caught when the config is made
        config(tiny_model_dir, tmp_path, loss_type="kto")
    store_pairs(sqlite_url, n=6)  # its AI pairs alone: a preference to learn, no reply to copy
    with pytest.raises(UserError, match=r"--stage sft: none of the \d+ training pairs has a reply to teach .*ai\)"):
        run_training(config(tiny_model_dir, tmp_path / "sft", methods=["ai"], stage="sft"), sqlite_url)
    assert not (tmp_path / "sft").exists()


def test_cli_train(sqlite_url, tiny_model_dir, tmp_path, monkeypatch):
    """Through Typer and the Prefect flow (once: the flow wiring does not depend on the database)."""
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)

    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "train",
            "--base",
            str(tiny_model_dir),
            "--constitution",
            "harmless",
            "--method",
            "revision,ai",
            "--out",
            str(tmp_path / "none"),
        ],
    )
    assert res.exit_code == 2, res.output
    assert "no preference pairs match constitution=harmless, method in (revision, ai)" in res.output.replace(
        "\n", ""
    )

    store_pairs(sqlite_url, n=4)
    res = runner.invoke(
        app,
        [
            "train",
            "--base",
            str(tiny_model_dir),
            "--constitution",
            "harmless",
            "--method",
            "revision,ai",
            "--beta",
            "0.1",
            "--max-steps",
            "2",
            "--lr",
            "1e-3",
            "--batch-size",
            "2",
            "--max-length",
            "64",
            "--max-prompt-length",
            "48",
            "--out",
            str(tmp_path / "cli"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "trained 2 steps" in res.output
    assert (tmp_path / "cli" / "model.safetensors").exists()


def test_trains_from_an_exported_dataset_without_column_mapping(sqlite_url, tiny_model_dir, tmp_path):
    """The prefs split as `cai export` writes it (TRL conversational columns + provenance)."""
    from datasets import Dataset, DatasetDict

    def row(i: int, **kw):
        return {
            "prompt": [{"role": "user", "content": f"Risky question {i}?"}],
            "chosen": [{"role": "assistant", "content": REFUSAL}],
            "rejected": [{"role": "assistant", "content": COMPLY}],
            "id": f"pair-{i}",
            "method": "ai",
            "status": "ok",
            "label_prob": 0.9,
            "constitution": "harmless",
            "constitution_version": "abc12345",
        } | kw

    rows = [row(i) for i in range(6)] + [row(6, status="tie"), row(7, constitution="helpful-honest")]
    DatasetDict(
        {"train_prefs": Dataset.from_list(rows), "test_prefs": Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "export"))
    summary = run_training(
        config(
            tiny_model_dir, tmp_path / "run", max_steps=1, eval_fraction=0, dataset=str(tmp_path / "export")
        ),
        sqlite_url,
    )
    assert summary["pairs"] == 6  # the tie and the other constitution are filtered out, as in the store
    with session_scope(sqlite_url) as s:
        tr = s.get(TrainingRun, summary["training_run_id"])
        assert tr.constitution_version == "abc12345" and tr.data_selection["source"] == str(
            tmp_path / "export"
        )
    with pytest.raises(UserError, match="no split 'nope'"):
        run_training(
            config(tiny_model_dir, tmp_path / "x", dataset=str(tmp_path / "export"), dataset_split="nope"),
            sqlite_url,
        )


def test_sft_then_dpo_trains_both_stages_and_records_them(sqlite_url, tiny_model_dir, tmp_path):
    """--stage sft+dpo: the supervised stage learns the chosen replies, then DPO starts from it with
    the fine-tuned weights as its reference; both are in the TrainingRun and the step rows."""
    store_pairs(sqlite_url)
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, out, stage="sft+dpo")
    cfg = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"lr": 3e-3, "max_steps": 4, "batch_size": 4,
                                                                   "max_length": 64, "max_prompt_length": 48})})
    summary = run_training(cfg, url=sqlite_url)
    assert summary["stage"] == "sft+dpo" and summary["sft"]["steps"] >= 1 and summary["steps"] == 3
    # the four revision pairs' chosen replies; an AI label's chosen side is no reply to teach
    assert summary["sft"]["n_train"] + summary["sft"]["n_eval"] == 4
    with session_scope(sqlite_url) as s:
        tr = s.exec(select(TrainingRun)).one()
        splits = {st.split for st in s.exec(select(TrainingStep))}
        refs = {r.ref_model for r in s.exec(select(RefLogp))}
    assert {"sft-train", "sft-eval", "train", "eval"} <= splits
    assert tr.final_metrics["sft"]["stop_reason"] and tr.final_metrics["stage"] == "sft+dpo"
    assert all("+sft:" in r for r in refs)  # the reference log-probs came from the fine-tuned weights
    sft_eval = [st for st in tr.final_metrics["sft"]["eval"]]
    assert sft_eval  # a held-out loss was measured


def test_sft_alone_saves_a_model(sqlite_url, tiny_model_dir, tmp_path):
    store_pairs(sqlite_url)
    out = tmp_path / "sft"
    cfg = config(tiny_model_dir, out, stage="sft")
    cfg = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"max_steps": 2, "max_length": 64,
                                                                   "max_prompt_length": 48})})
    summary = run_training(cfg, url=sqlite_url)
    assert summary["stage"] == "sft" and summary["ref_computed"] == 0 and (out / "config.json").exists()
    assert not (out / "checkpoints").exists()  # sft.checkpoint_every 0: none (tests/flows/test_train_resume_stages.py)


def test_cli_lora_train_resume_and_merge(sqlite_url, tiny_model_dir, tmp_path, monkeypatch):
    """`cai train --lora-r`: an adapter directory, a merged model, a TrainingRun that says so, and
    --resume continuing from an adapter checkpoint."""
    from typer.testing import CliRunner

    from engines.bundled import is_adapter_dir
    from flows.cli import app

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    store_pairs(sqlite_url, n=4)
    out = tmp_path / "lora"
    args = ["train", "--base", str(tiny_model_dir), "--constitution", "harmless", "--max-steps", "2", "--lr", "1e-2",
            "--batch-size", "2", "--max-length", "64", "--max-prompt-length", "48", "--eval-fraction", "0",
            "--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj,v_proj,down_proj",
            "--checkpoint-every", "1", "--merge-lora", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "LoRA r=4" in res.output and "merged model in" in res.output
    assert is_adapter_dir(out) and (out / "merged" / "model.safetensors").exists()
    record = json.loads((out / "training_run.json").read_text())
    assert record["config"]["trainer"]["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0,
                                                   "target_modules": ["q_proj", "v_proj", "down_proj"]}
    assert record["summary"]["lora"]["adapter_mb"] < 1
    with session_scope(sqlite_url) as s:
        tr = s.get(TrainingRun, record["summary"]["training_run_id"])
        assert tr.status == "completed" and tr.config["trainer"]["lora"]["r"] == 4

    res = CliRunner().invoke(app, [*args, "--resume"])  # a finished run is not continued
    assert res.exit_code == 2 and "which finished" in res.output, res.output
    killed_at_save(monkeypatch)  # a new run that dies after its last step (step-1 is its checkpoint)
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0
    with session_scope(sqlite_url) as s:
        killed = s.exec(select(TrainingRun).where(TrainingRun.status == "failed")).one().id
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    again = json.loads((out / "training_run.json").read_text())["summary"]
    assert again["resumed_from"] == 1 and again["training_run_id"] == killed

    res = CliRunner().invoke(app, [*args[:-2], "--stage", "sft", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "LoRA" in res.output and "--stage sft+dpo" in res.output


def test_sft_then_lora_dpo_on_capped_helpful_pairs_saves_the_merged_model(sqlite_url, tiny_model_dir, tmp_path):
    """--stage sft+dpo --lora-r: full-weight SFT, then adapters for DPO whose reference is the SFT
    model (adapters off), so the first DPO loss is ln 2; the output is SFT + adapters merged, a
    plain model, since the adapters' base exists nowhere else. dpo_helpful_ratio caps the
    `helpful` pairs DPO sees; SFT still learns from all of them."""
    from sqlmodel import update

    from engines.bundled import is_adapter_dir

    store_pairs(sqlite_url, n=8)
    with session_scope(sqlite_url) as s:  # six of the eight become helpfulness pairs
        s.exec(update(PreferencePair).where(PreferencePair.id.in_([f"pair-{i}" for i in range(2, 8)]))
               .values(method="helpful"))
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, out, stage="sft+dpo", eval_fraction=0, dpo_helpful_ratio=1.0, max_steps=2,
                 lr=1e-2, lora={"r": 4, "alpha": 8})
    cfg = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"lr": 3e-3, "max_steps": 2, "batch_size": 4,
                                                                   "max_length": 64, "max_prompt_length": 48})})
    summary = run_training(cfg, url=sqlite_url)
    # SFT: the revision pair and the 6 helpful ones, not the AI pair; DPO: 2 others + 2 of the 6 helpful
    assert summary["sft"]["n_train"] == 7 and summary["n_train"] == 4
    assert summary["lora"]["merged"] == str(out)
    assert (out / "model.safetensors").exists() and not is_adapter_dir(out)
    with session_scope(sqlite_url) as s:
        first = s.exec(select(TrainingStep).where(TrainingStep.split == "train", TrainingStep.step == 1)).one()
        assert all("+sft:" in r.ref_model for r in s.exec(select(RefLogp)))
    assert abs(first.metrics["loss"] - math.log(2)) < 1e-4  # policy == reference (the SFT model) at step 1


def test_cli_reward_train_and_score(sqlite_url, tiny_model_dir, tmp_path, monkeypatch):
    """`cai reward train` prints the held-out accuracy and stores a TrainingRun; `cai reward score`
    scores the store's pairs and a JSONL file, and names the line of a bad row."""
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    store_pairs(sqlite_url, n=8)
    rm = tmp_path / "rm"
    res = CliRunner().invoke(app, ["reward", "train", "--base", str(tiny_model_dir), "--max-steps", "8", "--lr", "1e-3",
                                   "--head-lr", "1e-2", "--batch-size", "4", "--max-length", "64",
                                   "--max-prompt-length", "48", "--eval-fraction", "0.25", "--out", str(rm)])
    assert res.exit_code == 0, res.output
    assert "held-out pair accuracy 1.000" in res.output
    summary = json.loads((rm / "training_run.json").read_text())["summary"]
    with session_scope(sqlite_url) as s:
        tr = s.get(TrainingRun, summary["training_run_id"])
        assert tr.status == "completed" and tr.final_metrics["stage"] == "reward"
        assert tr.final_metrics["eval"]["accuracy"] == 1.0 and tr.data_selection["eval"] >= 1
        steps = s.exec(select(TrainingStep).where(TrainingStep.training_run_id == tr.id)).all()
        assert {r.split for r in steps} == {"reward-train", "reward-eval"}
        assert s.get(Run, summary["run_id"]).flow == "reward"

    res = CliRunner().invoke(app, ["reward", "score", "--model", str(rm)])
    assert res.exit_code == 0, res.output
    assert "pair accuracy 1.000 on 8 pairs" in res.output
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "How would I do risky thing number 3?", "response": REFUSAL}) + "\n"
                    + json.dumps({"prompt": "x"}) + "\n")
    res = CliRunner().invoke(app, ["reward", "score", "--model", str(rm), "--input", str(rows)])
    assert res.exit_code == 2 and f"{rows}:2: expected" in res.output.replace("\n", "")
    rows.write_text(json.dumps({"prompt": "How would I do risky thing number 3?", "response": REFUSAL}) + "\n")
    res = CliRunner().invoke(app, ["reward", "score", "--model", str(rm), "--input", str(rows),
                                   "--out", str(tmp_path / "scored.jsonl")])
    assert res.exit_code == 0, res.output
    assert "reward" in json.loads((tmp_path / "scored.jsonl").read_text())


def test_sft_learns_no_end_of_turn_after_a_reply_the_token_limit_cut():
    from flows.train import sft_examples
    from training.data import PairExample

    prompt = ({"role": "user", "content": "How do I pack a kitchen?"},)
    rows = sft_examples([PairExample(prompt, "Wrap glasses in paper.", "No.", id="a", chosen_ended=False),
                         PairExample(prompt, "I can't help.", "Sure.", id="b")])
    assert [(r.response, r.ended) for r in rows] == [("Wrap glasses in paper.", False), ("I can't help.", True)]


def test_sft_learns_the_chosen_replies_of_revisions_and_directives_not_of_ai_labels():
    """An AI label's chosen side (`ai`, `best-of-n`) is one sample a judge preferred, not a reply to teach;
    a record that names no method (a dataset made elsewhere) is taken as its author gave it."""
    from flows.train import sft_examples
    from training.data import PairExample

    prompt = ({"role": "user", "content": "How do I pack a kitchen?"},)
    pairs = [PairExample(prompt, f"reply {m or 'unknown'}", "No.", id=f"p-{m}", method=m)
             for m in ("revision", "ai", "contrastive", "best-of-n", "helpful", "")]
    assert [r.id for r in sft_examples(pairs)] == ["p-revision", "p-contrastive", "p-helpful", "p-"]


def test_sft_rows_of_cai_train_are_the_sft_rows_of_cai_export(sqlite_url, tmp_path):
    """The same pairs give the same SFT rows whether `cai train` reads them from the store, from
    `cai export` of it, or a trainer reads the export's train_sft split: one rule
    (dataset_schema.teaches_reply), each chosen reply once."""
    from flows.export import build_export, make_config
    from flows.pair_selection import load_examples
    from flows.publish import write_export
    from flows.train import sft_examples

    store_pairs(sqlite_url, n=8)  # revision pairs at even i, AI pairs at odd i
    with session_scope(sqlite_url) as s:
        for pid, method in (("pair-2", "contrastive"), ("pair-4", "helpful"), ("pair-5", "best-of-n")):
            s.get(PreferencePair, pid).method = method
        p0 = s.get(PreferencePair, "pair-0")  # the same chosen reply in a second pair: one SFT row
        s.add(PreferencePair(id="pair-0-helpful", prompt_id=p0.prompt_id, chosen_id=p0.chosen_id,
                             rejected_id=p0.rejected_id, method="helpful", constitution="harmless",
                             constitution_version="abc12345"))
    out = tmp_path / "export"
    with session_scope(sqlite_url) as s:
        data, facts = build_export(s, make_config(constitution="harmless", out=out, test_fraction=0))
        write_export(data, facts, out, "arrow")
    exported = sorted((r["id"], tuple(r["messages"][:-1]), r["messages"][-1]["content"]) for r in data["train_sft"])
    assert [row[0] for row in exported] == ["pair-0", "pair-2", "pair-4", "pair-6"]

    def sft(**kw):
        examples, _ = load_examples(config(tmp_path, tmp_path / "unused", **kw), sqlite_url)
        return sorted((r.id, tuple(r.prompt), r.response) for r in sft_examples(examples))

    assert sft() == exported
    assert sft(dataset=str(out)) == exported


def test_training_from_an_export_keeps_the_cut_flags_of_the_store(sqlite_url, tmp_path):
    """A reply the token cap cut trains without an end-of-turn whether the pairs come from the store or
    from `cai export` of it (its chosen_cut / rejected_cut columns); a version-1 row has neither: ended."""
    from flows.export import build_export, make_config
    from flows.pair_selection import load_examples
    from flows.publish import write_export
    from flows.train import sft_examples

    store_pairs(sqlite_url, n=4)
    with session_scope(sqlite_url) as s:
        s.get(Response, "resp-0-rev").finish_reason = "length"  # chosen of a revision pair: also an SFT row
        s.get(Response, "resp-1-init").finish_reason = "length"  # rejected of an AI pair
    out = tmp_path / "export"
    export_cfg = make_config(constitution="harmless", out=out, test_fraction=0)
    with session_scope(sqlite_url) as s:
        data, facts = build_export(s, export_cfg)
        write_export(data, facts, out, "arrow")

    def ended(examples):
        return {e.id: (e.chosen_ended, e.rejected_ended) for e in examples}

    from_store, _ = load_examples(config(tmp_path, tmp_path / "a"), sqlite_url)
    from_export, _ = load_examples(config(tmp_path, tmp_path / "b", dataset=str(out)), sqlite_url)
    assert ended(from_export) == ended(from_store)
    assert ended(from_export)["pair-0"] == (False, True) and ended(from_export)["pair-1"] == (True, False)
    assert {r.id: r.ended for r in sft_examples(from_export)}["pair-0"] is False
    old = tmp_path / "v1.jsonl"  # schema version 1: no *_cut columns
    old.write_text(json.dumps({k: v for k, v in data["train_prefs"][0].items() if not k.endswith("_cut")}) + "\n")
    (e,) = load_examples(config(tmp_path, tmp_path / "c", dataset=str(old)), sqlite_url)[0]
    assert (e.chosen_ended, e.rejected_ended) == (True, True)


def test_dpo_mine_probes_the_start_model_and_weighs_the_prompts_it_gets_wrong(sqlite_url, tiny_model_dir, tmp_path):
    """--set dpo_mine=true: before DPO, the model decodes every training prompt whose pairs teach a
    stance; a random tiny model refuses nothing, so every prompt whose pair refuses is wrong, its
    pairs are repeated `mine_repeat` times, and the run records the probe (counts, examples)."""
    store_pairs(sqlite_url, n=8)
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, out, eval_fraction=0, max_steps=2, dpo_mine=True, mine_repeat=2, mine_new_tokens=8)
    summary = run_training(cfg, url=sqlite_url)
    assert summary["n_train"] == 16  # eight pairs, each prompt wrong, two copies each
    with session_scope(sqlite_url) as s:
        mined = s.get(TrainingRun, summary["training_run_id"]).data_selection["mined"]
    assert mined["probed"] == 8 and mined["should_refuse"] == 8 and mined["answered_should_refuse"] == 8
    assert mined["refused_should_answer"] == 0 and len(mined["errors"]) == 8 and mined["new_tokens"] == 8
    assert mined["examples"][0]["should_refuse"] is True and mined["examples"][0]["prompt"].startswith("How would I")


def test_auto_dtype_trains_in_fp32_where_the_probe_says_bf16_is_slower(db_url, tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    """`dtype: auto` (the default of every training stage) asks the probe generation uses: on a CPU
    where bf16 is emulated (slower) it trains in fp32, where bf16 is faster in bf16 autocast; the
    TrainingRun records the dtype each stage used and the machine."""
    from engines import precision

    store_pairs(db_url)
    monkeypatch.delenv("CAI_CPU_DTYPE", raising=False)  # the suite forces fp32; the probe decides here
    cfg = config(tiny_model_dir, tmp_path / "run", stage="sft+dpo")
    assert cfg.sft.dtype == "auto" and cfg.trainer.dtype == "auto"
    for speedup, want in ((0.015, "float32"), (2.4, "bfloat16")):  # emulated bf16 (AVX2) / AMX
        monkeypatch.setattr(precision, "_BF16_SPEEDUP", speedup)
        cfg = config(tiny_model_dir, tmp_path / f"run-{want}", stage="sft+dpo", sft={"max_steps": 2})
        summary = run_training(cfg, url=db_url)
        assert summary["compute"]["dtype"] == {"sft": want, "dpo": want}
        with session_scope(db_url) as s:
            row = s.get(TrainingRun, summary["training_run_id"])
            assert row.final_metrics["compute"]["dtype"] == {"sft": want, "dpo": want}
            machine = row.final_metrics["compute"]["machine"]
            assert machine["cpu_capability"] and machine["cores"] >= 1 and machine["bf16_matmul_speedup"] == speedup
            assert row.config["trainer"]["dtype"] == "auto"  # what was asked; compute says what it became
