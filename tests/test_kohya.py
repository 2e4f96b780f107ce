"""kohya sd-scripts compatibility: dataset TOML import, <repeats>_<name> folders, sample prompt lines, step formula.

Every image is a tiny PNG drawn here with PIL in tmp_path.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
from PIL import Image

from dreambooth.config import Concept, config_from_dict
from dreambooth.data.dataset import TrainingData
from dreambooth.data.kohya import (
    import_dataset_toml,
    parse_sample_prompt_file,
    parse_sample_prompt_line,
    scan_kohya_folders,
    split_class_tokens,
    total_steps_formula,
)
from dreambooth.errors import ConfigError

# the WebUI's Python may be 3.10: there the TOML import needs tomli, and its tests are skipped without it
TOML_READER = next((name for name in ("tomllib", "tomli") if importlib.util.find_spec(name) is not None), None)
needs_toml = pytest.mark.skipif(TOML_READER is None, reason="reading TOML needs Python 3.11+ or tomli")

# ---------------------------------------------------------------------------------------------------- helpers


def images(folder: Path, count: int, *, captions: list[str] | None = None, size: tuple[int, int] = (16, 16),
           prefix: str = "img") -> list[Path]:
    """``count`` tiny PNGs in ``folder``; ``captions[i]`` (if given) is written to the i-th image's .txt."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{prefix}{i:02d}.png"
        Image.new("RGB", size, (40 * i % 256, 90, 160)).save(path)
        if captions is not None and i < len(captions):
            path.with_suffix(".txt").write_text(captions[i], encoding="utf-8")
        paths.append(path)
    return paths


