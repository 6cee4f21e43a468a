"""The one typed config tree of the system.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key is an error, not a
silent default. Cross-field rules (a fidelity reward needs G >= 2, ...) live in validators here,
so an impossible run is rejected before any process starts. Loading from YAML with command-line
overrides is in `configs.load`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from configs.sleep import lora_push_targets, pushed_weight_groups, sleep_level_problem


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColdStartConfig(Section):
    # The format cold start (models.base_model) re-run on top of the starting checkpoint before
    # training, on the run's built-in training references, cached: random scores, independent of the
    # image, as `score_decimals`-decimal numbers (0: one token, what a tiny model needs to learn).
    steps: int = Field(150, ge=1)
    score_decimals: int = Field(0, ge=0, le=3)


class ModelConfig(Section):
    # A local Hugging Face folder (Qwen2.5-VL / Qwen2-VL). When null, the checkpoint is built
    # locally from `preset` (random weights) or is the project's shipped base model.
    path: str | None = None
    preset: Literal["tiny", "small", "bench"] | None = "tiny"
    # Image resolution bounds, shared by the rollout engine and the learner so both see the same tokens.
    min_pixels: int = Field(3136, gt=0)
    max_pixels: int = Field(12544, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    freeze_vision: bool = False
    gradient_checkpointing: bool = False
    # flash_attention_2 is an opt-in: it needs the `flash` extra built for the node's CUDA torch, checked
    # when the config loads.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    cold_start: ColdStartConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.path is None and self.preset is None:
            raise ValueError("set model.path (a local checkpoint folder) or model.preset")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"model.min_pixels ({self.min_pixels}) > model.max_pixels ({self.max_pixels})")
        if self.attn_implementation == "flash_attention_2" and not _importable("flash_attn"):
            raise ValueError(
                "model.attn_implementation=flash_attention_2 needs the flash_attn package, which cannot be "
                "imported here: install it (pip install -e '.[flash]', built for this node's CUDA torch) "
                "or use model.attn_implementation=sdpa"
            )
        return self


def _importable(module: str) -> bool:
    # An import, not a find_spec: a wheel built for another torch or CUDA is found but fails to import.
    import importlib

    try:
        importlib.import_module(module)
    except (ImportError, OSError):
        return False
    return True


class DatasetSpec(Section):
    # A format registered in `iqa.formats` ("builtin", "kadid10k", "koniq10k", "jsonl", ...).
    format: str
    # Folder (or label file) of the dataset; unused by "builtin".
    path: str | None = None
    # Name used to keep comparison groups within one dataset; defaults to the format name.
    name: str | None = None
    # Image folder (relative to the dataset folder, or absolute); null = the format's usual layout.
    image_dir: str | None = None
    # Direction of the raw label; null = the format's documented direction (see iqa/formats.py).
    higher_is_better: bool | None = None
    # "builtin" only: crops per reference photo (1 = its centre square; more add seeded random zoomed
    # crops, which stay in their photo's split): more content to train on from the same photos.
    views: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        if self.views != 1 and self.format != "builtin":
            raise ValueError(f"views applies to the builtin format only, not {self.format!r}")
        return self


class DataConfig(Section):
    train: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(format="builtin")])
    eval: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(format="builtin")])
    split_ratios: tuple[float, float, float] = (0.6, 0.2, 0.2)
    split_seed: int = 42
    on_bad_input: Literal["error", "skip"] = "error"
    # Built-in benchmark made from scikit-image's photographs.
    builtin_size: int = Field(112, ge=28)
    builtin_seed: int = 0
    # Distortion families (names in iqa.builtin.DISTORTIONS) and strength levels per family.
    builtin_families: list[str] = Field(
        default_factory=lambda: ["blur", "noise", "jpeg", "contrast", "pixelate"]
    )
    builtin_levels: int = Field(5, ge=2)
    cache_dir: str = ".cache/vqr1"

    @property
    def models_cache_dir(self) -> Path:
        """Where locally built models (preset checkpoints, a run's cold start) are cached."""
        return Path(self.cache_dir) / "models"

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if abs(sum(self.split_ratios) - 1.0) > 1e-6 or min(self.split_ratios) < 0:
            raise ValueError(f"data.split_ratios must be >= 0 and sum to 1, got {self.split_ratios}")
        if not self.train:
            raise ValueError("data.train must name at least one dataset")
        return self


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1)
    num_generations: int = Field(6, ge=1, description="G: completions sampled per image")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = no top-k truncation (vLLM's default)")
    max_new_tokens: int = Field(256, ge=1)
    thinking: bool = True
    # The engines' random stream (worker i > 0 derives its own); null: train.seed.
    seed: int | None = None
    # Forbid sampling <|image_pad|> and the other vision special tokens (they crash the learner's forward).
    suppress_vision_tokens: bool = True
    # vLLM workers (ranks) of each engine, one per GPU of the rollout worker's bundle
    # (cluster.rollout.num_gpus must equal it), or on a CPU one per core of the worker's cores.
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.6, gt=0.0, le=1.0)
    kv_cache_gib: float = Field(1.0, gt=0.0, description="CPU KV cache size")
    enforce_eager: bool = False
    # In-process engine: much faster start-up, fine for one engine per process.
    in_process_engine: bool = True
    # Each training batch sampled with per-request seeds drawn from (rollout.seed, step): a batch
    # generated again (a replaced worker, a restart from a checkpoint, a resume) gets the same
    # completions, in either engine. Off by default: vLLM 0.32's CPU runner fails on seeded batches whose
    # prefill is split into chunks (large batches, "CPU Generator does not use offset").
    reproducible_batches: bool = False


