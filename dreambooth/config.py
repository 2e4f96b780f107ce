"""The training config: one typed, versioned source of truth for every setting.

``db_config.json`` in a model dir holds a :class:`TrainConfig` with its :class:`Concept` list. Each field
carries its label, help text, group, default and range in its metadata, so the UI, the CLI flags and the API
schema are all built from here (see :func:`field_specs`) and cannot drift.

Loading validates every value and names the bad field with what it expected. Keys from older versions are
migrated; keys nobody knows are kept (``TrainConfig.unknown``), written back on save and reported, never dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_json
from .errors import UserError
from .families import FAMILIES, FAMILY_IDS
from .gpus import text_problem as gpus_problem

CONFIG_VERSION = 1
CONFIG_FILE = "db_config.json"

# Every choice list is declared here, once; the modules that act on a choice import its list from here.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "linear_with_warmup", "cosine",
                 "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "adamw_8bit", "lion", "adafactor", "dadaptation", "prodigy")
GLOBAL_OPTIMIZERS = ("dadaptation", "prodigy")  # they estimate a step size from all parameters at once
MIXED_PRECISION = ("no", "fp16", "bf16")
ATTENTION = ("auto", "default", "xformers", "sdp")
ATTENTION_MODES = tuple(a for a in ATTENTION if a != "auto")  # what "auto" resolves to (the host's choice)
SAMPLE_SCHEDULERS = ("ddim", "pndm", "lms", "euler", "euler_a", "dpmpp_2m", "unipc")
LONG_PROMPTS = ("truncate", "chunk")
EXPORT_DTYPES = ("fp16", "fp32", "bf16")
FILE_DTYPES = ("keep", *EXPORT_DTYPES)  # a created model's or an exported file's precision ("keep": as it is)
EMA_EXPORTS = ("none", "main", "both")  # no EMA; the EMA weights as the UNet; both (the training layout)
# The training methods: name -> "module:Class" of its implementation (a module of train/methods/ when it starts with
# a dot). A new method is one new file there and one line here; the names are the choices of the method setting.
METHODS: dict[str, str] = {
    "dreambooth": ".dreambooth:DreamBooth",
    "lora": ".lora:Lora",
    "textual_inversion": ".textual_inversion:TextualInversionMethod",
    "hypernetwork": ".hypernetwork:HypernetworkMethod",
}
WEIGHT_METHODS = ("dreambooth", "lora")  # the methods that train the UNet / text encoder (or a LoRA on them)
# the WebUI's hypernetwork activations that need no arguments (train/hypernetwork.py builds them; a test checks)
HYPERNETWORK_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "gelu", "silu", "mish",
                            "softplus", "selu", "celu", "relu6", "hardswish", "hardtanh", "hardsigmoid", "softsign",
                            "tanhshrink", "logsigmoid")
WEIGHT_PRECISIONS = ("fp32", "bf16_master", "bf16_stochastic")
LORA_TYPES = ("lora", "loha", "lokr", "dora")  # the LoRA method's adapter types (train/adapters.py)
# the optimizers that read the betas / epsilon (train/optimizers.py; a test checks): Adafactor keeps no first moment
# and its own epsilon pair, Lion has no epsilon. The others ignore these settings, so the tab hides them.
BETAS_OPTIMIZERS = ("adamw", "adamw_8bit", "lion", "dadaptation", "prodigy")
EPSILON_OPTIMIZERS = ("adamw", "adamw_8bit", "dadaptation", "prodigy")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a family's UNet predicts (families.Family.prediction_type)
# methods whose saves each export their own files (named by the step; textual inversion replaces its file)
PER_SAVE_EXPORT_METHODS = tuple(m for m in METHODS if m != "textual_inversion")


def setting(default: Any, label: str, help: str, group: str, *, minimum: float | None = None,
            maximum: float | None = None, choices: Collection[str] | None = None, ui: bool = True,
            methods: tuple[str, ...] | None = None, optimizers: tuple[str, ...] | None = None,
            predictions: tuple[str, ...] | None = None, kind: str | None = None,
            check: Callable[[Any], str | None] | None = None, requires: tuple[str, tuple[str, ...]] | None = None
            ) -> Any:
    """A dataclass field with the metadata the UI, CLI and API are generated from.

    ``methods`` / ``optimizers`` / ``predictions`` (``PREDICTION_TYPES``): the training methods / optimizers / model
    prediction types the setting applies to (None: all); ``requires``: (another setting, the values of it it applies
    to), e.g. LoKr's to lora_type lokr. The tab hides a setting where it does not apply. ``kind``: the tab's control
    where the type does not say it (``"gpus"``: this machine's GPUs); ``check``: what is wrong with a value of the
    right type, or None.
    """
    meta = {"label": label, "help": help, "group": group, "min": minimum, "max": maximum, "choices": choices,
            "ui": ui, "methods": methods, "optimizers": optimizers, "predictions": predictions, "kind": kind,
            "check": check, "requires": requires}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Concept:
    """One thing to teach: instance images and prompt, optional class images for prior preservation, previews."""

    instance_data_dir: str = setting("", "Instance images folder", "Folder with the images of your subject.",
                                     "instance")
    instance_prompt: str = setting("", "Instance prompt",
                                   "Prompt for the instance images. [filewords] is replaced by each image's "
                                   "caption; the instance and class tokens are substituted into it.", "instance")
    instance_token: str = setting("", "Instance token", "The rare word that names your subject, e.g. 'ohwx'.",
                                  "instance")
    class_token: str = setting("", "Class token", "The word for the subject's class, e.g. 'dog'.", "instance")
    repeats: int = setting(1, "Repeats", "How often each instance image is seen per epoch.", "instance",
                           minimum=1, maximum=1000)
    class_data_dir: str = setting("", "Class images folder",
                                  "Folder for class (regularisation) images; empty uses the model dir's own.",
                                  "class")
    class_prompt: str = setting("", "Class prompt", "Prompt for generating and training on class images.",
                                "class")
    class_negative_prompt: str = setting("", "Class negative prompt", "Negative prompt for class image generation.",
                                         "class")
    num_class_images_per: int = setting(0, "Class images per instance image",
                                        "0 turns prior preservation off for this concept.", "class",
                                        minimum=0, maximum=1000)
    class_guidance_scale: float = setting(7.5, "Class guidance scale", "CFG scale when generating class images.",
                                          "class", minimum=1.0, maximum=30.0)
    class_infer_steps: int = setting(30, "Class generation steps", "Sampling steps per generated class image.",
                                     "class", minimum=1, maximum=200)
    sample_prompt: str = setting("", "Sample prompt", "Prompt for preview images; empty uses the instance prompt.",
                                 "samples")
    sample_negative_prompt: str = setting("", "Sample negative prompt", "Negative prompt for preview images.",
                                          "samples")
    sample_template_file: str = setting("", "Sample prompt template file",
                                        "A text file with one preview prompt per line.", "samples")
    n_samples: int = setting(1, "Number of samples", "Preview images per preview round.", "samples",
                             minimum=0, maximum=100)
    sample_seed: int = setting(-1, "Sample seed", "-1 picks a random seed each round.", "samples",
                               minimum=-1, maximum=2**32 - 1)
    sample_guidance_scale: float = setting(7.5, "Sample guidance scale", "CFG scale for previews.", "samples",
                                           minimum=1.0, maximum=30.0)
    sample_steps: int = setting(20, "Sample steps", "Sampling steps for previews.", "samples",
                                minimum=1, maximum=200)
    validation_data_dir: str = setting("", "Validation images folder", "Images that never train: their loss at each "
                                       "save goes to logs/validation.csv and the loss chart.", "validation")
    validation_holdout: int = setting(0, "Hold out N instance images for validation", "The same N instance images "
                                      "every run validate instead of training; 0: none.", "validation", minimum=0)


@dataclass
class TrainConfig:
    """Everything a training run needs besides the weights in ``working/``."""

    config_version: int = setting(CONFIG_VERSION, "Config version", "Schema version of this file.", "model",
                                  ui=False)
    model_name: str = setting("", "Model name", "Name of the model dir.", "model", ui=False)
    family: str = setting("sd1", "Model type", "SD 1.x, SD 2.x 512, SD 2.x 768-v or SDXL base.", "model",
                          choices=FAMILY_IDS, ui=False)
    source_checkpoint: str = setting("", "Source checkpoint", "The checkpoint this model was created from.",
                                     "model", ui=False)
    source_sha256: str = setting("", "Source hash", "sha256 of the source checkpoint file.", "model", ui=False)
    revision: int = setting(0, "Steps trained", "Total optimizer steps trained so far.", "model", minimum=0,
                            ui=False)
    epochs_trained: int = setting(0, "Epochs trained", "Total epochs trained so far.", "model", minimum=0,
                                  ui=False)

    method: str = setting("dreambooth", "Training method",
                          "dreambooth trains the model's own weights; lora trains a small add-on file for the WebUI's "
                          "Lora folder; textual_inversion trains a new word (an embedding file); hypernetwork trains a "
                          "WebUI hypernetwork (legacy). All but dreambooth leave the model unchanged. Choosing a "
                          "method gives the settings you have not changed its defaults (e.g. its learning rate).",
                          "method", choices=METHODS)
    method_defaults: str = setting("dreambooth", "Defaults of", "The method whose defaults the settings not changed by "
                                   "the user hold; when it is not the method, they get the method's defaults on "
                                   "load (train/methods: apply_method_defaults).", "method", choices=METHODS, ui=False)
    embedding_token: str = setting("", "Embedding word",
                                   "The new word to train, e.g. 'zwx-style' (lower case, no spaces); the embedding "
                                   "file gets this name and the WebUI triggers it by that name.", "embedding",
                                   methods=("textual_inversion",))
    embedding_vectors: int = setting(1, "Vectors per token", "More vectors hold more detail and use more of the "
                                     "75-token prompt.", "embedding", minimum=1, maximum=75,
                                     methods=("textual_inversion",))
    embedding_init_word: str = setting("*", "Initialization text", "Start from this word's embedding ('*' or empty: "
                                       "small random values).", "embedding", methods=("textual_inversion",))
    lora_type: str = setting("lora", "LoRA type", "lora: low-rank (LoCon with a conv rank); loha: Hadamard product of "
                             "two low-rank pairs; lokr: Kronecker product, tiny files; dora: LoRA with a trained "
                             "magnitude per input channel. The WebUI, ComfyUI and LyCORIS load all four.", "lora",
                             choices=LORA_TYPES, methods=("lora",))
    lora_rank: int = setting(16, "LoRA rank (network dim)", "Size of the LoRA; larger learns more, files get bigger.",
                             "lora", minimum=1, maximum=1024, methods=("lora",))
    lora_alpha: float = setting(8.0, "LoRA alpha",
                                "The LoRA's effect is scaled by alpha / rank (0 means alpha = rank).", "lora",
                                minimum=0.0, maximum=1024.0, methods=("lora",))
    lora_dropout: float = setting(0.0, "LoRA dropout", "Dropout on the LoRA path while training.", "lora",
                                  minimum=0.0, maximum=1.0, methods=("lora",))
    lora_conv_rank: int = setting(0, "Conv rank (LoCon)", "Also adapt the 3x3 convolutions with this rank (0 is off).",
                                  "lora", minimum=0, maximum=1024, methods=("lora",))
    lora_conv_alpha: float = setting(1.0, "Conv alpha", "Scale of the convolution adapters: conv alpha / conv rank.",
                                     "lora", minimum=0.0, maximum=1024.0, methods=("lora",))
    lora_lokr_factor: int = setting(-1, "LoKr factor", "Size limit of the small Kronecker factor of each side (LyCORIS "
                                    "'factor'); -1 splits as evenly as possible.", "lora", minimum=-1, maximum=1024,
                                    methods=("lora",), requires=("lora_type", ("lokr",)))
    lora_lokr_decompose_both: bool = setting(False, "LoKr: factorise both", "The small Kronecker factor low-rank too "
                                             "(LyCORIS 'decompose_both').", "lora", methods=("lora",),
                                             requires=("lora_type", ("lokr",)))
    lora_merge_export: bool = setting(False, "Also export a merged checkpoint",
                                      "At each save, also write a full checkpoint with the LoRA merged into the "
                                      "model's weights to the checkpoint folder (needs 'Export a checkpoint at each "
                                      "save'; in 'Checkpoint precision'). The model itself stays unchanged.", "lora",
                                      methods=("lora",))

    hypernetwork_layer_structure: str = setting("1, 2, 1", "Hypernetwork layer structure",
                                                "Layer widths as multiples of the context width, starting and ending "
                                                "with 1 (the WebUI's format), e.g. 1, 2, 1 or 1, 1.5, 1.5, 1.",
                                                "hypernetwork", methods=("hypernetwork",))
    hypernetwork_activation: str = setting("linear", "Hypernetwork activation",
                                           "Activation between the layers (linear: none). The WebUI's 'swish' is "
                                           "hard swish.", "hypernetwork", choices=HYPERNETWORK_ACTIVATIONS,
                                           methods=("hypernetwork",))
    hypernetwork_layer_norm: bool = setting(False, "Hypernetwork layer norm", "A LayerNorm after each layer.",
                                            "hypernetwork", methods=("hypernetwork",))
    hypernetwork_dropout: float = setting(0.0, "Hypernetwork dropout",
                                          "Dropout after each hidden layer while training (0 is off; 0.3 is the "
                                          "WebUI's value).", "hypernetwork", minimum=0.0, maximum=0.95,
                                          methods=("hypernetwork",))

    # intervals
    epochs: int = setting(100, "Training steps per image (epochs)",
                          "Each image is seen this many times (times its concept's repeats).", "intervals",
                          minimum=1, maximum=100000)
    pause_every_n_epochs: int = setting(0, "Pause after N epochs", "0 never pauses.", "intervals",
                                        minimum=0, maximum=100000)
    pause_seconds: float = setting(0.0, "Pause length (s)", "Seconds to pause, e.g. to let the GPU cool.",
                                   "intervals", minimum=0.0, maximum=3600.0)
    save_every_n_epochs: int = setting(25, "Save model every N epochs", "0 saves only at the end.", "intervals",
                                       minimum=0, maximum=100000)
    preview_every_n_epochs: int = setting(5, "Save previews every N epochs", "0 makes no previews.", "intervals",
                                          minimum=0, maximum=100000)
    save_on_cancel: bool = setting(True, "Save on cancel", "Save the model when training is cancelled.",
                                   "intervals")

    # batching
    train_batch_size: int = setting(1, "Batch size", "Images per step.", "batching", minimum=1, maximum=256)
    gradient_accumulation_steps: int = setting(1, "Gradient accumulation steps",
                                               "Steps whose gradients are summed before one optimizer update.",
                                               "batching", minimum=1, maximum=1024)
    gpus: str = setting("", "GPUs", "The GPUs to train on. Two or more train data-parallel, one process per GPU, "
                        "each with the batch size above: the global batch is batch size x GPUs x gradient accumulation"
                        ", and the steps count that global batch. Empty: the default GPU.", "batching", kind="gpus",
                        check=gpus_problem)
    oom_retry_smaller_batch: bool = setting(False, "On out of memory, retry with a smaller batch",
                                            "When a step runs out of memory with a batch above 1, halve the batch "
                                            "and double the gradient accumulation (same effective batch) and go on "
                                            "from that step, instead of stopping.", "batching")
    gradient_checkpointing: bool = setting(True, "Gradient checkpointing",
                                           "Recompute activations in backward: much less memory, ~20% slower.",
                                           "batching")
    set_grads_to_none: bool = setting(True, "Set gradients to None",
                                      "Free gradient memory between steps instead of zeroing it.", "batching")
    max_grad_norm: float = setting(1.0, "Max gradient norm", "Clip gradients to this norm; 0 turns clipping off.",
                                   "batching", minimum=0.0, maximum=1000.0)

    # learning rate and optimizer
    learning_rate: float = setting(2e-6, "Learning rate", "Learning rate of what trains: the UNet (LoRA: its UNet "
                                   "part), the word's vectors, the hypernetwork. Each method has its own default.",
                                   "learning_rate", minimum=0.0, maximum=1.0)
    text_encoder_learning_rate: float = setting(1e-6, "Text encoder learning rate",
                                                "Learning rate of the text encoder(s) while they train.",
                                                "learning_rate", minimum=0.0, maximum=1.0,
                                                methods=WEIGHT_METHODS)
    lr_scheduler: str = setting("constant_with_warmup", "Learning rate scheduler", "How the LR changes over steps.",
                                "learning_rate", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(0, "Warmup steps", "Steps of linear warmup from 0.", "learning_rate",
                                   minimum=0, maximum=1000000)
    lr_cycles: int = setting(1, "Cosine restarts (cycles)", "Cycles of cosine_with_restarts.", "learning_rate",
                             minimum=1, maximum=1000)
    lr_power: float = setting(1.0, "Polynomial power", "Power of the polynomial decay.", "learning_rate",
                              minimum=0.0, maximum=10.0)
    optimizer: str = setting("adamw", "Optimizer", "8-bit AdamW needs bitsandbytes; DAdaptation and Prodigy need "
                             "their packages.", "learning_rate", choices=OPTIMIZERS)
    weight_decay: float = setting(1e-2, "Weight decay", "Decoupled weight decay.", "learning_rate",
                                  minimum=0.0, maximum=1.0)
    adam_beta1: float = setting(0.9, "Adam beta1", "First-moment decay (Lion: how much of the gradient the update "
                                "direction takes in).", "learning_rate", minimum=0.0, maximum=1.0,
                                optimizers=BETAS_OPTIMIZERS)
    adam_beta2: float = setting(0.999, "Adam beta2", "Second-moment decay (Lion: the momentum's decay).",
                                "learning_rate", minimum=0.0, maximum=1.0, optimizers=BETAS_OPTIMIZERS)
    adam_epsilon: float = setting(1e-8, "Adam epsilon", "Numerical floor of the denominator.", "learning_rate",
                                  minimum=0.0, maximum=1.0, optimizers=EPSILON_OPTIMIZERS)

    # performance and memory
    mixed_precision: str = setting("fp16", "Mixed precision", "bf16 needs an Ampere or newer GPU.", "performance",
                                   choices=MIXED_PRECISION)
    attention: str = setting("auto", "Memory attention",
                             "auto follows the WebUI's own choice (xformers / SDP / default).", "performance",
                             choices=ATTENTION)
    cache_latents: bool = setting(True, "Cache latents", "Encode each image once with the VAE and reuse it.",
                                  "performance")
    train_unet: bool = setting(True, "Train UNet", "Off trains only the text encoder.", "performance",
                               methods=WEIGHT_METHODS)
    text_encoder_ratio: float = setting(0.0, "Text encoder step ratio",
                                        "Train the text encoder(s) for this fraction of the steps (0 = never).",
                                        "performance", minimum=0.0, maximum=1.0, methods=WEIGHT_METHODS)
    use_ema: bool = setting(False, "EMA", "Keep an exponential moving average of the UNet weights.", "performance",
                            methods=("dreambooth",))
    ema_decay: float = setting(0.9999, "EMA decay", "Weight of the old average at each step.", "performance",
                               minimum=0.0, maximum=1.0, methods=("dreambooth",))
    seed: int = setting(1234, "Seed", "Seed for noise, timesteps and data order.", "performance",
                        minimum=0, maximum=2**32 - 1)
    cache_text_embeddings: bool = setting(True, "Cache text embeddings",
                                          "While the text encoder(s) are frozen, encode each distinct prompt once "
                                          "and reuse it: saves the text encoder's forward pass every step, costs a "
                                          "little memory per distinct prompt.", "performance")
    offload_frozen_models: bool = setting(False, "Offload VAE and frozen text encoders",
                                          "When latents and text embeddings are cached, keep the VAE and frozen text "
                                          "encoder(s) in RAM during training steps (moved back for previews): saves "
                                          "their VRAM (~0.4 GB SD 1.5, ~1.7 GB SDXL), costs a slower setup and "
                                          "previews.", "performance")
    channels_last: bool = setting(False, "Channels-last UNet",
                                  "Keep the UNet and latents in channels-last memory format: faster convolutions "
                                  "on tensor-core GPUs, no memory cost.", "performance")
    weight_precision: str = setting("fp32", "Weight precision",
                                    "fp32 keeps the weights in 32 bits. bf16_master stores them in bf16 and the "
                                    "optimizer updates an fp32 master copy (saves activation and frozen-model "
                                    "memory, same trainable-weight memory). bf16_stochastic keeps only bf16 weights "
                                    "and rounds each update stochastically (half the weight memory, a little "
                                    "noisier). bf16 needs bf16 mixed precision and a GPU that supports it.",
                                    "performance", choices=WEIGHT_PRECISIONS, methods=WEIGHT_METHODS)
    fused_backward_step: bool = setting(False, "Optimizer step in backward",
                                        "Update each weight as soon as its gradient is ready and free the gradient at "
                                        "once: no full gradient buffer (saves the size of the trained weights again). "
                                        "Needs gradient accumulation 1, max gradient norm 0 (no global clipping) and "
                                        "no fp16 mixed precision on a GPU.", "performance")
    compile_unet: bool = setting(False, "Compile the UNet (torch.compile)",
                                 "Compile the UNet's forward: faster steps after a slow first step (minutes), more "
                                 "setup time; falls back to the plain UNet where compiling fails.", "performance")

    # image processing and prompts
    resolution: int = setting(0, "Max resolution", "Longest bucket side in pixels; 0 uses the model's native one.",
                              "images", minimum=0, maximum=4096)
    enable_buckets: bool = setting(True, "Aspect ratio buckets",
                                   "Train each image near its own aspect ratio instead of a square crop.", "images")
    hflip: bool = setting(False, "Horizontal flip", "Randomly mirror images.", "images")
    shuffle_tags: bool = setting(False, "Shuffle tags", "Shuffle comma-separated caption tags each step.", "images")
    keep_tokens: int = setting(0, "Keep N tokens", "Leading caption tags kept in place when shuffling.", "images",
                               minimum=0, maximum=75)
    caption_dropout: float = setting(0.0, "Caption dropout", "Chance an instance image trains with an empty prompt "
                                     "(helps guidance); 0 is off, 0.05-0.1 usual.", "images", minimum=0.0, maximum=1.0)
    caption_tag_dropout: float = setting(0.0, "Tag dropout", "Chance each tag after the first 'Keep N tokens' is left "
                                         "out in a step; 0 is off.", "images", minimum=0.0, maximum=1.0)
    long_prompts: str = setting("truncate", "Prompts over 75 tokens",
                                "truncate (with a warning) or chunk into 75-token windows like the WebUI.", "images",
                                choices=LONG_PROMPTS)

    # loss and text encoder
    prior_loss_weight: float = setting(1.0, "Prior loss weight", "Weight of the class-image loss.", "loss",
                                       minimum=0.0, maximum=100.0)
    offset_noise: float = setting(0.0, "Offset noise", "Adds per-channel noise offsets: darker darks, brighter "
                                  "brights. 0 is off; 0.05-0.1 is usual.", "loss", minimum=0.0, maximum=1.0)
    min_snr_gamma: float = setting(0.0, "Min-SNR gamma", "Min-SNR loss weighting; 0 is off, 5 is usual.", "loss",
                                   minimum=0.0, maximum=100.0)
    debiased_estimation: bool = setting(False, "Debiased estimation loss", "Weight each example by 1/sqrt(SNR) "
                                        "(v: 1/(SNR+1)), as kohya: less on nearly clean timesteps.", "loss")
    masked_loss: bool = setting(False, "Masked loss", "Train only where name.mask.png (beside name.png, or in masks/) "
                                "or the image's alpha is white; unmasked images train everywhere.", "loss")
    pyramid_noise_iterations: int = setting(0, "Multi-resolution noise iterations", "Pyramid noise levels (like offset "
                                            "noise: dark/bright areas); 0 is off, 6-10 usual.", "loss", minimum=0,
                                            maximum=16)
    pyramid_noise_discount: float = setting(0.3, "Multi-resolution noise discount", "Strength of each coarser level "
                                            "relative to the one before.", "loss", minimum=0.0, maximum=1.0)
    input_perturbation: float = setting(0.0, "Input perturbation", "Extra noise on the UNet's input only (less "
                                        "exposure bias); 0 is off, 0.1 usual.", "loss", minimum=0.0, maximum=1.0)
    zero_terminal_snr: bool = setting(False, "Zero terminal SNR", "Rescale the schedule so its last step is pure noise "
                                      "(v-prediction only; sample with the WebUI's 'Zero Terminal SNR').", "loss",
                                      predictions=("v_prediction",))
    freeze_clip_normalization: bool = setting(False, "Freeze CLIP normalization layers",
                                              "Keep the text encoder's LayerNorms fixed while it trains.", "loss",
                                              methods=("dreambooth",))
    clip_skip: int = setting(1, "Clip skip", "Use the output of the N-th last text encoder layer (1 = last).",
                             "loss", minimum=1, maximum=12)

    # saving
    save_checkpoint: bool = setting(True, "Export a checkpoint at each save",
                                    "Write a .safetensors the WebUI can load.", "saving")
    export_dtype: str = setting("fp16", "Checkpoint precision", "fp16 halves the file size.", "saving",
                                choices=EXPORT_DTYPES)
    export_ema: bool = setting(False, "Export EMA weights", "Write the EMA UNet as the checkpoint's UNet.", "saving",
                               methods=("dreambooth",))
    keep_resume_states: int = setting(2, "Resume states to keep", "Older resume states are deleted.", "saving",
                                      minimum=1, maximum=100)
    sample_scheduler: str = setting("dpmpp_2m", "Preview scheduler", "Sampler for previews and class images.",
                                    "saving", choices=SAMPLE_SCHEDULERS)

    # validation (the set itself is per concept)
    keep_best_saves: int = setting(0, "Keep the best N saves", "Delete the exports of all but the N saves with the "
                                   "lowest validation loss; 0 keeps all.", "validation", minimum=0,
                                   methods=PER_SAVE_EXPORT_METHODS)
    early_stop_saves: int = setting(0, "Stop when validation loss has not improved for K saves", "End the run after K "
                                    "saves without a new lowest validation loss; 0: never.", "validation", minimum=0)

    concepts: list[Concept] = field(default_factory=list, metadata={"label": "Concepts", "help": "", "group": "",
                                                                    "ui": False})
    concepts_list_file: str = setting("", "Concepts list file",
                                      "A JSON file with a list of concepts that replaces the panels.", "concepts")
    unknown: dict[str, Any] = field(default_factory=dict, metadata={"label": "", "help": "", "group": "",
                                                                    "ui": False})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        unknown = data.pop("unknown")
        data.update(unknown)  # written back as they came, so nothing is lost
        return data

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / CONFIG_FILE
        write_json(path, self.to_dict())
        return path


# ----------------------------------------------------------------------------------------------------------------
# metadata for the UI, CLI and API


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: type
    default: Any
    label: str
    help: str
    group: str
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...] | None
    ui: bool
    methods: tuple[str, ...] | None = None  # the training methods it applies to; None: all
    optimizers: tuple[str, ...] | None = None  # the optimizers that read it; None: all
    predictions: tuple[str, ...] | None = None  # the model prediction types it works with; None: all
    kind: str | None = None  # the tab's control where the type does not say it (see ``setting``)
    check: Callable[[Any], str | None] | None = None  # what is wrong with a value of the right type
    requires: tuple[str, tuple[str, ...]] | None = None  # (another setting, its values it applies to); None: any

    def applies(self, method: str, optimizer: str | None = None, values: Mapping[str, Any] | None = None,
                prediction: str | None = None) -> bool:
        """Whether the setting has an effect with this method, optimizer, other ``values`` and model prediction
        type (None / absent: any)."""
        return ((self.methods is None or method in self.methods)
                and (optimizer is None or self.optimizers is None or optimizer in self.optimizers)
                and (self.requires is None or (values or {}).get(self.requires[0], self.requires[1][0])
                     in self.requires[1])
                and (prediction is None or self.predictions is None or prediction in self.predictions))


def field_specs(cls: type = TrainConfig) -> list[FieldSpec]:
    """Every plain setting of ``cls`` (TrainConfig or Concept) with its metadata, in declaration order."""
    specs = []
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("concepts", "unknown"):
            continue
        m = f.metadata
        choices = tuple(m["choices"]) if m["choices"] is not None else None  # METHODS grows when one registers
        specs.append(FieldSpec(f.name, types[f.name], f.default, m["label"], m["help"], m["group"], m["min"],
                               m["max"], choices, m["ui"], m.get("methods"), m.get("optimizers"),
                               m.get("predictions"), m.get("kind"), m.get("check"), m.get("requires")))
    return specs


def applies_to(name: str, method: str) -> bool:
    """Whether the setting ``name`` of TrainConfig applies to the training method ``method``."""
    methods = next(f.metadata.get("methods") for f in dataclasses.fields(TrainConfig) if f.name == name)
    return methods is None or method in methods


def check_applies(cfg: TrainConfig, name: str, off: Any) -> None:
    """Refuse the setting ``name`` set to something other than ``off`` when it does not apply to the method or to
    the model's prediction type."""
    if getattr(cfg, name) == off:
        return
    spec = next(s for s in field_specs() if s.name == name)
    if not applies_to(name, cfg.method):
        methods = " and ".join(m.replace("_", " ") for m in spec.methods or ())
        raise UserError(f"{spec.label.lower()} {getattr(cfg, name)} applies to {methods} training",
                        f"set {spec.label.lower()} to {off} for {cfg.method.replace('_', ' ')}")
    if not spec.applies(cfg.method, prediction=(prediction := FAMILIES[cfg.family].prediction_type)):
        raise UserError(f"{spec.label.lower()} needs a v-prediction model; {FAMILIES[cfg.family].label} predicts "
                        f"{prediction.replace('_', '-')}", f"turn {spec.label.lower()} off, or train an SD 2.x 768-v")


def _field_types(cls: type) -> dict[str, type]:
    names = {"int": int, "float": float, "bool": bool, "str": str}
    return {f.name: names.get(str(f.type), object) for f in dataclasses.fields(cls)}


# ----------------------------------------------------------------------------------------------------------------
# validation and migration


# reading a config (validating and migrating it) lives in config_load; its names stay importable from here
from .config_load import (  # noqa: E402 - it imports the settings above
    coerce,
    concept_from_dict,
    config_from_dict,
    load_concepts_file,
    load_config,
    resolve_concepts,
    save_progress,
)

__all__ = ["coerce", "concept_from_dict", "config_from_dict", "load_concepts_file", "load_config",
           "resolve_concepts", "save_progress"]
