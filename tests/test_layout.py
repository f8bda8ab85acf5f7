"""The layout rules of DESIGN.md, checked on the source: what each layer may import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# flows/ modules that are helpers, not stage flows: any flow may import them
FLOW_HELPERS = {"common", "configs", "engine_cache", "stage", "plots", "publish", "output_dir", "orchestration",
                "lint", "pair_selection", "training_record", "prefect_server", "label_inputs", "__init__"}
COMPOSERS = {"pipeline", "schedule", "prefect_flows"}  # may import sibling flows
FORBIDDEN_IN_CAI = ("prefect", "rich", "matplotlib", "typer", "flows", "training")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import statement in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


def test_cai_imports_no_orchestration_rendering_or_sessions() -> None:
    files = sorted((ROOT / "cai").glob("*.py"))
    assert len(files) >= 8
    bad = []
    for f in files:
        for mod, names in _imports(f):
            top = mod.split(".")[0]
            if top in FORBIDDEN_IN_CAI:
                bad.append(f"{f.name}: import {mod}")
            if top == "sqlmodel" and "Session" in names:
                bad.append(f"{f.name}: from sqlmodel import Session")
            if mod.startswith("engines") and mod != "engines.base":
                bad.append(f"{f.name}: {mod} (only engines.base)")
            if mod.startswith("store") and mod not in ("store.keys", "store.models"):
                bad.append(f"{f.name}: {mod} (only store row types and keys)")
    assert not bad, bad


def test_no_flow_imports_a_sibling_flow() -> None:
    flows = {f.stem for f in (ROOT / "flows").glob("*.py")} - FLOW_HELPERS
    assert {"generate", "label", "evaluate", "train", "reward", "export", "report"} <= flows
    bad = []
    for name in sorted(flows - COMPOSERS):
        for mod, names in _imports(ROOT / "flows" / f"{name}.py"):
            targets = {mod.split(".")[1]} if mod.startswith("flows.") else set(names) if mod == "flows" else set()
            bad += [f"{name} -> {t}" for t in targets & flows]
    assert not bad, bad


def test_library_layers_do_not_import_the_recipes() -> None:
    bad = []
    for folder in ("store", "engines", "constitution", "training"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            for mod, _ in _imports(f):
                top = mod.split(".")[0]
                if top in ("flows", "cai") or (folder != "training" and top == "training"):
                    bad.append(f"{f.relative_to(ROOT)}: {mod}")
    assert not bad, bad


def test_importing_flows_sets_no_environment_variables() -> None:
    import os
    import subprocess
    import sys

    code = ("import os; before = dict(os.environ); import flows, flows.common, flows.generate; "
            "print(sorted(set(os.environ) - set(before)))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY",
                                                          "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "OMP_WAIT_POLICY" not in out and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in out, out
