"""Hypernetworks in the WebUI's own format: small MLPs that transform the inputs of the UNet's attention keys and
values, saved as a ``.pt`` the WebUI's hypernetwork loader (and its safe unpickler) accepts.

How the WebUI applies a hypernetwork (``modules/hypernetworks/hypernetwork.py``): for each context width it has a
pair of modules ``(k, v)``; in every attention of the UNet whose context (the cross-attention's text conditioning,
or the hidden states themselves in a self-attention) has that width, ``to_k`` sees ``k(context)`` and ``to_v`` sees
``v(context)`` instead of ``context``, where a module computes ``x + mlp(x) * strength`` (strength 1 while
training). We train the context width of the model's text conditioning (768 SD 1.x, 1024 SD 2.x, 2048 SDXL) and hook
``to_k``/``to_v`` of every UNet attention whose input has that width, which is exactly where the WebUI applies it.

The MLP (``linear``, an ``nn.Sequential``) has the WebUI's layer order, so the state-dict keys (``linear.0.weight``,
...) match: per step ``i`` of the layer structure (e.g. ``1, 2, 1``: widths ``dim, 2*dim, dim``) a Linear; the
activation (not after the last Linear); a LayerNorm when layer norm is on; a Dropout where the dropout structure is
above 0. Activations are the WebUI's names (note its ``swish`` is ``nn.Hardswish``). Weights start as the WebUI's
"Normal" initialisation: normal(0, 0.01), biases 0 (LayerNorms too), so a new hypernetwork changes almost nothing.

The file (:func:`save_hypernetwork`) is ``{<width>: (k_state, v_state), "layer_structure": [...],
"activation_func": ..., "is_layer_norm": ..., "weight_initialization": "Normal", "use_dropout": ...,
"dropout_structure": [...], "last_layer_dropout": ..., "activate_output": False, "name": ..., "step": ...,
"sd_checkpoint": <short hash>, "sd_checkpoint_name": ..., "optional_info": None}``: tensors, plain dicts, tuples,
lists, str, int, float, bool and None only. It is a torch zip holding only ``archive/data.pkl``,
``archive/version`` and ``archive/data/<n>``: the WebUI's safe loader refuses the other entries a current torch
writes (``byteorder``, ``.format_version``, ``.storage_alignment``, ``.data/serialization_id``), so they are left out.
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..atomic import write_bytes
from ..errors import UserError

if TYPE_CHECKING:
    from ..config import TrainConfig

log = logging.getLogger(__name__)

# the WebUI's activation names (HypernetworkModule.activation_dict) that build without arguments or weights
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,  # sic: the WebUI maps "swish" to Hardswish; a file must mean what the WebUI builds
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "softplus": nn.Softplus,
    "selu": nn.SELU,
    "celu": nn.CELU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "hardtanh": nn.Hardtanh,
    "hardsigmoid": nn.Hardsigmoid,
    "softsign": nn.Softsign,
    "tanhshrink": nn.Tanhshrink,
    "logsigmoid": nn.LogSigmoid,
}
WEIGHT_INIT = "Normal"
INIT_STD = 0.01
ALLOWED_ZIP_ENTRIES = ("data.pkl", "version")  # plus data/<n>: what the WebUI's safe loader accepts in a torch zip
FILE_KEYS = ("layer_structure", "activation_func", "is_layer_norm", "weight_initialization", "use_dropout",
             "dropout_structure", "last_layer_dropout", "activate_output", "name", "step", "sd_checkpoint",
             "sd_checkpoint_name", "optional_info")


def parse_layer_structure(text: str | list | tuple) -> tuple[float, ...]:
    """``"1, 2, 1"`` (or a list of numbers) -> ``(1.0, 2.0, 1.0)``, checked the way the WebUI needs it."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    try:
        values = tuple(float(p) for p in parts if p != "")
    except (TypeError, ValueError):
        raise UserError(f"hypernetwork layer structure {text!r} is not a list of numbers",
                        "write it like 1, 2, 1 (layer widths as multiples of the context width)") from None
    if len(values) < 2:
        raise UserError(f"hypernetwork layer structure {text!r} needs at least two numbers", "e.g. 1, 2, 1")
    if values[0] != 1 or values[-1] != 1:
        raise UserError(f"hypernetwork layer structure {text!r} must start and end with 1",
                        "the first and last widths are the context width itself, e.g. 1, 2, 1")
    if any(not math.isfinite(v) or v <= 0 or v > 64 for v in values):
        raise UserError(f"hypernetwork layer structure {text!r} has a width outside (0, 64]",
                        "use positive multiples such as 0.5, 1, 2, 4")
    return values


