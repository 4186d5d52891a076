"""Small networks shared by reward models and policies: an MLP, a fixed input standardiser, save/load."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmalign.errors import DataError


def mlp(inputs: int, hidden: int, layers: int, outputs: int) -> nn.Sequential:
    """`layers` hidden Linear+ReLU layers of width `hidden`, then a Linear to `outputs`."""
    if layers < 1 or hidden < 1:
        raise ValueError(f"an MLP needs at least one hidden layer of width >= 1, got {layers} x {hidden}")
    blocks: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*blocks, nn.Linear(width, outputs))


class Standardize(nn.Module):
    """x -> (x - mean) / std with statistics fixed from data (saved with the model as buffers)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, data: np.ndarray) -> Standardize:
        """Set mean and std from `data` [..., dim]; constant features keep std 1."""
        flat = torch.as_tensor(np.asarray(data, dtype=np.float32).reshape(-1, self.mean.numel()))
        std = flat.std(0)
        self.mean.copy_(flat.mean(0))
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def save_module(module: nn.Module, arch: Any, folder: str | Path, name: str) -> None:
    """`name`.safetensors (the state dict) and `name`.json (the architecture dataclass) in `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
              folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(asdict(arch), indent=1))


def load_module(cls: type, arch_cls: type, folder: str | Path, name: str) -> Any:
    """`cls(arch_cls(**json))` with the weights that `save_module` wrote, in eval mode; DataError names a bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, arch = folder / f"{name}.safetensors", folder / f"{name}.json"
    if not weights.is_file() or not arch.is_file():
        raise FileNotFoundError(f"{folder} holds no {name.replace('_', ' ')} ({arch.name} and {weights.name})")
    try:
        module = cls(arch_cls(**json.loads(arch.read_text())))
    except (ValueError, TypeError) as err:  # not JSON, not an object, unknown or ill-typed fields
        raise DataError(f"{arch}: not a {name.replace('_', ' ')} description ({err})") from None
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise DataError(f"{weights}: not a readable safetensors file ({err})") from None
    load_weights(module, state, f"{weights}: the weights do not fit {arch.name}")
    return module.eval()


def load_weights(module: nn.Module, state: Any, where: str) -> None:
    """Load a state dict into `module` if it has exactly the module's tensor names and shapes, else DataError(where)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{where}: expected a state dict of tensors, got a {type(state).__name__}")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])[:3]
        raise DataError(f"{where} (missing {sorted(expected.keys() - found.keys())[:3]}, unexpected "
                        f"{sorted(found.keys() - expected.keys())[:3]}, other shapes {wrong})")
    module.load_state_dict(state)
