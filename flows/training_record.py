"""A training flow's record and output directory: what `cai train` and `cai reward train` share.

    check_out(out)                                   # before any work: never a person's directory
    with recorded_training(cfg, examples, refs, url) as rec:   # Run + TrainingRun rows, --resume checked
        train_reward(..., checkpoint_dir=checkpoint_dir(cfg), resume=cfg.resume, meta=rec.checkpoint_meta)
        tmp = rec.partial = fresh_sibling(out)       # removed if the block raises
        ...
        write_record(tmp, cfg, rec.selection, summary)   # training_run.json beside the weights
        rec.run.summary = summary

The TrainingRun is completed by store/training_runs.py: complete_training_run once the model is saved.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from constitution.load import split_ref, split_refs
from flows.common import UserError
from flows.configs import RewardTrainConfig, TrainConfig
from flows.pair_selection import load_examples, pair_filter
from store.db import mask_secrets
from store.models import TrainingRun
from store.runs import OpenRun, recorded_run
from store.training_runs import start_training_run, training_run_state
from training.checkpoint import latest_checkpoint, read_meta
from training.data import PairExample, selection_hash, split_eval

# what a training output directory holds (ours, or an earlier run's): anything else is a person's
# directory, which the swap would delete
_OUTPUT_MARKS = ("training_run.json", "config.json", "adapter_config.json", "checkpoints")


def check_out(out: Path) -> None:
    """A UserError unless `out` is missing, empty or an earlier training output: the new model is
    written beside it and swapped in, so nothing stale (an adapter beside full weights, merged/) stays."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in _OUTPUT_MARKS):
        raise UserError(f"--out {out}: holds files that are not a training output (no "
                        f"{', '.join(_OUTPUT_MARKS)}); pick another --out or empty it")


def training_inputs(cfg: TrainConfig | RewardTrainConfig, url: str | None
                    ) -> tuple[list[PairExample], list[str], list[PairExample], list[PairExample]]:
    """The selected pairs and their pair ids, then the same split into training and held-out prompts
    (store/split.py, as the export's test splits), once `cfg.out` is known to be writable."""
    examples, refs = load_examples(cfg, url)
    check_out(Path(cfg.out))
    train, held_out = split_eval(examples, cfg.eval_fraction)
    return examples, refs, train, held_out


@dataclass
class Training:
    """An open training run: its Run row (set `run.summary` / `run.timings` before the block ends)."""

    run: OpenRun
    training_run_id: str  # this run's id, or the resumed run's
    selection: dict[str, Any]  # what was trained on: the TrainingRun's data_selection
    checkpoint_meta: dict[str, Any]  # what every checkpoint records for --resume to check (run, pairs, settings)
    partial: Path | None = None  # the fresh directory the model is written to: removed if the run fails


def checkpoint_dir(cfg: TrainConfig | RewardTrainConfig, stage: str = "") -> Path:
    """Where a loop's checkpoints go: out/checkpoints (DPO, the reward model), out/checkpoints/sft for
    the SFT stage (beside DPO's under --stage sft+dpo). A new run clears the folder, --resume reads it."""
    root = Path(cfg.out) / "checkpoints"
    return root / "sft" if stage == "sft" else root


