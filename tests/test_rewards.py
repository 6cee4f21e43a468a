"""Rewards against plain loops written straight from the formulas in docs/method.md."""

import math

import numpy as np
import pytest

from configs.schema import RewardConfig
from rewards.batch import batch_rewards
from rewards.fidelity import comparison_groups, fidelity_reward, total_reward
from rewards.parsing import (
    apply_score_range,
    expected_scores,
    extract_score,
    format_reward,
    parse_scores,
    score_digit_offset,
)

EPS = 1e-6


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def pair_fidelity(p: float, gt: float) -> float:
    return math.sqrt(p * gt + EPS) + math.sqrt((1 - p) * (1 - gt) + EPS)


def reference_fidelity(scores, mos, groups, valid=None, label_only=False):
    """The seed pseudocode, one loop per index; pairs only within a comparison group. `label_only`: each
    pair's r minus its mean over gt = 1 and gt = 0."""
    num_images, num_gen = len(scores), len(scores[0])
    valid = [[True] * num_gen for _ in range(num_images)] if valid is None else valid
    stats = []
    for i in range(num_images):
        vals = [scores[i][k] for k in range(num_gen) if valid[i][k]]
        mu = sum(vals) / len(vals) if vals else 0.0
        var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
        stats.append((mu, var, len(vals)))
    out = [[0.0] * num_gen for _ in range(num_images)]
    for i in range(num_images):
        for k in range(num_gen):
            if not valid[i][k]:
                continue
            total, n = 0.0, 0
            for j in range(num_images):
                if j == i or groups[j] != groups[i] or stats[j][2] == 0:
                    continue
                p = phi((scores[i][k] - stats[j][0]) / math.sqrt(stats[i][1] + stats[j][1] + EPS))
                gt = 1.0 if mos[i] > mos[j] else 0.0 if mos[i] < mos[j] else 0.5
                r = pair_fidelity(p, gt)
                total += r - (pair_fidelity(p, 1.0) + pair_fidelity(p, 0.0)) / 2 if label_only else r
                n += 1
            out[i][k] = total / n if n else 0.0
    return np.array(out)


