"""The training data pipeline: image listing and loading, captions, prompts, buckets, epochs, tokenizing.

Every image is a tiny one drawn here with PIL; the bad-input corpus (empty, corrupt, huge, odd modes, odd names)
checks that each problem is either handled or reported with a message naming the file.
"""

from __future__ import annotations

import logging
import random
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dreambooth.config import Concept
from dreambooth.data.buckets import choose_bucket, fit_to_bucket, make_buckets
from dreambooth.data.captions import build_prompt, caption_from_name, read_caption, real_caption, shuffle_tags
from dreambooth.data.dataset import Example, TrainingData
from dreambooth.data.images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    ImageError,
    list_images,
    load_image,
    probe_image,
)
from dreambooth.data.prompts import tokenize_prompts
from dreambooth.errors import UserError

# ---------------------------------------------------------------------------------------------------- helpers


def save(path: Path, size: tuple[int, int] = (16, 16), color=(200, 30, 30), mode: str = "RGB", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kw)
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A valid-looking PNG that declares ``width`` x ``height`` but holds almost no data: cheap to write."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def concept(folder: Path, **kw) -> Concept:
    kw.setdefault("instance_prompt", "[filewords]")
    return Concept(instance_data_dir=str(folder), **kw)


def image_dir(root: Path, names: list[str], size=(16, 16)) -> Path:
    for name in names:
        save(root / name, size)
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from dreambooth.assets_api import write_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer("sd1", "tokenizer", folder)
    return CLIPTokenizer.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ list_images


def test_list_images_sorted_flat_visible_case_insensitive(tmp_path):
    image_dir(tmp_path, ["b.PNG", "a.jpg", "c.JpEg", "d.webp", "e.bmp", ".hidden.png"])
    save(tmp_path / "sub" / "deep.png")
    (tmp_path / "notes.txt").write_text("x")
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.bmp"]
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@pytest.mark.parametrize("case, expected", [
    ("empty", "no folder is set for the instance images"),
    ("missing", "does not exist"),
    ("file", "is a file, not a folder"),
    ("nofiles", "is empty"),
    ("nonimages", "contains 3 files but no images (.png, .jpg, .jpeg, .webp, .bmp)"),
])
def test_list_images_errors(tmp_path, case, expected):
    if case == "empty":
        target: str | Path = "  "
    elif case == "missing":
        target = tmp_path / "nope"
    elif case == "file":
        target = save(tmp_path / "one.png")
    elif case == "nofiles":
        target = tmp_path / "d"
        (target / "subfolder").mkdir(parents=True)
        (target / ".DS_Store").write_text("x")
    else:
        target = tmp_path / "d"
        target.mkdir()
        for name in ("a.txt", "b.gif", "c.tiff"):
            (target / name).write_text("x")
    with pytest.raises(UserError) as info:
        list_images(target)
    assert expected in info.value.message
    assert info.value.hint
    if case == "nonimages":
        assert "a.txt, b.gif, c.tiff" in info.value.message


def test_list_images_strips_quotes_and_names_what(tmp_path):
    image_dir(tmp_path, ["x.png"])
    assert list_images(f'"{tmp_path}"') == [tmp_path / "x.png"]
    with pytest.raises(UserError, match="class images folder"):
        list_images(tmp_path / "missing", "class images")


def test_non_ascii_file_names(tmp_path):
    path = save(tmp_path / "hündchen_猫.png", color=(10, 20, 30))
    assert list_images(tmp_path) == [path]
    assert load_image(path).getpixel((0, 0)) == (10, 20, 30)
    assert read_caption(path) == "hündchen 猫"
    data = TrainingData([concept(tmp_path)], 64, enable_buckets=False, seed=1)
    assert data.all_examples()[0].caption == "hündchen 猫"


# ------------------------------------------------------------------------------------------------- load_image


