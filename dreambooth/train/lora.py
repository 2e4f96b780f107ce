"""LoRA (LoCon, LoHa, LoKr, DoRA) as a network of adapters on the UNet and the text encoder(s), saved the way kohya's
sd-scripts (plain LoRA) and LyCORIS (the other types) save them, so that the WebUI's built-in Lora extension, ComfyUI
and diffusers load our files. The adapter of each type is in ``train/adapters.py``.

What is adapted follows kohya's ``networks/lora.py``:

- UNet: every ``nn.Linear`` and 1x1 ``nn.Conv2d`` inside a ``Transformer2DModel`` (``proj_in``, ``proj_out`` and the
  ``attn1``/``attn2`` ``to_q/to_k/to_v/to_out.0``, ``ff.net.0.proj``, ``ff.net.2`` of every transformer block).
  With ``conv_rank > 0`` (LoCon) also the children of ``ResnetBlock2D``/``Downsample2D``/``Upsample2D``: the 3x3
  convs (``conv1``, ``conv2``, the down/upsampler ``conv``) with ``conv_rank``/``conv_alpha``, and, as kohya does,
  their Linear and 1x1 convs (``time_emb_proj``, ``conv_shortcut``) with ``rank``/``alpha``.
- Text encoder(s): the Linear layers of ``CLIPAttention`` (``q/k/v/out_proj``) and ``CLIPMLP`` (``fc1``, ``fc2``).

The adapted layers are wrapped with forward hooks, never copied and never changed: for plain LoRA
``y = base(x) + up(down(dropout(x))) * multiplier * alpha / rank``. ``lora_down`` starts kaiming-uniform
(a=sqrt(5)) and ``lora_up`` at zero, so a fresh network changes nothing (every type starts so).
:meth:`LoraNetwork.remove` takes the hooks off and gives the models back exactly as they were.

Key names are kohya's: ``lora_unet_<module path with _>`` and ``lora_te_<module path with _>`` (SDXL:
``lora_te1_``/``lora_te2_``), each with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (the other types:
their own suffixes, see ``adapters.py``). SD 1.x/2.x UNet
paths are the diffusers ones (the WebUI converts them); SDXL UNet paths are the sgm ones (``input_blocks_4_1_...``),
as kohya's SDXL trainer writes them and as the WebUI looks them up directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..config import LORA_TYPES
from ..errors import UserError
from ..families import SD1, SD2, SD2V, SDXL, get_family
from ..families.keys_unet import SD_UNET, SDXL_UNET, unet_key_map
from ..working import save_tensors
from .adapters import Adapter, Shared, make_adapter

if TYPE_CHECKING:
    from ..config import TrainConfig

log = logging.getLogger(__name__)

PARTS = ("unet", "text_encoder")
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# transformers renamed its attention classes over time (4.3x: CLIPSdpaAttention / CLIPFlashAttention2; 5: one class)
TEXT_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")

NETWORK_MODULE = "networks.lora"  # kohya's module for plain LoRA / LoCon
LYCORIS_MODULE = "lycoris.kohya"  # LyCORIS's module for kohya's trainer: the other types
BASE_MODEL_VERSION = {SD1: "sd_v1", SD2: "sd_v2", SD2V: "sd_v2_v", SDXL: "sdxl_base_v1-0"}
MODELSPEC_VERSION = "1.0.0"
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"


@dataclass
class LoraSettings:
    rank: int = 16  # network dim
    alpha: float = 16.0  # effective scale = alpha / rank, exactly as kohya and the WebUI apply it (0: alpha = rank)
    dropout: float = 0.0  # dropout on the input of the LoRA path, while training
    conv_rank: int = 0  # >0: LoCon, also adapt the 3x3 convs (resnets, down/upsamplers) with this rank
    conv_alpha: float = 1.0  # (0: conv_alpha = conv_rank)
    train_unet: bool = True
    train_text_encoder: bool = True
    type: str = "lora"  # config.LORA_TYPES: lora (LoCon), loha, lokr, dora
    lokr_factor: int = -1  # LoKr: how each side splits into the Kronecker factors (-1: as evenly as possible)
    lokr_decompose_both: bool = False  # LoKr: the small factor low-rank too

    def __post_init__(self) -> None:
        if self.type not in LORA_TYPES:
            raise UserError(f"unknown LoRA type {self.type!r}", f"pick one of: {', '.join(LORA_TYPES)}")
        if not isinstance(self.lokr_factor, int) or isinstance(self.lokr_factor, bool) or not (
                self.lokr_factor == -1 or self.lokr_factor >= 1):
            raise UserError(f"LoKr factor must be -1 or a whole number >= 1, not {self.lokr_factor!r}",
                            "-1 splits each layer as evenly as possible")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise UserError(f"LoRA rank must be a whole number >= 1, not {self.rank!r}")
        if not isinstance(self.conv_rank, int) or isinstance(self.conv_rank, bool) or self.conv_rank < 0:
            raise UserError(f"LoRA conv rank must be a whole number >= 0, not {self.conv_rank!r}",
                            "0 turns LoCon off")
        for name in ("alpha", "conv_alpha"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise UserError(f"LoRA {name.replace('_', ' ')} must be a number >= 0, not {value!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), not {self.dropout!r}")
        if not (self.train_unet or self.train_text_encoder):
            raise UserError("a LoRA must train the UNet, the text encoder or both")

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, train_text_encoder: bool) -> LoraSettings:
        return cls(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, conv_rank=cfg.lora_conv_rank,
                   conv_alpha=cfg.lora_conv_alpha, train_unet=cfg.train_unet, train_text_encoder=train_text_encoder,
                   type=cfg.lora_type, lokr_factor=cfg.lora_lokr_factor,
                   lokr_decompose_both=cfg.lora_lokr_decompose_both)

    @property
    def effective_alpha(self) -> float:
        """kohya: an alpha of 0 (or none) means alpha = rank, i.e. a scale of 1."""
        return float(self.alpha) if self.alpha else float(self.rank)

    @property
    def effective_conv_alpha(self) -> float:
        return float(self.conv_alpha) if self.conv_alpha else float(self.conv_rank)


@cache
def _sgm_unet_modules(sdxl: bool) -> dict[str, str]:
    """diffusers UNet module path -> ldm/sgm module path, from the UNet key map."""
    out = {}
    for m in unet_key_map(SDXL_UNET if sdxl else SD_UNET):
        if m.ldm.endswith(".weight") and len(m.diffusers) == 1 and m.diffusers[0].endswith(".weight"):
            out[m.diffusers[0][: -len(".weight")]] = m.ldm[: -len(".weight")]
    return out


def _roots(models_or_modules: Any, family: str) -> dict[str, nn.Module]:
    """``Models`` (unet, text_encoders) or a mapping {unet, text_encoder, text_encoder_2: module}."""
    if hasattr(models_or_modules, "unet") and hasattr(models_or_modules, "text_encoders"):
        roots = {"unet": models_or_modules.unet}
        roots.update(zip(TEXT_COMPONENTS, models_or_modules.text_encoders, strict=False))
    elif isinstance(models_or_modules, Mapping):
        roots = dict(models_or_modules)
    else:
        raise TypeError("LoraNetwork needs a Models object or a mapping of component name to module")
    allowed = {"unet", *(c for c in TEXT_COMPONENTS if c in get_family(family).components)}
    stray = set(roots) - allowed
    if stray:
        raise ValueError(f"components {sorted(stray)} are not part of a {get_family(family).label} model "
                         f"(expected some of {sorted(allowed)})")
    for name, module in roots.items():
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name} is not a torch module")
    return roots


def _child_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Children (recursive) with one name each; an alias (diffusers' ``Conv2d_0`` for ``conv``) loses to the
    canonical name."""
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, child in module.named_modules(remove_duplicate=False):
        known = found.get(id(child))
        if known is None or known[0].rsplit(".", 1)[-1] == "Conv2d_0":
            found[id(child)] = (name, child)
    yield from found.values()