@dataclass
class HypernetworkSettings:
    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation: str = "linear"
    layer_norm: bool = False
    dropout: float = 0.0  # on the output of every hidden layer (not the last), while training
    activate_output: bool = False  # the activation after the last layer too (the WebUI's "activate_output")
    custom_dropouts: tuple[float, ...] | None = None  # a file's own per-layer dropout structure (overrides dropout)

    def __post_init__(self) -> None:
        self.layer_structure = parse_layer_structure(self.layer_structure)
        if self.custom_dropouts is not None:
            self.custom_dropouts = tuple(float(d) for d in self.custom_dropouts)
            if len(self.custom_dropouts) != len(self.layer_structure) or any(
                    not 0 <= d < 1 for d in self.custom_dropouts) or self.custom_dropouts[-1] != 0:
                raise UserError(f"hypernetwork dropout structure {list(self.custom_dropouts)} does not fit the layer "
                                f"structure {list(self.layer_structure)}",
                                "one value in [0, 1) per layer, the last one 0")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"hypernetwork activation {self.activation!r} is not supported",
                            f"use one of {', '.join(ACTIVATIONS)}")
        if not isinstance(self.dropout, int | float) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise UserError(f"hypernetwork dropout must be in [0, 1), not {self.dropout!r}")

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> HypernetworkSettings:
        return cls(layer_structure=cfg.hypernetwork_layer_structure, activation=cfg.hypernetwork_activation,
                   layer_norm=cfg.hypernetwork_layer_norm, dropout=cfg.hypernetwork_dropout)

    @property
    def dropout_structure(self) -> list[float]:
        """The WebUI's per-layer dropout: 0 at the input and output, ``dropout`` after each hidden layer."""
        if self.custom_dropouts is not None:
            return list(self.custom_dropouts)
        n = len(self.layer_structure)
        return [0.0] + [float(self.dropout)] * (n - 2) + [0.0]


class HypernetworkModule(nn.Module):
    """One of the pair of a width: ``x + linear(x) * multiplier``, with the WebUI's ``linear`` layout."""

    def __init__(self, dim: int, settings: HypernetworkSettings, multiplier: Callable[[], float]) -> None:
        super().__init__()
        structure, dropouts = settings.layer_structure, settings.dropout_structure
        layers: list[nn.Module] = []
        for i in range(len(structure) - 1):
            width = int(dim * structure[i + 1])
            layers.append(nn.Linear(int(dim * structure[i]), width))
            last = i == len(structure) - 2
            if settings.activation != "linear" and (not last or settings.activate_output):
                layers.append(ACTIVATIONS[settings.activation]())
            if settings.layer_norm:
                layers.append(nn.LayerNorm(width))
            if dropouts[i + 1] > 0:
                layers.append(nn.Dropout(p=dropouts[i + 1]))
        self.linear = nn.Sequential(*layers)
        for layer in self.linear:
            if isinstance(layer, nn.Linear | nn.LayerNorm):
                nn.init.normal_(layer.weight, mean=0.0, std=INIT_STD)
                nn.init.zeros_(layer.bias)
        self._multiplier = multiplier

    def forward(self, x: Tensor, dropout: bool = True) -> Tensor:
        """``x + linear(x) * multiplier`` in the module's dtype, returned in ``x``'s dtype. Dropout acts only in
        training mode and with ``dropout`` (the trainer turns it off while the UNet is in eval mode: previews)."""
        weight = self.linear[0].weight
        h = x if x.dtype == weight.dtype else x.to(weight.dtype)
        out = h
        for layer in self.linear:
            if isinstance(layer, nn.Dropout):
                out = nn.functional.dropout(out, layer.p, training=self.training and dropout)
            else:
                out = layer(out)
        return (h + out * self._multiplier()).to(x.dtype)


