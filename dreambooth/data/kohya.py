"""kohya sd-scripts compatibility: its dataset TOML, its ``<repeats>_<name>`` folders, its sample prompt lines.

Everything here turns kohya's formats into our :class:`~dreambooth.config.Concept` list and
:class:`~dreambooth.config.TrainConfig` values, and says what could not be carried over: each unsupported key is
named in a note (also logged as a warning), never dropped silently. Input that cannot mean anything (bad TOML, a
missing ``image_dir``, a wrong type) raises :class:`~dreambooth.errors.ConfigError` naming the key and its place,
e.g. ``datasets[0].subsets[1].num_repeats: expected an integer``.

Rules of the import (:func:`import_dataset_toml`, :func:`scan_kohya_folders`):

* **Inheritance** as kohya does it: a subset setting is taken from the subset, else its ``[[datasets]]`` table,
  else ``[general]``; a dataset setting (``resolution``, ``batch_size``, ``enable_bucket``) from the dataset, else
  ``[general]``. A key absent everywhere is not returned at all: kohya takes it from its command line, which the
  TOML does not hold, so our config keeps its own value.
* **Tokens.** kohya's ``class_tokens`` (or a folder's name after ``<repeats>_``) such as ``"shs girl"`` is split
  at the first space or comma: the first word is the instance token (``shs``), the rest the class token
  (``girl``; commas and spaces around it trimmed). A single word is the instance token with no class token.
  A regularization subset's ``class_tokens`` is its whole class prompt (it names no subject).
* **Prompts.** kohya trains an image with its caption file when it has one, else with ``class_tokens``. So a
  subset whose images have ``.txt`` captions gets the instance prompt ``[filewords]`` (the caption is the whole
  prompt, as in kohya; our prompt builder still puts the instance token before the class word of a caption that
  names the class but not the subject), and a subset without captions gets ``class_tokens`` itself as the prompt.
  When only some images have captions the others are captioned from their file names here, where kohya uses
  ``class_tokens``: a note says so. No captions and no ``class_tokens``: kohya trains with an empty caption, we
  with the file names (``[filewords]``), and a note says so.
* **Caption extension.** Our captions reader reads ``.txt`` sidecars only. Another ``caption_extension`` is an
  error (:class:`ConfigError`), not a note, when caption files with it really exist beside the images: those
  captions are the training prompts, and training without them would silently train something else (rename them
  to ``.txt``). Without such files it changes nothing and is accepted. When the TOML does not set the key, kohya
  takes it from its command line (default ``.caption``): ``.caption`` files beside the images are then the same
  error, else ``.txt`` files are taken as the captions (``--caption_extension .txt``, the usual case), noted.
* **Regularization subsets** (``is_reg = true``) become the class images of the concepts of the same dataset:
  ``class_data_dir`` is the reg folder, ``class_prompt`` its ``class_tokens`` (or ``[filewords]`` when it has
  ``.txt`` captions). With several reg subsets in one dataset a concept takes the one whose ``class_tokens``
  equals its class token, else the first (with a note). ``num_class_images_per`` is
  ``max(1, reg images // instance images)``, so the trainer, which makes class images only while the folder holds
  fewer than ``num_class_images_per x instance images``, finds enough and generates none. With fewer reg images
  than instance images it would generate the rest into the reg folder (kohya repeats the reg images instead): a
  note says so. Like kohya, each instance image (repeats included) is paired with one class image per epoch, so a
  reg subset's ``num_repeats`` changes nothing here (noted when set). Each epoch continues through the class
  images where the last one stopped, so all of them are used over a run.
* **One value for all.** ``shuffle_caption``, ``keep_tokens``, ``flip_aug`` (per subset in kohya) and the dataset
  settings are one setting each in our config: when subsets or datasets differ, the first value set wins and a
  note lists the differences.
* **resolution** ``512`` or ``[512, 512]`` is our max resolution 512. A non-square ``[w, h]`` keeps its pixel
  area: the largest multiple of 64 at most ``sqrt(w * h)``, with a note (our buckets are built around a square).
* **Paths.** A relative ``image_dir`` is taken beside the TOML file; if it does not exist there but does from the
  current directory (where kohya would have looked), that one is used, with a note.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Concept, TrainConfig, field_specs
from ..errors import ConfigError, UserError

log = logging.getLogger(__name__)

FILEWORDS = "[filewords]"
SUPPORTED_CAPTION_EXTENSION = ".txt"
KOHYA_DEFAULT_CAPTION_EXTENSION = ".caption"
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


def _note(notes: list[str], text: str) -> None:
    log.warning("%s", text)
    notes.append(text)


def _limits(name: str, cls: type) -> tuple[float | None, float | None]:
    spec = next(s for s in field_specs(cls) if s.name == name)
    return spec.minimum, spec.maximum


# ----------------------------------------------------------------------------------------------------------------
# dataset TOML


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
    low, high = _limits("resolution", TrainConfig)
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
    _note(notes, f"{place}.resolution: [{width}, {height}] is trained here at max resolution {result} (about the "
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
            _note(notes, f"{place}.{key} = {value!r} is not carried over: {_UNSUPPORTED_REASONS[key]}{off}")
        else:
            _note(notes, f"{place}.{key} = {value!r} is not carried over: not a kohya dataset setting this "
                         "importer knows")
    return clean


def _in_range(place: str, key: str, kind: str, value: Any, field_name: str, cls: type, hint: str) -> Any:
    if kind != "int" or not field_name:
        return value
    low, high = _limits(field_name, cls)
    if low is not None and value < low or high is not None and value > high:
        raise ConfigError(f"{place}.{key}: expected an integer from {low:g} to {high:g}, got {value!r}", hint)
    return value


def _lookup(key: str, levels: Sequence[tuple[str, dict[str, Any]]]) -> tuple[Any, str]:
    """kohya's fallback: the value of ``key`` in the first level that sets it, and that level's place."""
    for place, clean in levels:
        if key in clean:
            return clean[key], place
    return None, ""


def split_class_tokens(tokens: str) -> tuple[str, str]:
    """kohya's ``class_tokens`` as (instance token, class token): split at the first space or comma.

    ``"shs girl"`` -> ``("shs", "girl")``, ``"shs, 1girl"`` -> ``("shs", "1girl")``, ``"shs"`` -> ``("shs", "")``.
    """
    text = " ".join(tokens.split())
    match = re.match(r"([^\s,]+)[\s,]*(.*)$", text)
    if match is None:
        return "", ""
    return match.group(1), match.group(2).strip(" ,")


def _normal(text: str) -> str:
    return " ".join(text.replace(",", " ").split()).lower()


def _list_images(folder: Path, what: str) -> list[Path]:
    from .images import list_images  # lazy: images.py imports torch

    return list_images(folder, what)


def _caption_ext(ext: str) -> str:
    ext = ext.strip()
    return ext if ext.startswith(".") or not ext else "." + ext


def _guess_extension(images: list[Path], place: str, notes: list[str], *, folders: bool = False) -> tuple[str, str]:
    """The caption extension where none is set: kohya's command line (unknown here) or its default ``.caption``.

    Returns (extension, how it was chosen). ``.caption`` files beside the images are what kohya's default reads;
    else ``.txt`` files are taken as the captions (kohya run with ``--caption_extension .txt``); in a TOML that is
    noted, in the folder convention it is the expected case.
    """
    if any(p.with_suffix(KOHYA_DEFAULT_CAPTION_EXTENSION).is_file() for p in images):
        return KOHYA_DEFAULT_CAPTION_EXTENSION, "kohya's default"
    if not folders and any(p.with_suffix(SUPPORTED_CAPTION_EXTENSION).is_file() for p in images):
        _note(notes, f"{place}: caption_extension is not set; the .txt files beside its images are taken as the "
                     "captions (as kohya run with --caption_extension .txt)")
    return SUPPORTED_CAPTION_EXTENSION, ""


def _template(images: list[Path], tokens: str, ext: str, ext_label: str, folder: Path, place: str,
              notes: list[str], *, reg: bool) -> str:
    """The prompt template of a subset's images (the rules are in the module docstring)."""
    with_ext = [p for p in images if p.with_suffix(ext).is_file()] if ext else []
    if ext != SUPPORTED_CAPTION_EXTENSION:
        if with_ext:
            shown = ", ".join(p.with_suffix(ext).name for p in with_ext[:2]) + (", ..." if len(with_ext) > 2 else "")
            raise ConfigError(f"{ext_label}: {folder} holds {len(with_ext)} caption "
                              f"file(s) with {ext!r} ({shown}), which this trainer does not read: it reads captions "
                              f"from .txt files only, and training without them would use other prompts",
                              f"rename the caption files to .txt and set caption_extension = \".txt\" in {place}")
        with_ext = []
    what = "class images" if reg else "images"
    if with_ext:
        missing = len(images) - len(with_ext)
        if missing:
            fallback = f"class_tokens {tokens!r}" if tokens else "an empty caption"
            _note(notes, f"{place}: {missing} of the {len(images)} {what} in {folder} have no {ext} caption: kohya "
                         f"trains them with {fallback}, here they are captioned from their file names")
        return FILEWORDS
    if tokens:
        return tokens
    _note(notes, f"{place}: no class_tokens and no {SUPPORTED_CAPTION_EXTENSION} captions: kohya trains its "
                 f"{what} with an empty caption, here they are captioned from their file names ([filewords])")
    return FILEWORDS


