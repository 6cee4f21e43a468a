"""LoRA learners (learner.lora): the merge against the formula, the push plan, the config's checks, the
merged and peft checkpoints; then for real (slow): a 2-rank ZeRO-3 LoRA learner group, a cpu-tiny
LoRA run whose vLLM engine must agree with the learner after every push, and whose resume is exact, and
one whose engine serves the pushed adapter itself (learner.lora.push=adapter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import policy_shards

from configs.load import ConfigError, load_config
from configs.schema import LoraConfig, ModelConfig
from learner.lora import (
    adapter_tensor_name,
    hf_name,
    is_adapter_parameter,
    merged_state_dict,
    merged_weight,
    push_plan,
    pushed_tensors,
    scaling,
    target_modules_pattern,
)
from learner.policy import apply_lora, checkpoint_names, load_policy_model

MIN_PIXELS, MAX_PIXELS = 3136, 12544
ROOT = Path(__file__).resolve().parents[1]


def reference_merge(weight, lora_a, lora_b, scale):
    """W[i, j] + scale * sum_k B[i, k] A[k, j], element by element in float64."""
    out = weight.double().clone()
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            out[i, j] += scale * sum(
                float(lora_b[i, k]) * float(lora_a[k, j]) for k in range(lora_a.shape[0])
            )
    return out


@pytest.mark.parametrize("rank", [1, 3])
def test_merged_weight_is_the_formula_and_leaves_the_base_alone(rank):
    generator = torch.Generator().manual_seed(rank)
    weight = torch.randn(5, 7, generator=generator)
    lora_a, lora_b = torch.randn(rank, 7, generator=generator), torch.randn(5, rank, generator=generator)
    before = weight.clone()
    merged = merged_weight(weight, lora_a, lora_b, 2.5)
    torch.testing.assert_close(
        merged.double(), reference_merge(weight, lora_a, lora_b, 2.5), atol=1e-5, rtol=0
    )
    assert torch.equal(weight, before) and merged.data_ptr() != weight.data_ptr()
    # B = 0 (a fresh adapter): exactly W.
    assert torch.equal(merged_weight(weight, lora_a, torch.zeros_like(lora_b), 2.5), weight)
    # fan_in_fan_out (Conv1D stores W transposed): the transposed update.
    transposed = merged_weight(weight.T.contiguous(), lora_a, lora_b, 2.5, fan_in_fan_out=True)
    torch.testing.assert_close(transposed.T, merged, atol=0, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        merged_weight(weight.T, lora_a, lora_b, 2.5)


def test_bf16_merge_is_computed_in_fp32_and_rounded_once():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 8, generator=generator).bfloat16()
    lora_a, lora_b = (torch.randn(2, 8, generator=generator) * 1e-3).bfloat16(), torch.randn(8, 2).bfloat16()
    merged = merged_weight(weight, lora_a, lora_b, 1.0)
    assert merged.dtype == torch.bfloat16
    expected = (weight.double() + lora_b.double() @ lora_a.double()).bfloat16()
    assert torch.equal(merged, expected)


def test_merge_equals_peft_layer_output_whatever_the_dropout():
    """peft's own adapted Linear (dropout 0.5, in eval mode: the model vLLM samples from) equals the plain
    Linear with the merged weight: dropout is no part of the merge."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 4))
    peft_model = get_peft_model(
        base, PeftLoraConfig(r=2, lora_alpha=6, lora_dropout=0.5, target_modules=["0"])
    )
    layer = peft_model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    peft_model.eval()
    x = torch.randn(3, 6)
    merged = merged_weight(
        layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight, 6 / 2
    )
    torch.testing.assert_close(peft_model(x), x @ merged.T + layer.base_layer.bias, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def tiny_checkpoint():
    from vlm.factory import build_checkpoint

    return build_checkpoint(
        "tiny", ROOT / ".cache" / "vqr1" / "models", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )


def adapted_model(checkpoint, lora: LoraConfig, seed: int = 1):
    """The tiny policy with adapters whose B is random (a trained adapter), and its checkpoint names."""
    model = load_policy_model(checkpoint, ModelConfig(), torch.float32, trainable=True)
    names = checkpoint_names(model)
    peft_model = apply_lora(model, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return peft_model, names


def test_only_the_adapters_train_and_a_fresh_adapter_is_the_base_model(tiny_checkpoint):
    base = load_policy_model(tiny_checkpoint, ModelConfig(), torch.float32, trainable=False)
    peft_model = apply_lora(
        load_policy_model(tiny_checkpoint, ModelConfig(), torch.float32, trainable=True), LoraConfig(rank=4)
    )
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # The language model's 7 projections in each of its 2 layers, nothing in the vision tower.
    assert len(trainable) == 2 * 7 * 2 and not any("visual" in n for n in trainable)
    # B = 0: every base weight (and so every output) is the base model's.
    base_state = base.state_dict()
    for name, tensor in merged_state_dict(peft_model.state_dict(), 2.0).items():
        assert torch.equal(tensor, base_state[name]), name
    # The same initial A on every rank (seeded).
    again = apply_lora(
        load_policy_model(tiny_checkpoint, ModelConfig(), torch.float32, trainable=True), LoraConfig(rank=4)
    )
    for (name, a), (_, b) in zip(peft_model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_vision_tower_and_merger_are_opt_in(tiny_checkpoint):
    import re

    model = load_policy_model(tiny_checkpoint, ModelConfig(), torch.float32, trainable=False)
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def matched(lora):
        return {name for name in linear if re.fullmatch(target_modules_pattern(lora), name)}

    language = matched(LoraConfig())
    assert language == {n for n in linear if n.startswith("model.language_model.")}
    vision = matched(LoraConfig(vision_tower=True)) - language
    assert vision == {n for n in linear if n.startswith("model.visual.blocks.")}
    merger = matched(LoraConfig(merger=True)) - language
    assert merger == {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}
    assert matched(LoraConfig(target_modules=["q_proj"])) == {n for n in language if n.endswith(".q_proj")}


def test_push_plan_carries_whole_packed_layers_and_nothing_else(tiny_checkpoint):
    """Only q_proj adapted: vLLM loads q, k and v into one layer, so all three (weights and biases) go,
    q's weight merged; o_proj, the MLP and the vision tower do not."""
    peft_model, names = adapted_model(tiny_checkpoint, LoraConfig(rank=2, alpha=4, target_modules=["q_proj"]))
    plan = push_plan([name for name, _ in peft_model.named_parameters()])
    expected = [
        f"model.language_model.layers.{layer}.self_attn.{proj}.{kind}"
        for layer in (0, 1)
        for proj in ("q_proj", "k_proj", "v_proj")
        for kind in ("weight", "bias")
    ]
    assert [item.name for item in plan] == expected
    assert all(name in names for name in expected)  # each has a checkpoint name to push under
    merged = {item.name for item in plan if item.lora_a is not None}
    assert merged == {f"model.language_model.layers.{layer}.self_attn.q_proj.weight" for layer in (0, 1)}
    # The pushed tensors are the merged model's.
    state = peft_model.state_dict()
    full = merged_state_dict(state, scaling(LoraConfig(rank=2, alpha=4)))
    for name, tensor in pushed_tensors(plan, state, 2.0):
        assert torch.equal(tensor, full[name]), name
    with pytest.raises(ValueError, match="no parameter of adapter"):
        push_plan(["base_model.model.lm_head.weight"])
    with pytest.raises(ValueError, match="only one of"):
        push_plan(["base_model.model.x.q_proj.lora_A.default.weight"])
    assert (
        hf_name("base_model.model.model.layers.0.q_proj.base_layer.weight") == "model.layers.0.q_proj.weight"
    )


def test_merged_state_dict_is_the_adapted_model(tiny_checkpoint, tmp_path):
    """A plain model loaded with the merged state dict computes what the peft model computes, and the
    adapter saved by peft loads over the base model to the same outputs."""
    from peft import PeftModel

    from vlm.factory import load_processor
    from vlm.prompts import build_prompt_text

    lora = LoraConfig(rank=4, alpha=8, vision_tower=True, merger=True)
    peft_model, _ = adapted_model(tiny_checkpoint, lora)
    peft_model.eval()
    merged = merged_state_dict(peft_model.state_dict(), scaling(lora))
    peft_model.get_base_model().save_pretrained(tmp_path / "merged", state_dict=merged)
    peft_model.save_pretrained(tmp_path / "adapter")
    processor = load_processor(tiny_checkpoint, MIN_PIXELS, MAX_PIXELS)
    image = torch.rand(3, 56, 56)
    inputs = processor(
        text=[build_prompt_text(processor, True)], images=[image], return_tensors="pt", do_rescale=False
    )
    plain = load_policy_model(tmp_path / "merged", ModelConfig(), torch.float32, trainable=False)
    over_base = PeftModel.from_pretrained(
        load_policy_model(tiny_checkpoint, ModelConfig(), torch.float32, trainable=False),
        tmp_path / "adapter",
    ).eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        torch.testing.assert_close(plain(**inputs).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(over_base(**inputs).logits, expected, atol=0, rtol=0)
        with peft_model.disable_adapter():
            base = load_policy_model(tiny_checkpoint, ModelConfig(), torch.float32, trainable=False)
            assert torch.equal(peft_model(**inputs).logits, base(**inputs).logits)
        assert not torch.equal(expected, base(**inputs).logits)


def test_with_dropout_the_scored_policy_is_the_merged_model(tiny_checkpoint, tmp_path):
    """LoRA dropout acts in the training forward only: under `eval_mode` (the learner's log-prob passes)
    the adapted model's log-probs are those of the merged model vLLM gets, and repeatable."""
    from PIL import Image

    from learner.policy import PolicySample, eval_mode, sequence_logprobs
    from vlm.factory import load_processor
    from vlm.prompts import build_prompt_text

    lora = LoraConfig(rank=4, alpha=8, dropout=0.5)
    peft_model, _ = adapted_model(tiny_checkpoint, lora)
    merged = merged_state_dict(peft_model.state_dict(), scaling(lora))
    peft_model.get_base_model().save_pretrained(tmp_path / "merged", state_dict=merged)
    plain = load_policy_model(tmp_path / "merged", ModelConfig(), torch.float32, trainable=False)
    processor = load_processor(tiny_checkpoint, MIN_PIXELS, MAX_PIXELS)
    image = Image.new("RGB", (56, 56), (200, 30, 90))
    samples = [PolicySample(image, build_prompt_text(processor, True), [[21, 40, 300, 7], [99, 12]])]
    with torch.no_grad():
        expected, mask = sequence_logprobs(plain, processor, samples, micro_batch_size=2)
        assert peft_model.training
        with eval_mode(peft_model):
            first, _ = sequence_logprobs(peft_model, processor, samples, micro_batch_size=2)
            second, _ = sequence_logprobs(peft_model, processor, samples, micro_batch_size=2)
        assert peft_model.training  # restored
        dropped, _ = sequence_logprobs(peft_model, processor, samples, micro_batch_size=2)
    assert torch.equal(first, second)
    torch.testing.assert_close(first[mask], expected[mask], atol=1e-5, rtol=0)
    assert not torch.allclose(dropped[mask], expected[mask], atol=1e-5)  # dropout is on in train mode


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learner.lora.target_modules=[q_proj,qkv]"], "learner.lora.target_modules"),
        (["learner.lora.target_modules=[]"], "learner.lora.target_modules"),
        (["learner.lora.rank=0"], "learner.lora.rank"),
        (["learner.lora.rank=600", "learner.lora.push=adapter"], r"learner.lora.rank=600 .* at most 512"),
        (["learner.lora.vision_tower=true", "model.freeze_vision=true"], "model.freeze_vision"),
    ],
)
def test_bad_lora_settings_fail_at_load_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cpu-tiny", overrides)


def test_adapter_push_goes_through_the_object_store_and_sizes_vllms_adapter_slots():
    from configs.schema import vllm_max_lora_rank

    # On GPUs `auto` would pick NCCL, whose finish drops vLLM's adapters: refused, naming the way out.
    with pytest.raises(ConfigError, match="cluster.weight_transport=object_store"):
        load_config("gpu-32b-lora", ["learner.lora.push=adapter"])
    config = load_config(
        "gpu-32b-lora", ["learner.lora.push=adapter", "cluster.weight_transport=object_store"]
    )
    assert config.learner.lora.push == "adapter"
    # vLLM's allowed max_lora_rank values: the smallest that holds the rank.
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]


def test_adapter_tensor_names_are_peft_checkpoint_names():
    name = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert (
        adapter_tensor_name(name)
        == "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"
    )
    for wrong in (
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight",
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.other.weight",
        "model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight",
    ):
        with pytest.raises(ValueError, match="is not a weight of peft adapter"):
            adapter_tensor_name(wrong)


def test_lora_is_off_by_default_and_one_override_turns_it_on():
    assert load_config("cpu-tiny").learner.lora is None
    lora = load_config("cpu-tiny", ["learner.lora.rank=8"]).learner.lora
    assert (lora.rank, lora.alpha, lora.push, lora.vision_tower) == (8, 32.0, "merged", False)


# ---------------------------------------------------------------------------------------------------
# Slow: a 2-rank ZeRO-3 LoRA learner group (Ray actors, gloo), and a cpu-tiny LoRA run with vLLM.
# ---------------------------------------------------------------------------------------------------

WORLD_SIZE = 2
TIMEOUT_S = 300
GROUP_LORA = LoraConfig(rank=4, alpha=8, vision_tower=True)


@pytest.fixture
def zero3_lora_group(tiny_checkpoint):
    """Its own Ray session, shut down after its test: the LoRA run below starts one of its own."""
    from configs.runtime_env import apply_default_env

    apply_default_env()
    import ray

    from configs.schema import LearnerConfig, PlacementConfig
    from learner.learner_actor import create_learner_group
    from vlm.factory import load_processor

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    shards = policy_shards(load_processor(tiny_checkpoint, MIN_PIXELS, MAX_PIXELS), WORLD_SIZE)
    learner = LearnerConfig(
        num_workers=WORLD_SIZE,
        lr=2e-2,
        lr_schedule="constant",
        beta=0.04,
        micro_batch_size=2,
        zero_stage=3,
        share_prompt_forward=False,
        lora=GROUP_LORA,
    )
    model = ModelConfig(gradient_checkpointing=True)
    workers = create_learner_group(
        WORLD_SIZE,
        PlacementConfig(num_cpus=0.5),
        model_path=tiny_checkpoint,
        model=model,
        learner=learner,
        train_batch_size=sum(len(s.completions) for samples, _ in shards for s in samples),
        total_steps=10,
        timeout_s=TIMEOUT_S,
    )
    yield workers, shards
    ray.shutdown()


def group_call(workers, method: str, *args) -> list:
    import ray

    return ray.get([getattr(w, method).remote(*args) for w in workers], timeout=TIMEOUT_S)


def group_step(workers, shards, num_iterations: int = 1) -> dict:
    import ray

    sequences = [c for samples, _ in shards for s in samples for c in s.completions]
    metrics = ray.get(
        [
            w.train_step.remote(samples, advantages, num_iterations, len(sequences), sum(map(len, sequences)))
            for w, (samples, advantages) in zip(workers, shards, strict=True)
        ],
        timeout=TIMEOUT_S,
    )
    return metrics[0]


def gathered_module_state(worker_handles) -> dict[str, torch.Tensor]:
    """The full peft-named parameters, gathered under ZeRO-3 (every rank takes part; rank 0's copy)."""
    import ray

    def read(self):
        import deepspeed

        params = list(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {name: p.detach().clone() for name, p in params}

    return ray.get([w.__ray_call__.remote(read) for w in worker_handles], timeout=TIMEOUT_S)[0]


@pytest.mark.slow
def test_zero3_lora_trains_only_the_adapters_and_pushes_the_merged_layers_or_the_adapter(
    zero3_lora_group, tiny_checkpoint, tmp_path
):
    import ray
    from peft import PeftModel
    from safetensors.torch import load_file

    from vlm.weight_sync import iterate_buckets

    workers, shards = zero3_lora_group
    initial = load_file(str(tiny_checkpoint / "model.safetensors"))

    def optimizer_holds_only_adapters(self):
        groups = getattr(self.engine.optimizer, "fp16_groups", None) or self.engine.optimizer.bit16_groups
        held = {id(p) for group in groups for p in group}
        adapters = {id(p) for n, p in self.engine.module.named_parameters() if ".lora_" in n}
        trainable = {id(p) for p in self.engine.module.parameters() if p.requires_grad}
        return held == adapters == trainable

    assert all(ray.get([w.__ray_call__.remote(optimizer_holds_only_adapters) for w in workers]))
    # The adapter disabled is the reference; B = 0 before the first update, so the KL is exactly 0.
    first = group_step(workers, shards)
    assert first["kl"] == 0.0 and first["kl_unweighted"] == 0.0
    second = group_step(workers, shards, num_iterations=2)
    assert second["kl"] > 0  # the second update of the batch sees a policy away from the reference

    state = gathered_module_state(workers)
    names = group_call(workers, "__ray_call__", lambda self: self.checkpoint_names)[0]
    # Base weights bit-identical to the checkpoint after the updates (merges are out of place).
    for name, tensor in state.items():
        if ".lora_" not in name:
            assert torch.equal(tensor, initial[names[hf_name(name)]]), name
    assert any(n.endswith("lora_B.default.weight") and tensor.abs().sum() > 0 for n, tensor in state.items())

    # The push: the merged weights of every adapted layer (and their biases), under checkpoint names.
    refs = group_call(workers, "weight_buckets", 256 << 10)
    pushed = dict(iterate_buckets(ray.get(refs[0])))
    plan = push_plan(list(state))
    assert set(pushed) == {names[item.name] for item in plan}
    assert any(name.startswith("visual.blocks.") for name in pushed)
    assert not any(name.startswith(("lm_head", "model.embed_tokens", "visual.merger")) for name in pushed)
    for name, tensor in pushed_tensors(plan, state, scaling(GROUP_LORA)):
        assert torch.equal(pushed[names[name]], tensor), name
    metadata = group_call(workers, "weight_metadata")[0]
    assert {name: (dtype, shape) for name, dtype, shape in metadata} == {
        n: (t.dtype, tuple(t.shape)) for n, t in pushed.items()
    }

    # Checkpoint: the merged policy loads in transformers; the peft adapter over the base gives its outputs.
    directory = tmp_path / "checkpoint"
    group_call(workers, "save_checkpoint", str(directory))
    saved = load_file(str(directory / "model.safetensors"))
    assert saved.keys() == initial.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, pushed.get(name, initial[name])), name
    adapter_config = json.loads((directory / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)
    merged_model = load_policy_model(directory, ModelConfig(), torch.float32, trainable=False)
    over_base = PeftModel.from_pretrained(
        load_policy_model(tiny_checkpoint, ModelConfig(), torch.float32, trainable=False),
        directory / "adapter",
    ).eval()
    from vlm.factory import load_processor

    processor = load_processor(directory, MIN_PIXELS, MAX_PIXELS)
    sample = shards[0][0][0]
    inputs = processor(text=[sample.prompt], images=[sample.image], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            merged_model(**inputs).logits, over_base(**inputs).logits, atol=1e-5, rtol=0
        )

    # The adapter push (learner.lora.push=adapter builds no push plan): the adapter alone, each tensor
    # gathered whole from its ZeRO-3 partitions in groups of 64 KiB, under peft's adapter-checkpoint names.
    def adapter_push(self, bucket_bytes):
        self.push_plan = None
        return self.serialized_weights(bucket_bytes)

    blobs = group_call(workers, "__ray_call__", adapter_push, 64 << 10)[0]
    assert len(blobs) > 1
    adapter = dict(iterate_buckets(blobs))
    expected = {adapter_tensor_name(n): t for n, t in state.items() if is_adapter_parameter(n)}
    assert adapter.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(adapter[name], tensor), name


LORA_RUN = ("learner.lora.rank=8", "learner.lora.alpha=16", "learner.lr=5e-3", "eval.max_images=4")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_overrides):
    """A 2-step cpu-tiny LoRA run (ZeRO-2, merged push through the object store), a checkpoint after every
    step and the weight-sync check after every push."""
    from cluster.train import run

    tmp_path = tmp_path_factory.mktemp("lora-run")
    overrides = tiny_overrides(
        tmp_path,
        2,
        *LORA_RUN,
        "checkpoint.every=1",
        "train.verify_weight_sync=true",
    )
    config = load_config("cpu-tiny", overrides)
    return tmp_path, overrides, config, run(config)


@pytest.mark.slow
def test_lora_run_keeps_vllm_equal_to_the_learner_and_starts_at_zero_kl(lora_run):
    from cluster.tracking import metric_histories

    _, _, config, result = lora_run
    histories = metric_histories(
        config.tracking.tracking_uri,
        result["mlflow_run_id"],
        ("sync/max_abs_logprob_diff", "learner/kl", "learner/grad_norm"),
    )
    gaps = [m.value for m in histories["sync/max_abs_logprob_diff"]]
    # fp32 on both sides: vLLM's greedy log-probs under the merged push equal the learner's (peft) ones.
    assert len(gaps) == 2 and max(gaps) < 1e-4, gaps
    kl = [m.value for m in sorted(histories["learner/kl"], key=lambda m: m.step)]
    assert kl[0] == 0.0 and kl[-1] > 0, kl  # the adapter disabled is the reference; then it moves
    assert all(m.value > 0 for m in histories["learner/grad_norm"])


@pytest.mark.slow
def test_lora_checkpoint_holds_the_adapter_and_a_merged_policy_vllm_scores_with(lora_run, tmp_path, capsys):
    import argparse

    from safetensors.torch import load_file

    from cluster.checkpoints import latest_valid
    from cluster.score import add_score_parser, run_score
    from vlm.factory import resolve_model_path

    run_tmp, _, config, result = lora_run
    folder, state = latest_valid(run_tmp / "checkpoints")
    assert state["step"] == 2 and str(folder) == result["checkpoint"]
    base = load_file(
        str(resolve_model_path(config.model, config.data.models_cache_dir) / "model.safetensors")
    )
    merged = load_file(str(folder / "model.safetensors"))
    assert merged.keys() == base.keys()
    changed = {name for name in merged if not torch.equal(merged[name], base[name])}
    # Exactly the language model's adapted projection weights moved (biases and the rest are the base's).
    assert changed and all(
        name.startswith("model.layers.") and name.endswith("_proj.weight") for name in changed
    ), changed
    assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["r"] == 8

    image = run_tmp / "image.png"
    from PIL import Image

    Image.new("RGB", (56, 56), (120, 80, 40)).save(image)
    parser = argparse.ArgumentParser(prog="vqr1")
    add_score_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["score", str(image), "--model", str(folder), "-n", "2", "--set", f"train.output_dir={tmp_path}"]
    )
    assert run_score(args) == 0
    assert f"scoring with {folder}" in capsys.readouterr().err


