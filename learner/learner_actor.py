"""The DeepSpeed GRPO learner: one Ray actor per rank, N of them forming one torch.distributed group.

The driver calls every method on all ranks at once (each with its own shard of the batch); collective
operations inside (ZeRO reductions and gathers, metric reductions) need every rank to take part. The
methods stay thin: model code is in `learner.policy`, the loss in `learner.grpo`, the DeepSpeed config
in `learner.deepspeed_config`.

On the CPU the group runs over gloo; on GPUs over NCCL, with each actor seeing the one GPU Ray gave it
(so LOCAL_RANK is 0 in every actor). On a single node on loopback (cluster.host 127.0.0.1) the group
rendezvous on loopback only: rank 0's store listens on 127.0.0.1 and gloo uses the loopback interface
(`init_process_group`). The group, and so every collective in it, times out after
cluster.call_timeout_s, not torch's 10-minute default.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from configs.runtime_env import apply_default_env, cpu_affinity_env, pin_from_env, route_logs_from_env
from configs.schema import LearnerConfig, ModelConfig, PlacementConfig
from learner.deepspeed_config import deepspeed_config, lr_scheduler_factory, reference_config
from learner.grpo import grpo_loss, off_policy_metrics, off_policy_sums
from learner.lora import (
    adapter_tensor_name,
    is_adapter_parameter,
    merged_state_dict,
    push_plan,
    pushed_tensors,
    scaling,
)
from learner.policy import (
    PolicySample,
    apply_lora,
    build_micro_batches,
    checkpoint_names,
    completion_logprobs,
    eval_mode,
    load_policy_model,
    pad_token,
    sequence_logprobs,
)
from vlm.factory import load_processor
from vlm.weight_sync import WeightMeta, require_own_gpu, serialize_buckets

# Engine state (optimizer, scheduler, ZeRO partitions) lives in this subfolder of a checkpoint; the
# folder itself holds the policy in Hugging Face format.
ENGINE_STATE_DIR = "deepspeed"
ENGINE_STATE_TAG = "state"
# With learner.lora, the adapter alone in peft's format (beside the merged policy) in this subfolder.
ADAPTER_DIR = "adapter"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
# What `offload_states` moves to host memory while a colocated engine generates: the optimizer's Adam
# moments, fp32 master weights and gradient buffers. Not the 16-bit weights: the push and the weight-sync
# check read them.
OFFLOADED_STATES = ("optim_states", "hp_params", "lp_grads", "contiguous_grad_buffer")


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in LOOPBACK_HOSTS


def init_process_group(
    backend: str, rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float | None
) -> None:
    """Open this process's torch.distributed group (rank 0 hosts its store at master_addr:master_port)
    with a timeout of timeout_s seconds for its rendezvous and its collectives (None: torch's default).

    On loopback the store is a TCPStore whose server listens on a socket bound to master_addr (torch's own
    binds every interface, whatever host it is given), and gloo is told to use the loopback interface;
    otherwise DeepSpeed opens the group from the environment (env://), on the node's address.
    """
    from datetime import timedelta

    import deepspeed
    from deepspeed.constants import default_pg_timeout

    timeout = default_pg_timeout if timeout_s is None else timedelta(seconds=timeout_s)
    if is_loopback(master_addr):
        # gloo otherwise picks the interface its hostname resolves to, which may not be loopback.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        listen_fd = None
        if rank == 0:
            listener = socket.create_server((master_addr, master_port), family=_family(master_addr))
            listen_fd = listener.detach()  # the store's server owns (and closes) it from here
        store = torch.distributed.TCPStore(
            master_addr,
            master_port,
            world_size=world_size,
            is_master=rank == 0,
            timeout=timeout,
            master_listen_fd=listen_fd,
            use_libuv=True,
        )
        options = {}
        if backend == "nccl" and world_size > 1:
            options["device_id"] = torch.device("cuda", 0)  # as DeepSpeed binds it (LOCAL_RANK 0)
        torch.distributed.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **options
        )
    # With the group open already, DeepSpeed only wraps it.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


class LearnerWorker:
    """One learner rank; create the group with `create_learner_group`."""

    def __init__(self, rank: int, world_size: int) -> None:
        apply_default_env()
        route_logs_from_env()
        pin_from_env()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.engine = None
        self.weight_sender = None  # the NCCL or IPC transport (GPU), opened by open_weight_transfer
        self.states_offloaded = False  # OFFLOADED_STATES in host memory (`offload_states`)
        # (time, call) of the calls that hand the device over to a colocated engine and back, in order.
        self.device_calls: deque[tuple[float, str]] = deque(maxlen=256)

    def ping(self) -> int:
        return self.rank

    def system_metrics(self) -> dict:
        """This rank's CPU, memory and GPU figures since the previous call (configs.system_metrics.sample)."""
        from configs.system_metrics import sample

        return sample()

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port on it, for rank 0 to host the process group's store."""
        import ray

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def setup(
        self,
        model_path: str | Path,
        model: ModelConfig,
        learner: LearnerConfig,
        *,
        train_batch_size: int,
        total_steps: int,
        master_addr: str,
        master_port: int,
        temperature: float = 1.0,
        timeout_s: float | None = None,
    ) -> dict:
        """Join the process group, load the policy (and the frozen reference when beta > 0) under DeepSpeed.

        train_batch_size: completions per rollout batch over all ranks; total_steps: rollout steps of
        the run (for the LR schedule); temperature: the rollout's sampling temperature (log-probs are
        those of the distribution it samples from); timeout_s: the group's timeout, its collectives'
        included (cluster.call_timeout_s; None: torch's 10 minutes).
        """
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
        )
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        require_own_gpu()  # before NCCL: two ranks on one GPU fail late and obscurely
        init_process_group(
            get_accelerator().communication_backend_name(),
            self.rank,
            self.world_size,
            master_addr,
            master_port,
            timeout_s,
        )
        self.learner = learner
        self.temperature = temperature
        self.config = deepspeed_config(learner, train_batch_size, self.world_size)
        # DeepSpeed's bf16 mode wants bf16 modules (it keeps fp32 master weights in the optimizer).
        dtype = torch.bfloat16 if learner.bf16 else torch.float32
        # Under ZeRO-3 every rank loads straight into its partitions: a 7B policy and reference whole on
        # the host, on each rank of a node at once, would need ~33 GB per rank.
        zero3 = learner.zero_stage == 3
        policy = load_policy_model(
            model_path, model, dtype, trainable=True, zero3_config=self.config if zero3 else None
        )
        partitioned_at_load = zero3 and all(hasattr(p, "ds_id") for p in policy.parameters())
        self.checkpoint_names = checkpoint_names(policy)
        self.push_plan = None  # with LoRA's merged push: the tensors it sends (learner.lora.push_plan)
        if learner.lora is not None:
            policy = apply_lora(policy, learner.lora)
            names = [name for name, _ in policy.named_parameters()]
            # The adapter's weights under the names of peft's adapter checkpoint (an adapter push's).
            self.checkpoint_names |= {n: adapter_tensor_name(n) for n in names if is_adapter_parameter(n)}
            if learner.lora.push == "merged":
                self.push_plan = push_plan(names)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(
            model=policy,
            model_parameters=trainable,
            config=self.config,
            lr_scheduler=lr_scheduler_factory(learner, total_steps),
        )
        self.processor = load_processor(model_path, model.min_pixels, model.max_pixels)
        self.pad_token_id = pad_token(self.processor)
        self.reference = None
        # With LoRA the reference is the policy with its adapter disabled: no second model.
        if learner.beta > 0 and learner.lora is None:
            reference_zero3 = reference_config(self.config) if zero3 else None
            reference = load_policy_model(
                model_path, model, dtype, trainable=False, zero3_config=reference_zero3
            )
            if zero3:
                # Sharded like the policy: a 7B reference would not fit beside it on every GPU.
                self.reference, *_ = deepspeed.initialize(model=reference, config=reference_zero3)
            else:
                self.reference = reference.to(self.engine.device)
        return {
            "rank": self.rank,
            "device": str(self.engine.device),
            "backend": torch.distributed.get_backend(),
            "trainable_parameters": sum(_numel(p) for p in trainable),
            "partitioned_at_load": partitioned_at_load,
            "micro_batch_size": self.config["train_micro_batch_size_per_gpu"],
            "micro_batches_per_step": self.config["gradient_accumulation_steps"],
            "process_group_timeout_s": process_group_timeout_s(),
        }

    def train_step(
        self,
        samples: Sequence[PolicySample],
        advantages: Sequence[Sequence[float]],
        num_iterations: int,
        total_sequences: int,
        total_tokens: int,
    ) -> dict[str, float]:
        """num_iterations GRPO updates on this rank's shard; metrics are reduced over all ranks.

        advantages[i][k] belongs to samples[i].completions[k]. total_sequences / total_tokens count the
        completions / completion tokens of the whole batch over all ranks: the loss normalizer.
        """
        engine = self._require_setup()
        if self.states_offloaded:
            raise RuntimeError(
                f"learner rank {self.rank}: train_step with its states offloaded: reload_states() first"
            )
        self.device_calls.append((time.time(), "train_step"))
        if num_iterations < 1 or total_sequences < 1 or total_tokens < 1:
            raise ValueError(
                f"need num_iterations, total_sequences and total_tokens >= 1, got {num_iterations}, "
                f"{total_sequences}, {total_tokens}"
            )
        started = time.perf_counter()
        batches = build_micro_batches(self.processor, samples, self.config["train_micro_batch_size_per_gpu"])
        if len(batches) != engine.gradient_accumulation_steps():
            # ZeRO reduces gradients in every backward: all ranks must run the same number of them.
            raise ValueError(
                f"rank {self.rank}: {sum(len(b) for b in batches)} completions make {len(batches)} micro-batches, "
                f"the DeepSpeed config expects {engine.gradient_accumulation_steps()} "
                "(train_batch_size / world_size completions per rank)"
            )
        flat_advantages = _flatten_advantages(samples, advantages)
        with_behaviour = all(batch.behaviour_logprobs is not None for batch in batches)
        correct = self.learner.off_policy_correction == "tis"
        if correct and not with_behaviour:
            raise ValueError(
                "learner.off_policy_correction=tis needs the behaviour log-probs of every completion"
            )
        normalizer = total_sequences if self.learner.loss_aggregation == "sequence_mean" else total_tokens
        # DeepSpeed averages gradients over ranks; scaling the normalizer by 1/world makes their sum exact.
        normalizer = normalizer / self.world_size

        with torch.no_grad():
            # With one update per batch the policy has not moved yet: old log-probs are the current
            # ones (ratio 1), taken from the training forward itself instead of an extra pass.
            old = self._logprobs(engine, batches) if num_iterations > 1 else None
            reference = self._reference_logprobs(batches)
        logprob_seconds = time.perf_counter() - started

        started = time.perf_counter()
        totals = _MetricTotals()
        cap = self.learner.tis_cap
        for iteration in range(num_iterations):
            for index, batch in enumerate(batches):
                engine.set_gradient_accumulation_boundary(index == len(batches) - 1)
                logp, mask = self._completion_logprobs(engine, batch)
                old_logp = old[index] if old is not None else logp.detach()
                behaviour = batch.behaviour(logp.shape[1], logp.device) if with_behaviour else None
                if behaviour is not None and iteration == 0:
                    totals.add_off_policy(off_policy_sums(old_logp, behaviour, mask, cap))
                loss, metrics = grpo_loss(
                    logp,
                    old_logp,
                    flat_advantages[batch.sequence_ids].to(logp.device),
                    mask,
                    ref_logp=reference[index] if reference is not None else None,
                    beta=self.learner.beta,
                    eps_low=self.learner.eps_low,
                    eps_high=self.learner.eps_high,
                    kl_clamp=self.learner.kl_clamp,
                    aggregation=self.learner.loss_aggregation,
                    normalizer=normalizer,
                    behaviour_logp=behaviour if correct else None,
                    tis_cap=cap,
                )
                engine.backward(loss, scale_wrt_gas=False)
                totals.add(metrics)
            totals.lr += engine.get_lr()[0]
            engine.step()
            totals.grad_norm += float(engine.get_global_grad_norm())
        update_seconds = time.perf_counter() - started
        return totals.reduce(num_iterations, self.world_size, engine.device) | {
            "logprob_seconds": logprob_seconds,
            "update_seconds": update_seconds,
        }

    def logprobs(self, samples: Sequence[PolicySample], temperature: float = 1.0) -> list[list[float]]:
        """Per completion, the log-prob of each of its tokens under the current policy (no gradient).

        Every rank must call it with the same samples under ZeRO-3 (the forward gathers parameters).
        temperature 1.0 gives the raw model distribution, the one vLLM reports log-probs of.
        """
        engine = self._require_setup()
        with torch.no_grad(), eval_mode(engine):
            logp, mask = sequence_logprobs(
                engine, self.processor, samples, self.config["train_micro_batch_size_per_gpu"], temperature
            )
        return [row[row_mask].tolist() for row, row_mask in zip(logp, mask, strict=True)]

    def serialized_weights(self, bucket_bytes: int) -> list[bytes]:
        """The pushed weights (`_pushed_weights`) under their checkpoint names as safetensors blobs on rank 0
        ([] elsewhere).

        Every rank must call it: under ZeRO-3 the parameters are gathered group by group.
        """
        weights = self._pushed_weights(bucket_bytes)
        if self.rank == 0:
            return serialize_buckets(weights, bucket_bytes)
        for _ in weights:
            pass
        return []

    def weight_buckets(self, bucket_bytes: int) -> list:
        """`serialized_weights` put in Ray's object store by rank 0, which returns their references: the
        rollout workers fetch them from this node directly and the driver never holds the weights."""
        import ray

        return [ray.put(bucket) for bucket in self.serialized_weights(bucket_bytes)]

    def open_weight_transfer(
        self,
        transport: str,
        rollout_handles: list,
        master_address: str | None,
        master_port: int | None,
        workers_per_engine: int,
        timeout_s: float,
    ) -> None:
        """GPU: join vLLM's weight transfer with every rollout worker, by `transport`: "nccl" (rank 0 hosts
        the group at master_address:master_port and broadcasts) or "ipc" (colocated: CUDA IPC handles,
        no address). Called again, with new handles, after a worker is replaced. Every rank must call it."""
        from vlm.weight_sync import open_weight_sender

        engine = self._require_setup()
        self.close_weight_transfer()
        self.weight_sender = open_weight_sender(
            transport,
            lambda: self._pushed_weights(self.learner.weight_bucket_bytes, device=engine.device),
            self.weight_metadata(),
            rollout_handles,
            rank=self.rank,
            master_address=master_address,
            master_port=master_port,
            workers_per_engine=workers_per_engine,
            buffer_bytes=self.learner.weight_bucket_bytes,
            timeout_s=timeout_s,
        )

    def send_weights(self) -> None:
        """GPU: load the pushed weights into every rollout worker. Every rank must call it."""
        if self.weight_sender is None:
            raise RuntimeError(f"learner rank {self.rank}: call open_weight_transfer() first")
        self.weight_sender.push()

    def close_weight_transfer(self) -> None:
        if self.weight_sender is not None:
            self.weight_sender.close()
            self.weight_sender = None

    def offload_states(self) -> None:
        """Move OFFLOADED_STATES to host memory (DeepSpeed's engine.offload_states, ZeRO 1-3), freeing the
        device for a colocated rollout engine; `reload_states` brings them back. Every rank calls it."""
        from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

        engine = self._require_setup()
        if not self.states_offloaded:
            engine.offload_states(
                include=[OffloadStateTypeEnum(state) for state in OFFLOADED_STATES],
                pin_memory=torch.cuda.is_available(),  # page-locked: faster copies back; none on the CPU
            )
            self.states_offloaded = True
        self.device_calls.append((time.time(), "offload_states"))

    def reload_states(self) -> None:
        """Bring the offloaded states back to the device (before training)."""
        engine = self._require_setup()
        if self.states_offloaded:
            engine.reload_states()
            self.states_offloaded = False
        self.device_calls.append((time.time(), "reload_states"))

    def device_call_log(self) -> list[tuple[float, str]]:
        return list(self.device_calls)

    @contextlib.contextmanager
    def _states_on_device(self) -> Iterator[None]:
        """The block with every state on the device (DeepSpeed saves and loads them there), then as before."""
        offloaded = self.states_offloaded
        if offloaded:
            self.reload_states()
        try:
            yield
        finally:
            if offloaded:
                self.offload_states()

    def save_checkpoint(self, directory: str | Path) -> str:
        """The policy in HF format (+ processor) from rank 0, DeepSpeed's engine state from all ranks.

        With LoRA the HF folder holds the merged policy (what vLLM, `vqr1 score` and `vqr1 eval` load)
        and its `adapter/` subfolder the adapter alone in peft's format (loads over the base model).
        """
        engine = self._require_setup()
        directory = Path(directory)
        # Under ZeRO-3 every rank takes part in the gather; rank 0 receives the full state dict.
        state_dict = engine._zero3_consolidated_16bit_state_dict() if self.learner.zero_stage == 3 else None
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            if self.learner.lora is None:
                engine.module.save_pretrained(directory, state_dict=state_dict)
            else:
                peft_state = engine.module.state_dict() if state_dict is None else state_dict
                merged = merged_state_dict(peft_state, scaling(self.learner.lora))
                engine.module.get_base_model().save_pretrained(directory, state_dict=merged)
                engine.module.save_pretrained(directory / ADAPTER_DIR, state_dict=peft_state)
            self.processor.save_pretrained(directory)
        with self._states_on_device():
            engine.save_checkpoint(str(directory / ENGINE_STATE_DIR), tag=ENGINE_STATE_TAG)
        torch.distributed.barrier()
        return str(directory)

    def load_checkpoint(self, directory: str | Path) -> int:
        """Restore weights, optimizer and LR schedule saved by `save_checkpoint`; returns the optimizer step."""
        engine = self._require_setup()
        state_dir = Path(directory) / ENGINE_STATE_DIR
        with self._states_on_device():
            loaded, _ = engine.load_checkpoint(str(state_dir), tag=ENGINE_STATE_TAG)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed engine state under {state_dir}")
        return engine.global_steps

    def _require_setup(self):
        if self.engine is None:
            raise RuntimeError(f"learner rank {self.rank}: call setup() first")
        return self.engine

    def _logprobs(self, model, batches) -> list[torch.Tensor]:
        with eval_mode(model):
            return [self._completion_logprobs(model, batch)[0] for batch in batches]

    def _reference_logprobs(self, batches) -> list[torch.Tensor] | None:
        """Log-probs under the reference: the frozen copy, or with LoRA the policy with its adapter off
        (B starts at zero, so before the first update they equal the policy's bit for bit)."""
        if self.reference is not None:
            return self._logprobs(self.reference, batches)
        if self.learner.beta == 0:
            return None
        with self.engine.module.disable_adapter():
            return self._logprobs(self.engine, batches)

    def _completion_logprobs(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logprobs(
            model, batch, self.pad_token_id, self.temperature, self.learner.share_prompt_forward
        )

    def _trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self._require_setup().module.named_parameters() if p.requires_grad]

    def weight_metadata(self) -> list[WeightMeta]:
        """(checkpoint name, dtype, full shape) of each pushed tensor, in the order they are sent; read
        without a gather (under ZeRO-3 a parameter's own shape is that of its empty placeholder)."""
        if self.push_plan is not None:
            params = dict(self._require_setup().module.named_parameters())
            shown = [(item.name, params[item.base]) for item in self.push_plan]
        else:
            shown = self._trainable_parameters()
        return [
            (self.checkpoint_names[name], p.dtype, tuple(getattr(p, "ds_shape", p.shape)))
            for name, p in shown
        ]

    def _pushed_weights(
        self, group_bytes: int, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """What the rollout engines load: the trainable parameters (with LoRA's adapter push: the adapter,
        under peft's names), or with LoRA's merged push the merged weights of the adapted layers
        (`_merged_weights`)."""
        if self.push_plan is not None:
            return self._merged_weights(group_bytes, device)
        return self._full_trainable_weights(group_bytes, device)

    def _merged_weights(
        self, group_bytes: int, device: str | torch.device
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor on `device`) of each tensor of the push plan, adapted weights merged
        out of place; yields only on rank 0, every rank must iterate it (ZeRO-3 gathers by group)."""
        import deepspeed

        params = dict(self._require_setup().module.named_parameters())
        scale = scaling(self.learner.lora)
        planned = [(item, params[item.base]) for item in self.push_plan]
        for group in _groups_by_size(planned, group_bytes):
            sources = {name: params[name] for item, _ in group for name in item.sources}
            gathered = (
                deepspeed.zero.GatheredParameters(list(sources.values()))
                if self.learner.zero_stage == 3
                else contextlib.nullcontext()
            )
            with gathered:
                if self.rank == 0:
                    for name, tensor in pushed_tensors([item for item, _ in group], sources, scale):
                        yield self.checkpoint_names[name], tensor.detach().to(device, copy=True)

    def _full_trainable_weights(
        self, group_bytes: int, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, full tensor copied to `device`) of each trainable parameter; yields only on
        rank 0, but every rank must iterate it (under ZeRO-3 each group of parameters is gathered)."""
        import deepspeed

        params = self._trainable_parameters()
        if self.learner.zero_stage != 3:
            if self.rank == 0:
                for name, param in params:
                    yield self.checkpoint_names[name], param.detach().to(device, copy=True)
            return
        for group in _groups_by_size(params, group_bytes):
            with deepspeed.zero.GatheredParameters([p for _, p in group]):
                if self.rank == 0:
                    for name, param in group:
                        # A copy: the gathered storage is released when the group's context exits.
                        yield self.checkpoint_names[name], param.detach().to(device, copy=True)


class _MetricTotals:
    """Sums of grpo_loss metrics over micro-batches and iterations, reduced over ranks at the end."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.tokens = 0.0
        self.kl_tokens = 0.0
        self.kl_unweighted_tokens = 0.0
        self.kl_clamped_tokens = 0.0
        self.clip_tokens = 0.0
        self.ratio_tokens = 0.0
        self.ratio_min = float("inf")
        self.ratio_max = float("-inf")
        self.lr = 0.0
        self.grad_norm = 0.0
        self.off_policy: dict[str, float] | None = None  # learner.grpo.off_policy_sums, summed

    def add_off_policy(self, sums: dict[str, float]) -> None:
        if self.off_policy is None:
            self.off_policy = dict(sums)
            return
        for key, value in sums.items():
            combine = {"raw_max": max, "raw_min": min}.get(key, float.__add__)
            self.off_policy[key] = combine(self.off_policy[key], value)

    def add(self, metrics: dict[str, float]) -> None:
        tokens = metrics["num_tokens"]
        self.loss += metrics["loss"]
        self.tokens += tokens
        self.kl_tokens += metrics["kl"] * tokens
        self.kl_unweighted_tokens += metrics["kl_unweighted"] * tokens
        self.kl_clamped_tokens += metrics["kl_clamped_fraction"] * tokens
        self.clip_tokens += metrics["clip_fraction"] * tokens
        self.ratio_tokens += metrics["ratio_mean"] * tokens
        self.ratio_min = min(self.ratio_min, metrics["ratio_min"])
        self.ratio_max = max(self.ratio_max, metrics["ratio_max"])

    def reduce(self, num_iterations: int, world_size: int, device) -> dict[str, float]:
        dist = torch.distributed
        sums = torch.tensor(
            [
                self.loss,
                self.tokens,
                self.kl_tokens,
                self.kl_unweighted_tokens,
                self.kl_clamped_tokens,
                self.clip_tokens,
                self.ratio_tokens,
            ],
            dtype=torch.float64,
            device=device,
        )
        extremes = torch.tensor([-self.ratio_min, self.ratio_max], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        loss, tokens, kl_tokens, kl_unweighted_tokens, kl_clamped_tokens, clip_tokens, ratio_tokens = (
            sums.tolist()
        )
        tokens_per_iteration = tokens / num_iterations
        tokens = max(tokens, 1.0)
        return self._reduce_off_policy(device) | {
            # Each rank's loss is its share of the global one times world_size (see the normalizer).
            "loss": loss / (world_size * num_iterations),
            "kl": kl_tokens / tokens,
            "kl_unweighted": kl_unweighted_tokens / tokens,
            "kl_clamped_fraction": kl_clamped_tokens / tokens,
            "clip_fraction": clip_tokens / tokens,
            "ratio_min": -float(extremes[0]),
            "ratio_mean": ratio_tokens / tokens,
            "ratio_max": float(extremes[1]),
            "grad_norm": self.grad_norm / num_iterations,
            "lr": self.lr / num_iterations,
            "num_tokens": tokens_per_iteration,
        }

    def _reduce_off_policy(self, device) -> dict[str, float]:
        """offpolicy/* metrics over all ranks ({} when the batch carried no behaviour log-probs: the same on
        every rank, so either all ranks reduce or none)."""
        if self.off_policy is None:
            return {}
        dist = torch.distributed
        keys = sorted(key for key in self.off_policy if key not in ("raw_max", "raw_min"))
        sums = torch.tensor([self.off_policy[key] for key in keys], dtype=torch.float64, device=device)
        extremes = torch.tensor(
            [self.off_policy["raw_max"], -self.off_policy["raw_min"]], dtype=torch.float64, device=device
        )
        dist.all_reduce(sums)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        reduced = dict(zip(keys, sums.tolist(), strict=True))
        reduced |= {"raw_max": float(extremes[0]), "raw_min": -float(extremes[1])}
        return {f"offpolicy/{key}": value for key, value in off_policy_metrics(reduced).items()}


def process_group_timeout_s() -> float:
    """The timeout of this process's default torch.distributed group, in seconds."""
    group = torch.distributed.distributed_c10d._get_default_group()
    device = torch.device("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    return group._get_backend(device).options._timeout.total_seconds()


def _numel(param) -> int:
    # ZeRO-3 replaces parameters by empty placeholders; ds_numel keeps the full size.
    return getattr(param, "ds_numel", param.numel())


def _groups_by_size(params: list, group_bytes: int) -> Iterator[list]:
    group, size = [], 0
    for name, param in params:
        nbytes = _numel(param) * param.element_size()
        if group and size + nbytes > group_bytes:
            yield group
            group, size = [], 0
        group.append((name, param))
        size += nbytes
    if group:
        yield group


def _flatten_advantages(
    samples: Sequence[PolicySample], advantages: Sequence[Sequence[float]]
) -> torch.Tensor:
    if len(advantages) != len(samples):
        raise ValueError(f"{len(advantages)} advantage lists for {len(samples)} samples")
    flat: list[float] = []
    for index, (sample, values) in enumerate(zip(samples, advantages, strict=True)):
        if len(values) != len(sample.completions):
            raise ValueError(
                f"sample {index}: {len(values)} advantages for {len(sample.completions)} completions"
            )
        flat.extend(float(v) for v in values)
    return torch.tensor(flat, dtype=torch.float32)


def create_learner_group(
    num_workers: int,
    placement: PlacementConfig,
    *,
    model_path: str | Path,
    model: ModelConfig,
    learner: LearnerConfig,
    train_batch_size: int,
    total_steps: int,
    temperature: float = 1.0,
    placement_group=None,
    timeout_s: float | None = None,
) -> list:
    """Start num_workers `LearnerWorker` actors, form their process group and set each one up.

    With a placement group, rank i goes into its bundle i. Returns the
    actor handles in rank order; rank 0 hosts the group's rendezvous on its node.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    remote_class = ray.remote(LearnerWorker)
    workers = []
    for rank in range(num_workers):
        options = {
            "num_cpus": placement.num_cpus,
            "num_gpus": placement.num_gpus,
            "runtime_env": {"env_vars": apply_default_env() | cpu_affinity_env(placement.cpu_affinity)},
        }
        if placement_group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=rank
            )
        workers.append(remote_class.options(**options).remote(rank, num_workers))
    master_addr, master_port = ray.get(workers[0].rendezvous_address.remote(), timeout=timeout_s)
    ray.get(
        [
            worker.setup.remote(
                model_path,
                model,
                learner,
                train_batch_size=train_batch_size,
                total_steps=total_steps,
                master_addr=master_addr,
                master_port=master_port,
                temperature=temperature,
                timeout_s=timeout_s,
            )
            for worker in workers
        ],
        timeout=timeout_s,
    )
    return workers
