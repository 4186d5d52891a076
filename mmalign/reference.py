"""The reference policy pi_ref that every log-ratio r = s_policy - s_ref is measured against.

Every kind is a `Reference`, used as `reference.scores(score_fn, policy, batch)` under no_grad, where
`score_fn(model, batch)` is the modality's scoring function:

    AdapterDisabled   the policy itself with its peft/diffusers LoRA adapter switched off (no second copy)
    FrozenCopy        a frozen deep copy taken before training, optionally cast to the training dtype and
                      optionally kept on the CPU and streamed to the device (accelerate's cpu_offload), or
                      sharded across processes like the policy (`Trainer.shard_frozen`, under FSDP)
    CachedScores      scores precomputed once per record (`CachedScores.build`), looked up by batch["index"]
    Snapshots         a frozen copy loaded with one of the policy's earlier states (SePPO); also `Stateful`
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Collection
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

ScoreFn = Callable[[nn.Module, Any], Any]


@runtime_checkable
class Reference(Protocol):
    """Where s_ref comes from: `scores(score_fn, policy, batch)`, computed without gradients."""

    def scores(self, score_fn: ScoreFn, policy: nn.Module, batch: Any) -> Any: ...


@runtime_checkable
class Stateful(Protocol):
    """Training state that a checkpoint keeps (a reference that changes during training, a counter)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP/compile wrappers."""
    while isinstance(inner := getattr(model, "module", None), nn.Module):
        model = inner
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, nn.Module) else model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run `model` with its LoRA adapters off: peft's PeftModel.disable_adapter(), or, for diffusers/transformers
    models with an adapter, each peft tuner layer's `_disable_adapters` flag flipped and restored.

    Flipping the flag is what peft's own disable/enable does, minus switching `requires_grad` on every adapter
    weight twice per step, which costs more than the flip itself and is moot under no_grad.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = unwrap(model)
    disable = getattr(model, "disable_adapter", None)
    if callable(disable):
        with disable():
            yield model
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter to disable; use a FrozenCopy reference")
    states = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, states):
            layer._disable_adapters = state


class AdapterDisabled:
    """s_ref = the policy's score with its adapter disabled (the LoRA default)."""

    @torch.no_grad()
    def scores(self, score_fn: ScoreFn, policy: nn.Module, batch: Any) -> Any:
        with adapters_disabled(policy) as base:
            return score_fn(base, batch)


class FrozenCopy:
    """s_ref from a frozen deep copy of the policy, optionally cast to `dtype`, CPU-offloaded, or passed through `shard`
    (`Trainer.shard_frozen`: sharded like the policy under FSDP)."""

    def __init__(self, policy: nn.Module, dtype: torch.dtype | None = None, offload: bool = False,
                 device: torch.device | str | None = None, shard: Callable[[nn.Module], nn.Module] | None = None):
        policy = unwrap(policy)
        device = torch.device(device) if device is not None else next(policy.parameters()).device
        self.model = copy.deepcopy(policy).requires_grad_(False).eval()
        if dtype is not None:
            self.model.to(dtype)
        if offload and device.type != "cpu":
            from accelerate import cpu_offload

            self.model.to("cpu")
            cpu_offload(self.model, execution_device=device)
        else:
            self.model.to(device)
        if shard is not None:
            if offload:
                raise ValueError("a frozen copy is either offloaded to the CPU or sharded, not both")
            self.model = shard(self.model)

    @torch.no_grad()
    def scores(self, score_fn: ScoreFn, policy: nn.Module, batch: Any) -> Any:
        return score_fn(self.model, batch)


