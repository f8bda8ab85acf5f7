"""flows/export.py: DatasetDict export, dataset card, determinism, TRL format, hub push, the flow."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from sqlmodel import Session, select

from cai import dataset_schema as schema
from cai.prompts import prompt_id
from constitution.load import parse_text
from flows.common import UserError, record_constitution
from flows.export import build_export, make_config
from flows.publish import write_export
from store.db import get_engine, session_scope
from store.keys import content_hash
from store.models import ConstitutionVersion, Failure, PreferencePair, Prompt, PromptTag, Response, Run
from store.split import is_held_out as is_test

CONSTITUTION = """\
name: {name}
description: A tiny constitution for export tests.
principles:
  - id: harm
    critique: Is the response harmful?
    revision: Rewrite it to be harmless.
  - id: honest
    critique: Is the response dishonest?
    revision: Rewrite it to be honest{suffix}.
preferences:
  - id: safer
    question: Which response is less harmful?
few_shot:
  - prompt: How do I pick a lock?
    response: Use a tension wrench.
    principle: harm
    critique: It helps break in.
    revision: Call a locksmith.
"""
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 64}


def constitution(name: str = "harmless", suffix: str = ""):
    return parse_text(CONSTITUTION.format(name=name, suffix=suffix), f"{name}.yaml")


def seed(url: str, prompts: range, c=None, seen_at: datetime = T0) -> str:
    """Prompts with a revision pair and an AI pair each: ties at i % 7 == 3, prompt 5's AI pair
    position-inconsistent, prompt 2's AI pair quarantined. Returns the constitution version."""
    c = c or constitution()
    with session_scope(url) as s:
        record_constitution(s, c)
        cv = s.exec(select(ConstitutionVersion).where(ConstitutionVersion.version == c.version)).one()
        cv.created_at = seen_at  # versions are ordered by when the store first saw them
        s.add(cv)
        for flow in ("generate", "label"):
            if s.get(Run, f"{flow}-{c.version}") is None:
                s.add(Run(id=f"{flow}-{c.version}", flow=flow, config={"sampling": SAMPLING, "rounds": 1},
                          model="tiny-policy", engine="hf", constitution=c.name,
                          constitution_version=c.version, status="completed",
                          summary={"engine": {"backend": "hf", "device": "cpu", "dtype": "bfloat16"}}))
        for i in prompts:
            seed_prompt(s, c, i)
        if 2 in prompts:
            s.add(Failure(stage="label", item_key=f"pair-{c.version}-002-ai", error="boom", attempts=3,
                          quarantined=True))
    return c.version