def tensor_parallel_problem(hf_config: dict, tensor_parallel_size: int) -> str | None:
    """Why a checkpoint's config.json (as a dict) cannot be split over `tensor_parallel_size` vLLM
    ranks, or None: each rank holds whole attention heads and whole KV heads of the language model, and
    vLLM splits the vision tower's heads the same way."""
    if tensor_parallel_size == 1:
        return None
    text = hf_config.get("text_config") or hf_config  # transformers 5 nests it; older files do not
    heads = {
        "attention heads (num_attention_heads)": text.get("num_attention_heads"),
        "KV heads (num_key_value_heads)": text.get("num_key_value_heads", text.get("num_attention_heads")),
        "vision attention heads (vision_config.num_heads)": (hf_config.get("vision_config") or {}).get(
            "num_heads"
        ),
    }
    for what, count in heads.items():
        if count is not None and count % tensor_parallel_size:
            return (
                f"rollout.tensor_parallel_size={tensor_parallel_size} does not divide the model's {count} "
                f"{what}: every vLLM rank must hold whole heads"
            )
    return None


class RewardConfig(Section):
    fidelity_weight: float = Field(1.0, ge=0.0)
    format_weight: float = Field(1.0, ge=0.0)
    # Images per comparison group within one dataset; null = all images of the dataset in the batch.
    group_size: int | None = Field(None, ge=2)
    # "random": a uniform draw in score_range (published); "exclude": the completion gets no
    # fidelity reward and does not enter its image's mean and variance.
    on_parse_failure: Literal["random", "exclude"] = "random"
    # What to do with parsed scores outside score_range: keep (published), clip, or treat as failure.
    out_of_range: Literal["keep", "clip", "fail"] = "keep"
    score_range: tuple[float, float] = (1.0, 5.0)
    # "published": the paper's fidelity reward; "label_only": minus its label-free part, the pay for
    # scoring near the other images' means (rewards/fidelity.py).
    fidelity: Literal["published", "label_only"] = "published"
    # Permute MOS labels inside each dataset before the reward (the learning control run).
    permute_labels: bool = False

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if self.score_range[0] >= self.score_range[1]:
            raise ValueError(
                f"reward.score_range must be (low, high) with low < high, got {self.score_range}"
            )
        if self.fidelity_weight == 0 and self.format_weight == 0:
            raise ValueError(
                "reward.fidelity_weight and reward.format_weight are both 0: nothing to learn from"
            )
        return self


# The language model's attention and MLP projections (Hugging Face module names), LoRA's default targets.
LANGUAGE_MODEL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest of vLLM's allowed max_lora_rank values (its LoRAConfig's) that holds an adapter of
    rank `rank`: the size of the engine's adapter slots for learner.lora.push=adapter."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(get_args(MaxLoRARanks))
    fitting = [value for value in allowed if value >= rank]
    if not fitting:
        raise ValueError(
            f"learner.lora.rank={rank} with learner.lora.push=adapter: vLLM serves adapters of rank at most "
            f"{allowed[-1]} (max_lora_rank, one of {allowed}); use a smaller rank or learner.lora.push=merged"
        )
    return fitting[0]


