"""`vqr1 score` on a folder with a good image, a corrupt image and a non-image, plus a missing file."""

from __future__ import annotations

import argparse
import csv
import io

import numpy as np
import pytest
from PIL import Image

from configs.runtime_env import apply_default_env

apply_default_env()

from actor.rollout_engine import Completion  # noqa: E402
from cluster.score import add_score_parser, collect_files, run_score, summarise  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vqr1")
    add_score_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def completion(text: str, score: float | None) -> Completion:
    return Completion(token_ids=[1], text=text, logprobs=[-0.1], score=score, parse_ok=score is not None)


def test_summarise_mean_spread_and_reasoning():
    result = summarise(
        "a.png",
        [
            completion("no number here", None),
            completion("<think> sharp and clear </think> <answer>4.00</answer>", 4.0),
            completion("<think>soft</think><answer>3.00</answer>", 3.0),
        ],
    )
    assert result.mean_score == pytest.approx(3.5)
    assert result.spread == pytest.approx(np.std([4.0, 3.0], ddof=1))
    assert (result.num_samples, result.num_parsed) == (3, 2)
    assert result.reasoning == "sharp and clear"
    unparsed = summarise("b.png", [completion("nothing", None)])
    assert unparsed.mean_score is None and unparsed.spread is None and unparsed.reasoning == "nothing"


def test_collect_files_skips_hidden_and_keeps_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / ".hidden").write_bytes(b"x")
    missing = tmp_path / "missing.png"
    assert collect_files([str(tmp_path), str(missing)]) == [
        tmp_path / "a.png",
        tmp_path / "sub" / "b.png",
        missing,
    ]


@pytest.mark.slow
def test_score_folder_reports_bad_files_and_scores_the_rest(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)).save(folder / "good.png")
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    (folder / "corrupt.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "notes.txt").write_text("not an image\n")
    missing = tmp_path / "missing.png"
    out_csv = tmp_path / "scores.csv"

    args = parse(
        [
            "score",
            str(folder),
            str(missing),
            "--preset",
            "tiny",
            "--set",
            f"data.cache_dir={tmp_path}",
            "--set",
            f"train.output_dir={tmp_path / 'out'}",  # score.log
            "-n",
            "8",
            "--csv",
            str(out_csv),
        ]
    )
    assert args.handler is run_score
    assert run_score(args) == 1

    printed = capsys.readouterr()
    output = printed.out + printed.err
    for name in ("corrupt.jpg", "notes.txt", "missing.png"):
        assert f"bad file: {folder / name if name != 'missing.png' else missing}" in output
    assert "1 images scored, 3 bad files" in output

    rows = {row["path"]: row for row in csv.DictReader(out_csv.open())}
    assert set(rows) == {str(folder / n) for n in ("good.png", "corrupt.jpg", "notes.txt")} | {str(missing)}
    good = rows[str(folder / "good.png")]
    assert good["error"] == "" and good["num_samples"] == "8"
    # Random weights emit digits often enough that a seeded 8 x 48-token run parses some scores.
    assert int(good["num_parsed"]) > 0 and good["mean_score"] != ""
    assert f"{folder / 'good.png'}: score " in output
    # A random model's mean may leave the 1-5 scale: then it is marked, never printed as if valid.
    in_range = 1.0 <= float(good["mean_score"]) <= 5.0
    assert ("OUT OF RANGE" in output) == (not in_range)
    assert "scoring with" in output and "tiny" in output
    for name in ("corrupt.jpg", "notes.txt"):
        assert rows[str(folder / name)]["error"] and rows[str(folder / name)]["num_samples"] == "0"
    assert "missing" in rows[str(missing)]["error"]


def test_without_model_it_scores_with_the_runs_newest_checkpoint_or_says_it_is_untrained(tmp_path):
    from cluster import checkpoints
    from cluster.score import scoring_model
    from configs.load import load_config

    config = load_config("cpu-default", [f"checkpoint.dir={tmp_path / 'checkpoints'}"])
    args = parse(["score", "x.png"])
    path, which = scoring_model(config, args)
    assert path.name == "vqr1-small-whole" and "UNTRAINED" in which and "make train" in which
    for step in (10, 20):
        staging = checkpoints.staging_dir(tmp_path / "checkpoints", step)
        staging.mkdir(parents=True)
        (staging / "config.json").write_text("{}")
        checkpoints.commit(tmp_path / "checkpoints", step, {"step": step}, keep_last=3)
    path, which = scoring_model(config, args)
    assert path == tmp_path / "checkpoints" / "step-000020" and "step 20" in which
