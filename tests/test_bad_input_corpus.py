"""The bad-input corpus: one table of distinct bad inputs (images, captions, concepts, configs, checkpoints, names and
paths, API payloads), each checked the same way:

(a) a clear message: a UserError (or the API's 4xx JSON) whose text names the problem, with a hint of the fix;
(b) through the tab's handlers (the same ``guarded`` wrapper the tab wires in), where the input can come from the tab:
    a message line, no traceback, no raw exception repr, nothing raised (the WebUI keeps running);
(c) nothing half-written: no temporary file anywhere under the models root, no new file but the run's status and
    logs, and nothing outside the root touched.

Inputs that reach the training worker (images, captions, concepts) run the trainer in this process, as the worker
does, and the tab shows the failure through ``poll``; those are refused before any model is loaded, so each costs
milliseconds.
"""

from __future__ import annotations

import html
import io
import json
import os
import pickle
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_training_model
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from dreambooth import api
from dreambooth.atomic import TMP_MARK
from dreambooth.config import load_config
from dreambooth.create import create_model
from dreambooth.errors import UserError
from dreambooth.host.standalone import StandaloneHost
from dreambooth.store import ModelDir, open_model, store_dir
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.ui.handlers import TabHandlers, guarded

MIN_CASES = 40
NO_CHANGE = "NO_CHANGE"
ALLOWED_NEW = re.compile(r"(status\.json|logs/.*)$")  # what a failed run may leave: its end state and its log


@dataclass
class World:
    """A models root with one trainable tiny model ``m`` (one concept of two images), its tab handlers, an API
    client, and a folder outside the root that nothing may touch."""

    root: Path
    md: ModelDir
    images: Path
    outside: Path
    host: StandaloneHost
    handlers: TabHandlers

    @property
    def ckpt_dir(self) -> Path:
        return self.host.checkpoint_dir()

    def client(self) -> TestClient:
        app = FastAPI()
        api.add_routes(app, self.host)
        return TestClient(app)

    def set_config(self, **values: Any) -> None:
        data = json.loads(self.md.config_path.read_text())
        data.update(values)
        self.md.config_path.write_text(json.dumps(data))

    def set_concept(self, **values: Any) -> None:
        data = json.loads(self.md.config_path.read_text())
        data["concepts"][0].update(values)
        self.md.config_path.write_text(json.dumps(data))


@dataclass
class Result:
    message: str  # what the user reads: the error's text (with its hint)
    hint: str
    ui: str | None = None  # what the tab shows, where the input can come from the tab


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    expect: str  # a regular expression the message must match: it names the problem
    run: Callable[[World], Result]


# ---------------------------------------------------------------------------------------------------------------
# how a case is run


def user_error(fn: Callable[[], Any]) -> UserError:
    try:
        fn()
    except UserError as err:
        return err
    raise AssertionError("no UserError was raised")


def through_training(world: World) -> Result:
    """Train ``m`` as the worker does; the tab shows the failure when it polls the status."""
    err = user_error(lambda: Trainer(world.md, RunOptions(device="cpu", install_signal_handlers=False)).run())
    ui = guarded(6, lambda: NO_CHANGE)(world.handlers.poll)("m", {})[0]
    return Result(str(err), err.hint, ui)


def training(prepare: Callable[[World], Any]) -> Callable[[World], Result]:
    def run(world: World) -> Result:
        prepare(world)
        return through_training(world)

    return run


def loading_config(prepare: Callable[[World], Any]) -> Callable[[World], Result]:
    """The config is read by the library (CLI, worker) and by the tab's Load button."""

    def run(world: World) -> Result:
        prepare(world)
        err = user_error(lambda: load_config(world.md.path))
        ui = guarded(3, lambda: NO_CHANGE)(world.handlers.load)("m")[0]
        return Result(str(err), err.hint, ui)

    return run


