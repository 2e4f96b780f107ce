"""The optimizers a run can use, built from the config's name and settings.

Optional packages (bitsandbytes, dadaptation, prodigyopt, transformers' Adafactor) are imported only when their
optimizer is picked, so a missing one costs nothing until then.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..compat import fused_adamw_available
from ..config import GLOBAL_OPTIMIZERS, OPTIMIZERS, TrainConfig
from ..errors import UserError
from .fused import ParamwiseOptimizer, check_fused, install_fused_step
from .precision import WeightPrecision

log = logging.getLogger(__name__)


@dataclass
class OptimizerSettings:
    """What the config says about the optimizer; the LRs travel in the param groups."""

    name: str
    weight_decay: float
    betas: tuple[float, float]
    eps: float

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> OptimizerSettings:
        return cls(name=cfg.optimizer, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
                   eps=cfg.adam_epsilon)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    Per parameter, with momentum ``m`` (starting at 0) and gradient ``g``::

        p = p * (1 - lr * weight_decay)                   # decoupled weight decay
        p = p - lr * sign(beta1 * m + (1 - beta1) * g)
        m = beta2 * m + (1 - beta2) * g

    Every coordinate moves by exactly ``lr`` (plus decay), so Lion wants a smaller LR than AdamW (3-10x) and
    a correspondingly larger weight decay.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                g = p.grad
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(torch.sign(m * beta1 + g * (1.0 - beta1)), alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1.0 - beta2)
        return loss


def _import(module: str) -> Any:
    """importlib.import_module, one place for tests to intercept."""
    return importlib.import_module(module)


def make_optimizer(param_groups: list[dict], settings: OptimizerSettings) -> tuple[torch.optim.Optimizer, str | None]:
    """Build the optimizer ``settings.name`` over torch-style param groups (each with ``params`` and ``lr``).

    Returns the optimizer and a note for the user when something was substituted (else None):
    ``adamw_8bit`` falls back to torch AdamW when bitsandbytes or a CUDA device is missing, and
    ``dadaptation`` / ``prodigy`` get one LR for all trained groups. The caller's dicts are not modified.
    """
    if settings.name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {settings.name!r}", f"pick one of: {', '.join(OPTIMIZERS)}")
    groups = [dict(g) for g in param_groups]
    for g in groups:
        if "params" not in g or "lr" not in g:
            raise ValueError("every param group needs 'params' and 'lr'")
        g["params"] = list(g["params"])
    if not any(g["params"] for g in groups):
        raise UserError("nothing to train: no parameters were given to the optimizer",
                        "turn on Train UNet or give the text encoder a step ratio above 0")
    name = settings.name
    wd, betas, eps = settings.weight_decay, tuple(settings.betas), settings.eps
    if name == "adamw":
        return _adamw(groups, betas, eps, wd), None
    if name == "adamw_8bit":
        return _adamw_8bit(groups, settings)
    if name == "lion":
        return Lion(groups, lr=groups[0]["lr"], betas=betas, weight_decay=wd), None
    if name == "adafactor":
        adafactor = _import("transformers.optimization").Adafactor
        # relative_step=False and scale_parameter=False: use the configured LR as is, with no internal schedule.
        # Adafactor keeps its own eps pair (1e-30, 1e-3) and no first moment (beta1=None) to save memory.
        return adafactor(groups, lr=groups[0]["lr"], weight_decay=wd, relative_step=False, scale_parameter=False,
                         warmup_init=False), None
    return _adaptive(groups, settings)


def build_optimizer(groups: list[dict], cfg: TrainConfig, precision: WeightPrecision, uses_grad_scaler: bool
                    ) -> tuple[torch.optim.Optimizer, str | None]:
    """A run's optimizer over ``groups``: the config's, as one optimizer per parameter where the weights are bf16 or
    the step is fused into backward (:mod:`.fused`). Returns it and the note for the user (a fallback), if any."""
    settings = OptimizerSettings.from_config(cfg)
    optimizer, note = make_optimizer(groups, settings)
    if note:
        log.warning("%s", note)
    if cfg.fused_backward_step:
        check_fused(grad_accumulation=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm,
                    uses_grad_scaler=uses_grad_scaler, optimizer=cfg.optimizer)
    if cfg.fused_backward_step or precision.bf16:  # one optimizer per parameter, with the same state_dict format
        if cfg.optimizer in GLOBAL_OPTIMIZERS:
            raise UserError(f"{cfg.optimizer} estimates its step size from all parameters together and cannot "
                            "update them one at a time (bf16 weights, optimizer step in backward)",
                            "pick adamw, adamw_8bit, lion or adafactor, or set weight precision fp32 and turn "
                            "'Optimizer step in backward' off")
        if note and settings.name == "adamw_8bit":  # the fallback is decided (and reported) once, above
            settings = dataclasses.replace(settings, name="adamw")
        optimizer = ParamwiseOptimizer(groups, lambda g: make_optimizer(g, settings)[0], precision)
    if cfg.fused_backward_step:
        install_fused_step(optimizer)
    return optimizer, note


def _adamw_8bit(groups: list[dict], settings: OptimizerSettings) -> tuple[torch.optim.Optimizer, str | None]:
    betas, eps, wd = tuple(settings.betas), settings.eps, settings.weight_decay
    device = next(p for g in groups for p in g["params"]).device
    problem = adamw_8bit_problem(device.type)
    if problem is None:
        return _import("bitsandbytes.optim").AdamW8bit(groups, lr=groups[0]["lr"], betas=betas, eps=eps,
                                                       weight_decay=wd), None
    note = f"{problem}; using torch AdamW instead (it needs more memory for its state)."
    log.warning("%s", note)
    return _adamw(groups, betas, eps, wd), note


def _adamw(groups: list[dict], betas: tuple[float, float], eps: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW, with its fused kernel where this torch has one for the device (the same update in one pass
    over weight, gradient and moments, many tensors per launch, and no temporary the size of the weights)."""
    params = [p for g in groups for p in g["params"]]
    device_types = {p.device.type for p in params}
    fused = len(device_types) == 1 and fused_adamw_available(device_types.pop()) and \
        all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=betas, eps=eps, weight_decay=weight_decay,
                             **({"fused": True} if fused else {}))


