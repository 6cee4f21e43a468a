"""The DeepSpeed learner group for real: Ray actors, 2 ranks over gloo, ZeRO-2 and ZeRO-3, tiny Qwen2.5-VL.

One Ray session and one learner group per ZeRO stage are shared by the module's tests (about a minute
in all, most of it starting the actors).
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from configs.runtime_env import apply_default_env

apply_default_env()

import ray  # noqa: E402
from conftest import policy_shards  # noqa: E402

from configs.schema import LearnerConfig, ModelConfig, PlacementConfig, RewardConfig  # noqa: E402
from learner.grpo import group_advantages, grpo_loss  # noqa: E402
from learner.learner_actor import create_learner_group  # noqa: E402
from learner.policy import PolicySample, checkpoint_names, load_policy_model, sequence_logprobs  # noqa: E402
from rewards.batch import batch_rewards  # noqa: E402
from vlm.factory import build_checkpoint, load_processor  # noqa: E402
from vlm.weight_sync import iterate_buckets  # noqa: E402

pytestmark = pytest.mark.slow

MIN_PIXELS, MAX_PIXELS = 3136, 12544
WORLD_SIZE = 2
MICRO_BATCH_SIZE = 2
BUCKET_BYTES = 256 << 10
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(
        "tiny", tmp_path_factory.mktemp("models"), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )


@pytest.fixture(scope="module")
def processor(checkpoint):
    return load_processor(checkpoint, MIN_PIXELS, MAX_PIXELS)


@pytest.fixture(scope="module")
def shards(processor):
    return policy_shards(processor, WORLD_SIZE)


def batch_totals(shards) -> tuple[int, int]:
    completions = [c for samples, _ in shards for s in samples for c in s.completions]
    return len(completions), sum(len(c) for c in completions)


def learner_config(zero_stage: int, model_config: ModelConfig) -> LearnerConfig:
    return LearnerConfig(
        num_workers=WORLD_SIZE,
        lr=2e-3,
        lr_schedule="constant",
        beta=0.04,
        micro_batch_size=MICRO_BATCH_SIZE,
        zero_stage=zero_stage,
        # The ZeRO-2 group runs the shared-prompt forward, the ZeRO-3 group (checkpointed) the plain one;
        # both are checked against the same single-process computation.
        share_prompt_forward=not model_config.gradient_checkpointing,
    )


def start_group(checkpoint, shards, zero_stage: int, model_config: ModelConfig) -> list:
    return create_learner_group(
        WORLD_SIZE,
        # Half a CPU each, so both groups of this module fit the 2-CPU Ray session together.
        PlacementConfig(num_cpus=0.5),
        model_path=checkpoint,
        model=model_config,
        learner=learner_config(zero_stage, model_config),
        train_batch_size=batch_totals(shards)[0],
        total_steps=10,
        timeout_s=TIMEOUT_S,
    )


def on_all(workers, method: str, *args_per_rank) -> list:
    calls = [
        getattr(w, method).remote(*(args[rank] for args in args_per_rank)) for rank, w in enumerate(workers)
    ]
    return ray.get(calls, timeout=TIMEOUT_S)


def train_step(workers, shards, num_iterations: int = 1) -> dict:
    total_sequences, total_tokens = batch_totals(shards)
    metrics = ray.get(
        [
            worker.train_step.remote(samples, advantages, num_iterations, total_sequences, total_tokens)
            for worker, (samples, advantages) in zip(workers, shards, strict=True)
        ],
        timeout=TIMEOUT_S,
    )
    for rank_metrics in metrics[1:]:
        assert _without_timings(rank_metrics) == _without_timings(metrics[0]), (
            "ranks report different metrics"
        )
    return metrics[0]


def _without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}


def pushed_weights(workers) -> dict[str, torch.Tensor]:
    bucket_refs = on_all(workers, "weight_buckets", [BUCKET_BYTES] * WORLD_SIZE)
    assert all(refs == [] for refs in bucket_refs[1:]), "only rank 0 returns buckets"
    assert len(bucket_refs[0]) > 1, "the weights should span several buckets at this bucket size"
    assert all(isinstance(ref, ray.ObjectRef) for ref in bucket_refs[0]), "references, not the weights"
    return dict(iterate_buckets(ray.get(bucket_refs[0])))


def module_parameters(worker) -> dict[str, torch.Tensor]:
    """A rank's local module parameters (full tensors under ZeRO-2), read inside the actor."""
    return ray.get(
        worker.__ray_call__.remote(
            lambda self: {n: p.detach().clone() for n, p in self.engine.module.named_parameters()}
        ),
        timeout=TIMEOUT_S,
    )


