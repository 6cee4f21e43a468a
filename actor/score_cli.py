"""`vqr1 score PATH...`: quality scores for image files or folders with a checkpoint, through vLLM.

For each image: the mean of the parsed scores of its n samples, their spread (sample standard
deviation) and one reasoning (the <think> text of the first parsed sample). Files that cannot be
read as images (missing, corrupt, not an image) are reported by name; the others are still scored
and the exit status is 1 if any file was bad.
"""

from __future__ import annotations

import csv
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
REASONING_CHARS = 300
CSV_COLUMNS = ("path", "mean_score", "spread", "num_samples", "num_parsed", "reasoning", "error")


@dataclass(frozen=True)
class ImageScore:
    path: str
    mean_score: float | None = None
    spread: float | None = None
    num_samples: int = 0
    num_parsed: int = 0
    reasoning: str = ""
    error: str = ""


def add_score_parser(subparsers) -> None:
    parser = subparsers.add_parser("score", help="score image files or folders with a checkpoint")
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)"
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="local Hugging Face checkpoint folder (Qwen2.5-VL / Qwen2-VL)")
    model.add_argument(
        "--preset",
        choices=("tiny", "small", "bench"),
        default="tiny",
        help="locally built random-weight model",
    )
    parser.add_argument(
        "--cache-dir", default=".cache/vqr1/models", help="where preset checkpoints are built"
    )
    parser.add_argument("-n", "--num-samples", type=int, default=4, help="samples per image")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--no-think", action="store_true", help="the non-thinking prompt (answer only)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--min-pixels", type=int, default=3136)
    parser.add_argument("--max-pixels", type=int, default=12544)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="default: bfloat16 on CUDA, float32 on the CPU",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per vLLM call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", type=Path, help="also write the results to this CSV file")
    parser.set_defaults(handler=run_score)


def collect_files(paths: list[str]) -> list[Path]:
    """Files named directly, plus every non-hidden file under named folders (sorted); missing paths kept."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            files.append(path)
    return files


def summarise(path: str, completions) -> ImageScore:
    """Mean, spread and one reasoning from an image's completions (actor.rollout_engine.Completion)."""
    parsed = [c for c in completions if c.parse_ok]
    scores = [c.score for c in parsed]
    first = parsed[0] if parsed else completions[0]
    think = THINK_RE.search(first.text)
    reasoning = " ".join((think.group(1) if think else first.text).split())[:REASONING_CHARS]
    return ImageScore(
        path=path,
        mean_score=statistics.fmean(scores) if scores else None,
        spread=statistics.stdev(scores) if len(scores) >= 2 else (0.0 if scores else None),
        num_samples=len(completions),
        num_parsed=len(parsed),
        reasoning=reasoning,
    )


def format_line(result: ImageScore) -> str:
    if result.error:
        return f"{result.path}: ERROR {result.error}"
    if result.mean_score is None:
        return f"{result.path}: no parsable score in {result.num_samples} samples | {result.reasoning}"
    return (
        f"{result.path}: score {result.mean_score:.2f} +/- {result.spread:.2f} "
        f"({result.num_parsed}/{result.num_samples} parsed) | {result.reasoning}"
    )


def write_csv(path: Path, results: list[ImageScore]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            writer.writerow(
                [
                    r.path,
                    "" if r.mean_score is None else f"{r.mean_score:.4f}",
                    "" if r.spread is None else f"{r.spread:.4f}",
                    r.num_samples,
                    r.num_parsed,
                    r.reasoning,
                    r.error,
                ]
            )


def run_score(args) -> int:
    from cluster.runtime_env import apply_default_env

    apply_default_env()
    import torch

    from actor.rollout_engine import RolloutEngine
    from configs.schema import ModelConfig, RolloutConfig
    from iqa.images import ImageLoadError, load_image
    from learner.model_factory import resolve_model_path

    if args.num_samples < 1 or args.batch_size < 1:
        print("error: --num-samples and --batch-size must be >= 1", file=sys.stderr)
        return 2
    files = collect_files(args.paths)
    if not files:
        print(f"error: no files found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    model_cfg = ModelConfig(
        path=args.model,
        preset=None if args.model else args.preset,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        dtype=dtype,
    )
    rollout_cfg = RolloutConfig(
        num_generations=args.num_samples,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        thinking=not args.no_think,
        seed=args.seed,
        # Eager start-up is ~40 s faster on the CPU; compiling pays off only for long runs.
        enforce_eager=not torch.cuda.is_available(),
    )
    engine = RolloutEngine(resolve_model_path(model_cfg, args.cache_dir), model_cfg, rollout_cfg)

    results: list[ImageScore] = []
    with tqdm(total=len(files), desc="scoring", unit="image", file=sys.stderr) as progress:
        for start in range(0, len(files), args.batch_size):
            batch = files[start : start + args.batch_size]
            loaded = []
            for path in batch:
                try:
                    loaded.append((path, load_image(path)))
                except ImageLoadError as exc:
                    results.append(ImageScore(path=str(path), error=exc.reason))
                    tqdm.write(format_line(results[-1]))
            rollouts = engine.generate(
                [image for _, image in loaded], args.num_samples, seed=args.seed + start * args.num_samples
            )
            for (path, _), rollout in zip(loaded, rollouts, strict=True):
                results.append(summarise(str(path), rollout.completions))
                tqdm.write(format_line(results[-1]))
            progress.update(len(batch))
    engine.shutdown()

    if args.csv:
        write_csv(args.csv, results)
    bad = [r for r in results if r.error]
    print(f"{len(results) - len(bad)} images scored, {len(bad)} bad files", file=sys.stderr)
    for r in bad:
        print(f"bad file: {r.path}: {r.error}", file=sys.stderr)
    return 1 if bad else 0