def toml(tmp_path: Path, text: str, name: str = "dataset.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        import_dataset_toml(path)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ dataset TOML

FULL = """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"

[[datasets]]
resolution = 768
batch_size = 2
enable_bucket = true
flip_aug = true

  [[datasets.subsets]]
  image_dir = "train/shs"
  num_repeats = 10
  class_tokens = "shs girl"

  [[datasets.subsets]]
  image_dir = '{captioned}'
  num_repeats = 3
  class_tokens = "xyz dog"

  [[datasets.subsets]]
  is_reg = true
  image_dir = "reg/girl"
  class_tokens = "girl"
"""


@needs_toml
def test_two_subsets_and_a_regularization_subset_import_to_the_equivalent_concepts(tmp_path):
    images(tmp_path / "train" / "shs", 3)
    captioned = tmp_path / "elsewhere" / "captioned"
    images(captioned, 2, captions=["a xyz dog on grass", "a dog in the snow"])
    images(tmp_path / "reg" / "girl", 7)
    path = toml(tmp_path, FULL.replace("{captioned}", str(captioned)))

    concepts, settings, notes = import_dataset_toml(path)

    reg = str(tmp_path / "reg" / "girl")
    assert concepts == [
        Concept(instance_data_dir=str(tmp_path / "train" / "shs"), instance_prompt="shs girl", instance_token="shs",
                class_token="girl", repeats=10, class_data_dir=reg, class_prompt="girl", num_class_images_per=2),
        Concept(instance_data_dir=str(captioned), instance_prompt="[filewords]", instance_token="xyz",
                class_token="dog", repeats=3, class_data_dir=reg, class_prompt="girl", num_class_images_per=3),
    ]
    # every other field keeps its default
    defaults = dataclasses.asdict(Concept())
    changed = {"instance_data_dir", "instance_prompt", "instance_token", "class_token", "repeats", "class_data_dir",
               "class_prompt", "num_class_images_per"}
    for concept in concepts:
        assert {k: v for k, v in dataclasses.asdict(concept).items() if k not in changed} == \
            {k: v for k, v in defaults.items() if k not in changed}
    assert settings == {"resolution": 768, "enable_buckets": True, "train_batch_size": 2, "shuffle_tags": True,
                        "keep_tokens": 1, "hflip": True}
    assert notes == []

    # the result is a valid config, and trains with kohya's prompts
    cfg, _ = config_from_dict({**settings, "concepts": [dataclasses.asdict(c) for c in concepts]})
    assert cfg.resolution == 768 and cfg.train_batch_size == 2 and len(cfg.concepts) == 2
    data = TrainingData(concepts, 64, enable_buckets=False, seed=1)
    prompts = {data.prompt_for(ex, shuffle=False, keep_tokens=0, rng=None) for ex in data.all_examples()}
    # a caption naming the class but not the subject gets the instance token (our prompt builder's rule)
    assert prompts == {"shs girl", "a xyz dog on grass", "a xyz dog in the snow", "girl"}
    assert sum(len(c) for c in data.classes) == 14  # both concepts draw on the 7 reg images


@needs_toml
def test_values_are_inherited_general_then_dataset_then_subset(tmp_path):
    for name in ("a", "b", "c"):
        images(tmp_path / name, 2)
    path = toml(tmp_path, """
[general]
num_repeats = 5
class_tokens = "aaa cat"
flip_aug = false
batch_size = 4
resolution = 512

[[datasets]]
num_repeats = 7
batch_size = 2
  [[datasets.subsets]]
  image_dir = "a"
  class_tokens = "bbb dog"
  [[datasets.subsets]]
  image_dir = "b"
  num_repeats = 1

[[datasets]]
  [[datasets.subsets]]
  image_dir = "c"
""")
    concepts, settings, notes = import_dataset_toml(path)
    assert [(c.repeats, c.instance_prompt, c.instance_token, c.class_token) for c in concepts] == [
        (7, "bbb dog", "bbb", "dog"),  # repeats from the dataset, tokens from the subset
        (1, "aaa cat", "aaa", "cat"),  # repeats from the subset, tokens from general
        (5, "aaa cat", "aaa", "cat"),  # everything from general
    ]
    # enable_bucket is set nowhere: not returned, so our config keeps its own value
    assert settings == {"resolution": 512, "train_batch_size": 2, "hflip": False}
    assert [n for n in notes if "train_batch_size" in n] == [
        "train_batch_size (kohya's batch_size) is one setting for all images here, but it differs in the TOML "
        "(datasets[0]: 2, datasets[1]: 4); using 2"]
    assert len(notes) == 1


def test_split_class_tokens_rule():
    assert split_class_tokens("shs girl") == ("shs", "girl")
    assert split_class_tokens("  shs   blonde  girl ") == ("shs", "blonde girl")
    assert split_class_tokens("shs, 1girl, solo") == ("shs", "1girl, solo")
    assert split_class_tokens("shs") == ("shs", "")
    assert split_class_tokens("") == ("", "")


@needs_toml
def test_unsupported_keys_are_named_in_notes_never_dropped(tmp_path):
    images(tmp_path / "a", 2)
    path = toml(tmp_path, """
comment = "top"
[general]
color_aug = true
random_crop = false
[[datasets]]
bucket_reso_steps = 32
  [[datasets.subsets]]
  image_dir = "a"
  class_tokens = "shs girl"
  caption_prefix = "masterpiece"
  my_own_key = 1
""")
    _, settings, notes = import_dataset_toml(path)
    assert settings == {}
    assert len(notes) == 6
    joined = "\n".join(notes)
    for expected in ("comment (top level)", "general.color_aug = True", "general.random_crop = False",
                     "nothing is lost", "datasets[0].bucket_reso_steps = 32",
                     "datasets[0].subsets[0].caption_prefix = 'masterpiece'", "datasets[0].subsets[0].my_own_key"):
        assert expected in joined


BAD_TOML = {
    "syntax": ("[general\nx = 1", "is not valid TOML"),
    "no_datasets": ("[general]\nnum_repeats = 2", "has no [[datasets]]"),
    "datasets_not_tables": ('datasets = "x"', "datasets: expected a list of tables"),
    "subsets_not_list": ('[[datasets]]\nsubsets = "x"', "datasets[0].subsets: expected a list of tables"),
    "missing_image_dir": ("[[datasets]]\n[[datasets.subsets]]\nclass_tokens = 'a b'",
                          "datasets[0].subsets[0].image_dir: missing"),
    "repeats_type": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n[[datasets.subsets]]\nimage_dir = 'a'\n"
                     "num_repeats = 'ten'",
                     "datasets[0].subsets[1].num_repeats: expected an integer, got 'ten' (str)"),
    "repeats_float": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 2.5",
                      "datasets[0].subsets[0].num_repeats: expected an integer, got 2.5 (float)"),
    "repeats_range": ("[[datasets]]\nnum_repeats = 0\n[[datasets.subsets]]\nimage_dir = 'a'",
                      "datasets[0].num_repeats: expected an integer from 1 to 1000, got 0"),
    "bool_type": ("[general]\nflip_aug = 1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'",
                  "general.flip_aug: expected true or false, got 1 (int)"),
    "tokens_type": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nclass_tokens = 5",
                    "datasets[0].subsets[0].class_tokens: expected a string, got 5 (int)"),
    "image_dir_type": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = ['a']",
                       "datasets[0].subsets[0].image_dir: expected a string"),
    "resolution_type": ("[[datasets]]\nresolution = '512'\n[[datasets.subsets]]\nimage_dir = 'a'",
                        "datasets[0].resolution: expected an integer or [width, height], got '512' (str)"),
    "resolution_one_side": ("[general]\nresolution = [512]\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'",
                            "general.resolution: expected an integer or [width, height]"),
    "resolution_range": ("[[datasets]]\nresolution = 9000\n[[datasets.subsets]]\nimage_dir = 'a'",
                         "datasets[0].resolution: expected sides from 64 to 4096, got 9000"),
    "batch_range": ("[[datasets]]\nbatch_size = 0\n[[datasets.subsets]]\nimage_dir = 'a'",
                    "datasets[0].batch_size: expected an integer from 1 to 256, got 0"),
    "keep_tokens_range": ("[general]\nkeep_tokens = -1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'",
                          "general.keep_tokens: expected an integer from 0 to 75, got -1"),
    "dataset_key_in_subset": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nbatch_size = 2",
                              "datasets[0].subsets[0].batch_size: batch_size is a dataset setting"),
    "subset_key_in_general": ("[general]\nimage_dir = 'a'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'",
                              "general.image_dir: image_dir is a setting of one subset, not of [general]"),
    "fine_tuning_subset": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nmetadata_file = 'meta.json'",
                           "datasets[0].subsets[0].metadata_file: this is a fine-tuning subset"),
    "folder_missing": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'nope'",
                       "datasets[0].subsets[0].image_dir: instance images folder"),
    "only_reg": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nis_reg = true",
                 "has no subset with instance images"),
    "dataset_not_table": ("datasets = [1]", "datasets[0]: expected a table of settings, got int"),
}


