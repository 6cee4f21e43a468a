"""RolloutEngine on the real CPU vLLM with the tiny checkpoint, checked against transformers.

One in-process engine is shared by the whole module; the weight-push tests run last because they
change its weights.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from configs.runtime_env import apply_default_env

apply_default_env()

from actor.rollout_engine import (  # noqa: E402
    CPU_SLEEP_WARNING,
    DIGIT_TOP_K,
    LAYER_NOT_LOADED,
    THREAD_BINDING_WARNING,
    VISION_PREFIXES,
    VISION_SPECIAL_TOKENS,
    WEIGHTS_NOT_LOADED,
    RolloutEngine,
    quiet_expected_vllm_warnings,
)
from configs.schema import ModelConfig, RolloutConfig  # noqa: E402
from configs.sleep import WEIGHT_GROUPS  # noqa: E402
from learner.grpo import token_logprobs  # noqa: E402
from rewards.parsing import extract_score, score_digit_offset  # noqa: E402
from vlm.factory import build_checkpoint  # noqa: E402
from vlm.weight_sync import serialize_buckets  # noqa: E402

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 24


def noise_image(seed: int, height: int = 84, width: int = 112) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint("tiny", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def engine(checkpoint):
    rollout_cfg = RolloutConfig(max_new_tokens=MAX_NEW_TOKENS, enforce_eager=True, kv_cache_gib=0.25, seed=0)
    engine = RolloutEngine(checkpoint, ModelConfig(preset="tiny", dtype="float32"), rollout_cfg)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def vision_token_ids(engine: RolloutEngine) -> list[int]:
    return [engine.processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]


def hf_inputs(engine: RolloutEngine, image: Image.Image, thinking: bool = True):
    return engine.processor(text=[engine.prompt_texts[thinking]], images=[image], return_tensors="pt")


def hf_greedy(engine: RolloutEngine, model, image: Image.Image) -> list[int]:
    """transformers' greedy decode under the engine's rules: vision tokens suppressed, stop at <|im_end|>."""
    inputs = hf_inputs(engine, image)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            suppress_tokens=vision_token_ids(engine),
            eos_token_id=engine.stop_token_ids,
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def hf_logits(engine: RolloutEngine, model, image: Image.Image, completion: list[int]) -> torch.Tensor:
    """transformers' logits (1, prompt + completion, vocab) from one forward over prompt + completion."""
    inputs = hf_inputs(engine, image)
    ids = torch.cat([inputs["input_ids"], torch.tensor([completion], dtype=torch.long)], dim=1)
    # mm_token_type_ids marks the image tokens; without it transformers gives them text (1-D) rope positions.
    token_types = torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros(1, len(completion), dtype=torch.long)], dim=1
    )
    with torch.no_grad():
        return model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=token_types,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        ).logits


def hf_completion_logprobs(
    engine: RolloutEngine, model, image: Image.Image, completion: list[int]
) -> torch.Tensor:
    """log p(completion token | prefix) from one transformers forward over prompt + completion."""
    prompt_len = hf_inputs(engine, image)["input_ids"].shape[1]
    logits = hf_logits(engine, model, image, completion)
    return token_logprobs(logits[:, prompt_len - 1 : -1], torch.tensor([completion]))[0]


def assert_greedy_matches_transformers(engine: RolloutEngine, model, image: Image.Image) -> list[int]:
    completion = engine.generate([image], 1, temperature=0.0)[0].completions[0]
    assert completion.token_ids == hf_greedy(engine, model, image)
    expected = hf_completion_logprobs(engine, model, image, completion.token_ids)
    torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-5, rtol=0)
    return completion.token_ids


def test_prompt_token_ids_equal_the_processors(engine):
    image_pad = engine.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    images = [noise_image(0), noise_image(1, 56, 224)]
    for thinking in (True, False):
        rollouts = engine.generate(images, 1, seed=0, thinking=thinking)
        for image, rollout in zip(images, rollouts, strict=True):
            inputs = hf_inputs(engine, image, thinking)
            assert rollout.prompt_token_ids == inputs["input_ids"][0].tolist()
            # The placeholder was expanded exactly once: one pad per merged 2x2 patch.
            expected_pads = int(inputs["image_grid_thw"][0].prod()) // 4
            assert rollout.prompt_token_ids.count(image_pad) == expected_pads
    assert len(rollouts[0].prompt_token_ids) != len(rollouts[1].prompt_token_ids)


