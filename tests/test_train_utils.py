"""LR schedules, optimizers and the EMA: formulas checked against hand computations, fallbacks and errors."""

from __future__ import annotations

import logging
import math
import sys
import types

import pytest
import torch

from dreambooth.config import LR_SCHEDULERS, OPTIMIZERS
from dreambooth.errors import UserError
from dreambooth.train import optimizers as optimizers_module
from dreambooth.train.ema import EMA
from dreambooth.train.optimizers import Lion, OptimizerSettings, make_optimizer
from dreambooth.train.schedules import lr_multiplier, make_lr_scheduler

UNET_LR, TE_LR = 2e-3, 5e-4
TOTAL, WARMUP = 40, 8


def settings(name: str, weight_decay: float = 0.0) -> OptimizerSettings:
    return OptimizerSettings(name=name, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)


def two_groups(unet_lr: float = UNET_LR, te_lr: float = TE_LR) -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.ones(3))], "lr": unet_lr},
            {"params": [torch.nn.Parameter(torch.ones(2))], "lr": te_lr}]


def expected(name: str, step: int, total: int = TOTAL, warmup: int = WARMUP, cycles: int = 1,
             power: float = 1.0) -> float:
    """The multipliers written out independently of the implementation."""
    if name == "constant":
        return 1.0
    if step < warmup:
        return step / warmup
    p = min(1.0, (step - warmup) / (total - warmup))
    return {
        "constant_with_warmup": 1.0,
        "linear": 1.0 - p,
        "linear_with_warmup": 1.0 - p,
        "cosine": 0.5 * (1 + math.cos(math.pi * p)),
        "cosine_with_restarts": 0.0 if p >= 1 else 0.5 * (1 + math.cos(math.pi * ((cycles * p) % 1))),
        "polynomial": (1 - p) ** power,
    }[name]


def run_curve(opt, sched, steps: int) -> list[tuple[float, float]]:
    """LRs of both groups as seen by each optimizer step, then step the scheduler."""
    seen = []
    for _ in range(steps):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        opt.step()
        sched.step()
    return seen


# ------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name,cycles,power", [(n, 1, 1.0) for n in LR_SCHEDULERS]
                         + [("cosine_with_restarts", 3, 1.0), ("polynomial", 1, 2.0), ("polynomial", 1, 0.5)])
def test_schedule_curve_matches_formula(name, cycles, power):
    opt, _ = make_optimizer(two_groups(), settings("adamw"))
    sched = make_lr_scheduler(opt, name, TOTAL, WARMUP, cycles=cycles, power=power)
    seen = run_curve(opt, sched, TOTAL + 5)  # a few steps past the end too
    for step, (unet, te) in enumerate(seen):
        m = expected(name, step, cycles=cycles, power=power)
        assert unet == pytest.approx(UNET_LR * m, abs=1e-12), (name, step)
        assert te == pytest.approx(TE_LR * m, abs=1e-12), (name, step)
        assert lr_multiplier(name, step, TOTAL, WARMUP, cycles, power) == pytest.approx(m, abs=1e-12)


def test_schedule_landmarks():
    assert [lr_multiplier("constant_with_warmup", s, 10, 4) for s in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]
    assert lr_multiplier("constant", 0, 10, 4) == 1.0  # plain constant ignores warmup
    assert lr_multiplier("linear", 2, 10, 4) == 0.5  # linear honours warmup like diffusers
    assert lr_multiplier("linear", 10, 10, 4) == 0.0
    assert lr_multiplier("cosine", 7, 10, 4) == pytest.approx(0.5)
    assert lr_multiplier("polynomial", 10, 10, 0, power=2.0) == 0.0  # to 0, not diffusers' 1e-7
    # restarts: back to 1 at the start of each of 3 cycles (after 4 warmup steps, 12 decay steps)
    assert [lr_multiplier("cosine_with_restarts", s, 16, 4, cycles=3) for s in (4, 8, 12)] == [1.0, 1.0, 1.0]
    assert lr_multiplier("cosine_with_restarts", 6, 16, 4, cycles=3) == pytest.approx(0.5)
    assert lr_multiplier("cosine_with_restarts", 16, 16, 4, cycles=3) == 0.0
    assert lr_multiplier("linear", 10, 10, 0, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier("linear", 0, 0) == 1.0  # zero-length run does not divide by zero


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine_with_restarts", "polynomial"])
@pytest.mark.parametrize("load_order", ["optimizer_first", "scheduler_first"])
def test_scheduler_resume_is_exact(name, load_order):
    def build():
        opt, _ = make_optimizer(two_groups(), settings("adamw"))
        return opt, make_lr_scheduler(opt, name, TOTAL, WARMUP, cycles=2, power=2.0)

    opt, sched = build()
    full = run_curve(opt, sched, TOTAL)

    opt, sched = build()
    first = run_curve(opt, sched, 13)  # mid-warmup would be < 8; 13 is into the decay
    opt_state, sched_state = opt.state_dict(), sched.state_dict()

    opt, sched = build()
    if load_order == "optimizer_first":
        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)
    else:
        sched.load_state_dict(sched_state)
        opt.load_state_dict(opt_state)
    rest = run_curve(opt, sched, TOTAL - 13)
    assert first + rest == full