@contextmanager
def recorded_training(cfg: TrainConfig | RewardTrainConfig, examples: list[PairExample], refs: list[str],
                      url: str | None, flow: str = "train") -> Iterator[Training]:
    """`recorded_run` for a training flow: its Run row, and the TrainingRun that follows it (a resumed
    run keeps its TrainingRun: its steps continue). A refused --resume opens neither. A block that
    raises closes both (store/runs.py: finish_run) and removes `partial`; one that ends completes the
    Run with `run.summary` and `run.timings` (the TrainingRun by `complete_training_run`)."""
    names = sorted({split_ref(r)[0] for r in refs})
    versions = sorted({split_ref(r)[1] or "" for r in refs})
    constitution = (",".join(name for name, _ in split_refs(cfg.constitution)) if cfg.constitution
                    else ",".join(names) or None)
    pairs_hash = selection_hash(examples)
    resumed_id = None
    ckpt_root = checkpoint_dir(cfg)
    # the later stage's newest checkpoint first: under sft+dpo, DPO's (SFT's are done by then)
    found = next(filter(None, (latest_checkpoint(checkpoint_dir(cfg, s)) for s in ("", "sft"))), None) \
        if cfg.resume else None
    if found:
        meta = read_meta(found[0])
        if meta.get("pairs_hash") not in (None, pairs_hash):
            raise UserError(f"--resume: {found[0]} was trained on other pairs than these filters select "
                            f"({pair_filter(cfg).describe()}); drop --resume or pick another --out")
        resumed_id = meta.get("training_run_id")
        _check_resumable(cfg, found[0], meta, resumed_id, url)
    elif not cfg.resume:
        # a new run: an earlier run's checkpoints would outnumber (and rotate away) this one's, and
        # a later --resume would continue them
        shutil.rmtree(ckpt_root, ignore_errors=True)
    trained_on = SimpleNamespace(name=constitution or "", version=",".join(versions))  # the Run row's columns
    with recorded_run(flow, cfg.model_dump(), model=cfg.base, engine="dpo" if flow == "train" else flow,
                      constitution=trained_on, url=url) as run:
        training_run_id = resumed_id or run.id
        by_method: dict[str, int] = {}
        for e in examples:
            by_method[e.method or "?"] = by_method.get(e.method or "?", 0) + 1
        selection = {"source": cfg.dataset or "store",
                     "filters": asdict(pair_filter(cfg)) | {"limit": cfg.limit, "reviewed": cfg.reviewed,
                                                             "people_order": cfg.people_order},
                     "pairs": len(examples),
                     "pairs_hash": pairs_hash, "by_method": by_method, "constitution_versions": refs}
        start_training_run(url, TrainingRun(
            id=training_run_id, base_model=cfg.base, out_dir=str(Path(cfg.out).resolve()),
            config=mask_secrets(cfg.model_dump()), data_selection=selection, constitution=constitution,
            constitution_version=",".join(versions) or None, run_id=run.id))
        rec = Training(run, training_run_id, selection, {"training_run_id": training_run_id,
                                                          "pairs_hash": pairs_hash, "settings": resume_settings(cfg)})
        try:
            yield rec
        except BaseException:
            if rec.partial is not None:
                shutil.rmtree(rec.partial, ignore_errors=True)
            raise


def write_record(out: Path, cfg: TrainConfig | RewardTrainConfig, selection: dict[str, Any],
                  summary: dict[str, Any]) -> None:
    """training_run.json beside the weights: the config (no password), the data selection, the summary."""
    record = {"config": mask_secrets(cfg.model_dump()), "data_selection": selection, "summary": summary}
    (out / "training_run.json").write_text(json.dumps(record, indent=2, default=str))


_NOT_SETTINGS = ("resume", "database_url")  # what a resumed run may change: neither changes what is trained


def resume_settings(cfg: TrainConfig | RewardTrainConfig) -> dict[str, Any]:
    """The settings a checkpoint records and `--resume` compares, flattened to dotted keys."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    return flat({k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_SETTINGS})


def _check_resumable(cfg: TrainConfig | RewardTrainConfig, path: Path, meta: dict[str, Any], run_id: str | None,
                     url: str | None) -> None:
    """A UserError unless the checkpoint belongs to an unfinished run with these same settings."""
    status, stored = training_run_state(url, run_id)
    record = Path(cfg.out) / "training_run.json"
    try:
        done = json.loads(record.read_text(encoding="utf-8"))["summary"]["training_run_id"] == run_id
    except (OSError, ValueError, KeyError, TypeError):
        done = False
    if status == "completed" or (done and run_id):
        raise UserError(f"--resume: {path} belongs to training run {run_id}, which finished; "
                        "drop --resume to train again")
    saved = meta.get("settings")
    if not isinstance(saved, dict):  # a checkpoint from before settings were recorded: the run's row
        try:
            saved = resume_settings(type(cfg).model_validate(stored)) if stored else None
        except ValueError:  # a row this version cannot read: the pairs hash was all there was to check
            saved = None
    if saved is None:
        return
    now = resume_settings(cfg)
    # a setting newer than the checkpoint is as the version that wrote it behaved: at its default
    default = resume_settings(type(cfg).model_validate({}))
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
                  and not (k not in saved and now.get(k) == default.get(k)))
    if diff:
        k = diff[0]
        raise UserError(f"--resume: {path} was trained with {k}={saved.get(k)!r}, this run has {k}={now.get(k)!r}"
                        + (f" (and {len(diff) - 1} more settings differ)" if len(diff) > 1 else "")
                        + "; use the same settings or drop --resume")