class Hypernetwork(nn.Module):
    """A ``(k, v)`` pair of :class:`HypernetworkModule` per context width in ``sizes``; :meth:`attach` hooks it into a
    UNet's attentions, :meth:`remove` takes it off again."""

    def __init__(self, sizes: list[int] | tuple[int, ...], settings: HypernetworkSettings) -> None:
        super().__init__()
        if not sizes:
            raise ValueError("a hypernetwork needs at least one context width")
        self.settings = settings
        self.multiplier = 1.0
        self.pairs = nn.ModuleDict({str(int(size)): nn.ModuleList([
            HypernetworkModule(int(size), settings, self._get_multiplier) for _ in range(2)]) for size in sizes})
        self._handles: list[Any] = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        self.hooked: list[str] = []  # the attention projections it feeds, for logs and tests

    def _get_multiplier(self) -> float:
        return self.multiplier

    @property
    def sizes(self) -> list[int]:
        return [int(s) for s in self.pairs]

    def module(self, size: int, which: str) -> HypernetworkModule:
        """The ``"k"`` or ``"v"`` module of a width."""
        return self.pairs[str(size)][0 if which == "k" else 1]  # type: ignore[index, return-value]

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, unet: nn.Module, frozen: tuple[nn.Module, ...] = ()) -> Hypernetwork:
        """Feed ``to_k``/``to_v`` of every attention of ``unet`` whose input width is one of ours through our modules.

        ``unet`` and the modules in ``frozen`` (text encoders, VAE) get ``requires_grad=False``; :meth:`remove` gives
        the old flags back.
        """
        if self.attached:
            raise RuntimeError("the hypernetwork is attached already")
        for name, attention in unet.named_modules():
            to_k, to_v = getattr(attention, "to_k", None), getattr(attention, "to_v", None)
            if not isinstance(to_k, nn.Linear) or not isinstance(to_v, nn.Linear):
                continue
            if to_k.in_features not in self.sizes or to_v.in_features != to_k.in_features:
                continue
            for which, layer in (("k", to_k), ("v", to_v)):
                self._handles.append(layer.register_forward_pre_hook(
                    self._hook(self.module(to_k.in_features, which), layer), with_kwargs=True))
                self.hooked.append(f"{name}.to_{which}")
        if not self._handles:
            raise UserError(f"the UNet has no attention with a context width of {', '.join(map(str, self.sizes))}",
                            "train the hypernetwork on the model it was made for")
        self._frozen = [(p, p.requires_grad) for root in (unet, *frozen) for p in root.parameters()]
        for p, _ in self._frozen:
            p.requires_grad_(False)
        log.info("hypernetwork %s (%s, layer norm %s, dropout %g) on %d attention projections, %d parameters",
                 list(self.settings.layer_structure), self.settings.activation, self.settings.layer_norm,
                 self.settings.dropout, len(self.hooked), sum(p.numel() for p in self.parameters()))
        return self

    @staticmethod
    def _hook(module: HypernetworkModule, layer: nn.Module) -> Callable:
        def hook(_layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            # dropout only while both the hypernetwork and the UNet train (previews put the UNet in eval)
            if args:
                return (module(args[0], layer.training), *args[1:]), kwargs
            return args, {**kwargs, "input": module(kwargs["input"], layer.training)}
        return hook

    def remove(self) -> None:
        """Hooks off, requires_grad flags back. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.hooked.clear()
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen = []

    # --- the WebUI file -----------------------------------------------------------------------------------------

    def webui_state(self, *, name: str, step: int, checkpoint_hash: str = "", checkpoint_name: str = "",
                    ) -> dict[Any, Any]:
        """The object the WebUI's ``Hypernetwork.save`` writes, from plain types only (fp32 CPU tensors)."""
        s = self.settings
        state: dict[Any, Any] = {}
        for size in self.sizes:
            state[size] = tuple({k: v.detach().float().cpu().clone() for k, v in self.module(size, w).state_dict()
                                 .items()} for w in ("k", "v"))
        dropouts = s.dropout_structure
        state.update({
            "step": int(step),
            "name": str(name),
            "layer_structure": [float(v) for v in s.layer_structure],
            "activation_func": s.activation,
            "is_layer_norm": bool(s.layer_norm),
            "weight_initialization": WEIGHT_INIT,
            "sd_checkpoint": checkpoint_hash[:10] or None,
            "sd_checkpoint_name": checkpoint_name or None,
            "activate_output": bool(s.activate_output),
            "use_dropout": any(d > 0 for d in dropouts),
            "dropout_structure": dropouts,
            "last_layer_dropout": dropouts[-2] != 0,
            "optional_info": None,
        })
        return state

    def load_webui_state(self, state: Mapping[Any, Any]) -> None:
        """The weights of a WebUI hypernetwork object (see :func:`load_hypernetwork`); widths must match."""
        sizes = sorted(k for k in state if isinstance(k, int))
        if sizes != sorted(self.sizes):
            raise UserError(f"the hypernetwork file has context widths {sizes}, this one {sorted(self.sizes)}",
                            "use a hypernetwork made for this model family")
        for size in sizes:
            pair = state[size]
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise UserError(f"the hypernetwork file's entry {size} is not a (k, v) pair")
            for which, sd in zip(("k", "v"), pair, strict=True):
                try:
                    self.module(size, which).load_state_dict(dict(sd), strict=True)
                except RuntimeError as err:
                    raise UserError(f"the hypernetwork file's {size} {which} weights do not fit its layer structure "
                                    f"({str(err).splitlines()[0]})", "the file is damaged or not a hypernetwork") \
                        from None


def settings_from_file(state: Mapping[Any, Any]) -> HypernetworkSettings:
    """The settings a WebUI hypernetwork object describes (with the WebUI's defaults for keys it lacks)."""
    structure = tuple(state.get("layer_structure") or (1, 2, 1))
    dropouts = state.get("dropout_structure")
    if dropouts is None and state.get("use_dropout"):  # the WebUI's reading of files from before dropout_structure
        n = len(structure)
        dropouts = [0.0] + [0.3] * (n - 3) + [0.3 if state.get("last_layer_dropout") else 0.0, 0.0][-(n - 1):]
    return HypernetworkSettings(
        layer_structure=structure,
        activation=state.get("activation_func") or "linear",
        layer_norm=bool(state.get("is_layer_norm", False)),
        activate_output=bool(state.get("activate_output", True)),
        custom_dropouts=tuple(dropouts) if dropouts else None,
    )


def torch_zip_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` as a zip holding only the entries the WebUI's safe loader accepts."""
    raw = io.BytesIO()
    torch.save(obj, raw)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            inner = info.filename.split("/", 1)[1] if "/" in info.filename else ""
            if inner in ALLOWED_ZIP_ENTRIES or (inner.startswith("data/") and inner[5:].isdigit()):
                dst.writestr(info.filename, src.read(info))
    return out.getvalue()


def save_hypernetwork(path: Path, network: Hypernetwork, *, name: str, step: int, checkpoint_hash: str = "",
                      checkpoint_name: str = "") -> Path:
    """Write the hypernetwork as the WebUI's ``.pt`` (atomically)."""
    path = Path(path)
    if path.suffix != ".pt":
        raise ValueError(f"a hypernetwork file must end in .pt (the WebUI lists only those), not {path.name!r}")
    state = network.webui_state(name=name, step=step, checkpoint_hash=checkpoint_hash,
                                checkpoint_name=checkpoint_name)
    write_bytes(path, torch_zip_bytes(state))
    log.info("saved hypernetwork %s (widths %s, step %d)", path, network.sizes, step)
    return path


def load_hypernetwork(path: Path) -> Hypernetwork:
    """A WebUI hypernetwork ``.pt`` (read with torch's weights-only loader: no code runs) as our module."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"hypernetwork file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise UserError(f"{path.name} is not a hypernetwork file the weights-only loader accepts ({err})") from None
    if not isinstance(state, Mapping) or not any(isinstance(k, int) for k in state):
        raise UserError(f"{path.name} holds no hypernetwork layers", "pick a WebUI hypernetwork .pt file")
    network = Hypernetwork([k for k in state if isinstance(k, int)], settings_from_file(state))
    network.load_webui_state(state)
    return network