def _text_path(path: str) -> str:
    # transformers >= 5 CLIPTextModel has no text_model level; the key names (ours, kohya's) always have it
    return "text_model." + path if path.startswith(("encoder.", "embeddings.", "final_layer_norm")) else path


def lora_prefix(component: str, family: str) -> str:
    if component == "unet":
        return "lora_unet_"
    if family == SDXL:
        return "lora_te1_" if component == "text_encoder" else "lora_te2_"
    return "lora_te_"


def _targets(component: str, root: nn.Module, settings: LoraSettings,
             family: str) -> Iterator[tuple[str, nn.Module, int, float]]:
    """(kohya name, layer, rank, alpha) of every layer to adapt, in module order."""
    prefix = lora_prefix(component, family)
    seen: set[int] = set()
    if component == "unet":
        classes = UNET_TARGETS + (UNET_CONV_TARGETS if settings.conv_rank else ())
    else:
        classes = TEXT_TARGETS
    sgm = _sgm_unet_modules(True) if component == "unet" and family == SDXL else None
    for parent_name, parent in root.named_modules():
        if type(parent).__name__ not in classes:
            continue
        for child_name, child in _child_modules(parent):
            if id(child) in seen:
                continue
            if isinstance(child, nn.Linear) or (isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)):
                rank, alpha = settings.rank, settings.effective_alpha
            elif isinstance(child, nn.Conv2d) and settings.conv_rank:
                rank, alpha = settings.conv_rank, settings.effective_conv_alpha
            else:
                continue
            if isinstance(child, nn.Conv2d) and child.groups != 1:
                log.warning("not adapting %s.%s: grouped convolutions are not supported", parent_name, child_name)
                continue
            seen.add(id(child))
            path = f"{parent_name}.{child_name}" if child_name else parent_name
            if component == "unet":
                if sgm is not None:
                    if path not in sgm:
                        raise ValueError(f"the SDXL UNet has a layer {path} that is not in the sgm layout")
                    path = sgm[path]
            else:
                path = _text_path(path)
            yield prefix + path.replace(".", "_"), child, rank, alpha


