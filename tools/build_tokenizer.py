#!/usr/bin/env python3
"""Build the shipped CLIP tokenizer files from OpenAI's BPE merge list.

Writes ``dreambooth/assets/clip/vocab.json`` and ``dreambooth/assets/clip/merges.txt`` in the Hugging Face
``CLIPTokenizer`` format (49408 tokens, merges file starting with ``#version: 0.2``), the same vocabulary as
openai/clip-vit-large-patch14 and the SD 2.x / SDXL tokenizers.

The source is ``bpe_simple_vocab_16e6.txt.gz``, the merge list the open-clip-torch wheel ships. The script reads it
straight out of the wheel (a zip); it never installs open-clip-torch.

Usage::

    python tools/build_tokenizer.py                       # pip download the wheel into a temp folder
    python tools/build_tokenizer.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl
    python tools/build_tokenizer.py bpe_simple_vocab_16e6.txt.gz [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("build_tokenizer")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "dreambooth" / "assets" / "clip"
GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"

VOCAB_SIZE = 49408
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# CLIP uses the first 49152 - 256 - 2 merges of the list (the rest of the file is unused).
NUM_MERGES = 49152 - 256 - 2
MERGES_HEADER = "#version: 0.2"


def byte_to_unicode_table() -> dict[int, str]:
    """The GPT-2/CLIP reversible byte -> printable unicode character table.

    Bytes that are already visible, non-space latin-1 characters map to themselves; every other byte is mapped, in
    increasing byte order, to code points 256, 257, ... The dict keeps that order: visible bytes first.
    """
    visible = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_merge_lines(gz_bytes: bytes) -> list[tuple[str, str]]:
    """Parse the gzip'd merge list; the first line is a version header and is skipped."""
    text = gzip.decompress(gz_bytes).decode("utf-8")
    lines = text.split("\n")
    merges: list[tuple[str, str]] = []
    for line in lines[1 : NUM_MERGES + 1]:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"unexpected merge line {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != NUM_MERGES:
        raise ValueError(f"expected {NUM_MERGES} merges, found {len(merges)}")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id in CLIP order: 256 byte chars, the same with ``</w>``, one token per merge, BOS, EOS."""
    chars = list(byte_to_unicode_table().values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} unique of {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return vocab


def render_files(gz_bytes: bytes) -> tuple[str, str]:
    """Return the text of (vocab.json, merges.txt)."""
    merges = read_merge_lines(gz_bytes)
    vocab = build_vocab(merges)
    vocab_text = json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))
    merges_text = MERGES_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return vocab_text, merges_text


def load_gz(source: Path) -> bytes:
    """Read the .gz merge list from a file, or out of a wheel / zip holding it."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            names = [n for n in zf.namelist() if n.endswith("/" + GZ_NAME) or n == GZ_NAME]
            if not names:
                raise FileNotFoundError(f"{GZ_NAME} not found inside {source}")
            log.info("reading %s from %s", names[0], source)
            return zf.read(names[0])
    data = source.read_bytes()
    if data[:2] != b"\x1f\x8b":
        raise ValueError(f"{source} is neither a wheel nor a gzip file")
    return data


def pip_download_wheel(dest: Path) -> Path:
    """Fetch the open-clip-torch wheel (no dependencies, not installed) with pip into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "open-clip-torch",
           "-d", str(dest)]
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("open_clip_torch-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no open_clip_torch wheel in {dest}")
    return wheels[-1]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", type=Path,
                        help=f"open_clip_torch wheel or {GZ_NAME}; omitted: pip download the wheel")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.source is None:
        with tempfile.TemporaryDirectory(prefix="oc-wheel-") as tmp:
            gz_bytes = load_gz(pip_download_wheel(Path(tmp)))
    else:
        gz_bytes = load_gz(args.source)

    vocab_text, merges_text = render_files(gz_bytes)
    for name, text in (("vocab.json", vocab_text), ("merges.txt", merges_text)):
        path = args.out / name
        write_atomic(path, text)
        data = text.encode("utf-8")
        log.info("wrote %s (%d bytes, sha256 %s)", path, len(data), hashlib.sha256(data).hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
