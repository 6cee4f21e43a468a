"""Process environment every entry point sets before importing vLLM, Ray, DeepSpeed or transformers.

Nothing is fetched from a hub at run time, servers bind to loopback, and DeepSpeed's JIT builds go
to a folder of their own. Values already in the environment win, so a cluster can override them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_env() -> dict[str, str]:
    prefix = Path(sys.prefix)
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TORCH_EXTENSIONS_DIR": str(prefix / "torch_extensions"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def apply_default_env() -> dict[str, str]:
    """Set the defaults that are not set yet; returns the resulting values (for Ray's runtime_env)."""
    for key, value in default_env().items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in default_env()}
