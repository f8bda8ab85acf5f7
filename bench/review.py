"""How fast the review page answers as the store grows: the same requests on a small and a large store, in one run.

    python -m bench.review                      # 1,000 and 100,000 pairs, 10 % of them reviewed
    python -m bench.review --small 2000 --large 200000

Each store has one prompt per 10 pairs, two replies per prompt, methods and labels spread over the
pairs, and a verdict on every tenth pair. The requests go through the app in-process (a TestClient,
no network): the first pair of the reviewer's to-do queue, a filtered queue (AI pairs the judge gave
P <= 0.3), a principle filter, a page of the queue list, a verdict posted, and the agreement page
(which reads every verdict). If the page read the whole store, the large store's times would be
~100x the small one's; paged queries keep them close. Median of 5 calls each; one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path


def seed(url: str, n: int) -> None:
    from store.db import get_engine
    from store.models import ConstitutionVersion, PreferencePair, Prompt, PromptTag, Response, Review

    eng = get_engine(url)
    now = datetime.now(UTC)
    prompts = max(n // 10, 1)
    methods = ("ai", "helpful", "contrastive", "revision", "best-of-n")
    with eng.begin() as conn:
        conn.execute(ConstitutionVersion.__table__.insert(), [dict(
            name="bench", version="b0000001", sha256="b" * 64, canonical="{}", source_text="name: bench",
            source_path="bench.yaml", principle_hashes={}, created_at=now)])
        conn.execute(Prompt.__table__.insert(), [dict(
            id=f"prompt-{i:07d}", text=f"question {i}", messages=[{"role": "user", "content": f"question {i}"}],
            category="bench", source="bench", created_at=now) for i in range(prompts)])
        conn.execute(PromptTag.__table__.insert(), [dict(prompt_id=f"prompt-{i:07d}", tag=("even", "odd")[i % 2])
                                                    for i in range(prompts)])
        conn.execute(Response.__table__.insert(), [dict(
            id=f"resp-{i:07d}-{k}", prompt_id=f"prompt-{i:07d}", kind="sample", round=0, sample_index=0,
            conversation=[], text=f"reply {k} to question {i} " * 20, model="m", sampling={}, seed=0,
            prompt_tokens=0, completion_tokens=0, finish_reason="stop", created_at=now)
            for i in range(prompts) for k in ("a", "b")])
        conn.execute(PreferencePair.__table__.insert(), [dict(
            id=f"pair-{j:08d}", prompt_id=f"prompt-{j % prompts:07d}", chosen_id=f"resp-{j % prompts:07d}-a",
            rejected_id=f"resp-{j % prompts:07d}-b", method=methods[j % 5], label_prob=(j % 100) / 100,
            status="ok", principle_ids=[f"p{j % 7}"], constitution="bench", constitution_version="b0000001",
            policy_model="m", judge_model="judge" if j % 5 in (0, 4) else None, details={},
            created_at=now) for j in range(n)])
        conn.execute(Review.__table__.insert(), [dict(
            id=f"review-{j:08d}", pair_id=f"pair-{j:08d}", reviewer=("ann", "bob")[j % 2],
            verdict=("chosen", "rejected", "tie")[j % 3], left=("chosen", "rejected")[j % 2], note=None,
            ai_shown=False, source="bench", created_at=now) for j in range(0, n, 10)])


def timings(url: str) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from flows.configs import ReviewConfig
    from flows.review import make_app, settings

    c = TestClient(make_app(settings(ReviewConfig(database_url=url), None, "ann")), base_url="http://127.0.0.1:8765")
    paths = {"todo": "/", "filtered": "/?method=ai&label_max=0.3&queue=todo",
             "principle": "/?principle=p3&queue=all", "list": "/queue?queue=all", "stats": "/stats"}
    out = {}
    for name, path in paths.items():
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert c.get(path).status_code == 200
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times) * 1000, 1)
    times = []
    for _ in range(5):
        page = c.get("/").text
        pair = re.search(r'data-pair="([^"]+)"', page).group(1)
        left = re.search(r'data-left="([^"]+)"', page).group(1)
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        t0 = time.perf_counter()
        r = c.post("/verdict", data={"pair": pair, "left": left, "choice": "left", "csrf": csrf},
                   follow_redirects=False)
        times.append(time.perf_counter() - t0)
        assert r.status_code == 303
    out["verdict"] = round(statistics.median(times) * 1000, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=1_000)
    ap.add_argument("--large", type=int, default=100_000)
    args = ap.parse_args()
    import platform

    import torch

    result = {"bench": "review_page", "unit": "ms (median of 5)", "cpu": _cpu_name(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as tmp:
        for label, n in (("small", args.small), ("large", args.large)):
            url = f"sqlite:///{Path(tmp) / f'{label}.db'}"
            t0 = time.perf_counter()
            seed(url, n)
            result[label] = {"pairs": n, "seed_s": round(time.perf_counter() - t0, 1), **timings(url)}
    result["large_over_small"] = {k: round(result["large"][k] / result["small"][k], 2)
                                  for k in result["small"] if k not in ("pairs", "seed_s")}
    print(json.dumps(result))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
