"""The GPU path as far as it runs on a CPU (issue 28): the sampling parameters against vLLM's CUDA model
runner's limits, the weight-transfer rendezvous order, per-engine seeds, the one-GPU-per-actor check,
placement on fake GPU nodes, ZeRO-3 loading into partitions, and bench.gpu_check's stages.

The placement and learner tests share one Ray cluster of fake GPU nodes (Ray places GPUs it is told
about; nothing here touches a GPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from configs.runtime_env import apply_default_env

apply_default_env()

import ray  # noqa: E402

from actor.rollout_actor import engine_seed  # noqa: E402
from actor.rollout_engine import DIGIT_TOP_K, build_sampling_params  # noqa: E402
from bench import gpu_check  # noqa: E402
from cluster import system as system_module  # noqa: E402
from cluster.system import RemoteCallError, System, create_system, open_weight_transfer, reserve_placement  # noqa: E402
from configs.load import load_config  # noqa: E402
from configs.schema import LearnerConfig, ModelConfig, RolloutConfig  # noqa: E402
from vlm.tokens import SPECIAL_TOKENS, STOP_TOKENS, VISION_SPECIAL_TOKENS  # noqa: E402
from vlm.weight_sync import gpu_visibility_problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Qwen2.5-VL-7B-Instruct's tokenizer: 151,665 tokens, its special tokens from <|endoftext|> = 151,643 on,
# in vlm.tokens.SPECIAL_TOKENS order.
QWEN_VOCAB = 151_665
QWEN_FIRST_SPECIAL_ID = 151_643


def qwen_id(token: str) -> int:
    return QWEN_FIRST_SPECIAL_ID + SPECIAL_TOKENS.index(token)


# --- 1. vision-token suppression within Model Runner V2's limits --------------------------------------


@pytest.fixture
def v2_logit_bias_state(monkeypatch):
    """Model Runner V2's per-request logit-bias state, built on the CPU the way vLLM's own CPU V2 runner
    builds it (vllm/v1/worker/cpu/shm.py: plain CPU buffers for the pinned UVA ones)."""
    from vllm.v1.worker.cpu import buffer_utils as cpu_buffers
    from vllm.v1.worker.gpu import buffer_utils as gpu_buffers
    from vllm.v1.worker.gpu.sample.logit_bias import LogitBiasState
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState

    monkeypatch.setattr(gpu_buffers, "UvaBuffer", cpu_buffers.UvaBuffer)
    requests = LogitsProcRequestState(
        device=torch.device("cpu"),
        max_num_reqs=4,
        vocab_size=QWEN_VOCAB,
        all_token_ids=None,
        prompt_len=gpu_buffers.UvaBackedTensor(4, dtype=torch.int32),
        prefill_len=None,
        total_len=None,
    )
    return LogitBiasState(None, requests)


def test_the_engines_sampling_params_pass_model_runner_v2_on_a_qwen_vocabulary(v2_logit_bias_state):
    from vllm import SamplingParams
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    vision = [qwen_id(t) for t in VISION_SPECIAL_TOKENS]
    stops = [qwen_id(t) for t in STOP_TOKENS]
    params = build_sampling_params(RolloutConfig(), stops, vision, n=6, top_logprobs=DIGIT_TOP_K)
    assert params.allowed_token_ids is None
    v2_logit_bias_state.add_request(0, params)  # V2 raises here when a list is over its cap
    # What V2 stages for its kernel: exactly the vision ids, each pushed to -inf.
    assert v2_logit_bias_state.logit_bias_token_ids._staged_write_contents == vision
    assert v2_logit_bias_state.logit_bias._staged_write_contents == [float("-inf")] * len(vision)
    # vLLM's request check (ids inside the vocabulary), and the trip to the multiprocess engine core.
    params._validate_logit_bias(SimpleNamespace(get_vocab_size=lambda: QWEN_VOCAB))
    received = MsgpackDecoder(SamplingParams).decode(MsgpackEncoder().encode(params))
    assert received.logit_bias == dict.fromkeys(vision, float("-inf"))

    # The engine's former request, every id but the vision ones, is what V2 refused.
    former = SamplingParams(allowed_token_ids=[i for i in range(QWEN_VOCAB) if i not in vision])
    with pytest.raises(ValueError, match="Too many allowed token IDs"):
        v2_logit_bias_state.add_request(1, former)
    # Suppression off: no bias at all.
    off = build_sampling_params(RolloutConfig(suppress_vision_tokens=False), stops, vision, n=1)
    assert off.logit_bias is None


# --- 3. weight-transfer rendezvous -------------------------------------------------------------------

DEAD = object()


class FakeActor:
    """A handle whose `.method.remote(*args)` logs (name, method, args) and returns its answer at once."""

    def __init__(self, name: str, log: list, answers: dict | None = None, dead: bool = False) -> None:
        self.name, self.log, self.answers, self.dead = name, log, answers or {}, dead

    def __getattr__(self, method: str):
        def remote(*args):
            self.log.append((self.name, method, args))
            return DEAD if self.dead else self.answers.get(method)

        return SimpleNamespace(remote=remote)


@pytest.fixture
def immediate_wait(monkeypatch):
    """cluster.system.wait over FakeActor answers: a dead actor's answer fails the call as Ray would."""

    def wait(refs, config, phase, step, actor):
        if any(ref is DEAD for ref in (refs if isinstance(refs, list) else [refs])):
            raise RemoteCallError(f"step {step}, phase {phase}: {actor} died")
        return refs

    monkeypatch.setattr(system_module, "wait", wait)


