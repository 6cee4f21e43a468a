"""The config tree rejects bad input before anything starts, naming the key and the file."""

from pathlib import Path

import pytest

from configs.load import PRESETS_DIR, ConfigError, dump_config, load_config
from configs.schema import Config


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_preset_loads(preset):
    config = load_config(preset)
    assert isinstance(config, Config)
    # A dumped config loads back to the same values.
    assert Config.model_validate(__import__("yaml").safe_load(dump_config(config))) == config


def test_overrides_are_typed_and_applied():
    config = load_config("cpu-tiny", ["learner.lr=1e-6", "rollout.num_generations=6", "reward.group_size=2"])
    assert config.learner.lr == 1e-6
    assert config.rollout.num_generations == 6
    assert config.reward.group_size == 2


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = write(tmp_path, "learner:\n  learning_rate: 1e-6\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "learner.learning_rate: unknown key" in str(err.value)
    assert str(path) in str(err.value)


def test_wrong_type_is_named(tmp_path):
    path = write(tmp_path, "rollout:\n  num_generations: many\n")
    with pytest.raises(ConfigError, match=r"rollout\.num_generations"):
        load_config(path)


def test_fidelity_with_one_generation_is_rejected():
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        load_config("cpu-tiny", ["rollout.num_generations=1"])
    # Without the fidelity reward G = 1 is allowed (format-only training).
    load_config("cpu-tiny", ["rollout.num_generations=1", "reward.fidelity_weight=0"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("reward.group_size=64", "group_size"),
        ("learner.num_workers=3", "divisible"),
        ("model.min_pixels=999999", "min_pixels"),
        ("data.split_ratios=[0.5,0.5,0.5]", "split_ratios"),
        ("reward.score_range=[5,1]", "score_range"),
        ("learner.zero_stage=4", "zero_stage"),
        ("cluster.placement=everywhere", "placement"),
        ("cluster.weight_transport=nccl", "weight_transport=nccl needs whole GPUs"),
        ("cluster.weight_transport=ipc", "weight_transport=ipc hands a learner rank's GPU memory"),
        ("model.gradient_checkpointing=true", "share_prompt_forward needs the KV cache"),
    ],
)
def test_impossible_combinations_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cpu-tiny", [override])


def test_bad_override_syntax_and_missing_preset(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("cpu-tiny", ["learner.lr"])
    with pytest.raises(ConfigError, match="unknown config preset"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = write(tmp_path, "learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("preset", "overrides", "transport"),
    [
        ("cpu-tiny", [], "object_store"),
        ("gpu-7b-1node", [], "nccl"),
        ("gpu-7b-1node", ["cluster.weight_transport=object_store"], "object_store"),
        # Two ranks cannot share one GPU in an NCCL group: a colocated rollout worker and learner rank
        # (one GPU between them) push by CUDA IPC, and GPU fractions without colocation through the
        # object store.
        ("gpu-7b-1gpu-lora", [], "ipc"),
        ("gpu-7b-1gpu-lora", ["cluster.weight_transport=object_store"], "object_store"),
        ("gpu-7b-1node", ["cluster.rollout.num_gpus=0.5", "cluster.learner.num_gpus=0.5"], "object_store"),
        ("cpu-tiny", ["cluster.placement=colocate"], "object_store"),
    ],
)
def test_weight_transport_auto_picks_nccl_or_ipc_only_when_both_sides_have_gpus(preset, overrides, transport):
    assert load_config(preset, overrides).cluster.resolved_weight_transport == transport


GPU_PRESETS = ["gpu-7b-1node", "gpu-7b-2node", "paper-recipe-7b"]


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_presets_train_the_whole_model_with_sdpa(preset):
    model = load_config(preset).model
    # The published recipe fine-tunes the vision tower too (docs/method.md); sdpa needs no extra.
    assert not model.freeze_vision
    assert model.attn_implementation == "sdpa"


def test_flash_attention_is_checked_when_the_config_loads(monkeypatch):
    import sys
    import types

    flash = ["model.attn_implementation=flash_attention_2"]
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # an import of it fails, installed or not
    with pytest.raises(ConfigError, match=r"flash_attention_2 needs the flash_attn package.*sdpa"):
        load_config("gpu-7b-1node", flash)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert load_config("gpu-7b-1node", flash).model.attn_implementation == "flash_attention_2"


def test_cpu_affinity_pins_an_actor_process_and_its_torch_threads():
    import os
    import subprocess
    import sys

    from configs.runtime_env import cpu_affinity_env

    probe = "import os, torch; from configs.runtime_env import pin_from_env; pin_from_env(); print(sorted(os.sched_getaffinity(0)), torch.get_num_threads())"
    env = {**os.environ, **cpu_affinity_env([0])}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[0]", "1"]
    assert cpu_affinity_env(None) == {} and load_config(
        "cpu-tiny", ["cluster.rollout.cpu_affinity=[1]"]
    ).cluster.rollout.cpu_affinity == [1]


def test_async_step_model_overlaps_generation_with_reward_and_learner():
    from bench.scaling import StepModel, async_gain

    model = StepModel(8, 0.5, 0.1, 1.0, 0.02, 0.05, 0.2, 0.1, 10**6)
    sync, overlapped = model.predict(1, 1, 16), model.predict(1, 1, 16, max_staleness=1)
    phases = {key: sync[key] for key in ("generate", "reward", "learner", "weight_push", "driver")}
    assert sync["step"] == pytest.approx(sum(phases.values()))
    expected = (
        max(phases["generate"], phases["reward"] + phases["learner"])
        + phases["weight_push"]
        + phases["driver"]
    )
    assert overlapped["step"] == pytest.approx(expected)
    fixed = (phases["weight_push"] + phases["driver"]) / sync["step"]
    assert async_gain(phases["generate"] / sync["step"], fixed) == pytest.approx(
        sync["step"] / overlapped["step"]
    )
    # Halves that balance hide one of them entirely: 2x; nothing to overlap: 1x.
    assert async_gain(0.5, 0.0) == pytest.approx(2.0) and async_gain(0.0, 0.1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shares"):
        async_gain(0.8, 0.3)


def test_off_policy_correction_follows_max_staleness_and_needs_untempered_sampling():
    assert load_config("cpu-tiny").learner.off_policy_correction == "none"
    assert load_config("cpu-tiny", ["train.max_staleness=1"]).learner.off_policy_correction == "tis"
    explicit = load_config("cpu-tiny", ["train.max_staleness=1", "learner.off_policy_correction=none"])
    assert explicit.learner.off_policy_correction == "none"
    # vLLM's raw log-probs are the sampling distribution only at temperature 1 without truncation.
    for override in ("rollout.temperature=0.7", "rollout.top_p=0.9", "rollout.top_k=50"):
        with pytest.raises(ConfigError, match="off_policy_correction=tis"):
            load_config("cpu-tiny", ["train.max_staleness=1", override])
    assert load_config("cpu-tiny", ["rollout.temperature=0.7"]).learner.off_policy_correction == "none"
    with pytest.raises(ConfigError, match="max_staleness"):
        load_config("cpu-tiny", ["train.max_staleness=-1"])
