"""GRPO math against plain loops written from the formulas, plus its behaviour under an optimizer."""

import math

import pytest
import torch

from learner.grpo import (
    aggregate,
    group_advantages,
    grpo_loss,
    k3_kl,
    off_policy_metrics,
    off_policy_sums,
    token_logprobs,
    truncated_importance_weights,
)


def reference_advantages(rewards, mode):
    out = []
    for group in rewards:
        n = len(group)
        mean = sum(group) / n
        if n < 2:
            out.append([0.0] * n)
            continue
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1))
        out.append([(r - mean) / (std + 1e-4) if mode == "std" else r - mean for r in group])
    return torch.tensor(out, dtype=torch.float64)


def reference_loss(logp, old, ref, adv, mask, beta, eps_low, eps_high, aggregation, behaviour=None, cap=None):
    """One loop per token, straight from the published objective; with behaviour log-probs mu, each token's
    policy-gradient term is scaled by min(pi_old / mu, cap) and its KL term by min(pi / mu, cap)."""
    per_seq, total, ntok = [], 0.0, 0
    for b in range(len(logp)):
        seq_sum, seq_n = 0.0, 0
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            surrogate = min(ratio * adv[b], min(max(ratio, 1 - eps_low), 1 + eps_high) * adv[b])
            d = ref[b][t] - logp[b][t]
            kl = math.exp(d) - d - 1
            if behaviour is not None:
                surrogate *= min(math.exp(old[b][t] - behaviour[b][t]), cap)
                kl *= min(math.exp(logp[b][t] - behaviour[b][t]), cap)
            value = -surrogate + beta * kl
            seq_sum += value
            seq_n += 1
        per_seq.append(seq_sum / max(seq_n, 1))
        total += seq_sum
        ntok += seq_n
    if aggregation == "sequence_mean":
        return sum(per_seq) / len(per_seq)
    return total / ntok


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("mode", ["std", "mean_only"])
def test_group_advantages_match_reference(seed, mode):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.rand(5, 6, generator=gen, dtype=torch.float64) * 3
    torch.testing.assert_close(
        group_advantages(rewards, mode), reference_advantages(rewards.tolist(), mode), rtol=1e-12, atol=1e-12
    )


def test_group_advantages_zero_variance_and_group_of_one():
    flat = torch.full((2, 4), 1.7, dtype=torch.float64)
    assert torch.equal(group_advantages(flat), torch.zeros_like(flat))
    single = torch.tensor([[0.3], [2.0]])
    assert torch.equal(group_advantages(single), torch.zeros(2, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="groups, generations"):
        group_advantages(torch.zeros(4))


def random_batch(seed, batch=4, length=7):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    old = logp + (torch.rand(batch, length, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    ref = logp + (torch.rand(batch, length, generator=gen, dtype=torch.float64) - 0.5) * 0.5
    adv = torch.randn(batch, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_grpo_loss_matches_reference(seed, aggregation):
    logp, old, ref, adv, mask = random_batch(seed)
    loss, metrics = grpo_loss(
        logp, old, adv, mask, ref_logp=ref, beta=0.04, eps_low=0.2, eps_high=0.28, aggregation=aggregation
    )
    expected = reference_loss(
        logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.04, 0.2, 0.28, aggregation
    )
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert 0.0 <= metrics["clip_fraction"] <= 1.0
    assert metrics["ratio_min"] <= metrics["ratio_mean"] <= metrics["ratio_max"]


def test_aggregations_differ_exactly_as_defined_on_unequal_lengths():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    # sequence_mean: (mean(1,1,1,1) + mean(4)) / 2 = 2.5; token_mean: (4 + 4) / 5 = 1.6.
    assert aggregate(per_token, mask, "sequence_mean").item() == pytest.approx(2.5)
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(1.6)
    # A global normalizer makes micro-batches add up to the whole batch's value.
    halves = [aggregate(per_token[i : i + 1], mask[i : i + 1], "token_mean", normalizer=5.0) for i in (0, 1)]
    assert sum(h.item() for h in halves) == pytest.approx(1.6)
    halves = [
        aggregate(per_token[i : i + 1], mask[i : i + 1], "sequence_mean", normalizer=2.0) for i in (0, 1)
    ]
    assert sum(h.item() for h in halves) == pytest.approx(2.5)


def test_kl_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logp, *_ = random_batch(3)
    assert torch.equal(k3_kl(logp, logp), torch.zeros_like(logp))
    assert (k3_kl(logp, logp + 0.3) > 0).all()
    # Clamp keeps a wildly off token finite.
    assert torch.isfinite(k3_kl(torch.tensor([0.0]), torch.tensor([500.0]))).all()


def test_clipped_term_gives_zero_gradient_outside_clip_range():
    old = torch.zeros(1, 3, dtype=torch.float64)
    # ratio = e^0.5 ~ 1.65 > 1.2 with a positive advantage: the clipped branch is taken.
    logp = torch.full((1, 3), 0.5, dtype=torch.float64, requires_grad=True)
    loss, metrics = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3), beta=0.0)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    assert metrics["clip_fraction"] == 1.0
    # Same ratio with a negative advantage is not clipped (pessimistic bound): gradient flows.
    logp2 = torch.full((1, 3), 0.5, dtype=torch.float64, requires_grad=True)
    loss2, metrics2 = grpo_loss(logp2, old, torch.tensor([-1.0]), torch.ones(1, 3), beta=0.0)
    loss2.backward()
    assert (logp2.grad != 0).all() and metrics2["clip_fraction"] == 0.0


def test_beta_without_reference_is_an_error():
    logp, old, _, adv, mask = random_batch(0)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, ref_logp=None, beta=0.1)


def test_positive_advantage_raises_logprob_after_one_step():
    torch.manual_seed(0)
    vocab, length = 11, 5
    logits_param = torch.nn.Parameter(torch.randn(2, length, vocab))
    tokens = torch.randint(0, vocab, (2, length))
    optimizer = torch.optim.SGD([logits_param], lr=0.5)

    def logp():
        return token_logprobs(logits_param, tokens)

    before = logp().detach()
    advantages = torch.tensor([1.0, -1.0])
    loss, _ = grpo_loss(logp(), before, advantages, torch.ones(2, length), ref_logp=before, beta=0.04)
    loss.backward()
    optimizer.step()
    after = logp().detach()
    assert (after[0] > before[0]).all(), "positive advantage must raise its tokens' log-probs"
    assert (after[1] < before[1]).all(), "negative advantage must lower its tokens' log-probs"


def test_token_logprobs_equals_log_softmax_gather():
    logits = torch.randn(3, 4, 9)
    tokens = torch.randint(0, 9, (3, 4))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)