_EIGHT_BIT_PROBLEMS: dict[str, str | None] = {}  # device type -> why 8-bit AdamW cannot run there (None: it can)


def adamw_8bit_problem(device_type: str) -> str | None:
    """None when bitsandbytes' 8-bit AdamW runs on ``device_type`` here, else why not and what to do.

    Found out by one real step of a small AdamW8bit on that device (cached): bitsandbytes 0.48+ runs its 8-bit
    optimizers on the CPU, older ones import without a GPU but fail at the first step; a broken CUDA setup fails
    there too. So the answer is what will really run, not what a version number suggests."""
    if device_type not in _EIGHT_BIT_PROBLEMS:
        _EIGHT_BIT_PROBLEMS[device_type] = _probe_adamw_8bit(device_type)
    return _EIGHT_BIT_PROBLEMS[device_type]


def _probe_adamw_8bit(device_type: str) -> str | None:
    if device_type == "cuda" and not torch.cuda.is_available():
        return "8-bit AdamW (bitsandbytes) needs a CUDA device and none is available: pick adamw"
    try:
        bnb_optim = _import("bitsandbytes.optim")
    except ImportError as err:
        log.debug("bitsandbytes import failed: %s", err)
        return "8-bit AdamW needs bitsandbytes, which is not installed: pip install bitsandbytes, or pick adamw"
    except Exception as err:  # a broken install can fail in its CUDA setup with any error
        return (f"8-bit AdamW: importing bitsandbytes failed ({type(err).__name__}: {err}): reinstall it for your "
                "CUDA version (pip install -U bitsandbytes), or pick adamw")
    param = torch.nn.Parameter(torch.zeros(4096, device=device_type))  # 4096: bitsandbytes' smallest 8-bit size
    try:
        optimizer = bnb_optim.AdamW8bit([param], lr=1e-3)
        param.grad = torch.ones_like(param)
        optimizer.step()
    except Exception as err:
        log.debug("bitsandbytes 8-bit step on %s failed: %r", device_type, err)
        where = "the CPU" if device_type == "cpu" else f"this {device_type} device"
        return (f"8-bit AdamW: the installed bitsandbytes cannot run it on {where} "
                + ("(bitsandbytes 0.50 runs it on the CPU, beside a current torch): train on an NVIDIA GPU "
                   "or pick adamw" if device_type == "cpu" else f"({type(err).__name__}: {err}): pick adamw"))
    return None


_ADAPTIVE = {  # name -> (module, class, pip package)
    "dadaptation": ("dadaptation", "DAdaptAdam", "dadaptation"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
}


def _adaptive(groups: list[dict], settings: OptimizerSettings) -> tuple[torch.optim.Optimizer, str | None]:
    """D-Adaptation Adam or Prodigy: they estimate the step size themselves; ``lr`` only scales it (~1.0)."""
    module, cls_name, package = _ADAPTIVE[settings.name]
    try:
        cls = getattr(_import(module), cls_name)
    except ImportError:
        raise UserError(f"optimizer {settings.name} needs the {package} package, which is not installed",
                        f"pip install {package} into the WebUI's venv, or pick another optimizer") from None
    note = None
    # Both support one LR for every group (groups at 0 excepted): older versions silently use the first group's,
    # newer ones raise at the first step. So give every trained group the first trained group's (the UNet's) LR.
    trained = [g["lr"] for g in groups if g["lr"] > 0]
    if trained and any(lr != trained[0] for lr in trained):
        for g in groups:
            if g["lr"] > 0:
                g["lr"] = trained[0]
        others = ", ".join(f"{lr:g}" for lr in trained[1:] if lr != trained[0])
        note = (f"{settings.name} supports one learning rate for all trained parts: {trained[0]:g} (the first "
                f"group's, normally the UNet's) now applies to all, replacing {others} (normally the text encoder's)")
        log.warning("%s", note)
    lr = trained[0] if trained else 1.0
    if lr < 0.1:
        log.warning("%s expects a learning rate around 1.0 (it scales the step size it finds itself), got %g; "
                    "a small value makes it learn very slowly", settings.name, lr)
    opt = cls(groups, lr=lr, betas=tuple(settings.betas), eps=settings.eps, weight_decay=settings.weight_decay,
              decouple=True)
    return opt, note
