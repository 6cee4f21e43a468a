"""Load a `Config` from a YAML preset plus `key.path=value` overrides, failing early and clearly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from configs.schema import Config

PRESETS_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the key."""


def resolve_preset(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a preset in configs/ ("cpu-tiny" -> configs/cpu-tiny.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown config preset {name_or_path!r}; presets: {', '.join(known)}")
    return preset


def parse_override(item: str) -> tuple[list[str], Any]:
    """`learner.lr=1e-6` -> (["learner", "lr"], 1e-06); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    # YAML 1.1 reads 1e-6 as a string; accept the scientific notation users type.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_override(tree: dict, keys: list[str], value: Any, origin: str) -> None:
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(keys[: depth + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def deep_merge(base: dict, top: dict) -> dict:
    """`base` with `top`'s keys laid over it, section by section."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = (
            deep_merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def read_preset(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A preset's tree; a top-level `base: <preset>` starts it from that preset's tree (recursively)."""
    if path in seen:
        raise ConfigError(f"{path}: its `base` chain loops back to itself ({' -> '.join(map(str, seen))})")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    tree = loaded or {}
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must name a preset, got {base!r}")
    return deep_merge(read_preset(resolve_preset(base), (*seen, path)), tree)


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML preset (over its `base` preset, if it names one) <- overrides, validated as one `Config`."""
    tree: dict = {}
    source = "defaults"
    if preset is not None:
        path = resolve_preset(preset)
        source = str(path)
        tree = read_preset(path)
    for item in overrides:
        keys, value = parse_override(item)
        apply_override(tree, keys, value, f"override {item!r}")
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