class LoraNetwork(nn.Module):
    """Adapters of one LoRA type (``settings.type``) on the target layers of the UNet and text encoder(s) of one model.

    ``models_or_modules``: a :class:`~dreambooth.train.models.Models` or a mapping ``{"unet": ...,
    "text_encoder": ..., "text_encoder_2": ...}``. Every module given is frozen (``requires_grad=False``; the old
    flags come back with :meth:`remove`); only the LoRA weights train. The LoRA weights are created in ``dtype``
    (fp32 by default) on the device of the layer they adapt; a network moves with ``.to()``, like any module, and
    must be on the models' device. The hooks cast the layer input to the LoRA dtype and the result back to the
    layer's output dtype. Dropout is active only while the network and the adapted model are both in train mode
    (so ``unet.eval()`` for previews turns it off).
    """

    def __init__(self, models_or_modules: Any, settings: LoraSettings, family: str, *,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.family = get_family(family).id
        self.settings = settings
        self._shared = Shared()
        roots = _roots(models_or_modules, self.family)
        self._parts: dict[str, list[str]] = {p: [] for p in PARTS}
        self._layers: dict[str, nn.Module] = {}  # kohya name -> adapted layer (plain dict: not registered)
        self._handles: list[Any] = []
        for component, root in roots.items():
            part = "unet" if component == "unet" else "text_encoder"
            if not (settings.train_unet if part == "unet" else settings.train_text_encoder):
                continue
            for name, layer, rank, alpha in _targets(component, root, settings, self.family):
                if name in self._layers:
                    raise ValueError(f"two layers map to the LoRA name {name}")
                _refuse_double_wrap(name, layer)
                self.add_module(name, make_adapter(settings.type, name, layer, rank, alpha, settings.dropout,
                                                   self._shared, dtype, settings.lokr_factor,
                                                   settings.lokr_decompose_both))
                self._layers[name] = layer
                self._parts[part].append(name)
        if not self._layers:
            raise UserError("no layer to adapt was found for the LoRA",
                            "check that the model is a Stable Diffusion UNet / CLIP text encoder")
        self._frozen = [(p, p.requires_grad) for root in roots.values() for p in root.parameters()]
        for p, _ in self._frozen:
            p.requires_grad_(False)
        for name, layer in self._layers.items():
            adapter = self.get_submodule(name)
            pre_hook = adapter.pre_hook()
            if pre_hook is not None:
                self._handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            self._handles.append(layer.register_forward_hook(adapter.hook, with_kwargs=True))
        log.info("LoRA (%s) rank %d alpha %g%s: %d UNet and %d text encoder layers, %d trainable parameters",
                 settings.type, settings.rank, settings.effective_alpha,
                 f", conv rank {settings.conv_rank} alpha {settings.effective_conv_alpha:g}" if settings.conv_rank
                 else "", len(self._parts["unet"]), len(self._parts["text_encoder"]),
                 sum(p.numel() for p in self.parameters()))

    @property
    def lora_modules(self) -> dict[str, Adapter]:
        return {name: self._modules[name] for name in self._layers}  # type: ignore[misc]

    @property
    def multiplier(self) -> float:
        return self._shared.multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._shared.multiplier = float(value)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def adapted_layers(self) -> dict[str, nn.Module]:
        """kohya name -> the model layer it adapts."""
        return dict(self._layers)

    def names(self, part: str | None = None) -> list[str]:
        """kohya names of the adapted layers (of one part, ``unet`` or ``text_encoder``, or all)."""
        if part is None:
            return list(self._layers)
        if part not in PARTS:
            raise ValueError(f"unknown LoRA part {part!r}, expected one of {PARTS}")
        return list(self._parts[part])

    def parameters_for(self, part: str) -> list[nn.Parameter]:
        """The trainable LoRA weights on the ``unet`` or on the ``text_encoder`` (both text encoders for SDXL)."""
        return [p for name in self.names(part) for p in self.get_submodule(name).parameters()]

    def kohya_state_dict(self) -> dict[str, Tensor]:
        """``{<kohya name>.lora_down.weight, .lora_up.weight, .alpha: tensor}`` (the other types: their keys):
        detached copies, in the dtype and on the device the network has (a snapshot: later training does not change
        it)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_kohya_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Inverse of :meth:`kohya_state_dict` (any float dtype): the same keys and shapes, or an error."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            raise UserError("the LoRA weights do not fit this network: " + "; ".join(parts),
                            "use the same model family, LoRA type, rank, conv rank (LoKr: factor) and UNet/text "
                            "encoder settings it was trained with")
        for key, value in own.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise UserError(f"the LoRA weight {key} has shape {list(state[key].shape)}, this network expects "
                                f"{list(value.shape)}",
                                "use the rank, conv rank (and LoKr factor) the LoRA was trained with")
        self.load_state_dict(dict(state), strict=True)

    def remove(self) -> None:
        """Take the network off the models: hooks removed, requires_grad flags restored. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen = []

    @torch.no_grad()
    def merge_into(self) -> None:
        """Add each adapter's weight change (``up @ down * alpha / rank * multiplier`` for plain LoRA) into its
        layer's weight, then :meth:`remove`.

        The models then compute on their own what the wrapped models computed (for a merged checkpoint export).
        """
        if not self.attached:
            raise RuntimeError("the LoRA network was removed; there is nothing to merge into")
        for name, layer in self._layers.items():
            weight = layer.weight
            delta = self.get_submodule(name).delta_weight(weight)
            weight.copy_((weight.float() + delta.float().to(weight.device)).to(weight.dtype))
        self.remove()


def _refuse_double_wrap(name: str, layer: nn.Module) -> None:
    for hook in layer._forward_hooks.values():
        if isinstance(getattr(hook, "__self__", None), Adapter):
            raise UserError(f"the layer {name} already has a LoRA attached",
                            "remove() the other LoRA network first")


# --- files --------------------------------------------------------------------------------------------------------

def _metadata_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value)
    return str(value)