# make test-long: the suite's resume exactness is the driver-kill test's (tests/test_reliability.py).
@pytest.mark.long
def test_lora_resume_trains_the_uninterrupted_runs_images(lora_run, tmp_path, capsys):
    """The run's folders as they were after step 1, resumed: the same images at each step (the trained-
    image log), every step once in MLflow."""
    import mlflow

    from cluster.checkpoints import read_trained_images
    from cluster.train import run

    run_tmp, overrides, _, first = lora_run
    for name in ("out", "checkpoints"):
        shutil.copytree(run_tmp / name, tmp_path / name)
    shutil.copy(run_tmp / "mlflow.db", tmp_path / "mlflow.db")
    shutil.rmtree(tmp_path / "checkpoints" / "step-000002")  # as if the run had stopped after step 1
    moved = [o.replace(str(run_tmp), str(tmp_path)) for o in overrides]
    result = run(load_config("cpu-tiny", [*moved, "checkpoint.resume=true"]))
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-000001'} at step 1" in capsys.readouterr().out
    assert read_trained_images(tmp_path / "out") == read_trained_images(run_tmp / "out")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(result["mlflow_run_id"]).data.tags["vqr1.resumed_from"] == first["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(result["mlflow_run_id"], "reward/total_mean")]
    assert sorted(steps) == [1, 2], steps


ADAPTER_RUN = (
    *LORA_RUN,
    "learner.lora.push=adapter",
    "learner.lora.vision_tower=true",
    "learner.lora.merger=true",
)


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_overrides):
    """A 2-step cpu-tiny LoRA run whose vLLM engine serves the adapter (push=adapter; the vision tower and
    merger adapted too), the weight-sync check after every push and a checkpoint at the end."""
    from cluster.train import run

    tmp_path = tmp_path_factory.mktemp("adapter-run")
    overrides = tiny_overrides(
        tmp_path, 2, *ADAPTER_RUN, "checkpoint.every=2", "train.verify_weight_sync=true"
    )
    config = load_config("cpu-tiny", overrides)
    return config, run(config)


