"""The `cai` command line: this module builds the app and registers the commands, in the order
`cai --help` lists them; the commands live in the modules named below, by area.

    cai constitution validate constitution/harmless.yaml
    cai prompts add data/red_team.jsonl --tag red-team
    cai status --json
    cai train --config train.yaml --set trainer.loss_type=ipo --lr 1e-5 --show-config

Stage options take their defaults and help from the flow configs (flows/configs.py); every stage
command also reads `--config FILE`, `--set KEY=VALUE` and `--show-config` (flows/cli/options.py).
Heavy imports (torch, transformers, prefect, datasets) happen inside commands, so `cai status`
and `cai constitution ...` answer fast. Bad input exits with code 2 and one line saying what
to fix (flows/cli/common.py).
"""

from __future__ import annotations

import typer

from flows.cli import db, jobs, pairs, results, training
from flows.cli.data import constitution_app, prompts_app
from flows.cli.entry import main
from flows.cli.review import review_app

__all__ = ["app", "main"]

app = typer.Typer(help="Constitutional AI / RLAIF data factory.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

COMMANDS = {
    "status": db.status,
    "generate": pairs.generate,
    "contrast": pairs.contrast,
    "redteam": pairs.redteam,
    "run": jobs.run,
    "schedule": jobs.schedule,
    "deploy": jobs.deploy,
    "submit": jobs.submit,
    "label": pairs.label,
    "judge-report": pairs.judge_report,
    "train": training.train,
    "export": results.export,
    "eval": results.eval_cmd,
    "report": results.report,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)

app.add_typer(constitution_app, name="constitution")
app.add_typer(prompts_app, name="prompts")
app.add_typer(db.db_app, name="db")
app.add_typer(training.reward_app, name="reward")
app.add_typer(review_app, name="review")
