"""Presets that start from another (`base:`): sections merge key by key, loops and bad bases fail early."""

from __future__ import annotations

import pytest

from configs.load import ConfigError, load_config


def test_a_preset_overrides_its_base_key_by_key(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: cpu-default\nlearner: {lr: 3.0e-4}\ntrain: {steps: 7}\n")
    config, base = load_config(tmp_path / "mine.yaml"), load_config("cpu-default")
    assert config.learner.lr == 3e-4 and config.train.steps == 7
    # Keys the preset leaves alone keep the base's values, within a section it touches too.
    assert (
        config.learner.beta == base.learner.beta
        and config.train.images_per_step == base.train.images_per_step
    )
    assert config.model == base.model
    assert load_config(tmp_path / "mine.yaml", ["train.steps=9"]).train.steps == 9


def test_a_base_chain_that_loops_or_names_no_preset_fails_with_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: [cpu-default]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base must name a preset"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: no-such-preset\n")
    with pytest.raises(ConfigError, match="unknown config preset 'no-such-preset'"):
        load_config(tmp_path / "d.yaml")


def test_the_proof_is_make_train_run_longer_and_the_tint_check_keeps_its_measured_settings():
    base = load_config("cpu-default")
    assert base.learner.advantage == "mean_only" and base.learner.grad_clip == 0.03
    assert base.reward.on_parse_failure == "exclude" and base.reward.fidelity == "label_only"
    proof = load_config("proof")
    assert (proof.train.steps, proof.train.images_per_step, proof.eval.every) == (300, 16, 100)
    for section in ("model", "rollout", "learner", "reward", "cluster", "data"):
        assert getattr(proof, section) == getattr(base, section), section
    assert proof.eval.model_copy(update={"every": 0}) == base.eval
    # The tint check's bounds (tests/test_learning.py) were measured on these settings.
    tint = load_config("tint-check")
    assert tint.model.path == "models/vqr1-small-cold-start" and tint.rollout == base.rollout
    assert (tint.learner.lr, tint.learner.warmup_steps, tint.learner.grad_clip) == (1e-3, 0, 0.03)
    assert (tint.reward.on_parse_failure, tint.reward.fidelity) == ("random", "published")
    assert (tint.eval.num_samples, tint.eval.temperature) == (16, 1.0)


def test_one_seed_seeds_the_rollouts_and_evaluations_unless_they_have_their_own():
    config = load_config("cpu-tiny", ["train.seed=7"])
    assert config.rollout.seed == 7 and config.eval.seed == 7
    config = load_config("cpu-tiny", ["train.seed=7", "rollout.seed=3", "eval.seed=4"])
    assert (config.train.seed, config.rollout.seed, config.eval.seed) == (7, 3, 4)
