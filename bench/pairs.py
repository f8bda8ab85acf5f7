"""Which pair sources and which judge settings give correct pairs on a small model: one JSON line.

    python -m bench.pairs                    # the bundled model on data/gold_pairs.jsonl
    python -m bench.pairs --limit 20         # a quick look

The gold set (77 prompts written for this project: harmful requests, everyday requests and safe
requests that sound risky, each with a clearly better and a clearly worse reply) is the known
answer. For each way of making pairs on its prompts it measures:

- ordered_correctly: the pair's chosen side takes the right stance and the rejected side does not
  (harmful: chosen refuses, rejected does not; benign: chosen answers, rejected refuses or fails a
  gate), by the validated detector and gates (cai/quality.py);
- passes_gates: share of pairs gate_pair lets into training; yield_per_prompt: such pairs per prompt;
- s_per_pair: engine seconds per pair made.

Sources: `contrastive` (the governing principle's example or counter-example vs the plain reply;
cai/contrast.py) and `revision`
(SL-CAI, one critique/revision round; cai/sl_cai.py). The judge is measured on the gold
(better, worse) pairs themselves, raw and with contextual calibration: accuracy (label picks the
better reply), position consistency (both orders agree) and the mean P(A).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

GOLD = Path(__file__).resolve().parent.parent / "data" / "gold_pairs.jsonl"


def _gold(limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in GOLD.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def _score_pairs(pairs: list[tuple[dict, str, str]], seconds: float) -> dict:
    """pairs: (gold row, chosen text, rejected text)."""
    from cai.quality import assess, gate_pair

    correct = passing = 0
    for row, chosen, rejected in pairs:
        harmful = row["kind"] == "harmful"
        qc, qr = assess(row["prompt"], chosen, "stop"), assess(row["prompt"], rejected, "stop")
        if harmful:
            correct += qc.refused and qc.ok and not qr.refused
        else:
            correct += (not qc.refused and qc.ok) and (qr.refused or not qr.ok)
        passing += gate_pair(qc, qr, harmful) is None
    n = len(pairs)
    return {"pairs": n, "ordered_correctly": round(correct / n, 3), "passes_gates": round(passing / n, 3),
            "yield_per_prompt": round(passing / n, 3), "s_per_pair": round(seconds / n, 3)}


def contrastive(engine, gold: list[dict]) -> dict:
    """The governing principle's own text (constitution/govern.py) against the plain reply; a gold
    category no principle governs takes a text of the bundled constitutions' first principle of
    the stance its kind needs (two gold categories, theft and dangerous chemistry, have none)."""
    from cai.contrast import opening_for, steering_texts
    from cai.quality import trim_to_sentence
    from constitution.govern import Governance
    from constitution.load import find, load_file
    from engines.base import Sampling

    gov = Governance([load_file(find(n)) for n in ("harmless", "helpful-honest")])
    from constitution.govern import Rule

    fallback = {refuse: next(Rule(c, p, "bench fallback") for c in gov.constitutions for p in c.principles
                             if p.stance and p.refuses == refuse) for refuse in (True, False)}
    s = Sampling(max_new_tokens=96, repetition_penalty=1.15, no_repeat_ngram=4)
    t0 = time.perf_counter()
    outs = engine.generate([[{"role": "user", "content": r["prompt"]}] for r in gold], s)
    dt = time.perf_counter() - t0
    pairs = []
    for r, o in zip(gold, outs, strict=True):
        harmful = r["kind"] == "harmful"
        plain = trim_to_sentence(o.text) if o.outputs[0].finish_reason == "length" else o.text.strip()
        rule = gov.rule(r.get("category"))
        rule = rule if rule is not None and rule.refuse == harmful else fallback[harmful]
        refusal = opening_for(r["id"], steering_texts(rule), 0)
        pairs.append((r, refusal, plain) if harmful else (r, plain, refusal))
    return _score_pairs(pairs, dt)


def revision(engine, gold: list[dict]) -> dict:
    from cai import sl_cai
    from cai.quality import trim_to_sentence
    from constitution.load import find, load_file
    from engines.base import Sampling

    c = load_file(find("harmless"))
    s = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=96, seed=0, repetition_penalty=1.15,
                 no_repeat_ngram=4)
    msgs = [[{"role": "user", "content": r["prompt"]}] for r in gold]
    t0 = time.perf_counter()
    initial = [o.text.strip() for o in engine.generate(msgs, s)]
    from constitution.govern import Governance

    gov = Governance([c])
    principles = []
    for r in gold:  # round 1 under the governing principle, as the generate flow does
        rule = gov.rule(r.get("category"))
        principles.append(sl_cai.draw_principle(c, 0, r["id"], 1, rule.principle.id if rule else None))
    crit = [o.text.strip() for o in engine.generate(
        [sl_cai.critique_conversation(c, m, a, p) for m, a, p in zip(msgs, initial, principles, strict=True)], s)]
    rev = engine.generate([sl_cai.revision_conversation(c, m, a, p, k) for m, a, p, k in
                           zip(msgs, initial, principles, crit, strict=True)], s)
    dt = time.perf_counter() - t0
    pairs = [(r, trim_to_sentence(o.text), a) for r, o, a in zip(gold, rev, initial, strict=True)]
    return _score_pairs(pairs, dt)


def judge_on_gold(engine, gold: list[dict], principles: int) -> dict:
    from cai import judge
    from constitution.load import find, load_file

    cons = {True: load_file(find("harmless")), False: load_file(find("helpful-honest"))}
    convs, meta = [], []
    for r in gold:
        c = cons[r["kind"] == "harmful"]
        prompt = [{"role": "user", "content": r["prompt"]}]
        for pref, _ in judge.draw_principles(c, 0, r["id"], principles):
            for order in judge.ORDERS:  # x = better, y = worse
                a, b = (r["better"], r["worse"]) if order == "xy" else (r["worse"], r["better"])
                convs.append(judge.answer_conversation(judge.judge_question(prompt, pref.question, a, b, 1200)))
                meta.append((r["id"], pref, order))
    t0 = time.perf_counter()
    scored = judge.score(engine, convs, [o for _, _, o in meta])
    priors = {p.id: judge.prior_a(engine, p.question, 1200) for _, p, _ in meta}
    dt = time.perf_counter() - t0
    out = {}
    for name, calibrated in (("judge_raw", False), ("judge_calibrated", True)):
        per: dict[str, list[tuple[str, str, float]]] = {}
        p_a = []
        for (rid, pref, order), sc in zip(meta, scored, strict=True):
            pa = judge.calibrate(sc.prob_a, priors[pref.id]) if calibrated else sc.prob_a
            p_a.append(pa)
            per.setdefault(rid, []).append((pref.id, order, judge.prob_x(order, pa)))
        labels = [judge.label_pair(js, min_margin=0.0) for js in per.values()]
        out[name] = {"pairs": len(labels), "accuracy": round(sum(lab.prob_x > 0.5 for lab in labels) / len(labels), 3),
                     "position_consistency": round(sum(lab.status != "position-inconsistent" for lab in labels)
                                                   / len(labels), 3),
                     "mean_p_a": round(sum(p_a) / len(p_a), 3), "s_per_pair": round(dt / len(labels), 3)}
    out["judge_priors"] = {k: round(v, 3) for k, v in sorted(priors.items())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--limit", type=int, default=None, help="first N gold items")
    ap.add_argument("--principles", type=int, default=2, help="judge principles per gold pair (both orders each)")
    args = ap.parse_args()
    from engines import load
    from engines.bundled import DEFAULT_SPEC

    gold = _gold(args.limit)
    engine = load(args.model or DEFAULT_SPEC, engine="hf")
    result = {"bench": "pairs", "model": args.model or DEFAULT_SPEC, "gold_items": len(gold),
              "harmful": sum(r["kind"] == "harmful" for r in gold),
              "engine": {"dtype": engine.stats.extra.get("dtype")}}
    result["contrastive"] = contrastive(engine, gold)
    result["revision"] = revision(engine, gold)
    result |= judge_on_gold(engine, gold, args.principles)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
