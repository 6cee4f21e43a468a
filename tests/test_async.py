"""The asynchronous pipeline on the cpu-tiny preset (real Ray, vLLM, DeepSpeed and MLflow): staleness is
bounded and logged, the batch in flight is checkpointed, and k = 0 is the synchronous loop exactly."""

from __future__ import annotations

import json

import pytest

from cluster.checkpoints import read_in_flight, read_trained_images, step_dir
from cluster.tracking import metric_histories

pytestmark = pytest.mark.slow

OFF_POLICY = [
    "offpolicy/is_weight_mean",
    "offpolicy/is_weight_max",
    "offpolicy/is_weight_min",
    "offpolicy/truncated_fraction",
    "offpolicy/ess",
    "offpolicy/behaviour_logprob_gap",
]
ASYNC = ["async/staleness_mean", "async/staleness_max", "time/overlap_s", "time/generate_wait_s"]


def histories(config, result, keys):
    return {
        key: {m.step: m.value for m in history}
        for key, history in metric_histories(
            config.tracking.tracking_uri, result["mlflow_run_id"], keys
        ).items()
    }


def test_k2_never_trains_a_batch_more_than_two_updates_after_its_weights_and_logs_it(async_run):
    tmp_path, config, result = async_run
    log = read_trained_images(tmp_path / "out")
    staleness = {entry["step"]: [entry["step"] - 1 - v for v in entry["weight_versions"]] for entry in log}
    # Step 1 queues the batches of steps 1-3 on the start weights: step 2 trains one update after them,
    # step 3 two, the most k = 2 allows.
    assert staleness == {1: [0] * 4, 2: [1] * 4, 3: [2] * 4}
    logged = histories(config, result, [*ASYNC, *OFF_POLICY])
    assert logged["async/staleness_max"] == {1: 0.0, 2: 1.0, 3: 2.0}
    assert logged["async/staleness_mean"] == {1: 0.0, 2: 1.0, 3: 2.0}
    for key in OFF_POLICY + ["time/overlap_s"]:
        assert sorted(logged[key]) == [1, 2, 3], key
    for step in (1, 2, 3):
        assert 0.0 <= logged["offpolicy/truncated_fraction"][step] <= 1.0
        assert 0.0 < logged["offpolicy/ess"][step] <= 1.0 + 1e-12
        assert logged["offpolicy/is_weight_min"][step] <= logged["offpolicy/is_weight_mean"][step]
        assert logged["offpolicy/is_weight_mean"][step] <= logged["offpolicy/is_weight_max"][step]
    # Sampled with older weights, step 2's and 3's tokens are off the learner's policy: pi_old / mu moves.
    assert logged["offpolicy/behaviour_logprob_gap"][1] < 1e-4 < logged["offpolicy/behaviour_logprob_gap"][2]
    assert config.learner.off_policy_correction == "tis"


def test_checkpoint_holds_the_batches_in_flight_with_their_completions(async_run):
    tmp_path, _, _ = async_run
    log = {entry["step"]: entry for entry in read_trained_images(tmp_path / "out")}
    for step, ahead in ((1, [2, 3]), (2, [3]), (3, [])):
        batches = read_in_flight(step_dir(tmp_path / "checkpoints", step))
        assert [batch["step"] for batch in batches] == ahead
        for batch in batches:
            # The batch as it was later trained: the same images, sampled with the same weights.
            assert [row["id"] for row in batch["rows"]] == log[batch["step"]]["image_ids"]
            versions = [min(c["weight_version"] for c in r["completions"]) for r in batch["rollouts"]]
            assert versions == log[batch["step"]]["weight_versions"] == [0] * 4
            completions = [c for r in batch["rollouts"] for c in r["completions"]]
            assert all(len(c["logprobs"]) == len(c["token_ids"]) > 0 for c in completions)
    state = json.loads((step_dir(tmp_path / "checkpoints", 1) / "state.json").read_text())
    assert state["step"] == 1


def test_k0_is_the_synchronous_loop_and_its_importance_weights_are_one(first_run):
    """first_run is k = 0: every batch is sampled with the weights it trains, and in fp32 vLLM's and the
    learner's log-probs agree, so pi_old / mu is 1 within 1e-4 on every token."""
    tmp_path, config, result = first_run
    assert config.train.max_staleness == 0 and config.learner.off_policy_correction == "none"
    for entry in read_trained_images(tmp_path / "out"):
        assert entry["weight_versions"] == [entry["step"] - 1] * len(entry["image_ids"])
    logged = histories(config, result, [*ASYNC, *OFF_POLICY])
    assert logged["async/staleness_max"] == {1: 0.0, 2: 0.0, 3: 0.0}
    assert logged["time/overlap_s"] == {1: 0.0, 2: 0.0, 3: 0.0}
    for step in (1, 2, 3):
        assert (
            1 - 1e-4
            <= logged["offpolicy/is_weight_min"][step]
            <= logged["offpolicy/is_weight_max"][step]
            <= 1 + 1e-4
        )


# make test-long (a second loop beside first_run, ~2 min): the suite keeps test_k0_is_the_synchronous_loop.
@pytest.mark.long
def test_k0_reproduces_a_plain_synchronous_loop_metric_for_metric(first_run):
    """The reference: generate -> reward -> advantages -> update -> push, written out here over the
    system's calls, on the same data, seeds and model as first_run (k = 0). Its rewards, losses and KL
    equal the run's at every step."""
    import ray
    import torch

    from cluster.batches import DatasetBatchSampler
    from cluster.system import create_system, generate, push_weights, read_images, start_ray, update, wait
    from configs.runtime_env import apply_default_env
    from iqa.splits import load_run_data
    from learner.grpo import group_advantages
    from vlm.factory import load_processor, resolve_model_path
    from vlm.prompts import build_prompt_text

    _, config, result = first_run
    train_split, _, _ = load_run_data(config)
    labels = {
        row["id"]: (row["mos"], row["dataset"])
        for row in train_split.select_columns(["id", "mos", "dataset"])
    }
    sampler = DatasetBatchSampler(train_split["dataset"], config.train.images_per_step, config.train.seed)
    model_path = resolve_model_path(config.model, config.data.models_cache_dir)
    prompt = build_prompt_text(
        load_processor(model_path, config.model.min_pixels, config.model.max_pixels), True
    )
    start_ray(config, apply_default_env())
    reference = []
    try:
        system = create_system(config, model_path, labels)
        for step in (1, 2, 3):
            rows = [train_split[int(i)] for i in sampler.next_batch()]
            images = read_images([row["image"] for row in rows])
            rollouts = generate(system, config, images, step)
            texts = [[c.text for c in r.completions] for r in rollouts]
            rewards = wait(
                system.reward.score.remote([row["id"] for row in rows], texts, step),
                config,
                "reward",
                step,
                "",
            )
            advantages = group_advantages(torch.tensor(rewards.total), config.learner.advantage)
            learner = update(system, config, images, prompt, rollouts, advantages, step)
            push_weights(system, config, step)
            reference.append({"reward/total_mean": rewards.metrics()["reward/total_mean"], **learner})
    finally:
        ray.shutdown()
    logged = histories(
        config, result, ["reward/total_mean", "learner/loss", "learner/kl", "learner/grad_norm"]
    )
    for step, expected in enumerate(reference, start=1):
        assert logged["reward/total_mean"][step] == pytest.approx(expected["reward/total_mean"], abs=1e-9), (
            step
        )
        for key in ("loss", "kl", "grad_norm"):
            assert logged[f"learner/{key}"][step] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), (
                step,
                key,
            )
