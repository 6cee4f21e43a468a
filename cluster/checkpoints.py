"""Run checkpoints: written to a temporary folder, renamed when complete, with a manifest of checksums.

Layout of `<checkpoint.dir>/step-000020/`: the policy in Hugging Face format at the top level (the folder
loads as it is in transformers and vLLM), `deepspeed/` (optimizer and scheduler state of every rank),
`state.json` (step, data position, MLflow run id), `rollouts_in_flight.json` (the batches generated
ahead of the step under train.max_staleness >= 1, with their completions) and `manifest.json` (size and sha256 of every file). At resume the
newest checkpoint whose files all match the manifest wins; a damaged one is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from iqa.folders import replace_folder

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
STATE = "state.json"
IN_FLIGHT = "rollouts_in_flight.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def staging_dir(root: Path, step: int) -> Path:
    return root / f".tmp-step-{step:06d}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(entries, indent=1))


def verify(folder: Path) -> str | None:
    """None when every file matches the manifest, else the reason it does not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete checkpoint)"
    try:
        entries = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        return f"unreadable manifest: {exc}"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            return f"checksum mismatch in {name}"
    return None


def commit(root: Path, step: int, state: dict, keep_last: int, in_flight: list[dict] = ()) -> Path:
    """Finish a checkpoint the learners wrote into staging_dir(root, step): state, the batches in flight
    (`read_in_flight`), manifest, rename, prune."""
    staging = staging_dir(root, step)
    (staging / STATE).write_text(json.dumps(state, indent=1))
    (staging / IN_FLIGHT).write_text(json.dumps(list(in_flight)))
    write_manifest(staging)
    final = replace_folder(staging, step_dir(root, step))
    for old in sorted(root.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_in_flight(folder: Path) -> list[dict]:
    """The batches generated ahead of the checkpoint's step, oldest first ([] in a checkpoint from before
    asynchronous rollouts)."""
    path = folder / IN_FLIGHT
    return json.loads(path.read_text()) if path.is_file() else []


def set_aside_earlier_run(root: Path) -> Path | None:
    """Move an earlier run's checkpoints out of the way of a fresh run in the same folder, into
    <root>/previous-run (replacing the one set aside before), and return that folder; None if none.

    Left in place they would mix with the new run's: a resume would pick the newest step of either run,
    and pruning (keep_last) would delete the new run's lower-numbered checkpoints first.
    """
    earlier = sorted(root.glob("step-*")) + sorted(root.glob(".tmp-step-*"))
    if not earlier:
        return None
    previous = root / "previous-run"
    if previous.exists():
        shutil.rmtree(previous)
    previous.mkdir()
    for folder in earlier:
        folder.rename(previous / folder.name)
    return previous


def latest_valid(root: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that passes verification, with its state; damaged ones are logged."""
    for folder in sorted(root.glob("step-*"), reverse=True):
        problem = verify(folder)
        if problem is None:
            return folder, json.loads((folder / STATE).read_text())
        log.warning("skipping checkpoint %s: %s", folder, problem)
    return None


# The trained-images log: which images each step trained on, for exact resume (and its tests).


def trained_images_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "trained_images.jsonl"


def log_trained_images(output_dir: str | Path, step: int, ids: list[str], weight_versions: list[int]) -> None:
    """Append the step's image ids and, per image, the weight version its completions were sampled with
    to <output_dir>/trained_images.jsonl (resume exactness and staleness are checked on it)."""
    path = trained_images_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"step": step, "image_ids": ids, "weight_versions": weight_versions}
    with path.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def forget_trained_images_after(output_dir: str | Path, step: int) -> None:
    """Drop the log lines of steps after `step`: a run killed after its last checkpoint trained them, but
    those updates were lost with it, and the resumed run trains those images again."""
    path = trained_images_path(output_dir)
    if path.is_file():
        kept = [entry for entry in read_trained_images(output_dir) if entry["step"] <= step]
        path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))


def read_trained_images(output_dir: str | Path) -> list[dict]:
    """The log of log_trained_images: one {"step", "image_ids", "weight_versions"} per trained step, in order."""
    lines = trained_images_path(output_dir).read_text().splitlines()
    return [json.loads(line) for line in lines]
