"""One GPU: a rollout engine and a learner rank colocated, the engine asleep while the learner trains.

Pure: the sleep level against what each preset's push covers (configs/sleep.py), and the combinations the
config refuses. One short colocated cpu-tiny run (vLLM's CPU build has no sleep mode: its sleep pauses the
scheduler and clears the caches) checks the order of the hand-overs on the actors and that its metric
history is the dedicated run's (`first_run`, same settings) at k = 0.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from configs.load import ConfigError, load_config
from configs.sleep import (
    WEIGHT_GROUPS,
    lora_push_targets,
    preserve_patterns,
    pushed_weight_groups,
    sleep_level_problem,
)
from vlm.weight_sync import RolloutWorkersClient, ipc_buffer_bytes, open_weight_sender, pickled_ipc_handles

PRESETS = sorted(path.stem for path in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
ALL = set(WEIGHT_GROUPS)
LORA_UNPUSHED = {"vision_tower", "embed_tokens", "lm_head", "norms"}


def pushed_groups(config) -> set[str]:
    return pushed_weight_groups(config.model.freeze_vision, lora_push_targets(config.learner.lora))


@pytest.mark.parametrize("preset", PRESETS)
def test_level_2_is_allowed_only_where_every_weight_is_pushed_or_kept_by_name(preset):
    config = load_config(preset)
    pushed = pushed_groups(config)
    unpushed = ALL - pushed
    assert sleep_level_problem(1, pushed, set()) is None  # level 1 keeps every weight
    assert sleep_level_problem(2, pushed, unpushed) is None
    problem = sleep_level_problem(2, pushed, set())
    assert (problem is None) == (not unpushed)
    if unpushed:
        assert str(sorted(unpushed, key=list(WEIGHT_GROUPS).index)) in problem
        for group in unpushed:  # one group short is one too few
            assert sleep_level_problem(2, pushed, unpushed - {group}) is not None
    if config.cluster.placement == "colocate":  # the preset's own pairing loaded, so it is one of these
        colocate = config.cluster.colocate
        assert colocate.sleep_level == 1 or unpushed <= set(colocate.keep_weights)
    lora = config.learner.lora
    if lora is None:
        # Full fine-tuning pushes every trainable parameter: all of them, the vision tower unless frozen.
        assert unpushed == ({"vision_tower"} if config.model.freeze_vision else set())
    elif sorted(lora.target_modules) == sorted(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ):
        assert unpushed == LORA_UNPUSHED


def test_the_one_gpu_preset_keeps_exactly_what_its_lora_push_leaves_out():
    config = load_config("gpu-7b-1gpu-lora")
    assert config.cluster.placement == "colocate" and config.cluster.colocate.sleep_level == 2
    assert set(config.cluster.colocate.keep_weights) == ALL - pushed_groups(config)
    assert config.learner.lora is not None and config.model.freeze_vision
    assert config.cluster.rollout.num_gpus + config.cluster.learner.num_gpus == 1
    assert config.train.max_staleness == 0 and config.cluster.resolved_weight_transport == "ipc"


def test_a_lora_push_of_some_projections_sends_their_packed_layers_whole():
    config = load_config("cpu-tiny", ["learner.lora={target_modules: [q_proj, up_proj]}"])
    pushed = pushed_groups(config)
    assert pushed == {"qkv_proj", "gate_up_proj"}  # vLLM loads q/k/v and gate/up as one layer each
    problem = sleep_level_problem(2, pushed, LORA_UNPUSHED)
    assert "['o_proj', 'down_proj']" in problem and "cluster.colocate.keep_weights" in problem


def test_an_adapter_push_writes_no_base_weight_so_level_2_must_keep_every_group():
    adapter = ["learner.lora.push=adapter", "cluster.weight_transport=object_store"]
    with pytest.raises(
        ConfigError, match=r"does not send \['qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj'\]"
    ):
        load_config("gpu-7b-1gpu-lora", adapter)
    config = load_config("gpu-7b-1gpu-lora", [*adapter, "cluster.colocate.sleep_level=1"])
    assert pushed_groups(config) == set()
    keep_all = "cluster.colocate.keep_weights=[" + ", ".join(WEIGHT_GROUPS) + "]"
    load_config("gpu-7b-1gpu-lora", [*adapter, keep_all])


def test_an_adapter_push_refuses_cuda_ipc_as_it_refuses_nccl():
    # vLLM's weight transfer, IPC as NCCL, drops the adapters when it finishes: the way out is named.
    with pytest.raises(
        ConfigError, match=r"\(ipc\) loads what it receives.*cluster.weight_transport=object_store"
    ):
        load_config("gpu-7b-1gpu-lora", ["learner.lora.push=adapter", "cluster.colocate.sleep_level=1"])


def test_ipc_handles_cross_a_multiprocess_engine_pickled_and_come_back_as_vllm_reads_them(monkeypatch):
    """A multiprocess engine's messages cannot carry torch objects: the handles travel as vLLM's
    `ipc_handles_pickled`, which its update info turns back into the same handles, and only where the
    engine core allows it (RolloutEngine sets VLLM_ALLOW_INSECURE_SERIALIZATION there)."""
    from vllm import envs
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo

    # What reduce_tensor returns for a CUDA tensor (rebuild_cuda_tensor's arguments), with a GPU's UUID.
    args = (torch.Tensor, torch.Size([4, 2]), (2, 1), 0, torch.UntypedStorage, torch.bfloat16, 0)
    args += (b"cuda-ipc-handle", 16, 0, False, b"ref-counter", 0, b"event", True)
    update = {
        "names": ["model.layers.0.mlp.down_proj.weight"],
        "dtype_names": ["bfloat16"],
        "shapes": [[4, 2]],
        "ipc_handles": {"GPU-5d2c": args},
        "tensor_sizes": [16],
    }
    wire = pickled_ipc_handles(update)
    assert "ipc_handles" not in wire and isinstance(wire["ipc_handles_pickled"], str)
    assert update["ipc_handles"] == {"GPU-5d2c": args}  # the caller's update is left as it was
    envs.disable_envs_cache()
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "0")
    with pytest.raises(ValueError, match="VLLM_ALLOW_INSECURE_SERIALIZATION=1"):
        IPCWeightTransferUpdateInfo(**wire)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    read = IPCWeightTransferUpdateInfo(**wire)
    assert read.ipc_handles == {"GPU-5d2c": args} and read.names == update["names"]


def test_the_ipc_push_opens_no_group_and_its_buffer_holds_the_largest_tensor(monkeypatch):
    sent: list[dict] = []
    workers = [SimpleNamespace(init_weight_transfer=SimpleNamespace(remote=sent.append)) for _ in range(2)]
    client = RolloutWorkersClient(workers, None)
    monkeypatch.setattr(client, "_wait", lambda calls: None)
    client.init_weight_transfer_engine({"packed": True})
    assert sent == [{"packed": True}, {"packed": True}]  # no NCCL rank offset for vLLM's IPC init info
    # A 7B embedding in bf16 (152064 x 3584) is larger than the 1 GiB buckets of the GPU presets.
    embedding = ("model.embed_tokens.weight", torch.bfloat16, (152064, 3584))
    projection = ("model.layers.0.mlp.down_proj.weight", torch.bfloat16, (3584, 18944))
    assert ipc_buffer_bytes([projection], 1 << 30) == 1 << 30
    assert ipc_buffer_bytes([projection, embedding], 1 << 30) == 152064 * 3584 * 2
    assert ipc_buffer_bytes([], 64 << 20) == 64 << 20
    with pytest.raises(ValueError, match="transport 'object_store' \\(nccl or ipc\\)"):
        open_weight_sender("object_store", list, [], workers, rank=0)  # buckets need no sender


def test_kept_groups_are_known_and_a_tied_output_head_is_kept_as_the_embeddings():
    assert "unknown weight groups ['visual']" in sleep_level_problem(1, ALL, {"visual"})
    keep = ["vision_tower", "embed_tokens", "lm_head"]
    assert preserve_patterns(keep, tied_embeddings=False) == [WEIGHT_GROUPS[g] for g in keep]
    assert preserve_patterns(keep, tied_embeddings=True) == [WEIGHT_GROUPS[g] for g in keep[:2]]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.max_staleness=1"], "no batch can be generated during training"),
        (["cluster.rollout.num_gpus=1", "cluster.learner.num_gpus=1"], r"must be at most 1"),
        (["rollout.tensor_parallel_size=2"], "is not built"),
        (["learner.zero_stage=0", "cluster.colocate.offload_learner_states=true"], "zero_stage >= 1"),
        (["learner.zero_stage=3", "cluster.colocate.offload_learner_states=true"], "only for its FusedAdam"),
        (["model.freeze_vision=true", "cluster.colocate.sleep_level=2"], r"does not send \['vision_tower'\]"),
    ],
)
def test_colocation_refuses_what_cannot_share_a_device(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cpu-tiny", ["cluster.placement=colocate", *overrides])
    load_config("cpu-tiny", overrides)  # dedicated, each is fine


def test_zero_3_learners_offload_their_states_only_with_the_optimizer_in_host_memory():
    """DeepSpeed 0.19.8 leaves a host-memory optimizer's states out of offload_states, so ZeRO-3's
    FusedAdam-only rule does not apply to it."""
    settings = ["learner.zero_stage=3", "learner.offload_optimizer=true"]
    config = load_config(
        "cpu-tiny", ["cluster.placement=colocate", "cluster.colocate.offload_learner_states=true", *settings]
    )
    assert config.cluster.colocate.offload_learner_states and config.learner.zero_stage == 3


# --- one colocated cpu-tiny run ---------------------------------------------------------------------

# Between an engine's sleep and its next generate call, in this order (both learner ranks' calls fall
# between the engine's).
HAND_OVER = [
    "sleep",
    "reload_states",
    "train_step",
    "offload_states",
    "wake_up weights",
    "update_weights",
    "wake_up kv_cache",
]


@pytest.fixture(scope="module")
def colocated_run(tmp_path_factory, tiny_overrides):
    """first_run's settings colocated (level 2, learner states offloaded), and each actor's device calls,
    read before Ray shuts down."""
    import ray

    import cluster.train
    from cluster.train import run

    tmp_path = tmp_path_factory.mktemp("colocated-run")
    config = load_config(
        "cpu-tiny",
        tiny_overrides(
            tmp_path,
            3,
            "checkpoint.every=1",
            "train.verify_weight_sync=true",
            "cluster.placement=colocate",
            "cluster.colocate.sleep_level=2",
            "cluster.colocate.offload_learner_states=true",
        ),
    )
    systems = []
    create_system, shutdown = cluster.train.create_system, ray.shutdown

    def kept_system(*args, **kwargs):
        systems.append(create_system(*args, **kwargs))
        return systems[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster.train, "create_system", kept_system)
        patch.setattr(ray, "shutdown", lambda: None)
        try:
            result = run(config)
            (system,) = systems
            actors = system.rollout_workers + system.learners
            calls = ray.get([actor.device_call_log.remote() for actor in actors], timeout=120)
            groups = dict(system.placement_group)
        finally:
            shutdown()
    return config, result, calls, groups


@pytest.mark.slow
def test_the_engine_sleeps_while_the_learners_train_and_wakes_in_two_parts(colocated_run):
    config, _, calls, groups = colocated_run
    # One placement group; bundle i holds rollout worker i's and learner rank i's CPUs (0.5 each).
    assert groups["rollout"] is groups["learner"]
    assert groups["rollout"].bundle_specs == [{"CPU": 1.0}] * config.learner.num_workers
    timeline = [name for _, name in sorted(call for actor_calls in calls for call in actor_calls)]
    merged = [name for i, name in enumerate(timeline) if i == 0 or name != timeline[i - 1]]  # ranks alike
    sleeps = [i for i, name in enumerate(merged) if name == "sleep"]
    assert len(sleeps) == config.train.steps
    for start in sleeps:
        assert merged[start : start + len(HAND_OVER)] == HAND_OVER, merged
        assert merged[start - 1] == "generate" and merged[start + len(HAND_OVER)] == "generate"
    # The learners' states wait in host memory from start-up to the first update.
    assert merged.index("offload_states") < merged.index("generate") < merged.index("reload_states")


@pytest.mark.slow
def test_a_colocated_run_trains_exactly_as_the_dedicated_one_at_k_0(colocated_run, first_run):
    """Same settings, same seeds: only the device sharing differs, and it changes no number."""
    from cluster.tracking import metric_histories

    _, first_config, first = first_run
    config, result, _, _ = colocated_run
    keys = (
        "reward/total_mean",
        "reward/format_mean",
        "response/length_mean",
        "learner/loss",
        "learner/kl",
        "learner/grad_norm",
        "sync/max_abs_logprob_diff",
    )
    colocated = metric_histories(config.tracking.tracking_uri, result["mlflow_run_id"], keys)
    dedicated = metric_histories(first_config.tracking.tracking_uri, first["mlflow_run_id"], keys)
    for key in keys:
        assert [(m.step, m.value) for m in colocated[key]] == [(m.step, m.value) for m in dedicated[key]], key
    assert [
        m.step
        for m in metric_histories(config.tracking.tracking_uri, result["mlflow_run_id"], ("time/sleep_s",))[
            "time/sleep_s"
        ]
    ] == [1, 2, 3]
    assert result["after"] == first["after"]


@pytest.mark.long
def test_a_colocated_run_that_loses_a_learner_rank_a_rollout_worker_and_the_reward_actor_heals(tmp_path):
    """bench.chaos --colocate: a colocated run (level 2, states offloaded) loses a learner rank while its
    engine generates (found at the next hand-over: the learners restart from the newest checkpoint, the
    engines are woken whole and take the restored weights), a rollout worker's actor half a second into
    a step (found by whichever call comes next: a generation, or a sleep or wake-up, `hand_over`, whose
    own case is in tests/test_recovery.py) and the reward actor; it trains the fault-free colocated
    run's images into its final weights."""
    from bench.chaos import COLOCATED, Fault, chaos_run

    faults = [Fault(2, "learner rank", 0.0), Fault(4, "rollout actor", 0.5), Fault(6, "reward actor", 0.1)]
    report, chaos = chaos_run(8, faults, tmp_path, extra=COLOCATED)
    assert all(fault.killed for fault in faults), chaos.output[-6000:]
    assert report["holds"], chaos.output[-4000:]
    events = report["replacements"]
    assert sorted(e["role"] for e in events) == ["learner group", "reward actor", "rollout worker"], events
