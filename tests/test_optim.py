"""optim.name: every optimizer that runs here steps on the CPU and lowers a loss, keeps the state
per parameter it documents, resumes exactly through the trainer's checkpoint functions (one process,
plain and FSDP2-sharded), and the rest are refused in one line naming what runs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from resrl import checkpoint, optim
from resrl.config import ConfigError, OptimConfig, resolve
from resrl.errors import MissingPackageError
from resrl.optim import OPTIMIZERS, build_optimizer, state_bytes, state_bytes_per_param

WIDTH = 64  # a 64x64 weight has 4096 values: the smallest tensor both libraries quantize
SHARDED_OK = [n for n, s in OPTIMIZERS.items() if s.sharded]
SHARDED_REFUSED = [n for n, s in OPTIMIZERS.items() if not s.sharded]


def _installed(name: str):
    package = OPTIMIZERS[name].package
    return pytest.param(
        name,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(package) is None, reason=f"{package} is not installed (resrl[lowbit])"
        ),
    )


ALL = [_installed(n) for n in OPTIMIZERS]
SHARDED = [_installed(n) for n in SHARDED_OK]


def _cfg(name: str, lr: float = 1e-2) -> OptimConfig:
    return OptimConfig(name=name, lr=lr, weight_decay=0.1, beta1=0.9, beta2=0.99)


def _model(sharded: bool = False) -> nn.Module:
    torch.manual_seed(0)
    # Two weights over the quantization threshold, a bias under it (fp32 moments).
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=False), nn.Tanh(), nn.Linear(WIDTH, WIDTH, bias=True))
    if sharded:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model


X_BD = torch.randn(32, WIDTH, generator=torch.Generator().manual_seed(1))


def _loss(model: nn.Module) -> torch.Tensor:
    return (model(X_BD) - X_BD.flip(1)).pow(2).mean()


def _step(model: nn.Module, opt: torch.optim.Optimizer, scheduler=None) -> float:
    opt.zero_grad(set_to_none=True)
    loss = _loss(model)
    loss.backward()
    opt.step()
    if scheduler is not None:
        scheduler.step()
    return loss.item()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


def _warmup(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    # The trainer's schedule: linear warm-up over 3 steps.
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))


@pytest.fixture
def one_process_group():
    """A one-process gloo group, as the trainer makes for sharded runs alone."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if owned:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ALL)
def test_steps_on_the_cpu_lower_a_loss_under_the_trainers_schedule(name):
    model = _model()
    opt = build_optimizer(model.parameters(), _cfg(name))
    scheduler = _warmup(opt)
    losses = [_step(model, opt, scheduler) for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    # The lr stays a float, as torch's AdamW keeps it (the optim/lr metric, apply_optim_config).
    assert isinstance(opt.param_groups[0]["lr"], float)
    assert isinstance(scheduler.get_last_lr()[0], float)


# Odd sizes: large; under the quantization threshold; over it but no multiple of 128 (bitsandbytes
# quantizes a partial last block, torchao keeps fp32); a multiple of 128 but not of 256.
STATE_SHAPES = [(256, 512), (4032,), (4160,), (8320,)]


@pytest.mark.parametrize("name", ALL)
def test_state_bytes_are_what_the_library_allocates(name):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape)) for shape in STATE_SHAPES]
    opt = build_optimizer(params, _cfg(name))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        measured = _state_nbytes(opt.state[p])
        assert measured == state_bytes(name, p.numel()), p.shape
    # The per-parameter figure the config documents, on the large tensor.
    assert _state_nbytes(opt.state[params[0]]) / params[0].numel() == pytest.approx(
        state_bytes_per_param(name), rel=0.01
    )


def _state_nbytes(state: dict) -> int:
    """Bytes of the storages a parameter's state holds; a table shared between parameters (one
    bitsandbytes keeps per device) is the optimizer's, not the parameter's."""
    storages = {}
    for key, value in state.items():
        if key.startswith("qmap"):
            continue
        for t in _plain_tensors(value):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _plain_tensors(value) -> list[torch.Tensor]:
    """The tensors holding a state value: itself, or a tensor subclass's inner tensors."""
    if not isinstance(value, torch.Tensor):
        return []
    if type(value) is torch.Tensor or isinstance(value, nn.Parameter):
        return [value]
    names, _ = value.__tensor_flatten__()
    return [t for n in names for t in _plain_tensors(getattr(value, n))]