def creating_from(write: Callable[[Path], Any], suffix: str = ".safetensors") -> Callable[[World], Result]:
    """A checkpoint file in the checkpoint folder, picked as the source of a new model (library and tab)."""

    def run(world: World) -> Result:
        path = world.ckpt_dir / f"bad{suffix}"
        write(path)
        err = user_error(lambda: create_model(path, "new", world.root))
        ui = guarded(4, lambda: NO_CHANGE)(world.handlers.create)(path.name, "auto", False, "new2")[0]
        return Result(str(err), err.hint, ui)

    return run


def naming(name: str, ui_name: str | None = None) -> Callable[[World], Result]:
    """A model name from the library, the tab and the API."""

    def run(world: World) -> Result:
        err = user_error(lambda: open_model(name, world.root))
        ui = guarded(3, lambda: NO_CHANGE)(world.handlers.load)(name if ui_name is None else ui_name)[0]
        return Result(str(err), err.hint, ui)

    return run


def picking_source(choice: Callable[[World], str]) -> Callable[[World], Result]:
    """A checkpoint choice that is not in the checkpoint folder, from the tab and the API."""

    def run(world: World) -> Result:
        picked = choice(world)
        err = user_error(lambda: world.handlers.checkpoint_path(picked))
        ui = guarded(4, lambda: NO_CHANGE)(world.handlers.create)(picked, "auto", False, "new")[0]
        response = world.client().post("/dreambooth/models", json={"name": "new", "source": picked})
        assert response.status_code == 400, response.text
        return Result(str(err), err.hint, ui)

    return run


def requesting(method: str, url: str, status: int, **kwargs: Any) -> Callable[[World], Result]:
    def run(world: World) -> Result:
        response = world.client().request(method, url, **kwargs)
        assert response.status_code == status, response.text
        body = response.json()
        return Result(f"{body['error']} ({body['hint']})", body["hint"])

    return run


# ---------------------------------------------------------------------------------------------------------------
# bad files


def only_image(name: str, data: bytes | Callable[[Path], Any]) -> Callable[[World], Any]:
    """The concept's folder holds just this one file."""

    def prepare(world: World) -> None:
        for path in world.images.iterdir():
            path.unlink()
        target = world.images / name
        data(target) if callable(data) else target.write_bytes(data)

    return prepare


def png_bytes(size: tuple[int, int] = (8, 8), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def png_with_ihdr(bits: int, color_type: int) -> bytes:
    """A PNG whose header asks for a pixel format PNG does not define."""
    ihdr = struct.pack(">IIBBBBB", 8, 8, bits, color_type, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\0" * 64)
    idat_chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + idat_chunk + end


def huge_png(path: Path) -> None:
    Image.new("1", (10_000, 6_000)).save(path)  # 60 million pixels in a few KB: a decompression bomb


def with_caption(text: bytes) -> Callable[[World], Any]:
    def prepare(world: World) -> None:
        for image in world.images.glob("*.png"):
            image.with_suffix(".txt").write_bytes(text)

    return prepare


def concepts_file(content: bytes | None) -> Callable[[World], Any]:
    def prepare(world: World) -> None:
        path = world.root / "concepts.json"
        if content is not None:
            path.write_bytes(content)
        world.set_config(concepts_list_file=str(path))

    return prepare


def safetensors_header(header: dict[str, Any], data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def truncated_checkpoint(path: Path) -> None:
    buf = io.BytesIO()
    buf.write(safetensors_header({"model.diffusion_model.conv_in.weight": {"dtype": "F32", "shape": [320, 4, 3, 3],
                                                                           "data_offsets": [0, 320 * 4 * 9 * 4]}},
                                 b"\0" * 1000))
    path.write_bytes(buf.getvalue())


def lying_header(path: Path) -> None:
    """Offsets that overlap and a shape that does not fit them: the header lies about the sizes."""
    path.write_bytes(safetensors_header({"a": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]},
                                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16))


def not_sd(path: Path) -> None:
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 4), "classifier.weight": torch.zeros(2, 4)},
              str(path))


