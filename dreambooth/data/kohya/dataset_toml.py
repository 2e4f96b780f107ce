"""kohya's dataset config TOML (``[general]`` > ``[[datasets]]`` > ``[[datasets.subsets]]``) as concepts and
settings; the rules are in the package docstring."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...config import Concept, TrainConfig
from ...errors import ConfigError, UserError
from .subsets import (
    Subset,
    attach_regs,
    caption_ext,
    guess_extension,
    limits,
    list_subset_images,
    note,
    prompt_template,
    split_class_tokens,
)

log = logging.getLogger(__name__)

BUCKET_STEP = 64

# kohya key -> (kind, our field it lands in, the class of that field): kinds are checked where the key is written
_SUBSET_KEYS: dict[str, tuple[str, str, type]] = {
    "num_repeats": ("int", "repeats", Concept),
    "keep_tokens": ("int", "keep_tokens", TrainConfig),
    "shuffle_caption": ("bool", "shuffle_tags", TrainConfig),
    "flip_aug": ("bool", "hflip", TrainConfig),
    "class_tokens": ("str", "", Concept),
    "caption_extension": ("str", "", Concept),
}
_SUBSET_ONLY_KEYS: dict[str, str] = {"image_dir": "str", "is_reg": "bool"}
_DATASET_KEYS: dict[str, tuple[str, str, type]] = {
    "resolution": ("resolution", "resolution", TrainConfig),
    "enable_bucket": ("bool", "enable_buckets", TrainConfig),
    "batch_size": ("int", "train_batch_size", TrainConfig),
}
# subset keys that make a subset something we cannot import at all
_REFUSED_KEYS: dict[str, tuple[str, str]] = {
    "metadata_file": ("this is a fine-tuning subset: its captions live in kohya's metadata JSON, which this "
                      "trainer does not read", "write the captions as .txt files beside the images and use a "
                      "DreamBooth subset (image_dir, class_tokens)"),
    "conditioning_data_dir": ("this is a ControlNet subset, which this trainer does not train",
                              "remove the subset"),
}
_BUCKETS_REASON = "our buckets come from the max resolution in steps of 64 with aspect ratios up to 2:1"
_SEPARATORS_REASON = "captions are split at commas only"
_UNSUPPORTED_REASONS: dict[str, str] = {
    "color_aug": "there is no colour augmentation here",
    "random_crop": "images are scaled to cover their bucket and centre-cropped",
    "face_crop_aug_range": "there is no face-crop augmentation here",
    "caption_dropout_rate": "there is no caption dropout here",
    "caption_dropout_every_n_epochs": "there is no caption dropout here",
    "caption_tag_dropout_rate": "there is no caption dropout here",
    "token_warmup_min": "there is no token warmup here",
    "token_warmup_step": "there is no token warmup here",
    "caption_prefix": "put the text into the concept's instance prompt before [filewords]",
    "caption_suffix": "put the text into the concept's instance prompt after [filewords]",
    "caption_separator": _SEPARATORS_REASON,
    "keep_tokens_separator": _SEPARATORS_REASON,
    "secondary_separator": _SEPARATORS_REASON,
    "enable_wildcard": "caption wildcards are not expanded here",
    "cache_info": "image sizes are read fresh from the headers on every run",
    "min_bucket_reso": _BUCKETS_REASON,
    "max_bucket_reso": _BUCKETS_REASON,
    "bucket_reso_steps": _BUCKETS_REASON,
    "bucket_no_upscale": _BUCKETS_REASON,
    "network_multiplier": "it applies to LoRA networks only",
    "alpha_mask": "there is no alpha-mask loss here",
    "prior_loss_weight": "it is a command-line setting in kohya; set 'Prior loss weight' here",
}

_KIND_TEXT = {"int": "an integer", "bool": "true or false", "str": "a string",
              "resolution": "an integer or [width, height]"}


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib as toml_reader  # Python 3.11+
    except ModuleNotFoundError:  # the WebUI's Python may be 3.10
        try:
            import tomli as toml_reader  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(f"cannot read {path}: reading TOML needs Python 3.11 or newer, or the tomli package",
                              "install tomli (pip install tomli) into the Python that runs the trainer") from None
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"kohya dataset config {path} does not exist", "check the path") from None
    except OSError as err:
        raise ConfigError(f"cannot read kohya dataset config {path}: {err.strerror or err}",
                          "check that the file is readable") from None
    try:
        return toml_reader.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"kohya dataset config {path} is not UTF-8 text", "save it as UTF-8") from None
    except toml_reader.TOMLDecodeError as err:
        raise ConfigError(f"kohya dataset config {path} is not valid TOML: {err}",
                          "fix the syntax; kohya's docs/config_README shows the format") from None


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    raise AssertionError(kind)


def _wrong(place: str, key: str, kind: str, value: Any, hint: str) -> ConfigError:
    return ConfigError(f"{place}.{key}: expected {_KIND_TEXT[kind]}, got {value!r} ({type(value).__name__})", hint)


def _resolution(place: str, value: Any, hint: str, notes: list[str]) -> int:
    low, high = limits("resolution", TrainConfig)
    low = max(BUCKET_STEP, int(low or 0))
    if _type_ok("int", value):
        sides = [value]
    elif (isinstance(value, list) and len(value) == 2 and all(_type_ok("int", v) for v in value)):
        sides = list(value)
    else:
        raise _wrong(place, "resolution", "resolution", value, hint)
    for side in sides:
        if not low <= side <= (high or side):
            raise ConfigError(f"{place}.resolution: expected sides from {low} to {high:g}, got {value!r}", hint)
    if len(sides) == 1 or sides[0] == sides[1]:
        return int(sides[0])
    width, height = sides
    result = max(BUCKET_STEP, math.isqrt(width * height) // BUCKET_STEP * BUCKET_STEP)
    note(notes, f"{place}.resolution: [{width}, {height}] is trained here at max resolution {result} (about the "
                 f"same pixel area, as a square and in aspect buckets around it), not at exactly {width}x{height}")
    return result


def _check_table(table: Any, level: str, place: str, hint: str, notes: list[str]) -> dict[str, Any]:
    """The supported settings of one TOML table, type- and range-checked where they are written.

    ``level`` is general, dataset or subset. Unsupported and unknown keys are noted; keys that kohya allows only
    at another level, and subsets we cannot import, raise :class:`ConfigError`.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{place}: expected a table of settings, got {type(table).__name__}", hint)
    clean: dict[str, Any] = {}
    for key, value in table.items():
        if key == "subsets" and level == "dataset":
            continue
        if key in _REFUSED_KEYS:
            reason, fix = _REFUSED_KEYS[key]
            raise ConfigError(f"{place}.{key}: {reason}", fix)
        if key in _SUBSET_ONLY_KEYS:
            if level != "subset":
                raise ConfigError(f"{place}.{key}: {key} is a setting of one subset, not of [{level}]",
                                  "move it into a [[datasets.subsets]] table")
            if not _type_ok(_SUBSET_ONLY_KEYS[key], value):
                raise _wrong(place, key, _SUBSET_ONLY_KEYS[key], value, hint)
            clean[key] = value
        elif key in _DATASET_KEYS:
            if level == "subset":
                raise ConfigError(f"{place}.{key}: {key} is a dataset setting, not a subset one",
                                  "move it into the [[datasets]] table or [general]")
            kind, field_name, cls = _DATASET_KEYS[key]
            if kind == "resolution":
                clean[key] = _resolution(place, value, hint, notes)
                continue
            if not _type_ok(kind, value):
                raise _wrong(place, key, kind, value, hint)
            clean[key] = _in_range(place, key, kind, value, field_name, cls, hint)
        elif key in _SUBSET_KEYS:
            kind, field_name, cls = _SUBSET_KEYS[key]
            if not _type_ok(kind, value):
                raise _wrong(place, key, kind, value, hint)
            clean[key] = _in_range(place, key, kind, value, field_name, cls, hint)
        elif key in _UNSUPPORTED_REASONS:
            off = " (it is off, so nothing is lost)" if value is False or value == 0 else ""
            note(notes, f"{place}.{key} = {value!r} is not carried over: {_UNSUPPORTED_REASONS[key]}{off}")
        else:
            note(notes, f"{place}.{key} = {value!r} is not carried over: not a kohya dataset setting this "
                         "importer knows")
    return clean


