"""kohya sd-scripts compatibility, one module per thing it reads: its dataset TOML (``dataset_toml.py``), its
``<repeats>_<name>`` folders (``folders.py``), its sample prompt lines (``sample_prompts.py``); ``importer.py``
applies a dataset to a model (the CLI, the API and the tab call :func:`import_kohya`).

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

from .dataset_toml import import_dataset_toml
from .folders import scan_kohya_folders
from .importer import KohyaImport, import_kohya, total_steps_formula
from .sample_prompts import SAMPLE_DEFAULTS, parse_sample_prompt_file, parse_sample_prompt_line
from .subsets import split_class_tokens

__all__ = ["SAMPLE_DEFAULTS", "KohyaImport", "import_dataset_toml", "import_kohya", "parse_sample_prompt_file",
           "parse_sample_prompt_line", "scan_kohya_folders", "split_class_tokens", "total_steps_formula"]
