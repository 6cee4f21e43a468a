"""Rollout throughput: RolloutEngine (vLLM) vs transformers `generate`, and weight-push time.

Same checkpoint, same images, same prompt tokens, G samples per image, same sampling (temperature,
top_p, top_k=0 i.e. no truncation, vision tokens suppressed, same stop tokens, same max new tokens).
Both are timed in this run after a warm-up (best of --rounds calls, as the CPU may be shared); the
table gives vLLM's tokens/s as a ratio of HF's. transformers runs first; the vLLM engine then runs in
its own process (the multiprocess engine), so its CPU thread binding does not change the threads
transformers uses, and it is shut down before the next preset.

    python -m bench.rollout [--presets small bench] [--images 4] [--generations 8] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

from configs.runtime_env import apply_default_env


def bench_images(count: int):
    """Photographs shipped inside scikit-image's wheel (no download), 112x112 like the built-in set."""
    from iqa.builtin import REFERENCE_PHOTOS, reference_photo, skimage_data_dir

    folder = skimage_data_dir()
    return [reference_photo(folder / REFERENCE_PHOTOS[i % len(REFERENCE_PHOTOS)], 112) for i in range(count)]


@dataclass(frozen=True)
class SamplingRules:
    """The RolloutEngine's sampling settings, for transformers' generate."""

    temperature: float
    top_p: float
    stop_token_ids: list[int]
    suppressed_token_ids: list[int]

    @classmethod
    def from_processor(cls, processor, rollout_cfg) -> SamplingRules:
        from actor.rollout_engine import STOP_TOKENS, VISION_SPECIAL_TOKENS

        ids = processor.tokenizer.convert_tokens_to_ids
        return cls(
            temperature=rollout_cfg.temperature,
            top_p=rollout_cfg.top_p,
            stop_token_ids=[ids(t) for t in STOP_TOKENS],
            suppressed_token_ids=[ids(t) for t in VISION_SPECIAL_TOKENS],
        )


def hf_generate_tokens(
    model, processor, rules: SamplingRules, images, generations: int, max_new_tokens: int
) -> int:
    """One batched transformers generate under the engine's sampling rules; returns tokens generated."""
    import torch

    from vlm.prompts import build_prompt_text

    processor.tokenizer.padding_side = "left"
    prompt = build_prompt_text(processor, thinking=True)
    inputs = processor(text=[prompt] * len(images), images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=True,
            temperature=rules.temperature,
            top_p=rules.top_p,
            top_k=0,
            num_return_sequences=generations,
            max_new_tokens=max_new_tokens,
            suppress_tokens=rules.suppressed_token_ids,
            eos_token_id=rules.stop_token_ids,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    total = 0
    for tokens in out[:, inputs["input_ids"].shape[1] :].tolist():
        stops = [i for i, t in enumerate(tokens) if t in rules.stop_token_ids]
        total += stops[0] + 1 if stops else len(tokens)
    return total


def best_rate(measure, rounds: int) -> tuple[float, int]:
    """Highest tokens/s over `rounds` timed calls of measure() -> tokens (the CPU is shared: take the best)."""
    best, tokens = 0.0, 0
    for _ in range(rounds):
        started = time.perf_counter()
        tokens = measure()
        best = max(best, tokens / (time.perf_counter() - started))
    return best, tokens


def bench_preset(preset: str, args, images) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from actor.rollout_engine import RolloutEngine
    from configs.schema import ModelConfig, RolloutConfig
    from vlm.factory import build_checkpoint, load_processor
    from vlm.weight_sync import serialize_buckets

    path = build_checkpoint(preset, args.cache_dir)
    model_cfg = ModelConfig(preset=preset, dtype=args.dtype)
    rollout_cfg = RolloutConfig(
        num_generations=args.generations,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=args.max_new_tokens,
        kv_cache_gib=args.kv_cache_gib,
        enforce_eager=args.enforce_eager,
        in_process_engine=False,
        seed=0,
    )
    # transformers first: the engine's process would otherwise compete for the two cores.
    processor = load_processor(path, model_cfg.min_pixels, model_cfg.max_pixels)
    sampling = SamplingRules.from_processor(processor, rollout_cfg)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    num_parameters = sum(p.numel() for p in model.parameters())
    hf_generate_tokens(model, processor, sampling, images[:1], 2, 8)  # warm-up
    hf_tok_s, hf_tokens = best_rate(
        lambda: hf_generate_tokens(model, processor, sampling, images, args.generations, args.max_new_tokens),
        args.rounds,
    )

    started = time.perf_counter()
    engine = RolloutEngine(path, model_cfg, rollout_cfg)
    startup_s = time.perf_counter() - started
    engine.generate(images[:1], 2, seed=0)  # warm-up
    vllm_tok_s, vllm_tokens = best_rate(
        lambda: sum(
            len(c.token_ids) for r in engine.generate(images, args.generations) for c in r.completions
        ),
        args.rounds,
    )

    started = time.perf_counter()
    buckets = serialize_buckets(model.named_parameters())
    serialize_s = time.perf_counter() - started
    started = time.perf_counter()
    engine.update_weights(buckets)
    load_s = time.perf_counter() - started
    push_mb = sum(len(b) for b in buckets) / 1e6

    engine.shutdown()
    return {
        "preset": preset,
        "params_m": num_parameters / 1e6,
        "engine_startup_s": startup_s,
        "vllm_tokens": vllm_tokens,
        "vllm_tok_s": vllm_tok_s,
        "hf_tokens": hf_tokens,
        "hf_tok_s": hf_tok_s,
        "ratio": vllm_tok_s / hf_tok_s,
        "push_mb": push_mb,
        "serialize_s": serialize_s,
        "push_load_s": load_s,
    }


def print_table(rows: list[dict], args) -> None:
    print(
        f"\nrollout: {args.images} images x G={args.generations}, <= {args.max_new_tokens} new tokens, "
        f"temperature 1.0, top_p 1.0, top_k 0, {args.dtype}"
    )
    header = (
        f"{'preset':<7}{'params':>9}{'vLLM tok/s':>12}{'HF tok/s':>10}{'vLLM/HF':>9}"
        f"{'push MB':>9}{'serialize s':>13}{'load s':>8}{'startup s':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['preset']:<7}{r['params_m']:>8.1f}M{r['vllm_tok_s']:>12.0f}{r['hf_tok_s']:>10.0f}"
            f"{r['ratio']:>8.2f}x{r['push_mb']:>9.1f}{r['serialize_s']:>13.3f}{r['push_load_s']:>8.3f}"
            f"{r['engine_startup_s']:>11.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--presets", nargs="+", default=["small", "bench"], choices=["tiny", "small", "bench"]
    )
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="timed calls per side; the best is kept")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both sides")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--enforce-eager", action="store_true", help="skip torch.compile in vLLM")
    parser.add_argument("--cache-dir", default=".cache/vqr1/models")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    apply_default_env()

    from tqdm import tqdm

    images = bench_images(args.images)
    rows = [bench_preset(preset, args, images) for preset in tqdm(args.presets, desc="presets")]
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