def test_load_grayscale_and_bilevel(tmp_path):
    img = load_image(save(tmp_path / "g.png", color=77, mode="L"))
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (77, 77, 77)
    img = load_image(save(tmp_path / "b.bmp", color=1, mode="1"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def test_load_cmyk_jpeg(tmp_path):
    path = save(tmp_path / "cmyk.jpg", color=(0, 255, 255, 0), mode="CMYK", quality=95)  # pure red in CMYK
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    img = load_image(path)
    r, g, b = img.getpixel((8, 8))
    assert img.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_load_16_bit_png_scales_instead_of_clipping(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid-gray in 16 bits; PIL's convert would clip it to white
    arr[0, 0] = 65535
    arr[0, 1] = 0
    Image.fromarray(arr).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode in ("I", "I;16", "I;16B")
    img = load_image(tmp_path / "deep.png")
    assert img.mode == "RGB"
    assert img.getpixel((4, 4)) == (128, 128, 128)
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (0, 0, 0)


def test_load_palette_with_transparency_becomes_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.putpixel((1, 1), 1)
    img.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent index 0 (black) -> white
    assert out.getpixel((1, 1)) == (0, 0, 255)


def test_load_rgba_and_la_composite_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((1, 1), (0, 128, 0, 255))
    img.putpixel((2, 2), (0, 0, 0, 128))
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (0, 128, 0)
    assert all(126 <= c <= 128 for c in out.getpixel((2, 2)))  # half-transparent black on white -> gray
    save(tmp_path / "la.png", color=(0, 0), mode="LA")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotated_jpeg_is_upright_and_probed_upright(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    assert probe_image(tmp_path / "rot.jpg") == (20, 40)
    r, g, b = out.getpixel((15, 4))  # clockwise: stored top-left lands at the top-right
    assert r > 200 and b < 60
    img.save(tmp_path / "rot.png", exif=exif.tobytes())
    assert probe_image(tmp_path / "rot.png") == (20, 40) == load_image(tmp_path / "rot.png").size


@pytest.mark.parametrize("kind, expected", [
    ("zero", "is an empty file (0 bytes)"),
    ("text", "is not an image PIL can read"),
    ("truncated", "is corrupt or truncated"),
    ("truncated_jpg", "is corrupt or truncated"),
    ("missing", "cannot read image"),
])
def test_load_bad_files_raise_image_error_naming_the_file(tmp_path, kind, expected):
    path = tmp_path / f"bad_{kind}.png"
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, I am not a PNG")
    elif kind == "truncated":
        arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path)
        path.write_bytes(path.read_bytes()[:400])
    elif kind == "truncated_jpg":
        path = path.with_suffix(".jpg")
        arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path, quality=95)
        path.write_bytes(path.read_bytes()[:3000])  # the header is intact: only decoding finds the damage
        assert probe_image(path, verify=False) == (64, 64)
        with pytest.raises(ImageError, match="is corrupt"):
            probe_image(path)  # the dataset scan decodes JPEGs once, so the damage is found before training
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert expected in info.value.message
    assert str(path) in info.value.message
    assert isinstance(info.value, UserError) and info.value.hint


@pytest.mark.parametrize("width, height, expected", [
    (20000, 20000, "400,000,000 pixels"),  # above PIL's own bomb limit: Image.open itself refuses
    (8000, 8000, "8000x8000 = 64,000,000 pixels"),  # below PIL's limit, above ours
])
def test_huge_image_refused_before_decoding(tmp_path, width, height, expected):
    path = png_header(tmp_path / "huge.png", width, height)
    assert path.stat().st_size < 200
    start = time.perf_counter()
    for func in (load_image, probe_image):
        with pytest.raises(ImageError) as info:
            func(path)
        assert "too large" in info.value.message and expected in info.value.message
        assert str(path) in info.value.message and f"{MAX_IMAGE_PIXELS:,}" in info.value.message
    assert time.perf_counter() - start < 1.0


def test_probe_verifies_png_integrity(tmp_path):
    arr = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "ok.png")
    assert probe_image(tmp_path / "ok.png") == (32, 32)
    data = bytearray((tmp_path / "ok.png").read_bytes())
    data[60] ^= 0xFF  # flip bits inside IDAT: the chunk CRC no longer matches
    (tmp_path / "flipped.png").write_bytes(bytes(data))
    with pytest.raises(ImageError, match="flipped.png"):
        probe_image(tmp_path / "flipped.png")


# --------------------------------------------------------------------------------------------------- captions


def test_read_caption_sidecar_wins_and_may_be_empty(tmp_path):
    img = save(tmp_path / "001-a_dog.png")
    assert read_caption(img) == "a dog"
    (tmp_path / "001-a_dog.txt").write_text("  ein Hund, im Gras\n", encoding="utf-8")
    assert read_caption(img) == "ein Hund, im Gras"
    (tmp_path / "001-a_dog.txt").write_text("", encoding="utf-8")
    assert read_caption(img) == ""
    (tmp_path / "001-a_dog.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="not UTF-8"):
        read_caption(img)


@pytest.mark.parametrize("stem, caption", [
    ("001-a_photo_of_dog", "a photo of dog"),
    ("01_dog_on_grass", "dog on grass"),
    ("(1) dog", "dog"),
    ("dog (2)", "dog"),
    ("3. cat", "cat"),
    ("1girl_smiling", "1girl smiling"),  # a number inside a word is not numbering
    ("0042", ""),
    ("my__dog  ", "my dog"),
])
def test_caption_from_file_name(stem, caption):
    assert caption_from_name(stem) == caption


@pytest.mark.parametrize("template, caption, expected", [
    ("a photo of [filewords]", "dog on grass", "a photo of ohwx dog on grass"),  # class but no instance: inserted
    ("[filewords]", "a photo of dog", "a photo of ohwx dog"),
    ("", "a photo of dog", "a photo of ohwx dog"),  # empty template = the caption alone
    ("[filewords]", "ohwx dog running", "ohwx dog running"),  # already there: unchanged
    ("[filewords]", "a cat on a sofa", "a cat on a sofa"),  # neither token: nothing forced
    ("[filewords]", "a hotdog stand", "a hotdog stand"),  # whole words only
    ("photo of ohwx, [filewords]", "a dog", "photo of ohwx, a dog"),  # instance token in the template
    ("photo of [instance_token] [class_token]", "ignored caption", "photo of ohwx dog"),  # no [filewords]: as is
    ("[instance_token], [filewords]", "", "ohwx"),  # empty caption leaves no dangling comma
    ("  a   photo\n of [filewords] ", "two  dogs", "a photo of two dogs"),
])
def test_build_prompt(template, caption, expected):
    assert build_prompt(template, caption, "ohwx", "dog") == expected


def test_build_prompt_without_tokens():
    assert build_prompt("art of [filewords]", "a dog") == "art of a dog"
    assert build_prompt("a fixed prompt", "a dog", "ohwx", "dog") == "a fixed prompt"


def test_shuffle_tags_keeps_leading_tags():
    prompt = "ohwx dog, red collar, grass, sunny, bokeh, smiling, outdoors"
    outs = {shuffle_tags(prompt, 1, random.Random(seed)) for seed in range(20)}
    assert len(outs) > 1
    for out in outs:
        tags = out.split(", ")
        assert tags[0] == "ohwx dog" and sorted(tags) == sorted(prompt.split(", "))
    assert shuffle_tags(prompt, 1, random.Random(3)) == shuffle_tags(prompt, 1, random.Random(3))
    assert shuffle_tags(prompt, 99, random.Random(0)) == prompt
    assert shuffle_tags("a,b ,, c", 3, random.Random(0)) == "a, b, c"


# ---------------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("res, step", [(512, 64), (768, 64), (1024, 64), (64, 8), (500, 64)])
def test_make_buckets_properties(res, step):
    buckets = make_buckets(res, step)
    assert (res, res) in buckets
    assert len(buckets) == len(set(buckets)) > 3
    for w, h in buckets:
        assert w * h <= res * res
        assert 0.5 <= w / h <= 2.0
        if (w, h) != (res, res):
            assert w % step == 0 and h % step == 0
            assert (h, w) in buckets  # portrait and landscape alike
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_choose_bucket():
    buckets = make_buckets(64, 8)
    assert choose_bucket(100, 100, buckets) == (64, 64)
    assert choose_bucket(200, 100, buckets) == (80, 40)
    assert choose_bucket(100, 200, buckets) == (40, 80)
    assert choose_bucket(1000, 1, buckets) == (80, 40)  # extreme: the widest there is
    assert choose_bucket(3, 2, [(60, 40), (30, 20), (64, 64)]) == (60, 40)  # tie -> larger area
    with pytest.raises(ValueError):
        choose_bucket(0, 10, buckets)


def circle_image(size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, (255, 255, 255))
    w, h = size
    r = min(w, h) // 5
    ImageDraw.Draw(img).ellipse((w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r), fill=(0, 0, 0))
    return img


def black_extent(img: Image.Image) -> tuple[int, int]:
    arr = np.asarray(img.convert("L")) < 128
    cols, rows = np.flatnonzero(arr.any(axis=0)), np.flatnonzero(arr.any(axis=1))
    return int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


@pytest.mark.parametrize("size, bucket", [((800, 400), (80, 40)), ((400, 800), (48, 80)), ((600, 600), (80, 48)),
                                          ((30, 20), (64, 64)), ((500, 260), (80, 40))])
def test_fit_to_bucket_covers_without_distortion(size, bucket):
    out = fit_to_bucket(circle_image(size), bucket)
    assert out.size == bucket
    cw, ch = black_extent(out)
    assert abs(cw - ch) <= 2, (cw, ch)  # the circle stays a circle: same scale on both axes
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    assert abs(cw - (2 * (min(size) // 5) + 1) * scale) <= 2.5  # scaled to cover, not shrunk to fit


def test_fit_to_bucket_crop_position():
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 20, 50))  # red left edge
    center = fit_to_bucket(img, (40, 40))  # scaled to 80x40, 40 cropped
    assert center.getpixel((0, 20)) == (0, 0, 0)
    lefts = {fit_to_bucket(img, (40, 40), random.Random(s)).getpixel((0, 20))[0] > 128 for s in range(30)}
    assert lefts == {True, False}  # random crops sometimes start at the left edge, sometimes not


# -------------------------------------------------------------------------------------------------- dataset


def test_dataset_basic_buckets_and_pixels(tmp_path):
    inst = tmp_path / "inst"
    save(inst / "01_wide dog.png", (200, 100))
    save(inst / "02_tall dog.png", (100, 200))
    save(inst / "03_square dog.png", (64, 64))
    data = TrainingData([concept(inst, instance_token="ohwx", class_token="dog")], 64, enable_buckets=True, seed=0,
                        bucket_step=8)
    by_name = {ex.image.name: ex for ex in data.all_examples()}
    assert by_name["01_wide dog.png"].bucket == (80, 40)
    assert by_name["02_tall dog.png"].bucket == (40, 80)
    assert by_name["03_square dog.png"].bucket == (64, 64)
    assert data.skipped == []
    pixels = data.load_pixels(by_name["01_wide dog.png"], flip=False)
    assert pixels.shape == (3, 40, 80) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[:, 5, 5], torch.tensor([200, 30, 30]) / 127.5 - 1.0, atol=1e-5)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0

    square = TrainingData([concept(inst)], 64, enable_buckets=False, seed=0)
    assert {ex.bucket for ex in square.all_examples()} == {(64, 64)}
    for batch in square.epoch_batches(0, 3):
        assert {tuple(square.load_pixels(ex, False).shape) for ex in batch} == {(3, 64, 64)}


def test_filewords_without_captions_uses_file_names(tmp_path):
    """No .txt files: each caption is the cleaned file name, and the instance token goes before the class word."""
    inst = image_dir(tmp_path / "inst", ["001-a_photo_of_dog.png", "002-dog_on_the_beach.jpg", "sleeping_cat.png"])
    data = TrainingData([concept(inst, instance_prompt="[filewords], high quality", instance_token="ohwx",
                                 class_token="dog")], 64, enable_buckets=False, seed=0)
    prompts = sorted(data.prompt_for(ex, shuffle=False, keep_tokens=0, rng=random.Random(0))
                     for ex in data.all_examples())
    assert prompts == ["a photo of ohwx dog, high quality", "ohwx dog on the beach, high quality",
                       "sleeping cat, high quality"]


def test_prompt_for_shuffles_and_class_prompts_get_no_instance_token(tmp_path):
    inst = image_dir(tmp_path / "inst", ["a.png"])
    (inst / "a.txt").write_text("dog, red collar, grass, sunny, bokeh, smiling", encoding="utf-8")
    cls = image_dir(tmp_path / "cls", ["c1.png"])
    (cls / "c1.txt").write_text("a photo of a dog", encoding="utf-8")
    data = TrainingData([concept(inst, instance_token="ohwx", class_token="dog", num_class_images_per=1,
                                 class_data_dir=str(cls), class_prompt="[filewords]")], 64,
                        enable_buckets=False, seed=0)
    inst_ex = data.instances[0][0]
    assert data.prompt_for(inst_ex, shuffle=False, keep_tokens=0, rng=random.Random(0)).startswith("ohwx dog, red")
    shuffled = {data.prompt_for(inst_ex, shuffle=True, keep_tokens=1, rng=random.Random(s)) for s in range(10)}
    assert len(shuffled) > 1 and all(p.startswith("ohwx dog, ") for p in shuffled)
    class_ex = data.classes[0][0]
    assert data.prompt_for(class_ex, shuffle=False, keep_tokens=0, rng=random.Random(0)) == "a photo of a dog"


@pytest.mark.parametrize(("stem", "is_caption"), [
    ("img0", False), ("IMG_1234", False), ("DSC00012", False), ("PXL_20230101_123456789", False),
    ("class_3_81234", False), ("d41d8cd98f00b204e9800998ecf8427e", False),
    ("3f2504e0-4f89-11d3-9a0c-0305e82c3301", False),
    ("a_red_dog", True), ("1girl_smiling", True), ("dog on the beach", True), ("zwx", True)])
def test_real_caption_drops_file_names_that_only_name_the_image(tmp_path, stem, is_caption):
    path = tmp_path / f"{stem}.png"
    caption = caption_from_name(stem)
    assert real_caption(path, caption) == (caption if is_caption else "")
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    assert real_caption(path, caption) == caption  # a caption file is a caption whatever it says


def test_tag_prompts_count_the_prompts_trained_never_file_names_that_are_no_captions(tmp_path):
    plain = image_dir(tmp_path / "plain", ["img0.png", "img1.png", "IMG_2041.jpg"])
    named = image_dir(tmp_path / "named", ["001-a_red_dog.png", "DSC00012.png"])
    captioned = image_dir(tmp_path / "captioned", ["img7.png"])
    (captioned / "img7.txt").write_text("Dog, red collar", encoding="utf-8")
    classes = image_dir(tmp_path / "classes", ["class_0_81234.png", "class_1_81235.png"])
    data = TrainingData([
        concept(plain, instance_prompt="a photo of zwx dog"),  # no [filewords]: the file names are never trained
        concept(named, instance_prompt="[filewords]", instance_token="zwx", class_token="dog",
                num_class_images_per=1, class_data_dir=str(classes), class_prompt="a photo of a dog, [filewords]"),
        concept(captioned, instance_prompt="photo, [filewords]")], 64, enable_buckets=False, seed=0,
        class_dirs=[None, classes, None])
    assert {folder: sorted(p) for folder, p in data.tag_prompts().items()} == {
        "plain": ["a photo of zwx dog"] * 3,
        "named": ["", "a red zwx dog"],  # DSC00012 is no caption, and its prompt is nothing but [filewords]
        "classes": ["a photo of a dog"] * 2,
        "captioned": ["photo, Dog, red collar"]}


def test_corrupt_image_among_good_ones_is_skipped_and_named(tmp_path, caplog):
    inst = image_dir(tmp_path / "inst", ["a.png", "b.jpg", "d.png"])
    (inst / "c_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (inst / "e_empty.jpg").write_bytes(b"")
    png_header(inst / "f_huge.png", 20000, 20000)
    with caplog.at_level(logging.WARNING, logger="dreambooth.data"):
        data = TrainingData([concept(inst)], 64, enable_buckets=False, seed=0)
    assert [ex.image.name for ex in data.all_examples()] == ["a.png", "b.jpg", "d.png"]
    assert [p.name for p, _ in data.skipped] == ["c_broken.png", "e_empty.jpg", "f_huge.png"]
    assert "0 bytes" in data.skipped[1][1] and "too large" in data.skipped[2][1]
    for name in ("c_broken.png", "e_empty.jpg", "f_huge.png"):
        assert any(name in rec.getMessage() and rec.levelno == logging.WARNING for rec in caplog.records)
    assert data.instance_items_per_epoch == 3


def test_load_pixels_of_a_file_broken_after_scanning_raises_image_error(tmp_path):
    inst = image_dir(tmp_path / "inst", ["a.png"])
    data = TrainingData([concept(inst)], 64, enable_buckets=False, seed=0)
    (inst / "a.png").write_bytes(b"")
    with pytest.raises(ImageError, match="a.png"):
        data.load_pixels(data.all_examples()[0], flip=False)


@pytest.mark.parametrize("setup, expected", [
    ("empty", "concept 1 ('ohwx'): instance images folder"),
    ("nonimages", "contains 2 files but no images"),
    ("allbad", "none of the 2 images"),
    ("unset", "no folder is set for the instance images"),
])
def test_dataset_errors_name_the_concept(tmp_path, setup, expected):
    inst = tmp_path / "inst"
    inst.mkdir()
    if setup == "nonimages":
        (inst / "a.txt").write_text("x")
        (inst / "b.gif").write_bytes(b"GIF89a")
    elif setup == "allbad":
        (inst / "a.png").write_bytes(b"")
        (inst / "b.png").write_text("nope")
    folder = "" if setup == "unset" else inst
    with pytest.raises(UserError) as info:
        TrainingData([concept(folder, instance_token="ohwx")], 64, enable_buckets=False, seed=0)
    assert expected in info.value.message and "concept 1" in info.value.message
    assert info.value.hint
    if setup == "empty":
        assert "is empty" in info.value.message


def test_batch_size_larger_than_images_warns_once(tmp_path, caplog):
    inst = image_dir(tmp_path / "inst", ["a.png", "b.png", "c.png"])
    data = TrainingData([concept(inst)], 64, enable_buckets=False, seed=0)
    with caplog.at_level(logging.WARNING, logger="dreambooth.data"):
        batches = data.epoch_batches(0, 8)
        data.epoch_batches(1, 8)
        assert data.steps_per_epoch(8, 1) == 1
    assert [len(b) for b in batches] == [3]
    warnings = [r for r in caplog.records if "batch size 8 is larger" in r.getMessage()]
    assert len(warnings) == 1


def test_repeats_and_batches_per_bucket(tmp_path):
    a = tmp_path / "a"
    save(a / "w1.png", (200, 100))
    save(a / "w2.png", (200, 100))
    save(a / "s1.png", (50, 50))
    b = image_dir(tmp_path / "b", ["x.png", "y.png"], size=(100, 200))
    data = TrainingData([concept(a, repeats=3), concept(b, repeats=2)], 64, enable_buckets=True, seed=5,
                        bucket_step=8)
    assert data.instance_items_per_epoch == 3 * 3 + 2 * 2
    batches = data.epoch_batches(0, 4)
    items = [ex for batch in batches for ex in batch]
    assert len(items) == 13  # nothing dropped
    counts = {name: sum(ex.image.name == name for ex in items) for name in ("w1.png", "s1.png", "x.png")}
    assert counts == {"w1.png": 3, "s1.png": 3, "x.png": 2}
    for batch in batches:
        assert len({ex.bucket for ex in batch}) == 1 and 1 <= len(batch) <= 4
    # wide: 6 items -> 4 + 2; square: 3 -> 3; tall: 4 -> 4
    assert sorted(len(b) for b in batches) == [2, 3, 4, 4]
    assert data.steps_per_epoch(4, 1) == 4 and data.steps_per_epoch(4, 3) == 2
    assert data.steps_per_epoch(1, 1) == 13


def test_epoch_order_is_deterministic(tmp_path):
    inst = image_dir(tmp_path / "inst", [f"{i:02d}.png" for i in range(12)])

    def order(seed: int, epoch: int) -> list[str]:
        data = TrainingData([concept(inst)], 64, enable_buckets=False, seed=seed)
        return [ex.image.name for batch in data.epoch_batches(epoch, 2) for ex in batch]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert sorted(order(1, 3)) == sorted(f"{i:02d}.png" for i in range(12))


def test_flip_really_mirrors(tmp_path):
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 32))  # white left stripe
    (tmp_path / "inst").mkdir()
    img.save(tmp_path / "inst" / "s.png")
    data = TrainingData([concept(tmp_path / "inst")], 32, enable_buckets=False, seed=0)
    ex = data.all_examples()[0]
    plain, flipped = data.load_pixels(ex, flip=False), data.load_pixels(ex, flip=True)
    assert torch.equal(flipped, torch.flip(plain, dims=[2]))
    assert plain[0, 16, 0] == 1.0 and flipped[0, 16, 31] == 1.0 and flipped[0, 16, 0] == -1.0


def test_prior_preservation_pairing(tmp_path):
    inst = image_dir(tmp_path / "inst", ["i1.png", "i2.png"])
    cls = image_dir(tmp_path / "cls", [f"c{i}.png" for i in range(5)])
    other = image_dir(tmp_path / "other", ["o1.png"])
    concepts = [concept(inst, repeats=2, num_class_images_per=3, class_prompt="a dog", class_data_dir="unused"),
                concept(other)]
    data = TrainingData(concepts, 64, enable_buckets=False, seed=0, class_dirs=[cls, None])
    assert data.instance_items_per_epoch == 5
    seen: list[str] = []
    for epoch in range(5):
        items = [ex for batch in data.epoch_batches(epoch, 3) for ex in batch]
        class_items = [ex for ex in items if ex.is_class]
        assert len(items) == 2 * 4 + 1  # concept 0 doubled (4 instance items + 4 class items), concept 1 not
        assert len(class_items) == 4 and all(ex.concept == 0 for ex in class_items)
        assert all(ex.caption_template == "a dog" for ex in class_items)
        seen += sorted(ex.image.name for ex in class_items)
    # 20 class items over 5 epochs cycle through the 5 class images evenly
    assert {name: seen.count(name) for name in set(seen)} == {f"c{i}.png": 4 for i in range(5)}


def test_prior_preservation_without_class_images_is_an_error(tmp_path):
    inst = image_dir(tmp_path / "inst", ["i1.png"])
    (tmp_path / "cls").mkdir()
    for folder, expected in ((str(tmp_path / "cls"), "is empty"), ("", "no class images folder is set"),
                             (str(tmp_path / "missing"), "does not exist")):
        with pytest.raises(UserError) as info:
            TrainingData([concept(inst, num_class_images_per=2, class_data_dir=folder)], 64,
                         enable_buckets=False, seed=0)
        assert expected in info.value.message and "concept 1" in info.value.message
        assert "generate the class images" in info.value.hint
    # fewer class images than instance items x num_class_images_per is fine: they are cycled
    cls = image_dir(tmp_path / "few", ["c.png"])
    data = TrainingData([concept(inst, repeats=3, num_class_images_per=5, class_data_dir=str(cls))], 64,
                        enable_buckets=False, seed=0)
    assert sum(ex.is_class for batch in data.epoch_batches(0, 10) for ex in batch) == 3
    # prior preservation off: the class folder is not even looked at
    TrainingData([concept(inst, class_data_dir=str(tmp_path / "missing"))], 64, enable_buckets=False, seed=0)


def test_example_is_hashable(tmp_path):
    ex = Example(tmp_path / "a.png", "t", "c", 0, False, (64, 64))
    assert {ex: 1}[Example(tmp_path / "a.png", "t", "c", 0, False, (64, 64))] == 1


# ------------------------------------------------------------------------------------------------- tokenizing


def test_tokenize_truncate_and_chunk(tokenizer):
    short = "a photo of ohwx dog"
    words = ["red", "blue", "green", "dog", "cat", "house", "tree", "sky"]  # one token each
    long = " ".join(words[i % len(words)] for i in range(180))
    n_long = len(tokenizer(long, add_special_tokens=False, verbose=False).input_ids)
    assert n_long == 180
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    ids, warnings = tokenize_prompts(tokenizer, [short, long], "truncate")
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert len(warnings) == 1 and "red blue green" in warnings[0] and "the last 105 beyond 75" in warnings[0]
    assert ids[1, 0] == bos and ids[1, 76] == eos
    expected_short = tokenizer(short, padding="max_length", max_length=77).input_ids
    assert ids[0].tolist() == expected_short

    ids, warnings = tokenize_prompts(tokenizer, [short, long], "chunk")
    assert warnings == []
    assert ids.shape == (2, 77 * 3)
    long_tokens = tokenizer(long, add_special_tokens=False, verbose=False).input_ids
    windows = ids[1].view(3, 77)
    assert (windows[:, 0] == bos).all()
    got = []
    for k, window in enumerate(windows.tolist()):
        body = long_tokens[75 * k:75 * (k + 1)]
        assert window[1:1 + len(body)] == body and window[1 + len(body)] == eos
        assert window[2 + len(body):] == [pad] * (75 - len(body))
        got += body
    assert got == long_tokens
    assert ids[0, :77].tolist() == expected_short
    assert ids[0, 77:154].tolist() == [bos, eos] + [pad] * 75  # empty extra windows for the shorter prompt

    ids, _ = tokenize_prompts(tokenizer, [short, ""], "chunk")
    assert ids.shape == (2, 77)
    with pytest.raises(ValueError):
        tokenize_prompts(tokenizer, [short], "squash")