@pytest.mark.parametrize("seed", range(25))
def test_fidelity_matches_reference_loop(seed):
    rng = np.random.default_rng(seed)
    num_images, num_gen = int(rng.integers(2, 12)), int(rng.integers(2, 9))
    scores = rng.uniform(1, 5, size=(num_images, num_gen)).round(int(rng.integers(0, 3)))
    mos = rng.integers(1, 5, size=num_images).astype(float)  # integers: plenty of ties
    groups = rng.integers(0, 3, size=num_images)
    valid = rng.random((num_images, num_gen)) > 0.2
    np.testing.assert_allclose(
        fidelity_reward(scores, mos, groups), reference_fidelity(scores, mos, groups), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        fidelity_reward(scores, mos, groups, valid=valid),
        reference_fidelity(scores, mos, groups, valid.tolist()),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("seed", range(10))
def test_label_only_fidelity_matches_reference_loop(seed):
    rng = np.random.default_rng(100 + seed)
    num_images, num_gen = int(rng.integers(2, 12)), int(rng.integers(2, 9))
    scores = rng.uniform(1, 5, size=(num_images, num_gen)).round(int(rng.integers(0, 3)))
    mos = rng.integers(1, 5, size=num_images).astype(float)
    groups = rng.integers(0, 3, size=num_images)
    valid = rng.random((num_images, num_gen)) > 0.2
    np.testing.assert_allclose(
        fidelity_reward(scores, mos, groups, valid=valid, label_only=True),
        reference_fidelity(scores, mos, groups, valid.tolist(), label_only=True),
        rtol=1e-12,
        atol=1e-12,
    )


def test_label_only_fidelity_flips_sign_with_the_labels_and_rises_with_the_best_images_score():
    # Reversing every strict order flips the sign of every label-only reward: no pay for a score that
    # does not come from the labels. What was taken out is the same whichever way the labels point.
    rng = np.random.default_rng(0)
    scores = rng.uniform(1, 5, size=(6, 8))
    mos = rng.permutation(6).astype(float)
    groups = np.zeros(6, dtype=np.int64)
    forward = fidelity_reward(scores, mos, groups, label_only=True)
    reversed_ = fidelity_reward(scores, -mos, groups, label_only=True)
    np.testing.assert_allclose(forward + reversed_, 0.0, atol=1e-12)
    best = int(np.argmax(mos))  # beats every partner: the reward rises with its score
    order = np.argsort(scores[best])
    assert np.all(np.diff(forward[best][order]) > 0)
    label_free = fidelity_reward(scores, mos, groups) - forward
    label_free_reversed = fidelity_reward(scores, -mos, groups) - reversed_
    np.testing.assert_allclose(label_free, label_free_reversed, atol=1e-12)  # what was taken out


def test_fidelity_ties_give_half_probability_terms():
    # Equal MOS -> gt = 0.5; equal scores and zero variance -> p = 0.5; r = 2 * sqrt(0.25 + eps).
    scores = np.full((3, 4), 3.0)
    reward = fidelity_reward(scores, np.array([2.0, 2.0, 2.0]), np.zeros(3, dtype=int))
    np.testing.assert_allclose(reward, 2 * math.sqrt(0.25 + EPS))


def test_fidelity_zero_variance_everywhere_is_finite_and_rewards_right_order():
    scores = np.array([[4.0] * 4, [2.0] * 4])
    reward = fidelity_reward(scores, np.array([5.0, 1.0]), np.zeros(2, dtype=int))
    assert np.isfinite(reward).all()
    # Both images ranked correctly with certainty: p -> 1 for image 0 vs 1, gt = 1: r = sqrt(1+eps)+sqrt(eps).
    np.testing.assert_allclose(reward, math.sqrt(1 + EPS) + math.sqrt(EPS), atol=1e-9)
    wrong = fidelity_reward(scores, np.array([1.0, 5.0]), np.zeros(2, dtype=int))
    assert (wrong < 0.01).all()


def test_fidelity_group_of_one_has_no_pairs_and_zero_reward():
    scores = np.array([[1.0, 2.0], [3.0, 4.0], [2.0, 5.0]])
    groups = np.array([0, 0, 1])  # image 2 is alone in its group
    reward = fidelity_reward(scores, np.array([1.0, 2.0, 3.0]), groups)
    assert (reward[2] == 0).all()
    np.testing.assert_allclose(reward[:2], reference_fidelity(scores[:2], [1.0, 2.0], [0, 0]))


def test_fidelity_every_parse_failing_is_zero_not_nan():
    scores = np.full((4, 3), np.nan)
    reward = fidelity_reward(scores, np.arange(4.0), np.zeros(4, dtype=int), valid=np.zeros((4, 3), bool))
    assert np.isfinite(reward).all() and (reward == 0).all()


def test_mixed_datasets_never_pair_across_datasets():
    names = ["kadid", "spaq", "kadid", "spaq", "kadid"]
    groups = comparison_groups(names)
    assert groups.tolist() == [0, 1, 0, 1, 0]
    rng = np.random.default_rng(0)
    scores = rng.uniform(1, 5, size=(5, 4))
    mos = np.array([1.0, 100.0, 2.0, 50.0, 3.0])  # different scales per dataset
    mixed = fidelity_reward(scores, mos, groups)
    # Each dataset alone gives the same rewards: no cross-dataset pair entered.
    kadid = [0, 2, 4]
    np.testing.assert_allclose(mixed[kadid], fidelity_reward(scores[kadid], mos[kadid], np.zeros(3, int)))
    spaq = [1, 3]
    np.testing.assert_allclose(mixed[spaq], fidelity_reward(scores[spaq], mos[spaq], np.zeros(2, int)))


def test_comparison_groups_fixed_chunks_within_dataset():
    names = ["a"] * 5 + ["b"] * 3
    assert comparison_groups(names, group_size=2).tolist() == [0, 0, 1, 1, 2, 3, 3, 4]
    with pytest.raises(ValueError):
        comparison_groups(names, group_size=0)


def test_fidelity_rejects_bad_shapes():
    with pytest.raises(ValueError, match="mos"):
        fidelity_reward(np.zeros((3, 2)), np.zeros(2), np.zeros(3, int))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>fine</think><answer>3.75</answer>", 3.75),
        ("<answer>1</answer> then <answer>4.2</answer>", 4.2),  # the LAST answer
        ("<answer>score: 2.5 or 3</answer>", 2.5),  # the first number in it
        ("no tags, maybe 4.5 overall", 4.5),  # no answer tag: the whole completion
        ("<answer>\n-1.5\n</answer>", -1.5),  # dot matches newline; not clipped
        ("<answer>4058</answer>", 4058.0),
        ("<answer>three</answer>", None),
        ("", None),
    ],
)
def test_extract_score_as_published(text, expected):
    assert extract_score(text) == expected


