"""Issue 34 items 13-24: bad input is one line and exit 2 before any work starts; YAML alias bombs
are refused wherever YAML is read; stored values cannot write markup into the dataset card."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
       "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def one_line_exit_2(r, *needles: str) -> str:
    """The failure contract: exit 2, exactly one line on stderr, no traceback."""
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    flat = " ".join(r.stderr.split())
    for needle in needles:
        assert needle in flat, r.stderr
    return r.stderr


# --- item 23: YAML alias bombs through --config and --set -------------------------------------

def test_a_config_file_with_aliases_is_refused_naming_the_line(tmp_path):
    f = tmp_path / "bomb.yaml"
    f.write_text("rounds: 2\n" + BOMB)
    one_line_exit_2(invoke("generate", "--config", str(f), "--show-config"),
                    f"--config {f}:3:", "aliases")


def test_a_set_value_with_aliases_is_refused():
    value = "[&a [x, x, x, x, x, x, x, x, x, x], [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]]"
    one_line_exit_2(invoke("contrast", "--set", f"openings={value}", "--show-config"),
                    "--set openings", "aliases")


def test_a_config_file_nested_too_deep_or_not_utf8_is_one_line(tmp_path):
    f = tmp_path / "deep.yaml"
    f.write_text("engine:\n  settings: " + "[" * 200 + "]" * 200 + "\n")
    one_line_exit_2(invoke("generate", "--config", str(f), "--show-config"), "nested deeper than")
    f.write_bytes(b"rounds: \xff\n")
    one_line_exit_2(invoke("generate", "--config", str(f), "--show-config"), "not UTF-8")


def test_plain_yaml_config_and_set_values_still_read(tmp_path):
    import yaml

    f = tmp_path / "ok.yaml"
    f.write_text("rounds: 3\nengine:\n  backend: hf\n")
    r = invoke("generate", "--config", str(f), "--set", "limit=4", "--show-config")
    assert r.exit_code == 0, r.output
    data = yaml.safe_load(r.stdout)
    assert data["rounds"] == 3 and data["limit"] == 4


# --- item 24: tags are ids; the dataset card escapes every stored value ------------------------

def _export_helpers():
    """tests/flows/test_export.py's store seeding and export (one home for that fixture data)."""
    import importlib.util

    path = Path(__file__).parent / "flows" / "test_export.py"
    spec = importlib.util.spec_from_file_location("_export_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tag", ["x\n## Verified by Hugging Face", "a`b", "<img src=x onerror=alert(1)>",
                                 "[click](https://evil.example)", "Benign", "", "-x"])
def test_prompts_add_refuses_a_tag_that_is_not_an_id(tag, tmp_path, sqlite_url, monkeypatch):
    from sqlmodel import func, select

    from store.db import session_scope
    from store.models import Prompt

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    f = tmp_path / "mine.jsonl"
    f.write_text('{"prompt": "hello there"}\n')
    one_line_exit_2(invoke("prompts", "add", str(f), "--tag", tag), "--tag", "lowercase letters")
    with session_scope(sqlite_url) as s:
        assert s.exec(select(func.count()).select_from(Prompt)).one() == 0


def test_prompts_add_makes_an_id_of_the_file_name(tmp_path, sqlite_url, monkeypatch):
    from sqlmodel import select

    from store.db import session_scope
    from store.models import PromptTag

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    f = tmp_path / "My_Prompts <b>.jsonl"
    f.write_text('{"prompt": "hello there"}\n')
    assert invoke("prompts", "add", str(f)).exit_code == 0
    with session_scope(sqlite_url) as s:
        assert set(s.exec(select(PromptTag.tag))) == {"my-prompts-b"}


def _outside_code(text: str) -> str:
    """What a Markdown renderer reads as markup: the text less its code spans."""
    import re

    return re.sub(r"(`+)(?:(?!\1).)*?\1", "", text)


