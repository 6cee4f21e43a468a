"""Folders that appear whole or not at all: built in a temporary sibling and renamed into place, so a
crash or a concurrent build never leaves a half-written dataset cache, model or checkpoint behind."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def replace_folder(staging: Path, final: Path) -> Path:
    """Move the complete folder `staging` to `final`, replacing whatever was there."""
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


def build_folder(final: Path, write: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> Path:
    """`final`, unless `is_complete(final)` already: then `write(staging)` fills a temporary sibling that
    replaces it. A build another process finished meanwhile is kept (it is the same build)."""
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-building-", dir=final.parent))
    try:
        write(staging)
        if not is_complete(final):
            try:
                replace_folder(staging, final)
            except OSError:
                if not is_complete(final):
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
