"""G sampled completions per image from a vLLM engine, and weight pushes into that engine.

The same code runs on the CPU build of vLLM and on CUDA. Each image is passed to vLLM once with the
text prompt of `vlm.prompts.build_prompt_text` (vLLM expands the image placeholder itself, exactly
once) and `SamplingParams(n=G)`, so images are never copied G times. Image bounds (min/max pixels) are
the learner's, so vLLM's prompt token ids equal the learner's processor output.

Log-probs are vLLM's "raw_logprobs" (the engine-wide logprobs_mode it has by default): log-softmax of the
model's logits before temperature, top-p/k and token suppression, i.e. what the learner computes from the
same weights at temperature 1. They are the behaviour log-probs of the learner's importance weights
(learner.off_policy_correction=tis), which is why that correction asks for temperature 1 without top-p/k:
then raw is the distribution sampled from, up to the five vision tokens' -inf bias. vLLM's
"processed_logprobs" would follow any temperature, but it is set per engine, and it would also turn the
evaluation's digit distributions (top-k log-probs at eval.temperature) into tempered ones. Every completion
carries the weight version the engine held when sampling it (`set_weight_version`, set by the driver
after each push). Asked for (evaluation), the engine also reports each completion's distribution over
the ten digits where its score's leading digit was sampled, from vLLM's top-k log-probs at that position
(`rewards.parsing.expected_scores`).

With learner.lora.push=adapter the engine is built with LoRA on (`lora_engine_args`), a push replaces
the one adapter it serves (`update_weights`), and every generate call passes its LoRARequest once the
first push has loaded it (before, the engine runs the base model: what a fresh adapter, B = 0, computes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from configs.schema import (
    ColocateConfig,
    LoraConfig,
    ModelConfig,
    RolloutConfig,
    tensor_parallel_problem,
    vllm_max_lora_rank,
)
from configs.sleep import preserve_patterns
from iqa.images import ImageInput, load_image
from rewards.parsing import extract_score, score_digit_offset
from vlm.factory import load_processor
from vlm.prompts import build_prompt_text
from vlm.tokens import STOP_TOKENS, VISION_SPECIAL_TOKENS, token_id
from vlm.weight_sync import WeightSyncExtension, engine_weight_transfer_config, pickled_ipc_handles

# Top log-probs vLLM returns per position when digit distributions are asked for; digits outside count 0.
DIGIT_TOP_K = 20
# The adapter an adapter engine serves, under one id that every push reloads; it exists only in the
# workers' memory (vlm.weight_sync.WeightSyncExtension.load_adapter_buckets), so the request's path is
# one vLLM would fail to read, naming it, were the adapter ever dropped from its cache.
ADAPTER_ID = 1
ADAPTER_NAME = "vqr1-policy"
ADAPTER_PATH = "/vqr1-adapter-pushed-in-memory"
# One merged vision token covers a 28x28 pixel patch (patch 14, spatial merge 2).
PIXELS_PER_IMAGE_TOKEN = 28 * 28


# vLLM's CPU worker replaces torch.set_num_threads with this warning once it has pinned its threads, and
# with the in-process engine vLLM's own renderer then calls it twice on every multimodal request: about
# 1,500 identical lines in a 30-step run, burying the log line of each step.
THREAD_BINDING_WARNING = "CPU backend doesn't allow to use `torch.set_num_threads`"
# A colocated CPU engine sleeps and wakes three times a step; its worker has no sleep mode and says so each
# time (the engine core's pause and cache reset, what sleep means on the CPU, still happen).
CPU_SLEEP_WARNING = "sleep mode is not supported on CPU"
# A weight push that leaves layers out (the frozen vision tower) makes vLLM's reload warn once per layer
# it keeps as it was, without the layer's name, then once per push with the names of the weights not
# pushed. The per-layer lines go (the named one says the same); the named one goes only when every name
# is under a prefix the engine leaves out on purpose, so a weight that fails to land is still reported.
LAYER_NOT_LOADED = "%s: Failed to load weights"
WEIGHTS_NOT_LOADED = "Following weights were not loaded from checkpoint: %s"
VISION_PREFIXES = ("visual.", "model.visual.")


class _DropExpectedWarnings(logging.Filter):
    def __init__(self, skipped_prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.skipped_prefixes = skipped_prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == LAYER_NOT_LOADED:
            return False
        if record.msg == WEIGHTS_NOT_LOADED and self.skipped_prefixes:
            names = record.args[0] if isinstance(record.args, tuple) and record.args else ()
            return not (names and all(str(n).startswith(self.skipped_prefixes) for n in names))
        return not record.getMessage().startswith((THREAD_BINDING_WARNING, CPU_SLEEP_WARNING))


def quiet_expected_vllm_warnings(skipped_prefixes: tuple[str, ...] = ()) -> None:
    """Filter vLLM's warnings that this engine causes on purpose (see above) in this process;
    skipped_prefixes: names of weights the pushes leave out. Replaces an earlier call's filter."""
    for name in (
        "vllm.v1.worker.cpu_worker",
        "vllm.model_executor.model_loader.reload.layerwise",
        "vllm.model_executor.model_loader.reload.inplace",
    ):
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropExpectedWarnings)]:
            logger.removeFilter(old)
        logger.addFilter(_DropExpectedWarnings(skipped_prefixes))


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # sampled tokens, including the stop token when generation stopped on it
    text: str
    logprobs: list[float]  # log-prob of each sampled token (raw model distribution)
    score: float | None  # rewards.parsing.extract_score of the text
    parse_ok: bool
    truncated: bool = False  # stopped by max_new_tokens rather than the stop token
    # p(0..9) where the score's leading digit was sampled; only when asked for and the score has a
    # one-digit integer part that is one token.
    digit_probs: tuple[float, ...] | None = None
    # The policy version of the weights it was sampled with (the training step whose update made them).
    weight_version: int = 0


