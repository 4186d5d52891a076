"""What the trainer needs of a DeepSpeed ZeRO launch (accelerate's DeepSpeed plugin), through DeepSpeed's public
per-parameter API (`deepspeed.utils.safe_get_full_*` / `safe_set_full_*`):

    load_whole      models load whole (no zero.Init) and are partitioned by their engines when training starts
    configure       the micro-batch, accumulation and clipping of DeepSpeed's config set from mmalign's --batch-size,
                    --gradient-accumulation-steps and --max-grad-norm (they override the config file's)
    full_state      the trainable fp32 master weights and the optimizer state gathered whole, in the layout of torch's
                    full optimizer state dict (by parameter name), which FSDP's checkpoints have too
    load_full_state the way back: every process keeps its partition
    full_weights    every weight gathered whole (ZeRO-3 partitions the frozen ones too)
    shard_frozen    ZeRO-3: a frozen module (the --full reference copy) partitioned by an engine without optimizer, as
                    TRL does for its reference; ZeRO-1/2 keep it whole on every process, as DDP does

So a ZeRO checkpoint is safetensors + JSON like every other; DeepSpeed's own `save_checkpoint` writes each process's
partition as a pickle, which resuming would load (`mmalign.state`).
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from mmalign.reference import unwrap


def stage(accelerator: Accelerator) -> int:
    """The ZeRO stage of a DeepSpeed launch (0-3)."""
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def configure(accelerator: Accelerator, batch_size: int, accumulation: int, max_grad_norm: float) -> None:
    """Set DeepSpeed's batch and clipping from mmalign's flags before `prepare`: train_micro_batch_size_per_gpu =
    --batch-size, gradient_accumulation_steps, train_batch_size = their product x processes, gradient_clipping =
    --max-grad-norm (0: none)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=accumulation,
                  train_batch_size=batch_size * accumulation * accelerator.num_processes,
                  gradient_clipping=max_grad_norm)


def load_whole() -> None:
    """Let `from_pretrained` load every model whole, as without DeepSpeed: under ZeRO-3 accelerate registers its config
    with transformers, which then partitions each model as it loads (zero.Init, the config's zero3_init_flag) and
    leaves the frozen ones (a text encoder, a VAE) without an engine to gather them. The engines partition the models
    they own (the trained one, `shard_frozen`'s) when training starts."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _trained(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in unwrap(model).named_parameters() if p.requires_grad]


def _base(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's and DeepSpeed's wrappers; it steps this process's flat fp32
    partitions."""
    return optimizer.optimizer.optimizer


def _flats(optimizer: Any) -> list[torch.Tensor]:
    """This process's flat fp32 partitions, the keys of the base optimizer's state (ZeRO-3 names them otherwise)."""
    zero = optimizer.optimizer
    return list(getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups)


def _initialized(optimizer: Any) -> torch.optim.Optimizer:
    """The base optimizer with its state made (DeepSpeed makes Adam's moments at the first step): for each flat
    partition one step of zero gradients at lr 0, which changes no weight, then its step count set back to 0 (a fresh
    Adam's)."""
    zero, base = optimizer.optimizer, _base(optimizer)
    if not base.state:
        groups, owner = base.param_groups, getattr(zero, "sub_group_to_group_id", None)  # ZeRO-3: sub-groups
        for i, flat in enumerate(_flats(optimizer)):
            base.param_groups = [{**groups[owner[i] if owner is not None else i], "params": [flat], "lr": 0.0}]
            flat.grad = torch.zeros_like(flat)
            base.step()
            flat.grad = None
            base.state[flat]["step"].zero_()
        base.param_groups = groups
    link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2: per-parameter views of the state
    if link is not None:
        link()
    return base


def _moments(optimizer: Any) -> tuple[torch.Tensor, list[str]]:
    """(the step count, the names of the per-element states, e.g. exp_avg and exp_avg_sq) of the base optimizer."""
    flat = _flats(optimizer)[0]
    state = _base(optimizer).state[flat]
    return state["step"], sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)


def full_state(accelerator: Accelerator, model: nn.Module,
               optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable fp32 weights, optimizer state by parameter name) gathered whole onto the main process's CPU (empty on
    the others); every process must call it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = _initialized(optimizer)
    step, keys = _moments(optimizer)
    main = accelerator.is_main_process
    weights: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in _trained(model):
        weight = safe_get_full_fp32_param(p)
        moments = {key: safe_get_full_optimizer_state(p, key) for key in keys}
        if main:
            weights[name] = weight.cpu()
            state[name] = {"step": step.detach().cpu().clone(), **{k: v.cpu() for k, v in moments.items()}}
    groups = [{**{k: v for k, v in base.param_groups[0].items() if k != "params"}, "params": list(state)}]
    return weights, ({"state": state, "param_groups": groups} if main else {})


def load_full_state(accelerator: Accelerator, model: nn.Module, optimizer: Any, weights: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any]) -> None:
    """Put a state `full_state` wrote back: each process keeps its partition of the fp32 weights and moments, the
    model's own (maybe bf16) copy takes the weights, and the step count and hyperparameters are restored; every
    process must call it with the same state."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = _initialized(optimizer)
    step, keys = _moments(optimizer)
    saved = optimizer_state["state"]
    for name, p in _trained(model):
        weight = weights[name].to(accelerator.device)
        safe_set_full_fp32_param(p, weight)
        for key in keys:
            safe_set_full_optimizer_state(p, saved[name][key].to(accelerator.device), key)
        _set_model_copy(accelerator, p, weight)
    if saved:
        count = next(iter(saved.values()))["step"]
        for flat in _flats(optimizer):
            base.state[flat]["step"] = count.to(step.device, step.dtype).clone()
    hyper = {k: v for k, v in optimizer_state["param_groups"][0].items() if k != "params"}
    for group in base.param_groups:
        group.update(hyper)


def _set_model_copy(accelerator: Accelerator, param: nn.Parameter, weight: torch.Tensor) -> None:
    """The parameter the forward uses set to `weight` (in its dtype): whole on every process under ZeRO-1/2, through a
    gather that the main process modifies under ZeRO-3."""
    if stage(accelerator) < 3:
        param.data.copy_(weight.to(param.dtype).reshape(param.shape))
        return
    from deepspeed.runtime.zero import GatheredParameters

    with GatheredParameters([param], modifier_rank=0):
        if accelerator.is_main_process:
            param.data.copy_(weight.to(param.dtype).reshape(param.shape))


def full_weights(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight and persistent buffer of the model gathered whole onto the main process's CPU (empty on the
    others), trainable ones as their fp32 masters; every process must call it."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, tensor in unwrap(model).state_dict(keep_vars=True).items():
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            value = safe_get_full_fp32_param(tensor)
        elif isinstance(tensor, nn.Parameter) and stage(accelerator) == 3:
            with GatheredParameters([tensor]):
                value = tensor.detach().clone()
        else:
            value = tensor.detach()
        if accelerator.is_main_process:
            state[name] = value.cpu()
    return state


def shard_frozen(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """Under ZeRO-3, `module` partitioned across the processes by a DeepSpeed engine that has no optimizer (its forward
    then needs every process); whole otherwise. The module is returned, its engine kept on it."""
    if stage(accelerator) < 3:
        return module
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    object.__setattr__(module, "_zero_engine", engine)  # kept alive with the module, not a submodule of it
    return module