def test_scheduler_resume_mid_warmup():
    opt, _ = make_optimizer(two_groups(), settings("adamw"))
    sched = make_lr_scheduler(opt, "cosine", TOTAL, WARMUP)
    run_curve(opt, sched, 3)
    state = sched.state_dict()
    opt2, _ = make_optimizer(two_groups(), settings("adamw"))
    sched2 = make_lr_scheduler(opt2, "cosine", TOTAL, WARMUP)
    sched2.load_state_dict(state)  # no optimizer state: the groups still get step 3's LR
    assert opt2.param_groups[0]["lr"] == pytest.approx(UNET_LR * 3 / WARMUP)
    assert run_curve(opt2, sched2, 10) == run_curve(opt, sched, 10)


def test_unknown_scheduler_lists_choices():
    opt, _ = make_optimizer(two_groups(), settings("adamw"))
    with pytest.raises(UserError) as err:
        make_lr_scheduler(opt, "exponential", 10)
    assert "cosine_with_restarts" in str(err.value) and "exponential" in str(err.value)
    with pytest.raises(UserError):
        lr_multiplier("cosine_with_restarts", 0, 10, cycles=0)


# ------------------------------------------------------------------------------------------- optimizers


def test_unknown_optimizer_lists_choices():
    with pytest.raises(UserError) as err:
        make_optimizer(two_groups(), settings("sgd"))
    assert all(name in str(err.value) for name in OPTIMIZERS)


def test_adamw_keeps_group_lrs_and_caller_dicts():
    groups = two_groups()
    opt, note = make_optimizer(groups, settings("adamw", 0.01))
    assert isinstance(opt, torch.optim.AdamW) and note is None
    assert [g["lr"] for g in opt.param_groups] == [UNET_LR, TE_LR]
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["weight_decay"] == 0.01
    assert set(groups[0]) == {"params", "lr"}  # not filled in with torch's defaults


def test_lion_matches_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    lr, wd, (b1, b2) = 0.1, 0.2, (0.9, 0.99)
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    grads = [torch.tensor([0.3, -0.1, 0.0]), torch.tensor([-1.0, -0.2, 0.4])]
    x, m = p.detach().clone(), torch.zeros(3)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        x = x * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
        torch.testing.assert_close(p.detach(), x)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m)
    # by hand for the first coordinate: step 1: 1*(1-0.02) - 0.1*sign(0.03) = 0.88;
    # m = 0.003; step 2: 0.88*0.98 - 0.1*sign(0.0027 - 0.1) = 0.8624 + 0.1
    assert p[0].item() == pytest.approx(0.9624)


def test_lion_minimises_a_quadratic():
    target = torch.tensor([3.0, -1.0, 0.25, 2.0])
    p = torch.nn.Parameter(torch.zeros(4))
    opt, note = make_optimizer([{"params": [p], "lr": 0.05}], settings("lion"))
    assert isinstance(opt, Lion) and note is None
    sched = make_lr_scheduler(opt, "linear", 300)
    start = ((p - target) ** 2).sum().item()
    for _ in range(300):
        opt.zero_grad()
        loss = ((p - target) ** 2).sum()
        loss.backward()
        opt.step()
        sched.step()
    assert ((p - target) ** 2).sum().item() < 1e-3 * start