@pytest.mark.slow
def test_adapter_push_keeps_vllm_equal_to_the_learner_and_sends_the_adapter_alone(adapter_run):
    from safetensors.torch import load_file

    from cluster.tracking import metric_histories
    from vlm.weight_sync import serialize_buckets

    config, result = adapter_run
    pushed_mib = "system/rollout-0/weight_push_mib"
    histories = metric_histories(
        config.tracking.tracking_uri,
        result["mlflow_run_id"],
        ("sync/max_abs_logprob_diff", "learner/kl", pushed_mib),
    )
    gaps = [m.value for m in histories["sync/max_abs_logprob_diff"]]
    # fp32 on both sides: vLLM's greedy log-probs with the pushed adapter equal the learner's (peft) ones.
    assert len(gaps) == 2 and max(gaps) < 1e-4, gaps
    kl = [m.value for m in sorted(histories["learner/kl"], key=lambda m: m.step)]
    assert kl[0] == 0.0 and kl[-1] > 0, kl

    # The push is the adapter alone: peft's checkpoint of it, under the same names, is exactly as large.
    adapter = load_file(str(Path(result["checkpoint"]) / "adapter" / "adapter_model.safetensors"))
    assert all(name.endswith((".lora_A.weight", ".lora_B.weight")) for name in adapter)
    assert any(".visual.blocks." in name for name in adapter) and any(
        ".visual.merger." in name for name in adapter
    )
    buckets = serialize_buckets(adapter.items(), config.learner.weight_bucket_bytes)
    adapter_mib = sum(len(bucket) for bucket in buckets) / (1 << 20)
    # Each figure covers the pushes since the worker's previous report: a whole number of adapters.
    pushes = [m.value / adapter_mib for m in histories[pushed_mib]]
    assert pushes and all(round(p) >= 1 and abs(p - round(p)) < 1e-9 for p in pushes), (pushes, adapter_mib)