class Payload:
    """Unpickling this runs a command that creates the marker file: a checkpoint that runs code when loaded."""

    marker: Path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def pickled_payload(zip_format: bool) -> Callable[[Path], Any]:
    def write(path: Path) -> None:
        payload = Payload()
        Payload.marker = path.parent.parent / "PAYLOAD-RAN"
        if zip_format:
            torch.save({"state_dict": {"x": payload}}, path)
        else:
            path.write_bytes(pickle.dumps({"state_dict": payload}, protocol=2))

    return write


# ---------------------------------------------------------------------------------------------------------------
# the corpus

_IMAGES = [
    Case("image-zero-bytes", "images", r"empty file \(0 bytes\)", training(only_image("a.png", b""))),
    Case("image-truncated", "images", r"a\.png is corrupt|truncated",
         training(only_image("a.png", png_bytes((64, 64))[:60]))),
    Case("image-text-named-png", "images", r"not an image PIL can read",
         training(only_image("a.png", b"this is a text file, not a picture\n"))),
    Case("image-html-named-jpg", "images", r"not an image PIL can read",
         training(only_image("a.jpg", b"<html><body>404 Not Found</body></html>"))),
    Case("image-decompression-bomb", "images", r"too large: .*60,000,000 pixels",
         training(only_image("a.png", huge_png))),
    Case("image-unknown-pixel-format", "images", r"a\.png is not an image PIL can read",
         training(only_image("a.png", png_with_ihdr(3, 2)))),
    Case("image-garbage-bmp", "images", r"a\.bmp", training(only_image("a.bmp", b"BM" + bytes(range(256)) * 4))),
    Case("image-header-only", "images", r"a\.png is not an image PIL can read",
         training(only_image("a.png", png_with_ihdr(8, 2)[:33] + b"\0" * 8))),
    Case("images-folder-empty", "images", r"instance images folder .* is empty",
         training(lambda w: [p.unlink() for p in w.images.iterdir()])),
    Case("images-folder-missing", "images", r"instance images folder .*nowhere does not exist",
         training(lambda w: w.set_concept(instance_data_dir=str(w.root / "nowhere")))),
    Case("images-folder-only-other-files", "images", r"contains 1 file but no images",
         training(only_image("notes.docx", b"PK\3\4"))),
]

_CAPTIONS = [
    Case("caption-not-utf8", "captions", r"caption file .* is not UTF-8 text",
         training(with_caption(b"\xff\xfe\xfa\xfb a dog"))),
    Case("caption-empty-with-filewords-only", "captions",
         r"training prompt of .*disc_00\.png is empty.*write the captions",
         training(lambda w: (with_caption(b"")(w), w.set_concept(instance_prompt="[filewords]", instance_token="",
                                                                  class_token="")))),
    Case("caption-oversized", "captions", r"caption file .* bytes long; the limit is",
         training(with_caption(b"a photo of a dog, " * 10_000))),
]

_CONCEPTS = [
    Case("concept-none", "concepts", r"no concepts to train", training(lambda w: w.set_config(concepts=[]))),
    Case("concept-no-instance-dir", "concepts", r"no folder is set for the instance images",
         training(lambda w: w.set_concept(instance_data_dir=""))),
    Case("concept-instance-dir-is-a-file", "concepts", r"is a file, not a folder",
         training(lambda w: w.set_concept(instance_data_dir=str(w.md.config_path)))),
    Case("concept-unknown-setting", "concepts", r"concepts\[0\]\.instance_folder: unknown concept setting",
         loading_config(lambda w: w.set_concept(instance_folder="x"))),
    Case("concept-repeats-zero", "concepts", r"concepts\[0\]\.repeats: expected an integer from 1",
         loading_config(lambda w: w.set_concept(repeats=0))),
    Case("concept-not-an-object", "concepts", r"concepts\[0\]: expected an object",
         loading_config(lambda w: w.set_config(concepts=["dog"]))),
    Case("concepts-file-not-json", "concepts", r"concepts list file .* is not valid JSON",
         training(concepts_file(b"[{'instance_prompt': 'single quotes'}]"))),
    Case("concepts-file-an-object", "concepts", r"expected a JSON list of concepts, got dict",
         training(concepts_file(b'{"instance_data_dir": "x"}'))),
    Case("concepts-file-missing", "concepts", r"concepts list file .* does not exist", training(concepts_file(None))),
    Case("concepts-file-bad-entry", "concepts",
         r"concepts\.json\[0\]\.repeats: expected an integer.*fix the value in .*concepts\.json",
         training(concepts_file(b'[{"instance_data_dir": "x", "repeats": "many"}]'))),
]

