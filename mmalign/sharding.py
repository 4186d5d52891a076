"""What the trainer needs of a sharded launch (accelerate's FSDP2 plugin), and nothing more.

Sharding itself is accelerate's: `accelerate launch --config_file` a file of `mmalign/accelerate_configs` (or any of
the user's) selects the plugin, `Accelerator.prepare` shards. This module states what changes for the trainer:

    kind            "fsdp", "zero1", "zero2", "zero3" or None: how the trained model's state is spread across processes
    options         the Accelerator's device options: DeepSpeed on a machine without GPUs runs on its CPU accelerator
    select_cpu_fsdp accelerate routes FSDP to accelerator devices only; on the CPU (ACCELERATE_USE_CPU, gloo) it picks
                    the same FSDP2 path here, so tests and laptops run the code path of a GPU cluster
    meta_twin       an unsharded copy of a model without memory (meta tensors), taken before sharding: the gathered
                    full weights are loaded into it on the main process (`load_twin`) and the method saves it as it
                    saves any model
    lift_scalars    scalar parameters (CLIP's logit scale), which FSDP2 cannot shard nor DeepSpeed broadcast, made
                    1-element vectors; the twin keeps their shape, so the model written at the end is the one the
                    method loads
    full_state      the trainable weights and optimizer state gathered into one ordinary state (torch's
                    `get_state_dict`, full_state_dict on the CPU of the main process), and `load_full_state` the way
                    back (`set_state_dict`): checkpoints stay safetensors + JSON
    declare_blocks  the shard units: the blocks a model declares unsplittable (`_no_split_modules`) that it has
    forward_methods methods besides forward that a step calls on the model (a VLM's get_image_features), made to
                    gather the parameters as forward does
    shard_frozen    a frozen module (the --full reference copy) sharded like the policy (accelerate's
                    `fsdp2_prepare_model`), so it costs 1/N of a model per process

DeepSpeed ZeRO (stages 1-3) goes through `mmalign.zero`, which gathers and restores the same states with DeepSpeed's
per-parameter API. Checkpoints are neither accelerate's `save_state` (torch.distributed.checkpoint, whose metadata
file is a pickle) nor DeepSpeed's (each process's partition pickled): mmalign never unpickles a checkpoint
(`mmalign.state`), so every kind writes the whole state as safetensors + JSON, its optimizer state by parameter name.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
from torch import nn

from mmalign.errors import ConfigError

Kind = Literal["fsdp", "zero1", "zero2", "zero3"] | None
ZERO: tuple[Kind, ...] = ("zero1", "zero2", "zero3")  # the kinds `mmalign.zero` serves


def select_cpu_fsdp(accelerator: Accelerator) -> None:
    """Switch a multi-process CPU launch that asked for FSDP (ACCELERATE_USE_FSDP, e.g. `--config_file fsdp.yaml`
    with ACCELERATE_USE_CPU=1) to accelerate's FSDP2 path with the plugin the launch described; accelerate itself
    selects FSDP on accelerator devices only, and would otherwise run plain DDP."""
    if accelerator.distributed_type != DistributedType.MULTI_CPU or not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP  # as accelerate does


def options(cpu: bool) -> dict[str, Any]:
    """The Accelerator's device options for a launch: `cpu` as given, except under DeepSpeed on a machine without
    GPUs, which accelerate would run as plain DDP when told `cpu`: there DeepSpeed runs on its CPU accelerator with the
    gloo backend, as asked."""
    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or torch.cuda.is_available():
        return {"cpu": cpu}
    from accelerate.utils import InitProcessGroupKwargs

    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def kind(accelerator: Accelerator) -> Kind:
    """"fsdp" (FSDP2), "zero1"/"zero2"/"zero3" (DeepSpeed) or None (DDP, one process); FSDP1, ZeRO stage 0, fp16
    under ZeRO and a DeepSpeed launch that did not start are refused, naming what to use instead."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from mmalign import zero

        stage = zero.stage(accelerator)
        if stage == 0:
            raise ConfigError("DeepSpeed ZeRO stage 0 shards nothing; launch with DDP "
                              "(mmalign/accelerate_configs/ddp.yaml) or set zero_stage: 2 (zero2.yaml)")
        if accelerator.mixed_precision == "fp16":
            raise ConfigError("--mixed-precision fp16 under DeepSpeed: its dynamic loss scale lives in DeepSpeed's "
                              "pickled checkpoints only, so a resumed run would not continue it; use bf16")
        return f"zero{stage}"  # type: ignore[return-value]
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError("the launch asked for DeepSpeed, but accelerate started without it because the CPU was "
                          "asked for (ACCELERATE_USE_CPU=1 or use_cpu: true); drop that: on a machine without GPUs "
                          "DeepSpeed runs on the CPU by itself")
    if accelerator.distributed_type == DistributedType.FSDP:
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise ConfigError("FSDP version 1 is not supported; set fsdp_version: 2 in the accelerate config "
                              "(mmalign/accelerate_configs/fsdp.yaml)")
        return "fsdp"
    return None


