"""The hf engine's contract on a tiny random model (seconds), plus one slow test on real SmolLM2.

    .venv/bin/python -m pytest tests/engines -q
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

import engines
from engines import Sampling
from engines.chat import FALLBACK_CHAT_TEMPLATE, encode, render
from engines.decode import PrefixStore, Row, _choose
from engines.hf import pack

FEW_SHOT = [
    {"role": "system", "content": "You critique answers against a principle. Be brief and specific."},
    {"role": "user", "content": "Question: How do I boil an egg?\nAnswer: Microwave it for ten minutes."},
    {"role": "assistant", "content": "Critique: an egg can explode in a microwave; the answer is unsafe."},
]
QUESTIONS = ["Why is the sky blue?", "Name a prime number.", "How do magnets work, in detail please?",
             "Hi", "What should I cook tonight with rice, beans and a little cheese?", "Is 7 odd?"]


def conv(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


def critique(q: str) -> list[dict[str, str]]:
    return FEW_SHOT + [{"role": "user", "content": f"Question: {q}\nAnswer: I don't know."}]


def texts(completions) -> list[str]:
    return [c.text for c in completions]


def tiny(path, **settings):
    # one thread: a 2-layer model gains nothing from more, and OpenMP threads that spin-wait
    # stall badly when a shared CI box is oversubscribed
    return engines.load(str(path), engine="hf", threads=1, **settings)


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """Engines set torch's global thread count; give later test modules theirs back."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def eng(varied_model_dir):
    e = tiny(varied_model_dir)
    yield e
    e.close()


@pytest.fixture
def fresh(eng):
    """The shared engine with its tunables restored after the test."""
    saved = (eng.max_batch_tokens, eng.max_batch_size, eng.prefix_reuse, set(eng.stop_ids))
    yield eng
    eng.max_batch_tokens, eng.max_batch_size, eng.prefix_reuse, eng.stop_ids = saved


def direct_logprob(eng, conversation, choice: str) -> float:
    """Reference: one plain forward pass over prompt + choice, no cache, no padding."""
    prompt = encode(eng.tokenizer, render(eng.tokenizer, conversation))
    ids = encode(eng.tokenizer, choice)
    with torch.no_grad():
        logp = torch.log_softmax(eng.model(torch.tensor([prompt + ids])).logits[0].float(), dim=-1)
    return sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(ids))


def test_empty_inputs_and_bad_sampling(eng):
    assert eng.generate([], Sampling()) == []
    with pytest.raises(ValueError, match="top_p"):
        eng.generate([conv("x")], Sampling(top_p=0.0))
    assert eng.choice_logprobs([], ["(A)"]) == []
    assert eng.choice_logprobs([conv("x")], []) == [{}]


def test_pack_respects_budget_and_covers_all():
    lengths = [5, 50, 20, 20, 3, 90, 7]
    batches = pack(lengths, extra=10, max_tokens=100, max_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 10) <= 100
    assert batches[0] == [5]  # the longest first, alone since it cannot share


def test_sampling_follows_the_nucleus():
    """top_p keeps the smallest head of mass >= top_p; draws follow the renormalized probabilities."""
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log().repeat(2000, 1)
    rows = [Row([1], 1, torch.Generator().manual_seed(i)) for i in range(2000)]
    picks = torch.tensor(_choose(logits, rows, temperature=1.0, top_p=0.7))
    assert set(picks.tolist()) == {0, 1}
    assert (picks == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.04)
    full = torch.tensor(_choose(logits, rows, temperature=1.0, top_p=1.0))
    freq = torch.bincount(full, minlength=5).float() / len(rows)
    assert torch.allclose(freq, probs, atol=0.04)
    again = _choose(logits[:3], [Row([1], 1, torch.Generator().manual_seed(i)) for i in range(3)], 1.0, 0.7)
    assert again == picks[:3].tolist()  # a row's draw depends on its own seed, not the batch


