"""`vqr1`: the user's command line. Subcommands import their (heavy) modules only when run."""

from __future__ import annotations

import argparse
import sys

from cluster.runtime_env import apply_default_env


def build_parser() -> argparse.ArgumentParser:
    from actor.score_cli import add_score_parser
    from cluster.evaluate_cli import add_eval_parser
    from iqa.data_check import add_data_parser

    parser = argparse.ArgumentParser(
        prog="vqr1", description="VisualQuality-R1: reasoning image-quality assessment"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_score_parser(subparsers)
    add_eval_parser(subparsers)
    add_data_parser(subparsers)
    train = subparsers.add_parser("train", help="GRPO training (same as python -m cluster.train)")
    train.add_argument("--config", default="cpu-default")
    train.add_argument("overrides", nargs="*", help="section.key=value")
    train.set_defaults(handler=lambda args: __import__("cluster.train").train.main_from_args(args))
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_default_env()
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