@dataclass(frozen=True)
class ImageRollout:
    prompt_token_ids: list[int]  # as vLLM saw them: image pads expanded once
    completions: list[Completion] = field(default_factory=list)
    # Wall-clock (time.time()) start and end of the generate call that sampled it.
    generated_between: tuple[float, float] = (0.0, 0.0)


class RolloutWorkerExtension(WeightSyncExtension):
    """vLLM's worker_extension_cls of the rollout engine, mixed into each of its workers (every
    tensor-parallel rank): the weight pushes' loading (vlm.weight_sync), a random stream apart, and a
    report of where it runs (`extension_report`).

    vLLM samples unseeded requests from the default torch generator of the process that runs its
    worker: the engine's own process with one rank in-process, a process per rank under the
    multiprocessing executor, where every rank samples with the same generator state (the ranks stay in
    step only so). `enter_stream_apart` reseeds it on each rank and `leave_stream_apart` puts it back, so
    a side call (an evaluation) leaves the rollouts' stream where it was. Seeded requests are no way out
    on the CPU: vLLM 0.32's CPU runner fails on large seeded batches ("CPU Generator does not use offset").
    """

    def enter_stream_apart(self, seed: int) -> None:
        import torch

        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._engine_stream = (torch.get_rng_state(), cuda_states)
        torch.manual_seed(seed)

    def leave_stream_apart(self) -> None:
        import torch

        cpu_state, cuda_states = self._engine_stream
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)

    # The policy version the driver named for the weights this process loaded last (0: the start model).
    named_weight_version: int = 0

    def name_weight_version(self, version: int) -> None:
        self.named_weight_version = version

    def extension_report(self) -> dict:
        """The file this class was imported from in this worker's process, the process id and the
        weight version it holds. A multiprocess engine's workers are processes of vLLM's that import the
        project by themselves: under `ray job submit --working-dir`, from the job's copy of it."""
        return {"file": __file__, "pid": os.getpid(), "weight_version": self.named_weight_version}


WORKER_EXTENSION = f"{RolloutWorkerExtension.__module__}.{RolloutWorkerExtension.__qualname__}"