def fake_system(log: list, dead_worker: bool = False) -> System:
    workers = [FakeActor("rollout0", log), FakeActor("rollout1", log, dead=dead_worker)]
    learners = [FakeActor(f"learner{r}", log, {"rendezvous_address": ("10.0.0.1", 29500)}) for r in range(2)]
    return System(
        workers,
        None,
        learners,
        None,
        make_rollout_worker=lambda i: FakeActor(f"replacement{i}", log),
        make_reward=None,
        make_learners=None,
    )


def test_the_transfer_group_reopens_after_every_worker_answers_and_the_old_group_is_shut(immediate_wait):
    log = []
    system = fake_system(log)
    config = load_config("gpu-7b-1node")
    open_weight_transfer(system, config, step=0)
    system.rollout_workers[1] = system.make_rollout_worker(1)  # as after a replacement
    log.clear()
    open_weight_transfer(system, config, step=7)

    calls = [(name, method) for name, method, _ in log]
    current = ["rollout0", "replacement1"]
    assert calls == [
        *[(w, "ping") for w in current],
        ("learner0", "close_weight_transfer"),
        ("learner1", "close_weight_transfer"),
        *[(w, "shutdown_weight_transfer") for w in current],
        ("learner0", "rendezvous_address"),
        ("learner0", "open_weight_transfer"),
        ("learner1", "open_weight_transfer"),
    ]
    transport, handles, address, port, per_engine, timeout = log[-1][2]
    assert [h.name for h in handles] == current
    assert (transport, address, port, per_engine, timeout) == (
        "nccl",
        "10.0.0.1",
        29500,
        1,
        config.cluster.call_timeout_s,
    )


def test_colocated_gpus_open_the_ipc_transfer_without_an_address_and_push_through_it(immediate_wait):
    """CUDA IPC (colocated on GPUs): the same opening as NCCL less the rendezvous (no group, no port),
    every rank told the transport; a push is the learners' send_weights, then the version named on every
    worker, with no buckets in the object store."""
    log = []
    system = fake_system(log)
    config = load_config("gpu-7b-1gpu-lora")
    assert config.cluster.resolved_weight_transport == "ipc"
    open_weight_transfer(system, config, step=0)
    calls = [(name, method) for name, method, _ in log]
    assert calls == [
        ("rollout0", "ping"),
        ("rollout1", "ping"),
        ("learner0", "close_weight_transfer"),
        ("learner1", "close_weight_transfer"),
        ("rollout0", "shutdown_weight_transfer"),
        ("rollout1", "shutdown_weight_transfer"),
        ("learner0", "open_weight_transfer"),
        ("learner1", "open_weight_transfer"),
    ]
    transport, handles, address, port, _, _ = log[-1][2]
    assert (transport, address, port) == ("ipc", None, None) and handles == system.rollout_workers

    log.clear()
    system.policy_version = 5
    system_module.push_weights(system, config, step=5)
    assert [(name, method, args) for name, method, args in log] == [
        ("learner0", "send_weights", ()),
        ("learner1", "send_weights", ()),
        ("rollout0", "set_weight_version", (5,)),
        ("rollout1", "set_weight_version", (5,)),
    ]


