"""Tensor-parallel rollout engines (rollout.tensor_parallel_size=2) on the CPU build of vLLM: two ranks
under the multiprocessing executor, one core each, checked against a one-rank engine and the learner.

Two TP=2 engine starts in all: one in this process beside a TP=1 engine (greedy log-probs, the random
stream apart, a push's shards on each rank), one in a Ray placement group inside a cpu-tiny run
(generation, and the learner's log-probs after a training step).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from configs.runtime_env import apply_default_env

apply_default_env()

from actor.rollout_engine import RolloutEngine, cpu_rank_binding  # noqa: E402
from bench.gpu_check import expected_shard_checksums, rank_shard_checksums  # noqa: E402
from configs.load import ConfigError, load_config  # noqa: E402
from configs.schema import ModelConfig, RolloutConfig, tensor_parallel_problem  # noqa: E402
from vlm.factory import build_checkpoint  # noqa: E402
from vlm.weight_sync import RolloutWorkersClient, gpu_visibility_problem, serialize_buckets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 16


# --- config and placement rules (no engine) ---------------------------------------------------------


def qwen_config(heads: int, kv_heads: int, vision_heads: int = 16, nested: bool = False) -> dict:
    text = {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    return {**({"text_config": text} if nested else text), "vision_config": {"num_heads": vision_heads}}


@pytest.mark.parametrize(
    ("config", "tp", "problem"),
    [
        (qwen_config(40, 8), 8, None),  # Qwen2.5-VL-32B
        (qwen_config(64, 8), 8, None),  # Qwen2.5-VL-72B
        (qwen_config(28, 4), 4, None),  # Qwen2.5-VL-7B
        (qwen_config(28, 4), 8, "28 attention heads"),
        (qwen_config(40, 8), 16, "40 attention heads"),
        (qwen_config(16, 2), 4, "2 KV heads"),
        (qwen_config(4, 2, vision_heads=2, nested=True), 2, None),  # the tiny preset, transformers 5 layout
        (qwen_config(4, 2, vision_heads=1, nested=True), 2, "1 vision attention heads"),
        (qwen_config(3, 1), 1, None),  # one rank holds everything
    ],
)
def test_heads_must_split_evenly_over_the_ranks(config, tp, problem):
    found = tensor_parallel_problem(config, tp)
    assert (found is None) == (problem is None)
    if problem:
        assert problem in found and f"tensor_parallel_size={tp}" in found


def test_tensor_parallel_configs_are_checked_at_load(tmp_path):
    config = load_config("cpu-tiny", ["rollout.tensor_parallel_size=2"])
    assert config.rollout.tensor_parallel_size == 2
    with pytest.raises(ConfigError, match="cluster.rollout.num_gpus=2"):
        load_config("cpu-tiny", ["rollout.tensor_parallel_size=2", "cluster.rollout.num_gpus=1"])
    with pytest.raises(ConfigError, match="each vLLM rank needs a core of its own"):
        load_config("cpu-tiny", ["rollout.tensor_parallel_size=2", "cluster.rollout.cpu_affinity=[1]"])
    (tmp_path / "config.json").write_text('{"num_attention_heads": 28, "num_key_value_heads": 4}')
    with pytest.raises(ConfigError, match="does not divide the model's 28 attention heads"):
        load_config("cpu-tiny", [f"model.path={tmp_path}", "rollout.tensor_parallel_size=8"])


@pytest.mark.parametrize(
    ("cores", "tp", "binding"),
    [([0, 1], 2, "0|1"), ([3, 2], 2, "2|3"), ([0, 1, 2, 3, 4], 2, "0,1,2|3,4"), ([4, 5, 6, 7], 4, "4|5|6|7")],
)
def test_each_cpu_rank_gets_cores_of_its_own(cores, tp, binding):
    assert cpu_rank_binding(cores, tp) == binding
    groups = [set(group.split(",")) for group in binding.split("|")]
    assert set.union(*groups) == {str(c) for c in cores} and sum(map(len, groups)) == len(cores)


def test_fewer_cores_than_ranks_is_refused():
    with pytest.raises(ValueError, match="needs a core per vLLM rank, but this rollout worker may run on 1"):
        cpu_rank_binding([0], 2)


@pytest.mark.parametrize(
    ("assigned", "visible", "count", "devices", "fine"),
    [
        ([2, 3], "2,3", 2, 2, True),  # what Ray sets up for a TP=2 worker's bundle
        ([2, 3], "2,3", 2, 1, False),  # a learner rank must not get two
        ([3], "3", 1, 2, False),  # a TP=2 engine on one GPU
        ([2, 3], "0,1,2,3,4,5,6,7", 8, 2, False),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
        ([2, 3], None, 2, 2, False),  # nothing narrowed: cuda:0 and cuda:1 may be other GPUs
        ([2, 3], "3,2", 2, 2, False),  # another order than Ray's
    ],
)
def test_a_tensor_parallel_worker_sees_exactly_its_bundles_gpus(assigned, visible, count, devices, fine):
    problem = gpu_visibility_problem(assigned, visible, count, devices)
    assert (problem is None) == fine
    if not fine:
        assert f"exactly its own {devices} GPU(s)" in problem


class RecordingWorker:
    """A rollout worker handle that records what `init_weight_transfer` is sent."""

    def __init__(self) -> None:
        self.init_infos: list[dict] = []
        self.init_weight_transfer = SimpleNamespace(remote=self.init_infos.append)


def test_every_rank_of_every_engine_gets_its_own_nccl_rank(monkeypatch):
    """NCCL push: vLLM puts each engine's rank r at rank_offset + r (worker_init_process_group), and the
    client gives engine i the offset 1 + i * tensor_parallel_size: 3 TP=2 engines fill ranks 1-6 of a
    group of 1 + 3 * 2 (rank 0: the learner)."""
    workers = [RecordingWorker() for _ in range(3)]
    client = RolloutWorkersClient(workers, workers_per_engine=2)
    monkeypatch.setattr(client, "_wait", lambda calls: None)
    client.init_weight_transfer_engine({"world_size": 7})
    offsets = [worker.init_infos[0]["rank_offset"] for worker in workers]
    assert sorted(offset + rank for offset in offsets for rank in range(2)) == list(range(1, 7))


# --- one TP=2 engine in this process, beside a TP=1 engine -------------------------------------------


def noise_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (84, 112, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoint():
    return build_checkpoint("tiny", ROOT / ".cache" / "vqr1" / "models")


@pytest.fixture(scope="module")
def engines(checkpoint):
    """(TP=1, TP=2) in-process engines of the tiny model in fp32; the TP=2 one's ranks on cores 0 and 1."""
    model_cfg = ModelConfig(preset="tiny", dtype="float32")
    started = []
    try:
        for tp in (1, 2):
            rollout_cfg = RolloutConfig(
                max_new_tokens=MAX_NEW_TOKENS,
                enforce_eager=True,
                kv_cache_gib=0.25,
                seed=0,
                tensor_parallel_size=tp,
            )
            started.append(RolloutEngine(checkpoint, model_cfg, rollout_cfg))
        yield tuple(started)
    finally:
        for engine in started:
            engine.shutdown()


