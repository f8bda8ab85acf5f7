"""One source for every setting: the flow configs (flows/configs.py), and the `cai` options,
--config / --set / --show-config and `cai schedule` validation derived from them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from flows.cli import app
from flows.configs import (
    CONFIGS,
    EngineSettings,
    GenerateConfig,
    PipelineConfig,
    RunnerSettings,
    SamplingConfig,
    StoreSettings,
    TrainConfig,
)
from training.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[2]
MODELS = [*CONFIGS.values(), EngineSettings, RunnerSettings, SamplingConfig, StoreSettings, TrainerConfig]
REQUIRED = {"eval": ["--model", "runs/x"], "export": ["--constitution", "harmless", "--out", "exports/x"]}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def shown(*args: str) -> dict:
    r = invoke(*args, "--show-config")
    assert r.exit_code == 0, r.output
    return yaml.safe_load(r.stdout)


def one_error_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    return lines[0]


# --- the models ------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_config_forbids_unknown_keys_and_documents_every_field(model: type[BaseModel]):
    assert model.model_config.get("extra") == "forbid"
    for name, f in model.model_fields.items():
        assert f.description and "\n" not in f.description, f"{model.__name__}.{name} has no one-line help"


def test_importing_the_configs_loads_no_prefect_torch_or_transformers():
    code = ("import sys, flows.configs, flows.cli.options; "
            "print(sorted(m for m in ('prefect', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_trainer_config_is_nested_not_copied():
    assert set(TrainConfig.model_fields) & set(TrainerConfig.model_fields) == set()
    assert set(PipelineConfig.model_fields) & set(TrainerConfig.model_fields) == {"seed"}
    assert PipelineConfig().trainer.max_steps is None and PipelineConfig().trainer.epochs == 1
    assert TrainConfig().trainer == TrainerConfig()
    with pytest.raises(ValidationError, match="scheduler"):
        TrainConfig(trainer={"scheduler": "step"})


def test_a_partial_sub_model_keeps_the_rest_of_its_default():
    assert GenerateConfig(critique={"temperature": 0.1}).critique == SamplingConfig(temperature=0.1, max_new_tokens=96)
    assert PipelineConfig(trainer={"beta": 0.2}).trainer == TrainerConfig(
        beta=0.2, epochs=1, lr=7e-4, eval_every=8, lora={"r": 16, "alpha": 32})


def test_engine_shorthand_and_shared_groups():
    assert GenerateConfig(engine="vllm").engine == EngineSettings(backend="vllm")
    with pytest.raises(ValidationError, match="chunk_size"):
        GenerateConfig(runner={"chunk_size": 0})
    with pytest.raises(ValidationError, match="extra"):
        GenerateConfig(chunk_size=8)  # the old flat spelling is an error, not silently ignored


def test_the_pipeline_passes_its_trainer_on_and_recognises_a_finished_run(sqlite_url, tmp_path, monkeypatch):
    from flows.pipeline import _finished_training, stage_configs
    from store.db import session_scope
    from store.models import TrainingRun, utcnow

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    out = tmp_path / "m"
    tcfg = stage_configs(PipelineConfig(model_dir=str(out), seed=3, trainer={"lr": 1e-4}))["train"]
    assert (tcfg.trainer.max_steps, tcfg.trainer.lr, tcfg.trainer.seed) == (None, 1e-4, 3)
    mined = stage_configs(PipelineConfig(dpo_mine=True, mine_repeat=2))["train"]
    assert (mined.dpo_mine, mined.mine_repeat, tcfg.dpo_mine) == (True, 2, False)
    out.mkdir()
    (out / "config.json").write_text("{}")
    from flows.pair_selection import load_examples
    from store.models import PreferencePair, Prompt, Response
    from training.data import selection_hash

    with session_scope(sqlite_url) as s:  # one stored pair: the finished run trained on it
        s.add(Prompt(id="p1", text="q", messages=[{"role": "user", "content": "q"}]))
        for rid, text in (("c1", "a good answer here"), ("r1", "a bad one")):
            s.add(Response(id=rid, prompt_id="p1", kind="initial", conversation=[], text=text, model="m"))
        s.flush()
        s.add(PreferencePair(id="pp1", prompt_id="p1", chosen_id="c1", rejected_id="r1", method="helpful",
                             constitution="helpful-honest", constitution_version="v"))
    pairs_hash = selection_hash(load_examples(tcfg)[0])
    with session_scope(sqlite_url) as s:  # what flows/train.py stores: the nested config
        s.add(TrainingRun(id="tr-1", base_model="m", out_dir=str(out.resolve()), config=tcfg.model_dump(),
                          status="completed", finished_at=utcnow(), data_selection={"pairs_hash": pairs_hash}))
    assert _finished_training(tcfg)["training_run_id"] == "tr-1"
    assert _finished_training(tcfg.model_copy(update={"resume": True})) is not None  # resume is not a setting
    other = tcfg.model_copy(update={"trainer": tcfg.trainer.model_copy(update={"lr": 2e-4})})
    assert _finished_training(other) is None


# --- --show-config, --config, --set ----------------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "label", "train", "export", "eval", "report", "run"])
def test_show_config_prints_the_defaults(command, tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", f"sqlite:///{tmp_path}/never-created.db")
    data = shown(command, *REQUIRED.get(command, []))
    flags = dict(zip(REQUIRED.get(command, [])[::2], REQUIRED.get(command, [])[1::2], strict=True))
    expected = CONFIGS[command](**{k.lstrip("-"): v for k, v in flags.items()})
    assert data == expected.model_dump(mode="json")
    assert not (tmp_path / "never-created.db").exists()  # --show-config runs nothing


def test_precedence_file_then_set_then_flags(tmp_path):
    f = tmp_path / "gen.yaml"
    f.write_text("rounds: 3\nlimit: 7\nengine: vllm\ncritique:\n  temperature: 0.1\n")
    data = shown("generate", "--config", str(f), "--set", "rounds=4", "--set", "limit=8", "--limit", "9",
                 "--set", "engine.settings.max_batch_tokens=4096")
    assert data["rounds"] == 4 and data["limit"] == 9
    assert data["engine"] == {"backend": "vllm", "settings": {"max_batch_tokens": 4096}}
    # a partial sub-model keeps the rest of its own default (critique's 96 tokens, not the class's 128)
    assert data["critique"] == {"temperature": 0.1, "top_p": 0.9, "max_new_tokens": 96, "repetition_penalty": 1.15,
                                "no_repeat_ngram": 4}


def test_nested_set_and_flags_reach_the_trainer():
    data = shown("train", "--set", "trainer.loss_type=ipo", "--set", "trainer.lr=1e-5", "--beta", "0.2",
                 "--method", "ai", "--max-steps", "3")
    assert data["trainer"] | {"lr": 1e-5, "loss_type": "ipo", "beta": 0.2, "max_steps": 3} == data["trainer"]
    assert data["trainer"]["batch_size"] == TrainerConfig().batch_size and data["methods"] == ["ai"]
    run = shown("run", "--set", "trainer.lr=1e-4", "--train-steps", "7", "--limit", "0")
    assert run["trainer"]["lr"] == 1e-4 and run["trainer"]["max_steps"] == 7 and run["limit"] is None


@pytest.mark.parametrize(("args", "named"), [
    (["generate", "--set", "nosuchfield=1"], "nosuchfield: unknown setting"),
    (["train", "--set", "trainer.nosuch=1"], "trainer.nosuch: unknown setting"),
    (["label", "--set", "runner.chunk_size=0"], "runner.chunk_size"),
    (["run", "--set", "rounds"], "--set 'rounds': expected KEY=VALUE"),
    (["report", "--config", "/no/such.yaml"], "--config /no/such.yaml: no such file"),
])
def test_bad_settings_are_one_line_and_exit_2(args, named):
    assert named in one_error_line(invoke(*args, "--show-config"))


@pytest.mark.parametrize(("values", "line"), [
    ({"format": "csv"}, "invalid setting: format: Input should be 'arrow', 'parquet' or 'jsonl' (got 'csv')"),
    ({"private": True}, "invalid setting: --private only means something with --push-to-hub OWNER/NAME"),
])
def test_a_rejected_setting_has_one_wording_from_python_and_the_command_line(tmp_path, values, line):
    """cai/errors.py: invalid_settings is the one wording (it was three: cai export's, label's, the CLI's)."""
    from cai.errors import UserError
    from flows.export import make_config

    with pytest.raises(UserError) as got:
        make_config(constitution="harmless", out=tmp_path, **values)
    assert str(got.value) == line
    sets = [a for k, v in values.items() for a in ("--set", f"{k}={v}")]
    cli = one_error_line(invoke("export", *REQUIRED["export"], *sets, "--show-config"))
    assert cli == f"error: {line}"


def test_a_config_file_is_checked_like_set(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rounds: 2\nround: 3\n")
    assert "round: unknown setting" in one_error_line(invoke("generate", "--config", str(f), "--show-config"))
    f.write_text("- rounds\n")
    assert "expected a mapping" in one_error_line(invoke("generate", "--config", str(f), "--show-config"))


# --- cai schedule: settings are validated before anything is served --------------------------

@pytest.fixture
def served(monkeypatch):
    import flows.schedule

    calls = []
    monkeypatch.setattr(flows.schedule, "serve_schedule", lambda *a, **kw: calls.append((a, kw)))
    return calls


@pytest.mark.parametrize(("settings", "named"), [
    (["--set", "nosuchfield=1"], "nosuchfield: unknown setting"),
    (["--set", "rounds=-1"], "rounds: Input should be greater than or equal to 1"),
    (["--set", "trainer.lr=1e-5"], "trainer: unknown setting"),
])
def test_schedule_rejects_bad_settings_before_serving(served, settings, named):
    assert named in one_error_line(invoke("schedule", "generate", "--cron", "0 3 * * *", *settings))
    assert served == []


def test_schedule_serves_the_validated_overrides(served):
    r = invoke("schedule", "generate", "--cron", "0 3 * * *", "--constitution", "harmless", "--prompts", "red-team",
               "--set", "limit=2", "--set", "rounds=1", "--name", "nightly")
    assert r.exit_code == 0, r.output
    (args, kw), = served
    assert args == ("generate", "0 3 * * *", {"constitution": "harmless", "prompts": ["red-team"], "limit": 2,
                                              "rounds": 1})
    assert kw == {"name": "nightly", "limit": None}
    data = shown("schedule", "run", "--set", "trainer.lr=1e-5")
    assert data["trainer"]["lr"] == 1e-5 and data["trainer"]["max_steps"] is None and served == [(args, kw)]


def test_serve_schedule_validates_before_asking_for_a_server(monkeypatch):
    import flows.schedule

    def no_server():
        raise AssertionError("the server was asked before the settings were checked")

    monkeypatch.setattr(flows.schedule, "check_server", no_server)
    with pytest.raises(ValidationError, match="nosuchfield"):
        flows.schedule.serve_schedule("label", "0 3 * * *", {"nosuchfield": 1})
    with pytest.raises(ValidationError, match="samples"):
        flows.schedule.serve_schedule("label", "0 3 * * *", {"samples": 1})


# --- each default appears once ---------------------------------------------------------------

def _field_names(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    for f in model.model_fields.values():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            names |= _field_names(f.annotation)
    return names


def _config_of(fn: ast.FunctionDef) -> str | None:
    for d in fn.decorator_list:
        if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "configured":
            return d.args[0].id
    return None


def test_no_cli_option_repeats_a_config_default():
    """A typer.Option in flows/cli/ may not carry a literal default for a field some config has:
    such options are made by `opt`, which reads default and help from the model."""
    models = {m.__name__: m for m in CONFIGS.values()}
    every_field = set().union(*(_field_names(m) for m in models.values()))
    bad, derived = [], 0
    for path in sorted((ROOT / "flows" / "cli").glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, ast.FunctionDef):
                continue
            model = _config_of(fn)
            if model is None and fn.name != "schedule":  # not a stage command (judge-report, status, ...)
                continue
            fields = _field_names(models[model]) if model else every_field
            args = fn.args.args + fn.args.kwonlyargs
            defaults = [None] * (len(fn.args.args) - len(fn.args.defaults)) + fn.args.defaults + fn.args.kw_defaults
            for arg, default in zip(args, defaults, strict=True):
                if not isinstance(default, ast.Call):
                    continue
                name = getattr(default.func, "id", None) or getattr(default.func, "attr", None)
                if name == "opt":
                    derived += 1
                    assert default.args[0].id == model, f"{path.name}:{arg.arg}: opt() of another config"
                elif name == "Option" and default.args and arg.arg in fields:
                    first = default.args[0]
                    if not (isinstance(first, ast.Constant) and first.value is None):
                        bad.append(f"{path.name}:{default.lineno} {fn.name}({arg.arg}=...)")
    assert not bad, bad
    assert derived > 60  # the stage commands really are built from the configs


def _strings(tree: ast.AST):
    """String constants that are not docstrings (those show commands; they set nothing)."""
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node


def test_the_default_model_is_named_once():
    found = []
    code = [p for folder in ("bench", "cai", "constitution", "training", "engines", "flows", "store")
            for p in sorted((ROOT / folder).rglob("*.py"))]
    for path in code:
        rel = path.relative_to(ROOT)
        if rel == Path("engines/bundled.py"):
            continue
        found += [f"{rel}:{n.lineno}" for n in _strings(ast.parse(path.read_text(encoding="utf-8")))
                  if "smollm2-135m" in n.value]
    assert not found, f"use engines.bundled.DEFAULT_SPEC: {found}"


def test_a_runs_own_constitution_governs_its_contrast_pairs_and_eval_too():
    """`cai run --constitution my.yaml` used to keep contrast and eval on the bundled harmless, so the
    pairs that train the model ignored the user's constitution."""
    from flows.pipeline import stage_configs

    own = PipelineConfig(constitution="my/house.yaml")
    stages = stage_configs(own)
    assert own.constitutions == ["my/house.yaml", "helpful-honest"]
    assert stages["contrast"].constitutions == stages["eval"].constitutions == own.constitutions
    assert stages["train"].constitution == "my/house.yaml,helpful-honest"
    assert PipelineConfig().constitutions == ["harmless", "helpful-honest"]
    assert PipelineConfig(constitution="helpful-honest").constitutions == ["helpful-honest"]
    # said outright, the list wins
    assert PipelineConfig(constitution="my/house.yaml", constitutions=["harmless"]).constitutions == ["harmless"]