def load_model_with(checkpoint, weights: dict[str, torch.Tensor], folder):
    """The initial checkpoint folder with its tensors replaced by `weights`, loaded by transformers."""
    shutil.copytree(checkpoint, folder)
    save_file(weights, str(folder / "model.safetensors"))
    return load_policy_model(folder, ModelConfig(), torch.float32, trainable=False)


@pytest.fixture(scope="module")
def initial_weights(checkpoint):
    return load_file(str(checkpoint / "model.safetensors"))


def single_process_first_step(checkpoint, processor, shards, model_config: ModelConfig) -> dict:
    """Gradient norm and loss of the whole batch in one process with plain torch, from the initial weights."""
    model = load_policy_model(checkpoint, model_config, torch.float32, trainable=True)
    samples = [s for shard, _ in shards for s in shard]
    advantages = torch.tensor([a for _, adv in shards for values in adv for a in values])
    logp, mask = sequence_logprobs(model, processor, samples, micro_batch_size=len(advantages))
    loss, _ = grpo_loss(logp, logp.detach(), advantages, mask, ref_logp=logp.detach(), beta=0.04)
    loss.backward()
    grad_norm = torch.sqrt(
        sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None)
    )
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "logp": logp.detach(), "mask": mask}


@pytest.fixture(scope="module")
def expected_first_step(checkpoint, processor, shards):
    return single_process_first_step(checkpoint, processor, shards, ModelConfig())


ZERO3_MODEL = ModelConfig(freeze_vision=True, gradient_checkpointing=True)


@pytest.fixture(scope="module")
def zero2(ray_session, checkpoint, shards):
    workers = start_group(checkpoint, shards, zero_stage=2, model_config=ModelConfig())
    yield workers
    for worker in workers:
        ray.kill(worker)


@pytest.fixture(scope="module")
def zero2_first_step(zero2, shards):
    return train_step(zero2, shards)


def test_first_step_metrics_and_gradient_equal_a_single_process_computation(
    zero2_first_step, expected_first_step, shards
):
    metrics = zero2_first_step
    # Gradients averaged over 2 ranks with the global normalizer = the whole batch's gradient.
    assert metrics["grad_norm"] == pytest.approx(expected_first_step["grad_norm"], rel=1e-4)
    assert metrics["loss"] == pytest.approx(expected_first_step["loss"], abs=1e-6)
    # One update per batch: the ratio is 1, nothing is clipped, and the policy still equals the reference.
    assert metrics["ratio_min"] == metrics["ratio_max"] == pytest.approx(1.0)
    assert metrics["clip_fraction"] == 0.0
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["num_tokens"] == batch_totals(shards)[1]
    assert metrics["lr"] == pytest.approx(2e-3)


def test_ranks_hold_identical_weights_and_the_push_reproduces_them(
    zero2, zero2_first_step, initial_weights, checkpoint
):
    rank0, rank1 = (module_parameters(w) for w in zero2)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    pushed = pushed_weights(zero2)
    # Under the checkpoint's names (what vLLM's loader maps): every trainable tensor, bit for bit.
    assert pushed.keys() == initial_weights.keys()
    names = checkpoint_names(load_policy_model(checkpoint, ModelConfig(), torch.float32, trainable=False))
    for name, tensor in rank0.items():
        assert torch.equal(pushed[names[name]], tensor), name
    assert any(not torch.equal(pushed[n], initial_weights[n]) for n in pushed), "the step changed nothing"