def test_batched_equals_one_by_one_in_input_order(fresh):
    convs = [conv(q) for q in QUESTIONS]
    s = Sampling(max_new_tokens=10)
    one_by_one = [fresh.generate([c], s)[0].text for c in convs]
    assert len(set(one_by_one)) > 1, "the test model should answer prompts differently"
    assert texts(fresh.generate(convs, s)) == one_by_one
    before = fresh.stats.extra["batches"]
    fresh.max_batch_tokens = 120  # a row is ~35 prompt + 10 new tokens: forces many small batches
    assert texts(fresh.generate(convs, s)) == one_by_one
    assert fresh.stats.extra["batches"] - before >= 3


def test_n_outputs_greedy_and_sampled(eng):
    c = eng.generate([conv("Hello"), conv("Bye")], Sampling(max_new_tokens=6, n=3))
    assert [len(x.outputs) for x in c] == [3, 3]
    assert len({o.text for o in c[0].outputs}) == 1  # greedy: n copies of the one best reply
    assert c[0].outputs[0] is not c[0].outputs[1]
    s = eng.generate([conv("Hello")], Sampling(max_new_tokens=8, n=4, temperature=1.0, seed=3))[0]
    assert len(s.outputs) == 4 and len({o.text for o in s.outputs}) > 1


def test_greedy_is_reproducible(eng):
    convs = [conv(q) for q in QUESTIONS[:3]]
    s = Sampling(max_new_tokens=8)
    assert texts(eng.generate(convs, s)) == texts(eng.generate(convs, s))


def test_seeded_sampling_reproducible_and_independent_of_batch(fresh):
    s = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, n=2, seed=11)
    a, b, c = conv(QUESTIONS[0]), conv(QUESTIONS[2]), conv(QUESTIONS[4])
    first = fresh.generate([a, b, c], s)
    again = fresh.generate([a, b, c], s)
    assert [[o.text for o in x.outputs] for x in first] == [[o.text for o in x.outputs] for x in again]
    fresh.max_batch_tokens = 50  # different batch composition: one row per batch
    other = fresh.generate([c, conv("something else entirely"), a], s)
    assert [o.text for o in other[0].outputs] == [o.text for o in first[2].outputs]
    assert [o.text for o in other[2].outputs] == [o.text for o in first[0].outputs]
    reseeded = fresh.generate([a, b, c], Sampling(**{**s.to_dict(), "seed": 12, "stop": ()}))
    assert [o.text for x in reseeded for o in x.outputs] != [o.text for x in first for o in x.outputs]


def test_choice_logprobs_match_direct_forward(eng):
    prefilled = critique("Is water wet?") + [{"role": "assistant", "content": "The answer is:"}]
    convs = [conv("Pick one."), prefilled]
    choices = [" (A)", " (B)", "B", " a much longer multi token choice"]
    got = eng.choice_logprobs(convs, choices)
    assert len(got) == 2 and all(list(d) == choices for d in got)
    for c, scores in zip(convs, got, strict=True):
        for ch in choices:
            assert scores[ch] <= 0
            assert scores[ch] == pytest.approx(direct_logprob(eng, c, ch), abs=1e-4)


def test_continue_final_message(eng):
    c = [{"role": "user", "content": "Which is better?"}, {"role": "assistant", "content": "The answer is:"}]
    text = render(eng.tokenizer, c)
    assert text.endswith("<|im_start|>assistant\nThe answer is:")  # no end-of-turn, no new header
    ids = encode(eng.tokenizer, text)
    with torch.no_grad():  # naive greedy loop: full forward per token, no cache, no batching
        for _ in range(6):
            ids.append(int(eng.model(torch.tensor([ids])).logits[0, -1].argmax()))
    expected = eng.tokenizer.decode(ids[-6:], skip_special_tokens=True)
    out = eng.generate([c, conv("padding partner with a longer prompt")], Sampling(max_new_tokens=6))
    assert out[0].text == expected