def greedy(engine: RolloutEngine, images) -> list:
    return [r.completions[0] for r in engine.generate(images, 1, temperature=0.0)]


def assert_same_greedy(one, two, images) -> list[list[int]]:
    ones, twos = greedy(one, images), greedy(two, images)
    for a, b in zip(ones, twos, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=0)
    return [c.token_ids for c in twos]


def tokens(rollouts) -> list:
    return [[c.token_ids for c in rollout.completions] for rollout in rollouts]


@pytest.mark.slow
def test_tp2_runs_two_ranks_each_on_its_own_core(engines):
    _, two = engines
    config = two.llm.llm_engine.vllm_config.parallel_config
    assert (config.tensor_parallel_size, config.distributed_executor_backend) == (2, "mp")
    # Each rank runs on cores of its own among this process's, its OpenMP threads bound there
    # (VLLM_CPU_OMP_THREADS_BIND="0|1" on two cores): no two ranks compete for a core.
    binding = cpu_rank_binding(sorted(os.sched_getaffinity(0)), 2)
    groups = [[int(core) for core in group.split(",")] for group in binding.split("|")]
    expected = [(rank, cores, str(len(cores))) for rank, cores in enumerate(groups)]
    assert two.llm.collective_rpc(_rank_and_cores) == expected


def _rank_and_cores(worker) -> tuple[int, list[int], str]:
    from vllm.distributed import get_tensor_model_parallel_rank

    cores = sorted(os.sched_getaffinity(0))
    return get_tensor_model_parallel_rank(), cores, os.environ.get("OMP_NUM_THREADS")


