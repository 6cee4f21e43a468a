#!/usr/bin/env bash
# A separate venv for the TRL peer benchmark (bench/trl_step.py runs in it as a subprocess).
#
#   bash bench/setup_trl_venv.sh [VENV]        # default .venv-bench in the project root
#
# TRL gets its own venv so that its dependencies never move the project's pins. It uses the same
# CPU torch as the project: `torch==2.13.0+cpu` is not on PyPI; this machine's pip finds the wheel
# through its configured find-links, elsewhere add PyTorch's CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash bench/setup_trl_venv.sh
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${1:-.venv-bench}
PYTHON=${PYTHON:-python3}
PIP=("$VENV/bin/python" -m pip install -q)
# pip's warnings about missing find-links folders on this machine are noise; keep real errors.
quiet() { "$@" 2>&1 | { grep -v -E "is ignored: it is neither a file nor a directory" || true; }; }

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# Keeps the venv out of `git status` even where .gitignore does not name it.
echo '*' >"$VENV/.gitignore"
quiet "${PIP[@]}" --upgrade 'pip>=24'
# torch alone first, so that nothing later can pull a CUDA build in its place.
quiet "${PIP[@]}" 'torch==2.13.0+cpu'
# TRL's stack from the `bench` extra of pyproject.toml; the project's pins of transformers and of what the
# TRL side imports (rewards, configs). torchvision is the CUDA build from PyPI: the hook below fixes it.
mapfile -t BENCH_EXTRA < <("$VENV/bin/python" -c \
    'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"], sep="\n")')
quiet "${PIP[@]}" 'torch==2.13.0+cpu' "${BENCH_EXTRA[@]}" 'transformers==5.19.0' 'torchvision==0.28.0' \
    'tokenizers==0.23.3' 'safetensors==0.8.0' 'datasets==5.2.0' 'numpy==2.3.5' 'scipy==1.17.1' \
    'pillow==13.0.0' 'pydantic==2.14.4' 'pyyaml>=6'
"$VENV/bin/python" -m cluster.cpu_compat install
"$VENV/bin/python" - <<'EOF'
import torch, torchvision, transformers, trl
from transformers import Qwen2VLImageProcessor  # noqa: F401  (needs the torchvision fix)

assert torch.version.cuda is None, f"expected the CPU torch, got CUDA {torch.version.cuda}"
print(f"TRL venv ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
EOF