def test_adafactor_uses_configured_lr():
    pytest.importorskip("transformers")
    for lr, changes in ((1e-2, True), (0.0, False)):
        w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
        before = w.detach().clone()
        opt, note = make_optimizer([{"params": [w], "lr": lr}], settings("adafactor"))
        assert type(opt).__name__ == "Adafactor" and note is None
        assert opt.param_groups[0]["relative_step"] is False and opt.param_groups[0]["scale_parameter"] is False
        (w.sum() ** 2).backward()
        opt.step()
        assert (not torch.equal(w.detach(), before)) is changes
        if changes:  # an update's RMS is clipped to 1, scaled by lr: each element moves by at most ~lr
            assert (w.detach() - before).abs().max().item() <= 2 * lr


@pytest.fixture
def fresh_8bit_probe(monkeypatch):
    """Forget what the 8-bit probe found, so a test's stand-in bitsandbytes is probed."""
    monkeypatch.setattr(optimizers_module, "_EIGHT_BIT_PROBLEMS", {})


def test_adamw_8bit_falls_back_with_a_note(monkeypatch, caplog, fresh_8bit_probe):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with caplog.at_level(logging.WARNING):
        opt, note = make_optimizer(two_groups(), settings("adamw_8bit"))
    assert isinstance(opt, torch.optim.AdamW)
    assert note and "bitsandbytes" in note and "AdamW" in note and "pip install bitsandbytes" in note
    assert note in caplog.text
    assert [g["lr"] for g in opt.param_groups] == [UNET_LR, TE_LR]


def test_adamw_8bit_on_a_missing_gpu_says_so(monkeypatch, fresh_8bit_probe):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    problem = optimizers_module.adamw_8bit_problem("cuda")
    assert problem and "CUDA" in problem and "adamw" in problem


def test_adamw_8bit_broken_import_names_the_error(monkeypatch, fresh_8bit_probe):
    def broken(module):
        raise RuntimeError("CUDA Setup failed")

    monkeypatch.setattr(optimizers_module, "_import", broken)
    opt, note = make_optimizer(two_groups(), settings("adamw_8bit"))
    assert isinstance(opt, torch.optim.AdamW) and "CUDA Setup failed" in note and "bitsandbytes" in note


def test_adamw_8bit_that_cannot_step_on_this_device_falls_back(monkeypatch, fresh_8bit_probe):
    """bitsandbytes before 0.50 imports without a GPU but fails at its first 8-bit step on the CPU."""
    class NoCpuAdamW8bit(torch.optim.AdamW):
        def step(self, closure=None):
            raise NameError("name 'str2optimizer8bit_blockwise' is not defined")

    fake = types.ModuleType("bitsandbytes.optim")
    fake.AdamW8bit = NoCpuAdamW8bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake)
    opt, note = make_optimizer(two_groups(), settings("adamw_8bit"))
    assert type(opt) is torch.optim.AdamW and "cannot run it on the CPU" in note


def test_adamw_8bit_used_when_available(monkeypatch, fresh_8bit_probe):
    class FakeAdamW8bit(torch.optim.AdamW):
        pass

    fake = types.ModuleType("bitsandbytes.optim")
    fake.AdamW8bit = FakeAdamW8bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake)
    opt, note = make_optimizer(two_groups(), settings("adamw_8bit"))
    assert type(opt) is FakeAdamW8bit and note is None


