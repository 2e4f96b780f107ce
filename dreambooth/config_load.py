"""Reading a config: each value checked against its setting's spec (``config.field_specs``), the keys and values of
older configs migrated (``config_migrations``), unknown keys kept; and the concepts a run trains."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .config import CONFIG_FILE, CONFIG_VERSION, Concept, FieldSpec, TrainConfig, field_specs
from .config_migrations import CONCEPT_RENAMED_KEYS, REMOVED_KEYS, RENAMED_KEYS, VALUE_MIGRATIONS
from .errors import ConfigError, UserError

log = logging.getLogger(__name__)


def coerce(name: str, spec: FieldSpec, value: Any) -> Any:
    """Check one value against its spec; return it (ints accepted for floats) or raise ConfigError naming the field."""
    expected = _describe(spec)
    if spec.type is bool:
        ok = isinstance(value, bool)
    elif spec.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif spec.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            value = float(value)
    elif spec.type is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})",
                          "fix the value in db_config.json or the form")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{name}: expected one of {', '.join(spec.choices)}, got {value!r}",
                          "pick one of the listed values")
    if spec.minimum is not None and value < spec.minimum or spec.maximum is not None and value > spec.maximum:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}", "use a value inside the range")
    problem = spec.check(value) if spec.check is not None else None
    if problem:
        raise ConfigError(f"{name}: {problem}", "fix the value in db_config.json or the form")
    return value


def _describe(spec: FieldSpec) -> str:
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(spec.type, "a value")
    if spec.minimum is not None and spec.maximum is not None:
        return f"{kind} from {spec.minimum:g} to {spec.maximum:g}"
    if spec.minimum is not None:
        return f"{kind} >= {spec.minimum:g}"
    return kind


def _migrate_keys(data: dict[str, Any], renamed: dict[str, str], where: str, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        new = renamed.get(key)
        if new is not None and new != key:
            if key in VALUE_MIGRATIONS:
                value = VALUE_MIGRATIONS[key](value)
            if new in data:
                notes.append(f"{where}{key}: dropped in favour of {new}, which is also set")
                continue
            notes.append(f"{where}{key} migrated to {new}")
            out[new] = value
        else:
            out[key] = value
    return out


def concept_from_dict(data: Any, where: str = "concept", notes: list[str] | None = None) -> Concept:
    notes = notes if notes is not None else []
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object with concept settings, got {type(data).__name__}",
                          "each concept is a JSON object like {\"instance_data_dir\": ..., \"instance_prompt\": ...}")
    data = _migrate_keys(data, CONCEPT_RENAMED_KEYS, f"{where}.", notes)
    specs = {s.name: s for s in field_specs(Concept)}
    values = {}
    for key, value in data.items():
        if key not in specs:
            raise ConfigError(f"{where}.{key}: unknown concept setting",
                              f"known settings: {', '.join(sorted(specs))}")
        values[key] = coerce(f"{where}.{key}", specs[key], value)
    return Concept(**values)


def config_from_dict(data: Any) -> tuple[TrainConfig, list[str]]:
    """Validate and migrate a config dict. Returns the config and notes on what was migrated or kept unknown."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a JSON object, got {type(data).__name__}",
                          "db_config.json must hold one JSON object")
    notes: list[str] = []
    version = data.get("config_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(f"config_version: expected an integer, got {version!r}", "set it to 1")
    if version > CONFIG_VERSION:
        raise ConfigError(f"config_version {version} was written by a newer version of this extension "
                          f"(this one reads up to {CONFIG_VERSION})", "update the extension")
    data = _migrate_keys(dict(data), RENAMED_KEYS, "", notes)
    for key in REMOVED_KEYS.keys() & data.keys():
        notes.append(f"{key}: {REMOVED_KEYS[key]}; ignored")
        del data[key]
    data["config_version"] = CONFIG_VERSION
    specs = {s.name: s for s in field_specs(TrainConfig)}
    values: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for key, value in data.items():
        if key == "concepts":
            if not isinstance(value, list):
                raise ConfigError(f"concepts: expected a list of concepts, got {type(value).__name__}",
                                  "write concepts as a JSON list")
            values["concepts"] = [concept_from_dict(c, f"concepts[{i}]", notes) for i, c in enumerate(value)]
        elif key in specs:
            values[key] = coerce(key, specs[key], value)
        else:
            unknown[key] = value
    if unknown:
        notes.append(f"kept unknown settings (not used, written back on save): {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**values, unknown=unknown)
    if cfg.method_defaults != cfg.method:  # the method was changed (or the config predates per-method defaults)
        from .train.methods import apply_method_defaults  # lazy: the method classes import torch

        notes += apply_method_defaults(cfg)
    for note in notes:
        log.warning("%s", note)
    return cfg, notes


def _read_json(path: Path, what: str, missing_hint: str, broken_hint: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what}{path} does not exist", missing_hint)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{what}{path} is not valid JSON: {err}", broken_hint) from None


def load_config(model_dir: str | Path) -> TrainConfig:
    data = _read_json(Path(model_dir) / CONFIG_FILE, "", "create the model first, or pick another model dir",
                      "fix the file or restore it from backups/")
    return config_from_dict(data)[0]


def save_progress(model_dir: str | Path, revision: int, epochs_trained: int) -> None:
    """Record training progress in ``db_config.json`` without touching the user's settings."""
    cfg = load_config(model_dir)
    cfg.revision, cfg.epochs_trained = revision, epochs_trained
    cfg.save(model_dir)


def load_concepts_file(path: str | Path) -> list[Concept]:
    """A concepts-list JSON file: a list of concept objects (the old extension's format is migrated)."""
    path = Path(path)
    data = _read_json(path, "concepts list file ", "fix the path or clear the field", "fix the file")
    if not isinstance(data, list):
        raise ConfigError(f"concepts list file {path}: expected a JSON list of concepts, got {type(data).__name__}",
                          "wrap the concepts in [ ... ]")
    try:
        return [concept_from_dict(c, f"{path.name}[{i}]") for i, c in enumerate(data)]
    except ConfigError as err:
        raise ConfigError(err.message, f"fix the value in {path}") from None


def resolve_concepts(cfg: TrainConfig) -> list[Concept]:
    """The concepts a run trains: the concepts list file's when one is set, else the config's own."""
    concepts = load_concepts_file(cfg.concepts_list_file) if cfg.concepts_list_file else cfg.concepts
    if not concepts:
        raise UserError("no concepts to train", "add a concept with an instance images folder and prompt")
    return concepts