class LoraConfig(Section):
    """learner.lora: train low-rank adapters (peft) instead of the whole model (learner/lora.py)."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0, description="the update is (alpha / rank) * B @ A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="on the adapter's input, training forward only")
    # Projections of every language-model layer that get an adapter (a subset of LANGUAGE_MODEL_PROJECTIONS).
    target_modules: list[str] = Field(default_factory=lambda: list(LANGUAGE_MODEL_PROJECTIONS))
    # Opt-in: the vision tower's blocks (attention qkv/proj and MLP), and the patch merger's MLP.
    vision_tower: bool = False
    merger: bool = False
    # How the rollout engines get the trained policy: "merged" pushes W + (alpha / rank) B A of each
    # adapted module under the base weight's name; "adapter" pushes A and B alone, which vLLM serves as
    # a LoRA adapter (LoRARequest) replaced at every push: megabytes instead of the adapted layers.
    push: Literal["merged", "adapter"] = "merged"

    @model_validator(mode="after")
    def _check(self) -> LoraConfig:
        unknown = sorted(set(self.target_modules) - set(LANGUAGE_MODEL_PROJECTIONS))
        if unknown or not self.target_modules or len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(
                f"learner.lora.target_modules={self.target_modules}: give distinct names out of "
                f"{list(LANGUAGE_MODEL_PROJECTIONS)} (the language model's projections; the vision tower "
                "and merger are learner.lora.vision_tower / learner.lora.merger)"
            )
        if self.push == "adapter":
            vllm_max_lora_rank(self.rank)
        return self


class LearnerConfig(Section):
    num_workers: int = Field(1, ge=1, description="DeepSpeed data-parallel ranks")
    lr: float = Field(1e-6, gt=0.0)
    lr_schedule: Literal["constant", "linear"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0.0)
    beta: float = Field(0.04, ge=0.0, description="KL weight to the frozen reference")
    kl_clamp: float = Field(10.0, gt=0.0, description="bound on |log ref - log pi| before exp (overflow)")
    eps_low: float = Field(0.2, gt=0.0, lt=1.0)
    eps_high: float = Field(0.2, gt=0.0)
    num_iterations: int = Field(1, ge=1, description="mu: GRPO updates per rollout batch")
    loss_aggregation: Literal["sequence_mean", "token_mean"] = "sequence_mean"
    advantage: Literal["std", "mean_only"] = "std"
    micro_batch_size: int = Field(8, ge=1, description="completions per forward/backward")
    # Run an image's prompt once for its G completions (exact; 3x faster learner here). Needs the KV
    # cache, which gradient checkpointing switches off: turn this off where that is on.
    share_prompt_forward: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    bf16: bool = False
    # Weights travel to vLLM in buckets of this size (one call per bucket is the scaling bottleneck otherwise).
    weight_bucket_bytes: int = Field(64 << 20, ge=1 << 20)
    # Each token's policy-gradient term times min(pi_old / mu, tis_cap) and its KL term times min(pi / mu,
    # tis_cap), mu the rollout engine's sampling distribution (learner.grpo.grpo_loss): corrects completions
    # sampled with older weights (train.max_staleness >= 1) and vLLM's other numerics. null: tis when
    # max_staleness >= 1.
    off_policy_correction: Literal["none", "tis"] | None = None
    tis_cap: float = Field(2.0, gt=0.0)
    # null: full fine-tuning; a section: LoRA adapters only, on the same ZeRO stages (learner/lora.py).
    lora: LoraConfig | None = None


class PlacementConfig(Section):
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    # Pin the role's processes to these cores of their node (null: wherever the OS puts them): on a CPU
    # machine, cores of their own stand in for the dedicated devices of a cluster (make bench).
    cpu_affinity: list[int] | None = None


class ColocateConfig(Section):
    """cluster.colocate: how a rollout engine and a learner rank share a device under
    cluster.placement=colocate: the engine sleeps while the learner trains (configs/sleep.py)."""

    # 1: the engine's weights wait in host memory (on a GPU); 2: they are dropped and the push writes them
    # again, all but the groups in keep_weights, kept in host memory by name. Both drop the KV cache.
    sleep_level: Literal[1, 2] = 1
    keep_weights: list[str] = Field(default_factory=list)
    # DeepSpeed's optimizer states, fp32 master weights and gradients go to host memory while the engine
    # generates, and come back before the learner trains (engine.offload_states / reload_states).
    offload_learner_states: bool = False


class ClusterConfig(Section):
    # Ray address: null starts a local Ray (or joins RAY_ADDRESS when set).
    address: str | None = None
    # The local Ray's node address; on loopback (the default) every process Ray starts listens on it only.
    host: str = "127.0.0.1"
    num_cpus: int | None = None
    # "dedicated": rollout and learner bundles on separate resources; "colocate": rollout worker i and
    # learner rank i share bundle i (one device), the engine asleep while the learner trains.
    placement: Literal["dedicated", "colocate"] = "dedicated"
    colocate: ColocateConfig = Field(default_factory=ColocateConfig)
    rollout: PlacementConfig = Field(default_factory=PlacementConfig)
    learner: PlacementConfig = Field(default_factory=PlacementConfig)
    reward: PlacementConfig = Field(default_factory=lambda: PlacementConfig(num_cpus=0.0))
    call_timeout_s: float = Field(600.0, gt=0.0)
    # Replacements allowed per role and run, each role counted apart: rollout workers (each replaced
    # worker counts), the reward actor, the learner group (all ranks restarted from the newest checkpoint).
    max_restarts: int = Field(3, ge=0)
    # How the learners' weights reach vLLM each step: "object_store" (safetensors buckets through Ray, works
    # anywhere), "nccl" (GPU to GPU broadcast, vLLM's weight-transfer API), "ipc" (colocated on GPUs: each
    # learner rank hands its GPU's copy to the engine on that GPU by CUDA IPC handles, vLLM's ipc
    # backend), "auto" (ipc when colocated on GPUs, nccl when rollout workers and learners each have whole
    # GPUs, else object_store: NCCL cannot put two ranks on one GPU).
    weight_transport: Literal["auto", "object_store", "nccl", "ipc"] = "auto"

    @property
    def resolved_weight_transport(self) -> str:
        if self.weight_transport != "auto":
            return self.weight_transport
        if self._colocated_on_gpus():
            return "ipc"
        return "nccl" if self._whole_gpus_on_both_sides() else "object_store"

    @property
    def uses_weight_transfer_api(self) -> bool:
        """Whether pushes go through vLLM's weight-transfer API (learner rank 0 drives the engines;
        `cluster.system.open_weight_transfer` opens it), not through buckets in the object store."""
        return self.resolved_weight_transport in ("nccl", "ipc")

    def _whole_gpus_on_both_sides(self) -> bool:
        return self.rollout.num_gpus >= 1 and self.learner.num_gpus >= 1

    def _colocated_on_gpus(self) -> bool:
        return self.placement == "colocate" and self.rollout.num_gpus > 0 and self.learner.num_gpus > 0

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.weight_transport == "nccl" and not self._whole_gpus_on_both_sides():
            raise ValueError(
                "cluster.weight_transport=nccl needs whole GPUs on both sides (NCCL cannot put two ranks "
                f"on one GPU): cluster.rollout.num_gpus={self.rollout.num_gpus}, "
                f"cluster.learner.num_gpus={self.learner.num_gpus}"
            )
        if self.weight_transport == "ipc" and not self._colocated_on_gpus():
            raise ValueError(
                "cluster.weight_transport=ipc hands a learner rank's GPU memory to the rollout engine on the "
                "same GPU: it needs cluster.placement=colocate with GPUs on both sides (got placement="
                f"{self.placement}, cluster.rollout.num_gpus={self.rollout.num_gpus:g}, "
                f"cluster.learner.num_gpus={self.learner.num_gpus:g})"
            )
        return self


class TrackingConfig(Section):
    # null: MLFLOW_TRACKING_URI, else a sqlite store in the project folder.
    tracking_uri: str | None = None
    experiment: str = "visualquality-r1"
    run_name: str | None = None
    sample_table_every: int = Field(10, ge=1)


class CheckpointConfig(Section):
    dir: str = "outputs/checkpoints"
    every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep_last: int = Field(2, ge=1)
    resume: bool = False


class EvalConfig(Section):
    # "held_out": val + test (every reference not trained on); "all": the whole eval datasets, as in
    # zero-shot cross-dataset evaluation.
    split: Literal["train", "val", "test", "held_out", "all"] = "test"
    every: int = Field(0, ge=0, description="steps between evaluations; 0 = before and after only")
    num_samples: int = Field(4, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    thinking: bool = True
    # Evaluations sample from a stream of their own, seeded with this at every evaluation: they leave
    # the rollouts' random stream alone (a run's training is the same with or without them), and every
    # evaluation of a run draws alike, so before and after differ by the weights. null: train.seed.
    seed: int | None = None
    max_images: int | None = Field(None, ge=1)
    bootstrap: int = Field(1000, ge=0)


class TrainConfig(Section):
    images_per_step: int = Field(8, ge=1, description="images in one rollout batch")
    steps: int = Field(10, ge=1)
    seed: int = 0
    output_dir: str = "outputs"
    # After each weight push, compare rollout worker 0's greedy log-probs with the learner's on one image.
    verify_weight_sync: bool = False
    # k: the rollout workers generate the next k batches while the learners train, and no completion is
    # trained on with weights more than k updates newer than the ones that sampled it. 0: generate, then
    # train, in turn (synchronous).
    max_staleness: int = Field(0, ge=0)


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        # One seed for a run (train.seed) unless the rollouts or the evaluations are given their own.
        if self.rollout.seed is None:
            self.rollout.seed = self.train.seed
        if self.eval.seed is None:
            self.eval.seed = self.train.seed
        if self.reward.fidelity_weight > 0 and self.rollout.num_generations < 2:
            raise ValueError(
                "rollout.num_generations must be >= 2 with the fidelity reward "
                "(its variance terms need G >= 2 samples per image)"
            )
        if self.reward.group_size is not None and self.reward.group_size > self.train.images_per_step:
            raise ValueError(
                f"reward.group_size ({self.reward.group_size}) > train.images_per_step "
                f"({self.train.images_per_step}): no comparison group could be filled"
            )
        if self.train.images_per_step % self.learner.num_workers:
            raise ValueError(
                f"train.images_per_step ({self.train.images_per_step}) must be divisible by "
                f"learner.num_workers ({self.learner.num_workers}): every rank trains on the same number of images"
            )
        if self.learner.share_prompt_forward and self.model.gradient_checkpointing:
            raise ValueError(
                "learner.share_prompt_forward needs the KV cache, which model.gradient_checkpointing "
                "switches off: set learner.share_prompt_forward=false or model.gradient_checkpointing=false"
            )
        lora = self.learner.lora
        if lora is not None and lora.vision_tower and self.model.freeze_vision:
            raise ValueError(
                "learner.lora.vision_tower=true puts adapters on the vision tower, which model.freeze_vision=true "
                "freezes: set one of them to false"
            )
        if lora is not None and lora.push == "adapter" and self.cluster.uses_weight_transfer_api:
            raise ValueError(
                "learner.lora.push=adapter goes through the object store: vLLM 0.32's weight transfer "
                f"({self.cluster.resolved_weight_transport}) loads what it receives into the base model and "
                "drops every LoRA adapter when it finishes (reset_lora_state); set "
                "cluster.weight_transport=object_store (the adapter is megabytes)"
            )
        if self.learner.off_policy_correction is None:
            self.learner.off_policy_correction = "tis" if self.train.max_staleness >= 1 else "none"
        rollout = self.rollout
        if self.learner.off_policy_correction == "tis" and (
            rollout.temperature != 1.0 or rollout.top_p != 1.0 or rollout.top_k != 0
        ):
            raise ValueError(
                "learner.off_policy_correction=tis divides by the rollout engine's log-probs, vLLM's raw ones "
                "(actor/rollout_engine.py): they are the sampling distribution only at rollout.temperature=1, "
                f"top_p=1, top_k=0 (got {rollout.temperature:g}, {rollout.top_p:g}, {rollout.top_k}); "
                "set those, or learner.off_policy_correction=none with train.max_staleness=0"
            )
        if self.train.images_per_step < self.rollout.num_workers:
            raise ValueError(
                f"train.images_per_step ({self.train.images_per_step}) < rollout.num_workers "
                f"({self.rollout.num_workers}): some rollout workers would get no image"
            )
        self._check_tensor_parallel()
        self._check_colocation()
        return self

    def _check_colocation(self) -> None:
        """Colocated, each device holds a rollout engine and a learner rank that take turns: the engine
        sleeps while the learner trains (cluster.colocate, configs/sleep.py)."""
        cluster = self.cluster
        if cluster.placement != "colocate":
            return
        if self.train.max_staleness:
            raise ValueError(
                f"train.max_staleness={self.train.max_staleness} with cluster.placement=colocate: a colocated "
                "rollout engine sleeps while the learner on its device trains, so no batch can be generated "
                "during training, which is what k >= 1 buys; set train.max_staleness=0"
            )
        if cluster.rollout.num_gpus + cluster.learner.num_gpus > 1:
            raise ValueError(
                f"cluster.placement=colocate puts a rollout worker and a learner rank on one device: "
                f"cluster.rollout.num_gpus ({cluster.rollout.num_gpus:g}) + cluster.learner.num_gpus "
                f"({cluster.learner.num_gpus:g}) must be at most 1 (e.g. 0.5 each)"
            )
        if self.rollout.tensor_parallel_size > 1:
            raise ValueError(
                "rollout.tensor_parallel_size > 1 with cluster.placement=colocate is not built: a colocated "
                "engine shares its one device with a learner rank"
            )
        if cluster.colocate.offload_learner_states and self.learner.zero_stage == 0:
            raise ValueError(
                "cluster.colocate.offload_learner_states needs learner.zero_stage >= 1 (DeepSpeed's "
                "offload_states moves a ZeRO optimizer's states)"
            )
        if (
            cluster.colocate.offload_learner_states
            and self.learner.zero_stage == 3
            and not self.learner.offload_optimizer
        ):
            raise ValueError(
                "cluster.colocate.offload_learner_states with learner.zero_stage=3: DeepSpeed 0.19.8 moves a "
                "ZeRO-3 optimizer's states only for its FusedAdam, and the learners step torch's AdamW "
                "(learner/deepspeed_config.py); use learner.zero_stage=2, or learner.offload_optimizer=true "
                "(the optimizer's states then stay in host memory)"
            )
        problem = sleep_level_problem(
            cluster.colocate.sleep_level,
            pushed_weight_groups(self.model.freeze_vision, lora_push_targets(self.learner.lora)),
            set(cluster.colocate.keep_weights),
        )
        if problem is not None:
            raise ValueError(problem)

    def _check_tensor_parallel(self) -> None:
        """Room for a tensor-parallel engine's ranks: its worker's bundle holds one GPU per rank, or its
        pinned cores one core per rank (unpinned CPU workers: actor.rollout_engine checks the cores it
        gets); heads split evenly (the checkpoint named by model.path; presets: at engine start)."""
        tp = self.rollout.tensor_parallel_size
        if tp == 1:
            return
        placement = self.cluster.rollout
        if placement.num_gpus and placement.num_gpus != tp:
            raise ValueError(
                f"cluster.rollout.num_gpus={placement.num_gpus:g} with rollout.tensor_parallel_size={tp}: "
                "a rollout worker's bundle holds one GPU per vLLM rank of its engine; set "
                f"cluster.rollout.num_gpus={tp}"
            )
        if not placement.num_gpus and placement.cpu_affinity is not None and len(placement.cpu_affinity) < tp:
            raise ValueError(
                f"cluster.rollout.cpu_affinity={placement.cpu_affinity} gives {len(placement.cpu_affinity)} "
                f"core(s) for rollout.tensor_parallel_size={tp}: each vLLM rank needs a core of its own"
            )
        if self.model.path is not None:
            config_file = Path(self.model.path).expanduser() / "config.json"
            if config_file.is_file():
                import json

                problem = tensor_parallel_problem(json.loads(config_file.read_text()), tp)
                if problem is not None:
                    raise ValueError(f"{config_file}: {problem}")