def cpu_rank_binding(cores: list[int], tensor_parallel_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for a tensor-parallel CPU engine on `cores` (the worker's own): the
    cores in tensor_parallel_size contiguous, nearly equal groups, one per rank, '|'-separated
    ([0, 1] -> "0|1", [0..4] over 2 -> "0,1,2|3,4"), read by vLLM's multiprocessing executor
    (vllm/utils/ompmultiprocessing.py). Its default, "auto", wants a NUMA node per rank."""
    cores = sorted(cores)
    if len(cores) < tensor_parallel_size:
        raise ValueError(
            f"rollout.tensor_parallel_size={tensor_parallel_size} needs a core per vLLM rank, but this rollout "
            f"worker may run on {len(cores)} core(s) {cores} (cluster.rollout.cpu_affinity, or the machine's)"
        )
    size, extra = divmod(len(cores), tensor_parallel_size)
    groups, start = [], 0
    for rank in range(tensor_parallel_size):
        end = start + size + (rank < extra)
        groups.append(",".join(str(core) for core in cores[start:end]))
        start = end
    return "|".join(groups)


@contextlib.contextmanager
def _environment(variables: dict[str, str]):
    """The block with these environment variables set, then as they were."""
    before = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def suppression_bias(token_ids: list[int]) -> dict[int, float]:
    """`SamplingParams.logit_bias` that keeps `token_ids` from ever being sampled.

    Both of vLLM 0.32's runners add the bias to the logits (the V1/CPU runner's LogitBiasLogitsProcessor,
    Model Runner V2's logit-bias kernel), so -inf masks a token exactly as `allowed_token_ids` would.
    Unlike `allowed_token_ids` it names the few banned ids, not the ~150k allowed ones: Model Runner V2,
    which vLLM picks on CUDA, caps both lists (vllm/v1/worker/gpu/sample/logit_bias.py). Only the
    OpenAI server clamps a bias to [-100, 100]; `SamplingParams` keeps it. The reported log-probs are
    the raw ones, taken before any bias.
    """
    return dict.fromkeys(token_ids, float("-inf"))


def build_sampling_params(
    cfg: RolloutConfig,
    stop_token_ids: list[int],
    suppressed_token_ids: list[int],
    n: int,
    temperature: float | None = None,
    seed: int | None = None,
    top_logprobs: int = 0,
):
    """The `SamplingParams` of one request: n samples under the rollout config (temperature overridable);
    suppressed_token_ids are never sampled when cfg.suppress_vision_tokens is on."""
    from vllm import SamplingParams

    return SamplingParams(
        n=n,
        temperature=cfg.temperature if temperature is None else temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_tokens=cfg.max_new_tokens,
        seed=seed,
        logprobs=top_logprobs,
        stop_token_ids=stop_token_ids,
        logit_bias=suppression_bias(suppressed_token_ids) if cfg.suppress_vision_tokens else None,
        skip_special_tokens=True,
    )


def lora_engine_args(lora: LoraConfig) -> dict:
    """`LLM(...)` arguments of an engine that serves the learner's adapter: LoRA on, one adapter at a time,
    adapter slots of the smallest rank vLLM offers that holds learner.lora.rank, and LoRA layers in the
    vision tower and merger when those are adapted (vLLM's tower/connector LoRA, which Qwen2.5-VL has)."""
    return {
        "enable_lora": True,
        "max_lora_rank": vllm_max_lora_rank(lora.rank),
        "max_loras": 1,
        "enable_tower_connector_lora": lora.vision_tower or lora.merger,
    }


def adapter_peft_config(lora: LoraConfig) -> dict:
    """The adapter's peft config as vLLM reads it (adapter_config.json's fields; learner.policy.apply_lora
    builds the same adapter: scaling alpha / rank, no rsLoRA, no bias)."""
    return {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": list(lora.target_modules)}


def _note_peak_kv_cache_usage(llm):
    """In the in-process engine, wrap its scheduler's `schedule` to keep the largest KV-cache usage of
    any engine step (between generations the cache is free again, so a reading then says nothing).
    Returns (scheduler, [peak]), or None where the scheduler is in another process."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # vLLM's InprocClient only
    scheduler = getattr(core, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "kv_cache_manager"):
        return None
    peak = [0.0]
    schedule = scheduler.schedule

    def schedule_noting_usage(*args, **kwargs):
        output = schedule(*args, **kwargs)
        peak[0] = max(peak[0], scheduler.kv_cache_manager.usage)
        return output

    scheduler.schedule = schedule_noting_usage
    return scheduler, peak


def watch_engine_core(client, stop: threading.Event, interval_s: float = 0.5) -> bool:
    """Until `stop` is set, watch a multiprocess engine's client (vLLM's SyncMPClient) for its
    engine-core process dying; returns True once it did, after failing what waited on it.

    vLLM's own monitor marks the client dead (resources.engine_dead) and shuts it down when the
    process exits, but a generate or collective_rpc already waiting on the process's answer waits on:
    the output thread stops without a word. So the waiters are woken here with vLLM's EngineDeadError
    (the output queue gets one, every pending utility call fails with one), which reaches the driver as a
    RayTaskError, and the driver replaces the worker (cluster.system.is_dead_worker_error). A stop (an
    orderly shutdown) returns False without touching anything.
    """
    from vllm.v1.engine.exceptions import EngineDeadError

    while not stop.wait(interval_s):
        if client.resources.engine_dead:
            break
    else:
        return False
    client.outputs_queue.put_nowait(EngineDeadError())
    for future in list(client.utility_results.values()):
        if not future.done():
            future.set_exception(EngineDeadError())
    return True


class RolloutEngine:
    def __init__(
        self,
        model_path: str | Path,
        model_cfg: ModelConfig,
        rollout_cfg: RolloutConfig,
        weight_transfer_backend: str = "nccl",
        colocate: ColocateConfig | None = None,
        lora: LoraConfig | None = None,
    ) -> None:
        """weight_transfer_backend: vLLM's weight-transfer backend on CUDA ("nccl" for learners on GPUs of
        their own, "ipc" for a learner rank on the same GPU: cluster.weight_transport); none on the CPU.
        colocate: the engine shares its device with a learner rank and sleeps while it trains (`sleep`,
        `wake_up`). lora: the learner's; with push=adapter the engine serves its adapter (pushes load the
        adapter, not weights)."""
        # Read by vLLM when the engine is created; in-process start-up is ~20 s faster on the CPU.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if rollout_cfg.in_process_engine else "1"
        import torch
        from vllm import LLM
        from vllm import envs as vllm_envs

        quiet_expected_vllm_warnings(VISION_PREFIXES if model_cfg.freeze_vision else ())
        self.model_path = Path(model_path)
        self.model_cfg = model_cfg
        self.rollout_cfg = rollout_cfg
        self.processor = load_processor(self.model_path, model_cfg.min_pixels, model_cfg.max_pixels)
        tokenizer = self.processor.tokenizer
        self.prompt_texts = {
            thinking: build_prompt_text(self.processor, thinking) for thinking in (True, False)
        }
        self.stop_token_ids = [self._token_id(t) for t in STOP_TOKENS]
        self.digit_token_ids = [self._token_id(str(digit)) for digit in range(10)]
        self.suppressed_token_ids = sorted({self._token_id(t) for t in VISION_SPECIAL_TOKENS})
        self.weight_version = 0
        self.adapter = lora if lora is not None and lora.push == "adapter" else None
        self.lora_request = None  # the adapter's, once a push has loaded it

        tp = rollout_cfg.tensor_parallel_size
        hf_config = json.loads((self.model_path / "config.json").read_text())
        problem = tensor_parallel_problem(hf_config, tp)
        if problem is not None:
            raise ValueError(f"{self.model_path / 'config.json'}: {problem}")
        # A CPU engine's ranks each run on cores of their own among this worker's (unless set outside).
        binding = {}
        if tp > 1 and not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            binding["VLLM_CPU_OMP_THREADS_BIND"] = cpu_rank_binding(sorted(os.sched_getaffinity(0)), tp)
        self._cuda = torch.cuda.is_available()
        # A multiprocess engine gets CUDA IPC handles (torch objects, which vLLM's message encoding refuses)
        # pickled; its engine-core process unpickles them only with this set. The socket is local.
        self._pickles_ipc_handles = (
            self._cuda and weight_transfer_backend == "ipc" and not rollout_cfg.in_process_engine
        )
        if self._pickles_ipc_handles:
            binding["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"

        longest_prompt = max(len(tokenizer(text)["input_ids"]) for text in self.prompt_texts.values())
        max_image_tokens = math.ceil(model_cfg.max_pixels / PIXELS_PER_IMAGE_TOKEN)
        memory = (
            {"gpu_memory_utilization": rollout_cfg.gpu_memory_utilization}
            if torch.cuda.is_available()
            else {"kv_cache_memory_bytes": int(rollout_cfg.kv_cache_gib * (1 << 30))}
        )
        self.asleep = False
        if colocate is not None and torch.cuda.is_available():
            # vLLM's sleep mode: weights and KV cache in its own allocator's pool, which can hand them back.
            # The CPU platform has none (it would refuse the flag); there `sleep` pauses the scheduler and
            # clears the caches only.
            tied = (hf_config.get("text_config") or hf_config).get("tie_word_embeddings", False)
            memory["enable_sleep_mode"] = True
            if colocate.sleep_level == 2:
                memory["sleep_preserve_parameter_names"] = preserve_patterns(colocate.keep_weights, tied)
        # An engine started earlier in this process froze vLLM's reading of the environment (its
        # enable_envs_cache); this one's settings (above and VLLM_ENABLE_V1_MULTIPROCESSING) must count.
        vllm_envs.disable_envs_cache()
        with _environment(binding):
            self.llm = LLM(
                model=str(self.model_path),
                dtype=model_cfg.dtype,
                seed=rollout_cfg.seed,
                max_model_len=longest_prompt + max_image_tokens + rollout_cfg.max_new_tokens,
                tensor_parallel_size=tp,
                # Ranks as processes of this worker: inside a Ray placement group vLLM would pick its Ray
                # executor, which the CPU platform refuses and which would place ranks outside the bundle.
                distributed_executor_backend="mp" if tp > 1 else None,
                enforce_eager=rollout_cfg.enforce_eager,
                trust_remote_code=model_cfg.trust_remote_code,
                limit_mm_per_prompt={"image": 1, "video": 0},
                mm_processor_kwargs={
                    "size": {"shortest_edge": model_cfg.min_pixels, "longest_edge": model_cfg.max_pixels}
                },
                # Sampling comes only from RolloutConfig, never from the checkpoint's generation_config.json.
                generation_config="vllm",
                worker_extension_cls=WORKER_EXTENSION,
                weight_transfer_config=engine_weight_transfer_config(weight_transfer_backend),
                **(lora_engine_args(self.adapter) if self.adapter is not None else {}),
                **memory,
            )
        self._kv_cache_peak = _note_peak_kv_cache_usage(self.llm)
        self._pushed_bytes = 0  # by bucket pushes since the previous push_figures()
        self._stop_watching = threading.Event()
        client = self.llm.llm_engine.engine_core
        if hasattr(client, "outputs_queue") and hasattr(client, "resources"):  # the multiprocess engine
            threading.Thread(
                target=watch_engine_core,
                args=(client, self._stop_watching),
                name="vqr1-engine-core-watch",
                daemon=True,
            ).start()

    def check_alive(self) -> None:
        """Raise vLLM's EngineDeadError when the engine-core process has died (the multiprocess engine;
        the in-process one dies with this process)."""
        ensure_alive = getattr(self.llm.llm_engine.engine_core, "ensure_alive", None)
        if ensure_alive is not None:
            ensure_alive()

    def kv_cache_figures(self) -> dict[str, float]:
        """The share of the KV cache in use now and at its fullest since the previous call, in percent;
        empty for the multiprocess engine, whose scheduler runs in its engine-core process."""
        if self._kv_cache_peak is None:
            return {}
        scheduler, peak = self._kv_cache_peak
        usage = scheduler.kv_cache_manager.usage
        figures = {"kv_cache_percent": 100.0 * usage, "kv_cache_peak_percent": 100.0 * max(peak[0], usage)}
        peak[0] = 0.0
        return figures

    def push_figures(self) -> dict[str, float]:
        """The MiB that bucket pushes (`update_weights`) loaded since the previous call; empty when none did
        (NCCL pushes are not counted here)."""
        if not self._pushed_bytes:
            return {}
        figures = {"weight_push_mib": self._pushed_bytes / (1 << 20)}
        self._pushed_bytes = 0
        return figures

    def _token_id(self, token: str) -> int:
        return token_id(self.processor.tokenizer, token, self.model_path)

    def sampling_params(
        self, n: int, temperature: float | None = None, seed: int | None = None, top_logprobs: int = 0
    ):
        return build_sampling_params(
            self.rollout_cfg,
            self.stop_token_ids,
            self.suppressed_token_ids,
            n,
            temperature,
            seed,
            top_logprobs,
        )

    def generate(
        self,
        images: list[ImageInput],
        n: int,
        *,
        temperature: float | None = None,
        thinking: bool | None = None,
        seed: int | None = None,
        stream_apart: int | None = None,
        digit_probs: bool = False,
    ) -> list[ImageRollout]:
        """n completions for each image, in the order of `images`.

        Images are PIL images, or encoded files (bytes or a path; decoded by iqa.images.load_image), so a
        caller can ship each image's file bytes once instead of G pixel copies.

        seed=None draws from the engine's generator (seeded once by rollout.seed, so successive calls
        differ); an int makes the call reproducible: sample k of image i uses seed + i * n + k (vLLM seeds
        the k-th child request with seed + k), so no two samples of the call share a random stream.
        stream_apart=int draws the call from a stream of its own, seeded with that int, and leaves the
        engine's generator where it was, so an evaluation does not change the training samples after
        it: on every rank, by RolloutWorkerExtension, except for a multiprocess engine on CUDA (the GPU
        presets), whose call gets per-request seeds from that int instead.
        digit_probs=True fills Completion.digit_probs (top-k log-probs at every position: evaluation only).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self.asleep:
            raise RuntimeError(
                "generate on a sleeping rollout engine: wake_up('weights') and wake_up('kv_cache') first"
            )
        if not images:
            return []
        prompt = self.prompt_texts[self.rollout_cfg.thinking if thinking is None else thinking]
        requests = [
            {
                "prompt": prompt,
                "multi_modal_data": {"image": load_image(image)},
            }
            for image in images
        ]
        if seed is not None and stream_apart is not None:
            raise ValueError("give seed or stream_apart, not both")
        seeded_apart = stream_apart is not None and self._cuda and not self.rollout_cfg.in_process_engine
        if seeded_apart:
            seed = stream_apart  # per-request seeds: sampled from generators of their own
        top_logprobs = DIGIT_TOP_K if digit_probs else 0
        params = [
            self.sampling_params(n, temperature, None if seed is None else seed + i * n, top_logprobs)
            for i in range(len(images))
        ]
        started = time.time()
        if stream_apart is None or seeded_apart:
            outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
        else:
            self.llm.collective_rpc("enter_stream_apart", args=(stream_apart,))
            try:
                outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
            finally:
                self.llm.collective_rpc("leave_stream_apart")
        between = (started, time.time())
        return [self._to_rollout(output, digit_probs, between) for output in outputs]

    def _to_rollout(self, output, with_digit_probs: bool, between: tuple[float, float]) -> ImageRollout:
        completions = []
        for sample in output.outputs:
            score = extract_score(sample.text)
            parse_ok = score is not None and math.isfinite(score)
            completions.append(
                Completion(
                    token_ids=list(sample.token_ids),
                    text=sample.text,
                    logprobs=[
                        step[token].logprob
                        for token, step in zip(sample.token_ids, sample.logprobs, strict=True)
                    ],
                    score=score,
                    parse_ok=parse_ok,
                    truncated=sample.finish_reason == "length",
                    digit_probs=self._digit_probs(sample) if with_digit_probs and parse_ok else None,
                    weight_version=self.weight_version,
                )
            )
        return ImageRollout(list(output.prompt_token_ids), completions, generated_between=between)

    def _digit_probs(self, sample) -> tuple[float, ...] | None:
        """p(0..9) at the token holding the score's leading digit, or None when that digit is not a token
        of its own (or the text cannot be lined up with the tokens)."""
        offset = score_digit_offset(sample.text)
        if offset is None:
            return None
        index = self._token_starting_at(list(sample.token_ids), offset, sample.text)
        if index is None or sample.token_ids[index] not in self.digit_token_ids:
            return None
        top = sample.logprobs[index]
        return tuple(math.exp(top[t].logprob) if t in top else 0.0 for t in self.digit_token_ids)

    def _token_starting_at(self, token_ids: list[int], offset: int, text: str) -> int | None:
        """Index of the token whose decoded text starts at character `offset` of `text` (the decoded
        completion); binary search over decoded prefixes, so long thoughts cost O(n log n) decodes."""

        def decoded_length(count: int) -> int:
            return len(self.processor.tokenizer.decode(token_ids[:count], skip_special_tokens=True))

        if self.processor.tokenizer.decode(token_ids, skip_special_tokens=True) != text:
            return None
        low, high = 0, len(token_ids)  # find the fewest tokens whose text reaches past `offset`
        while low < high:
            middle = (low + high) // 2
            if decoded_length(middle + 1) > offset:
                high = middle
            else:
                low = middle + 1
        if low >= len(token_ids) or decoded_length(low) != offset:
            return None
        return low

    def shutdown(self) -> None:
        """Stop the engine (and its engine-core process, if any) now rather than at garbage collection."""
        self._stop_watching.set()
        self.llm.llm_engine.engine_core.shutdown()

    # --- colocated: sleep while the learner on this device trains ----------------------------------

    def sleep(self, level: int) -> None:
        """vLLM's sleep: the scheduler paused, the prefix, encoder and multimodal caches cleared, the KV
        cache dropped, the weights offloaded to host memory (level 1) or dropped but for the parameters
        kept by name (level 2). On the CPU only the pause and the clearing happen."""
        self.llm.sleep(level=level)
        self.asleep = True

    def wake_up(self, tag: str) -> None:
        """Give back "weights" (before a push: a level-2 engine then holds what the push and the kept
        parameters write) or "kv_cache" (the scheduler resumes once both are back)."""
        if tag not in ("weights", "kv_cache"):
            raise ValueError(f"wake_up takes 'weights' or 'kv_cache', not {tag!r}")
        self.asleep = not self.llm.wake_up(tags=[tag])

    # --- weights ---------------------------------------------------------------------------------

    def update_weights(self, buckets: list[bytes]) -> int:
        """Load safetensors buckets (vlm.weight_sync.serialize_buckets) into every worker: the model's
        tensors, or for an adapter engine the adapter's, which replace the adapter it serves. Returns the
        new version."""
        if self.adapter is None:
            loaded = self.llm.collective_rpc("load_weight_buckets", args=(buckets,))
        else:
            args = (buckets, adapter_peft_config(self.adapter), ADAPTER_ID)
            loaded = self.llm.collective_rpc("load_adapter_buckets", args=args)
        if not all(count > 0 for count in loaded):
            raise RuntimeError(f"weight push loaded no tensors on some worker (per-worker counts {loaded})")
        self._pushed_bytes += sum(len(bucket) for bucket in buckets)
        if self.adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest(ADAPTER_NAME, ADAPTER_ID, lora_path=ADAPTER_PATH)
        return self._weights_changed()

    def _weights_changed(self) -> int:
        # Cached KV blocks, encoder outputs and processed images all came from the old weights.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self.weight_version += 1
        return self.weight_version

    def set_weight_version(self, version: int) -> None:
        """Name the weights now loaded: the driver's policy version (the step whose update made them);
        pushes alone only count up from the engine's start. Every vLLM worker records it too."""
        self.weight_version = version
        self.llm.collective_rpc("name_weight_version", args=(version,))

    def extension_reports(self) -> list[dict]:
        """Each vLLM worker's `RolloutWorkerExtension.extension_report`, one per tensor-parallel rank."""
        return self.llm.collective_rpc("extension_report")

    # GPU path (a vlm.weight_sync.WeightSender, NCCL or IPC, drives these through the Ray actor).
    def init_weight_transfer(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def receive_weight_update(self, update_info: dict | list[dict]) -> None:
        if self._pickles_ipc_handles:
            update_info = pickled_ipc_handles(update_info)
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self) -> int:
        self.llm.finish_weight_update()
        return self._weights_changed()

    def shutdown_weight_transfer(self) -> None:
        """Release the transfer group (the engine keeps serving); a no-op when none is open."""
        self.llm.shutdown_weight_transfer_engine()