# make test-long: the engine alone at TP = 2, and a control that the vision tower's LoRA is applied.
@pytest.mark.long
def test_adapter_engine_at_tp2_serves_each_pushed_adapter_vision_part_included(tiny_checkpoint):
    """A TP = 2 engine serving the adapter (vision tower and merger adapted too): after each of two pushes
    its greedy log-probs equal peft's within 1e-4; a push without the vision adapters does not."""
    import numpy as np
    from PIL import Image

    from actor.rollout_engine import RolloutEngine
    from configs.schema import RolloutConfig
    from learner.lora import adapter_tensor_name, is_adapter_parameter
    from learner.policy import PolicySample, sequence_logprobs
    from vlm.weight_sync import serialize_buckets

    lora = LoraConfig(rank=8, alpha=16, vision_tower=True, merger=True, push="adapter")
    model_cfg = ModelConfig(preset="tiny", dtype="float32", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    rollout_cfg = RolloutConfig(
        max_new_tokens=16, enforce_eager=True, kv_cache_gib=0.25, seed=0, tensor_parallel_size=2
    )
    engine = RolloutEngine(tiny_checkpoint, model_cfg, rollout_cfg, lora=lora)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8))

    def gap(policy) -> float:
        """Largest |vLLM - peft| log-prob over vLLM's greedy completion."""
        (rollout,) = engine.generate([image], 1, temperature=0.0)
        completion = rollout.completions[0]
        sample = PolicySample(
            image=image, prompt=engine.prompt_texts[True], completions=[completion.token_ids]
        )
        with torch.no_grad():
            logp, mask = sequence_logprobs(policy.eval(), engine.processor, [sample], 4)
        return max(abs(a - b) for a, b in zip(completion.logprobs, logp[0][mask[0]].tolist(), strict=True))

    try:
        for seed in (1, 2):
            policy, _ = adapted_model(tiny_checkpoint, lora, seed)
            adapter = [
                (adapter_tensor_name(n), p) for n, p in policy.named_parameters() if is_adapter_parameter(n)
            ]
            engine.update_weights(serialize_buckets(adapter))
            assert gap(policy) < 1e-4, seed
        engine.update_weights(serialize_buckets([(n, p) for n, p in adapter if ".visual." not in n]))
        assert gap(policy) > 1e-3
    finally:
        engine.shutdown()
