"""One `accelerate` training loop for every modality: `Trainer(config).fit(model, dataset, collate, step_fn)`.

The modality supplies `step_fn(model, batch, generator) -> (loss, metrics)`; the loop owns the rest:
mixed precision (no/fp16/bf16), gradient accumulation and clipping, a warm-up LR schedule, seeding,
tqdm progress, TensorBoard (accelerate trackers) plus `metrics.jsonl` (one object per optimizer step),
atomic checkpoints (written to a temp folder, then renamed; the last K kept), exact resume, and a
guard that stops on a non-finite loss and leaves the last good checkpoint untouched.

Exact resume is by construction: the data order of epoch e is a permutation seeded by (seed, e), and
the randomness of micro-step k on process p (noise, timesteps, prompt dropout) comes from the
`generator` seeded by (seed, k, p). A resumed run therefore sees the same batches and draws as an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import send_to_device, set_seed
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from mmalign.config import option, save_config, to_dict
from mmalign.reference import _unwrap

StepFn = Callable[[nn.Module, Any, torch.Generator], "tuple[torch.Tensor, dict[str, Any]]"]
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped and no checkpoint was written after it."""


@dataclass
class TrainConfig:
    """Settings of the shared training loop (every method's config extends this)."""

    output: Path = option(None, "run directory: config, metrics, checkpoints, weights and pictures")
    max_steps: int = option(1000, "optimizer steps to train for")
    batch_size: int = option(4, "examples (pairs) per device per micro-step")
    gradient_accumulation_steps: int = option(1, "micro-steps per optimizer step")
    learning_rate: float = option(1e-5, "peak learning rate")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = option(
        "constant_with_warmup", "learning-rate schedule after warm-up")
    warmup_steps: int = option(0, "linear warm-up steps from 0 to the peak learning rate")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    weight_decay: float = option(1e-2, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    use_8bit_adam: bool = option(False, "bitsandbytes 8-bit AdamW (needs the [gpu] extra)")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0 turns clipping off)")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "autocast precision; frozen parts are cast to it")
    seed: int = option(0, "seed of the data order, noise and initialisation")
    checkpoint_every: int = option(500, "write a checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = option(3, "how many recent checkpoints to keep")
    resume: str | None = option(None, "'latest' or a checkpoint folder to continue from")
    report_to: Literal["tensorboard", "none"] = option("tensorboard", "tracker besides metrics.jsonl")
    num_workers: int = option(0, "data-loading worker processes")
    cpu: bool = option(False, "train on the CPU even when a GPU is present")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "num_workers", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.output is None:
            raise ValueError("output (the run directory) is required")
        self.output = Path(self.output)


class EpochBatchSampler(Sampler):
    """This process's share of each global batch; epoch e's order is randperm(n) seeded by (seed, e); drops the tail."""

    def __init__(self, size: int, batch_size: int, num_processes: int, rank: int, seed: int, start_batch: int = 0):
        self.size, self.batch_size, self.num_processes, self.rank = size, batch_size, num_processes, rank
        self.seed, self.start_batch = seed, start_batch
        self.per_epoch = size // (batch_size * num_processes)
        if self.per_epoch == 0:
            raise ValueError(f"the dataset has {size} usable examples, fewer than one global batch of "
                             f"{batch_size * num_processes} ({batch_size} per device x {num_processes} processes)")

    def __iter__(self):
        batch = self.start_batch
        while True:
            epoch, position = divmod(batch, self.per_epoch)
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            start = (position * self.num_processes + self.rank) * self.batch_size
            yield order[start:start + self.batch_size].tolist()
            batch += 1

    def __len__(self) -> int:
        return 2**62


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at step s: linear warm-up over `warmup` steps, then constant/linear/cosine decay."""
    def factor(step: int) -> float:
        if kind != "constant" and step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    return factor


def step_generator(seed: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """The random stream of one micro-step on one process, a pure function of (seed, micro_step, rank)."""
    state = int(np.random.SeedSequence([seed, micro_step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


def checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints under output/checkpoints, oldest first (folders with a trainer_state.json)."""
    root = Path(output) / "checkpoints"
    found = [p for p in root.glob(CHECKPOINT_PREFIX + "*") if (p / TRAINER_STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


class Trainer:
    """The shared loop. Create it first (models are placed on `trainer.device` in `trainer.weight_dtype`), then `fit`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        set_seed(config.seed)  # the model set-up that follows (e.g. a LoRA's random init) is part of the run
        AcceleratorState._reset_state()  # a process may train several runs (Python API, tests) with other precisions
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with="tensorboard" if config.report_to == "tensorboard" else None, project_dir=str(config.output),
            cpu=config.cpu)
        self.device = self.accelerator.device
        self.weight_dtype = DTYPES[config.mixed_precision]
        self.is_main = self.accelerator.is_main_process
        self.resume_from = self._find_resume()
        if self.is_main:
            config.output.mkdir(parents=True, exist_ok=True)
            save_config(config, config.output / "config.yaml")
        self.accelerator.wait_for_everyone()

    def _find_resume(self) -> Path | None:
        config = self.config
        existing = checkpoints(config.output)
        if config.resume is None:
            if existing:
                raise FileExistsError(f"{config.output} already holds checkpoints ({existing[-1].name}); pass "
                                      "--resume latest to continue that run, or choose another --output")
            return None
        if config.resume == "latest":
            if not existing:
                self.accelerator.print(f"no checkpoint under {config.output}/checkpoints; starting a new run")
                return None
            return existing[-1]
        path = Path(config.resume)
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"--resume {path}: not a complete checkpoint (no {TRAINER_STATE} inside)")
        return path

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        kwargs = dict(lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay,
                      eps=c.adam_epsilon)
        if c.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError("use_8bit_adam needs bitsandbytes: pip install 'mmalign[gpu]'") from err
            return bnb.optim.AdamW8bit(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def _register_trainable_state(self, model: nn.Module) -> None:
        """Checkpoint only the trainable parameters (a LoRA is megabytes, its frozen base is not saved again)."""
        from safetensors.torch import load_file, save_file

        def save_hook(models, weights, output_dir):
            if self.is_main:
                state = {n: p.detach().contiguous().cpu() for n, p in _unwrap(model).named_parameters() if p.requires_grad}
                save_file(state, os.path.join(output_dir, "trainable.safetensors"))
            weights.clear()

        def load_hook(models, input_dir):
            state = load_file(os.path.join(input_dir, "trainable.safetensors"))
            trainable = {n for n, p in _unwrap(model).named_parameters() if p.requires_grad}
            if set(state) != trainable:
                missing, extra = sorted(trainable - set(state))[:5], sorted(set(state) - trainable)[:5]
                raise ValueError(f"checkpoint {input_dir} does not match the model being trained "
                                 f"(missing {missing}, unexpected {extra}); was it made with other settings?")
            _unwrap(model).load_state_dict(state, strict=False)
            models.clear()

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def fit(self, model: nn.Module, dataset: Any, collate: Callable, step_fn: StepFn,
            save_model: Callable[[nn.Module, Path], None] | None = None, stateful: tuple = ()) -> list[dict[str, float]]:
        """Train `model`'s trainable parameters on `dataset` for max_steps optimizer steps; returns the logged metrics.

        `stateful` objects (with state_dict/load_state_dict) are saved in every checkpoint and restored on resume.
        """
        c, acc = self.config, self.accelerator
        set_seed(c.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        optimizer = self._optimizer(params)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(c.lr_scheduler, c.warmup_steps, c.max_steps))
        self._register_trainable_state(model)
        model, optimizer = acc.prepare(model, optimizer)
        for obj in (schedule, *stateful):
            acc.register_for_checkpointing(obj)

        step = 0
        if self.resume_from is not None:
            acc.load_state(str(self.resume_from))
            state = json.loads((self.resume_from / TRAINER_STATE).read_text())
            step = state["step"]
            if state.get("num_processes", acc.num_processes) != acc.num_processes:
                acc.print(f"warning: {self.resume_from} was written by {state['num_processes']} processes, this run has "
                          f"{acc.num_processes}; training continues, but not in the same data order")
            acc.print(f"resumed from {self.resume_from} at step {step}")
        self._trim_metrics(step)
        if c.report_to == "tensorboard":
            acc.init_trackers("tensorboard", config={k: v for k, v in to_dict(c).items()
                                                 if isinstance(v, (int, float, str, bool))})

        accum = c.gradient_accumulation_steps
        sampler = EpochBatchSampler(len(dataset), c.batch_size, acc.num_processes, acc.process_index, c.seed,
                                    start_batch=step * accum)
        batches = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=c.num_workers))
        progress = tqdm(total=c.max_steps, initial=step, disable=not self.is_main, desc="train")
        history, sums = [], {}
        model.train()
        micro_step = step * accum
        while step < c.max_steps:
            batch = send_to_device(next(batches), self.device)
            generator = step_generator(c.seed, micro_step, acc.process_index, self.device)
            with acc.accumulate(model), acc.autocast():
                loss, metrics = step_fn(model, batch, generator)
                self._check_finite(loss, step)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(params, c.max_grad_norm) if c.max_grad_norm > 0 else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float32, device=self.device).detach()
            if not acc.sync_gradients:
                continue
            schedule.step()
            step += 1
            logged = {k: acc.reduce(v / accum, "mean").item() for k, v in sums.items()}
            logged.update(step=step, lr=schedule.get_last_lr()[0])
            if grad_norm is not None:
                logged["grad_norm"] = float(grad_norm)
            sums = {}
            history.append(logged)
            self._log(logged)
            progress.update(1)
            progress.set_postfix(loss=f"{logged['loss']:.4f}")
            if (c.checkpoint_every and step % c.checkpoint_every == 0) or step == c.max_steps:
                self.save_checkpoint(step)
        progress.close()
        acc.wait_for_everyone()
        if save_model is not None and self.is_main:
            save_model(acc.unwrap_model(model), c.output)
        acc.wait_for_everyone()
        acc.end_training()
        return history

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        finite = self.accelerator.reduce(torch.isfinite(loss.detach()).float().reshape(1), "min")
        if finite.item() < 1:
            last = checkpoints(self.config.output)
            raise NonFiniteLossError(
                f"the loss is {loss.item()} (not finite) at optimizer step {step + 1}; training stopped. "
                f"The last good checkpoint is {last[-1] if last else 'none (no checkpoint was written yet)'}; "
                "nothing was saved after it. Lower the learning rate or beta, or use bf16 instead of fp16.")

    def _log(self, logged: dict[str, float]) -> None:
        self.accelerator.log({k: v for k, v in logged.items() if k != "step"}, step=int(logged["step"]))
        if self.is_main:
            with open(self.config.output / "metrics.jsonl", "a") as f:
                f.write(json.dumps(logged) + "\n")

    def _trim_metrics(self, step: int) -> None:
        """Drop metrics logged after `step` by an interrupted run, so the file matches the resumed one."""
        path = self.config.output / "metrics.jsonl"
        if self.is_main and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def save_checkpoint(self, step: int) -> Path:
        """Write the full training state to checkpoints/.tmp-checkpoint-N, then rename it; prune beyond keep_checkpoints."""
        acc = self.accelerator
        root = self.config.output / "checkpoints"
        final, tmp = root / f"{CHECKPOINT_PREFIX}{step}", root / f".tmp-{CHECKPOINT_PREFIX}{step}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if self.is_main:
            state = tmp / TRAINER_STATE
            with open(state, "w") as f:
                json.dump({"step": step, "seed": self.config.seed, "num_processes": acc.num_processes}, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in checkpoints(self.config.output)[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final