def reference_off_policy(old, behaviour, mask, cap):
    """The off-policy metrics with one loop per token, from their definitions."""
    raw, applied, gaps = [], [], []
    for b in range(len(old)):
        for t in range(len(old[b])):
            if mask[b][t]:
                weight = math.exp(old[b][t] - behaviour[b][t])
                raw.append(weight)
                applied.append(min(weight, cap))
                gaps.append(abs(old[b][t] - behaviour[b][t]))
    n = len(raw)
    return {
        "is_weight_mean": sum(raw) / n,
        "is_weight_max": max(raw),
        "is_weight_min": min(raw),
        "truncated_fraction": sum(w > cap for w in raw) / n,
        "ess": sum(applied) ** 2 / (n * sum(w * w for w in applied)),
        "behaviour_logprob_gap": sum(gaps) / n,
    }


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_importance_weighted_loss_and_off_policy_metrics_match_loop_reference(seed, aggregation):
    logp, old, ref, adv, mask = random_batch(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    behaviour = old + (torch.rand(old.shape, generator=gen, dtype=torch.float64) - 0.5) * 2.0
    cap = 1.5
    loss, metrics = grpo_loss(
        logp,
        old,
        adv,
        mask,
        ref_logp=ref,
        beta=0.04,
        aggregation=aggregation,
        behaviour_logp=behaviour,
        tis_cap=cap,
    )
    lists = [t.tolist() for t in (logp, old, ref, adv, mask)]
    expected = reference_loss(*lists, 0.04, 0.2, 0.2, aggregation, behaviour=behaviour.tolist(), cap=cap)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    # The logged KL is the weighted estimate; the unweighted one is the plain token mean of k3.
    cells = [(b, t) for b in range(len(mask)) for t in range(mask.shape[1]) if mask[b, t]]
    gap = {c: float(ref[c] - logp[c]) for c in cells}
    k3 = {c: math.exp(gap[c]) - gap[c] - 1 for c in cells}
    weight = {c: min(math.exp(float(logp[c] - behaviour[c])), cap) for c in cells}
    assert metrics["kl"] == pytest.approx(sum(weight[c] * k3[c] for c in cells) / len(cells), rel=1e-9)
    assert metrics["kl_unweighted"] == pytest.approx(sum(k3.values()) / len(cells), rel=1e-9)
    assert metrics["kl_clamped_fraction"] == 0.0
    # The random gaps reach past the cap: truncation is exercised, not assumed.
    metrics = off_policy_metrics(off_policy_sums(old, behaviour, mask, cap))
    reference = reference_off_policy(old.tolist(), behaviour.tolist(), mask.tolist(), cap)
    assert reference["truncated_fraction"] > 0
    assert metrics == pytest.approx(reference, rel=1e-9)


def test_off_policy_sums_add_up_over_micro_batches_to_the_whole_batch():
    _, old, _, _, mask = random_batch(4)
    behaviour = old - 0.3 * torch.arange(old.shape[1], dtype=old.dtype)
    whole = off_policy_sums(old, behaviour, mask, 2.0)
    parts = [off_policy_sums(old[i : i + 2], behaviour[i : i + 2], mask[i : i + 2], 2.0) for i in (0, 2)]
    extremes = ("raw_max", "raw_min")
    summed = {key: sum(part[key] for part in parts) for key in whole if key not in extremes}
    assert summed == pytest.approx({key: value for key, value in whole.items() if key not in extremes})
    assert max(part["raw_max"] for part in parts) == whole["raw_max"]
    assert min(part["raw_min"] for part in parts) == whole["raw_min"]


def test_importance_weights_are_one_on_policy_and_detached():
    logp, *_ = random_batch(5)
    old = logp.clone().requires_grad_(True)
    weights = truncated_importance_weights(old, logp, 2.0)
    assert torch.equal(weights, torch.ones_like(weights)) and not weights.requires_grad
    metrics = off_policy_metrics(off_policy_sums(logp, logp, torch.ones_like(logp), 2.0))
    assert metrics == {
        "is_weight_mean": 1.0,
        "is_weight_max": 1.0,
        "is_weight_min": 1.0,
        "truncated_fraction": 0.0,
        "ess": 1.0,
        "behaviour_logprob_gap": 0.0,
    }
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(logp, logp, 0.0)


def test_batch_whose_weights_are_all_truncated_gives_finite_loss_and_gradients():
    """Behaviour log-probs far below the learner's (even -inf: a token the sampler reported impossible)
    put every weight at the cap: the loss and its gradient stay finite, and equal cap times the
    unweighted ones."""
    logp, old, _, adv, mask = random_batch(6)
    behaviour = old - 50.0
    behaviour[0, 0] = float("-inf")
    weights = truncated_importance_weights(old, behaviour, 2.0)
    assert torch.equal(weights, torch.full_like(weights, 2.0))
    metrics = off_policy_metrics(off_policy_sums(old, behaviour, mask, 2.0))
    assert metrics["truncated_fraction"] == 1.0 and math.isfinite(metrics["is_weight_max"])
    assert metrics["ess"] == pytest.approx(1.0)

    def loss_and_grad(behaviour_logp):
        current = logp.clone().requires_grad_(True)
        loss, _ = grpo_loss(current, old, adv, mask, beta=0.0, behaviour_logp=behaviour_logp, tis_cap=2.0)
        loss.backward()
        return loss, current.grad

    weighted, weighted_grad = loss_and_grad(behaviour)
    plain, plain_grad = loss_and_grad(None)
    assert torch.isfinite(weighted) and torch.isfinite(weighted_grad).all()
    assert weighted.item() == pytest.approx(2.0 * plain.item())
    torch.testing.assert_close(weighted_grad, 2.0 * plain_grad)


def stale_categorical_case():
    """One token from a 50-token vocabulary. The sampler mu is the reference; since it sampled, an update
    lowered 5 tokens by 9 nats in the current policy pi: a stale batch still holds such tokens, and under
    mu they are as likely as under the reference."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(50, generator=gen, dtype=torch.float64), 0)
    lowered = torch.zeros(50, dtype=torch.float64)
    lowered[:5] = -9.0
    return ref + lowered, ref, ref.clone()  # pi's logits, ref, mu


def expected_loss_under_sampler(logits, old_logp, ref, behaviour, sampler, kl_clamp=10.0):
    """sum_x sampler(x) * loss(x): each token x is a one-token sequence with advantage 0 and beta 1, so its
    loss is its KL term; the sum is the loss's expectation when the tokens are drawn from `sampler`.
    Returns it with the per-row metrics."""
    logp = torch.log_softmax(logits, 0)
    total, rows = 0.0, []
    for x in range(len(logp)):
        loss, metrics = grpo_loss(
            logp[x].reshape(1, 1),
            old_logp[x].reshape(1, 1),
            torch.zeros(1, dtype=torch.float64),
            torch.ones(1, 1),
            ref_logp=ref[x].reshape(1, 1),
            beta=1.0,
            kl_clamp=kl_clamp,
            behaviour_logp=behaviour[x].reshape(1, 1) if behaviour is not None else None,
            tis_cap=2.0,
        )
        total = total + sampler[x] * loss
        rows.append(metrics)
    return total, rows


def on_policy_kl_and_gradient(logits, ref):
    """KL(pi || ref), and the gradient sampling from pi gives the k3 term: grad of sum_x pi(x) k3(x) with
    the weights pi(x) held fixed."""
    logits = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(logits, 0)
    pi = logp.exp()
    kl = float((pi * (logp - ref)).sum().detach())
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    (pi.detach() * k3).sum().backward()
    return kl, logits.grad


def test_kl_term_on_stale_tokens_is_unbiased_for_kl_and_its_on_policy_gradient():
    logits, ref, mu = stale_categorical_case()
    kl, on_policy_grad = on_policy_kl_and_gradient(logits, ref)
    current = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(current, 0).detach()
    # One update per batch: pi_old is the current policy.
    expected, rows = expected_loss_under_sampler(current, logp, ref, mu, mu.exp())
    expected.backward()
    assert float(expected) == pytest.approx(kl, rel=1e-6)
    torch.testing.assert_close(current.grad, on_policy_grad, rtol=1e-6, atol=1e-9)
    # Nothing was truncated or clamped here: the equalities are exact, not approximate by luck.
    assert all(row["kl_clamped_fraction"] == 0.0 for row in rows)
    assert float((logp - mu).exp().max()) < 2.0
    # The unweighted term, as the loss had it before: its expectation under mu is thousands of times the KL.
    unweighted, _ = expected_loss_under_sampler(logits, logp, ref, None, mu.exp())
    assert float(unweighted) > 1000 * kl


def test_kl_weight_follows_the_current_policy_over_several_updates():
    """With more than one update per batch pi_old stays where the batch started while pi moves: the KL
    term's weight uses pi, so its expectation under mu is KL(pi || ref) whatever pi_old is."""
    logits, ref, mu = stale_categorical_case()
    kl, on_policy_grad = on_policy_kl_and_gradient(logits, ref)
    current = logits.clone().requires_grad_(True)
    old_logp = torch.log_softmax(logits * 0.5, 0)
    expected, _ = expected_loss_under_sampler(current, old_logp, ref, mu, mu.exp())
    expected.backward()
    assert float(expected) == pytest.approx(kl, rel=1e-6)
    torch.testing.assert_close(current.grad, on_policy_grad, rtol=1e-6, atol=1e-9)


def test_behaviour_equal_to_old_leaves_loss_and_gradient_unchanged():
    logp, _, ref, adv, mask = random_batch(7)

    def loss_and_grad(with_behaviour):
        current = logp.clone().requires_grad_(True)
        old = current.detach()
        loss, metrics = grpo_loss(
            current, old, adv, mask, ref_logp=ref, beta=0.04, behaviour_logp=old if with_behaviour else None
        )
        loss.backward()
        return loss, current.grad, metrics

    loss, grad, metrics = loss_and_grad(True)
    plain_loss, plain_grad, plain_metrics = loss_and_grad(False)
    assert loss.item() == plain_loss.item()
    assert torch.equal(grad, plain_grad)
    assert metrics["kl"] == metrics["kl_unweighted"] == plain_metrics["kl"]


def test_kl_clamp_bounds_only_the_overflowing_side_and_is_counted():
    """ref - logp above the clamp would overflow exp: bounded and counted. A token the policy raised far
    above the reference (ref - logp = -14.8) keeps its exact k3 and the gradient that pulls it back."""
    logp = torch.tensor([[-0.1, -20.0, -0.2]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-0.1, -0.1, -15.0]], dtype=torch.float64)
    loss, metrics = grpo_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 3), ref_logp=ref, beta=1.0)
    assert metrics["kl_clamped_fraction"] == pytest.approx(1 / 3)
    loss.backward()
    gap = -14.8
    assert metrics["kl_unweighted"] == pytest.approx((math.exp(10.0) - 11.0 + math.exp(gap) - gap - 1) / 3)
    assert logp.grad[0, 1] == 0.0  # clamped: no gradient
    assert logp.grad[0, 2].item() == pytest.approx((1 - math.exp(gap)) / 3)