def _in_range(place: str, key: str, kind: str, value: Any, field_name: str, cls: type, hint: str) -> Any:
    if kind != "int" or not field_name:
        return value
    low, high = limits(field_name, cls)
    if low is not None and value < low or high is not None and value > high:
        raise ConfigError(f"{place}.{key}: expected an integer from {low:g} to {high:g}, got {value!r}", hint)
    return value


def _lookup(key: str, levels: Sequence[tuple[str, dict[str, Any]]]) -> tuple[Any, str]:
    """kohya's fallback: the value of ``key`` in the first level that sets it, and that level's place."""
    for place, clean in levels:
        if key in clean:
            return clean[key], place
    return None, ""


def _resolve_dir(raw: str, base: Path, place: str, notes: list[str]) -> Path:
    path = Path(raw.strip()).expanduser()
    if path.is_absolute():
        return path
    beside = (base / path).absolute()
    if beside.is_dir():
        return beside
    from_cwd = path.absolute()
    if from_cwd.is_dir():
        note(notes, f"{place}.image_dir {raw!r}: not found beside the TOML file, using {from_cwd} (relative to "
                     "the current directory, as kohya would)")
        return from_cwd
    return beside


def _read_subset(levels: list[tuple[str, dict[str, Any]]], place: str, base: Path,
                 notes: list[str], *, reg: bool) -> Subset:
    clean = levels[0][1]
    raw_dir = clean.get("image_dir", "")
    if not raw_dir.strip():
        raise ConfigError(f"{place}.image_dir: missing; every subset needs the folder of its images",
                          f"add image_dir = \"path/to/images\" to {place}")
    folder = _resolve_dir(raw_dir, base, place, notes)
    try:
        images = list_subset_images(folder, "class images" if reg else "instance images")
    except UserError as err:
        raise ConfigError(f"{place}.image_dir: {err.message}", err.hint) from None
    tokens, _ = _lookup("class_tokens", levels)
    tokens = " ".join((tokens or "").split())
    ext, ext_place = _lookup("caption_extension", levels)
    ext_label = f"{ext_place}.caption_extension"
    if ext is None:
        ext, source = guess_extension(images, place, notes)
        ext_label = f"{place}.caption_extension (not set; {ext} is {source})"
    template = prompt_template(images, tokens, caption_ext(ext), ext_label, folder, place, notes, reg=reg)
    repeats, _ = _lookup("num_repeats", levels)
    return Subset(place, folder, images, tokens, template, 1 if repeats is None else repeats)


