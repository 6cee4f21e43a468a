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


@pytest.mark.parametrize("preset", ["proof", "tint-check"])
def test_the_learning_presets_are_cpu_default_plus_their_settings(preset):
    config, base = load_config(preset), load_config("cpu-default")
    assert config.model.path == base.model.path and config.rollout == base.rollout
    assert config.learner.advantage == "mean_only" and config.learner.grad_clip == 0.03