def test_a_worker_that_does_not_answer_stops_the_opening_before_anything_is_shut(immediate_wait):
    log = []
    with pytest.raises(RemoteCallError, match="weight transfer setup: rollout workers died"):
        open_weight_transfer(fake_system(log, dead_worker=True), load_config("gpu-7b-1node"), step=3)
    assert {method for _, method, _ in log} == {"ping"}


# --- 4. per-engine seeds ------------------------------------------------------------------------------


def test_every_rollout_engine_draws_from_its_own_deterministic_seed():
    seeds = [engine_seed(7, index) for index in range(8)]
    assert len(set(seeds)) == 8
    assert seeds == [engine_seed(7, index) for index in range(8)]
    assert seeds[0] == 7  # one-worker runs keep the run seed (every CPU preset, the documented results)
    assert not set(seeds) & {engine_seed(8, index) for index in range(8)}  # neighbouring runs share none


# --- 8. one GPU per actor -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assigned", "visible", "count", "fine"),
    [
        ([], "", 0, True),  # a CPU actor
        ([3], "3", 1, True),  # what Ray sets up
        (["GPU-5d2c"], "GPU-5d2c", 1, True),  # devices named by UUID
        ([0], None, 1, True),  # a one-GPU node with nothing narrowed
        ([3], None, 8, False),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: every GPU visible
        ([3], "0,1,2,3,4,5,6,7", 8, False),  # the container's list left as it was
        ([3], "5", 1, False),  # one GPU, another actor's
        ([2, 3], "2,3", 2, False),  # two GPUs for an actor that works on one
    ],
)
def test_a_gpu_actor_must_see_exactly_its_own_gpu(assigned, visible, count, fine):
    problem = gpu_visibility_problem(assigned, visible, count)
    assert (problem is None) == fine
    if not fine:
        assert "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES" in problem
        assert f"sees {count} CUDA device" in problem


# --- 7. placement on fake GPU nodes -------------------------------------------------------------------