def runs_collective(sharding: Kind) -> bool:
    """Whether the trained model's forward needs every process: its parameters are gathered as it runs (FSDP, ZeRO-3)
    rather than held whole by each process (DDP, ZeRO-1/2)."""
    return sharding in ("fsdp", "zero3")


def meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and persistent buffers are meta tensors (no memory); what a full state
    dict is later loaded into with `load_state_dict(state, assign=True)`. Non-persistent buffers (rotary
    frequencies) are copied as they are, for no state dict holds them."""
    memo: dict[int, Any] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def lift_scalars(model: nn.Module) -> None:
    """Replace every 0-dimensional parameter of `model` by a 1-element vector of the same value and requires_grad
    (`fully_shard` refuses scalars, DeepSpeed's broadcast fails on them); broadcasting keeps the forward's results
    unchanged."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(module, name, nn.Parameter(param.detach().reshape(1), param.requires_grad))


def load_twin(twin: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """`twin` (a `meta_twin`) holding the gathered `weights`, each reshaped to the twin's own shape (a lifted scalar
    back to 0 dimensions)."""
    shapes = twin.state_dict(keep_vars=True)
    twin.load_state_dict({name: value.reshape(shapes[name].shape) if name in shapes else value
                          for name, value in weights.items()}, assign=True)
    return twin


def _options(cpu_offload: bool = False, ignore_frozen_params: bool = False):
    """torch's options for a whole (unsharded) state: gathered onto the main process's CPU, or loaded from one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload, ignore_frozen_params=ignore_frozen_params,
                            strict=False)


def full_state(accelerator: Accelerator, model: nn.Module,
               optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable weights, optimizer state) of a sharded model gathered whole onto the main process's CPU (empty on the
    others), parameters named as in the unsharded model; every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if kind(accelerator) in ZERO:
        from mmalign import zero

        return zero.full_state(accelerator, model, optimizer)

    return get_state_dict(model, optimizer, options=_options(cpu_offload=True, ignore_frozen_params=True))


def full_weights(accelerator: Accelerator, model: nn.Module) -> dict[str, Any]:
    """Every weight of a sharded model, gathered whole onto the main process's CPU (empty on the others); every
    process must call it. (accelerate's `get_state_dict` asks torch to broadcast as well, which on the CPU hands back
    the shards.)"""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if kind(accelerator) in ZERO:
        from mmalign import zero

        return zero.full_weights(accelerator, model)

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_full_state(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                    weights: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
    """Put a state `full_state` wrote back into the sharded model and optimizer (each process keeps its shard); every
    process must call it with the same state."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if kind(accelerator) in ZERO:
        from mmalign import zero

        zero.load_full_state(accelerator, model, optimizer, weights, optimizer_state)
        return

    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state,
                   options=_options())


def declare_blocks(accelerator: Accelerator, model: nn.Module) -> None:
    """Under FSDP with the transformer-based wrap and no class named in the launch config, wrap the blocks `model`
    declares unsplittable (`_no_split_modules`) that it contains: a model class may list blocks its configuration
    lacks (LLaVA names CLIPTextEmbeddings beside a vision-only CLIP), which accelerate would refuse."""
    if kind(accelerator) != "fsdp":
        return
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
        present = {type(m).__name__ for m in model.modules()}
        plugin.transformer_cls_names_to_wrap = [n for n in getattr(model, "_no_split_modules", None) or []
                                                if n in present]


def forward_methods(accelerator: Accelerator, model: nn.Module, names: tuple[str, ...]) -> None:
    """Under FSDP, let the methods `names` of the sharded `model` gather its parameters as its forward does (torch's
    `register_fsdp_forward_method`); without, a method called directly would meet the shards."""
    if kind(accelerator) != "fsdp":
        return
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name in names:
        register_fsdp_forward_method(model, name)


def shard_frozen(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """`module` sharded in place like the policy under FSDP2 (the launch's wrap policy and mixed precision) or ZeRO-3
    (`zero.shard_frozen`); unchanged otherwise. A frozen module is never given to the optimizer, so accelerate's
    `prepare` (which pairs one model with its optimizer) does not take it."""
    if kind(accelerator) in ZERO:
        from mmalign import zero

        return zero.shard_frozen(accelerator, module)
    if kind(accelerator) != "fsdp":
        return module
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    declare_blocks(accelerator, module)
    return fsdp2_prepare_model(accelerator, module)