_CONFIGS = [
    Case("config-wrong-type", "configs", r"learning_rate: expected a number .* got 'fast'",
         loading_config(lambda w: w.set_config(learning_rate="fast"))),
    Case("config-bool-for-int", "configs", r"epochs: expected an integer .* got True",
         loading_config(lambda w: w.set_config(epochs=True))),
    Case("config-out-of-range", "configs", r"learning_rate: expected a number from 0 to 1, got 5",
         loading_config(lambda w: w.set_config(learning_rate=5))),
    Case("config-negative", "configs", r"epochs: expected an integer from 1 to 100000, got -3",
         loading_config(lambda w: w.set_config(epochs=-3))),
    Case("config-nan", "configs", r"learning_rate: expected a number .* got nan",
         loading_config(lambda w: w.md.config_path.write_text(
             w.md.config_path.read_text().replace('"learning_rate": 0.001', '"learning_rate": NaN')))),
    Case("config-unknown-choice", "configs", r"optimizer: expected one of adamw, .* got 'sgd'",
         loading_config(lambda w: w.set_config(optimizer="sgd"))),
    Case("config-future-version", "configs", r"config_version 99 was written by a newer version",
         loading_config(lambda w: w.set_config(config_version=99))),
    Case("config-not-json", "configs", r"db_config\.json is not valid JSON",
         loading_config(lambda w: w.md.config_path.write_text('{"epochs": 2,'))),
    Case("config-not-utf8", "configs", r"db_config\.json is not valid JSON",
         loading_config(lambda w: w.md.config_path.write_bytes(b'{"model_name": "\xff\xfe"}'))),
    Case("config-json-array", "configs", r"config: expected a JSON object, got list",
         loading_config(lambda w: w.md.config_path.write_text("[1, 2, 3]"))),
    Case("config-concepts-not-a-list", "configs", r"concepts: expected a list of concepts, got dict",
         loading_config(lambda w: w.set_config(concepts={"instance_data_dir": "x"}))),
]

_CHECKPOINTS = [
    Case("checkpoint-truncated", "checkpoints", r"bad\.safetensors is truncated", creating_from(truncated_checkpoint)),
    Case("checkpoint-header-lies-about-sizes", "checkpoints", r"bad\.safetensors", creating_from(lying_header)),
    Case("checkpoint-not-stable-diffusion", "checkpoints", r"not supported|not a Stable Diffusion",
         creating_from(not_sd)),
    Case("checkpoint-pickle-code-payload-zip", "checkpoints", r"bad\.ckpt", creating_from(pickled_payload(True),
                                                                                           ".ckpt")),
    Case("checkpoint-pickle-code-payload-legacy", "checkpoints", r"bad\.ckpt",
         creating_from(pickled_payload(False), ".ckpt")),
    Case("checkpoint-empty", "checkpoints", r"bad\.safetensors is empty \(0 bytes\)",
         creating_from(lambda p: p.write_bytes(b""))),
    Case("checkpoint-random-bytes", "checkpoints", r"bad\.safetensors is not a safetensors file",
         creating_from(lambda p: p.write_bytes(bytes(range(256)) * 64))),
    Case("checkpoint-header-not-json", "checkpoints", r"header is not JSON",
         creating_from(lambda p: p.write_bytes(struct.pack("<Q", 10) + b"{not json}"))),
]

