"""Held-out evaluation during training: a score the training objective never saw, logged as a curve, its best
checkpoint kept, and a stop when it falls while the objective still improves (over-optimisation).

`Trainer.fit(..., evaluation=Evaluation(run, key))` calls `run(model)` (no_grad, eval mode) on the main process at
step 0 (the baseline; a resumed run has it already) and every `eval_every` optimizer steps. Its metrics go into the
row of that step in metrics.jsonl and the tracker as `eval/<name>`, and into `held_out.png` at the end; the larger
`metrics[key]` (h), the better. The other processes wait and receive the metrics, so every process takes the same
decisions.

Best: evaluation i is a new best when h_i > h_best (strictly; the step-0 baseline is the first best). Its training
state is written as a complete checkpoint `checkpoints/best-<step>` (the format of checkpoint-N: `--resume` and
`mmalign eval --models` read it), then `checkpoints/best.json` is replaced atomically to name it, then the previous
best folder is removed; a crash at any moment leaves best.json naming a complete folder, and keep-last-K never
prunes it.

Early stop (`early_stop_patience` K > 0). L_j is the mean training loss over the optimizer steps between evaluations
j - 1 and j (window j, eval_every steps), b the index of the best evaluation. The run stops at evaluation i when

    i - b >= K   and   mean(L_b+1, ..., L_i) < L_max(b, 1)

that is, K evaluations have not beaten the best while the training loss since the best, averaged over every step
after it, is below its value in the window that ended at the best (the first window when the best is the step-0
baseline, which has none): the objective still improves, the held-out score does not. Averaging since the best
rather than reading the last window alone keeps one noisy window from deciding. A held-out score that stalls while
the loss stalls too is not over-optimisation, so that run goes on. The stop writes a checkpoint of its step,
so `--resume latest` (with another patience) can continue past it. The state above (best, windows, the loss of
the steps since the last evaluation) is part of every checkpoint, so a resumed run decides as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

EvaluateFn = Callable[[nn.Module], "dict[str, float]"]


@dataclass(frozen=True)
class Evaluation:
    """What the trainer measures on held-out data: `run(model) -> metrics` (main process), maximising `metrics[key]`."""

    run: EvaluateFn
    key: str


class HeldOut:
    """A run's evaluation with its best-so-far and early-stop bookkeeping (see the module docstring); Stateful."""

    def __init__(self, evaluation: Evaluation, patience: int):
        self.evaluation, self.patience = evaluation, patience
        self.best: dict[str, Any] | None = None  # {"index", "step", "value"}
        self.window_losses: list[float] = []  # L_1, L_2, ...: the mean training loss of each evaluation's window
        self.evaluations = 0  # evaluations so far, the step-0 baseline included
        self.loss_sum, self.loss_count = 0.0, 0  # the training loss of the steps since the last evaluation

    def add_loss(self, loss: float) -> None:
        """Count one optimizer step's training loss into the current window."""
        self.loss_sum += loss
        self.loss_count += 1

    def update(self, step: int, value: float) -> tuple[bool, bool]:
        """Record evaluation i = `evaluations` (h_i = `value` at `step`), close its loss window: (new best, stop)."""
        if not math.isfinite(value):
            raise ValueError(f"the held-out score at step {step} is {value}, not a finite number")
        index = self.evaluations
        self.evaluations += 1
        if self.loss_count:
            self.window_losses.append(self.loss_sum / self.loss_count)
        self.loss_sum, self.loss_count = 0.0, 0
        if self.best is None or value > self.best["value"]:
            self.best = {"index": index, "step": step, "value": value}
            return True, False
        return False, self.should_stop(index)

    def should_stop(self, index: int) -> bool:
        """i - b >= K and mean(L_b+1..L_i) < L_max(b, 1) (windows are 1-based: L_j is window_losses[j - 1])."""
        if self.patience < 1 or self.best is None or index - self.best["index"] < self.patience:
            return False
        best = self.best["index"]
        since = self.window_losses[best:index]
        return sum(since) / len(since) < self.window_losses[max(best, 1) - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "window_losses": list(self.window_losses), "evaluations": self.evaluations,
                "loss_sum": self.loss_sum, "loss_count": self.loss_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.window_losses = state["best"], list(state["window_losses"])
        self.evaluations, self.loss_sum, self.loss_count = state["evaluations"], state["loss_sum"], state["loss_count"]