def _resolve_dir(raw: str, base: Path, place: str, notes: list[str]) -> Path:
    path = Path(raw.strip()).expanduser()
    if path.is_absolute():
        return path
    beside = (base / path).absolute()
    if beside.is_dir():
        return beside
    from_cwd = path.absolute()
    if from_cwd.is_dir():
        _note(notes, f"{place}.image_dir {raw!r}: not found beside the TOML file, using {from_cwd} (relative to "
                     "the current directory, as kohya would)")
        return from_cwd
    return beside


@dataclass
class _Subset:
    place: str
    folder: Path
    images: list[Path]
    tokens: str
    template: str
    repeats: int


def _read_subset(levels: list[tuple[str, dict[str, Any]]], place: str, base: Path,
                 notes: list[str], *, reg: bool) -> _Subset:
    clean = levels[0][1]
    raw_dir = clean.get("image_dir", "")
    if not raw_dir.strip():
        raise ConfigError(f"{place}.image_dir: missing; every subset needs the folder of its images",
                          f"add image_dir = \"path/to/images\" to {place}")
    folder = _resolve_dir(raw_dir, base, place, notes)
    try:
        images = _list_images(folder, "class images" if reg else "instance images")
    except UserError as err:
        raise ConfigError(f"{place}.image_dir: {err.message}", err.hint) from None
    tokens, _ = _lookup("class_tokens", levels)
    tokens = " ".join((tokens or "").split())
    ext, ext_place = _lookup("caption_extension", levels)
    ext_label = f"{ext_place}.caption_extension"
    if ext is None:
        ext, source = _guess_extension(images, place, notes)
        ext_label = f"{place}.caption_extension (not set; {ext} is {source})"
    template = _template(images, tokens, _caption_ext(ext), ext_label, folder, place, notes, reg=reg)
    repeats, _ = _lookup("num_repeats", levels)
    return _Subset(place, folder, images, tokens, template, 1 if repeats is None else repeats)