_KOHYA_NAMES = {"enable_buckets": "enable_bucket", "train_batch_size": "batch_size", "shuffle_tags": "shuffle_caption",
                "hflip": "flip_aug"}


def _merge_setting(name: str, values: list[tuple[str, Any]], settings: dict[str, object], notes: list[str]) -> None:
    """One value for a setting kohya has per subset or dataset; differences are noted, the first set value wins."""
    chosen = next((value for _, value in values if value is not None), None)
    if chosen is None:
        return
    settings[name] = chosen
    if any(value != chosen for _, value in values):
        shown = ", ".join(f"{place}: {'not set' if value is None else repr(value)}" for place, value in values)
        theirs = f" (kohya's {_KOHYA_NAMES[name]})" if name in _KOHYA_NAMES else ""
        note(notes, f"{name}{theirs} is one setting for all images here, but it differs in the TOML ({shown}); using "
                     f"{chosen!r}")


def import_dataset_toml(path: Path) -> tuple[list[Concept], dict[str, object], list[str]]:
    """Read a kohya sd-scripts dataset config (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``).

    Returns the concepts (one per non-regularization subset, in file order), the :class:`TrainConfig` field values
    to apply (only those the TOML sets: ``resolution``, ``enable_buckets``, ``train_batch_size``,
    ``shuffle_tags``, ``keep_tokens``, ``hflip``) and notes on everything that could not be carried over. The
    rules are in the package docstring. Raises :class:`ConfigError` naming the key and its place for bad TOML, a
    missing or unreadable ``image_dir``, a wrong type or range, a key at the wrong level, and captions this
    trainer cannot read.
    """
    path = Path(path).expanduser()
    data = _load_toml(path)
    hint = f"fix it in {path}"
    notes: list[str] = []
    for key in data:
        if key not in ("general", "datasets"):
            note(notes, f"{key} (top level) is not carried over: a kohya dataset config holds only [general] and "
                         "[[datasets]]")
    general = _check_table(data.get("general", {}), "general", "general", hint, notes)
    datasets = data.get("datasets")
    if datasets is None:
        raise ConfigError(f"{path} has no [[datasets]]", "add a [[datasets]] table with [[datasets.subsets]]")
    if not isinstance(datasets, list):
        raise ConfigError(f"datasets: expected a list of tables ([[datasets]]), got {type(datasets).__name__}", hint)
    base = path.parent.absolute()
    concepts: list[Concept] = []
    per_subset: dict[str, list[tuple[str, Any]]] = {"shuffle_tags": [], "keep_tokens": [], "hflip": []}
    per_dataset: dict[str, list[tuple[str, Any]]] = {"resolution": [], "enable_buckets": [], "train_batch_size": []}
    held: dict[str, int] = {}  # class images per class folder, as the trainer will leave them
    for d, dataset in enumerate(datasets):
        dplace = f"datasets[{d}]"
        dclean = _check_table(dataset, "dataset", dplace, hint, notes)
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list):
            raise ConfigError(f"{dplace}.subsets: expected a list of tables ([[datasets.subsets]]), got "
                              f"{type(subsets).__name__}", hint)
        if not subsets:
            note(notes, f"{dplace} has no [[datasets.subsets]]; nothing is imported from it")
            continue
        instances: list[tuple[Subset, Concept]] = []
        regs: list[Subset] = []
        for s, sub in enumerate(subsets):
            place = f"{dplace}.subsets[{s}]"
            sclean = _check_table(sub, "subset", place, hint, notes)
            levels = [(place, sclean), (dplace, dclean), ("general", general)]
            is_reg = bool(sclean.get("is_reg", False))
            info = _read_subset(levels, place, base, notes, reg=is_reg)
            for ours, theirs in (("shuffle_tags", "shuffle_caption"), ("keep_tokens", "keep_tokens"),
                                 ("hflip", "flip_aug")):
                per_subset[ours].append((place, _lookup(theirs, levels)[0]))
            if is_reg:
                if "num_repeats" in sclean and info.repeats != 1:
                    note(notes, f"{place}.num_repeats = {info.repeats} changes nothing here: each instance image "
                                 "is paired with one class image per epoch (kohya balances reg images the same way)")
                regs.append(info)
                continue
            instance_token, class_token = split_class_tokens(info.tokens)
            concepts.append(Concept(instance_data_dir=str(info.folder), instance_prompt=info.template,
                                    instance_token=instance_token, class_token=class_token, repeats=info.repeats))
            instances.append((info, concepts[-1]))
        dlevels = [(dplace, dclean), ("general", general)]
        for ours, theirs in (("resolution", "resolution"), ("enable_buckets", "enable_bucket"),
                             ("train_batch_size", "batch_size")):
            per_dataset[ours].append((dplace, _lookup(theirs, dlevels)[0]))
        attach_regs(instances, regs, dplace, notes, held)
    if not concepts:
        raise ConfigError(f"{path} has no subset with instance images (every subset is missing or is_reg)",
                          "add a [[datasets.subsets]] with image_dir and class_tokens")
    settings: dict[str, object] = {}
    for name, values in (*per_dataset.items(), *per_subset.items()):
        _merge_setting(name, values, settings, notes)
    log.info("imported %d concept(s) and %d setting(s) from %s", len(concepts), len(settings), path)
    return concepts, settings, notes
