"""DPO-family losses on summed sequence log-probs, and the per-pair metrics we log.

    losses, chosen_rewards, rejected_rewards = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)

With h = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x)):

    sigmoid  −log σ(βh)            DPO (Rafailov et al. 2023)
    ipo      (h − 1/(2β))²          IPO (Azar et al. 2023), on summed log-probs as written in the paper
    hinge    relu(1 − βh)           SLiC-style hinge

plus, with rpo_alpha = α > 0, α times the chosen reply's mean token NLL (RPO).

Label smoothing ε reads as "this label is flipped with probability ε": the loss becomes
(1 − ε)·ℓ(h) + ε·ℓ(−h). For `sigmoid` that is exactly conservative DPO,
−(1 − ε)·log σ(βh) − ε·log σ(−βh). ε may be one float or one value per pair: an AI-feedback
pair labelled with P(chosen better) = p trains with ε = 1 − p, so a 55/45 judgment pulls the
policy far less than a confident one. IPO's minimum then moves from h = 1/(2β) to
(1 − 2ε)/(2β), and ε = ½ asks for no preference at all, which is what a coin-flip label means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.config import LOSS_TYPES


def _per_pair(loss_type: str, h: torch.Tensor, beta: float) -> torch.Tensor:
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * h)
    raise ValueError(f"unknown loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")


def dpo_loss(
    pi_logp_c: torch.Tensor,
    pi_logp_r: torch.Tensor,
    ref_logp_c: torch.Tensor,
    ref_logp_r: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | torch.Tensor = 0.0,
    rpo_alpha: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards β·(log π − log π_ref) (detached) for chosen and rejected.

    All inputs are 1-D tensors with one entry per pair. The caller averages the losses, so
    gradient accumulation and per-pair weights stay its decision. `rpo_alpha` > 0 adds RPO's term
    (Pang et al. 2024): α times the chosen reply's mean token NLL, −log π(y_c|x) / `chosen_tokens`,
    which keeps the chosen reply's likelihood from falling while the margin grows (how DPO on
    small data degenerates).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    ref_logp_c = ref_logp_c.to(pi_logp_c.dtype)
    ref_logp_r = ref_logp_r.to(pi_logp_r.dtype)
    chosen_logratio = pi_logp_c - ref_logp_c
    rejected_logratio = pi_logp_r - ref_logp_r
    h = chosen_logratio - rejected_logratio

    losses = _per_pair(loss_type, h, beta)
    eps = label_smoothing
    if isinstance(eps, torch.Tensor):
        eps = eps.to(device=h.device, dtype=h.dtype)
        if bool((eps < 0).any() or (eps > 1).any()):
            raise ValueError("label_smoothing must lie in [0, 1] for every pair")
        if bool((eps != 0).any()):
            losses = (1.0 - eps) * losses + eps * _per_pair(loss_type, -h, beta)
    else:
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {eps}")
        if eps:
            losses = (1.0 - eps) * losses + eps * _per_pair(loss_type, -h, beta)
    if rpo_alpha:
        if chosen_tokens is None:
            raise ValueError("rpo_alpha needs chosen_tokens: the chosen replies' token counts")
        losses = losses + rpo_alpha * (-pi_logp_c / chosen_tokens.clamp(min=1).to(pi_logp_c.dtype))

    chosen_rewards = beta * chosen_logratio.detach()
    rejected_rewards = beta * rejected_logratio.detach()
    return losses, chosen_rewards, rejected_rewards


def soft_label_smoothing(label_probs: list[float] | torch.Tensor) -> torch.Tensor:
    """Per-pair ε = 1 − P(chosen better), clamped to [0, ½]: past ½ the pair would be reversed."""
    p = torch.as_tensor(label_probs, dtype=torch.float32)
    return (1.0 - p).clamp(0.0, 0.5)


def pair_metrics(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    pi_logp_c: torch.Tensor,
    pi_logp_r: torch.Tensor,
) -> dict[str, float]:
    """Batch means of what TRL users expect to see, under the same names (so dashboards compare)."""
    margins = chosen_rewards - rejected_rewards
    return {
        "loss": losses.detach().mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "logps/chosen": pi_logp_c.detach().mean().item(),
        "logps/rejected": pi_logp_r.detach().mean().item(),
    }