def test_greedy_tokens_and_logprobs_equal_transformers(engine, hf_model):
    for seed in (0, 1):
        tokens = assert_greedy_matches_transformers(engine, hf_model, noise_image(seed))
        assert len(tokens) > 0


def test_encoded_image_bytes_and_paths_give_the_same_rollout(engine, tmp_path):
    image = noise_image(2)
    path = tmp_path / "image.png"
    image.save(path)
    from_pil, from_bytes, from_path = engine.generate([image, path.read_bytes(), path], 1, temperature=0.0)
    assert from_bytes.prompt_token_ids == from_pil.prompt_token_ids == from_path.prompt_token_ids
    assert from_bytes.completions[0].token_ids == from_pil.completions[0].token_ids
    assert from_path.completions[0].token_ids == from_pil.completions[0].token_ids


def test_group_sampling_counts_grouping_and_parse_flags(engine):
    images = [noise_image(10), noise_image(11), noise_image(12, 140, 112)]
    rollouts = engine.generate(images, 8, temperature=1.0, seed=123)
    assert [len(r.completions) for r in rollouts] == [8, 8, 8]
    for image, rollout in zip(images, rollouts, strict=True):
        # Each group belongs to its own image: its prompt carries that image's token count.
        assert rollout.prompt_token_ids == hf_inputs(engine, image)["input_ids"][0].tolist()
        assert len({tuple(c.token_ids) for c in rollout.completions}) > 1
        for completion in rollout.completions:
            assert 0 < len(completion.token_ids) <= MAX_NEW_TOKENS
            assert len(completion.logprobs) == len(completion.token_ids)
            assert all(lp <= 0.0 for lp in completion.logprobs)
            assert completion.score == extract_score(completion.text)
            assert completion.parse_ok == (completion.score is not None)
            assert completion.truncated == (completion.token_ids[-1] not in engine.stop_token_ids)
            assert not set(completion.token_ids[:-1]) & set(engine.stop_token_ids)
    # The same seed reproduces the samples.
    again = engine.generate(images[:1], 8, temperature=1.0, seed=123)
    assert [c.token_ids for c in again[0].completions] == [c.token_ids for c in rollouts[0].completions]


def test_a_call_on_a_stream_apart_leaves_the_engines_stream_alone(engine):
    """An evaluation between two training generations must not change the second one: the in-process
    engine samples from this process's default torch generator, and stream_apart puts it back."""
    images = [noise_image(30), noise_image(31)]
    start = torch.get_rng_state()
    undisturbed = engine.generate(images, 4, temperature=1.0)
    torch.set_rng_state(start)
    side = engine.generate(images, 4, temperature=0.5, stream_apart=11)
    after_side_call = engine.generate(images, 4, temperature=1.0)
    assert tokens(after_side_call) == tokens(undisturbed)
    # The side stream is seeded: the same seed draws the same samples, another seed others.
    assert tokens(engine.generate(images, 4, temperature=0.5, stream_apart=11)) == tokens(side)
    assert tokens(engine.generate(images, 4, temperature=0.5, stream_apart=12)) != tokens(side)
    # Without it, the same side call moves the stream (the test would catch a no-op).
    torch.set_rng_state(start)
    engine.generate(images, 4, temperature=0.5)
    assert tokens(engine.generate(images, 4, temperature=1.0)) != tokens(undisturbed)
    with pytest.raises(ValueError, match="not both"):
        engine.generate(images, 1, seed=0, stream_apart=0)


def tokens(rollouts) -> list:
    return [[c.token_ids for c in rollout.completions] for rollout in rollouts]


