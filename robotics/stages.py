"""GRAPE's stage costs for Meta-World: keypoint constraints per task and the external reward they make,

    R_ext = prod_s exp(-sum_j beta_j max(0, C_sj - tau_sj)).

GRAPE has a vision-language model propose keypoints and per-stage constraints; here they are written
down per task from the keypoints every Meta-World observation carries: the end effector (obs[0:3]),
the task's object (obs[4:7]: puck, button, drawer handle, ...) and the goal (obs[36:39]). Costs are in
centimetres over a whole trajectory:

    reach     min_t |hand - object|      stage 1 of object tasks: get to the object
    place     min_t |object - goal|      stage 2: bring the object (or the part it moves) to the goal
    to_goal   min_t |hand - goal|        the only stage of reaching tasks
    path      sum_t |hand_t+1 - hand_t|  efficiency (GRAPE's path cost), in the last stage

Thresholds tau are set a little above what the scripted expert's successful episodes reach (the
hand's reference point sits a few cm off the object in pressing tasks); beta is 0.1 per cm for
keypoint distances and 0.01 per cm of path (GRAPE's 0.01 is for its own cost units, which it does not
state). The product over stages equals exp of minus the summed penalties of all constraints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mmalign.errors import ConfigError

from .envs import check_task

HAND, OBJECT, GOAL = slice(0, 3), slice(4, 7), slice(36, 39)
CM = 100.0


def _min_distance(a: slice, b: slice) -> Callable[[np.ndarray], np.ndarray]:
    return lambda obs: CM * np.linalg.norm(obs[..., a] - obs[..., b], axis=-1).min(-1)


def _path(obs: np.ndarray) -> np.ndarray:
    return CM * np.linalg.norm(np.diff(obs[..., HAND], axis=-2), axis=-1).sum(-1)


@dataclass(frozen=True)
class Constraint:
    """One stage cost C(obs [..., T, D]) -> [...] in cm, its threshold tau and weight beta."""

    name: str
    cost: Callable[[np.ndarray], np.ndarray]
    tau: float
    beta: float = 0.1


def reach(tau: float) -> Constraint:
    return Constraint("reach", _min_distance(HAND, OBJECT), tau)


def place(tau: float) -> Constraint:
    return Constraint("place", _min_distance(OBJECT, GOAL), tau)


def path(tau: float = 150.0) -> Constraint:
    return Constraint("path", _path, tau, beta=0.01)


STAGES: dict[str, tuple[tuple[Constraint, ...], ...]] = {
    "reach-v3": ((Constraint("to_goal", _min_distance(HAND, GOAL), 5.0), path()),),
    "push-v3": ((reach(4.0),), (place(5.0), path())),
    "plate-slide-v3": ((reach(8.0),), (place(5.0), path())),
    "drawer-open-v3": ((reach(3.0),), (place(3.0), path())),
    "drawer-close-v3": ((reach(4.0),), (place(6.0), path())),
    "button-press-v3": ((reach(8.0),), (place(2.0), path())),
    "button-press-topdown-v3": ((reach(5.0),), (place(2.0), path())),
    "window-open-v3": ((reach(6.0),), (place(12.0), path())),
    "door-open-v3": ((reach(6.0),), (place(8.0), path())),
}


def stages(task: str) -> tuple[tuple[Constraint, ...], ...]:
    """The stage constraints written for `task` (a ConfigError lists the tasks that have them)."""
    check_task(task)
    if task not in STAGES:
        raise ConfigError(f"no GRAPE stage constraints are written for {task}; tasks with them: {', '.join(STAGES)}")
    return STAGES[task]


def stage_costs(task: str, observations: np.ndarray) -> dict[str, np.ndarray]:
    """Every constraint's cost per trajectory, {name: [N]}, for observations [N, T, D]."""
    return {c.name: c.cost(observations) for stage in stages(task) for c in stage}


def external_reward(task: str, observations: np.ndarray) -> np.ndarray:
    """R_ext [N] = prod over stages s of exp(-sum_j beta_j max(0, C_sj - tau_sj)), in (0, 1]."""
    penalty = sum(c.beta * np.maximum(0.0, c.cost(observations) - c.tau) for stage in stages(task) for c in stage)
    return np.exp(-penalty)