def test_positive_advantage_raises_the_completion_logprob(
    zero2, zero2_first_step, shards, processor, checkpoint, expected_first_step, tmp_path
):
    trained = load_model_with(checkpoint, pushed_weights(zero2), tmp_path / "trained")
    samples = [s for shard, _ in shards for s in shard]
    advantages = [a for _, adv in shards for values in adv for a in values]
    with torch.no_grad():
        logp, mask = sequence_logprobs(trained, processor, samples, micro_batch_size=4)
    change = ((logp - expected_first_step["logp"]) * mask).sum(dim=1)
    for advantage, delta in zip(advantages, change.tolist(), strict=True):
        assert (delta > 0) == (advantage > 0), (advantage, delta)


def test_checkpoint_loads_in_transformers_with_identical_logits_and_restores_the_engine(
    zero2, zero2_first_step, shards, processor, tmp_path
):
    directory = tmp_path / "checkpoint"
    on_all(zero2, "save_checkpoint", [directory] * WORLD_SIZE)
    saved = load_policy_model(directory, ModelConfig(), torch.float32, trainable=False)
    saved_processor = load_processor(directory, MIN_PIXELS, MAX_PIXELS)
    samples = shards[0][0]
    inputs = saved_processor(text=[samples[0].prompt], images=[samples[0].image], return_tensors="pt")
    assert torch.equal(
        inputs["input_ids"],
        processor(text=[samples[0].prompt], images=[samples[0].image], return_tensors="pt")["input_ids"],
    )
    engine_logits = ray.get(
        zero2[0].__ray_call__.remote(
            lambda self, inputs: self.engine.module(**inputs).logits.detach(), dict(inputs)
        ),
        timeout=TIMEOUT_S,
    )
    with torch.no_grad():
        torch.testing.assert_close(saved(**inputs).logits, engine_logits, atol=0, rtol=0)

    # Engine state: after one more step, loading the checkpoint and repeating that step gives the same
    # weights only if weights, Adam moments and the LR schedule all came back.
    after_save = train_step(zero2, shards)
    weights_after_save = pushed_weights(zero2)
    steps = on_all(zero2, "load_checkpoint", [directory] * WORLD_SIZE)
    assert steps == [1, 1]
    assert all(
        torch.equal(t, load_file(str(directory / "model.safetensors"))[n])
        for n, t in pushed_weights(zero2).items()
    )
    replayed = train_step(zero2, shards)
    assert _without_timings(replayed) == pytest.approx(_without_timings(after_save), rel=1e-6, abs=1e-9)
    for name, tensor in pushed_weights(zero2).items():
        torch.testing.assert_close(tensor, weights_after_save[name], atol=1e-7, rtol=0)


def test_micro_batch_count_must_match_the_config(zero2, shards):
    samples, advantages = shards[0]
    with pytest.raises(ray.exceptions.RayTaskError, match="micro-batches"):
        ray.get(zero2[0].train_step.remote(samples[:1], advantages[:1], 1, 8, 40), timeout=TIMEOUT_S)


DEGENERATE_BATCHES = {
    # texts of 4 images x 2 completions; MOS and datasets below
    "every completion unparseable": [["no score"] * 2] * 4,
    "all scores equal": [["<think>ok</think><answer>3</answer>"] * 2] * 4,
    "one image per comparison group": [["<think>a</think><answer>2</answer>", "<answer>4.5</answer>"]] * 4,
    "empty responses": [["", "<think></think><answer></answer>"]] * 4,
}