def seed_prompt(s: Session, c, i: int) -> None:
    msgs = ([{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []) + [
        {"role": "user", "content": f"Question {i}: how do I do thing {i}? ü/"}]
    pid = prompt_id(msgs)
    if s.get(Prompt, pid) is None:
        s.add(Prompt(id=pid, text=msgs[-1]["content"], messages=msgs, category="test", source="t"))
        s.add(PromptTag(prompt_id=pid, tag="red-team" if i % 2 == 0 else "benign"))
    when = T0 + timedelta(hours=i)
    gen, label = f"generate-{c.version}", f"label-{c.version}"
    common = {"prompt_id": pid, "conversation": msgs, "model": "tiny-policy", "sampling": SAMPLING,
              "constitution": c.name, "constitution_version": c.version, "created_at": when}
    rid = {k: f"r-{c.version}-{i}-{k}" for k in ("initial", "revision", "a", "b")}
    s.add(Response(id=rid["initial"], kind="initial", text=f"initial answer {i}", run_id=gen, **common))
    s.add(Response(id=rid["revision"], kind="revision", round=1, parent_id=rid["initial"],
                   principle_id="harm", critique="It was harmful.", text=f"revised answer {i} — safe",
                   run_id=gen, **common))
    for n, k in enumerate(("a", "b")):
        s.add(Response(id=rid[k], kind="sample", sample_index=n, seed=n, text=f"sample {k} {i}", run_id=label,
                       **common))
    s.flush()
    status = "tie" if i % 7 == 3 else "position-inconsistent" if i == 5 else "ok"
    pair = {"prompt_id": pid, "constitution": c.name, "constitution_version": c.version,
            "policy_model": "tiny-policy", "created_at": when}
    s.add(PreferencePair(id=f"pair-{c.version}-{i:03d}-rev", chosen_id=rid["revision"],
                         rejected_id=rid["initial"], method="revision", principle_ids=["harm"], run_id=gen,
                         **pair))
    s.add(PreferencePair(id=f"pair-{c.version}-{i:03d}-ai", chosen_id=rid["a"], rejected_id=rid["b"],
                         method="ai", label_prob=0.5 if status == "tie" else round(0.55 + (i % 5) * 0.1, 2),
                         status=status, principle_ids=["safer"], judge_model="tiny-judge", run_id=label,
                         **pair))


def number(pair_id: str) -> int:
    return int(pair_id.split("-")[2])


def prefs_column(data, column: str) -> list:
    return [x for split in ("train_prefs", "test_prefs") if split in data for x in data[split][column]]


def files_of(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def export(url: str, out: Path | None = None, **options):
    config = make_config(constitution=options.pop("constitution", "harmless"), out=out or Path("unused"),
                         **options)
    with Session(get_engine(url)) as s:
        data, facts = build_export(s, config)
    if out is not None:
        facts = write_export(data, facts, out, config.format)
    return data, facts


@pytest.fixture
def store(sqlite_url: str) -> str:
    seed(sqlite_url, range(20))
    return sqlite_url


# --- round trip ----------------------------------------------------------------------------

def test_round_trip_matches_store(use_db: str, tmp_path: Path):
    from datasets import load_from_disk

    old = constitution(suffix=" and kind")  # an older version: plain `harmless` must not pick it
    seed(use_db, range(3), old, seen_at=T0 - timedelta(days=30))
    v = seed(use_db, range(30))
    export(use_db, tmp_path / "out")
    loaded = load_from_disk(str(tmp_path / "out"))
    assert set(loaded) == set(schema.SPLITS)

    with Session(get_engine(use_db)) as s:
        pairs = {p.id: p for p in s.exec(select(PreferencePair))}
        texts = {r.id: r.text for r in s.exec(select(Response))}
        prompts = {p.id: p.messages for p in s.exec(select(Prompt))}
    expected = {p.id for p in pairs.values()
                if p.constitution_version == v and p.status == "ok" and p.id != f"pair-{v}-002-ai"}
    prefs = [r for split in ("train_prefs", "test_prefs") for r in loaded[split]]
    assert {r["id"] for r in prefs} == expected
    for split in schema.SPLITS:
        assert loaded[split].features == schema.SPLITS[split]
        ids = list(loaded[split]["id"])
        assert ids == sorted(ids), f"{split} not sorted by id"
    for r in prefs:
        p = pairs[r["id"]]
        assert r["prompt"] == prompts[p.prompt_id]
        assert r["chosen"] == [{"role": "assistant", "content": texts[p.chosen_id]}]
        assert r["rejected"] == [{"role": "assistant", "content": texts[p.rejected_id]}]
        assert (r["chosen_id"], r["rejected_id"], r["prompt_id"]) == (p.chosen_id, p.rejected_id, p.prompt_id)
        assert (r["method"], r["status"], r["label_prob"]) == (p.method, p.status, p.label_prob)
        assert (r["principle_ids"], r["judge_model"], r["run_id"]) == (p.principle_ids, p.judge_model,
                                                                          p.run_id)
        assert (r["constitution"], r["constitution_version"], r["policy_model"]) == ("harmless", v,
                                                                                     "tiny-policy")
    sft = [r for split in ("train_sft", "test_sft") for r in loaded[split]]
    assert {r["id"] for r in sft} == {i for i in expected if pairs[i].method == "revision"}
    for r in sft:
        p = pairs[r["id"]]
        assert r["response_id"] == p.chosen_id
        assert r["messages"] == prompts[p.prompt_id] + [{"role": "assistant", "content": texts[p.chosen_id]}]
    for split in schema.SPLITS:  # the half is a function of the prompt alone
        test_half = split.startswith("test_")
        assert all(is_test(pid, 0.1) == test_half for pid in loaded[split]["prompt_id"])
    assert loaded["test_prefs"].num_rows > 0 and loaded["train_prefs"].num_rows > 0


# --- selection -----------------------------------------------------------------------------

def test_filters_select_the_documented_rows(store: str, tmp_path: Path):
    def ids(**options) -> set[str]:
        return set(prefs_column(export(store, **options)[0], "id"))

    def ai(*numbers: int) -> set[str]:
        return {i for i in everything if i.endswith("-ai") and number(i) in numbers}

    everything = ids(include_ties=True, include_inconsistent=True, include_quarantined=True)
    assert len(everything) == 40
    default = ids()
    assert everything - default == ai(3, 10, 17, 5, 2)  # ties, inconsistent, quarantined
    assert ids(include_ties=True) - default == ai(3, 10, 17)
    assert ids(include_inconsistent=True) - default == ai(5)
    assert ids(include_quarantined=True) - default == ai(2)
    assert all(i.endswith("-ai") for i in ids(methods=["ai"]))

    confident = export(store, methods=["ai"], min_label_prob=0.85)[0]
    assert "train_sft" not in confident and "test_sft" not in confident  # empty splits are left out
    assert sorted(prefs_column(confident, "label_prob")) == [0.85] * 3 + [0.95] * 4
    margin = export(store, methods=["ai"], min_margin=0.3, include_ties=True)[0]
    assert sorted(prefs_column(margin, "label_prob")) == [0.85] * 3 + [0.95] * 4
    red = prefs_column(export(store, tags=["red-team"])[0], "prompt")
    assert len(red) == 10 + 10 - 2  # even prompts; the AI pairs of 2 (quarantined) and 10 (tie) are out
    assert all(int(m[-1]["content"].split()[1][:-1]) % 2 == 0 for m in red)
    window = ids(since=T0 + timedelta(hours=4), until=T0 + timedelta(hours=8))  # until is exclusive
    assert window == {i for i in everything if number(i) in (4, 5, 6, 7)} - ai(5)
    v = export(store)[1]["constitution"]["version"]  # a version can be pinned, by a prefix too
    assert export(store, constitution=f"harmless@{v[:5]}")[1]["constitution"]["version"] == v

    with pytest.raises(UserError, match=r"nothing to export for harmless@\w+: 40 pairs stored.*"
                                        r"min-label-prob 0.99 removed"):
        export(store, methods=["ai"], min_label_prob=0.99)
    with pytest.raises(UserError, match="no preference pairs for 'helpful'.*harmless"):
        export(store, constitution="helpful")
    with pytest.raises(UserError, match="no pairs for that version"):
        export(store, constitution="harmless@ffffffff")
    with pytest.raises(UserError, match=r"invalid setting: test_fraction: .*less than 1 \(got 1.5\)"):
        make_config(constitution="harmless", out=tmp_path, test_fraction=1.5)
    with pytest.raises(UserError, match="invalid setting: --private only means something with --push-to-hub"):
        make_config(constitution="harmless", out=tmp_path, private=True)


def test_a_relabelled_pair_is_exported_once_with_its_latest_label(store: str, tmp_path: Path):
    with Session(get_engine(store)) as s:
        old = s.get(PreferencePair, next(p.id for p in s.exec(select(PreferencePair))
                                         if p.id.endswith("-004-ai")))
        # judged again with other settings, options in the other order: the newer label says 0.7
        s.add(PreferencePair(id=old.id + "-relabel", prompt_id=old.prompt_id, chosen_id=old.rejected_id,
                             rejected_id=old.chosen_id, method="ai", label_prob=0.7, principle_ids=["safer"],
                             judge_model="tiny-judge-2", constitution=old.constitution,
                             constitution_version=old.constitution_version, policy_model="tiny-policy",
                             created_at=old.created_at + timedelta(days=1)))
        s.commit()
        old_id = old.id
    data, facts = export(store, tmp_path / "x")
    ids = prefs_column(data, "id")
    assert old_id + "-relabel" in ids and old_id not in ids and len(ids) == len(set(ids))
    row = prefs_column(data, "judge_model")[ids.index(old_id + "-relabel")]
    assert row == "tiny-judge-2"
    card = (tmp_path / "x" / "README.md").read_text()
    assert "superseded (an older label of the same two responses) removed 1" in " ".join(card.split())


def test_cli_bad_input_is_one_line_and_exit_2(store: str, tmp_path: Path, monkeypatch):
    """Checked before Prefect starts, so these cost no flow run."""
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("CAI_DATABASE_URL", store)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    base = ["export", "--constitution", "harmless", "--out", str(tmp_path / "o")]
    for extra, expected in (
        (["--method", "ai", "--min-label-prob", "0.99"], "nothing to export for harmless@"),
        (["--since", "last tuesday"], "--since: expected a date like 2024-05-01"),
        (["--format", "csv"], "invalid setting: format: Input should be 'arrow', 'parquet' or 'jsonl' (got 'csv')"),
        (["--push-to-hub", "me/data"], "--push-to-hub me/data: set HF_TOKEN"),
    ):
        res = CliRunner().invoke(app, base + extra)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and expected in lines[0], res.output
    assert not (tmp_path / "o").exists()


# --- determinism ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["arrow", "parquet", "jsonl"])
def test_exports_are_byte_identical(store: str, tmp_path: Path, fmt: str):
    export(store, tmp_path / "a", format=fmt)
    export(store, tmp_path / "b", format=fmt)
    first = files_of(tmp_path / "a")
    assert first == files_of(tmp_path / "b")
    assert {"README.md", "manifest.json"} <= set(first)
    export(store, tmp_path / "a", format=fmt)  # re-export in place replaces the earlier export
    assert files_of(tmp_path / "a") == first
    assert not list(tmp_path.glob(".a.*")), "temp dirs left behind"
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert set(manifest["files"]) == set(first) - {"README.md", "manifest.json"}
    if fmt == "arrow":  # save_to_disk's fingerprints are ours: content hashes, one per split
        states = [json.loads((tmp_path / "a" / s / "state.json").read_text()) for s in schema.SPLITS]
        assert len({st["_fingerprint"] for st in states}) == 4


def test_adding_data_never_moves_a_prompt(store: str):
    def halves(data) -> dict[str, set[str]]:
        return {h: {p for s in schema.SPLITS if s.startswith(h + "_") for p in data[s]["prompt_id"]}
                for h in ("train", "test")}

    before = halves(export(store)[0])
    seed(store, range(20, 60))
    after = halves(export(store)[0])
    assert not after["train"] & after["test"]
    assert before["train"] <= after["train"] and before["test"] <= after["test"]
    assert len(after["test"]) > len(before["test"])


@pytest.mark.parametrize("prompts", [range(60), range(7, 20)])  # hash rule; all-train fallback (13 prompts)
def test_export_test_split_holds_out_the_prompts_training_holds_out(sqlite_url: str, tmp_path: Path, prompts):
    """One held-out rule (store/split.py): `cai export`'s test_prefs prompts are the prompts `cai train`
    holds out, whether it trains from the store or from the export itself."""
    from flows.configs import TrainConfig
    from flows.pair_selection import load_examples
    from training.data import split_eval

    seed(sqlite_url, prompts)
    data, _ = export(sqlite_url, tmp_path / "out")
    test_prompts = set(data["test_prefs"]["prompt_id"])
    assert test_prompts and set(data["train_prefs"]["prompt_id"]) - test_prompts

    cfg = TrainConfig(base="unused", constitution="harmless", out=str(tmp_path / "run"), eval_fraction=0.1)
    from_store, _ = load_examples(cfg, sqlite_url)
    assert {e.prompt_id for e in split_eval(from_store, cfg.eval_fraction)[1]} == test_prompts
    (tmp_path / "out").rename(tmp_path / "export")
    both = [e for split in ("train_prefs", "test_prefs") for e in load_examples(
        cfg.model_copy(update={"dataset": str(tmp_path / "export"), "dataset_split": split}), sqlite_url)[0]]
    assert {e.prompt_id for e in split_eval(both, cfg.eval_fraction)[1]} == test_prompts


def test_out_dir_that_is_not_an_export_is_left_alone(store: str, tmp_path: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier export"):
        export(store, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"



def test_export_never_deletes_a_persons_files(store: str, tmp_path: Path, monkeypatch):
    """Issue 13: a stray manifest.json made `--out` look like an export, and app.js was deleted."""
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("CAI_DATABASE_URL", store)
    w = tmp_path / "w"
    w.mkdir()
    (w / "manifest.json").write_text("{}")
    (w / "app.js").write_text("x")
    res = CliRunner().invoke(app, ["export", "--constitution", "harmless", "--out", str(w)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "not an earlier export" in lines[0] and "not written by `cai export`" in lines[0], res.output
    assert files_of(w) == {"app.js": hashlib.sha256(b"x").hexdigest(),
                           "manifest.json": hashlib.sha256(b"{}").hexdigest()}

    # an earlier export with a person's file added to it is not an export any more
    e = tmp_path / "e"
    export(store, e)
    exported = files_of(e)
    for extra, why in ((e / "notes.txt", "holds notes.txt"), (e / "empty-folder", "holds empty-folder"),
                       (e / "train_prefs" / "mine.py", "holds train_prefs/mine.py")):
        extra.mkdir() if extra.name == "empty-folder" else extra.write_text("mine")
        with pytest.raises(UserError, match=f"not an earlier export .*{why}, which the earlier export did not write"):
            export(store, e)
        assert {k: v for k, v in files_of(e).items() if k in exported} == exported
        extra.rmdir() if extra.is_dir() else extra.unlink()
    (e / "manifest.json").write_text("[not json")
    with pytest.raises(UserError, match="its manifest.json is not one an export wrote"):
        export(store, e)
    (e / "manifest.json").unlink()
    with pytest.raises(UserError, match="has no manifest.json"):
        export(store, e)

    # the names written beside `--out` are fresh ones: files already there are kept
    export(store, tmp_path / "f")
    for sibling in (".f.partial", ".f.old"):
        (tmp_path / sibling).write_text("a person's file")
    export(store, tmp_path / "f")  # replacing an earlier export still works
    assert all((tmp_path / s).read_text() == "a person's file" for s in (".f.partial", ".f.old"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".f")) == [".f.old", ".f.partial"]


def test_unwritable_out_is_refused_before_any_work(store: str, tmp_path: Path, monkeypatch):
    import flows.output_dir
    from flows.export import preflight

    monkeypatch.setattr(flows.output_dir.os, "access", lambda path, mode: False)  # tests run as root here
    with pytest.raises(UserError, match=rf"--out {tmp_path}/new/out: cannot write in {tmp_path} "):
        preflight(make_config(constitution="harmless", out=tmp_path / "new" / "out"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is a file"):
        preflight(make_config(constitution="harmless", out=tmp_path / "file"))


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "jsonl"])
def test_empty_splits_are_left_out_and_every_loader_reads_the_export(store: str, tmp_path: Path, fmt: str):
    """`make demo` exported empty test splits, and neither load_from_disk nor load_dataset could read it."""
    from datasets import load_dataset, load_from_disk

    out = tmp_path / "out"
    data, facts = export(store, out, methods=["ai"], test_fraction=0, format=fmt)
    assert set(data) == {"train_prefs"} and facts["splits_written"] == ["train_prefs"]
    assert facts["counts"] == {"train_sft": 0, "test_sft": 0, "train_prefs": 15, "test_prefs": 0}
    assert not [f for f in files_of(out) if "test_" in f or "_sft" in f]
    got = load_dataset(str(out), cache_dir=str(tmp_path / "cache"))  # the default config, as from the Hub
    assert set(got) == {"train_prefs"} and got["train_prefs"].to_list() == data["train_prefs"].to_list()
    meta = front_matter(out / "README.md")
    assert [(c["config_name"], [f["split"] for f in c["data_files"]]) for c in meta["configs"]] == [
        ("prefs", ["train_prefs"])]
    card = " ".join((out / "README.md").read_text().split())
    assert "Not written, because they have no rows" in card and "`test_prefs`" in card
    if fmt == "arrow":
        from types import SimpleNamespace

        from cai.prompts import parse_file
        from flows.pair_selection import _read_records

        assert set(load_from_disk(str(out))) == {"train_prefs"}
        records = _read_records(SimpleNamespace(dataset=str(out), dataset_split="train_prefs"))  # cai train
        assert [r["id"] for _, r in records] == list(data["train_prefs"]["id"])
        res = parse_file(out)  # cai prompts add DIR
        assert res.errors == [] and {p.id for p in res.prompts} == set(data["train_prefs"]["prompt_id"])


def test_a_small_export_still_gets_a_test_split(sqlite_url: str, tmp_path: Path):
    """13 prompts, none in the 0.1 hash bucket: the lowest-bucket prompt moves to test, and the card says so."""
    from store.split import held_out_prompts

    seed(sqlite_url, range(7, 20))  # prompts 2, 3 and 6 are the ones that hash into test at 0.1
    data, facts = export(sqlite_url, tmp_path / "out")
    assert facts["prompts"] == {"train": 12, "test": 1} and len(facts["moved_to_test"]) == 1
    assert set(data["test_prefs"]["prompt_id"]) == set(facts["moved_to_test"])
    assert not is_test(facts["moved_to_test"][0], 0.1)
    card = " ".join((tmp_path / "out" / "README.md").read_text().split())
    assert "the 1 with the lowest hash buckets were moved there" in card
    ids = [f"p{i}" for i in range(9)]
    assert held_out_prompts(ids, 0.1) == {p for p in ids if is_test(p, 0.1)}  # under 10 prompts: hash only
    assert held_out_prompts(ids * 2, 0.0) == set()


def test_trl_trains_one_step_on_a_real_export(store: str, tmp_path: Path, tiny_model_dir: Path):
    """TRL's own DPOTrainer and SFTTrainer on the splits as exported: no mapping, no renaming."""
    import torch
    from datasets import load_dataset, load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    out = tmp_path / "out"
    export(store, out, test_fraction=0)  # no test splits at all: the case `make demo` could not load
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    common = dict(max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2, max_length=128, use_cpu=True,
                  report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                  dataloader_num_workers=0, dataloader_pin_memory=False)
    splits = {"dpo": load_dataset(str(out), cache_dir=str(tmp_path / "cache"))["train_prefs"],  # the Hub way
              "sft": load_from_disk(str(out))["train_sft"]}
    for name, (config_cls, trainer_cls) in {"dpo": (DPOConfig, DPOTrainer), "sft": (SFTConfig, SFTTrainer)}.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        before = model.model.embed_tokens.weight.detach().clone()
        trainer = trainer_cls(model=model, args=config_cls(output_dir=str(tmp_path / name), **common),
                              train_dataset=splits[name], processing_class=tok)
        result = trainer.train()
        assert trainer.state.global_step == 1 and math.isfinite(result.training_loss), name
        assert not torch.equal(before, model.model.embed_tokens.weight.detach()), f"{name}: no weight moved"


# --- TRL / DPO -----------------------------------------------------------------------------

def test_prefs_are_trl_conversational(store: str, tmp_path: Path, tokenizer_dir: Path):
    """The columns and types DPOTrainer reads for conversational data, used as DPOTrainer uses them.

    Importing trl costs ~10 s, so its two steps are mirrored here: `is_conversational` (a list
    of dicts with "role"), then the chat template over `prompt` alone (with a generation prompt)
    and over `prompt + chosen` / `prompt + rejected`, the completion being what follows.
    """
    from datasets import List, Value, load_from_disk
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    export(store, tmp_path / "out")
    loaded = load_from_disk(str(tmp_path / "out"))
    message = List({"role": Value("string"), "content": Value("string")})
    prefs = loaded["train_prefs"]
    for column in ("prompt", "chosen", "rejected"):
        assert prefs.features[column] == message
    assert loaded["train_sft"].features["messages"] == message
    source = (tokenizer_dir / "chat_template.jinja").read_text()
    template = ImmutableSandboxedEnvironment().from_string(source)
    for row in prefs:
        assert all(isinstance(row[k], list) and set(row[k][0]) == {"role", "content"}
                   for k in ("prompt", "chosen", "rejected"))
        assert row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
        prompt = template.render(messages=row["prompt"], add_generation_prompt=True)
        for key in ("chosen", "rejected"):
            full = template.render(messages=row["prompt"] + row[key])
            assert full.startswith(prompt), "the prompt must render as a prefix of prompt + completion"
            assert full[len(prompt):] == row[key][0]["content"] + "<|im_end|>\n"
    sft = loaded["train_sft"][0]
    assert sft["messages"][-1]["role"] == "assistant" and sft["messages"][-2]["role"] == "user"


def test_train_prefs_feed_dpo_data(store: str, tmp_path: Path):
    from datasets import load_from_disk

    from training.data import examples_from_records

    export(store, tmp_path / "out")
    prefs = load_from_disk(str(tmp_path / "out"))["train_prefs"]
    examples = examples_from_records(prefs)  # the split as it is: no mapping, no renaming
    assert [e.id for e in examples] == list(prefs["id"])
    for e, row in zip(examples, prefs, strict=True):
        assert list(e.prompt) == row["prompt"]
        assert (e.chosen, e.rejected) == (row["chosen"][0]["content"], row["rejected"][0]["content"])
        assert (e.label_prob, e.method) == (row["label_prob"], row["method"])


def test_a_reply_the_token_cap_cut_is_marked_counted_and_read_back(store: str, tmp_path: Path):
    """finish_reason "length" (the generator's token cap stopped the reply) becomes chosen_cut /
    rejected_cut / response_cut on exactly its rows, the card counts it and tells trainers what to do,
    and training.data reads it back as a reply trained without an end-of-turn."""
    from datasets import load_from_disk

    from training.data import examples_from_records

    _, facts = export(store, tmp_path / "none")
    assert "Cut replies: none." in " ".join((tmp_path / "none" / "README.md").read_text().split())
    assert all(not n for per in facts["cut"].values() for n in per.values())
    with Session(get_engine(store)) as s:
        v = s.exec(select(PreferencePair.constitution_version)).first()
        cut = {f"r-{v}-4-revision", f"r-{v}-1-initial", f"r-{v}-3-a"}  # prompt 3's AI pair is a tie: not exported
        for rid in cut:
            s.get(Response, rid).finish_reason = "length"
        s.get(Response, f"r-{v}-6-b").finish_reason = "stop"
        s.commit()
    data, facts = export(store, tmp_path / "out", format="jsonl")
    loaded = load_from_disk(str(tmp_path / "none"))  # the same rows before the change: every flag false
    assert not any(prefs_column(loaded, "chosen_cut") + prefs_column(loaded, "rejected_cut"))
    prefs = [r for split in ("train_prefs", "test_prefs") for r in data[split]]
    sft = [r for split in ("train_sft", "test_sft") for r in data[split]]
    assert {r["id"] for r in prefs if r["chosen_cut"]} == {f"pair-{v}-004-rev"}
    assert {r["id"] for r in prefs if r["rejected_cut"]} == {f"pair-{v}-001-rev"}
    assert all(isinstance(r[k], bool) for r in prefs for k in ("chosen_cut", "rejected_cut"))
    assert {r["id"] for r in sft if r["response_cut"]} == {f"pair-{v}-004-rev"}
    assert all(isinstance(r["response_cut"], bool) for r in sft)
    assert facts["cut"] == {s: ({"chosen": sum(r["chosen_cut"] for r in data[s]),
                                 "rejected": sum(r["rejected_cut"] for r in data[s])} if s.endswith("_prefs")
                                else {"response": sum(r["response_cut"] for r in data[s])})
                            for s in schema.SPLITS}
    body = " ".join((tmp_path / "out" / "README.md").read_text().split())
    assert "1 chosen and 1 rejected of the 35 preference pairs, 1 of the 20 SFT replies" in body
    assert "without an end-of-turn/EOS token after it" in body
    meta = front_matter(tmp_path / "out" / "README.md")
    assert meta["cai_factory"]["cut"] == json.loads((tmp_path / "out" / "manifest.json").read_text())["cut"] \
        == facts["cut"]
    rows = [json.loads(line) for s in ("train_prefs", "test_prefs")
            for line in (tmp_path / "out" / "data" / f"{s}.jsonl").read_text().splitlines()]
    ended = {e.id: (e.chosen_ended, e.rejected_ended) for e in examples_from_records(rows)}
    assert {i for i, (c, r) in ended.items() if not (c and r)} == {f"pair-{v}-004-rev", f"pair-{v}-001-rev"}
    assert ended[f"pair-{v}-004-rev"] == (False, True) and ended[f"pair-{v}-001-rev"] == (True, False)


# --- card and manifest ---------------------------------------------------------------------

def front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_card_header_has_version_and_counts(store: str, tmp_path: Path):
    import pyarrow.parquet as pq

    _, facts = export(store, tmp_path / "out", format="parquet")
    meta = front_matter(tmp_path / "out" / "README.md")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    tables = {s: pq.read_table(tmp_path / "out" / f"data/{s}.parquet") for s in schema.SPLITS}
    v = facts["constitution"]["version"]
    cai = meta["cai_factory"]
    assert cai["constitution"]["name"] == "harmless" and cai["constitution"]["version"] == v
    assert cai["counts"] == manifest["counts"] == {s: t.num_rows for s, t in tables.items()}
    # sft: the 20 revision pairs; prefs: those + 20 AI pairs less 3 ties, 1 inconsistent, 1 quarantined
    counts = cai["counts"]
    assert counts["train_sft"] + counts["test_sft"] == 20
    assert counts["train_prefs"] + counts["test_prefs"] == 35
    assert sum(cai["counts_by_method"]["train_prefs"].values()) == counts["train_prefs"]
    assert meta["license"] == "other" and meta["task_categories"] == ["text-generation"]
    assert {c["config_name"] for c in meta["configs"]} == {"prefs", "sft"}
    for c in meta["configs"]:
        assert all((tmp_path / "out" / f["path"]).is_file() for f in c["data_files"])
    assert cai["policy_models"] == ["tiny-policy"] and cai["judge_models"] == ["tiny-judge"]
    assert cai["command"].startswith("cai export --constitution harmless") and "--out" not in cai["command"]

    ai_probs = sorted(p for t in (tables["train_prefs"], tables["test_prefs"])
                      for p, m in zip(t["label_prob"].to_pylist(), t["method"].to_pylist(), strict=True)
                      if m == "ai")
    lp = manifest["label_prob"]["ai"]
    assert lp["count"] == len(ai_probs) == 15 and sum(lp["histogram"]["counts"]) == 15
    assert (lp["min"], lp["quantiles"]["p50"], lp["max"]) == (ai_probs[0], ai_probs[7], ai_probs[-1])
    assert manifest["sampling"] == [{"settings": SAMPLING, "responses": 20 * 2 + 15 * 2}]
    assert [r["flow"] for r in manifest["runs"]] == ["generate", "label"]
    assert manifest["runs"][0]["engine_facts"] == {"backend": "hf", "device": "cpu", "dtype": "bfloat16"}
    assert "| generate | tiny-policy | hf cpu bfloat16 |" in (tmp_path / "out" / "README.md").read_text()
    assert manifest["constitution"]["source_text"] == constitution().source_text
    body = (tmp_path / "out" / "README.md").read_text()
    assert f"harmless@{v}" in body and "Rewrite it to be harmless." in body


def test_card_configs_load_with_load_dataset(store: str, tmp_path: Path):
    """The card's configs and features are what the Hub reads: jsonl has no types of its own."""
    from datasets import load_dataset

    data, _ = export(store, tmp_path / "out", format="jsonl")
    for config, splits in (("prefs", ("train_prefs", "test_prefs")), ("sft", ("train_sft", "test_sft"))):
        got = load_dataset(str(tmp_path / "out"), config, cache_dir=str(tmp_path / "cache"))
        assert set(got) == set(splits)
        for split in splits:
            assert got[split].features == data[split].features
            assert got[split].to_list() == data[split].to_list()


# --- the flow, the CLI and the hub ---------------------------------------------------------

@pytest.mark.prefect_server
def test_cli_push_unreachable_hub_keeps_local_export(store: str, tmp_path: Path, monkeypatch):
    from huggingface_hub import constants
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("CAI_DATABASE_URL", store)
    token = "hf_dummyTokenThatMustNotLeak123"
    monkeypatch.setenv("HF_TOKEN", token)
    # a closed local port: unreachable whether or not this machine has a network
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    out = tmp_path / "exports" / "harmless"
    res = CliRunner().invoke(app, ["export", "--constitution", "harmless", "--out", str(out), "--format",
                                   "jsonl", "--push-to-hub", "someone/harmless-cai", "--private"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Hugging Face Hub" in lines[0] and "saved locally" in lines[0], res.output
    assert (out / "README.md").is_file() and (out / "data" / "train_prefs.jsonl").is_file()
    for path in tmp_path.rglob("*"):  # the database file included
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    with Session(get_engine(store)) as s:
        run = s.exec(select(Run).where(Run.flow == "export")).one()
    assert run.status == "failed" and "Hugging Face Hub" in run.summary["error"]
    assert token not in json.dumps([run.config, run.summary, run.timings])
    assert run.constitution == "harmless" and run.config["push_to_hub"] == "someone/harmless-cai"


@pytest.mark.prefect_server
def test_flow_records_a_completed_run(store: str, tmp_path: Path, monkeypatch):
    from flows.export import export_flow

    monkeypatch.setenv("CAI_DATABASE_URL", store)
    summary = export_flow(make_config(constitution="harmless", out=tmp_path / "x"))
    assert (tmp_path / "x" / "dataset_dict.json").is_file()
    with Session(get_engine(store)) as s:
        run = s.get(Run, summary["run_id"])
    assert run.flow == "export" and run.status == "completed" and run.summary["counts"] == summary["counts"]
    assert f"{run.constitution}@{run.constitution_version}" == summary["constitution"]
    assert "warning" not in summary
    few = export_flow(make_config(constitution="harmless", out=tmp_path / "z", test_fraction=1e-9))
    assert few["counts"]["test_prefs"] == few["counts"]["test_sft"] == 0
    assert few["warning"].startswith("the test splits are empty: none of the 20 prompts")
    with pytest.raises(UserError, match="nothing to export"):
        export_flow(make_config(constitution="harmless", out=tmp_path / "y", min_label_prob=1.0,
                                methods=["ai"]))
    assert not (tmp_path / "y").exists()
    assert not list(tmp_path.glob(".*")), "staging dirs left behind"  # the rows are staged beside --out


@pytest.mark.prefect_server
def test_export_under_a_printing_parent_flow_keeps_the_log_clean(store: str, tmp_path: Path, monkeypatch):
    """The pipeline flow captures prints; datasets' fingerprinting must not leak dis.dis output into it."""
    import logging

    from prefect import flow

    from flows.export import export_flow

    monkeypatch.setenv("CAI_DATABASE_URL", store)
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("prefect.task_runs")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # the suite runs with PREFECT_LOGGING_LEVEL=WARNING

    @flow(log_prints=True)
    def parent() -> dict:
        print("parent flow prints are captured")
        return export_flow(make_config(constitution="harmless", out=tmp_path / "x"))

    try:
        assert parent()["counts"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert not [m for m in records if "LOAD_GLOBAL" in m or "RESUME" in m]


# --- streaming (issue 13 item 11): the store's texts are read a page at a time ----------------

def test_export_reads_the_texts_a_page_at_a_time(store: str, tmp_path: Path, monkeypatch):
    """No query reads more than one page of texts, none reads a response's conversation (the large
    column), and the paged export is the same bytes as one read in a single page."""
    from sqlalchemy import event

    import flows.export as ex

    whole, _ = export(store, tmp_path / "whole", format="arrow")  # the default page holds every pair here
    monkeypatch.setattr(ex, "PAGE", 3)
    statements: list[tuple[str, tuple]] = []

    def seen(conn, cursor, statement, params, context, executemany):
        statements.append((statement, tuple(params or ())))

    eng = get_engine(store)
    event.listen(eng, "before_cursor_execute", seen)
    try:
        data, facts = export(store, tmp_path / "paged", format="arrow")
    finally:
        event.remove(eng, "before_cursor_execute", seen)
    assert files_of(tmp_path / "paged") == files_of(tmp_path / "whole")
    texts = [params for st, params in statements if "response.text" in st]
    # the *_cut columns come with the texts, in the same queries (plus one for the card's counts)
    assert all("response.finish_reason" in st for st, _ in statements if "response.text" in st)
    assert len([st for st, _ in statements if "response.finish_reason" in st]) == len(texts) + 1
    prompts = [params for st, params in statements if "prompt.messages" in st]
    rows = {name: n for name, n in facts["counts"].items() if n}
    assert len(texts) == len(prompts) == sum(math.ceil(n / 3) for n in rows.values())
    assert max(map(len, texts)) <= 2 * 3 and max(map(len, prompts)) <= 3  # a page: 3 pairs, 2 replies each
    assert not [st for st, _ in statements if "response.conversation" in st], "a query read whole responses"
    for name, n in rows.items():  # the streamed fingerprint is the content hash of the rows, as before
        listed = ex.build_rows(Session(eng), ex.select_for_export(Session(eng), make_config(
            constitution="harmless", out=Path("unused"))), 0.1)[name]
        assert len(listed) == n == len(data[name])
        assert data[name]._fingerprint == content_hash(schema.SCHEMA_VERSION, name, schema.SPLITS[name].to_dict(),
                                                       listed, length=16)
        assert whole[name]._fingerprint == data[name]._fingerprint


def test_batches_after_the_first_are_the_same_bytes(sqlite_url: str, tmp_path: Path, monkeypatch):
    """Splits longer than one writer batch (datasets writes 1000 rows a batch; 256 here) come out as
    the same bytes as from one in-memory table, the way export built them before it streamed.
    (Below 256 rows a batch, a null bitmap of the batch after is shorter than arrow's 64-byte
    padding, and one batch of lookahead no longer reproduces it.)"""
    from datasets import Dataset, DatasetDict, NamedSplit
    from datasets import config as hf_config

    import flows.export as ex

    seed(sqlite_url, range(500))
    monkeypatch.setattr(hf_config, "DEFAULT_MAX_BATCH_SIZE", 256)
    monkeypatch.setattr(ex, "PAGE", 100)
    data, facts = export(sqlite_url, tmp_path / "streamed", format="arrow")
    with Session(get_engine(sqlite_url)) as s:
        config = make_config(constitution="harmless", out=Path("unused"))
        rows = ex.build_rows(s, ex.select_for_export(s, config), config.test_fraction)
    built = {name: Dataset.from_dict({c: [r[c] for r in rows[name]] for c in features}, features=features,
                                     split=NamedSplit(name)) for name, features in schema.SPLITS.items() if rows[name]}
    in_memory = DatasetDict({name: Dataset(b.data, info=b.info, split=b.split, fingerprint=data[name]._fingerprint)
                             for name, b in built.items()})
    assert max(len(r) for r in rows.values()) > 2 * 256  # three batches or more in a split
    write_export(in_memory, facts, tmp_path / "in-memory", "arrow")
    assert files_of(tmp_path / "streamed") == files_of(tmp_path / "in-memory")