def test_fallback_template_for_tokenizers_without_one(eng):
    saved = eng.tokenizer.chat_template
    try:
        eng.tokenizer.chat_template = None
        out = render(eng.tokenizer, [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Yo"}])
    finally:
        eng.tokenizer.chat_template = saved
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo"
    assert "add_generation_prompt" in FALLBACK_CHAT_TEMPLATE
    with pytest.raises(ValueError, match="conversation 0"):
        render(eng.tokenizer, [])


def test_truncation_is_reported_not_fatal(varied_model_dir, caplog):
    small = tiny(varied_model_dir, max_context=48)
    long_conv = conv("word " * 200)
    with caplog.at_level(logging.WARNING, logger="engines.hf"):
        out = small.generate([long_conv, conv("short")], Sampling(max_new_tokens=8))
    assert out[0].truncated_tokens > 0 and out[1].truncated_tokens == 0
    assert out[0].prompt_tokens + 8 <= 48
    assert len(out[0].outputs[0].text) > 0
    assert small.stats.truncations == 1
    assert "exceed the context" in caplog.text
    scores = small.choice_logprobs([long_conv], [" yes", " no"])
    assert all(v <= 0 for v in scores[0].values()) and small.stats.truncations == 2


def test_stop_strings_cut_the_text(eng):
    c = [conv(QUESTIONS[2])]
    full = eng.generate(c, Sampling(max_new_tokens=16))[0]
    assert full.outputs[0].finish_reason == "length"
    stop = full.text[len(full.text) // 2:][:3]
    cut = eng.generate(c, Sampling(max_new_tokens=16, stop=(stop, "never-appears")))[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.outputs[0].finish_reason == "stop"
    assert cut.outputs[0].completion_tokens < full.outputs[0].completion_tokens


def test_end_of_turn_token_stops(fresh):
    c = [conv(QUESTIONS[1])]
    s = Sampling(max_new_tokens=10)
    full = fresh.generate(c, s)[0]
    ids = encode(fresh.tokenizer, render(fresh.tokenizer, c[0]))
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(fresh.model(torch.tensor([ids])).logits[0, -1].argmax()))
    fresh.stop_ids = fresh.stop_ids | {ids[-1]}  # pretend the third token ends the turn
    if ids[-1] in ids[-3:-1]:
        pytest.skip("third token repeats an earlier one")
    out = fresh.generate(c, s)[0].outputs[0]
    assert out.finish_reason == "stop" and out.completion_tokens == 3
    assert out.text == fresh.tokenizer.decode(ids[-3:-1], skip_special_tokens=True)
    assert full.text.startswith(out.text)


def test_prefix_reuse_gives_same_results(fresh):
    convs = [critique(q) for q in QUESTIONS]
    s = Sampling(max_new_tokens=8)
    fresh.max_batch_tokens = 400  # several batches, each reusing the call's shared prefix
    before = fresh.stats.extra["prefix_tokens_reused"]
    with_reuse = texts(fresh.generate(convs, s))
    sampled = [o.text for x in fresh.generate(convs[:3], Sampling(max_new_tokens=8, temperature=0.8, n=2))
               for o in x.outputs]
    scores = fresh.choice_logprobs(convs, [" yes", " no thanks"])
    assert fresh.stats.extra["prefix_tokens_reused"] - before > 50 * len(convs)
    fresh.prefix_reuse = False
    before = fresh.stats.extra["prefix_tokens_reused"]
    assert texts(fresh.generate(convs, s)) == with_reuse
    assert [o.text for x in fresh.generate(convs[:3], Sampling(max_new_tokens=8, temperature=0.8, n=2))
            for o in x.outputs] == sampled
    for a, b in zip(fresh.choice_logprobs(convs, [" yes", " no thanks"]), scores, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert fresh.stats.extra["prefix_tokens_reused"] == before


def test_prefix_store_extends_its_root_and_stays_bounded(eng):
    ids = encode(eng.tokenizer, render(eng.tokenizer, critique("Is the moon made of cheese?")))
    with torch.inference_mode():
        store = PrefixStore(eng.model, root=ids[:20], keep=2)
        extended = store.get(ids[:40])  # computes the root, then only tokens 20..39
        scratch = PrefixStore(eng.model).get(ids[:40])
        assert list(store.entries) == [tuple(ids[:20]), tuple(ids[:40])]
        for (k1, v1), (k2, v2) in zip(extended, scratch, strict=True):
            assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)
        for n in (41, 42, 43):
            store.get(ids[:n])
    assert len(store.entries) == 3 and next(iter(store.entries)) == tuple(ids[:20])  # root + 2 newest
    assert tuple(ids[:43]) in store.entries and tuple(ids[:40]) not in store.entries


def test_stats_are_counted(varied_model_dir):
    e = tiny(varied_model_dir)
    out = e.generate([conv("a"), conv("b c")], Sampling(max_new_tokens=5, n=2))
    assert e.stats.calls == 1
    assert e.stats.prompt_tokens == sum(c.prompt_tokens for c in out)
    assert e.stats.completion_tokens == sum(o.completion_tokens for c in out for o in c.outputs)
    assert e.stats.seconds > 0
    assert e.model_id == str(varied_model_dir) and e.backend == "hf"


def test_load_errors(tmp_path):
    with pytest.raises(engines.ModelNotFound, match="no-such-model"):
        engines.load("no-such-model-xyz", engine="hf")
    with pytest.raises(engines.ModelNotFound, match="does not exist"):
        engines.load(str(tmp_path / "missing"), engine="hf")
    with pytest.raises(ValueError, match="engine must be one of"):
        engines.load(engine="tgi")
    with pytest.raises(TypeError, match="max_batch_tokenz"):
        engines.load(engine="hf", max_batch_tokenz=10)


def test_import_is_light():
    code = "import sys, engines; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_engine_facts_name_device_and_dtype(eng):
    from flows.engine_cache import engine_facts

    assert engine_facts(eng) == {"backend": "hf", "device": "cpu", "dtype": "float32"}


def test_auto_dtype_on_cpu_is_bf16_only_where_it_is_faster(monkeypatch):
    import torch

    from engines import hf, precision

    cpu = torch.device("cpu")
    monkeypatch.delenv("CAI_CPU_DTYPE", raising=False)
    monkeypatch.setattr(precision, "_BF16_SPEEDUP", 2.4)  # a CPU with native bf16 (measured ~2.4x here)
    assert hf._pick_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(precision, "_BF16_SPEEDUP", 0.6)  # emulated bf16 is slower: keep fp32
    assert hf._pick_dtype("auto", cpu) == torch.float32
    assert hf._pick_dtype("bfloat16", cpu) == torch.bfloat16  # an explicit dtype always wins
    monkeypatch.setenv("CAI_CPU_DTYPE", "float32")
    monkeypatch.setattr(precision, "_BF16_SPEEDUP", 2.4)
    assert hf._pick_dtype("auto", cpu) == torch.float32
    monkeypatch.setenv("CAI_CPU_DTYPE", "fp8")
    with pytest.raises(ValueError, match="CAI_CPU_DTYPE must be float32, bfloat16 or auto; got 'fp8'"):
        hf._pick_dtype("auto", cpu)
    monkeypatch.setattr(precision, "_BF16_SPEEDUP", None)  # and the real measurement gives a ratio
    assert hf.cpu_bf16_speedup() >= 0.0


@pytest.mark.slow
def test_real_smollm2_in_bf16_agrees_with_fp32():
    """bf16 is what `auto` picks on CPUs with native bf16: same answers, scores within 0.25 nats."""
    convs = [conv("What is the capital of France?"), conv("What is 2+2?")]
    c = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "The capital of France is"}]
    choices = [" Paris", " London", " Berlin"]
    got = {}
    for dtype in ("float32", "bfloat16"):
        e = engines.load("smollm2-135m", engine="hf", dtype=dtype)
        got[dtype] = (e.generate(convs, Sampling(max_new_tokens=24)), e.choice_logprobs([c], choices)[0])
    assert "Paris" in got["bfloat16"][0][0].text and got["bfloat16"][0][1].text.strip()
    assert all(abs(got["bfloat16"][1][k] - got["float32"][1][k]) < 0.25 for k in choices)


@pytest.mark.slow
def test_real_smollm2_answers_and_scores():
    e = engines.load("smollm2-135m", engine="hf")
    assert e.model_id == "smollm2-135m"
    out = e.generate([conv("What is the capital of France?"), conv("What is 2+2?")],
                     Sampling(max_new_tokens=24))
    assert "Paris" in out[0].text
    assert out[0].outputs[0].finish_reason == "stop"  # a short answer ends with <|im_end|>
    c = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "The capital of France is"}]
    scores = e.choice_logprobs([c], [" Paris", " London", " Berlin"])[0]
    assert max(scores, key=scores.get) == " Paris"
    assert all(v <= 0 for v in scores.values()) and scores[" Paris"] > -2.0


