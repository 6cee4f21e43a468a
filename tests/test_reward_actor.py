"""The reward actor scores the whole batch from its own labels; the control permutes them once."""

import numpy as np
import pytest

from configs.schema import PlacementConfig, RewardConfig
from rewards.batch import batch_rewards
from rewards.reward_actor import RewardWorker, create_reward_worker, permute_within_datasets

LABELS = {f"k{i}": (float(i), "kadid") for i in range(6)} | {f"s{i}": (10.0 * i, "spaq") for i in range(4)}
GOOD = "<think>ok</think><answer>{}</answer>"


def completions_for(ids):
    rng = np.random.default_rng(0)
    return [[GOOD.format(round(float(rng.uniform(1, 5)), 2)) for _ in range(4)] for _ in ids]


def test_reward_worker_equals_the_pure_function():
    ids = ["k0", "k3", "k5", "s1", "s2"]
    texts = completions_for(ids)
    config = RewardConfig(on_parse_failure="exclude")
    out = RewardWorker(config, LABELS).score(ids, texts, step=1)
    expected = batch_rewards(texts, [LABELS[i][0] for i in ids], [LABELS[i][1] for i in ids], config)
    np.testing.assert_array_equal(out.total, expected.total)
    assert out.group_ids.tolist() == [0, 0, 0, 1, 1]


def test_unknown_image_id_is_a_clear_error():
    with pytest.raises(KeyError, match="no label for image ids"):
        RewardWorker(RewardConfig(), LABELS).score(["k0", "nope"], completions_for([0, 1]), step=1)


def test_a_step_scored_again_or_by_a_replacement_gets_the_same_random_draws():
    """reward.on_parse_failure=random: the draws of a step depend on (seed, step) only, not on the steps
    the actor scored before it (a replacement actor redoes a step as the dead one would have)."""
    ids = ["k0", "k3", "s1"]
    texts = [["no answer"] * 4 for _ in ids]  # every completion unparseable: every score drawn
    worked = RewardWorker(RewardConfig(), LABELS, seed=5)
    for step in (1, 2):
        worked.score(ids, texts, step=step)
    again = worked.score(ids, texts, step=3).scores
    fresh = RewardWorker(RewardConfig(), LABELS, seed=5).score(ids, texts, step=3).scores
    np.testing.assert_array_equal(again, fresh)
    # The draws themselves: uniform in score_range from the stream of (seed, step), in completion order.
    np.testing.assert_array_equal(fresh, np.random.default_rng([5, 3]).uniform(1.0, 5.0, 12).reshape(3, 4))
    assert not np.array_equal(fresh, RewardWorker(RewardConfig(), LABELS, seed=5).score(ids, texts, 4).scores)


def test_permuted_labels_stay_within_each_dataset():
    permuted = permute_within_datasets(LABELS, seed=3)
    for dataset in ("kadid", "spaq"):
        original = sorted(m for m, d in LABELS.values() if d == dataset)
        assert sorted(m for m, d in permuted.values() if d == dataset) == original
    assert permuted != LABELS
    assert permute_within_datasets(LABELS, seed=3) == permuted  # fixed for the whole run


@pytest.mark.slow
def test_reward_actor_under_ray():
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        actor = create_reward_worker(RewardConfig(), LABELS, PlacementConfig(num_cpus=0))
        ids = ["k1", "k2", "k4"]
        out = ray.get(actor.score.remote(ids, completions_for(ids), 1), timeout=60)
        assert out.total.shape == (3, 4) and np.isfinite(out.total).all()
    finally:
        ray.shutdown()
