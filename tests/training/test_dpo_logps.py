"""training/logps.py: the chat template as at generation time, completion-only masking, padding,
truncation, and the fast (completion-positions-only) head against a plain forward."""

from __future__ import annotations

import pytest
import torch

import training.logps as logps_mod
from training.logps import (
    ChatEncoder,
    Encoded,
    batched_pair_logps,
    collate,
    collate_pairs,
    end_of_turn_text,
    sequence_logps,
)

PROMPT = [{"role": "user", "content": "How do I boil an egg?"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def manual_logp(model, seq: Encoded) -> float:
    """Sum of log p(token) over the completion tokens, from a direct forward over the sequence."""
    ids = torch.tensor([seq.prompt_ids + seq.completion_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
    n_p = len(seq.prompt_ids)
    return sum(logprobs[t - 1, ids[0, t]].item() for t in range(n_p, ids.shape[1]))


def test_prompt_and_completion_follow_the_chat_template(tiny):
    _, tok = tiny
    enc = ChatEncoder(tok, max_length=256, max_prompt_length=128)
    assert end_of_turn_text(tok) == "<|im_end|>\n"  # what SmolLM2's template writes after an answer
    seq = enc.encode(PROMPT, "Put it in boiling water.")
    # the prompt is exactly what an engine sends: template + generation prompt, no extra BOS
    assert list(seq.prompt_ids) == list(
        tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert tok.decode(seq.completion_ids) == "Put it in boiling water.<|im_end|>\n"
    full = tok.apply_chat_template(
        PROMPT + [{"role": "assistant", "content": "Put it in boiling water."}], tokenize=False
    )
    assert tok.decode(seq.prompt_ids + seq.completion_ids) == full
    assert not seq.truncated
    # a reply the token limit cut: the same text, but no end-of-turn to learn after it
    cut = enc.encode(PROMPT, "Put it in boiling water.", ended=False)
    assert tok.decode(cut.completion_ids) == "Put it in boiling water."
    assert cut.prompt_ids == seq.prompt_ids


def test_sequence_logp_is_the_sum_over_completion_tokens(tiny):
    model, tok = tiny
    enc = ChatEncoder(tok, max_length=256, max_prompt_length=128)
    seq = enc.encode(PROMPT, "Put it in boiling water for eight minutes.")
    with torch.no_grad():
        lp, n = sequence_logps(model, collate([seq], enc.pad_id))
    assert n.item() == len(seq.completion_ids)
    assert lp.item() == pytest.approx(manual_logp(model, seq), abs=1e-4)


def test_padding_does_not_change_the_logp(tiny):
    model, tok = tiny
    enc = ChatEncoder(tok, max_length=256, max_prompt_length=128)
    short = enc.encode(PROMPT, "Boil it.")
    long = enc.encode(
        [{"role": "user", "content": "Tell me, at some length, how to boil an egg well?"}],
        "Bring water to a boil, lower the egg in gently, wait eight minutes, then cool it.",
    )
    with torch.no_grad():
        alone = [sequence_logps(model, collate([s], enc.pad_id))[0].item() for s in (short, long)]
        both, n = sequence_logps(model, collate([short, long], enc.pad_id))
        assert collate([short, long], enc.pad_id)["attention_mask"][0].sum() < len(long)  # really padded
    assert both.tolist() == pytest.approx(alone, abs=1e-4)
    assert n.tolist() == [len(short.completion_ids), len(long.completion_ids)]


def test_fast_head_equals_the_models_own_forward_and_chunking(tiny, monkeypatch):
    model, tok = tiny
    enc = ChatEncoder(tok, max_length=256, max_prompt_length=128)
    batch = collate(
        [enc.encode(PROMPT, "Boil it."), enc.encode(PROMPT, "Eight minutes in boiling water.")], enc.pad_id
    )
    with torch.no_grad():
        fast, _ = sequence_logps(model, batch)
        monkeypatch.setattr(
            logps_mod, "_LOGIT_CHUNK_ELEMENTS", 3 * model.config.vocab_size
        )  # 3 tokens a chunk
        chunked, _ = sequence_logps(model, batch)
        monkeypatch.setattr(logps_mod, "_plain_head", lambda m: False)
        plain, _ = sequence_logps(model, batch)
    assert fast.tolist() == pytest.approx(plain.tolist(), abs=1e-4)
    assert chunked.tolist() == pytest.approx(plain.tolist(), abs=1e-4)


def test_truncation_keeps_prompt_end_and_answer_start_and_is_counted(tiny):
    model, tok = tiny
    enc = ChatEncoder(tok, max_length=48, max_prompt_length=32)
    long_prompt = [{"role": "user", "content": "word " * 100 + "Finally: how do I boil an egg?"}]
    seq = enc.encode(long_prompt, "Boil it.")
    assert seq.truncated and len(seq.prompt_ids) == 32
    full_prompt = enc.prompt_ids(long_prompt)
    assert seq.prompt_ids == full_prompt[-32:]  # the end, with the question and the generation prompt
    assert tok.decode(seq.prompt_ids).endswith("<|im_start|>assistant\n")

    seq2 = enc.encode(PROMPT, "Bring the water to a rolling boil, then " * 10)
    assert seq2.truncated and len(seq2) == 48
    full_completion = enc.completion_ids("Bring the water to a rolling boil, then " * 10)
    assert seq2.completion_ids == full_completion[: 48 - len(seq2.prompt_ids)]  # the start of the answer
    with torch.no_grad():
        lp, n = sequence_logps(model, collate([seq2], enc.pad_id))
    assert n.item() == len(seq2.completion_ids)
    assert lp.item() == pytest.approx(manual_logp(model, seq2), abs=1e-4)

    with pytest.raises(ValueError, match="max_prompt_length"):
        ChatEncoder(tok, max_length=32, max_prompt_length=32)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_pairs_equal_separate_sequences(tiny_model_dir, attn):
    """prompt + chosen + rejected in one row gives each answer exactly the log-prob it has alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=attn).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    enc = ChatEncoder(tok, max_length=256, max_prompt_length=128)
    other = [
        {"role": "user", "content": "And a much longer question, about poaching eggs in simmering water?"}
    ]
    pairs = [
        (enc.encode(PROMPT, "Boil it for eight minutes."), enc.encode(PROMPT, "No.")),
        (enc.encode(other, "Swirl the water."), enc.encode(other, "Crack it into simmering water, wait.")),
    ]
    with torch.no_grad():
        separate, n_sep = sequence_logps(
            model, collate([c for c, _ in pairs] + [r for _, r in pairs], enc.pad_id)
        )
        packed_batch = collate_pairs(pairs, enc.pad_id, additive_mask=attn == "eager")
        packed, n_pack = sequence_logps(model, packed_batch)
    assert packed_batch["input_ids"].shape[0] == 2  # one row per pair
    assert n_pack.tolist() == n_sep.tolist()
    assert packed.tolist() == pytest.approx(separate.tolist(), abs=1e-4)
    assert packed.tolist() == pytest.approx(
        [manual_logp(model, s) for s in (pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1])], abs=1e-4
    )
    # the no-grad path for reference log-probs: sorted, packed under a token budget, input order back
    values = batched_pair_logps(model, pairs + pairs[:1], enc.pad_id, max_batch_tokens=40)
    assert [v[0][0] for v in values] == pytest.approx(
        [separate[0].item(), separate[1].item(), separate[0].item()], abs=1e-4
    )
    assert [v[1][0] for v in values] == pytest.approx(
        [separate[2].item(), separate[3].item(), separate[2].item()], abs=1e-4
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packed", [False, True])
def test_a_shared_prefix_runs_once_with_the_same_logps_and_gradients(tiny_model_dir, attn, packed, monkeypatch):
    """Every chat row starts with the template's system turn and user header: those tokens go
    through the model once per batch, and log-probs and gradients are those of the full rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.logps import shared_prefix

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32,
                                                 attn_implementation=attn)
    enc = ChatEncoder(AutoTokenizer.from_pretrained(str(tiny_model_dir)), 256, 128)
    prompts = [[{"role": "user", "content": q}] for q in ("How do I boil an egg?", "Name three rivers.",
                                                         "Why is the sky blue, in one short paragraph?")]
    if packed:
        rows = [(enc.encode(p, "A short answer."), enc.encode(p, "No.")) for p in prompts]
        batch = collate_pairs(rows, enc.pad_id, additive_mask=attn == "eager")
    else:
        batch = collate([enc.encode(p, a) for p, a in zip(prompts, ("Boil it.", "Nile, Po, Rhine.", "Scattering."),
                                                         strict=True)], enc.pad_id)
    n = int(batch["prefix_len"])
    assert n == shared_prefix(batch["input_ids"], 100) >= 20  # the system turn and the user header
    results = {}
    for share in (True, False):
        monkeypatch.setattr(logps_mod, "SHARE_PREFIX", share)
        model.zero_grad()
        logps, counts = sequence_logps(model, batch)
        logps.sum().backward()
        results[share] = (logps.detach(), counts, {k: p.grad.clone() for k, p in model.named_parameters()})
    assert torch.equal(results[True][1], results[False][1])
    assert torch.allclose(results[True][0], results[False][0], atol=1e-4)
    for k, g in results[False][2].items():
        assert torch.allclose(results[True][2][k], g, atol=1e-4, rtol=1e-3), k
    # a batch whose rows share nothing (or too little) runs as one ordinary forward
    assert shared_prefix(torch.tensor([[1, 2, 3] * 4, [4, 5, 6] * 4]), 12) == 0
    assert shared_prefix(batch["input_ids"][:1], 100) == 0
