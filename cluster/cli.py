"""`vqr1`: the one command line. Each subcommand's parser lives beside its code; heavy modules are
imported only by the subcommand that runs.

    vqr1 train --config PRESET [key=value ...]     GRPO training (make train)
    vqr1 eval --config PRESET [key=value ...]      held-out evaluation of a checkpoint (make eval)
    vqr1 score PATH... [--model DIR]               scores for image files or folders
    vqr1 data check --format FORMAT PATH           validate a dataset, every row and image
    vqr1 proof --config proof --seeds 0 1 2        the learning proof (make proof, proof-all, ablation)
    vqr1 base-model [--out DIR]                    build the shipped base model (make base-model)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from configs.runtime_env import apply_default_env


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="GRPO training of a preset")
    parser.add_argument("--config", default="cpu-default", help="a preset name in configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. learner.lr=1e-6")
    parser.set_defaults(handler=run_train)


def run_train(args) -> int:
    from cluster.train import run
    from configs.load import ConfigError, load_config
    from iqa.report import BadInputError

    try:
        config = load_config(args.config, args.overrides)
        result = run(config)
    except (ConfigError, BadInputError) as exc:  # the message names the key, or the file, row and reason
        print(exc, file=sys.stderr)
        return 2
    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cluster.evaluation import add_eval_parser
    from cluster.proof import add_proof_parser
    from cluster.score import add_score_parser
    from iqa.data_check import add_data_parser
    from models.base_model import add_base_model_parser

    parser = argparse.ArgumentParser(
        prog="vqr1",
        description="VisualQuality-R1: reasoning image-quality assessment trained by RL to rank",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    add_score_parser(subparsers)
    add_data_parser(subparsers)
    add_proof_parser(subparsers)
    add_base_model_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_default_env()
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