@pytest.mark.parametrize("name,package", [("dadaptation", "dadaptation"), ("prodigy", "prodigyopt")])
def test_adaptive_optimizer_missing_is_an_error(monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(UserError) as err:
        make_optimizer(two_groups(1.0, 1.0), settings(name))
    assert f"pip install {package}" in str(err.value) and "another optimizer" in err.value.hint


@pytest.mark.parametrize("name,package,cls", [("dadaptation", "dadaptation", "DAdaptAdam"),
                                              ("prodigy", "prodigyopt", "Prodigy")])
def test_adaptive_optimizer_one_lr_and_low_lr_warning(monkeypatch, caplog, name, package, cls):
    made = {}

    class Fake(torch.optim.Optimizer):
        def __init__(self, params, lr=1.0, **kwargs):
            made.update(kwargs, lr=lr)
            super().__init__(params, {"lr": lr})

    fake = types.ModuleType(package)
    setattr(fake, cls, Fake)
    monkeypatch.setitem(sys.modules, package, fake)
    opt, note = make_optimizer(two_groups(1.0, 1.0), settings(name, 0.01))
    assert note is None and made["decouple"] is True and made["weight_decay"] == 0.01
    with caplog.at_level(logging.WARNING):
        opt, note = make_optimizer(two_groups(0.01, 0.5), settings(name))
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]  # one LR: the first (UNet) group's
    assert note and "0.5" in note
    assert "around 1.0" in caplog.text
    opt, note = make_optimizer(two_groups(1.0, 0.0), settings(name))  # a frozen group at 0 is fine
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.0] and note is None


def test_no_parameters_is_an_error():
    with pytest.raises(UserError):
        make_optimizer([{"params": [], "lr": 1e-4}], settings("adamw"))


# ------------------------------------------------------------------------------------------- EMA


def test_ema_closed_form_with_constant_params():
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(5, generator=gen)), torch.nn.Parameter(torch.randn(2, 3, generator=gen))]
    s0 = [p.detach().clone() for p in params]
    ema = EMA(params, decay=0.9)
    with torch.no_grad():
        targets = [torch.randn(p.shape, generator=gen) for p in params]
        for p, t in zip(params, targets, strict=True):
            p.copy_(t)
    k = 17
    for _ in range(k):
        ema.update(params)
    assert ema.num_updates == k
    for s, p, init in zip(ema.shadow, targets, s0, strict=True):
        torch.testing.assert_close(s, p + 0.9**k * (init - p), rtol=1e-5, atol=1e-6)


def test_ema_fp32_shadow_and_copy_to_casts():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float16))
    ema = EMA([p], decay=0.5, device="cpu")
    assert ema.shadow[0].dtype == torch.float32 and ema.decay == 0.5
    with torch.no_grad():
        p.fill_(3.0)
    ema.update([p])
    torch.testing.assert_close(ema.shadow[0], torch.tensor([2.0, 2.5]))
    ema.copy_to([p])
    assert p.dtype == torch.float16 and p.tolist() == [2.0, 2.5]
    with pytest.raises(ValueError):
        ema.update([p, p])


def tiny_training(steps: int = 5):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt, _ = make_optimizer([{"params": list(model.parameters()), "lr": 0.1}], settings("adamw"))
    ema = EMA(model.parameters(), decay=0.8)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ema.update(model.parameters())
    return model, ema


def test_ema_lags_behind_training():
    model, ema = tiny_training()
    for s, p in zip(ema.shadow, model.parameters(), strict=True):
        assert not torch.allclose(s, p.detach())


def test_ema_state_dict_round_trip():
    model, ema = tiny_training()
    state = ema.state_dict()
    other = EMA(torch.nn.Linear(4, 2).parameters(), decay=0.8)
    other.load_state_dict(state)
    assert other.num_updates == ema.num_updates == 5
    for a, b in zip(other.shadow, ema.shadow, strict=True):
        assert torch.equal(a, b)
    ema.update(model.parameters())  # the saved state is a copy, not a view of the live shadow
    assert not torch.equal(state["shadow"][0], ema.shadow[0])
    with pytest.raises(ValueError):
        EMA(torch.nn.Linear(4, 3).parameters(), decay=0.8).load_state_dict(state)


def test_ema_swapped_restores_bitwise():
    model, ema = tiny_training()
    originals = [p.detach().clone() for p in model.parameters()]
    with ema.swapped(model.parameters()):
        for p, s in zip(model.parameters(), ema.shadow, strict=True):
            assert torch.equal(p.detach(), s)
    for p, o in zip(model.parameters(), originals, strict=True):
        assert torch.equal(p.detach(), o)
    with pytest.raises(RuntimeError), ema.swapped(model.parameters()):  # restored on errors too
        raise RuntimeError("preview failed")
    for p, o in zip(model.parameters(), originals, strict=True):
        assert torch.equal(p.detach(), o)