NODE = {"num_cpus": 40, "num_gpus": 8, "node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    """A Ray cluster of fake 8-GPU nodes on loopback (one at first; a test adds the second)."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # As cluster.system.start_ray: Ray's cluster mode would swap loopback for the machine's address.
    cluster_mode, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        # No worker processes started ahead for the 40 logical CPUs of a 2-core machine.
        head = {**NODE, "include_dashboard": False, "_system_config": {"prestart_worker_first_driver": False}}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def group_table(group) -> dict:
    from ray.util.placement_group import placement_group_table

    return placement_group_table(group)


def release(placement: dict) -> None:
    from ray.util.placement_group import remove_placement_group

    for group in {id(g): g for g in placement.values()}.values():
        remove_placement_group(group)


def placed_system(config, monkeypatch) -> tuple[list[dict], list[dict], dict]:
    """create_system of `config` on the fake cluster with stand-in actors: what each rollout worker and
    learner rank reports (GPUs, node; a worker's seed) and each role's placement group table."""
    import actor.rollout_actor
    import learner.learner_actor
    import rewards.reward_actor

    # Defined here, so cloudpickle sends them by value: Ray's workers cannot import this test module.
    def where() -> dict:
        return {"gpus": [str(i) for i in ray.get_gpu_ids()], "node": ray.get_runtime_context().get_node_id()}

    class RolloutStandIn:  # the real actor's constructor signature; no vLLM
        def __init__(
            self,
            model_path,
            model_cfg,
            rollout_cfg,
            free_bytes_to_wait_for=None,
            memory_release_deadline_s=0.0,
            colocate=None,
            lora=None,
            weight_transfer_backend="nccl",
        ) -> None:
            self.seed = rollout_cfg.seed
            self.backend = weight_transfer_backend

        def start_figures(self) -> dict:
            return {"seed": self.seed, "free_bytes": None}

        def ping(self) -> str:
            return "ok"

        def shutdown_weight_transfer(self) -> None:
            pass

        def report(self) -> dict:
            return {**where(), "seed": self.seed, "backend": self.backend}

    class LearnerStandIn:
        def __init__(self, rank, world_size) -> None:
            self.transport = None

        def rendezvous_address(self):
            return "127.0.0.1", 0

        def setup(self, *args, **kwargs) -> dict:
            return {}

        def offload_states(self) -> None:
            pass

        def close_weight_transfer(self) -> None:
            pass

        def open_weight_transfer(self, transport, *args) -> None:
            self.transport = transport

        def report(self) -> dict:
            return {**where(), "transport": self.transport}

    monkeypatch.setattr(actor.rollout_actor, "RolloutWorker", RolloutStandIn)
    monkeypatch.setattr(learner.learner_actor, "LearnerWorker", LearnerStandIn)
    monkeypatch.setattr(rewards.reward_actor, "create_reward_worker", lambda *args, **kwargs: None)
    system = create_system(config, Path("unused"), labels={})
    try:
        rollout = ray.get([w.report.remote() for w in system.rollout_workers], timeout=120)
        learners = ray.get([w.report.remote() for w in system.learners], timeout=120)
        tables = {role: group_table(group) for role, group in system.placement_group.items()}
    finally:
        for handle in system.rollout_workers + system.learners:
            ray.kill(handle)
        release(system.placement_group)
    return rollout, learners, tables


def test_gpu_7b_1node_gives_every_rollout_worker_and_learner_a_gpu_of_its_own(fake_gpu_cluster, monkeypatch):
    config = load_config("gpu-7b-1node", ["cluster.weight_transport=object_store"])  # no NCCL to open
    rollout, learners, tables = placed_system(config, monkeypatch)

    gpus = [tuple(r["gpus"]) for r in rollout + learners]
    assert all(len(g) == 1 for g in gpus) and len(set(gpus)) == 8  # one GPU each, eight different ones
    assert [r["seed"] for r in rollout] == [engine_seed(config.rollout.seed, i) for i in range(4)]
    assert len({r["seed"] for r in rollout}) == 4
    assert tables["rollout"]["placement_group_id"] != tables["learner"]["placement_group_id"]
    assert (tables["rollout"]["strategy"], tables["learner"]["strategy"]) == ("PACK", "STRICT_PACK")
    for table in tables.values():
        assert list(table["bundles"].values()) == [{"CPU": 4.0, "GPU": 1.0}] * 4


def test_gpu_7b_2node_keeps_the_learners_on_one_node(fake_gpu_cluster):
    from ray._private import ray_constants

    cluster_mode, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        fake_gpu_cluster.add_node(**NODE)
        fake_gpu_cluster.wait_for_nodes()
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
    assert ray.cluster_resources()["GPU"] == 16

    placement = reserve_placement(load_config("gpu-7b-2node"))
    try:
        tables = {role: group_table(group) for role, group in placement.items()}
    finally:
        release(placement)
    nodes = {role: set(table["bundles_to_node_id"].values()) for role, table in tables.items()}
    assert len(nodes["learner"]) == 1  # eight ranks on one node; the rollout workers on the other
    assert nodes["rollout"] and not nodes["rollout"] & nodes["learner"]
    assert [len(table["bundles"]) for table in tables.values()] == [8, 8]
    assert all(b["GPU"] == 1.0 for table in tables.values() for b in table["bundles"].values())

    # A learner group larger than a node is refused by name, not spread over the nodes.
    too_big = load_config(
        "gpu-7b-2node", ["learner.num_workers=12", "train.images_per_step=24", "cluster.call_timeout_s=3"]
    )
    with pytest.raises(RemoteCallError, match=r"learner bundles \(12 x .*\) were not free on one node"):
        reserve_placement(too_big)


def test_gpu_7b_1gpu_lora_puts_the_engine_and_the_learner_in_one_bundle_on_one_gpu(
    fake_gpu_cluster, monkeypatch
):
    rollout, learners, tables = placed_system(load_config("gpu-7b-1gpu-lora"), monkeypatch)
    assert rollout[0]["gpus"] == learners[0]["gpus"] and len(rollout[0]["gpus"]) == 1
    # The engine is built for vLLM's IPC backend and the learner opened its IPC sender to it.
    assert rollout[0]["backend"] == "ipc" and learners[0]["transport"] == "ipc"
    assert tables["rollout"] == tables["learner"]  # one placement group for both roles
    assert list(tables["rollout"]["bundles"].values()) == [{"CPU": 8.0, "GPU": 1.0}]


# --- 6. ZeRO-3 learners load into their partitions ----------------------------------------------------


def test_zero3_learners_load_partitioned_and_give_a_whole_models_log_probs(fake_gpu_cluster):
    from learner.learner_actor import LearnerWorker
    from learner.policy import PolicySample, load_policy_model, sequence_logprobs
    from vlm.factory import build_checkpoint, load_processor
    from vlm.prompts import build_prompt_text

    checkpoint = build_checkpoint("tiny", ROOT / ".cache" / "vqr1" / "models")
    model = ModelConfig()
    processor = load_processor(checkpoint, model.min_pixels, model.max_pixels)
    prompt = build_prompt_text(processor, thinking=True)
    rng = np.random.default_rng(0)
    shards = [
        [
            PolicySample(
                Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)), prompt, completions
            )
        ]
        for completions in ([[31, 200, 7, 45], [90, 12]], [[5, 300, 301], [77, 78, 79, 80, 81]])
    ]
    learner = LearnerConfig(
        num_workers=2, zero_stage=3, beta=0.04, micro_batch_size=2, lr_schedule="constant"
    )

    workers = [
        ray.remote(LearnerWorker)
        .options(num_cpus=0.5, runtime_env={"env_vars": apply_default_env()})
        .remote(r, 2)
        for r in range(2)
    ]
    try:
        address, port = ray.get(workers[0].rendezvous_address.remote(), timeout=300)
        setup = dict(train_batch_size=4, total_steps=2, master_addr=address, master_port=port)
        infos = ray.get([w.setup.remote(checkpoint, model, learner, **setup) for w in workers], timeout=300)
        per_rank = ray.get([w.logprobs.remote(shard) for w, shard in zip(workers, shards, strict=True)])
        tokens = sum(len(c) for shard in shards for s in shard for c in s.completions)
        steps = ray.get(
            [
                w.train_step.remote(shard, [[1.0, -1.0]], 1, 4, tokens)
                for w, shard in zip(workers, shards, strict=True)
            ]
        )
    finally:
        for worker in workers:
            ray.kill(worker)

    assert [info["partitioned_at_load"] for info in infos] == [True, True]
    whole = load_policy_model(checkpoint, model, torch.float32, trainable=False)  # the former load
    for shard, got in zip(shards, per_rank, strict=True):
        with torch.no_grad():
            logp, mask = sequence_logprobs(whole, processor, shard, micro_batch_size=2)
        for row, row_mask, values in zip(logp, mask, got, strict=True):
            torch.testing.assert_close(torch.tensor(values), row[row_mask], atol=1e-5, rtol=0)
    # The reference, loaded the same way, equals the policy before the first update.
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-7)