@pytest.mark.parametrize("on_parse_failure", ["random", "exclude"])
@pytest.mark.parametrize("case", list(DEGENERATE_BATCHES))
def test_degenerate_batches_give_finite_rewards_advantages_and_updates(
    zero2, processor, shards, case, on_parse_failure
):
    """Reward -> advantages -> a real ZeRO-2 update on each degenerate batch: nothing is NaN or inf."""
    texts = DEGENERATE_BATCHES[case]
    datasets = ["a", "b", "c", "d"] if case == "one image per comparison group" else ["a"] * 4
    rewards = batch_rewards(
        texts, [1.0, 2.0, 3.0, 4.0], datasets, RewardConfig(on_parse_failure=on_parse_failure)
    )
    advantages = group_advantages(torch.tensor(rewards.total))
    assert torch.isfinite(advantages).all(), (case, rewards.total)
    # The same token shapes as the group was built for; an empty response is its end-of-text token alone.
    eos = processor.tokenizer.eos_token_id
    per_rank = advantages.tolist()
    degenerate_shards = []
    for rank, (samples, _) in enumerate(shards):
        if case == "empty responses":
            samples = [PolicySample(s.image, s.prompt, [[eos], *s.completions[1:]]) for s in samples]
        degenerate_shards.append((samples, per_rank[2 * rank : 2 * rank + 2]))
    metrics = train_step(zero2, degenerate_shards)
    assert all(math.isfinite(value) for value in metrics.values()), (case, metrics)


@pytest.fixture(scope="module")
def zero3(ray_session, checkpoint, shards):
    # Also the frozen-vision and gradient-checkpointing options, under the sharded engine.
    workers = start_group(checkpoint, shards, zero_stage=3, model_config=ZERO3_MODEL)
    yield workers
    for worker in workers:
        ray.kill(worker)


@pytest.fixture(scope="module")
def zero3_first_step(zero3, shards):
    return train_step(zero3, shards)


def test_zero3_first_step_gradient_equals_a_single_process_computation(
    zero3_first_step, checkpoint, processor, shards
):
    expected = single_process_first_step(checkpoint, processor, shards, ZERO3_MODEL)
    assert zero3_first_step["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    assert zero3_first_step["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert zero3_first_step["kl"] == pytest.approx(0.0, abs=1e-7)


def test_zero3_pushes_the_gathered_trainable_weights_and_saves_all(
    zero3, zero3_first_step, shards, initial_weights, tmp_path
):
    metrics = train_step(zero3, shards, num_iterations=2)
    # The second update of the batch sees a policy that moved away from the old log-probs and from
    # the (sharded) reference.
    assert metrics["ratio_max"] > 1.0 > metrics["ratio_min"]
    assert metrics["kl"] > 0
    pushed = pushed_weights(zero3)
    directory = tmp_path / "zero3"
    on_all(zero3, "save_checkpoint", [directory] * WORLD_SIZE)
    saved = load_file(str(directory / "model.safetensors"))
    assert saved.keys() == initial_weights.keys()
    # The frozen vision tower is neither pushed nor changed.
    assert pushed.keys() == {n for n in initial_weights if not n.startswith("visual.")}
    for name, tensor in saved.items():
        if name.startswith("visual."):
            assert torch.equal(tensor, initial_weights[name]), name
        else:
            assert torch.equal(pushed[name], tensor), name
    assert any(not torch.equal(pushed[n], initial_weights[n]) for n in pushed)


@pytest.mark.parametrize("group", ["zero2", "zero3"])
def test_weight_metadata_announces_the_full_shapes_of_what_is_pushed(group, request):
    """The NCCL push announces each weight's name, dtype and shape before sending it (vLLM sizes its
    receive buffers from them), read without a gather: under ZeRO-3 they must still be the full shapes."""
    workers = request.getfixturevalue(group)
    per_rank = ray.get([worker.weight_metadata.remote() for worker in workers])
    assert all(metadata == per_rank[0] for metadata in per_rank)
    announced = {name: (dtype, shape) for name, dtype, shape in per_rank[0]}
    assert len(announced) == len(per_rank[0]), "a name is announced twice"
    pushed = pushed_weights(workers)
    assert announced == {name: (t.dtype, tuple(t.shape)) for name, t in pushed.items()}
