"""kohya's sample prompt lines (``a photo of shs girl --n blurry --w 512 --h 768 --d 42 --l 7.5 --s 28``) as
sample requests."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

from ...errors import ConfigError
from .subsets import note

log = logging.getLogger(__name__)

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
            note(notes, f"{where or line.strip()}: --{flag} {size} is not a multiple of 8; rounded down to {rounded} "
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
            note(notes, f"{label}: {shown} is ignored: {reason}")
            continue
        if flag in seen:
            note(notes, f"{label}: --{flag} is given more than once; the last one ({value!r}) is used")
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