# --- 9 and bench.gpu_check ----------------------------------------------------------------------------


def test_gpu_check_runs_what_the_preset_runs():
    preset = load_config(gpu_check.PRESET)
    model, learner = gpu_check.preset_learner_settings("bench", num_sequences=4)
    substituted = {"path", "preset"}
    assert model.model_dump(exclude=substituted) == preset.model.model_dump(exclude=substituted)
    fitted = {"num_workers", "micro_batch_size", "lr"}
    assert learner.model_dump(exclude=fitted) == preset.learner.model_dump(exclude=fitted)
    assert not model.freeze_vision and learner.zero_stage == 3 and learner.bf16  # the published recipe

    run = gpu_check.fitted_config(
        Path("cache"), Path("work"), rollout_workers=2, learners=2, gpus_per_actor=1
    )
    assert run.rollout.model_dump(exclude={"num_workers"}) == preset.rollout.model_dump(
        exclude={"num_workers"}
    )
    assert run.cluster.resolved_weight_transport == preset.cluster.resolved_weight_transport == "nccl"
    assert run.model.model_dump(exclude=substituted) == preset.model.model_dump(exclude=substituted)


def test_gpu_check_colocated_stage_runs_the_one_gpu_presets_settings():
    preset = load_config(gpu_check.COLOCATED_PRESET)
    run = gpu_check.fitted_config(
        Path("cache"),
        Path("work"),
        rollout_workers=1,
        learners=1,
        gpus_per_actor=0.5,
        preset=gpu_check.COLOCATED_PRESET,
    )
    assert run.cluster.placement == "colocate" and run.cluster.colocate == preset.cluster.colocate
    assert run.cluster.colocate.sleep_level == 2 and run.cluster.colocate.offload_learner_states
    fitted = {"num_workers", "micro_batch_size", "lr"}
    assert run.learner.model_dump(exclude=fitted) == preset.learner.model_dump(exclude=fitted)
    assert run.rollout.model_dump(exclude={"num_workers"}) == preset.rollout.model_dump(
        exclude={"num_workers"}
    )
    assert run.cluster.resolved_weight_transport == preset.cluster.resolved_weight_transport == "ipc"