_NAMES = [
    Case("name-traversal", "names", r"model name '\.\./x' contains a path separator", naming("../x")),
    Case("name-absolute-path", "names", r"model name '/etc' contains a path separator", naming("/etc")),
    Case("name-dot-dot", "names", r"model name '\.\.' is not allowed", naming("..")),
    Case("name-reserved-con", "names", r"'CON' is a reserved device name", naming("CON")),
    Case("name-reserved-nul-with-suffix", "names", r"'nul\.v1' is a reserved device name", naming("nul.v1")),
    Case("name-empty", "names", r"model name is empty|no model is selected", naming("   ")),
    Case("name-nul-byte", "names", r"contains the character '\\x00'", naming("a\x00b")),
    Case("name-too-long", "names", r"200 characters long; the limit is 100", naming("a" * 200)),
    Case("name-symlink-out-of-the-store", "names", r"is a link that points outside",
         lambda w: (_link_model_out(w), naming("evil")(w))[1]),
    Case("source-traversal", "names", r"is not in the checkpoint folder",
         picking_source(lambda w: "../../outside/secret.safetensors")),
    Case("source-absolute-outside", "names", r"is not in the checkpoint folder",
         picking_source(lambda w: str(w.outside / "secret.safetensors"))),
]

_API = [
    Case("api-name-wrong-type", "api", r"name: expected str, got 5",
         requesting("POST", "/dreambooth/models", 400, json={"name": 5, "source": "tiny.safetensors"})),
    Case("api-source-missing", "api", r"source: required",
         requesting("POST", "/dreambooth/models", 400, json={"name": "new"})),
    Case("api-unknown-model", "api", r"no model named 'nope'", requesting("GET", "/dreambooth/models/nope", 404)),
    Case("api-traversal-in-name", "api", r"contains a path separator",
         requesting("POST", "/dreambooth/models", 400, json={"name": "../../x", "source": "tiny.safetensors"})),
    Case("api-oversize-body", "api", r"request body is .* bytes; the limit is",
         requesting("PUT", "/dreambooth/models/m/config", 413, content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                    headers={"content-type": "application/json"})),
    Case("api-body-not-json", "api", r"request body is not valid JSON",
         requesting("POST", "/dreambooth/models", 400, content=b"name=new",
                    headers={"content-type": "application/json"})),
    Case("api-body-an-array", "api", r"must be a JSON object, not list",
         requesting("POST", "/dreambooth/models", 400, json=["new", "tiny.safetensors"])),
    Case("api-unknown-field", "api", r"unknown field\(s\) colour",
         requesting("POST", "/dreambooth/models", 400, json={"name": "n", "source": "s", "colour": "red"})),
    Case("api-config-wrong-value", "api", r"learning_rate: expected a number",
         requesting("PUT", "/dreambooth/models/m/config", 400, json={"learning_rate": [1]})),
    Case("api-config-future-version", "api", r"newer version",
         requesting("PUT", "/dreambooth/models/m/config", 400, json={"config_version": 7})),
    Case("api-sample-traversal", "api", r"is not a sample file name",
         requesting("GET", "/dreambooth/models/m/samples/..%5Cdb_config.json", 400)),
    Case("api-train-resume-wrong-type", "api", r"resume: expected bool, got 'yes'",
         requesting("POST", "/dreambooth/models/m/train", 400, json={"resume": "yes"})),
]

CASES = _IMAGES + _CAPTIONS + _CONCEPTS + _CONFIGS + _CHECKPOINTS + _NAMES + _API


def _link_model_out(world: World) -> None:
    target = world.outside.parent / "elsewhere" / "evil"
    shutil.copytree(world.md.path, target)
    (store_dir(world.root) / "evil").symlink_to(target, target_is_directory=True)


# ---------------------------------------------------------------------------------------------------------------
# fixtures and the checks


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_checkpoint) -> Path:
    """A models root with the tiny model ``m`` and its images, made once and copied for each case."""
    base = tmp_path_factory.mktemp("corpus")
    root = base / "models"
    source = root / "Stable-diffusion" / "tiny.safetensors"
    source.parent.mkdir(parents=True)
    shutil.copy(tiny_checkpoint("sd1"), source)
    md = make_training_model(root, source, name="m", images=2)
    images = Path(load_config(md.path).concepts[0].instance_data_dir)
    assert images.parent == root
    return root


