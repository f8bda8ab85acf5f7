"""Peak Python memory of `cai export` as the store grows: streamed (what export does) vs all rows
in memory (what it did before issue 13), at two store sizes, in one run.

    python -m bench.export_memory                 # 500 and 2000 prompts, 2 KB replies
    python -m bench.export_memory --small 1000 --large 4000 --reply-bytes 4096

Each prompt gets an initial answer, a revision and two samples (each with a conversation that
repeats the prompt, as generate stores them) and a revision pair and an AI pair. The peak is
tracemalloc's: what Python holds (rows, texts, ORM objects). Arrow buffers live outside it, so the
in-memory way's tables are not even counted: its real peak is higher than shown. Every figure is
from one process on a shared machine: compare the two ways and the two sizes, not the seconds.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path


def seed(url: str, n: int, reply_bytes: int) -> None:
    from store.db import session_scope
    from store.keys import content_hash
    from store.models import ConstitutionVersion, PreferencePair, Prompt, Response

    filler = ("lorem ipsum dolor sit amet " * (reply_bytes // 27 + 1))[:reply_bytes]
    with session_scope(url) as s:
        s.add(ConstitutionVersion(name="bench", version="b0000001", sha256="b" * 64, canonical="{}",
                                  source_text="name: bench", source_path="bench.yaml", principle_hashes={}))
        for i in range(n):
            msgs = [{"role": "user", "content": f"Question {i}: {filler[:200]}"}]
            pid = content_hash("prompt", msgs)
            s.add(Prompt(id=pid, text=msgs[-1]["content"], messages=msgs, category="bench", source="bench"))
            conv = msgs + [{"role": "assistant", "content": filler}] * 3  # a few-shot-sized conversation
            ids = {k: f"r-{i}-{k}" for k in ("initial", "revision", "a", "b")}
            for k, rid in ids.items():
                s.add(Response(id=rid, prompt_id=pid, kind="revision" if k == "revision" else "initial",
                               conversation=conv, text=f"{k} {i} {filler}", model="m", constitution="bench",
                               constitution_version="b0000001"))
            s.flush()
            for method, chosen, rejected in (("revision", "revision", "initial"), ("ai", "a", "b")):
                s.add(PreferencePair(id=f"pair-{i:06d}-{method}", prompt_id=pid, chosen_id=ids[chosen],
                                     rejected_id=ids[rejected], method=method, label_prob=0.8, principle_ids=["p"],
                                     constitution="bench", constitution_version="b0000001", policy_model="m"))


def peak(url: str, out: Path, streamed: bool) -> tuple[float, float]:
    """(peak MiB traced, seconds) of one export into `out`."""
    from sqlmodel import Session

    from cai import dataset_schema as schema
    from flows import export as ex
    from flows.publish import staging_dir, write_export
    from store.db import get_engine

    config = ex.make_config(constitution="bench", out=out)
    tracemalloc.start()
    t0 = time.perf_counter()
    with Session(get_engine(url)) as s:
        if streamed:
            staging = staging_dir(out)
            data, facts = ex.build_export(s, config, staging)
        else:  # the pre-streaming way: every row as Python lists, one in-memory table per split
            from datasets import Dataset, DatasetDict

            sel = ex.select_for_export(s, config)
            rows = ex.build_rows(s, sel, config.test_fraction)
            facts = ex.collect_facts(s, config, sel, ex.plan_export(sel, config.test_fraction))
            data = DatasetDict({name: Dataset.from_dict({c: [r[c] for r in rows[name]] for c in f}, features=f)
                                for name, f in schema.SPLITS.items() if rows[name]})
    write_export(data, facts, out, "arrow")
    seconds = time.perf_counter() - t0
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if streamed:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return round(top / 2**20, 1), round(seconds, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--large", type=int, default=2000)
    ap.add_argument("--reply-bytes", type=int, default=2048)
    args = ap.parse_args()
    import datasets

    datasets.disable_progress_bars()
    result: dict = {"reply_bytes": args.reply_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        for label, n in (("small", args.small), ("large", args.large)):
            url = f"sqlite:///{tmp}/{label}.db"
            seed(url, n, args.reply_bytes)
            result[f"{label}_pairs"] = 2 * n
            for how in ("streamed", "in_memory"):
                mib, s = peak(url, Path(tmp) / f"{label}-{how}", how == "streamed")
                result[f"{label}_{how}_peak_mib"], result[f"{label}_{how}_s"] = mib, s
            result[f"{label}_db_mib"] = round(os.path.getsize(f"{tmp}/{label}.db") / 2**20, 1)
    for how in ("streamed", "in_memory"):
        result[f"{how}_growth"] = round(result[f"large_{how}_peak_mib"] / max(result[f"small_{how}_peak_mib"], 0.1), 2)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