@needs_toml
@pytest.mark.parametrize("case", sorted(BAD_TOML))
def test_bad_input_is_a_config_error_naming_the_key_and_place(tmp_path, case):
    images(tmp_path / "a", 2)
    text, expected = BAD_TOML[case]
    assert expected in error_of(toml(tmp_path, text))


@needs_toml
def test_missing_and_non_utf8_files(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nope.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes("[general]\nclass_tokens = 'caf\xe9'\n".encode("latin-1"))
    assert "is not UTF-8" in error_of(path)


def test_toml_reader_falls_back_to_tomli_and_else_says_what_is_missing(tmp_path, monkeypatch):
    images(tmp_path / "a", 1)
    path = toml(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nclass_tokens = 'shs'")
    reader = importlib.import_module(TOML_READER) if TOML_READER else None
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    if reader is not None:
        monkeypatch.setitem(sys.modules, "tomli", reader)  # tomli has tomllib's API
        assert import_dataset_toml(path)[0][0].instance_token == "shs"
    monkeypatch.setitem(sys.modules, "tomli", None)
    message = error_of(path)
    assert "reading TOML needs Python 3.11 or newer, or the tomli package" in message and "pip install tomli" in message


@needs_toml
def test_caption_extension_rules(tmp_path):
    folder = tmp_path / "a"
    for image in images(folder, 2):
        image.with_suffix(".caption").write_text("a caption kohya would train with", encoding="utf-8")
    base = "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nclass_tokens = 'shs girl'\n"
    # .caption files that would be the prompts: refused, with the reason and the fix
    message = error_of(toml(tmp_path, base + "caption_extension = '.caption'"))
    assert message.startswith("datasets[0].subsets[0].caption_extension: ")
    assert "2 caption file(s) with '.caption'" in message and "reads captions from .txt files only" in message
    assert "rename the caption files to .txt" in message
    # the same when the key is not set: kohya's default .caption reads them
    message = error_of(toml(tmp_path, base))
    assert "caption_extension (not set; .caption is kohya's default)" in message
    # inherited from general: named where it is written
    message = error_of(toml(tmp_path, "[general]\ncaption_extension = '.caption'\n" + base))
    assert message.startswith("general.caption_extension: ")
    # an extension without such files changes nothing: accepted, the prompt is class_tokens
    concepts, _, notes = import_dataset_toml(toml(tmp_path, base + "caption_extension = '.cap'"))
    assert concepts[0].instance_prompt == "shs girl" and notes == []


@needs_toml
def test_txt_captions_when_the_extension_is_not_set_and_partial_captions(tmp_path):
    images(tmp_path / "a", 3, captions=["shs girl smiling", "shs girl at the beach"])
    concepts, _, notes = import_dataset_toml(toml(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n"
                                                            "class_tokens = 'shs girl'\n"))
    assert concepts[0].instance_prompt == "[filewords]"
    assert len(notes) == 2
    assert "caption_extension is not set; the .txt files beside its images are taken as the captions" in notes[0]
    assert "1 of the 3 images" in notes[1] and "kohya trains them with class_tokens 'shs girl'" in notes[1]


@needs_toml
def test_no_tokens_no_captions_uses_file_names_with_a_note(tmp_path):
    images(tmp_path / "a", 2)
    concepts, _, notes = import_dataset_toml(toml(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'"))
    assert (concepts[0].instance_prompt, concepts[0].instance_token, concepts[0].class_token) == ("[filewords]", "",
                                                                                                  "")
    assert len(notes) == 1 and "no class_tokens" in notes[0] and "empty caption" in notes[0]


@needs_toml
def test_several_regularization_subsets_match_by_class_token(tmp_path):
    images(tmp_path / "girl", 2)
    images(tmp_path / "dog", 4)
    images(tmp_path / "cat", 1)
    images(tmp_path / "reg_dog", 9)
    images(tmp_path / "reg_girl", 1)
    images(tmp_path / "reg_tree", 3)
    path = toml(tmp_path, """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "girl"
  class_tokens = "shs girl"
  [[datasets.subsets]]
  image_dir = "dog"
  class_tokens = "zwx Dog"
  [[datasets.subsets]]
  image_dir = "cat"
  class_tokens = "qrt cat"
  [[datasets.subsets]]
  image_dir = "reg_dog"
  class_tokens = "dog"
  is_reg = true
  [[datasets.subsets]]
  image_dir = "reg_girl"
  class_tokens = "girl"
  is_reg = true
  num_repeats = 4
  [[datasets.subsets]]
  image_dir = "reg_tree"
  class_tokens = "tree"
  is_reg = true
""")
    concepts, _, notes = import_dataset_toml(path)
    assert [(Path(c.class_data_dir).name, c.class_prompt, c.num_class_images_per) for c in concepts] == [
        ("reg_girl", "girl", 1),  # 1 reg image for 2 instance images: the trainer makes the other one
        ("reg_dog", "dog", 2),  # 9 // 4, matched case-insensitively
        ("reg_dog", "dog", 9),  # no 'cat' reg subset: the first one
    ]
    joined = "\n".join(notes)
    assert len(notes) == 4
    assert "datasets[0].subsets[4].num_repeats = 4 changes nothing here" in joined
    assert "datasets[0].subsets[0]: datasets[0].subsets[4] has 1 class images for 2 instance images; the trainer " \
           "generates the missing 1" in joined
    assert "datasets[0].subsets[2]: none of the regularization image sets has its class token 'cat'" in joined
    assert "datasets[0].subsets[5]: no concept of datasets[0] has the class token 'tree'" in joined


@needs_toml
def test_a_shared_reg_folder_too_small_is_filled_once_and_differing_subset_settings_are_noted(tmp_path):
    images(tmp_path / "hoge", 3)
    images(tmp_path / "fuga", 2)
    images(tmp_path / "reg", 1)
    path = toml(tmp_path, """
[general]
flip_aug = true
[[datasets]]
  [[datasets.subsets]]
  image_dir = 'hoge'
  class_tokens = 'hoge girl'
  [[datasets.subsets]]
  image_dir = 'fuga'
  class_tokens = 'fuga boy'
  flip_aug = false
  [[datasets.subsets]]
  is_reg = true
  image_dir = 'reg'
  class_tokens = 'human'
""")
    concepts, settings, notes = import_dataset_toml(path)
    assert [(c.class_prompt, c.num_class_images_per) for c in concepts] == [("human", 1), ("human", 1)]
    assert settings == {"hflip": True}
    assert notes == [
        f"datasets[0].subsets[0]: datasets[0].subsets[2] has 1 class images for 3 instance images; the trainer "
        f"generates the missing 2 into {tmp_path / 'reg'} before training (kohya repeats the reg images instead)",
        "hflip (kohya's flip_aug) is one setting for all images here, but it differs in the TOML "
        "(datasets[0].subsets[0]: True, datasets[0].subsets[1]: False, datasets[0].subsets[2]: True); using True",
    ]


@needs_toml
def test_datasets_without_subsets_or_without_instance_subsets_are_noted(tmp_path):
    images(tmp_path / "a", 1)
    images(tmp_path / "r", 1)
    path = toml(tmp_path, """
[[datasets]]
  [[datasets.subsets]]
  image_dir = 'a'
  class_tokens = 'shs girl'
[[datasets]]
[[datasets]]
  [[datasets.subsets]]
  image_dir = 'r'
  class_tokens = 'girl'
  is_reg = true
""")
    concepts, _, notes = import_dataset_toml(path)
    assert len(concepts) == 1 and concepts[0].num_class_images_per == 0 and concepts[0].class_data_dir == ""
    assert notes == ["datasets[1] has no [[datasets.subsets]]; nothing is imported from it",
                     "datasets[2]: its regularization images have no concept in the same dataset to serve; they are "
                     "not used"]


@needs_toml
def test_non_square_resolution_and_relative_dir_from_the_current_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    images(work / "imgs", 1)
    monkeypatch.chdir(work)
    path = toml(tmp_path, "[[datasets]]\nresolution = [512, 768]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n"
                          "class_tokens = 'shs'")
    concepts, settings, notes = import_dataset_toml(path)
    assert settings == {"resolution": 576}  # isqrt(512 * 768) = 627, down to a multiple of 64
    assert concepts[0].instance_data_dir == str(work / "imgs")
    assert (concepts[0].instance_token, concepts[0].class_token) == ("shs", "")
    assert any("datasets[0].resolution: [512, 768] is trained here at max resolution 576" in n for n in notes)
    assert any("not found beside the TOML file" in n for n in notes)
    _, settings, _ = import_dataset_toml(toml(tmp_path, "[[datasets]]\nresolution = [640, 640]\n"
                                                        "[[datasets.subsets]]\nimage_dir = 'work/imgs'"))
    assert settings == {"resolution": 640}


# ------------------------------------------------------------------------------------------ folder convention


def test_repeats_name_folders(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    images(train / "10_shs girl", 3)
    images(train / "2_xyz", 2, captions=["xyz on a table", "xyz in a box"])
    images(train / "misc", 1)
    images(train / "0_zero", 1)
    (train / "5_empty").mkdir()
    images(train / ".hidden", 1)
    (train / "notes.txt").write_text("not a folder", encoding="utf-8")
    images(reg / "1_girl", 6)
    images(reg / "3_dog", 2)

    notes: list[str] = []
    concepts = scan_kohya_folders(train, reg, notes=notes)

    assert concepts == [
        Concept(instance_data_dir=str(train / "10_shs girl"), instance_prompt="shs girl", instance_token="shs",
                class_token="girl", repeats=10, class_data_dir=str(reg / "1_girl"), class_prompt="girl",
                num_class_images_per=2),
        Concept(instance_data_dir=str(train / "2_xyz"), instance_prompt="[filewords]", instance_token="xyz",
                class_token="", repeats=2, class_data_dir=str(reg / "1_girl"), class_prompt="girl",
                num_class_images_per=3),
    ]
    joined = "\n".join(notes)
    assert f"{train / '0_zero'}: 0 repeats is outside 1 to 1000; ignored" in joined
    assert f"{train / '5_empty'}: instance images folder {train / '5_empty'} is empty; ignored" in joined
    assert f"{train / 'misc'}: the name does not match <repeats>_<name>" in joined
    assert f"{train / 'notes.txt'}: not a folder" in joined
    assert f"{reg / '3_dog'}: 3 repeats change nothing here" in joined
    assert f"{train / '2_xyz'}: none of the regularization image sets has its class token ''" in joined
    assert f"{reg / '3_dog'}: no concept of {train} has the class token 'dog'" in joined
    assert ".hidden" not in joined
    assert len(notes) == 7

    # no reg parent: no class images
    assert all(c.num_class_images_per == 0 and not c.class_data_dir for c in scan_kohya_folders(train))


def test_folder_convention_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist or is not a folder"):
        scan_kohya_folders(tmp_path / "nope")
    images(tmp_path / "plain", 2)
    with pytest.raises(ConfigError, match="holds no <repeats>_<name> folder with images"):
        scan_kohya_folders(tmp_path)
    for image in images(tmp_path / "t" / "4_shs", 1):
        image.with_suffix(".caption").write_text("kohya caption", encoding="utf-8")
    with pytest.raises(ConfigError, match="caption kohya|reads captions from .txt files only"):
        scan_kohya_folders(tmp_path / "t")


# ---------------------------------------------------------------------------------------------- sample prompts

DEFAULTS = {"negative_prompt": "lowres", "width": 512, "height": 512, "seed": -1, "guidance_scale": 7.0,
            "steps": 20, "scheduler": "euler"}


def test_sample_prompt_every_flag():
    got = parse_sample_prompt_line("a photo of shs girl, smiling --n blurry, bad hands --w 512 --h 768 --d 42 "
                                   "--l 7.5 --s 28", DEFAULTS)
    assert got == {"prompt": "a photo of shs girl, smiling", "negative_prompt": "blurry, bad hands", "width": 512,
                   "height": 768, "seed": 42, "guidance_scale": 7.5, "steps": 28, "scheduler": "euler"}


def test_sample_prompt_any_order_extra_spaces_case_quotes():
    got = parse_sample_prompt_line('  a sign saying "hello world"   --S 30 --l   4  --d 7   --H 640 --n  "text, '
                                   'watermark"   --w 384  ', DEFAULTS)
    assert got == {"prompt": 'a sign saying "hello world"', "negative_prompt": '"text, watermark"', "width": 384,
                   "height": 640, "seed": 7, "guidance_scale": 4.0, "steps": 30, "scheduler": "euler"}
    # missing flags keep the defaults; without defaults the built-in ones
    assert parse_sample_prompt_line("just a prompt", DEFAULTS) == {**DEFAULTS, "prompt": "just a prompt"}
    assert parse_sample_prompt_line("x --n") == {"prompt": "x", "negative_prompt": "", "width": 512,
                                                  "height": 512, "seed": -1, "guidance_scale": 7.5, "steps": 20}
    # -- not followed by a letter is text
    assert parse_sample_prompt_line("a -- b --w 64")["prompt"] == "a -- b"


def test_sample_prompt_notes_unknown_repeated_and_rounded():
    notes: list[str] = []
    got = parse_sample_prompt_line("cat --ss euler_a --w 500 --s 10 --s 12 --zz", DEFAULTS, where="p.txt line 2",
                                   notes=notes)
    assert (got["prompt"], got["width"], got["steps"]) == ("cat", 496, 12)
    assert notes == [
        "p.txt line 2: --ss euler_a is ignored: the sampler is the model's 'Preview scheduler' setting",
        "p.txt line 2: --w 500 is not a multiple of 8; rounded down to 496 (as kohya does)",
        "p.txt line 2: --s is given more than once; the last one ('12') is used",
        "p.txt line 2: --zz is ignored: not a flag this importer knows",
    ]


@pytest.mark.parametrize("flag,value", [("w", "abc"), ("w", ""), ("h", "0"), ("h", "99999"), ("d", "x"),
                                        ("d", "-5"), ("d", "4294967296"), ("l", "abc"), ("l", "7.5.1"),
                                        ("l", "-1"), ("s", "0"), ("s", "2.5"), ("s", "1001")])
def test_sample_prompt_bad_values_name_the_flag_and_the_line(flag, value):
    line = f"a cat --{flag} {value} --n dog"
    with pytest.raises(ConfigError) as info:
        parse_sample_prompt_line(line, DEFAULTS)
    message = str(info.value)
    assert message.startswith(f"--{flag}: expected ")
    assert f"got {value!r}" in message and repr(line) in message


def test_sample_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# kohya prompts\n\nshs girl --w 512 --h 512 --d 1\n   # indented comment\n  shs girl at sea "
                    "--n ugly\n", encoding="utf-8")
    prompts = parse_sample_prompt_file(path, DEFAULTS)
    assert [(p["prompt"], p["seed"], p["negative_prompt"]) for p in prompts] == [("shs girl", 1, "lowres"),
                                                                                 ("shs girl at sea", -1, "ugly")]
    path.write_text("ok --s 3\n\nbad --d twelve\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^prompts.txt line 3: --d: expected .*'bad --d twelve'"):
        parse_sample_prompt_file(path)
    with pytest.raises(ConfigError, match="only kohya's text format"):
        parse_sample_prompt_file(tmp_path / "prompts.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        parse_sample_prompt_file(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------------------ step formula


def test_total_steps_formula_text():
    assert total_steps_formula([(12, 10)], 5, 2, 1, True) == (
        600, "(12 images x 10 repeats) x 2 (prior) x 5 epochs / (batch 2 x accumulation 1) = 600 steps")
    assert total_steps_formula(120, 5, 2, 2, False) == (
        150, "(120 images x repeats) x 5 epochs / (batch 2 x accumulation 2) = 150 steps")
    assert total_steps_formula([(5, 5), (3, 1)], 3, 3, 1, False) == (
        30, "(5 images x 5 repeats + 3 images x 1 repeats) x 3 epochs / (batch 3 x accumulation 1) = 30 steps "
            "(10 per epoch, rounded up)")
    assert total_steps_formula(0, 10, 1, 1, True)[0] == 0
    with pytest.raises(ValueError):
        total_steps_formula(10, 1, 0, 1, False)


def test_total_steps_formula_matches_the_trainer(tmp_path):
    inst, cls = tmp_path / "inst", tmp_path / "cls"
    images(inst, 3)
    images(cls, 2)
    for repeats, prior in ((5, True), (4, False), (1, True)):
        concept = Concept(instance_data_dir=str(inst), instance_prompt="x", repeats=repeats,
                          class_data_dir=str(cls) if prior else "", num_class_images_per=1 if prior else 0)
        data = TrainingData([concept], 128, enable_buckets=True, seed=3)
        for batch in (1, 2, 4, 7):
            for accum in (1, 3):
                total, _ = total_steps_formula([(3, repeats)], 6, batch, accum, prior)
                assert total == 6 * data.steps_per_epoch(batch, accum), (repeats, prior, batch, accum)


def test_total_steps_formula_is_a_lower_bound_with_several_buckets(tmp_path):
    inst = tmp_path / "inst"
    images(inst, 3, size=(16, 16))
    images(inst, 1, size=(32, 16), prefix="wide")
    data = TrainingData([Concept(instance_data_dir=str(inst), instance_prompt="x")], 128, enable_buckets=True, seed=0)
    assert len({ex.bucket for ex in data.all_examples()}) == 2
    total, _ = total_steps_formula(4, 1, 2, 1, False)
    assert total == 2 and data.steps_per_epoch(2, 1) == 3  # 3 square -> 2 batches, 1 wide -> its own batch
