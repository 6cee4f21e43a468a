"""`vqr1 score PATH...`: quality scores for image files or folders with a checkpoint, through vLLM.

The model: --model, else the newest checkpoint of the preset's run, else its (untrained) start model,
said on the first line. Decoding (samples, temperature, thinking, seed), image bounds and the score
range come from the preset.

For each image: the mean of the parsed scores of its n samples, their spread (sample standard
deviation) and one reasoning (the <think> text of the first parsed sample). Files that cannot be
read as images (missing, corrupt, not an image) are reported by name; the others are still scored
and the exit status is 1 if any file was bad. A mean outside the score range is marked OUT OF RANGE.
The engine's and the libraries' output goes to <train.output_dir>/score.log, not the console.
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
    parser = subparsers.add_parser(
        "score",
        help="score image files or folders with a checkpoint",
        description="Decoding, image bounds and seeds come from the preset (`eval` section); without "
        "--model, the newest checkpoint of the preset's run (checkpoint.dir), else its start model.",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)"
    )
    parser.add_argument("--config", default="cpu-default", help="a preset name in configs/ or a YAML path")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="local Hugging Face checkpoint folder (Qwen2.5-VL / Qwen2-VL)")
    model.add_argument("--preset", help="a locally built random-weight model (vlm.factory.PRESETS)")
    parser.add_argument("-n", "--num-samples", type=int, help="samples per image (default: eval.num_samples)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per vLLM call")
    parser.add_argument("--csv", type=Path, help="also write the results to this CSV file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override, e.g. --set eval.temperature=0.5 (repeatable)",
    )
    parser.set_defaults(handler=run_score)


def scoring_model(config, args) -> tuple[Path, str]:
    """The checkpoint to score with and a line saying which and why."""
    from cluster import checkpoints
    from vlm.factory import resolve_model_path

    if args.model or args.preset:
        return resolve_model_path(config.model, config.data.models_cache_dir), "as asked"
    newest = checkpoints.latest_valid(Path(config.checkpoint.dir))
    if newest is not None:
        return newest[0], f"the newest checkpoint of the {args.config} run (step {newest[1]['step']})"
    path = resolve_model_path(config.model, config.data.models_cache_dir)
    return path, (
        f"the UNTRAINED start model: {config.checkpoint.dir} holds no checkpoint "
        f"(train one with `make train` or `vqr1 train --config {args.config}`)"
    )


def collect_files(paths: list[str]) -> list[Path]:
    """Files named directly, plus every non-hidden file (and broken link, to be reported) under named
    folders (sorted); missing paths kept."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(
                p
                for p in sorted(path.rglob("*"))
                if (p.is_file() or p.is_symlink())
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
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


def format_line(result: ImageScore, low: float = 1.0, high: float = 5.0) -> str:
    if result.error:
        return f"{result.path}: ERROR {result.error}"
    if result.mean_score is None:
        return f"{result.path}: no parsable score in {result.num_samples} samples | {result.reasoning}"
    flag = "" if low <= result.mean_score <= high else f" OUT OF RANGE [{low:g}, {high:g}]"
    return (
        f"{result.path}: score {result.mean_score:.2f}{flag} +/- {result.spread:.2f} "
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
    from configs.runtime_env import apply_default_env, output_to_log, route_logs

    apply_default_env()
    from configs.load import ConfigError, load_config
    from iqa.images import ImageLoadError, load_image

    overrides = list(args.overrides)
    if args.model:
        overrides += [f"model.path={args.model}", "model.preset=null"]
    elif args.preset:
        overrides += ["model.path=null", f"model.preset={args.preset}"]
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    num_samples = args.num_samples or config.eval.num_samples
    if num_samples < 1 or args.batch_size < 1:
        print("error: --num-samples and --batch-size must be >= 1", file=sys.stderr)
        return 2
    files = collect_files(args.paths)
    if not files:
        print(f"error: no files found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    # vLLM's start-up lines and the libraries' warnings go to this log; the console keeps the scores.
    log_file = Path(config.train.output_dir) / "score.log"
    route_logs(log_file)
    from actor.rollout_engine import RolloutEngine

    with output_to_log(log_file):
        model_path, which = scoring_model(config, args)
    print(f"scoring with {model_path}: {which}", file=sys.stderr)
    with output_to_log(log_file):
        engine = RolloutEngine(model_path, config.model, config.rollout)
    low, high = config.reward.score_range

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
                    tqdm.write(format_line(results[-1], low, high))
            with output_to_log(log_file):
                rollouts = engine.generate(
                    [image for _, image in loaded],
                    num_samples,
                    temperature=config.eval.temperature,
                    thinking=config.eval.thinking,
                    seed=config.eval.seed + start * num_samples,
                )
            for (path, _), rollout in zip(loaded, rollouts, strict=True):
                results.append(summarise(str(path), rollout.completions))
                tqdm.write(format_line(results[-1], low, high))
            progress.update(len(batch))
    with output_to_log(log_file):
        engine.shutdown()

    if args.csv:
        write_csv(args.csv, results)
    bad = [r for r in results if r.error]
    out_of_range = [r for r in results if r.mean_score is not None and not low <= r.mean_score <= high]
    print(f"{len(results) - len(bad)} images scored, {len(bad)} bad files", file=sys.stderr)
    if out_of_range:
        print(
            f"{len(out_of_range)} mean scores outside [{low:g}, {high:g}] (marked OUT OF RANGE): the model "
            "does not keep to the scale",
            file=sys.stderr,
        )
    for r in bad:
        print(f"bad file: {r.path}: {r.error}", file=sys.stderr)
    print(f"library log: {log_file}", file=sys.stderr)
    return 1 if bad else 0
