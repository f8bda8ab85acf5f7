"""training/loss.py against hand-computed values, and the gradient of the whole chain against
finite differences on a tiny float64 model."""

from __future__ import annotations

import math

import pytest
import torch

from training.logps import ChatEncoder, collate_pairs, sequence_logps
from training.loss import dpo_loss, pair_metrics, soft_label_smoothing


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def test_policy_equal_reference_gives_ln2_and_zero_rewards():
    lp_c, lp_r = t(-12.5, -3.0, -40.0), t(-9.0, -7.25, -41.0)
    losses, rc, rr = dpo_loss(lp_c, lp_r, lp_c.clone(), lp_r.clone(), beta=0.1)
    assert torch.equal(losses, torch.full((3,), math.log(2), dtype=torch.float64))
    assert torch.equal(rc, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(rr, torch.zeros(3, dtype=torch.float64))
    m = pair_metrics(losses, rc, rr, lp_c, lp_r)
    assert (
        m["loss"] == pytest.approx(math.log(2)) and m["rewards/margins"] == 0 and m["rewards/accuracies"] == 0
    )


# pi_c, pi_r, ref_c, ref_r: chosen log-ratio +2, rejected log-ratio -1, so h = 3
PI_C, PI_R, REF_C, REF_R = t(-10.0), t(-21.0), t(-12.0), t(-20.0)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps", "expected"),
    [
        ("sigmoid", 0.5, 0.0, -math.log(_sig(1.5))),
        ("sigmoid", 0.5, 0.2, -0.8 * math.log(_sig(1.5)) - 0.2 * math.log(_sig(-1.5))),
        ("ipo", 0.5, 0.0, (3 - 1.0) ** 2),
        ("ipo", 0.25, 0.1, 0.9 * (3 - 2.0) ** 2 + 0.1 * (-3 - 2.0) ** 2),
        ("hinge", 0.2, 0.0, 1 - 0.6),
        ("hinge", 0.5, 0.0, 0.0),  # βh = 1.5 > 1: no loss
        ("hinge", 0.2, 0.3, 0.7 * 0.4 + 0.3 * 1.6),
    ],
)
def test_loss_values_by_hand(loss_type, beta, eps, expected):
    losses, rc, rr = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert losses.item() == pytest.approx(expected, rel=1e-12)
    assert rc.item() == pytest.approx(beta * 2.0) and rr.item() == pytest.approx(beta * -1.0)


def test_per_pair_label_smoothing_from_label_prob():
    pi_c, pi_r = t(-10.0, -10.0, -10.0), t(-21.0, -21.0, -21.0)
    ref_c, ref_r = t(-12.0, -12.0, -12.0), t(-20.0, -20.0, -20.0)
    eps = soft_label_smoothing([1.0, 0.9, 0.6])
    assert eps.tolist() == pytest.approx([0.0, 0.1, 0.4])
    losses, _, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, label_smoothing=eps.double())
    bh = 0.3
    want = [-(1 - e) * math.log(_sig(bh)) - e * math.log(_sig(-bh)) for e in (0.0, 0.1, 0.4)]
    assert losses.tolist() == pytest.approx(want, rel=1e-7)
    # the same numbers pair by pair with a float
    for i, e in enumerate((0.0, 0.1, 0.4)):
        one, _, _ = dpo_loss(
            pi_c[i : i + 1], pi_r[i : i + 1], ref_c[i : i + 1], ref_r[i : i + 1], 0.1, "sigmoid", e
        )
        assert one.item() == pytest.approx(losses[i].item(), rel=1e-7)
    # a label past 1/2 would reverse the pair: clamp
    assert soft_label_smoothing([0.2]).item() == 0.5


def test_rewards_are_detached_and_loss_has_gradient():
    pi_c, pi_r = t(-10.0).requires_grad_(), t(-21.0).requires_grad_()
    losses, rc, rr = dpo_loss(pi_c, pi_r, REF_C, REF_R, beta=0.5)
    assert not rc.requires_grad and not rr.requires_grad
    losses.sum().backward()
    # d/dpi_c of -log σ(β h) = -β σ(-β h)
    assert pi_c.grad.item() == pytest.approx(-0.5 * _sig(-1.5))
    assert pi_r.grad.item() == pytest.approx(0.5 * _sig(-1.5))


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, label_smoothing=1.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_gradient_matches_finite_differences_on_a_tiny_model(tiny_model_dir, loss_type, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama import modeling_llama

    # HF's RMSNorm computes in float32 whatever the model dtype; that rounding noise swamps a
    # float64 finite difference, so the test model normalises in its own dtype
    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    enc = ChatEncoder(tok, max_length=64, max_prompt_length=48)
    prompt = [{"role": "user", "content": "Can you help me?"}]
    # the packed pair (prompt + chosen + rejected in one row), as the trainer runs it
    pair = (enc.encode(prompt, "No, sorry."), enc.encode(prompt, "Yes, gladly, here goes."))
    batch = collate_pairs([pair], enc.pad_id)
    ref_c, ref_r = t(-40.0), t(-35.0)  # made up, so the loss is not at a symmetric point
    beta = 0.05 if loss_type == "hinge" else 0.1  # keep the hinge in its linear part

    def loss() -> torch.Tensor:
        lp, _ = sequence_logps(model, batch)
        losses, _, _ = dpo_loss(
            lp[:1], lp[1:], ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=0.1
        )
        return losses.sum()

    model.zero_grad()
    loss().backward()
    params = dict(model.named_parameters())
    # a token of the chosen answer: its (tied) row is both an input embedding and an output weight. Not
    # the pad token: nn.Embedding(padding_idx=...) never sends gradient to that row from the input side.
    word = batch["targets"][0].item()
    assert word != enc.pad_id
    probes = [
        ("model.embed_tokens.weight", (word, 5)),
        ("model.layers.0.self_attn.q_proj.weight", (3, 7)),
        ("model.layers.1.mlp.down_proj.weight", (10, 20)),
        ("model.norm.weight", (11,)),
    ]
    # the IPO loss here is ~2e3, so at h=1e-6 float64 rounding alone is ~4e-7 of a 0.1 gradient (it failed on
    # one CPU); at 1e-4 rounding and the central difference's h^2 error are both far below the tolerance
    h = 1e-4
    for name, index in probes:
        p = params[name]
        with torch.no_grad():
            old = p[index].item()
            p[index] = old + h
            up = loss().item()
            p[index] = old - h
            down = loss().item()
            p[index] = old
        numeric = (up - down) / (2 * h)
        assert p.grad[index].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9), name
