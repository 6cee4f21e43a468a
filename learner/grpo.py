"""GRPO math as small pure functions: token log-probs, group advantages, the clipped loss with k3 KL, and
the truncated importance weights that correct for sampling with older (or numerically other) weights.

No processes, no Ray: the learner actor calls these. Shapes: B sequences (completions), T tokens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

ADVANTAGE_EPS = 1e-4


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log pi(token_t | prefix) for logits (B, T, V) that already predict token_ids (B, T)."""
    logits = logits.float()
    gathered = torch.gather(logits, -1, token_ids.unsqueeze(-1)).squeeze(-1)
    return gathered - torch.logsumexp(logits, dim=-1)


def group_advantages(
    rewards: torch.Tensor, mode: Literal["std", "mean_only"] = "std", eps: float = ADVANTAGE_EPS
) -> torch.Tensor:
    """Advantages for rewards (num_groups, G): (r - mean) / (std + eps), std unbiased.

    A group of one completion has no baseline to compare with: its advantage is 0.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (groups, generations), got shape {tuple(rewards.shape)}")
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    if mode == "mean_only":
        return centred
    if mode != "std":
        raise ValueError(f"mode must be 'std' or 'mean_only', got {mode!r}")
    return centred / (rewards.std(dim=1, unbiased=True, keepdim=True) + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1, >= 0.

    The log-ratio ref - logp is bounded above by `clamp` so one token cannot overflow exp. Only above: a
    token the policy has raised far over the reference (ref - logp << 0) costs about logp - ref, linear, and
    a lower bound would take away exactly the gradient that pulls such a token back.
    """
    log_ratio = torch.clamp(ref_logp - logp, max=clamp)
    return torch.exp(log_ratio) - log_ratio - 1.0


# Bound on a log importance ratio before exp, for the reported (untruncated) weights only.
MAX_LOG_IMPORTANCE_RATIO = 20.0


def truncated_importance_weights(
    policy_logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float
) -> torch.Tensor:
    """Per-token TIS weights min(pi / mu, cap) = exp(min(policy_logp - behaviour_logp, log cap)), detached.

    pi: a learner policy (pi_old, the policy before this batch's updates and the proximal policy of the
    clipped ratio, for the policy-gradient term; the current policy for the KL term); mu: the policy the
    rollout engine sampled with (older weights under asynchronous rollouts, and other numerics: bf16
    kernels, another attention implementation).
    """
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    log_ratio = (policy_logp - behaviour_logp).detach().double()
    return torch.exp(torch.clamp(log_ratio, max=math.log(cap)))