def test_the_card_escapes_stored_tags_models_and_methods(sqlite_url, tmp_path):
    import re

    from sqlmodel import select

    from store.db import session_scope
    from store.models import PreferencePair, PromptTag, Response, Run

    helpers = _export_helpers()
    helpers.seed(sqlite_url, range(6))
    evil_tag = "x`\n## Verified by Hugging Face\n<img src=x onerror=alert(1)>"
    evil_model = "m | <img src=x onerror=alert(1)>\n## Verified by Hugging Face [link](https://evil.example)"
    with session_scope(sqlite_url) as s:  # what other users of a shared store could have written
        for pid in {p.prompt_id for p in s.exec(select(PreferencePair))}:
            s.add(PromptTag(prompt_id=pid, tag=evil_tag))
        for row in [*s.exec(select(Response)), *s.exec(select(Run))]:
            row.model = evil_model
            s.add(row)
        for row in s.exec(select(PreferencePair)):
            row.policy_model = evil_model
            row.judge_model = evil_model if row.judge_model else None
            s.add(row)
    helpers.export(sqlite_url, tmp_path / "out")
    body = (tmp_path / "out" / "README.md").read_text().split("\n---\n", 1)[1]
    prose = body.split("## Constitution")[0] + body.split("## How it was made")[1]  # less the fenced YAML
    assert not re.search(r"^#+ *Verified", body, re.M), body
    outside = _outside_code(prose)
    assert "<img" not in outside and "](https://evil" not in outside, outside
    tables, table = [], []
    for line in body.splitlines() + [""]:
        if line.startswith("|"):
            table.append(len(re.findall(r"(?<!\\)\|", line)))
        elif table:
            tables.append(table)
            table = []
    # a stored line break or pipe never splits a row: each table's rows have its header's cells
    assert len(tables) >= 5 and all(len(set(t)) == 1 for t in tables), tables
    assert sum("onerror" in ln for ln in body.splitlines() if ln.startswith("| ")) >= 3


def test_the_card_command_is_shell_quoted(sqlite_url, tmp_path):
    import shlex

    helpers = _export_helpers()
    helpers.seed(sqlite_url, range(6))
    _, facts = helpers.export(sqlite_url, tmp_path / "out", tags=["red-team", "it's; rm -rf ~"])
    assert shlex.split(facts["command"])[:3] == ["cai", "export", "--constitution"]
    assert "it's; rm -rf ~" in shlex.split(facts["command"])


# --- items 13, 15, 16, 22 (first half), text: config rules, checked before anything starts ------