def test_gpu_check_memory_peaks_are_those_of_the_named_phases():
    """colocated_loop's peaks asleep and awake: the largest sample inside the named phases' intervals."""
    memory = gpu_check.DeviceMemory()
    memory.phases = [("generate", 0.0, 1.0), ("train", 2.0, 3.0), ("generate", 4.0, 5.0)]
    memory.samples = [(0.5, 10 << 30), (1.5, 99 << 30), (2.5, 20 << 30), (3.0, 25 << 30), (4.5, 30 << 30)]
    assert memory.peak_gib({"train"}) == 25  # 99 GiB fell between phases
    assert memory.peak_gib({"generate"}) == 30 and memory.peak_gib({"generate", "train"}) == 30
    assert memory.peak_gib({"wake"}) == 0


def test_gpu_check_help_lists_the_stages():
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    for stage in gpu_check.STAGES:
        assert f"  {stage.name} " in completed.stdout


def test_on_this_cpu_machine_every_stage_is_reported_not_run_with_its_reason(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2  # nothing could run
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["preset"] == "gpu-7b-1node"
    assert report["machine"] == {"gpus": 0, "vllm_problem": "no CUDA device"}
    assert report["stages"] == {
        stage.name: {"status": "not run", "reason": "no CUDA device"} for stage in gpu_check.STAGES
    }
    # The rule on machines this one is not.
    one_gpu_cpu_vllm = gpu_check.Machine(gpus=1, vllm_problem="vLLM is its cpu build")
    reasons = {s.name: gpu_check.why_not_run(s, one_gpu_cpu_vllm) for s in gpu_check.STAGES}
    assert reasons["env"] is None and reasons["learner_step"] is None
    assert reasons["vllm_engine"] == reasons["colocated_loop"] == "vLLM is its cpu build"
    assert reasons["nccl_transport"] == reasons["placement"] == "needs 2 GPUs, 1 visible"
    assert gpu_check.exit_status({"a": {"status": "passed"}, "b": {"status": "not run"}}) == 0
    assert gpu_check.exit_status({"a": {"status": "passed"}, "b": {"status": "failed"}}) == 1
    # What the env stage would report for the runner, by vLLM's own rule: no Triton for the CPU here.
    assert gpu_check.vllm_model_runner() == "V1"


def test_gpu_32b_lora_fits_one_node_with_two_gpus_per_engine(fake_gpu_cluster):
    """gpu-32b-lora on one fake 8-GPU node: each tensor-parallel engine's bundle holds its 2 GPUs, the 4
    learner ranks one each: all 8 GPUs, nothing left over."""
    placement = reserve_placement(load_config("gpu-32b-lora"))
    try:
        tables = {role: group_table(group) for role, group in placement.items()}
    finally:
        release(placement)
    assert list(tables["rollout"]["bundles"].values()) == [{"CPU": 8.0, "GPU": 2.0}] * 2
    assert list(tables["learner"]["bundles"].values()) == [{"CPU": 4.0, "GPU": 1.0}] * 4
