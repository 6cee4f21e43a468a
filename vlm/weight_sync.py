"""Moving the learner's weights into running vLLM engines.

Three transports, chosen by `cluster.weight_transport` (`auto`: CUDA IPC when each GPU holds a rollout
engine and a learner rank, NCCL when rollout workers and learners have GPUs of their own; the driver's
`push_weights` uses the one chosen):

CPU (and any machine without CUDA) -- bytes through the control plane:
    learner: `serialize_buckets(model.named_parameters())` -> list of safetensors blobs (<= 64 MiB each,
             no pickle) -> `RolloutEngine.update_weights(buckets)` (via Ray when remote).
    engine:  `LLM.collective_rpc("load_weight_buckets", buckets)` runs `WeightSyncExtension` on every
             vLLM worker, which feeds `iterate_buckets(buckets)` to the worker's `reload_weights`. A
             tensor-parallel engine has a worker per rank: each gets the full tensors, and vLLM's loaders
             keep that rank's shard.
    The reload path matters: the CPU linear layers prepack their weights and drop `layer.weight`, so a
    direct `model.load_weights` leaves the old weights in use; `reload_weights` re-runs post-load processing.
    A LoRA adapter (learner.lora.push=adapter) is pushed the same way, its A and B alone, and
    `load_adapter_buckets` swaps it into the workers' LoRA manager in memory.

GPU (CUDA) -- vLLM 0.32's native weight-transfer API with its "nccl" backend:
    every CUDA engine is built with `weight_transfer_config={"backend": "nccl"}`. Each learner rank holds
    a `WeightSender` (`open_weight_sender("nccl", ...)`); rank 0's opens one NCCL group with all vLLM workers (`init_weight_transfer`)
    once every worker answers a ping (`cluster.system.open_weight_transfer`, which also shuts the old
    group down on both sides before reopening it for a replaced worker), and each push runs `start_weight_update` / `update_weights` (packed bucketed broadcast from
    rank 0, received by the workers concurrently) / `finish_weight_update` through
    `RolloutWorkersClient`, which drives the Ray rollout actors; the other ranks take part in the ZeRO-3
    gathers only. Every vLLM worker is a rank of the group: a tensor-parallel engine's workers take
    ranks rank_offset + (their rank in the engine), vLLM's `worker_init_process_group`, so engine i
    gets rank_offset 1 + i * tensor_parallel_size; each receives the full broadcast and loads its shard. Tensors go GPU to GPU, never through host memory. The caches are reset by
    `RolloutEngine.finish_weight_update`. This path cannot run on the CPU machines this project is
    tested on (vLLM's broadcast code needs CUDA streams even with NCCL replaced); there only the
    announced metadata is tested against what the bucket path pushes.

GPU, colocated (a rollout engine and a learner rank on each GPU) -- vLLM's "ipc" backend: the engines
    are built with `weight_transfer_config={"backend": "ipc"}` and each learner rank holds a
    `WeightSender` (`open_weight_sender("ipc", ...)`); the same client and `RolloutEngine` calls as NCCL
    carry CUDA IPC handles of a buffer on each rank's GPU instead of opening a group.

Names are Hugging Face names (either the learner's `model.language_model.*` / `model.visual.*` or the
checkpoint's `model.*` / `visual.*`): vLLM's Qwen2.5-VL loader maps both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

DEFAULT_BUCKET_BYTES = 64 << 20


def serialize_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> list[bytes]:
    """Pack named tensors into safetensors blobs of at most `bucket_bytes` (a larger tensor gets its own)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[bytes] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes = 0
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the weights to push")
        seen.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage (tied weights, views): give those their own copy.
        if any(
            t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in current.values()
        ):
            tensor = tensor.clone()
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > bucket_bytes:
            buckets.append(safetensors_save(current))
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += nbytes
    if current:
        buckets.append(safetensors_save(current))
    return buckets


