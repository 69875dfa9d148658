"""Preference losses as a table of pure functions over log-ratios.

Each takes h = (pi_c - ref_c) - (pi_r - ref_r), the difference of the policy's and the reference's
log-ratios, and returns the per-pair loss; a loss that also needs per-response safety labels
(BFPO) says so in its row and receives them as `safety`. LOSSES is the table `dpo.loss_type`
chooses from: a new loss is its function and row here plus its name in
prefvec_ds.config.choices.LossType (config cannot import train; tests/unit/test_choices.py checks
that both agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from prefvec_ds.config.choices import LossType


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); label_smoothing > 0 is conservative DPO (cDPO)."""
    return (-F.logsigmoid(beta * h) * (1 - label_smoothing)
            - F.logsigmoid(-beta * h) * label_smoothing)


def ipo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al. 2023): regress the log-ratio gap to 1/(2*beta); beta acts as tau."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SLiC-style hinge on the scaled gap: zero once beta*h passes 1."""
    return torch.relu(1 - beta * h)


@dataclass(frozen=True)
class SafetyLabels:
    """Per-pair 0/1 safety labels of the chosen and rejected responses, and BFPO's constants
    (dpo.bfpo_b1, dpo.bfpo_alpha)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    b1: float
    alpha: float


def bfpo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0, *,
              safety: SafetyLabels) -> torch.Tensor:
    """BFPO (Zhang et al., ICLR 2025): regress h to a target set by the responses' safety.

    The pair is ordered by helpfulness; with b3 = 1/(b1 - 1) the target is
    (b1*b3*s_c - b3*s_r - alpha) / beta for safety labels s in {0, 1}: with b1 3, alpha 0.5
    +10 (chosen safe, rejected unsafe), +5 (both safe), -5 (neither), -10 (only the rejected
    safe) at beta 0.1, so an unsafe helpful answer is pushed below its safe alternative.
    """
    b1, b3 = safety.b1, 1.0 / (safety.b1 - 1.0)
    s_c, s_r = safety.chosen.to(h.dtype), safety.rejected.to(h.dtype)
    return (h - (b1 * b3 * s_c - b3 * s_r - safety.alpha) / beta) ** 2


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., torch.Tensor]
    average_logps: bool
    """IPO is defined on per-token average log-probs; DPO and hinge on sums."""
    needs_safety: bool = False
    """The loss reads each pair's chosen_safe / rejected_safe labels (PKU-SafeRLHF's
    is_response_X_safe, or the embedded data's)."""


LOSSES: dict[LossType, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, average_logps=False),
    "ipo": LossSpec(ipo_loss, average_logps=True),
    "hinge": LossSpec(hinge_loss, average_logps=False),
    "bfpo": LossSpec(bfpo_loss, average_logps=False, needs_safety=True),
}


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
                    loss_type: LossType = "sigmoid", label_smoothing: float = 0.0,
                    safety: SafetyLabels | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the pairs and TRL-named metrics (detached, per-batch means).

    rewards/chosen = beta * (pi_c - ref_c) is DPO's implicit reward; accuracies is the fraction
    of pairs whose chosen reward is higher.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected one of {', '.join(LOSSES)}")
    spec = LOSSES[loss_type]
    if spec.needs_safety and safety is None:
        raise ValueError(f"loss_type {loss_type!r} needs the pairs' safety labels")
    extra = {"safety": safety} if spec.needs_safety else {}
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = spec.fn(chosen_ratio - rejected_ratio, beta, label_smoothing, **extra)
    rc, rr = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
        "rewards/margins": (rc - rr).mean(), "rewards/accuracies": (rc > rr).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return losses.mean(), metrics