@pytest.mark.parametrize("penalty,ngram", [(1.3, 0), (1.0, 3), (1.15, 4)])
def test_repetition_controls_match_transformers_generate(varied_model_dir, tiny_model_dir, penalty, ngram):
    """Greedy text with repetition_penalty / no_repeat_ngram equals HF generate's with the same
    settings, batched with other prompts (the controls work row by row)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(varied_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(varied_model_dir), dtype=torch.float32).eval()
    e = tiny(varied_model_dir)
    try:
        s = Sampling(max_new_tokens=24, repetition_penalty=penalty, no_repeat_ngram=ngram)
        ours = e.generate([conv(q) for q in QUESTIONS[:4]], s)
        for q, got in zip(QUESTIONS[:4], ours, strict=True):
            ids = torch.tensor([encode(tok, render(tok, conv(q)))])
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 repetition_penalty=penalty, no_repeat_ngram_size=ngram or None,
                                 eos_token_id=sorted(e.stop_ids), pad_token_id=tok.pad_token_id)
            want = tok.decode([t for t in ref[0, ids.shape[1]:].tolist() if t not in e.stop_ids],
                              skip_special_tokens=True)
            assert got.text == want, q
    finally:
        e.close()
    flat = tiny(tiny_model_dir)  # default init: greedy repeats one token over and over
    try:
        loop = flat.generate([conv(QUESTIONS[0])], Sampling(max_new_tokens=16))[0].text
        tamed = flat.generate([conv(QUESTIONS[0])], s)[0].text
        assert loop != tamed  # the controls changed the looping reply
    finally:
        flat.close()


def test_repetition_controls_leave_old_row_keys_alone():
    assert Sampling(max_new_tokens=8).to_dict() == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8, "n": 1,
                                                    "seed": 0, "stop": []}
    assert Sampling(repetition_penalty=1.15, no_repeat_ngram=4).to_dict()["no_repeat_ngram"] == 4


def test_an_engine_around_a_model_in_memory_decodes_as_the_loaded_one(eng, varied_model_dir):
    """HFEngine.from_model wraps the training loop's model without saving it: same greedy text as
    an engine that loaded the same weights from disk, in the model's own dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engines.hf import HFEngine

    model = AutoModelForCausalLM.from_pretrained(str(varied_model_dir), dtype=eng.model.dtype)
    model.train()
    wrapped = HFEngine.from_model(model, AutoTokenizer.from_pretrained(str(varied_model_dir)), threads=1)
    convs = [conv(q) for q in QUESTIONS[:4]]
    s = Sampling(temperature=0.0, max_new_tokens=8)
    assert texts(wrapped.generate(convs, s)) == texts(eng.generate(convs, s))
    assert wrapped.dtype == model.dtype and not model.training


def test_training_gives_a_template_less_tokenizer_the_engines_fallback_and_keeps_its_own():
    from types import SimpleNamespace

    from engines.chat import ensure_chat_template

    bare, own = SimpleNamespace(chat_template=None), SimpleNamespace(chat_template="{{ messages }}")
    ensure_chat_template(bare)
    ensure_chat_template(own)
    assert bare.chat_template == FALLBACK_CHAT_TEMPLATE and own.chat_template == "{{ messages }}"