def test_parse_scores_failure_policies():
    texts = ["<answer>2</answer>", "nothing", "<answer>9</answer>", "<answer>x</answer>"]
    rand = parse_scores(texts, on_failure="random", rng=np.random.default_rng(0))
    assert rand.ok.tolist() == [True, False, True, False]
    assert rand.scores[0] == 2 and rand.scores[2] == 9  # "keep": not clipped
    assert all(1 <= s <= 5 for s in rand.scores[[1, 3]])
    assert rand.failure_rate == 0.5
    excl = parse_scores(texts, on_failure="exclude")
    assert np.isnan(excl.scores[[1, 3]]).all()
    clipped = parse_scores(texts, on_failure="exclude", out_of_range="clip")
    assert clipped.scores[2] == 5.0 and clipped.ok[2]
    failed = parse_scores(texts, on_failure="exclude", out_of_range="fail")
    assert failed.ok.tolist() == [True, False, False, False]
    huge = parse_scores(["<answer>" + "9" * 400 + "</answer>"], on_failure="exclude")
    assert not huge.ok[0]


def test_apply_score_range_keeps_clips_or_fails_both_sides():
    scores = np.array([0.5, 3.0, 4058.0, np.nan, np.inf])
    kept, ok = apply_score_range(scores, "keep", (1.0, 5.0))
    assert ok.tolist() == [True, True, True, False, False] and kept[2] == 4058.0
    clipped, ok = apply_score_range(scores, "clip", (1.0, 5.0))
    assert clipped[:3].tolist() == [1.0, 3.0, 5.0] and ok.tolist() == [True, True, True, False, False]
    _, ok = apply_score_range(scores, "fail", (1.0, 5.0))
    assert ok.tolist() == [False, True, False, False, False]
    with pytest.raises(ValueError, match="out_of_range must be"):
        apply_score_range(scores, "wrap", (1.0, 5.0))


@pytest.mark.parametrize(
    "text, reward",
    [
        ("<think>sharp, clean</think><answer>4.1</answer>", 1.0),
        ("<think>a\nb</think>\n <answer>2</answer>", 1.0),
        ("<think>x</think><answer>2</answer> trailing", 0.0),
        ("lead <think>x</think><answer>2</answer>", 0.0),
        ("<answer>2</answer>", 0.0),
        ("<think>x</think>", 0.0),
    ],
)
def test_format_reward_is_strict(text, reward):
    assert format_reward([text])[0] == reward


def test_total_reward_weights():
    np.testing.assert_allclose(total_reward([1.0, 0.5], [1.0, 0.0], 2.0, 0.5), [2.5, 1.0])


def test_batch_rewards_end_to_end_and_metrics():
    completions = [
        ["<think>a</think><answer>4.5</answer>", "<think>b</think><answer>4.0</answer>"],
        ["<think>c</think><answer>1.5</answer>", "oops"],
        ["<think>d</think><answer>3</answer>", "<think>e</think><answer>2</answer>"],
    ]
    config = RewardConfig(on_parse_failure="exclude")
    out = batch_rewards(completions, [5.0, 1.0, 3.0], ["k", "k", "k"], config)
    assert out.total.shape == (3, 2)
    assert out.parse_ok.tolist() == [[True, True], [True, False], [True, True]]
    np.testing.assert_allclose(out.total, out.fidelity + out.format)
    assert out.fidelity[1, 1] == 0 and out.format[1, 1] == 0
    metrics = out.metrics()
    assert metrics["reward/parse_failure_rate"] == pytest.approx(1 / 6)
    assert all(np.isfinite(v) for v in metrics.values())
    with pytest.raises(ValueError, match="same number of completions"):
        batch_rewards([["a"], ["b", "c"]], [1, 2], ["k", "k"], config)


def _answers(scores):
    return [f"<think>t</think><answer>{s}</answer>" if s is not None else "no answer" for s in scores]


def test_batch_srcc_matches_a_plain_spearman_of_mean_scores_per_group():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, size=8)
    scores = rng.integers(1, 6, size=(8, 4))
    names = ["a"] * 5 + ["b"] * 3
    out = batch_rewards([_answers(row) for row in scores], mos, names, RewardConfig())
    means = scores.mean(axis=1)
    expected = (5 * spearmanr(means[:5], mos[:5]).statistic + 3 * spearmanr(means[5:], mos[5:]).statistic) / 8
    assert out.metrics()["score/batch_srcc"] == pytest.approx(expected)


