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
import sys

from configs.runtime_env import apply_default_env


def build_parser() -> argparse.ArgumentParser:
    from cluster.evaluation import add_eval_parser
    from cluster.proof import add_proof_parser
    from cluster.score import add_score_parser
    from cluster.train import add_train_parser
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