def test_digit_probs_are_the_models_distribution_at_the_scores_leading_digit(engine, hf_model):
    images = [noise_image(20), noise_image(21)]
    rollouts = engine.generate(images, 16, temperature=1.0, seed=7, digit_probs=True)
    read = 0
    for image, rollout in zip(images, rollouts, strict=True):
        for completion in rollout.completions:
            offset = score_digit_offset(completion.text) if completion.parse_ok else None
            if completion.digit_probs is None:
                continue
            read += 1
            index = engine._token_starting_at(completion.token_ids, offset, completion.text)
            tokenizer = engine.processor.tokenizer
            assert (
                tokenizer.decode(completion.token_ids[:index], skip_special_tokens=True)
                == completion.text[:offset]
            )
            digit = int(completion.text[offset])
            assert completion.token_ids[index] == engine.digit_token_ids[digit]
            # The sampled digit's probability is the one the engine logged for that token...
            assert completion.digit_probs[digit] == pytest.approx(
                np.exp(completion.logprobs[index]), rel=1e-6
            )
            # ...and every digit in vLLM's top-k has the probability transformers gives it there.
            probs = hf_next_token_probs(engine, hf_model, image, completion.token_ids[:index])
            hf_digits = probs[engine.digit_token_ids].numpy()
            reported = np.array(completion.digit_probs)
            np.testing.assert_allclose(reported[reported > 0], hf_digits[reported > 0], rtol=1e-4, atol=1e-7)
            kth = np.sort(probs.numpy())[-DIGIT_TOP_K]
            assert (hf_digits[reported == 0] <= kth * (1 + 1e-4)).all()  # missing ones were outside the top-k
    assert read >= 3  # the random model writes a lone digit in about a third of its completions


def hf_next_token_probs(engine: RolloutEngine, model, image: Image.Image, prefix: list[int]) -> torch.Tensor:
    """p(next token | prompt + prefix) over the vocabulary, from transformers."""
    return torch.softmax(hf_logits(engine, model, image, prefix)[0, -1].double(), dim=-1)


def test_vision_tokens_are_never_sampled(engine, hf_model):
    banned = set(vision_token_ids(engine))
    # A -inf logit bias on the few vision ids (vLLM's CUDA runner caps allowed_token_ids lists).
    params = engine.sampling_params(16)
    assert params.allowed_token_ids is None
    assert params.logit_bias == dict.fromkeys(sorted(banned), float("-inf"))
    # The random tiny model gives these tokens real probability: greedy transformers picks one here.
    inputs = hf_inputs(engine, noise_image(0))
    with torch.no_grad():
        unrestricted = hf_model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert banned & set(unrestricted[0, inputs["input_ids"].shape[1] :].tolist())
    rollouts = engine.generate([noise_image(s) for s in range(4)], 16, temperature=1.5, seed=7)
    sampled = {t for r in rollouts for c in r.completions for t in c.token_ids}
    assert not banned & sampled


def test_shutting_down_a_weight_transfer_never_opened_keeps_the_engine_serving(engine, hf_model):
    """cluster.system.open_weight_transfer shuts every engine's transfer down before it opens a new
    group; vLLM's call for it is a no-op on an engine with none open (the CPU one has no backend)."""
    engine.shutdown_weight_transfer()
    assert_greedy_matches_transformers(engine, hf_model, noise_image(8))


def test_a_sleeping_engine_forgets_its_prefix_cache_and_generates_only_once_fully_awake(engine, hf_model):
    """Colocated runs (configs/sleep.py). The CPU build has no sleep mode, yet vLLM's engine core pauses
    the scheduler and resets the prefix cache on sleep and resumes it once weights and KV cache are both
    back; the same greedy tokens follow. Every parameter vLLM's model holds falls in exactly one of the
    weight groups that a level-2 sleep is checked against."""
    scheduler, _ = engine._kv_cache_peak
    blocks = scheduler.kv_cache_manager.block_pool.blocks

    def prefix_blocks() -> int:  # KV-cache blocks a later prompt with the same prefix would reuse
        return sum(block.block_hash is not None for block in blocks)

    image = noise_image(9)
    before = assert_greedy_matches_transformers(engine, hf_model, image)
    assert prefix_blocks() > 0
    with vllm_log("vllm.v1.worker.cpu_worker") as records:
        engine.sleep(2)
        try:
            assert prefix_blocks() == 0 and engine.llm.llm_engine.is_sleeping()
            engine.wake_up("weights")
            assert engine.asleep and engine.llm.llm_engine.is_sleeping()  # the KV cache is still away
            with pytest.raises(RuntimeError, match="sleeping rollout engine"):
                engine.generate([image], 1)
        finally:
            engine.wake_up("kv_cache")
    assert not [r for r in records if r.getMessage().startswith(CPU_SLEEP_WARNING)]  # expected, dropped
    assert not engine.asleep and not engine.llm.llm_engine.is_sleeping()
    assert assert_greedy_matches_transformers(engine, hf_model, image) == before

    names = engine.llm.collective_rpc(
        lambda worker: [n for n, _ in worker.model_runner.model.named_parameters()]
    )
    groups = {
        name: [g for g, pattern in WEIGHT_GROUPS.items() if fnmatch.fnmatchcase(name, pattern)]
        for name in names[0]
    }
    assert {name: found for name, found in groups.items() if len(found) != 1} == {}
    assert {found[0] for found in groups.values()} == set(WEIGHT_GROUPS)  # the tiny model's head is untied