@pytest.mark.slow
def test_each_rank_reports_its_process_and_holds_the_named_weight_version(engines):
    """The extension's report (cluster.train tags it per rollout worker): each rank is a process of its
    own that imported this project's extension, and a named weight version reaches every rank."""
    import actor.rollout_engine

    one, two = engines
    assert [report["pid"] for report in one.extension_reports()] == [os.getpid()]  # in-process, one rank
    try:
        two.set_weight_version(7)
        reports = two.extension_reports()
    finally:
        two.set_weight_version(0)
    assert [report["weight_version"] for report in reports] == [7, 7]
    assert {report["file"] for report in reports} == {actor.rollout_engine.__file__}
    pids = {report["pid"] for report in reports}
    assert len(pids) == 2 and os.getpid() not in pids


@pytest.mark.slow
def test_greedy_logprobs_at_tp2_equal_tp1(engines):
    assert_same_greedy(*engines, [noise_image(seed) for seed in range(3)])


@pytest.mark.slow
def test_a_call_on_a_stream_apart_leaves_both_ranks_streams_alone(engines):
    """The TP=2 engine samples in its ranks' processes: an evaluation between two training generations
    must leave their generators where they were."""
    _, two = engines
    images = [noise_image(30), noise_image(31)]
    start = two.llm.collective_rpc(_rng_state)
    undisturbed = two.generate(images, 4, temperature=1.0)
    two.llm.collective_rpc(_set_rng_state, args=(start[0],))
    side = two.generate(images, 4, temperature=0.5, stream_apart=11)
    assert tokens(two.generate(images, 4, temperature=1.0)) == tokens(undisturbed)
    assert tokens(two.generate(images, 4, temperature=0.5, stream_apart=11)) == tokens(side)
    # Without it, the same side call moves the stream (the test would catch a no-op).
    two.llm.collective_rpc(_set_rng_state, args=(start[0],))
    two.generate(images, 4, temperature=0.5)
    assert tokens(two.generate(images, 4, temperature=1.0)) != tokens(undisturbed)


def _rng_state(worker) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(worker, state: torch.Tensor) -> None:
    torch.set_rng_state(state)


@pytest.mark.slow
def test_a_push_reaches_the_shard_of_each_rank(engines, checkpoint):
    """After one push to both engines, each TP=2 rank holds its slice of the pushed tensors (a checksum
    per rank of a vocabulary-split embedding and of a column-split packed qkv bias), and both engines
    sample the same greedy tokens with the same log-probs, other than before the push."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    one, two = engines
    images = [noise_image(seed) for seed in (3, 4)]
    before = assert_same_greedy(one, two, images)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    buckets = serialize_buckets(model.named_parameters(), bucket_bytes=256 << 10)
    one.update_weights(buckets)
    two.update_weights(buckets)

    # The checksums bench.gpu_check's tensor_parallel stage compares on two GPUs, here in fp32.
    expected = expected_shard_checksums(dict(model.named_parameters()), 2, torch.float32)
    ranks = two.llm.collective_rpc(rank_shard_checksums)
    assert [{key: r[key] for key in ("rank", "embed", "qkv_bias")} for r in ranks] == expected
    after = assert_same_greedy(one, two, images)
    assert after != before


# --- one TP=2 rollout worker in a Ray placement group, in a cpu-tiny run -----------------------------


@pytest.mark.slow
def test_a_tp2_rollout_worker_generates_and_follows_the_learner(tmp_path, tiny_overrides):
    """A one-step cpu-tiny run whose rollout worker (in the run's placement group) runs a TP=2 engine:
    it generates the batch, and after the training step's push its greedy log-probs equal the
    learner's (train.verify_weight_sync)."""
    from cluster.tracking import metric_histories
    from cluster.train import run

    config = load_config(
        "cpu-tiny",
        tiny_overrides(
            tmp_path,
            1,
            "rollout.tensor_parallel_size=2",
            "train.verify_weight_sync=true",
            "eval.max_images=4",
        ),
    )
    result = run(config)
    keys = ("sync/max_abs_logprob_diff", "response/length_mean")
    history = metric_histories(config.tracking.tracking_uri, result["mlflow_run_id"], keys)
    assert [m.step for m in history["sync/max_abs_logprob_diff"]] == [1]
    assert history["sync/max_abs_logprob_diff"][0].value < 1e-3  # fp32 on both sides
    assert history["response/length_mean"][0].value > 0
    assert "srcc" in result["before"] and "srcc" in result["after"]  # evaluations drawn apart, at TP=2