def iterate_buckets(buckets: Iterable[bytes]) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of serialised buckets, bucket by bucket (safetensors orders names within one)."""
    for index, blob in enumerate(buckets):
        try:
            tensors = safetensors_load(bytes(blob))
        except SafetensorError as exc:
            raise ValueError(f"weight bucket {index} is not a valid safetensors blob: {exc}") from exc
        yield from tensors.items()


class WeightSyncExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`): loads pushed weights via the reload path."""

    def load_weight_buckets(self, buckets: list[bytes]) -> int:
        loaded = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal loaded
            for item in iterate_buckets(buckets):
                loaded += 1
                yield item

        self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        return loaded

    def load_adapter_buckets(self, buckets: list[bytes], peft_config: dict, adapter_id: int) -> int:
        """Load a LoRA adapter pushed as safetensors buckets (peft's saved names, `...lora_A.weight`) in
        place of the one this worker holds under `adapter_id`; returns the count of tensors loaded.

        vLLM 0.32's own way in (`add_lora` with `load_inplace=True`) reads the adapter from a folder; this
        builds the same LoRAModel from the tensors in memory, with its loader's checks and the model's
        renaming, and swaps it in as that path does (vllm/lora/worker_manager.py: `_load_adapter`, then
        `LRUCacheWorkerLoRAManager.add_adapter`). Each tensor-parallel rank keeps its shard of A and B.
        """
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        manager = self.model_runner.lora_manager  # the runner's LRUCacheWorkerLoRAManager
        adapters = manager._adapter_manager
        peft_helper = PEFTHelper.from_dict(
            {**peft_config, "vllm_max_position_embeddings": manager.max_position_embeddings}
        )
        peft_helper.validate_legal(manager.lora_config)
        model = adapters.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        tensors = dict(iterate_buckets(buckets))
        lora = LoRAModel.from_lora_tensors(
            adapter_id,
            tensors,
            peft_helper,
            device="cpu",
            dtype=manager.lora_config.lora_dtype,
            model_vocab_size=manager.vocab_size,
            weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
            skip_prefixes=getattr(model, "lora_skip_prefixes", None),
        )
        adapters.remove_adapter(adapter_id)
        adapters.add_adapter(lora)  # packs q/k/v and gate/up into the model's fused layers
        # vLLM would leave an adapted module it has no LoRA layer for as the base: refuse instead.
        unserved = sorted(set(lora.loras) - set(adapters.modules))
        if unserved:
            adapters.remove_adapter(adapter_id)
            raise ValueError(
                f"vLLM's {type(model).__name__} has no LoRA layer for {len(unserved)} adapted module(s), "
                f"e.g. {unserved[:3]}"
            )
        adapters.activate_adapter(adapter_id)
        return len(tensors)


# ---------------------------------------------------------------------------------------------------
# GPU path: NCCL broadcast through vLLM's native weight-transfer API.
# ---------------------------------------------------------------------------------------------------


def engine_weight_transfer_config(backend: str = "nccl") -> dict[str, str] | None:
    """`LLM(weight_transfer_config=...)`: vLLM's `backend` on CUDA, none on the CPU (collective_rpc path)."""
    return {"backend": backend} if torch.cuda.is_available() else None


class RolloutWorkersClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our Ray `RolloutWorker` actors.

    Unlike vLLM's `RayVLLMWeightSyncClient` (which assumes one engine), each independent engine gets its
    own NCCL rank offset: engine i's workers take ranks 1 + i * workers_per_engine ... (rank 0 = learner).
    workers_per_engine None: a transport without a group (CUDA IPC), no ranks to hand out.
    """

    def __init__(self, handles: list, workers_per_engine: int | None, timeout_s: float | None = None) -> None:
        self.handles = handles
        self.workers_per_engine = workers_per_engine
        self.timeout_s = timeout_s

    def _wait(self, calls: list) -> None:
        import ray

        ray.get(calls, timeout=self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        def engine_info(i: int) -> dict[str, Any]:
            if self.workers_per_engine is None:
                return init_info
            return {**init_info, "rank_offset": 1 + i * self.workers_per_engine}

        self._wait(
            [handle.init_weight_transfer.remote(engine_info(i)) for i, handle in enumerate(self.handles)]
        )

    def start_weight_update(self) -> None:
        self._wait([handle.start_weight_update.remote() for handle in self.handles])

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._wait([handle.receive_weight_update.remote(update_info) for handle in self.handles])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._wait([handle.finish_weight_update.remote() for handle in self.handles])


WeightMeta = tuple[str, torch.dtype, tuple[int, ...]]


class NamedTensorSource:
    """vLLM's `WeightSource` (duck-typed, so vLLM is imported only when used): the tensors a callable
    yields (e.g. only the trainable parameters), read afresh on every push. `metadata` is given, not
    read from the tensors: under ZeRO-3 reading them is a gather of the whole model."""

    def __init__(
        self, named_tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]], metadata: list[WeightMeta]
    ) -> None:
        self._named_tensors = named_tensors
        self._metadata = metadata

    def metadata(self) -> list:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(name, dtype, tuple(shape)) for name, dtype, shape in self._metadata]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._named_tensors():
            yield name, tensor.detach()


class WeightSender:
    """One learner rank's end of a push through vLLM's weight-transfer API: `trainer_engine` (vLLM's
    trainer-side engine class) started with `init_info`, reading the tensors `named_tensors` yields, and
    driving the rollout workers through `client` (rank 0 only: the other ranks take part in the
    collectives)."""

    def __init__(
        self,
        trainer_engine,
        init_info,
        named_tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]],
        metadata: list[WeightMeta],
        client: RolloutWorkersClient,
    ) -> None:
        self._engine = trainer_engine.trainer_init(
            init_info, client=client, source=NamedTensorSource(named_tensors, metadata)
        )

    def push(self) -> None:
        """start_weight_update -> the transfer (`send_weights`) -> finish_weight_update (caches reset)."""
        self._engine.send_weights()

    def close(self) -> None:
        self._engine.shutdown()


def open_weight_sender(
    transport: str,
    named_tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]],
    metadata: list[WeightMeta],
    rollout_handles: list,
    *,
    rank: int,
    master_address: str | None = None,
    master_port: int | None = None,
    workers_per_engine: int = 1,
    buffer_bytes: int = DEFAULT_BUCKET_BYTES,
    timeout_s: float | None = None,
) -> WeightSender:
    """This learner rank's end of the `transport` push (every rank opens one; rank 0 sends).

    "nccl": rank 0 opens one group with every vLLM worker at `master_address:master_port` (reachable from
    the engines: rank 0's node, a free port) and broadcasts packed buckets, the workers receiving
    concurrently; the other ranks only iterate `named_tensors` with it (under ZeRO-3 each tensor is a
    gather every rank takes part in). A worker that is replaced needs a new group: `close()` the sender on
    every rank, shut the engines' end down (`RolloutEngine.shutdown_weight_transfer`) and open another
    (`cluster.system.open_weight_transfer`).

    "ipc", colocated (cluster.placement=colocate: rollout worker i shares learner rank i's GPU): every
    rank copies the pushed tensors, chunk by chunk, into one IPC buffer of its own (`buffer_bytes`, at
    least the largest tensor) and all ranks all-gather the buffers' handles over the learners' process
    group; rank 0 hands the merged handles to every engine, and each engine reads the buffer on its own
    GPU (vLLM's ipc backend, chosen by GPU UUID). Nothing leaves the GPU and nothing is opened: no port,
    no group. An engine that dies mid-push fails rank 0's call (the run ends, and resume goes on from the
    last checkpoint, as with NCCL).

    The rollout engines must have been built on CUDA for that backend (`engine_weight_transfer_config`).
    """
    if transport == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        init_info = NCCLTrainerInitInfo(
            master_address=master_address,
            master_port=master_port,
            world_size=1 + len(rollout_handles) * workers_per_engine,
            rank=rank,  # rank 0 is the sender
        )
        client = RolloutWorkersClient(rollout_handles, workers_per_engine, timeout_s)
        return WeightSender(NCCLTrainerWeightTransferEngine, init_info, named_tensors, metadata, client)
    if transport == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import (
            IPCTrainerInitInfo,
            IPCTrainerWeightTransferEngine,
        )

        size = ipc_buffer_bytes(metadata, buffer_bytes)
        init_info = IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=size)
        client = RolloutWorkersClient(rollout_handles, None, timeout_s)
        return WeightSender(IPCTrainerWeightTransferEngine, init_info, named_tensors, metadata, client)
    raise ValueError(f"no weight-transfer sender for transport {transport!r} (nccl or ipc)")


def pickled_ipc_handles(update_info: dict) -> dict:
    """An IPC update's handles as vLLM's `ipc_handles_pickled` (base64 of their pickle), the form a
    multiprocess engine's messages can carry (its engine core must run with
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 to read it)."""
    import base64
    import pickle

    info = {key: value for key, value in update_info.items() if key != "ipc_handles"}
    info["ipc_handles_pickled"] = base64.b64encode(pickle.dumps(update_info["ipc_handles"])).decode()
    return info


def ipc_buffer_bytes(metadata: list[WeightMeta], bucket_bytes: int) -> int:
    """The IPC push's buffer: `bucket_bytes`, or the largest pushed tensor where that is larger (vLLM's
    packed producer refuses a tensor bigger than its buffer; a 7B embedding is 1.09 GB in bf16)."""
    largest = max(
        (
            torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            for _, dtype, shape in metadata
        ),
        default=0,
    )
    return max(bucket_bytes, largest)


# ---------------------------------------------------------------------------------------------------
# Own GPUs per actor: both transports (and the learners' ZeRO group) put one NCCL rank on each GPU.
# ---------------------------------------------------------------------------------------------------


def gpu_visibility_problem(
    assigned: list, cuda_visible_devices: str | None, device_count: int, devices: int = 1
) -> str | None:
    """Why a GPU actor would not work on the GPUs Ray gave it, or None when it sees exactly those.

    assigned: `ray.get_gpu_ids()` (empty for a CPU actor: nothing to check); devices: how many GPUs the
    actor works on (a learner rank 1, a rollout worker its engine's tensor_parallel_size). Every actor
    works on cuda:0 ... cuda:devices-1, which are its own GPUs only because Ray narrows
    CUDA_VISIBLE_DEVICES to them: vLLM's multiprocessing workers take cuda:<local rank> in that list
    (vllm/v1/worker/gpu_worker.py, init_device). Containers that set
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES leave all GPUs visible, so every engine and learner rank
    of a node would pile onto the node's first GPUs.
    """
    if not assigned:
        return None
    ids = [str(i) for i in assigned]
    visible = None if cuda_visible_devices is None else [d.strip() for d in cuda_visible_devices.split(",")]
    if len(ids) == devices == device_count and (visible == ids or (visible is None and devices == 1)):
        return None
    shown = "unset" if cuda_visible_devices is None else repr(cuda_visible_devices)
    return (
        f"Ray gave this actor GPU(s) {ids}, but it sees {device_count} CUDA device(s) "
        f"(CUDA_VISIBLE_DEVICES={shown}); each GPU actor must see exactly its own {devices} GPU(s), because "
        f"it works on the first {devices} visible. Unset RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES (so "
        f"Ray narrows CUDA_VISIBLE_DEVICES per actor) and give each actor {devices} GPU(s)."
    )


def require_own_gpu(devices: int = 1) -> None:
    """In a Ray actor: raise `gpu_visibility_problem`'s message, if any. Outside an actor, nothing to check."""
    import os

    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    problem = gpu_visibility_problem(
        ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count(), devices
    )
    if problem is not None:
        raise RuntimeError(problem)
