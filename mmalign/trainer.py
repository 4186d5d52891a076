"""One `accelerate` training loop for every modality: `Trainer(config).fit(model, dataset, collate, step_fn)`.

The modality supplies `step_fn(model, batch, generator) -> (loss, metrics)`; the loop owns the rest:
mixed precision (no/fp16/bf16), gradient accumulation and clipping, a warm-up LR schedule, seeding,
tqdm progress, TensorBoard (accelerate trackers) plus `metrics.jsonl` (one object per optimizer step),
atomic checkpoints (written to a temp folder, then renamed; the last K kept), exact resume, one run per
output folder (`run_folder`), a guard that stops on a non-finite loss and leaves the last good checkpoint
untouched, and a held-out evaluation every `eval_every` steps with its best checkpoint kept and an early stop
(`mmalign.heldout`). A row that cannot be loaded (`mmalign.errors.BadRow`: an image that does not decode) stops the
run naming it, its last checkpoint intact (`--bad-rows error`), or is skipped for the next row (`skip`); either way
it is listed with its file, index, field and reason in `bad_rows.jsonl`, and skipped rows are counted in the
`bad_rows` metric.

Exact resume is by construction: the data order of epoch e is a permutation seeded by (seed, e), and
the randomness of micro-step k on process p (noise, timesteps, prompt dropout) comes from the
`generator` seeded by (seed, k, p); the global RNGs (torch, numpy, random: dropout, anything a library
draws) are reseeded from (seed, k, p) too before every micro-step. A resumed run therefore sees the same
batches and draws as an uninterrupted one, and a checkpoint needs no RNG state. Data read as training goes
(`mmalign.stream.Stream`, --streaming) is batched by the stream itself, micro-step k again its batch k.

A checkpoint holds only safetensors and JSON (`mmalign.state`): the trainable parameters, the optimizer,
LR schedule and gradient-scaler states, and the methods' own training state. Nothing in it is unpickled,
so resuming from a checkpoint someone shared cannot run code; other files in a checkpoint are never read.

Launched with accelerate's FSDP2 plugin (`accelerate launch --config_file mmalign/accelerate_configs/fsdp.yaml`), the
model is sharded by `accelerate.prepare` and the loop changes only where `mmalign.sharding` says: checkpoints and the
final model are gathered whole onto the main process (the same files as unsharded), a frozen reference copy is sharded
too (`shard_frozen`), and what runs the model outside the step (held-out evaluation, sample grids) runs on every
process, for a sharded forward is a collective.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, send_to_device, set_seed
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from mmalign import run_folder, sharding, trackers, zero
from mmalign.config import option, save_config, to_dict
from mmalign.data import SKIP_LIMIT, Guarded, collate_guarded
from mmalign.errors import (
    BadRow,
    ConfigError,
    DataError,
    MissingDependencyError,
    NonFiniteLossError,
    RunFolderError,
    UserError,
)
from mmalign.files import follow_umask, write_atomically
from mmalign.heldout import Evaluation, HeldOut
from mmalign.plots import plot_metrics
from mmalign.reference import Stateful, unwrap
from mmalign.state import StateFormatError, load_state, save_state
from mmalign.stream import Stream

ModelT = TypeVar("ModelT", bound=nn.Module)
StepFn = Callable[[ModelT, Any, torch.Generator], "tuple[torch.Tensor, dict[str, Any]]"]
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
BAD_ROWS_FILE = "bad_rows.jsonl"
TRAINABLE_FILE = "trainable.safetensors"
BEST_PREFIX, BEST_FILE = "best-", "best.json"  # checkpoints/best-<step>, and the file naming it (mmalign.heldout)
EPOCH_SEED_STRIDE = 100_003  # epoch e of seed s is shuffled by seed s * stride + e: distinct for e < stride
CHECKPOINT_FORMAT = 2  # 1: accelerate's save_state (pickled optimizer, schedule and RNG states), no longer read
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    report_to: Literal["tensorboard", "wandb", "none"] = option(
        "tensorboard", "tracker besides metrics.jsonl (wandb: the [wandb] extra; see mmalign.trackers)")
    num_workers: int = option(0, "data-loading worker processes (they read and decode the data while the model trains)")
    bad_rows: Literal["error", "skip"] = option(
        "error", "a row that cannot be loaded in training (e.g. an image that does not decode): 'error' stops the run "
        "naming it, its last checkpoint intact; 'skip' trains on the next row instead; both list it in bad_rows.jsonl")
    cpu: bool = option(False, "train on the CPU even when a GPU is present")
    eval_every: int = option(0, "score the held-out set every N optimizer steps and at step 0, log it as eval/*, "
                                "keep the best checkpoint as checkpoints/best-<step> (0: never; the method's "
                                "held-out options say what is scored)")
    early_stop_patience: int = option(0, "stop when K evaluations in a row have not beaten the best held-out score "
                                         "while the training loss since the best is below its value at the best "
                                         "(0: never; see mmalign.heldout)")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "num_workers", "max_grad_norm", "weight_decay", "seed",
                     "eval_every", "early_stop_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.output is None:
            raise ValueError("output (the run directory) is required")
        if self.early_stop_patience and not self.eval_every:
            raise ValueError("early_stop_patience needs eval_every (the held-out score it watches)")
        self.output = Path(self.output)


class EpochBatchSampler(Sampler):
    """This process's share of each global batch; epoch e's order is randperm(n) seeded by seed * EPOCH_SEED_STRIDE + e;
    drops the tail."""

    def __init__(self, size: int, batch_size: int, num_processes: int, rank: int, seed: int, start_batch: int = 0):
        self.size, self.batch_size, self.num_processes, self.rank = size, batch_size, num_processes, rank
        self.seed, self.start_batch = seed, start_batch
        self.per_epoch = size // (batch_size * num_processes)
        if self.per_epoch == 0:
            raise DataError(f"the dataset has {size} usable examples, fewer than one global batch of "
                             f"{batch_size * num_processes} ({batch_size} per device x {num_processes} processes)")

    def __iter__(self):
        batch = self.start_batch
        while True:
            epoch, position = divmod(batch, self.per_epoch)
            generator = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
            order = torch.randperm(self.size, generator=generator)
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


def step_seeds(seed: int, micro_step: int, rank: int) -> tuple[int, int]:
    """Two independent seeds of one micro-step on one process, pure functions of (seed, micro_step, rank): the
    step's generator's, and the global RNGs' (below 2**32, numpy's limit)."""
    generator, global_rngs = np.random.SeedSequence([seed, micro_step, rank]).generate_state(2, dtype=np.uint64)
    return int(generator >> 1), int(global_rngs >> 32)


def step_generator(seed: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """The random stream of one micro-step on one process, a pure function of (seed, micro_step, rank)."""
    return torch.Generator(device=device).manual_seed(step_seeds(seed, micro_step, rank)[0])


def checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints under output/checkpoints, oldest first (folders with a trainer_state.json)."""
    root = Path(output) / "checkpoints"
    found = [p for p in root.glob(CHECKPOINT_PREFIX + "*") if (p / TRAINER_STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _leave_processes() -> None:
    """Destroy the default process group, at exit: a method may still run its sharded model after `fit` (a reward
    model's held-out evaluation), which needs every process joined."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Trainer:
    """The shared loop. Create it first (models are placed on `trainer.device` in `trainer.weight_dtype`), then `fit`.

    Creating it writes nothing: the run folder is created, locked and given its config by `begin`, which `fit`
    calls, and which a method calls itself before it writes anything else there (after its data is checked)."""

    def __init__(self, config: TrainConfig):
        self.config = config
        set_seed(config.seed)  # the model set-up that follows (e.g. a LoRA's random init) is part of the run
        AcceleratorState._reset_state(reset_partial_state=True)  # a process may train several runs (Python API,
        # tests, scripts/gpu_check.py) with other precisions; the processes stay joined (`_leave_processes`)
        trackers.check_installed(config.report_to)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=None if config.report_to == "none" else config.report_to, project_dir=str(config.output),
            **sharding.options(config.cpu))
        atexit.unregister(_leave_processes)  # once per process, however many runs it trains
        atexit.register(_leave_processes)
        sharding.select_cpu_fsdp(self.accelerator)
        self._check_processes()
        self.sharding = sharding.kind(self.accelerator)
        if self.sharding and config.use_8bit_adam:
            raise ConfigError(f"--use-8bit-adam: bitsandbytes' 8-bit AdamW does not take {self.sharding}'s sharded "
                              f"parameters; under {self.sharding} the optimizer state is already split across the "
                              "processes, so drop --use-8bit-adam (or launch with DDP, "
                              "mmalign/accelerate_configs/ddp.yaml)")
        if self.sharding in sharding.ZERO:
            zero.configure(self.accelerator, config.batch_size, config.gradient_accumulation_steps,
                           config.max_grad_norm)
            zero.load_whole()
        self.model_sharded = False  # true once `fit` has sharded the model: its forward is then a collective
        self.device = self.accelerator.device
        self.weight_dtype = DTYPES[config.mixed_precision]
        self.is_main = self.accelerator.is_main_process
        self.lock: run_folder.Lock | None = None
        self._on_main(lambda: run_folder.check(config.output, resuming=config.resume is not None))
        self.resume_from = self._find_resume()

    @property
    def runs_model(self) -> bool:
        """Whether this process runs the trained model's forward outside the step (evaluation, samples): the main
        process, or every process once the model is sharded so that its forward needs them all (FSDP, ZeRO-3)."""
        return self.is_main or self.model_sharded

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forwards' mixed precision: accelerate's autocast, or under DeepSpeed (which casts only the model it
        trains, once training starts, and leaves accelerate's autocast off) torch's in --mixed-precision's dtype, so
        the frozen parts and the model before training compute together."""
        if self.sharding in sharding.ZERO and self.weight_dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.weight_dtype)
        return self.accelerator.autocast()

    def _check_processes(self) -> None:
        """Refuse a launch whose processes did not join one run (e.g. --multi_gpu on a machine without GPUs)."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.accelerator.num_processes:
            raise ConfigError(
                f"the launcher started {launched} processes (WORLD_SIZE={launched}) but they did not join one run "
                f"(each sees {self.accelerator.num_processes} process); on a machine without GPUs launch with "
                "ACCELERATE_USE_CPU=1 (or pass --cpu) so the processes train together on the CPU")

    def _find_resume(self) -> Path | None:
        path = resume_checkpoint(self.config.output, self.config.resume)
        if path is None:
            if self.config.resume == "latest":
                self.accelerator.print(f"no checkpoint under {self.config.output}/checkpoints; starting a new run")
            return None
        if bool(read_trainer_state(path).get("sharding")) != bool(self.sharding):
            written, launched = (("a sharded (FSDP or ZeRO)", "without sharding") if not self.sharding else
                                 ("an unsharded", f"with {self.sharding}"))
            raise RunFolderError(f"checkpoint {path} was written by {written} launch and this one runs {launched}: "
                                 "sharded launches keep the optimizer state by parameter name, others by position; "
                                 "resume it with a launch like the one that wrote it (the same accelerate "
                                 "--config_file)")
        return path

    def _on_main(self, action: Callable[[], Any]) -> None:
        """Run `action` on the main process only; a UserError it raises stops every process with its message."""
        error = None
        if self.is_main:
            try:
                action()
            except UserError as err:
                error = err
        message = broadcast_object_list([str(error) if error else None])[0] if self.accelerator.num_processes > 1 \
            else error
        if error is not None:
            raise error
        if message:
            raise RunFolderError(f"the main process stopped: {message}")

    def begin(self) -> None:
        """Create the run folder, lock it for this run (`run_folder.acquire`), write the resolved config and start the
        tracker; once."""
        if self.lock is not None:
            return
        self.lock = run_folder.Lock(self.config.output)
        c = self.config

        def start() -> None:
            self.lock = run_folder.acquire(c.output, resuming=c.resume is not None)
            save_config(c, c.output / "config.yaml")

        self._on_main(start)
        self.accelerator.wait_for_everyone()  # the folder exists before any process starts its tracker
        step = int(read_trainer_state(self.resume_from)["step"]) if self.resume_from is not None else 0
        trackers.start(self.accelerator, c.report_to, {k: v for k, v in to_dict(c).items()
                                                       if isinstance(v, (int, float, str, bool))}, c.output, step)

    def shard_frozen(self, module: nn.Module) -> nn.Module:
        """A frozen module the step runs beside the policy (--full's reference copy), sharded like the policy under FSDP
        (its forward then needs every process); unchanged without sharding."""
        return sharding.shard_frozen(self.accelerator, module)

    def log_image(self, name: str, image: Image.Image, step: int) -> None:
        """Show `image` (a sample grid) in the run's tracker at optimizer step `step` (main process)."""
        if self.is_main:
            trackers.log_image(self.accelerator, self.config.report_to, name, image, step)

    def end(self) -> None:
        """Release the run folder's lock."""
        if self.lock is not None:
            self.lock.release()
        self.lock = None

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        betas = (c.adam_beta1, c.adam_beta2)
        if c.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise MissingDependencyError("use_8bit_adam needs bitsandbytes: pip install 'mmalign[gpu]'") from err
            return bnb.optim.AdamW8bit(params, lr=c.learning_rate, betas=betas, weight_decay=c.weight_decay,
                                       eps=c.adam_epsilon)
        return torch.optim.AdamW(params, lr=c.learning_rate, betas=betas, weight_decay=c.weight_decay,
                                 eps=c.adam_epsilon)

    def fit(self, model: ModelT, dataset: Any, collate: Callable, step_fn: StepFn[ModelT],
            save_model: Callable[[ModelT, Path], object] | None = None, stateful: tuple[Stateful, ...] = (),
            finish: Callable[[], object] | None = None, evaluation: Evaluation | None = None,
            forward_methods: tuple[str, ...] = ()) -> list[dict[str, float]]:
        """Train `model`'s trainable parameters on `dataset` for max_steps optimizer steps; returns the logged metrics.

        `stateful` objects (with state_dict/load_state_dict, states of tensors, numbers and strings) are saved in
        every checkpoint and restored on resume. `finish()` runs after the model is saved, while the run folder
        is still held and the tracker open (the after-training grids). `evaluation` is scored every eval_every
        steps, its best checkpoint kept, and may stop the run early (`mmalign.heldout`). `forward_methods` are the
        model's methods besides forward that the step calls (a VLM's get_image_features): under FSDP they gather the
        parameters as forward does.
        """
        c, acc = self.config, self.accelerator
        if c.eval_every and evaluation is None:
            raise ConfigError("--eval-every: this trainer was given nothing held out to score (the method's held-out "
                              "options, e.g. --eval-prompts and --eval-reward, say what)")
        accum = c.gradient_accumulation_steps
        sampler = None if isinstance(dataset, Stream) else \
            EpochBatchSampler(len(dataset), c.batch_size, acc.num_processes, acc.process_index, c.seed)
        self.begin()
        set_seed(c.seed)
        twin = sharding.meta_twin(unwrap(model)) if self.sharding and self.is_main and save_model else None
        if self.sharding:
            sharding.lift_scalars(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        optimizer = self._optimizer(params)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(c.lr_scheduler, c.warmup_steps, c.max_steps))
        sharding.declare_blocks(acc, model)
        model, optimizer = acc.prepare(model, optimizer)
        self.model_sharded = sharding.runs_collective(self.sharding)
        sharding.forward_methods(acc, model, forward_methods)
        params = [p for p in model.parameters() if p.requires_grad]  # sharding replaces the parameters
        self._training = {"model": model, "optimizer": optimizer, "scheduler": schedule,
                          **{f"state_{i}": obj for i, obj in enumerate(stateful)}}
        held_out = HeldOut(evaluation, c.early_stop_patience) if evaluation is not None and c.eval_every else None
        if held_out is not None:
            self._training["held_out"] = held_out

        step = 0
        if self.resume_from is not None:
            step = self.load_checkpoint(self.resume_from)
            acc.print(f"resumed from {self.resume_from} at step {step}")
        for name in ("metrics.jsonl", BAD_ROWS_FILE):
            self._trim_log(name, step)
        acc.wait_for_everyone()  # no process reports a bad row before the main process has trimmed the report

        skip = c.bad_rows == "skip"
        if sampler is None:
            batches = dataset.batches(collate, c.batch_size, step * accum, c.seed, acc.process_index,
                                      acc.num_processes, c.num_workers, skip)
        else:
            sampler.start_batch = step * accum
            batches = iter(DataLoader(Guarded(dataset, skip), batch_sampler=sampler, num_workers=c.num_workers,
                                      collate_fn=functools.partial(collate_guarded, collate)))
        progress = tqdm(total=c.max_steps, initial=step, disable=not self.is_main, desc="train")
        history: list[dict[str, float]] = []
        sums: dict[str, torch.Tensor] = {}
        skipped = 0
        model.train()
        micro_step = step * accum
        if held_out is not None and step == 0:  # the baseline
            baseline: dict[str, float] = {"step": 0}
            history.append(baseline)
            self._evaluate(held_out, model, baseline)
            self._log(baseline)
        stop = False
        try:  # the progress bar is closed first, so an error message starts on a line of its own
            while step < c.max_steps:
                batch, bad = next(batches)
                skipped += self._report_bad_rows(bad, batch is None or not skip, step)
                batch = send_to_device(batch, self.device)
                generator_seed, global_seed = step_seeds(c.seed, micro_step, acc.process_index)
                set_seed(global_seed)
                generator = torch.Generator(device=self.device).manual_seed(generator_seed)
                with acc.accumulate(model), self.autocast():
                    loss, metrics = step_fn(model, batch, generator)
                    self._check_finite(loss, step)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(params, c.max_grad_norm) if c.max_grad_norm > 0 else None
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_step += 1
                for key, value in {"loss": loss, **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float32,
                                                                     device=self.device).detach()
                if not acc.sync_gradients:
                    continue
                schedule.step()
                step += 1
                logged = {k: acc.reduce(v / accum, "mean").item() for k, v in sums.items()}
                logged.update(step=step, lr=schedule.get_last_lr()[0])
                if skip:
                    logged["bad_rows"] = acc.reduce(torch.tensor(float(skipped), device=self.device), "sum").item()
                    skipped = 0
                if grad_norm is not None:
                    logged["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                                                else grad_norm)  # FSDP2: a replicated DTensor
                sums = {}
                if held_out is not None:
                    held_out.add_loss(logged["loss"])
                    if step % c.eval_every == 0:
                        stop = self._evaluate(held_out, model, logged)
                history.append(logged)
                self._log(logged)
                progress.update(1)
                progress.set_postfix(loss=f"{logged['loss']:.4f}")
                if (c.checkpoint_every and step % c.checkpoint_every == 0) or step == c.max_steps or stop:
                    self.save_checkpoint(step)
                if stop:
                    break
        finally:
            progress.close()
        acc.wait_for_everyone()
        if held_out is not None and self.is_main:
            self._plot_held_out()
        if save_model is not None:
            self._save_model(model, twin, save_model)
        if finish is not None:
            finish()
        acc.wait_for_everyone()
        for tracker in acc.trackers:  # accelerate's end_training, but the processes stay joined (`_leave_processes`)
            tracker.finish()
        self.end()
        return history

    def _evaluate(self, held_out: HeldOut, model: nn.Module, logged: dict[str, float]) -> bool:
        """Score the held-out set at step logged["step"] (main process; the others receive the metrics), add the
        metrics to `logged` as eval/*, keep a new best's checkpoint; whether to stop early (`mmalign.heldout`)."""
        acc, step, evaluation = self.accelerator, int(logged["step"]), held_out.evaluation
        metrics: dict[str, float] | None = None
        if self.runs_model:
            inner = acc.unwrap_model(model)
            inner.eval()
            with torch.no_grad(), self.autocast():
                metrics = {name: float(value) for name, value in evaluation.run(inner).items()}
            inner.train()
        if acc.num_processes > 1:
            metrics = broadcast_object_list([metrics if self.is_main else None])[0]
        assert metrics is not None
        if evaluation.key not in metrics:
            raise ValueError(f"the held-out evaluation returned {sorted(metrics)}, not its key {evaluation.key!r}")
        logged.update({f"eval/{name}": value for name, value in metrics.items()})
        best, stop = held_out.update(step, metrics[evaluation.key])
        if best:
            self._save_best(step, f"eval/{evaluation.key}", metrics[evaluation.key])
        if stop and held_out.best is not None:
            kept = self.config.output / "checkpoints" / f"{BEST_PREFIX}{held_out.best['step']}"
            acc.print(f"early stop at step {step}: eval/{evaluation.key} has not beaten its best "
                      f"({held_out.best['value']:.4g} at step {held_out.best['step']}) for {held_out.patience} "
                      f"evaluations while the training loss since then is below its value there; the best "
                      f"checkpoint is {kept}")
        return stop

    def _save_best(self, step: int, metric: str, value: float) -> None:
        """Write checkpoints/best-<step>, name it in checkpoints/best.json (atomically), then remove older bests."""
        folder = self.save_checkpoint(step, name=f"{BEST_PREFIX}{step}")
        if self.is_main:
            record = {"step": step, "folder": folder.name, "metric": metric, "value": value}
            write_atomically(folder.parent / BEST_FILE, lambda tmp: tmp.write_text(json.dumps(record) + "\n"))
            for old in folder.parent.glob(BEST_PREFIX + "*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)

    def _plot_held_out(self) -> None:
        """held_out.png: every eval/* metric (its 95% CI as a band) and the training loss of the whole run
        (metrics.jsonl) against the step."""
        rows = [json.loads(line) for line in (self.config.output / "metrics.jsonl").read_text().splitlines()]
        keys = sorted({key for row in rows for key in row if key.startswith("eval/") and "_ci_" not in key})
        plot_metrics(rows, [*keys, "loss"], self.config.output / "held_out.png", title="held-out evaluation")

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

    def _report_bad_rows(self, bad: list[BadRow], stop: bool, step: int) -> int:
        """List the bad rows met loading a micro-batch in bad_rows.jsonl (each process adds its own lines) and return
        how many there were; when a bad row must stop the run (`stop`) and any process met one, every process stops
        with a DataError naming it and the last checkpoint."""
        if bad:
            lines = "".join(json.dumps({"step": step + 1, **row.to_dict()}) + "\n" for row in bad)
            with open(self.config.output / BAD_ROWS_FILE, "a") as f:
                f.write(lines)
        stopping = stop and bool(bad)
        if self.accelerator.num_processes > 1:
            stopping = self.accelerator.reduce(torch.tensor(float(stopping), device=self.device), "sum").item() > 0
        if stopping:
            last = checkpoints(self.config.output)
            met = str(bad[0]) if bad else "another process met a row that cannot be loaded"
            fix = ("Fix or remove the row (`mmalign data check` lists every bad row), or pass --bad-rows skip to train "
                   "on the next row instead") if self.config.bad_rows == "error" else (
                f"No row tried in its place can be loaded either (up to {SKIP_LIMIT} rows; with --streaming, the "
                "rest of its batch), so the data looks broken "
                "(a moved or missing images folder?) and --bad-rows skip stops too. Fix the data (`mmalign data "
                "check` lists every bad row)")
            raise DataError(
                f"{met}; training stopped at optimizer step {step + 1}. The last checkpoint is "
                f"{last[-1] if last else 'none (no checkpoint was written yet)'}; nothing was saved after it. {fix}; "
                f"then continue with --resume latest. Bad rows met: {self.config.output / BAD_ROWS_FILE}")
        return len(bad)

    def _trim_log(self, name: str, step: int) -> None:
        """Drop the lines of a run log (metrics.jsonl, bad_rows.jsonl) written after `step` by an interrupted run (and
        a last line it left cut off), so the file matches the resumed one."""
        path = self.config.output / name
        if self.is_main and path.exists():
            kept = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            write_atomically(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))

    def save_checkpoint(self, step: int, name: str | None = None) -> Path:
        """Write the training state to checkpoints/.tmp-<name>, then rename it to <name> (default checkpoint-N); prune
        checkpoint-N folders beyond keep_checkpoints."""
        acc = self.accelerator
        final = self.config.output / "checkpoints" / (name or f"{CHECKPOINT_PREFIX}{step}")
        acc.wait_for_everyone()
        weights, states = self._gather_state()
        if self.is_main:
            write_checkpoint(self.config.output, final.name, lambda tmp: self._write_state(tmp, weights, states),
                             {"step": step, "seed": self.config.seed, "num_processes": acc.num_processes,
                              "sharding": self.sharding}, self.config.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def _gather_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(trainable parameters, every other state of the run by name: optimizer, schedule, scaler, the method's own);
        under FSDP the parameters and optimizer gathered whole onto the main process (every process calls this)."""
        model = self._training["model"]
        states = {name: obj.state_dict() for name, obj in self._stateful().items() if name != "optimizer"}
        if self.sharding:
            weights, states["optimizer"] = sharding.full_state(self.accelerator, model, self._training["optimizer"])
        else:
            weights = {n: p.detach() for n, p in unwrap(model).named_parameters() if p.requires_grad}
            states["optimizer"] = self._training["optimizer"].state_dict()
        return weights, states

    def _write_state(self, folder: Path, weights: dict[str, torch.Tensor], states: dict[str, Any]) -> None:
        """The trainable parameters, then every other state of the run, into `folder`."""
        from safetensors.torch import save_file

        save_file({n: p.contiguous().cpu() for n, p in weights.items()}, str(folder / TRAINABLE_FILE))
        for name, state in states.items():
            save_state(state, folder, name)

    def _save_model(self, model: nn.Module, twin: nn.Module | None, save_model: Callable[[Any, Path], object]) -> None:
        """The trained model through the method's `save_model` on the main process; a sharded one is gathered whole
        first (every process takes part) and given unsharded, loaded into its `sharding.meta_twin`."""
        acc = self.accelerator
        if self.sharding:
            state = sharding.full_weights(acc, model)
            if twin is not None:
                model = sharding.load_twin(twin, state)
        else:
            model = acc.unwrap_model(model)
        if self.is_main:
            save_model(model, self.config.output)
            follow_umask(self.config.output)

    def _stateful(self) -> dict[str, Any]:
        objects = {k: v for k, v in self._training.items() if k != "model"}
        if self.accelerator.scaler is not None:
            objects["scaler"] = self.accelerator.scaler
        return objects

    def load_checkpoint(self, folder: Path) -> int:
        """Restore the state `save_checkpoint` wrote to `folder`; returns its step. Reads safetensors and JSON only."""
        state = read_trainer_state(folder)
        model = unwrap(self._training["model"])
        try:
            from safetensors.torch import load_file

            weights = load_file(str(folder / TRAINABLE_FILE))
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            if set(weights) != trainable:
                missing, extra = sorted(trainable - set(weights))[:5], sorted(set(weights) - trainable)[:5]
                raise RunFolderError(f"checkpoint {folder} does not match the model being trained (missing {missing}, "
                                     f"unexpected {extra}); was it made with other settings?")
            stateful = self._stateful()
            if self.sharding:
                sharding.load_full_state(self.accelerator, self._training["model"], stateful.pop("optimizer"),
                                         weights, load_state(folder, "optimizer"))
            else:
                model.load_state_dict(weights, strict=False)
            for name, obj in stateful.items():
                obj.load_state_dict(load_state(folder, name))
        except (StateFormatError, OSError) as err:
            raise RunFolderError(f"checkpoint {folder} cannot be resumed: {err}") from None
        if state["num_processes"] != self.accelerator.num_processes:
            self.accelerator.print(f"warning: {folder} was written by {state['num_processes']} processes, this run "
                                   f"has {self.accelerator.num_processes}; training continues, but not in the same "
                                   "data order")
        return int(state["step"])


def resume_checkpoint(output: Path, resume: str | None) -> Path | None:
    """The checkpoint --resume names: 'latest' is the newest under output/checkpoints (None when there is none), else
    the folder given; RunFolderError when it is no complete checkpoint, or when a new run would join checkpoints."""
    existing = checkpoints(output)
    if resume is None:
        if existing:
            raise RunFolderError(f"{output} already holds checkpoints ({existing[-1].name}); pass --resume latest to "
                                 "continue that run, or choose another --output")
        return None
    if resume == "latest":
        if not existing:
            return None
        path = existing[-1]
    else:
        path = Path(resume)
    read_trainer_state(path)
    return path


def write_checkpoint(output: Path, name: str, write_state: Callable[[Path], object], trainer_state: dict[str, Any],
                     keep: int) -> Path:
    """output/checkpoints/<name>, whole or not at all: `write_state(tmp)` and trainer_state.json go to .tmp-<name>,
    are synced, then renamed; checkpoint-N folders beyond the last `keep` are removed."""
    root = Path(output) / "checkpoints"
    final, tmp = root / name, root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_state(tmp)
    with open(tmp / TRAINER_STATE, "w") as f:
        json.dump({"format": CHECKPOINT_FORMAT, **trainer_state}, f)
    follow_umask(tmp)
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The trainer_state.json of a complete checkpoint of this format; RunFolderError for anything else."""
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise RunFolderError(f"--resume {folder}: not a complete checkpoint (no {TRAINER_STATE} inside)")
    try:
        state = json.loads(path.read_text())
        step = int(state["step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise RunFolderError(f"--resume {folder}: {path} is not a trainer state ({err})") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise RunFolderError(
            f"--resume {folder}: this checkpoint (step {step}) was written by an earlier mmalign, which stored the "
            "optimizer and schedule as pickles; mmalign never unpickles a checkpoint, so it cannot be resumed. "
            f"Its trained weights are in {folder / TRAINABLE_FILE}; start a new run to train on.")
    return state
