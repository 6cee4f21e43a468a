"""Checkpoints are atomic, verified by checksums, pruned to the last K; a damaged latest one is skipped."""

import json

import pytest

from cluster import checkpoints


def fake_checkpoint(root, step, payload=b"weights"):
    staging = checkpoints.staging_dir(root, step)
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(payload * 100)
    return checkpoints.commit(
        root, step, {"step": step, "sampler": {"epoch": 0, "position": step}}, keep_last=2
    )


def test_commit_renames_and_keeps_last_k(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003"]
    folder, state = checkpoints.latest_valid(tmp_path)
    assert folder.name == "step-000003" and state["step"] == 3
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest) == {"model.safetensors", "state.json", checkpoints.IN_FLIGHT}
    assert checkpoints.read_in_flight(folder) == []  # a synchronous run has no rollouts in flight


def test_truncated_latest_weights_fall_back_to_previous(tmp_path, caplog):
    fake_checkpoint(tmp_path, 1)
    latest = fake_checkpoint(tmp_path, 2)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    folder, state = checkpoints.latest_valid(tmp_path)
    assert folder.name == "step-000001" and state["step"] == 1
    assert "checksum mismatch in model.safetensors" in caplog.text


def test_incomplete_staging_and_missing_manifest_are_ignored(tmp_path):
    fake_checkpoint(tmp_path, 1)
    checkpoints.staging_dir(tmp_path, 2).mkdir(parents=True)  # a crash mid-write
    no_manifest = checkpoints.step_dir(tmp_path, 3)
    no_manifest.mkdir()
    (no_manifest / "state.json").write_text("{}")
    folder, _ = checkpoints.latest_valid(tmp_path)
    assert folder.name == "step-000001"
    assert checkpoints.verify(no_manifest) == "no manifest (incomplete checkpoint)"


def test_no_checkpoint_at_all(tmp_path):
    assert checkpoints.latest_valid(tmp_path) is None


def test_resume_forgets_the_trained_images_of_steps_after_the_checkpoint(tmp_path):
    """A run killed during step 3 logged it, but its update was lost: resuming from step 2 drops it."""
    for step in (1, 2, 3):
        checkpoints.log_trained_images(
            tmp_path, step, [f"img-{step}-a", f"img-{step}-b"], [step - 1, step - 1]
        )
    checkpoints.forget_trained_images_after(tmp_path, 2)
    assert checkpoints.read_trained_images(tmp_path) == [
        {"step": 1, "image_ids": ["img-1-a", "img-1-b"], "weight_versions": [0, 0]},
        {"step": 2, "image_ids": ["img-2-a", "img-2-b"], "weight_versions": [1, 1]},
    ]
    checkpoints.forget_trained_images_after(tmp_path, 0)
    assert checkpoints.read_trained_images(tmp_path) == []


def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside(tmp_path):
    """Left in place, a longer earlier run's step-7 and step-8 would be what a resume picks, and pruning
    (keep 2) would delete the new run's step 1 the moment it is written."""
    assert checkpoints.set_aside_earlier_run(tmp_path / "absent") is None
    for step in (7, 8):
        fake_checkpoint(tmp_path, step, payload=b"earlier")
    checkpoints.staging_dir(tmp_path, 9).mkdir()  # a step the earlier run never finished
    previous = checkpoints.set_aside_earlier_run(tmp_path)
    assert previous == tmp_path / "previous-run"
    assert sorted(p.name for p in previous.iterdir()) == [".tmp-step-000009", "step-000007", "step-000008"]
    assert checkpoints.verify(previous / "step-000008") is None  # moved whole, still loadable
    assert checkpoints.latest_valid(tmp_path) is None

    fake_checkpoint(tmp_path, 1, payload=b"fresh")
    folder, state = checkpoints.latest_valid(tmp_path)
    assert folder.name == "step-000001" and state["step"] == 1

    # The next fresh run replaces what was set aside before.
    assert checkpoints.set_aside_earlier_run(tmp_path) == previous
    assert sorted(p.name for p in previous.iterdir()) == ["step-000001"]
    assert checkpoints.set_aside_earlier_run(tmp_path) is None


def test_a_model_inside_the_checkpoint_folder_is_refused(tmp_path, tiny_overrides):
    from cluster.train import run
    from configs.load import load_config

    model = checkpoints.step_dir(tmp_path / "checkpoints", 3)
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    config = load_config("cpu-tiny", tiny_overrides(tmp_path, 1, f"model.path={model}"))
    with pytest.raises(ValueError, match="is inside checkpoint.dir"):
        run(config)