def _tag_frequency(tag_frequency: Mapping, name: str) -> dict:
    """kohya's ``{dataset dir: {tag: count}}``; a flat ``{tag: count}`` is put under ``name``."""
    if tag_frequency and all(isinstance(v, Mapping) for v in tag_frequency.values()):
        return {str(k): {str(t): int(c) for t, c in v.items()} for k, v in tag_frequency.items()}
    if tag_frequency:
        return {name: {str(t): int(c) for t, c in tag_frequency.items()}}
    return {}


def network_module_and_args(settings: LoraSettings) -> tuple[str, dict[str, str]]:
    """``ss_network_module`` and ``ss_network_args`` as kohya's trainer writes them for these settings: plain LoRA
    with kohya's ``networks.lora`` (``conv_dim``/``conv_alpha`` for LoCon), the other types with LyCORIS's
    ``lycoris.kohya`` and the ``--network_args`` that build the same network there (strings, as kohya parses them)."""
    conv: dict[str, str] = {}
    if settings.conv_rank:
        conv = {"conv_dim": str(settings.conv_rank), "conv_alpha": str(settings.effective_conv_alpha)}
    if settings.type == "lora":
        return NETWORK_MODULE, conv
    algo = {"dora": "locon" if settings.conv_rank else "lora"}.get(settings.type, settings.type)
    # LyCORIS's presets: attn-mlp is kohya's LoRA targets; full adds the ResNet blocks and samplers (and conv_in/out,
    # time embedding, which we leave alone); without conv_dim LyCORIS would give the convolutions the linear rank
    args = {"algo": algo, "preset": "full" if settings.conv_rank else "attn-mlp", **conv}
    if settings.type == "dora":
        args.update(dora_wd="True", wd_on_output="False")  # magnitude per input channel: the WebUI's layout
    if settings.type == "lokr":
        args.update(factor=str(settings.lokr_factor), decompose_both=str(settings.lokr_decompose_both))
    return LYCORIS_MODULE, args


