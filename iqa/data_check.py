"""`vqr1 data check --format NAME PATH`: list every bad row of a dataset, exit non-zero if there is any."""

from __future__ import annotations

import argparse
import sys


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    data = subparsers.add_parser("data", help="dataset tools")
    commands = data.add_subparsers(dest="data_command", required=True)
    check = commands.add_parser(
        "check",
        help="validate a dataset: labels and every image",
        description="Read a dataset as training would, decode every image, and list each bad row "
        "(file, row, reason). Exit status 1 when any row is bad, 2 when the dataset cannot be read at all.",
    )
    check.add_argument(
        "--format", required=True, help="dataset format (kadid10k, koniq10k, spaq, livec, ...)"
    )
    check.add_argument("path", nargs="?", help="dataset folder or label file (builtin: its cache folder)")
    check.add_argument("--image-dir", help="image folder, if not the format's usual layout")
    check.add_argument("--name", help="dataset name (default: the format name)")
    check.add_argument("--lower-is-better", action="store_true", help="the raw label is lower-is-better")
    check.set_defaults(handler=run_data_check)
    return check


def run_data_check(args: argparse.Namespace) -> int:
    # Imported here: `vqr1 --help` should not pay for importing `datasets` (cli.main has set the env).
    from configs.schema import DatasetSpec
    from iqa.formats import load_dataset_spec
    from iqa.report import BadInputError

    try:
        spec = DatasetSpec(
            format=args.format,
            path=args.path,
            name=args.name,
            image_dir=args.image_dir,
            higher_is_better=False if args.lower_is_better else None,
        )
        dataset, report = load_dataset_spec(spec, on_bad_input="skip")
    except (BadInputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    if len(dataset):
        mos_raw = dataset["mos_raw"]
        print(
            f"usable: {len(dataset)} images, {len(set(dataset['ref']))} references, "
            f"raw label range [{min(mos_raw):g}, {max(mos_raw):g}]"
        )
    return 1 if report.bad else 0
