"""What a benchmark run measures: the configurations, the profiles run on each, and the targets of issue 7."""

from __future__ import annotations

from dataclasses import dataclass

from dreambooth.profiles import PROFILES

FAMILY_NAMES = {"sd1": "sd15", "sd2v": "sd21v", "sdxl": "sdxl"}  # dreambooth family id -> name in the table

OURS_PROFILES = ("ours-default", "ours-lowmem", "ours-8gb", "ours-fast")
OURS_TAB_PROFILES = {"ours-lowmem": "fits in 6 GB", "ours-8gb": "fits in 8 GB", "ours-fast": "fastest"}
BASELINE_VARIANTS = ("baseline-default", "baseline-lowmem")
LIKE_PREFIX = "baseline-as-"  # baseline-as-ours-lowmem: the recipe with ours-lowmem's checkpointing, precision, optim.


@dataclass(frozen=True)
class Case:
    """One configuration: model family x method x resolution x batch, and the profiles to run on it."""

    family: str  # sd1 | sd2v | sdxl
    method: str  # dreambooth (full UNet) | lora
    resolution: int
    batch: int
    profiles: tuple[str, ...]
    lora_rank: int = 32
    memory_only: bool = False  # no timed steps: the tracked step's memory is all this case is for

    @property
    def key(self) -> str:
        method = f"lora-r{self.lora_rank}" if self.method == "lora" else "dreambooth"
        return f"{FAMILY_NAMES[self.family]}/{method}/{self.resolution}/b{self.batch}"


ALL = OURS_PROFILES + BASELINE_VARIANTS
LOW = ("ours-lowmem", "baseline-lowmem")


@dataclass(frozen=True)
class Matrix:
    size: str  # tiny | full
    cases: tuple[Case, ...]
    isolate: bool = False  # each row in a process of its own (full-size models on the CPU: memory comes back)
    images_per_slot: int = 2  # images per batch slot: an epoch is this many steps (the latent cache fills in one)


MATRICES: dict[str, Matrix] = {
    # tiny models on the CPU: the sentinel that the harness and both loops work (numbers say nothing about GPUs)
    "cpu-smoke": Matrix("tiny", (
        Case("sd1", "dreambooth", 64, 1, ("ours-default", "ours-lowmem", "baseline-default", "baseline-lowmem")),
        Case("sd1", "lora", 64, 1, ("ours-default", "baseline-default"), lora_rank=4),
    )),
    "cpu": Matrix("tiny", tuple(Case(f, m, 64, b, ALL, lora_rank=4)
                                for f in ("sd1", "sd2v", "sdxl") for m in ("dreambooth", "lora") for b in (1, 2))),
    # the full-size architectures on the CPU: real memory per profile (256 px, and 384 px for the fit of the
    # estimate's activations, memory only: one row per activation class), and speed against the recipe at 256 px;
    # SDXL LoRA at 256 px
    "cpu-full": Matrix("full", (
        Case("sd1", "dreambooth", 256, 1, ALL),
        Case("sd1", "dreambooth", 384, 1, ("ours-default", "ours-lowmem", "ours-fast"), memory_only=True),
        Case("sd1", "lora", 256, 1, ALL),
        Case("sd1", "lora", 384, 1, ("ours-default", "ours-lowmem", "ours-fast"), memory_only=True),
        Case("sdxl", "lora", 256, 1, ("ours-lowmem", "baseline-lowmem")),
    ), isolate=True, images_per_slot=1),
    # full-size architectures with random weights; covers every target of the issue
    "gpu": Matrix("full", (
        Case("sd1", "dreambooth", 512, 1, ALL),
        Case("sd1", "lora", 512, 1, ALL),
        Case("sd1", "dreambooth", 512, 8, ("ours-default", "ours-fast", "baseline-default")),
        Case("sd2v", "dreambooth", 768, 1, ("ours-default",) + LOW),
        Case("sd2v", "lora", 768, 1, LOW),
        Case("sdxl", "lora", 1024, 1, ("ours-default",) + LOW),
        Case("sdxl", "dreambooth", 1024, 1, LOW),
    )),
}


def profile_overrides(profile: str, *, eight_bit: bool, compile_unet: bool) -> dict[str, object]:
    """The TrainConfig settings a profile of ours sets (on top of the harness's own, see ``ours.py``): the tab's
    memory profiles (``dreambooth/profiles.py``) as they are, less the batch size, which each case sets.

    ``eight_bit``: bitsandbytes works on this device (else lowmem uses torch AdamW and the row says so).
    """
    if profile == "ours-default":
        return {}
    if profile not in OURS_TAB_PROFILES:
        raise ValueError(f"unknown profile {profile!r}")
    overrides = {k: v for k, v in PROFILES[OURS_TAB_PROFILES[profile]].settings.items() if k != "train_batch_size"}
    if overrides.get("optimizer") == "adamw_8bit" and not eight_bit:
        overrides["optimizer"] = "adamw"
    if "compile_unet" in overrides:
        overrides["compile_unet"] = compile_unet
    return overrides


def wants_eight_bit(profile: str) -> bool:
    """Whether the tab profile a row of ours runs picks 8-bit AdamW (which runs only where bitsandbytes can)."""
    return PROFILES.get(OURS_TAB_PROFILES.get(profile, ""), None) is not None and \
        PROFILES[OURS_TAB_PROFILES[profile]].settings.get("optimizer") == "adamw_8bit"


@dataclass(frozen=True)
class Target:
    """A figure the issue asks for: ``metric`` of ``profile`` on ``case_key`` against ``threshold``."""

    name: str
    case_key: str
    profile: str
    metric: str  # peak_allocated_bytes | samples_per_s_ratio | mfu
    threshold: float
    at_most: bool  # True: value <= threshold passes; False: value >= threshold passes
    versus: str | None = None  # for a ratio: the baseline row it is taken against


TARGETS: tuple[Target, ...] = (
    Target("SD1.5 DreamBooth 512 b1: peak allocated <= 6 GB", "sd15/dreambooth/512/b1", "ours-lowmem",
           "peak_allocated_bytes", 6e9, True),
    Target("SD1.5 DreamBooth 512 b1: samples/s >= 1.5x baseline lowest-memory", "sd15/dreambooth/512/b1",
           "ours-lowmem", "samples_per_s_ratio", 1.5, False, versus="baseline-lowmem"),
    Target("SD1.5 LoRA r32 512 b1: peak allocated <= 3.5 GB", "sd15/lora-r32/512/b1", "ours-lowmem",
           "peak_allocated_bytes", 3.5e9, True),
    Target("SD1.5 DreamBooth 512 b8: MFU >= 30%", "sd15/dreambooth/512/b8", "ours-fast", "mfu", 0.30, False),
    Target("SDXL LoRA r32 1024 b1: peak allocated <= 8 GB", "sdxl/lora-r32/1024/b1", "ours-lowmem",
           "peak_allocated_bytes", 8e9, True),
)