@pytest.fixture()
def world(template, tmp_path) -> World:
    root = tmp_path / "models"
    shutil.copytree(template, root, symlinks=True)
    md = ModelDir(store_dir(root) / "m")
    images = root / "concept-m"
    data = json.loads(md.config_path.read_text())
    data["concepts"][0]["instance_data_dir"] = str(images)
    md.config_path.write_text(json.dumps(data))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"not for the tab")
    host = StandaloneHost(root, "cpu")
    return World(root, md, images, outside, host, TabHandlers(host, no_change=lambda: NO_CHANGE))


def listing(*folders: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                stat = path.stat()
                out[str(path.relative_to(folder.parent))] = (stat.st_size, stat.st_mtime_ns)
    return out


def test_the_corpus_has_enough_distinct_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(CASES) >= MIN_CASES
    assert {c.kind for c in CASES} == {"images", "captions", "concepts", "configs", "checkpoints", "names", "api"}
    print(f"bad-input corpus: {len(CASES)} cases")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World):
    outputs = [world.ckpt_dir, world.root / "Lora", world.root / "embeddings"]
    model_before = listing(store_dir(world.root))
    outside_before = listing(world.outside)
    marker = world.ckpt_dir.parent / "PAYLOAD-RAN"

    result = case.run(world)
    print(f"{case.id}: {result.message}")

    # (a) a clear message naming the problem, with a hint of the fix
    assert re.search(case.expect, result.message), result.message
    assert result.hint.strip() and result.hint in result.message
    assert "Traceback" not in result.message
    # (b) the tab shows it as a message line: no traceback, no raw exception repr, nothing raised
    if result.ui is not None:
        shown = html.unescape(result.ui)
        assert "Traceback" not in shown and "unexpected" not in shown and not re.search(r"\w+Error\(", shown), shown
        assert re.search(case.expect, shown), shown
        assert result.hint in shown or re.search(r"error: .+ \(.+\)", shown), shown  # a hint, maybe the tab's own
    # (c) nothing half-written, nothing new but a run's status and log, nothing outside the root touched
    leftovers = [p for p in world.root.rglob("*") if TMP_MARK in p.name]
    assert not leftovers, leftovers
    model_after = listing(store_dir(world.root))
    new = [p for p in model_after if p not in model_before and not ALLOWED_NEW.search(p)]
    assert not new, new
    changed = [p for p in model_before if p in model_after and model_after[p] != model_before[p]
               and not ALLOWED_NEW.search(p) and not p.endswith("db_config.json")]
    assert not changed, changed
    assert not (store_dir(world.root) / "new").exists() and not (store_dir(world.root) / "new2").exists()
    assert listing(world.outside) == outside_before
    for folder in outputs:
        assert not folder.is_dir() or not [p for p in folder.iterdir() if p.name.startswith("m_")]
    assert not marker.exists(), "the checkpoint's pickled code ran"
    assert not (world.md.path / "train.lock").exists()


def test_unknown_config_keys_are_kept_and_reported_not_refused(world: World):
    """Not an error: a setting this version does not know (a newer one's, a typo) is kept, reported, written back."""
    world.set_config(future_setting={"x": 1}, learing_rate=0.5)
    cfg = load_config(world.md.path)
    assert cfg.unknown == {"future_setting": {"x": 1}, "learing_rate": 0.5}
    shown = guarded(3, lambda: NO_CHANGE)(world.handlers.load)("m")[0]
    assert "loaded the settings of m" in shown
    response = world.client().put("/dreambooth/models/m/config", json={**cfg.to_dict(), "epochs": 3})
    assert response.status_code == 200
    assert any("future_setting" in n and "learing_rate" in n for n in response.json()["notes"])
    saved = json.loads(world.md.config_path.read_text())
    assert saved["future_setting"] == {"x": 1} and saved["learing_rate"] == 0.5 and saved["epochs"] == 3
