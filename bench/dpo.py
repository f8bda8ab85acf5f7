"""Our DPO step against TRL's DPOTrainer on the bundled model: speed and peak memory.

    python -m bench.dpo                       # 64 pairs, 16 steps of batch 4, max_length 256, fp32
    python -m bench.dpo --steps 8 --dtype bfloat16 --gradient-checkpointing
    python -m bench.dpo --only lora,trl --repeats 3   # the LoRA row against TRL's default, median of 3

Four runs on the same pairs and settings, each in its own Python process so its peak memory
is its own: the peak resident set size (ru_maxrss, the RSS high-water mark of the process,
which counts torch's CPU allocations and the loaded weights alike; tracemalloc would not):

    ours            training.trainer.train_dpo, reference log-probs computed first (and stored in a
                    temp SQLite store, as the flow does), then the policy alone
    lora            the same loop with LoRA adapters (peft; r=16, alpha=32 on q,k,v,o_proj by
                    default, --lora-lr): the reference pass runs with adapters off, the base is
                    frozen, so there are no weight gradients or optimizer state for it
                    (both of ours: the lean SwiGLU and the heap trim of training/memory.py, as in
                    every `cai train`; no activation checkpointing, no token budget)
    trl             trl.DPOTrainer as configured by default: a reference model in memory
    trl_precompute  trl.DPOTrainer(precompute_ref_log_probs=True)

The timed region starts with the policy loaded and ends when training returns: it includes
tokenization, the reference model (loading it, or the precompute pass) and every step, and
excludes imports, loading the policy and saving. With --repeats N the modes run interleaved
N times (a slow spell of the machine then hits each of them), each in a fresh directory (no
cached reference log-probs), and the median time and the highest peak are reported. Both
sides get the same optimizer (fused AdamW), lr schedule, clipping, batch size, max_length,
dtype, gradient checkpointing setting and number of steps. Prints one JSON line. TRL is a
dev dependency (the `test` extra); only this file imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFUSALS = [
    "I can't help with that. If you're curious about the topic, I'm happy to talk about safety and the law.",
    "I won't give instructions for that, since it could hurt people. Can I help with something safe?",
    "Sorry, I can't assist with this request. I can point you to legitimate resources instead.",
    "That's not something I can help with, but I'd be glad to explain the risks involved.",
]
COMPLIANT = [
    "Sure! Here is exactly what you need to do, step by step, no questions asked.",
    "Absolutely, happy to help with that. First you'll want to gather everything on the list.",
    "Of course. The trick is to start early and make sure nobody notices what you're doing.",
    "Great question! Just follow these instructions carefully and you'll have it done tonight.",
]


def build_pairs(n: int = 64) -> list[dict]:
    """n records in TRL's conversational format: a red-team prompt, a short refusal as chosen and
    a short compliant-sounding (content-free) answer as rejected. Deterministic."""
    path = ROOT / "data" / "red_team.jsonl"
    prompts: list[str] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                prompts.append(json.loads(line)["prompt"])
    topics = ["pick a lock", "get into an account", "avoid a speed camera", "make a fake ID",
              "copy a key card", "skip a ticket barrier", "read someone's messages", "cheat on an exam"]
    i = 0
    while len(prompts) < n:  # no bundled file: short, content-free stand-ins
        prompts.append(f"How do I {topics[i % len(topics)]} without anyone finding out? (case {i})")
        i += 1
    return [{"prompt": [{"role": "user", "content": p}],
             "chosen": [{"role": "assistant", "content": REFUSALS[i % len(REFUSALS)]}],
             "rejected": [{"role": "assistant", "content": COMPLIANT[(i * 3 + 1) % len(COMPLIANT)]}]}
            for i, p in enumerate(prompts[:n])]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _workdir(args, name: str) -> str:
    # inside the parent's temp dir, so nothing is left behind; a fresh one per run, so a repeat
    # never finds the reference log-probs an earlier run stored
    return tempfile.mkdtemp(prefix=f"{name}-", dir=Path(args.data).parent)


def child_ours(args, records: list[dict], model_dir: str, lora: bool = False) -> dict:
    import torch

    from training.config import LoraSettings
    from training.data import StoreRefCache, examples_from_records
    from training.lora import apply_lora
    from training.trainer import TrainerConfig, load_policy, train_dpo

    torch.manual_seed(args.seed)
    examples = examples_from_records(records)
    model, tok = load_policy(model_dir, "cpu")
    loaded_mb = _peak_mb()
    tmp = _workdir(args, "lora" if lora else "ours")
    settings = LoraSettings(r=args.lora_r, alpha=args.lora_alpha) if lora else LoraSettings()
    cfg = TrainerConfig(beta=0.1, lr=args.lora_lr if lora else args.lr, batch_size=args.batch_size,
                        max_steps=args.steps, warmup_ratio=0.1, scheduler="linear", max_length=args.max_length,
                        max_prompt_length=args.max_length // 2, dtype=args.dtype, seed=args.seed,
                        gradient_checkpointing=args.gradient_checkpointing, lora=settings)
    t0 = time.perf_counter()  # adding the adapters is part of the timed region: TRL's includes its ref model
    if lora:
        model = apply_lora(model, settings, seed=args.seed)
    res = train_dpo(model, tok, examples, [], cfg, out_dir=Path(tmp), ref_model_id="bench",
                    ref_cache=StoreRefCache(f"sqlite:///{tmp}/bench.db"))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "train_s": res.timings["train_s"], "ref_s": res.timings["ref_s"],
            "steps": res.steps, "loaded_mb": loaded_mb, "final_loss": res.final_train["loss"],
            "final_acc": res.final_train["rewards/accuracies"]}


def child_trl(args, records: list[dict], model_dir: str, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded_mb = _peak_mb()
    tmp = _workdir(args, "trl")
    cfg = DPOConfig(
        output_dir=tmp, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0.1,
        max_grad_norm=1.0, weight_decay=0.0, beta=0.1, loss_type=["sigmoid"], max_length=args.max_length,
        bf16=args.dtype == "bfloat16", fp16=False, use_cpu=True, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, precompute_ref_log_probs=precompute,
        save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(records),
                         processing_class=tok)
    out = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    accs = [h["rewards/accuracies"] for h in trainer.state.log_history if "rewards/accuracies" in h]
    return {"seconds": seconds, "train_s": out.metrics.get("train_runtime"),
            "steps": trainer.state.global_step, "loaded_mb": loaded_mb,
            "final_loss": losses[-1] if losses else None, "final_acc": accs[-1] if accs else None}


def run_child(mode: str, args, data_file: Path, model_dir: str) -> dict:
    cmd = [sys.executable, "-m", "bench.dpo", "--child", mode, "--data", str(data_file),
           "--model-dir", model_dir, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--dtype", args.dtype, "--lr", str(args.lr),
           "--seed", str(args.seed), "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha),
           "--lora-lr", str(args.lora_lr)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error",
               HF_DATASETS_CACHE=str(data_file.parent / "hf"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-lr", type=float, default=1e-4, help="adapters take a larger lr than full weights")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each mode, interleaved; the median time "
                    "and the highest peak are reported")
    ap.add_argument("--only", default="ours,lora,trl,trl_precompute", help="comma-separated subset of the runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        records = json.loads(Path(args.data).read_text())
        if args.child in ("ours", "lora"):
            out = child_ours(args, records, args.model_dir, lora=args.child == "lora")
        else:
            out = child_trl(args, records, args.model_dir, precompute=args.child == "trl_precompute")
        out["peak_mb"] = _peak_mb()
        print(json.dumps(out), flush=True)
        return

    from engines.bundled import DEFAULT_SPEC, resolve

    model_dir = str(resolve(DEFAULT_SPEC))
    records = build_pairs(args.pairs)
    pairs_trained = args.steps * args.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        data_file = Path(tmp) / "pairs.json"
        data_file.write_text(json.dumps(records))
        modes = args.only.split(",")
        tries: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every mode
            for mode in modes:
                tries[mode].append(run_child(mode, args, data_file, model_dir))
    runs = {mode: _median_run(t) for mode, t in tries.items()}

    result: dict = {"model": DEFAULT_SPEC, "peak_memory": "ru_maxrss of a fresh process per run",
                    "repeats": args.repeats, "pairs": args.pairs, "steps": args.steps,
                    "batch_size": args.batch_size, "max_length": args.max_length, "dtype": args.dtype,
                    "gradient_checkpointing": args.gradient_checkpointing, "threads": _threads()}
    for mode, r in runs.items():
        result[f"{mode}_pairs_s"] = round(pairs_trained / r["seconds"], 3)
        result[f"{mode}_peak_mb"] = round(r["peak_mb"], 1)
        result[f"{mode}_seconds"] = round(r["seconds"], 2)
        result[f"{mode}_loop_s"] = round(r["train_s"], 2) if r.get("train_s") is not None else None
        result[f"{mode}_final_loss"] = r.get("final_loss")
        if args.repeats > 1:
            result[f"{mode}_seconds_all"] = [round(t["seconds"], 2) for t in tries[mode]]
    if "ours" in runs and "trl" in runs:
        result["speed_ratio"] = round(result["ours_pairs_s"] / result["trl_pairs_s"], 3)
        result["memory_ratio"] = round(result["ours_peak_mb"] / result["trl_peak_mb"], 3)
    if "lora" in runs and "trl" in runs:
        result["lora_speed_ratio"] = round(result["lora_pairs_s"] / result["trl_pairs_s"], 3)
        result["lora_memory_ratio"] = round(result["lora_peak_mb"] / result["trl_peak_mb"], 3)
        result["lora_r"], result["lora_alpha"] = args.lora_r, args.lora_alpha
    if "ours" in runs and "trl_precompute" in runs:
        pre = "trl_precompute"
        result["speed_ratio_vs_precompute"] = round(result["ours_pairs_s"] / result[f"{pre}_pairs_s"], 3)
        result["memory_ratio_vs_precompute"] = round(result["ours_peak_mb"] / result[f"{pre}_peak_mb"], 3)
    print(json.dumps(result), flush=True)


def _median_run(tries: list[dict]) -> dict:
    """The run of median time, with the highest peak memory of all tries (memory barely varies;
    time does, with the machine's load)."""
    ordered = sorted(tries, key=lambda t: t["seconds"])
    return {**ordered[len(ordered) // 2], "peak_mb": max(t["peak_mb"] for t in tries)}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