@pytest.mark.parametrize(("args", "named"), [
    # item 15: the prompt is cut within max_length; the answer needs room after it
    (["train", "--max-length", "100"], "trainer: max_prompt_length (256) must be below max_length (100)"),
    (["train", "--set", "sft.max_length=200"], "sft: max_prompt_length (256) must be below max_length (200)"),
    (["reward", "train", "--set", "reward.max_prompt_length=600"], "reward: max_prompt_length (600) must be below"),
    (["reward", "score", "--set", "max_length=50"], "max_prompt_length (256) must be below max_length (50)"),
    (["run", "--set", "trainer.max_length=64"], "trainer: max_prompt_length"),
    # item 16: seeds torch can take
    (["train", "--seed", str(2**64)], "trainer.seed: Input should be less than or equal to 9223372036854775807"),
    (["generate", "--set", f"seed={-2**63 - 1}"], "seed: Input should be greater than or equal to"),
    (["run", "--set", f"seed={2**63}"], "seed: Input should be less than or equal to"),
    # item 22: --merge-lora merges adapters; without --lora-r there are none
    (["train", "--merge-lora"], "--merge-lora folds LoRA adapters into the base, and this run trains none"),
    # NUL and lone surrogates: never a path, a model name or a stored config
    (["generate", "--set", 'model="a\\u0000b"'], "model: contains a NUL character"),
    (["train", "--out", "runs/a\udcffb"], "out: contains a lone surrogate"),
    (["label", "--set", 'engine.settings={"dtype": "x\\ud800"}'], "engine.settings.dtype: contains a lone surrogate"),
    # item 13: contrast has no `openings` setting (the constitution's texts steer it; empty ones are refused)
    (["contrast", "--set", "openings=[]"], "openings: unknown setting"),
])
def test_config_rules_are_one_line_before_anything_starts(args, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_exit_2(invoke(*args, "--show-config"), named)
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing loaded


def test_seeds_at_the_ends_of_the_range_are_taken():
    import yaml

    for seed in (2**63 - 1, -(2**63), 0):
        r = invoke("train", "--seed", str(seed), "--lora-r", "8", "--merge-lora", "--show-config")
        assert r.exit_code == 0, r.output
        assert yaml.safe_load(r.stdout)["trainer"]["seed"] == seed


def test_an_empty_counter_opening_is_refused_by_the_constitution_loader():
    from constitution.load import ConstitutionError, parse_text

    text = (Path(__file__).parents[1] / "constitution" / "harmless.yaml").read_text()
    assert text.count("counter_openings:\n") == 1
    bad = text.replace("counter_openings:\n", "counter_openings:\n      - \"\"\n")
    with pytest.raises(ConstitutionError, match="empty text"):
        parse_text(bad, "h.yaml")


# --- items 14, 17, 18: dataset records and reward-score rows, named by file:line ----------------

GOOD = '{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}'


@pytest.mark.parametrize(("line", "named"), [
    ("3", "expected an object with prompt, chosen, rejected, got int"),
    ("[1, 2]", "expected an object with prompt, chosen, rejected, got list"),
    ("null", "expected an object with prompt, chosen, rejected, got null"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "label_prob": [0.5]}', "label_prob must be a number in [0, 1]"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "label_prob": "high"}', "label_prob must be a number in [0, 1]"),
    ('{"prompt": [{"content": "a"}], "chosen": "b", "rejected": "c"}', "prompt[0]: expected a {role, content}"),
    ('{"prompt": [{"role": 3, "content": "a"}], "chosen": "b", "rejected": "c"}', "prompt[0]: expected role"),
])
@pytest.mark.parametrize("command", [["train"], ["reward", "train"]])
def test_train_dataset_records_are_named_by_file_and_line(command, line, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "pairs.jsonl"
    f.write_text(f"{GOOD}\n\n{line}\n")
    one_line_exit_2(invoke(*command, "--dataset", str(f), "--min-label-prob", "0.1", "--base", "no/such-model",
                           "--out", str(tmp_path / "o")), f"{f}:3: {named}")


@pytest.mark.parametrize(("line", "named"), [
    ('{"prompt": [{"content": "hi"}], "response": "x"}', "prompt[0]: expected a {role, content} message"),
    ('{"prompt": [{"role": "user"}], "response": "x"}', "prompt[0]: expected a {role, content} message"),
    ('{"prompt": [{"role": "wizard", "content": "hi"}], "response": "x"}', "prompt[0]: expected role"),
    ('{"prompt": [{"role": "assistant", "content": "hi"}], "response": "x"}',
     "prompt: the prompt must end with a user turn"),
    ("7", "expected {prompt, response} or {prompt, chosen, rejected}"),
])
def test_reward_score_rows_are_checked_before_the_model_loads(line, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "rows.jsonl"
    f.write_text('{"prompt": "hi", "response": "hello"}\n' + line + "\n")
    # a directory that passes the reward-model check (its config names a classifier) but holds no weights:
    # the rows must be refused before anything would load them
    model = tmp_path / "rm"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"]}')
    one_line_exit_2(invoke("reward", "score", "--input", str(f), "--model", str(model)), f"{f}:2: {named}")


def test_reward_score_out_naming_a_directory_is_refused_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "rows.jsonl"
    f.write_text('{"prompt": "hi", "response": "hello"}\n')
    (tmp_path / "scores").mkdir()
    one_line_exit_2(invoke("reward", "score", "--input", str(f), "--model", str(tmp_path / "no-model"),
                           "--out", str(tmp_path / "scores")), "--out", "is a directory", "scores.jsonl")


# --- items 19, 20, 22 (second half): cai deploy ----------------------------------------------

@pytest.fixture
def no_server(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens: must not be reached
    import flows.schedule

    def never(*a, **kw):
        raise AssertionError("the work pool was created before the names were checked")

    monkeypatch.setattr(flows.schedule, "ensure_pool", never)


@pytest.mark.parametrize(("args", "named"), [
    (["--pool", "p", "--name", "a/b"], "--name 'a/b': a Prefect name cannot contain /"),
    (["--pool", "x/y%", "--name", "ok"], "--pool 'x/y%': a Prefect name cannot contain % /"),
    (["--pool", "''", "--name", "ok"], "--pool \"''\": empty"),
    (["--pool", "p", "--constitution", "harmless", "--prompts", "a%b"], "--name 'generate-harmless-a%b'"),
    (["--pool", "p", "-j", "foo"], "--job-variable 'foo': expected KEY=VALUE, e.g. --job-variable working_dir="),
])
def test_deploy_names_and_job_variables_are_checked_before_the_pool(args, named, no_server):
    one_line_exit_2(invoke("deploy", "generate", *args), named)


@pytest.mark.parametrize("flow", ["contrast", "redteam", "report", "reward-train", "train", "run"])
def test_deploy_takes_every_stage_flow(flow, no_server):
    """Each stage flow with a Prefect flow is accepted and validated; the next step asks the server."""
    one_line_exit_2(invoke("deploy", flow, "--pool", "p", "--name", "n"), "cannot reach the Prefect server")


def test_every_deployable_flow_builds_a_deployment_offline():
    """The entrypoint a worker imports, and the parameters it validates against, for each flow."""
    import inspect

    from prefect.deployments.runner import EntrypointType

    from flows.configs import CONFIGS
    from flows.schedule import FLOWS, resolve_flow

    assert {"contrast", "redteam", "report", "reward-train"} <= set(FLOWS)
    for name in FLOWS:
        flow_obj, config = resolve_flow(name)
        assert config is CONFIGS[name]
        param = next(iter(inspect.signature(flow_obj.fn).parameters))
        dep = flow_obj.to_deployment(name="n", parameters={param: config().model_dump(mode="json")}
                                     if name not in ("export", "eval") else {},
                                     work_pool_name="p", entrypoint_type=EntrypointType.MODULE_PATH)
        assert dep.entrypoint.startswith("flows.prefect_flows."), dep.entrypoint


# --- item 21: cai redteam --policy is checked first; cai status counts the red-team tables -------

def test_redteam_policy_is_checked_before_attacker_generation(tmp_path, sqlite_url, monkeypatch):
    import flows.cli.pairs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)

    def started(*a, **kw):
        raise AssertionError("the red-team flow started (attacker generation) with a policy that is not there")

    monkeypatch.setattr(flows.cli.pairs, "run_flow", started)
    one_line_exit_2(invoke("redteam", "--policy", str(tmp_path / "no-such-policy"), "--per-category", "1"),
                    "no-such-policy")


def test_status_counts_every_table_red_team_ones_included(sqlite_url, monkeypatch):
    import json

    from sqlmodel import SQLModel

    from store.db import session_scope
    from store.models import TaxonomyVersion
    from store.status import TABLES

    assert {m.__tablename__ for m in TABLES} == set(SQLModel.metadata.tables)
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    with session_scope(sqlite_url) as s:
        s.add(TaxonomyVersion(name="harms", version="abc", canonical="{}", source_text="x"))
    r = invoke("status", "--json")
    assert r.exit_code == 0, r.output
    tables = json.loads(r.stdout)["tables"]
    assert tables["taxonomy_version"] == 1 and tables["redteam_candidate"] == 0 and tables["redteam_attack"] == 0