def test_weight_push_makes_vllm_follow_the_new_weights(engine, hf_model):
    image = noise_image(3)
    before = assert_greedy_matches_transformers(engine, hf_model, image)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    version = engine.weight_version
    # Learner-side names (model.language_model.*, model.visual.*), several buckets.
    buckets = serialize_buckets(hf_model.named_parameters(), bucket_bytes=256 << 10)
    assert len(buckets) > 3
    assert engine.update_weights(buckets) == version + 1
    after = assert_greedy_matches_transformers(engine, hf_model, image)
    assert after != before


def test_partial_push_of_trainable_weights_keeps_the_others(engine, hf_model):
    # freeze_vision: only the language model is pushed; vision weights in vLLM must stay as they are.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "visual" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    trainable = [(n, p) for n, p in hf_model.named_parameters() if "visual" not in n]
    engine.update_weights(serialize_buckets(trainable))
    for seed in (4, 5):
        assert_greedy_matches_transformers(engine, hf_model, noise_image(seed))


@contextlib.contextmanager
def vllm_log(*names):
    """The messages of the named vLLM loggers that pass their filters (a handler sees only those)."""

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    records = Records()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(records)
    try:
        yield records.records
    finally:
        for logger in loggers:
            logger.removeHandler(records)


def test_the_cpu_workers_thread_binding_warning_stays_out_of_the_log(engine):
    """vLLM's CPU worker warns on every torch.set_num_threads call, which its renderer makes twice per
    multimodal request; the engine filters exactly that line (other warnings of the logger pass)."""
    with vllm_log("vllm.v1.worker.cpu_worker") as records:
        engine.generate([noise_image(5), noise_image(6)], 2, seed=0)
        torch.set_num_threads(torch.get_num_threads())  # vLLM's replacement, called directly
        logging.getLogger("vllm.v1.worker.cpu_worker").warning("another cpu worker warning")
    messages = [r.getMessage() for r in records]
    assert not [m for m in messages if m.startswith(THREAD_BINDING_WARNING)]
    assert "another cpu worker warning" in messages


def test_a_push_without_the_frozen_vision_tower_logs_nothing_but_a_missing_weight_is_named(engine, hf_model):
    """With freeze_vision the pushes leave the vision tower out: vLLM's per-layer "Failed to load
    weights" lines and its list of the vision weights not pushed are dropped. A language-model weight
    left out of a push is still reported by name."""
    loaders = (
        "vllm.model_executor.model_loader.reload.layerwise",
        "vllm.model_executor.model_loader.reload.inplace",
    )
    language = [(n, p) for n, p in hf_model.named_parameters() if "visual" not in n]
    quiet_expected_vllm_warnings(VISION_PREFIXES)
    try:
        with vllm_log(*loaders) as records:
            engine.update_weights(serialize_buckets(language))
        assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []

        final_norm = next(n for n, _ in language if n.endswith("norm.weight") and ".layers." not in n)
        with vllm_log(*loaders) as records:
            engine.update_weights(serialize_buckets([(n, p) for n, p in language if n != final_norm]))
        missing = [r for r in records if r.msg == WEIGHTS_NOT_LOADED]
        assert len(missing) == 1
        names = missing[0].args[0]
        assert any(name.endswith("norm.weight") and not name.startswith(VISION_PREFIXES) for name in names)
        assert not [r for r in records if r.msg == LAYER_NOT_LOADED]
    finally:
        quiet_expected_vllm_warnings()  # the module's engine was built without freeze_vision
