"""The SPIN loss (Chen et al. 2024, eq. 4.7), the SFT baseline's loss, and the summed response
log-probs both are made of."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log p(token) of every response token, 0 on prompt and padding; [batch, length - 1].

    logits[:, i] predicts input_ids[:, i + 1], so the mask is shifted the same way."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1) * response_mask[:, 1:]


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over response tokens only. Summed, not averaged, as in the paper: a
    longer response is a less likely one."""
    return token_logps(logits, input_ids, response_mask).sum(-1)


def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (losses, real_rewards, generated_rewards); rewards are beta * (policy - ref)."""
    real_logratios = policy_real_logps - ref_real_logps
    generated_logratios = policy_generated_logps - ref_generated_logps
    logits = real_logratios - generated_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        # IPO (Azar et al. 2023) regresses the margin to 1/(2 beta) instead of pushing it to infinity.
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: use sigmoid, hinge or ipo")
    return losses, beta * real_logratios.detach(), beta * generated_logratios.detach()


def sft_loss(real_logps: torch.Tensor, real_tokens: torch.Tensor) -> torch.Tensor:
    """The baseline's loss: negative log-likelihood per real response token, over the micro batch
    (the usual SFT normalization, as in TRL and the official SPIN's SFT stage)."""
    return -real_logps.sum() / real_tokens.sum()


def spin_metrics(
    losses: torch.Tensor,
    real_rewards: torch.Tensor,
    generated_rewards: torch.Tensor,
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    identical: torch.Tensor,
    lengths: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, float]:
    """The DPO-style metrics users compare across TRL, OpenRLHF and the official SPIN code, and
    where SPIN's signal comes from: a pair whose y' equals y (`identical`) has margin 0 and no
    gradient, so its accuracy is "cannot tell", not "told wrong". The `*_distinct` figures are
    over the other pairs, as shares of the whole batch: `stages.distinct_only` makes them means."""
    margins = real_rewards - generated_rewards
    distinct = (~identical).float()
    return {
        "loss": losses.mean().item(),
        "rewards/real": real_rewards.mean().item(),
        "rewards/generated": generated_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "rewards/margins_distinct": (margins * distinct).mean().item(),
        "rewards/accuracies_distinct": ((margins > 0).float() * distinct).mean().item(),
        "pairs/identical": identical.float().mean().item(),
        "logps/real": policy_real_logps.detach().mean().item(),
        "logps/generated": policy_generated_logps.detach().mean().item(),
        "lengths/real": lengths[0].float().mean().item(),
        "lengths/generated": lengths[1].float().mean().item(),
        "pairs": float(len(losses)),  # the weight of these means where batches are averaged
    }