def test_batch_srcc_is_one_when_scores_follow_mos_and_minus_one_when_reversed():
    mos = [1.0, 2.0, 3.0, 4.0]
    config = RewardConfig()
    follow = batch_rewards([_answers([m, m]) for m in mos], mos, ["k"] * 4, config)
    reverse = batch_rewards([_answers([6 - m, 6 - m]) for m in mos], mos, ["k"] * 4, config)
    assert follow.batch_srcc() == pytest.approx(1.0)
    assert reverse.batch_srcc() == pytest.approx(-1.0)


def test_batch_srcc_leaves_out_parse_failures_small_groups_and_ties():
    from scipy.stats import spearmanr

    config = RewardConfig(on_parse_failure="exclude")
    mos = [1.0, 2.0, 3.0, 4.0]
    # Image 3's only parsed score is 1; its failed sample must not count as a score.
    out = batch_rewards(
        [_answers([1, 1]), _answers([2, 2]), _answers([3, 3]), _answers([1, None])], mos, ["k"] * 4, config
    )
    assert out.batch_srcc() == pytest.approx(spearmanr([1, 2, 3, 1], mos).statistic)
    two_images = batch_rewards([_answers([1]), _answers([5])], [1.0, 5.0], ["k", "k"], config)
    assert math.isnan(two_images.batch_srcc())
    all_tied = batch_rewards([_answers([3, 3])] * 4, mos, ["k"] * 4, config)
    assert math.isnan(all_tied.batch_srcc())
    nothing_parsed = batch_rewards([_answers([None])] * 4, mos, ["k"] * 4, config)
    assert math.isnan(nothing_parsed.batch_srcc())


@pytest.mark.parametrize(
    "text, digit",
    [
        ("<think>x</think> <answer>3</answer>", "3"),
        ("<think>4 is high</think> <answer>score 2.75</answer>", "2"),
        ("<answer>1</answer> then <answer>4.5</answer>", "4"),  # the last answer, as extract_score
        ("no tags, 3.5 here", "3"),
    ],
)
def test_score_digit_offset_points_at_the_parsed_scores_leading_digit(text, digit):
    offset = score_digit_offset(text)
    assert offset is not None and text[offset] == digit
    assert float(text[offset:].split("<")[0].split()[0]) == extract_score(text)


@pytest.mark.parametrize(
    "text",
    ["<answer>-2</answer>", "<answer>10</answer>", "<answer>4058</answer>", "<answer>none</answer>", ""],
)
def test_score_digit_offset_is_none_without_a_one_digit_integer_part(text):
    assert score_digit_offset(text) is None


def reference_expected_score(score, probs, out_of_range, score_range):
    """Plain loop over the ten digits, written from the formula."""
    low, high = score_range
    fraction = score - math.floor(score)
    weighted, total = 0.0, 0.0
    for digit, p in enumerate(probs):
        value = digit + fraction
        if out_of_range == "clip":
            value = min(max(value, low), high)
        if out_of_range == "fail" and not low <= value <= high:
            continue
        weighted += p * value
        total += p
    return weighted / total if total > 0 else math.nan


@pytest.mark.parametrize("out_of_range", ["keep", "clip", "fail"])
def test_expected_scores_match_the_formula(out_of_range):
    rng = np.random.default_rng(0)
    scores = np.array([3.0, 2.75, 4.5, 1.0, 0.5, 5.0])
    probs = rng.dirichlet(np.ones(10), size=len(scores))
    probs[0, [0, 6, 7, 8, 9]] = 0.0  # rows need not sum to 1: the engine reports the top-k only
    got = expected_scores(scores, probs, out_of_range, (1.0, 5.0))
    want = [
        reference_expected_score(s, p, out_of_range, (1.0, 5.0)) for s, p in zip(scores, probs, strict=True)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_expected_score_of_a_whole_number_is_the_digits_mean():
    probs = np.zeros((1, 10))
    probs[0, [2, 4]] = [0.25, 0.75]
    assert expected_scores(np.array([4.0]), probs)[0] == pytest.approx(3.5)
    # A certain digit gives the sampled score back.
    certain = np.eye(10)[[3]]
    assert expected_scores(np.array([3.0]), certain, "clip")[0] == 3.0


def test_expected_score_is_nan_when_no_digit_weight_is_left():
    probs = np.zeros((2, 10))
    probs[0, 8] = 1.0  # only an out-of-range digit, which "fail" drops
    got = expected_scores(np.array([8.0, 3.0]), probs, "fail", (1.0, 5.0))
    assert np.isnan(got).all()


def test_expected_scores_reject_a_wrong_shape():
    with pytest.raises(ValueError, match="digit_probs must be"):
        expected_scores(np.array([3.0]), np.ones((1, 5)))