def test_documented_bytes():
    assert [state_bytes_per_param(n) for n in OPTIMIZERS] == [8.0, 2.03125, 1.0625, 2.03125]


def _round_trip(name: str, tmp_path, sharded: bool) -> None:
    """Three steps, a checkpoint, two more steps; a fresh optimizer that has stepped once loads the
    checkpoint, takes the resume path's float lrs (apply_optim_config) and must step identically."""
    cfg = _cfg(name)
    model = _model(sharded)
    opt = build_optimizer(model.parameters(), cfg)
    scheduler = _warmup(opt)
    for _ in range(3):
        _step(model, opt, scheduler)
    meta = {"scheduler": scheduler.state_dict()}
    path = checkpoint.save(tmp_path, 3, module=model, optimizer=opt, meta=meta)
    expected = [_step(model, opt, scheduler) for _ in range(2)]
    expected_weights = _weights(model)

    model2 = _model(sharded)
    opt2 = build_optimizer(model2.parameters(), cfg)
    scheduler2 = _warmup(opt2)
    _step(model2, opt2, scheduler2)
    state = checkpoint.load(path, module=model2, optimizer=opt2)
    scheduler2.load_state_dict(state["scheduler"])
    checkpoint.apply_optim_config(opt2, scheduler2, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    resumed = [_step(model2, opt2, scheduler2) for _ in range(2)]

    assert resumed == expected
    for key, weight in _weights(model2).items():
        assert torch.equal(weight, expected_weights[key]), key


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_round_trip_steps_identically(name, tmp_path):
    _round_trip(name, tmp_path, sharded=False)


@pytest.mark.parametrize("name", SHARDED)
def test_checkpoint_round_trip_steps_identically_with_fsdp2(name, tmp_path, one_process_group):
    _round_trip(name, tmp_path, sharded=True)


@pytest.mark.parametrize("name", SHARDED_REFUSED)
def test_sharded_parameters_are_refused_in_one_line_naming_what_runs(name, one_process_group):
    model = _model(sharded=True)
    with pytest.raises(ConfigError) as caught:
        build_optimizer(model.parameters(), _cfg(name))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"config optim.name: {name} (")
    assert "FSDP2-sharded" in message
    supported = message.split("supported here: ")[1].split(", ")
    assert "adamw" in supported and name not in supported
    assert set(supported) <= set(SHARDED_OK)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "adamw"])
def test_an_unsupported_device_type_is_refused_in_one_line(name):
    params = [nn.Parameter(torch.zeros(WIDTH, WIDTH, device="meta"))]
    with pytest.raises(
        ConfigError, match=rf"^config optim.name: {name} \(.* meta parameters.*; supported here: adamw$"
    ):
        build_optimizer(params, _cfg(name))


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "adamw"])
def test_a_missing_library_is_refused_naming_the_extra(name, monkeypatch):
    package = OPTIMIZERS[name].package
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a, **k: None if n == package else real(n, *a, **k)
    )
    with pytest.raises(MissingPackageError) as caught:
        build_optimizer(_model().parameters(), _cfg(name))
    message = str(caught.value)
    assert "\n" not in message
    assert f"needs {OPTIMIZERS[name].requirement}, which is not installed here" in message
    assert "pip install resrl[lowbit]" in message
    assert "adamw" in message.split("supported here: ")[1].split(", ")


@pytest.mark.parametrize("name", [_installed(n) for n in OPTIMIZERS if OPTIMIZERS[n].package == "torchao"])
def test_torchao_on_the_cpu_without_a_cpp_compiler_is_refused(name, monkeypatch):
    monkeypatch.setattr(optim, "_missing_cpp_compiler", lambda: "no g++ on PATH")
    with pytest.raises(
        ConfigError, match=r"finds no C\+\+ compiler here \(no g\+\+ on PATH\); supported here: "
    ):
        build_optimizer(_model().parameters(), _cfg(name))


def test_an_unknown_name_is_refused_by_config_validation():
    with pytest.raises(ConfigError) as caught:
        resolve("tiny", overrides=["optim.name=adam8bit"])
    assert str(caught.value) == (
        "config optim.name: 'adam8bit' is not supported; accepted: adamw, adamw8bit, adamw4bit, adamw8bit-bnb"
    )


def test_the_default_is_torch_adamw():
    model = _model()
    opt = build_optimizer(model.parameters(), resolve("tiny").optim)
    assert type(opt) is torch.optim.AdamW
