"""Issue 34 item 1: a database password is never stored, logged, exported or sent to Prefect.

`--set database_url=postgresql+psycopg://user:PASSWORD@host/db` must work, and the password must
appear nowhere a config goes: the Run and TrainingRun rows, the train log line `config {...}`,
`training_run.json`, an export's manifest.json (copied from the producing runs' configs, older rows
included) and the parameters of a Prefect deployment or flow run.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import sqlalchemy as sa
from reviewstore import CONSTITUTION  # the review tests' tiny constitution
from sqlalchemy import make_url
from sqlmodel import Session

from cai.errors import UserError
from constitution.load import parse_text
from flows.common import record_constitution
from flows.configs import GenerateConfig, TrainConfig
from store.db import get_engine, mask_secrets, session_scope
from store.keys import content_hash
from store.models import PreferencePair, Prompt, Response, Run

SECRET = "S3cretPW"


def with_password(url: str) -> str:
    # the test server trusts local connections: any password connects, so this URL works
    return make_url(url).set(password=SECRET).render_as_string(hide_password=False)


def _dataset(path: Path) -> Path:
    with path.open("w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"Question {i}: how do plants grow?",
                                "chosen": "They use light, water and air.", "rejected": "No."}) + "\n")
    return path


def _seed_pairs_of_an_old_run(url: str) -> None:
    """Pairs made by a run whose stored config still holds the password (a row from before masking)."""
    c = parse_text(CONSTITUTION, "harmless.yaml")
    with session_scope(url) as s:
        record_constitution(s, c)
        s.add(Run(id="old-generate", flow="generate", config={"database_url": with_password(url), "rounds": 1},
                  model="m", engine="hf", constitution=c.name, constitution_version=c.version, status="completed"))
        s.flush()
        for i in range(4):
            msgs = [{"role": "user", "content": f"How would I do risky thing {i}?"}]
            pid = content_hash("prompt", msgs)
            s.add(Prompt(id=pid, text=msgs[-1]["content"], messages=msgs))
            s.flush()
            common = {"prompt_id": pid, "conversation": msgs, "model": "m", "run_id": "old-generate",
                      "constitution": c.name, "constitution_version": c.version}
            s.add(Response(id=f"init-{i}", kind="initial", text="Sure.", **common))
            s.flush()
            s.add(Response(id=f"rev-{i}", kind="revision", round=1, parent_id=f"init-{i}",
                           text="I won't help with that.", **common))
            s.flush()
            s.add(PreferencePair(id=f"pair-{i}", prompt_id=pid, chosen_id=f"rev-{i}", rejected_id=f"init-{i}",
                                 method="revision", principle_ids=["harm"], run_id="old-generate",
                                 constitution=c.name, constitution_version=c.version, policy_model="m"))


@pytest.mark.postgres
def test_a_database_password_is_in_no_row_log_file_or_manifest(pg_url, tiny_model_dir, tmp_path, caplog, capsys):
    from flows.export import build_export, make_config
    from flows.publish import write_export
    from flows.train import run_training

    url = with_password(pg_url)
    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    train_log = logging.getLogger("cai.train")
    train_log.addHandler(handler)
    level = train_log.level
    train_log.setLevel(logging.INFO)  # setLevel, not `.level =`: only it clears the logger's isEnabledFor cache
    out = tmp_path / "model"
    cfg = TrainConfig(base=str(tiny_model_dir), dataset=str(_dataset(tmp_path / "pairs.jsonl")), database_url=url,
                      out=str(out), eval_fraction=0.25,
                      trainer={"max_steps": 1, "batch_size": 2, "max_length": 64, "max_prompt_length": 48})
    try:
        summary = run_training(cfg)
    finally:
        train_log.removeHandler(handler)
        train_log.setLevel(level)
    assert summary["steps"] == 1  # the URL with its password was used: the run worked

    _seed_pairs_of_an_old_run(url)
    export_cfg = make_config(constitution="harmless", out=tmp_path / "export", test_fraction=0)
    with Session(get_engine(url)) as s:
        data, facts = build_export(s, export_cfg)
    write_export(data, facts, tmp_path / "export", export_cfg.format)

    eng = sa.create_engine(pg_url)
    with eng.connect() as c:
        rows = {t: [r[0] for r in c.execute(sa.text(f"SELECT t::text FROM {t} t"))] for t in ("run", "training_run")}
    eng.dispose()
    new_runs = [r for r in rows["run"] if "old-generate" not in r]
    assert new_runs and rows["training_run"], rows
    places = {
        "run rows (this run)": "\n".join(new_runs),
        "training_run rows": "\n".join(rows["training_run"]),
        "log (config line)": logged.getvalue() + caplog.text,
        "console": "".join(capsys.readouterr()),
        "training_run.json": (out / "training_run.json").read_text(),
        "manifest.json": (tmp_path / "export" / "manifest.json").read_text(),
        "card": (tmp_path / "export" / "README.md").read_text(),
    }
    assert "config {" in places["log (config line)"]
    assert '"runs"' in places["manifest.json"] and "old-generate" in places["manifest.json"]
    leaked = [where for where, text in places.items() if SECRET in text]
    assert not leaked, f"the password is in: {', '.join(leaked)}"
    assert "postgres:***@" in places["training_run.json"]  # masked, not dropped: which server is still said


def test_deploy_and_submit_refuse_a_password_in_their_parameters():
    from flows.schedule import check_settings

    url = "postgresql+psycopg://postgres:S3cretPW@db.example:5432/cai"
    for flow, params in (("generate", {"database_url": url}), ("train", {"database_url": url, "out": "m"})):
        with pytest.raises(UserError) as err:
            check_settings(flow, params)
        msg = str(err.value)
        assert SECRET not in msg and "CAI_DATABASE_URL" in msg and "database_url" in msg and "\n" not in msg
    assert check_settings("generate", {"database_url": "sqlite:////srv/cai.db"}).database_url  # no password: fine


def test_a_flow_run_through_prefect_gets_no_password_and_still_reaches_the_store(monkeypatch):
    """Prefect stores a flow run's parameters: the URL travels in this process's environment instead."""
    from flows import orchestration
    from store.db import database_url

    url = "postgresql+psycopg://postgres:S3cretPW@db.example:5432/cai"
    seen = {}

    def fake_prefect_flow(fn):
        def run(cfg):
            seen["params"] = json.dumps(cfg.model_dump(mode="json"))
            seen["url"] = database_url(cfg.database_url)  # what the flow's store calls resolve to
            return "ok"
        return run

    monkeypatch.setenv("CAI_PREFECT", "always")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    monkeypatch.setenv("CAI_DATABASE_URL", "sqlite:////elsewhere.db")
    monkeypatch.setattr(orchestration, "as_prefect", fake_prefect_flow)
    assert orchestration.run_flow(lambda cfg: None, GenerateConfig(database_url=url)) == "ok"
    assert SECRET not in seen["params"] and seen["url"] == url
    import os

    assert os.environ["CAI_DATABASE_URL"] == "sqlite:////elsewhere.db"  # restored afterwards


def test_mask_secrets_masks_urls_alone_and_inside_text():
    cfg = {"database_url": "postgresql://u:p%40ss@h:5432/d", "nested": [{"x": "sqlite:////tmp/cai.db"}],
           "error": "OperationalError: connection to postgresql+psycopg://u:S3cretPW@h/d failed"}
    got = mask_secrets(cfg)
    assert got["database_url"] == "postgresql://u:***@h:5432/d" and got["nested"] == cfg["nested"]
    assert SECRET not in got["error"] and "u:***@h/d" in got["error"]