def off_policy_sums(
    old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> dict[str, float]:
    """Sums over the unmasked tokens, to be added over micro-batches and ranks before dividing
    (`off_policy_metrics`): the raw weight pi_old / mu, its max and min, the truncated weight and its square,
    the tokens truncated, |old_logp - behaviour_logp|, and the token count."""
    active = mask > 0
    log_ratio = (old_logp - behaviour_logp).detach().double()[active]
    raw = torch.exp(torch.clamp(log_ratio, max=MAX_LOG_IMPORTANCE_RATIO))
    applied = torch.clamp(raw, max=cap)
    return {
        "raw_sum": float(raw.sum()),
        "raw_max": float(raw.max()) if raw.numel() else 0.0,
        "raw_min": float(raw.min()) if raw.numel() else float("inf"),
        "applied_sum": float(applied.sum()),
        "applied_square_sum": float((applied * applied).sum()),
        "truncated": float((raw > cap).sum()),
        "gap_sum": float(log_ratio.abs().sum()),
        "tokens": float(raw.numel()),
    }


def off_policy_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The per-step metrics from summed `off_policy_sums`: mean, max and min of the raw weight pi_old / mu, the
    share of tokens truncated, the effective sample size of the applied weights as a fraction of the
    tokens ((sum w)^2 / (n sum w^2), 1 when every weight is equal), and mean |log pi_old - log mu|."""
    tokens = sums["tokens"]
    if tokens < 1:
        return {
            "is_weight_mean": 1.0,
            "is_weight_max": 1.0,
            "is_weight_min": 1.0,
            "truncated_fraction": 0.0,
            "ess": 1.0,
            "behaviour_logprob_gap": 0.0,
        }
    square_sum = sums["applied_square_sum"]
    return {
        "is_weight_mean": sums["raw_sum"] / tokens,
        "is_weight_max": sums["raw_max"],
        "is_weight_min": sums["raw_min"],
        "truncated_fraction": sums["truncated"] / tokens,
        "ess": sums["applied_sum"] ** 2 / (tokens * square_sum) if square_sum > 0 else 0.0,
        "behaviour_logprob_gap": sums["gap_sum"] / tokens,
    }


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: Literal["sequence_mean", "token_mean"],
    normalizer: float | None = None,
) -> torch.Tensor:
    """Reduce per-token values (B, T) under a padding mask.

    sequence_mean (published): mean over each sequence's tokens, then sum / normalizer
        (normalizer = number of sequences in the whole optimizer batch; default B).
    token_mean (DAPO, TRL, verl): sum over all tokens / normalizer
        (normalizer = number of tokens in the whole optimizer batch; default the tokens here).
    Passing the whole batch's normalizer keeps micro-batched gradient accumulation exact.
    """
    mask = mask.to(per_token.dtype)
    if mode == "sequence_mean":
        per_sequence = (per_token * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
        return per_sequence.sum() / (normalizer if normalizer is not None else per_token.shape[0])
    if mode == "token_mean":
        denominator = normalizer if normalizer is not None else mask.sum().clamp(min=1.0)
        return (per_token * mask).sum() / denominator
    raise ValueError(f"mode must be 'sequence_mean' or 'token_mean', got {mode!r}")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_clamp: float = 10.0,
    aggregation: Literal["sequence_mean", "token_mean"] = "sequence_mean",
    normalizer: float | None = None,
    behaviour_logp: torch.Tensor | None = None,
    tis_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO surrogate plus beta * k3 KL; returns (loss, metrics).

    per token: -w_pg * min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * w_kl * k3,
    ratio = exp(logp - old_logp), A the sequence's advantage. With the behaviour log-probs mu (off-policy
    correction) both terms are importance-weighted, detached:
      w_pg = min(pi_old / mu, tis_cap): the surrogate is an expectation under pi_old;
      w_kl = min(pi / mu, tis_cap): k3 estimates KL(pi || ref) only under pi itself. Unweighted on tokens
        drawn from mu its expectation is unbounded (a token pi pushed down that mu and ref still like
        weighs ref/pi); weighted, E_mu[w_kl k3] = KL(pi || ref) and E_mu[w_kl grad k3] is the on-policy
        gradient, wherever the weight is not truncated.
    With one update per batch pi = pi_old, so the two weights are equal. Without mu both are 1.

    Metrics: kl (the weighted estimate, what the loss uses), kl_unweighted, kl_clamped_fraction (tokens
    whose log-ratio hit kl_clamp: the estimate is biased there).
    """
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl_weights = torch.ones_like(logp)
    if behaviour_logp is not None:
        per_token = per_token * truncated_importance_weights(old_logp, behaviour_logp, tis_cap).to(logp.dtype)
        kl_weights = truncated_importance_weights(logp, behaviour_logp, tis_cap).to(logp.dtype)
    kl = k3_kl(logp, ref_logp, kl_clamp) if ref_logp is not None else torch.zeros_like(logp)
    if beta > 0:
        per_token = per_token + beta * kl_weights * kl
    loss = aggregate(per_token, mask, aggregation, normalizer)

    with torch.no_grad():
        active = mask > 0
        # The clipped branch is the one taken (and its gradient is zero) exactly here.
        clipped_here = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
        ntok = active.sum().clamp(min=1)
        masked_ratio = ratio[active]
        kl_clamped = (ref_logp - logp) > kl_clamp if ref_logp is not None else torch.zeros_like(active)
        metrics = {
            "loss": float(loss.detach()),
            "kl": float((kl_weights * kl * mask).sum() / ntok),
            "kl_unweighted": float((kl * mask).sum() / ntok),
            "kl_clamped_fraction": float((kl_clamped & active).sum() / ntok),
            "clip_fraction": float((clipped_here & active).sum() / ntok),
            "ratio_min": float(masked_ratio.min()) if masked_ratio.numel() else 1.0,
            "ratio_mean": float(masked_ratio.mean()) if masked_ratio.numel() else 1.0,
            "ratio_max": float(masked_ratio.max()) if masked_ratio.numel() else 1.0,
            "num_tokens": float(active.sum()),
        }
    return loss, metrics