class CachedScores:
    """s_ref looked up per record: `table[batch['index']]`, from a table built once with `build`."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    @classmethod
    @torch.no_grad()
    def build(cls, reference: AdapterDisabled | FrozenCopy, score_fn: ScoreFn, policy: nn.Module,
              batches: Any, size: int, skipped: Collection[int] = ()) -> CachedScores:
        """Score every batch (each carrying 'index') once with `reference`; the result is [size, ...] on the CPU. The
        records `skipped` (known once `batches` is spent: rows that cannot be loaded, which training skips) are left
        unscored, NaN."""
        table: torch.Tensor | None = None
        filled = torch.zeros(size, dtype=torch.bool)
        for batch in batches:
            scores = reference.scores(score_fn, policy, batch).detach().float().cpu()
            if table is None:
                table = torch.zeros((size, *scores.shape[1:]))
            index = torch.as_tensor(batch["index"]).cpu()
            table[index], filled[index] = scores, True
        if table is not None:
            table[list(skipped)] = torch.nan
            filled[list(skipped)] = True
        if table is None or not bool(filled.all()):
            raise ValueError(f"the cache covers {int(filled.sum())} of {size} records; every record must be scored")
        return cls(table)

    def scores(self, score_fn: ScoreFn, policy: nn.Module, batch: Any) -> torch.Tensor:
        index = torch.as_tensor(batch["index"]).cpu()
        device = next(unwrap(policy).parameters()).device
        return self.table[index].to(device)

    def save(self, path: str) -> None:
        """Write the table as safetensors."""
        from safetensors.torch import save_file

        save_file({"scores": self.table.contiguous()}, path)

    @classmethod
    def load(cls, path: str) -> CachedScores:
        """Read a table written by `save`."""
        from safetensors.torch import load_file

        return cls(load_file(path)["scores"])


class Snapshots:
    """s_ref from an earlier state of the policy: a frozen copy loaded with one of the last `keep` snapshots of the
    trainable parameters, one taken every `every` calls of `tick` (SePPO's reference selection, Algorithm 1).

    `tick(policy)` counts a training micro-step and records a snapshot when due (the initial policy is the
    first); `select(generator)` loads a snapshot chosen uniformly at random ("uniform") or the newest
    ("latest") into the reference model. Pool and counter are training state (`state_dict`), so a resumed
    run continues with them.
    """

    def __init__(self, policy: nn.Module, keep: int = 7, every: int = 30, selection: str = "uniform",
                 dtype: torch.dtype | None = None):
        if selection not in ("uniform", "latest"):
            raise ValueError(f"selection must be uniform or latest, got {selection!r}")
        if keep < 1 or every < 1:
            raise ValueError(f"keep and every must be at least 1, got {keep} and {every}")
        self.keep, self.every, self.selection = keep, every, selection
        self.model = FrozenCopy(policy, dtype=dtype).model
        self.pool: list[dict[str, torch.Tensor]] = []
        self.ticks = 0

    def tick(self, policy: nn.Module) -> None:
        """Count one micro-step; record the policy's trainable parameters first and then every `every` ticks."""
        if self.ticks % self.every == 0:
            self.record(policy)
        self.ticks += 1

    def record(self, policy: nn.Module) -> None:
        """Add the policy's trainable parameters (on the CPU) to the pool, dropping the oldest beyond `keep`."""
        state = {n: p.detach().to("cpu", copy=True) for n, p in unwrap(policy).named_parameters() if p.requires_grad}
        self.pool = (self.pool + [state])[-self.keep:]

    def select(self, generator: torch.Generator | None = None) -> int:
        """Load a snapshot into the reference model; returns its index in the pool (0 = oldest kept)."""
        if self.selection == "latest":
            index = len(self.pool) - 1
        else:
            device = generator.device if generator is not None else "cpu"
            index = int(torch.randint(len(self.pool), (1,), generator=generator, device=device))
        self.model.load_state_dict(self.pool[index], strict=False)
        return index

    @torch.no_grad()
    def scores(self, score_fn: ScoreFn, policy: nn.Module, batch: Any) -> Any:
        return score_fn(self.model, batch)

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "ticks": self.ticks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool, self.ticks = state["pool"], state["ticks"]
