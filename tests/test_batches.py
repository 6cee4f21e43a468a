import numpy as np
import pytest

from cluster.batches import DatasetBatchSampler, SamplerState


def test_batches_stay_within_one_dataset_and_cover_each_epoch_once():
    names = ["a"] * 10 + ["b"] * 7
    sampler = DatasetBatchSampler(names, images_per_step=3, seed=1)
    seen = []
    for _ in range(3 + 2):  # 10 // 3 + 7 // 3 batches in one epoch
        batch = sampler.next_batch()
        assert len({names[i] for i in batch}) == 1
        seen.extend(batch.tolist())
    assert len(seen) == len(set(seen)) == 15
    assert sampler.state == SamplerState(epoch=0, position=5)
    sampler.next_batch()
    assert sampler.state == SamplerState(epoch=1, position=1)


def test_resume_from_state_continues_with_the_same_next_batch():
    names = ["a"] * 12
    run = DatasetBatchSampler(names, 4, seed=7)
    uninterrupted = [run.next_batch().tolist() for _ in range(7)]
    first = DatasetBatchSampler(names, 4, seed=7)
    head = [first.next_batch().tolist() for _ in range(4)]
    resumed = DatasetBatchSampler(names, 4, seed=7)
    resumed.state = SamplerState(**vars(first.state))
    tail = [resumed.next_batch().tolist() for _ in range(3)]
    assert head + tail == uninterrupted
    # Different epochs shuffle differently.
    assert not np.array_equal(run.epoch_batches(0), run.epoch_batches(1))


def test_too_few_images_is_a_clear_error():
    with pytest.raises(ValueError, match="images_per_step=8"):
        DatasetBatchSampler(["a"] * 5, 8, seed=0)
