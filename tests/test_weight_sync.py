"""The weight-push transport: safetensors buckets, and a push through the Ray rollout actor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as safetensors_load

from configs.runtime_env import apply_default_env

apply_default_env()

from vlm.weight_sync import engine_weight_transfer_config, iterate_buckets, serialize_buckets  # noqa: E402


def named_tensors() -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(64, 32, generator=generator)),
        ("model.layers.0.q_proj.weight", torch.randn(32, 32, generator=generator).to(torch.bfloat16)),
        ("model.layers.0.q_proj.bias", torch.randn(32, generator=generator).to(torch.float16)),
        ("model.layers.0.scale", torch.tensor(3.5, dtype=torch.float64)),
        ("model.layers.1.positions", torch.arange(100, dtype=torch.int64)),
        ("visual.mask", torch.tensor([True, False, True])),
        # A non-contiguous view (the learner may hand out transposed or sliced tensors).
        ("lm_head.weight", torch.randn(32, 64, generator=generator).t()),
    ]


def test_buckets_roundtrip_names_dtypes_and_values():
    tensors = named_tensors()
    buckets = serialize_buckets(tensors, bucket_bytes=4096)
    assert len(buckets) >= 3
    restored = list(iterate_buckets(buckets))
    assert sorted(name for name, _ in restored) == sorted(name for name, _ in tensors)
    restored_by_name = dict(restored)
    for name, original in tensors:
        copy = restored_by_name[name]
        assert copy.dtype == original.dtype and copy.shape == original.shape
        assert torch.equal(copy, original)


def test_buckets_respect_the_size_limit_except_for_single_big_tensors():
    tensors = [(f"t{i}", torch.zeros(256)) for i in range(10)]  # 1 KiB each
    tensors.append(("big", torch.zeros(4096)))  # 16 KiB, larger than a bucket
    buckets = serialize_buckets(tensors, bucket_bytes=3 * 1024)
    payloads = [safetensors_load(b) for b in buckets]
    assert [len(p) for p in payloads] == [3, 3, 3, 1, 1]
    assert list(payloads[-1]) == ["big"]
    for payload in payloads[:-1]:
        assert sum(t.numel() * t.element_size() for t in payload.values()) <= 3 * 1024


def test_tied_tensors_are_serialised_independently():
    shared = torch.randn(8, 4)
    buckets = serialize_buckets([("model.embed_tokens.weight", shared), ("lm_head.weight", shared)])
    restored = dict(iterate_buckets(buckets))
    assert torch.equal(restored["model.embed_tokens.weight"], shared)
    assert torch.equal(restored["lm_head.weight"], shared)


def test_bad_inputs_are_rejected_clearly():
    with pytest.raises(ValueError, match="'a' appears twice"):
        serialize_buckets([("a", torch.zeros(1)), ("a", torch.zeros(1))])
    with pytest.raises(ValueError, match="bucket_bytes must be > 0"):
        serialize_buckets([("a", torch.zeros(1))], bucket_bytes=0)
    good = serialize_buckets([("a", torch.zeros(1))])
    with pytest.raises(ValueError, match="weight bucket 1 is not a valid safetensors blob"):
        list(iterate_buckets([good[0], b"not safetensors"]))


def test_cpu_machines_use_the_collective_rpc_transport():
    # The NCCL path needs CUDA; without it engines are built with no weight-transfer backend.
    assert engine_weight_transfer_config() == ({"backend": "nccl"} if torch.cuda.is_available() else None)


@pytest.mark.slow
def test_push_through_the_ray_rollout_actor(tmp_path):
    import ray
    from safetensors.torch import load_file

    from actor.rollout_actor import create_rollout_worker
    from configs.schema import ModelConfig, PlacementConfig, RolloutConfig
    from vlm.factory import build_checkpoint

    checkpoint = build_checkpoint("tiny", tmp_path / "models")
    original = load_file(checkpoint / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    perturbed = {name: t + 0.05 * torch.randn(t.shape, generator=generator) for name, t in original.items()}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8))

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        worker = create_rollout_worker(
            checkpoint,
            ModelConfig(preset="tiny"),
            RolloutConfig(max_new_tokens=16, enforce_eager=True, kv_cache_gib=0.25, seed=0),
            PlacementConfig(num_cpus=1),
        )
        assert ray.get(worker.ping.remote(), timeout=300) == "pong"

        def greedy() -> list[int]:
            rollouts = ray.get(worker.generate.remote([image], 1, temperature=0.0), timeout=120)
            return rollouts[0].completions[0].token_ids

        before = greedy()
        assert (
            ray.get(
                worker.update_weights.remote(
                    [ray.put(b) for b in serialize_buckets(perturbed.items(), 1 << 20)]
                )
            )
            == 1
        )
        assert greedy() != before
        # Pushing the checkpoint's own weights back restores the original outputs exactly.
        assert (
            ray.get(
                worker.update_weights.remote(
                    [ray.put(b) for b in serialize_buckets(original.items(), 1 << 20)]
                )
            )
            == 2
        )
        assert ray.get(worker.weight_version.remote()) == 2
        assert greedy() == before
    finally:
        ray.shutdown()