def lora_metadata(family: str, settings: LoraSettings, name: str, tag_frequency: Mapping | None = None,
                  base_hash: str = "", extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``ss_*`` (kohya / WebUI) and ``modelspec.*`` (SAI model spec) metadata of a LoRA file.

    ``base_hash``: the base checkpoint's sha256 (``ss_new_sd_model_hash``; a short hash goes to
    ``ss_sd_model_hash``). ``extra`` adds or overrides keys (values that are not strings are written as JSON or
    ``str``).
    """
    fam = get_family(family)
    module, args = network_module_and_args(settings)
    meta = {
        "ss_output_name": name,
        "ss_network_module": module,
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": str(settings.effective_alpha),
        "ss_network_dropout": str(float(settings.dropout)),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": BASE_MODEL_VERSION[fam.id],
        "ss_v2": str(fam.id in (SD2, SD2V)),
        "ss_tag_frequency": json.dumps(_tag_frequency(tag_frequency or {}, name)),
        "ss_training_finished_at": str(datetime.now().timestamp()),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{fam.modelspec_architecture}/lora",
        # kohya: SDXL LoRAs use the sgm UNet names, SD 1.x/2.x LoRAs the diffusers ones
        "modelspec.implementation": IMPL_STABILITY_AI if fam.id == SDXL else IMPL_DIFFUSERS,
        "modelspec.title": name,
        "modelspec.date": datetime.now().isoformat(timespec="seconds"),
        "modelspec.resolution": f"{fam.resolution}x{fam.resolution}",
        "modelspec.prediction_type": "v" if fam.prediction_type == "v_prediction" else "epsilon",
    }
    if base_hash:
        meta["ss_new_sd_model_hash" if len(base_hash) == 64 else "ss_sd_model_hash"] = base_hash
    meta.update({str(k): _metadata_str(v) for k, v in (extra or {}).items()})
    return meta


def addnet_hash(data: bytes) -> str:
    """sha256 of a safetensors file's tensor data (everything after the header): kohya's ``sshs_model_hash``, the
    hash the WebUI's Lora extension shows for safetensors LoRAs."""
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + header_len:]).hexdigest()


def save_lora(path: Path, network: LoraNetwork, metadata: Mapping[str, Any] | None = None,
              dtype: torch.dtype | None = torch.float16) -> Path:
    """Write the network as a kohya LoRA ``.safetensors`` (atomically), in ``dtype`` (None: as trained).

    Metadata: :func:`lora_metadata` of the network's family and settings, then the caller's ``metadata`` on top,
    except the keys that describe the weights (network module/dim/alpha/args, base model version, v2,
    ``sshs_model_hash``, ``modelspec.architecture``), which always come from the network and the file itself.
    """
    from safetensors.torch import save as safetensors_bytes

    path = Path(path)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).cpu().contiguous()
             for k, v in network.kohya_state_dict().items()}
    user = {str(k): _metadata_str(v) for k, v in (metadata or {}).items()}
    own = lora_metadata(network.family, network.settings, user.get("ss_output_name", path.stem))
    forced = {k: own[k] for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                                  "ss_base_model_version", "ss_v2", "modelspec.architecture")}
    meta = {**own, **user, **forced}
    # the data section does not depend on the metadata, so hashing a metadata-less serialisation is exact
    meta["sshs_model_hash"] = addnet_hash(safetensors_bytes(state))
    save_tensors(path, state, meta)
    log.info("saved LoRA %s (%d modules, %s)", path, len(network.names()), str(dtype or "as trained"))
    return path
