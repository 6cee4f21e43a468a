"""Checkpoints are atomic, verified by checksums, pruned to the last K; a damaged latest one is skipped."""

import json

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
    assert set(manifest) == {"model.safetensors", "state.json"}


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
    from types import SimpleNamespace

    from cluster.train import forget_trained_images_after, log_trained_images, read_trained_images

    config = SimpleNamespace(train=SimpleNamespace(output_dir=str(tmp_path)))
    for step in (1, 2, 3):
        log_trained_images(config, step, [f"img-{step}-a", f"img-{step}-b"])
    forget_trained_images_after(config, 2)
    assert read_trained_images(tmp_path) == [
        {"step": 1, "image_ids": ["img-1-a", "img-1-b"]},
        {"step": 2, "image_ids": ["img-2-a", "img-2-b"]},
    ]
    forget_trained_images_after(config, 0)
    assert read_trained_images(tmp_path) == []
