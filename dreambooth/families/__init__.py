"""Model families: SD 1.x, SD 2.x (512 epsilon / 768 v-prediction) and SDXL base."""

from __future__ import annotations

from dataclasses import dataclass

SD1 = "sd1"
SD2 = "sd2"  # SD 2.x 512 px, epsilon prediction
SD2V = "sd2v"  # SD 2.x 768 px, v-prediction
SDXL = "sdxl"
FAMILY_IDS = (SD1, SD2, SD2V, SDXL)


@dataclass(frozen=True)
class Family:
    id: str
    label: str
    components: tuple[str, ...]  # diffusers components holding weights
    tokenizers: tuple[str, ...]
    prediction_type: str  # "epsilon" or "v_prediction"
    resolution: int
    latent_scale: float
    modelspec_architecture: str

    @property
    def assets_dir(self) -> str:
        """Folder under ``dreambooth/assets/families`` with the shipped configs (sd2 and sd2v share one)."""
        return SD2 if self.id == SD2V else self.id


FAMILIES: dict[str, Family] = {
    SD1: Family(SD1, "SD 1.x", ("unet", "vae", "text_encoder"), ("tokenizer",), "epsilon", 512, 0.18215,
                "stable-diffusion-v1"),
    SD2: Family(SD2, "SD 2.x 512 (epsilon)", ("unet", "vae", "text_encoder"), ("tokenizer",), "epsilon", 512,
                0.18215, "stable-diffusion-v2-512"),
    SD2V: Family(SD2V, "SD 2.x 768 (v-prediction)", ("unet", "vae", "text_encoder"), ("tokenizer",), "v_prediction",
                 768, 0.18215, "stable-diffusion-v2-768-v"),
    SDXL: Family(SDXL, "SDXL base", ("unet", "vae", "text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
                 "epsilon", 1024, 0.13025, "stable-diffusion-xl-v1-base"),
}


def get_family(family_id: str) -> Family:
    try:
        return FAMILIES[family_id]
    except KeyError:
        from ..errors import UserError

        raise UserError(f"unknown model family {family_id!r}", f"use one of: {', '.join(FAMILY_IDS)}") from None