def _pick_reg(concept: Concept, place: str, regs: list[_Subset], notes: list[str]) -> _Subset:
    if len(regs) == 1:
        return regs[0]
    wanted = _normal(concept.class_token)
    for reg in regs:
        if wanted and _normal(reg.tokens) == wanted:
            return reg
    _note(notes, f"{place}: none of the regularization image sets has its class token {concept.class_token!r} "
                 f"as its class_tokens; using the first one ({regs[0].place}) as its class images")
    return regs[0]


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
        _note(notes, f"{name}{theirs} is one setting for all images here, but it differs in the TOML ({shown}); using "
                     f"{chosen!r}")


def import_dataset_toml(path: Path) -> tuple[list[Concept], dict[str, object], list[str]]:
    """Read a kohya sd-scripts dataset config (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``).

    Returns the concepts (one per non-regularization subset, in file order), the :class:`TrainConfig` field values
    to apply (only those the TOML sets: ``resolution``, ``enable_buckets``, ``train_batch_size``,
    ``shuffle_tags``, ``keep_tokens``, ``hflip``) and notes on everything that could not be carried over. The
    rules are in the module docstring. Raises :class:`ConfigError` naming the key and its place for bad TOML, a
    missing or unreadable ``image_dir``, a wrong type or range, a key at the wrong level, and captions this
    trainer cannot read.
    """
    path = Path(path).expanduser()
    data = _load_toml(path)
    hint = f"fix it in {path}"
    notes: list[str] = []
    for key in data:
        if key not in ("general", "datasets"):
            _note(notes, f"{key} (top level) is not carried over: a kohya dataset config holds only [general] and "
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
            _note(notes, f"{dplace} has no [[datasets.subsets]]; nothing is imported from it")
            continue
        instances: list[tuple[_Subset, Concept]] = []
        regs: list[_Subset] = []
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
                    _note(notes, f"{place}.num_repeats = {info.repeats} changes nothing here: each instance image "
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
        _attach_regs(instances, regs, dplace, notes, held)
    if not concepts:
        raise ConfigError(f"{path} has no subset with instance images (every subset is missing or is_reg)",
                          "add a [[datasets.subsets]] with image_dir and class_tokens")
    settings: dict[str, object] = {}
    for name, values in (*per_dataset.items(), *per_subset.items()):
        _merge_setting(name, values, settings, notes)
    log.info("imported %d concept(s) and %d setting(s) from %s", len(concepts), len(settings), path)
    return concepts, settings, notes


def _attach_regs(instances: list[tuple[_Subset, Concept]], regs: list[_Subset], scope: str, notes: list[str],
                 held: dict[str, int]) -> None:
    """Give each instance concept of ``scope`` (a dataset, or the training folder) its class images from ``regs``.

    ``held`` counts the images per class folder as the trainer will leave them: it generates what a concept
    lacks, concept by concept.
    """
    if not regs:
        return
    if not instances:
        _note(notes, f"{scope}: its regularization images have no concept in the same dataset to serve; they are "
                     "not used")
        return
    used: set[str] = set()
    for info, concept in instances:
        reg = _pick_reg(concept, info.place, regs, notes)
        used.add(reg.place)
        _set_class_images(concept, info, reg, notes, held)
    for reg in regs:
        if reg.place not in used:
            _note(notes, f"{reg.place}: no concept of {scope} has the class token {reg.tokens!r}; these class "
                         "images are not used")


def _set_class_images(concept: Concept, info: _Subset, reg: _Subset, notes: list[str], held: dict[str, int]) -> None:
    high = _limits("num_class_images_per", Concept)[1] or 1000
    per = max(1, min(int(high), len(reg.images) // len(info.images)))
    concept.class_data_dir = str(reg.folder)
    concept.class_prompt = reg.template
    concept.num_class_images_per = per
    have = held.get(concept.class_data_dir, len(reg.images))
    needed = per * len(info.images)
    if needed > have:
        _note(notes, f"{info.place}: {reg.place} has {have} class images for {len(info.images)} instance images; "
                     f"the trainer generates the missing {needed - have} into {reg.folder} before training (kohya "
                     "repeats the reg images instead)")
    held[concept.class_data_dir] = max(have, needed)


# ----------------------------------------------------------------------------------------------------------------
# <repeats>_<name> folders

_FOLDER_NAME = re.compile(r"^(\d+)_(.*)$", re.DOTALL)


def _scan_parent(parent: Path, what: str, notes: list[str], *, reg: bool) -> list[_Subset]:
    parent = Path(parent).expanduser()
    if not parent.is_dir():
        raise ConfigError(f"{what} folder {parent} does not exist or is not a folder",
                          f"pick the folder that holds the <repeats>_<name> folders (kohya's "
                          f"{'reg_data_dir' if reg else 'train_data_dir'})")
    low, high = _limits("repeats", Concept)
    found: list[_Subset] = []
    for entry in sorted(parent.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue  # .DS_Store, .ipynb_checkpoints, ...: never meant as data
        place = str(entry)
        if not entry.is_dir():
            _note(notes, f"{place}: not a folder; kohya's convention wants <repeats>_<name> folders here, ignored")
            continue
        match = _FOLDER_NAME.match(entry.name)
        if match is None:
            _note(notes, f"{place}: the name does not match <repeats>_<name> (e.g. '10_shs girl'); ignored")
            continue
        repeats = int(match.group(1))
        if not (low or 1) <= repeats <= (high or repeats):
            _note(notes, f"{place}: {repeats} repeats is outside {low:g} to {high:g}; ignored")
            continue
        try:
            images = _list_images(entry, "class images" if reg else "instance images")
        except UserError as err:
            _note(notes, f"{place}: {err.message}; ignored")
            continue
        tokens = " ".join(match.group(2).split())
        ext, source = _guess_extension(images, place, notes, folders=True)
        template = _template(images, tokens, ext, f"{place} ({ext} is {source})", entry, place, notes, reg=reg)
        found.append(_Subset(place, entry.absolute(), images, tokens, template, repeats))
    return found


def scan_kohya_folders(parent: Path, reg_parent: Path | None = None, *,
                       notes: list[str] | None = None) -> list[Concept]:
    """Concepts from kohya's folder convention: ``parent/<repeats>_<name>/`` holds the images of one concept.

    ``train/10_shs girl/`` gives repeats 10 and the tokens ``shs`` / ``girl`` (split as in the module docstring);
    the prompt is ``[filewords]`` when the images have ``.txt`` captions (kohya run with
    ``--caption_extension .txt``), else the name itself. Entries that do not fit (a name without ``<repeats>_``,
    repeats outside 1..1000, a folder without images, a plain file) are reported in ``notes`` (and logged), not
    silently skipped; hidden entries are ignored. Everything after the first ``_`` is the name, underscores
    included, as in kohya.

    ``reg_parent`` (kohya's ``reg_data_dir``, e.g. ``reg/1_girl/``) gives the class images: each concept takes the
    reg folder whose name equals its class token, else the first one (noted); the class prompt is the folder's
    name and ``num_class_images_per`` is derived from the image counts as for a TOML's reg subsets.
    """
    notes = notes if notes is not None else []
    found = _scan_parent(parent, "training images", notes, reg=False)
    if not found:
        raise ConfigError(f"{parent} holds no <repeats>_<name> folder with images",
                          "make one folder per concept named like '10_shs girl' with the images in it")
    concepts: list[tuple[_Subset, Concept]] = []
    for info in found:
        instance_token, class_token = split_class_tokens(info.tokens)
        concepts.append((info, Concept(instance_data_dir=str(info.folder), instance_prompt=info.template,
                                       instance_token=instance_token, class_token=class_token,
                                       repeats=info.repeats)))
    if reg_parent is not None:
        regs = _scan_parent(reg_parent, "regularization images", notes, reg=True)
        if not regs:
            _note(notes, f"{reg_parent} holds no <repeats>_<name> folder with images; no class images are set")
        for info in regs:
            if info.repeats != 1:
                _note(notes, f"{info.place}: {info.repeats} repeats change nothing here: each instance image is "
                             "paired with one class image per epoch")
        _attach_regs(concepts, regs, str(parent), notes, {})
    return [concept for _, concept in concepts]


# ----------------------------------------------------------------------------------------------------------------
# sample prompts

_FLAG_START = re.compile(r"(?:^|(?<=\s))--(?=[A-Za-z])")
_FLAG = re.compile(r"([A-Za-z]+)(.*)$", re.DOTALL)
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
SAMPLE_DEFAULTS: dict[str, object] = {"prompt": "", "negative_prompt": "", "width": 512, "height": 512, "seed": -1,
                                      "guidance_scale": 7.5, "steps": 20}
_SIZE_LIMITS = (64, 8192)
_FLAG_KEYS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "guidance_scale", "s": "steps"}
_KNOWN_UNSUPPORTED_FLAGS = {
    "ss": "the sampler is the model's 'Preview scheduler' setting",
    "cn": "ControlNet previews are not made here",
    "am": "there is no attention-couple sampling here",
    "c": "clip skip is the model's 'Clip skip' setting",
    "g": "use --l for the guidance scale",
}


def _flag_error(where: str, flag: str, expected: str, value: str, line: str) -> ConfigError:
    prefix = f"{where}: " if where else ""
    return ConfigError(f"{prefix}--{flag}: expected {expected}, got {value!r} in sample prompt line {line.strip()!r}",
                       "fix the value after the flag, e.g. '--w 512 --h 768 --d 42 --l 7.5 --s 28'")


def _flag_value(flag: str, value: str, line: str, where: str, notes: list[str]) -> object:
    if flag == "n":
        return value
    if flag in ("w", "h"):
        low, high = _SIZE_LIMITS
        if not _INT.fullmatch(value) or not low <= int(value) <= high:
            raise _flag_error(where, flag, f"a whole number of pixels from {low} to {high}", value, line)
        size = int(value)
        if size % 8:
            rounded = size - size % 8
            _note(notes, f"{where or line.strip()}: --{flag} {size} is not a multiple of 8; rounded down to {rounded} "
                         "(as kohya does)")
            size = rounded
        return size
    if flag == "d":
        if not _INT.fullmatch(value) or not -1 <= int(value) < 2**32:
            raise _flag_error(where, flag, "a seed from 0 to 4294967295 (or -1 for random)", value, line)
        return int(value)
    if flag == "s":
        if not _INT.fullmatch(value) or not 1 <= int(value) <= 1000:
            raise _flag_error(where, flag, "a number of steps from 1 to 1000", value, line)
        return int(value)
    if flag == "l":
        if not _FLOAT.fullmatch(value) or not 0.0 <= float(value) <= 100.0:
            raise _flag_error(where, flag, "a guidance scale from 0 to 100", value, line)
        return float(value)
    raise AssertionError(flag)


def parse_sample_prompt_line(line: str, defaults: Mapping[str, object] | None = None, *, where: str = "",
                             notes: list[str] | None = None) -> dict[str, object]:
    """One line of a kohya sample prompt file as a dict for a :class:`~dreambooth.sample.SampleRequest`.

    ``a photo of shs girl --n blurry, lowres --w 512 --h 768 --d 42 --l 7.5 --s 28``: the text before the first
    flag is the prompt; ``--n`` negative prompt, ``--w``/``--h`` size, ``--d`` seed, ``--l`` guidance scale,
    ``--s`` steps. A flag starts at ``--`` after a space (or at the line start) followed by a letter; its value
    is everything up to the next flag, so flags may come in any order, spaces around values do not matter, flag
    letters are case-insensitive, and quotes are kept as written: kohya does not treat them specially either, so
    `` --w`` inside quotes is still a flag, while ``--`` not followed by a letter is text.
    A repeated flag: the last one wins (noted). Unknown flags (e.g. kohya's ``--ss`` sampler) are noted and
    ignored. Sizes that are not a multiple of 8 are rounded down like kohya does (noted).

    Returns ``defaults`` (missing keys from :data:`SAMPLE_DEFAULTS`) with the keys prompt, negative_prompt, width,
    height, seed, guidance_scale, steps set from the line. A bad value (``--w abc``, ``--s 0``) raises
    :class:`ConfigError` naming the flag and the line; ``where`` (e.g. ``"prompts.txt line 3"``) is put in front.
    """
    notes = notes if notes is not None else []
    result: dict[str, object] = {**SAMPLE_DEFAULTS, **(defaults or {})}
    parts = _FLAG_START.split(line.strip())
    result["prompt"] = parts[0].strip()
    seen: set[str] = set()
    label = where or repr(line.strip())
    for part in parts[1:]:
        match = _FLAG.match(part)
        assert match is not None  # every part after a split starts with a letter
        flag, value = match.group(1).lower(), match.group(2).strip()
        if flag not in _FLAG_KEYS:
            reason = _KNOWN_UNSUPPORTED_FLAGS.get(flag, "not a flag this importer knows")
            shown = f"--{flag} {value}" if value else f"--{flag}"
            _note(notes, f"{label}: {shown} is ignored: {reason}")
            continue
        if flag in seen:
            _note(notes, f"{label}: --{flag} is given more than once; the last one ({value!r}) is used")
        seen.add(flag)
        result[_FLAG_KEYS[flag]] = _flag_value(flag, value, line, where, notes)
    return result


def parse_sample_prompt_file(path: Path, defaults: Mapping[str, object] | None = None, *,
                             notes: list[str] | None = None) -> list[dict[str, object]]:
    """Every prompt of a kohya sample prompt text file (see :func:`parse_sample_prompt_line`).

    Blank lines and lines starting with ``#`` (after leading spaces) are skipped. kohya's ``.toml`` and ``.json``
    prompt files are refused with a :class:`ConfigError`; errors name the file and the line number.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() in (".toml", ".json"):
        raise ConfigError(f"sample prompt file {path}: only kohya's text format is read here, not {path.suffix}",
                          "write one prompt per line, e.g. 'a photo of shs girl --n blurry --w 512 --h 512 --s 28'")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"sample prompt file {path} does not exist", "check the path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"sample prompt file {path} is not UTF-8 text", "save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read sample prompt file {path}: {err.strerror or err}",
                          "check that it is readable") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        prompts.append(parse_sample_prompt_line(stripped, defaults, where=f"{path.name} line {number}", notes=notes))
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# step count


def total_steps_formula(images_x_repeats: int | Sequence[tuple[int, int]], epochs: int, batch: int,
                        accumulation: int, with_prior: bool) -> tuple[int, str]:
    """The number of optimizer steps of a run and the formula that gives it, as our trainer counts.

    ``images_x_repeats`` is the number of instance images times their repeats, or a list of (images, repeats)
    per concept, which the formula then shows: ``(12 images x 10 repeats) x 2 (prior) x 5 epochs / (batch 2 x
    accumulation 1) = 600 steps``. Prior preservation doubles the items of an epoch (each instance item is paired
    with a class image). Steps are counted per epoch, rounded up (a smaller last batch and a last partial
    accumulation still make a step), then times the epochs; the formula says so when it rounds:
    ``... = 30 steps (10 per epoch, rounded up)``.

    This is exact for one bucket (aspect-ratio buckets off, or all images of one shape). With buckets the real
    count can be larger: each bucket's remainder is a batch of its own (see
    :meth:`~dreambooth.data.dataset.TrainingData.steps_per_epoch`), so with batch size > 1 there can be up to one
    more batch per extra bucket in every epoch.
    """
    if epochs < 0 or batch < 1 or accumulation < 1:
        raise ValueError(f"need epochs >= 0, batch >= 1, accumulation >= 1; got {epochs}, {batch}, {accumulation}")
    if isinstance(images_x_repeats, int):
        if images_x_repeats < 0:
            raise ValueError(f"images_x_repeats must be >= 0, got {images_x_repeats}")
        items = images_x_repeats
        head = f"({items} images x repeats)"
    else:
        pairs = [(int(images), int(repeats)) for images, repeats in images_x_repeats]
        if any(images < 0 or repeats < 1 for images, repeats in pairs):
            raise ValueError(f"need images >= 0 and repeats >= 1, got {pairs}")
        items = sum(images * repeats for images, repeats in pairs)
        head = "(" + " + ".join(f"{images} images x {repeats} repeats" for images, repeats in pairs) + ")"
    per_epoch = items * (2 if with_prior else 1)
    divisor = batch * accumulation
    steps_per_epoch = -(-per_epoch // divisor)
    total = steps_per_epoch * epochs
    prior = " x 2 (prior)" if with_prior else ""
    text = f"{head}{prior} x {epochs} epochs / (batch {batch} x accumulation {accumulation}) = {total} steps"
    if per_epoch % divisor:
        text += f" ({steps_per_epoch} per epoch, rounded up)"
    return total, text
