"""Reward specs: one named scorer or a weighted sum of several, `pickscore:1.0,hpsv21=/models/hps.pt:0.5,aesthetic`.

    spec  = term ("," term)*
    term  = NAME ["=" SOURCE] ["@" BACKBONE] [":" WEIGHT]        (NAME from `named.NAMED`; WEIGHT default 1)
    r(x, y) = sum_k w_k * s_k(x, y)

Each term enters with its raw score; it is not standardised. A per-batch z-score or a running mean/std would
make an image's reward depend on the other images scored with it (the batch, or what came before), so the same
image could be relabelled differently in `reward relabel`, base and aligned samples would be standardised apart
in an evaluation, and a result would change with the batch size. The weights therefore carry the scales: raw
PickScore is about 20 (exp(t) = 100 times a cosine), HPSv2 a cosine near 0.3, ImageReward already standardised by
its authors (about N(0, 1) on their data), the LAION aesthetic score 1-10, CLIP score 0-100. AC-Flow standardises
the summed reward per prompt itself. The text after a term's last ':' is its weight unless it holds a '/'
(`openclip=local-dir:/models/rm` is a source).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from mmalign.errors import ConfigError

from .named import NAMED, load_named
from .scorers import RewardModel

TERM = re.compile(r"(?P<name>[A-Za-z0-9_]+)(?:=(?P<source>[^@]*?))?(?:@(?P<backbone>.*?))?(?::(?P<weight>[^:/\\]*))?")


@dataclass
class Term:
    """One term of a reward spec: the scorer's name, where it is read from, and its weight."""

    name: str
    source: str | None = None
    backbone: str | None = None
    weight: float = 1.0

    @property
    def label(self) -> str:
        return self.name if self.source is None else f"{self.name}={self.source}"


def is_reward_spec(spec: str) -> bool:
    """Whether `spec` starts with a scorer name of `named.NAMED` (then it is parsed as a spec, not a path/callable)."""
    return re.split(r"[=@:,]", spec.strip(), maxsplit=1)[0] in NAMED


def parse_reward_spec(spec: str, where: str = "--reward") -> list[Term]:
    """The terms of a spec; an unknown name, an empty term or a weight that is not a finite number raises ConfigError
    naming `where` and the term."""
    terms = []
    for text in spec.split(","):
        match = TERM.fullmatch(text.strip())
        if match is None or match["name"] not in NAMED:
            name = re.split(r"[=@:]", text.strip(), maxsplit=1)[0]
            raise ConfigError(f"{where} {spec!r}: term {text.strip()!r}: unknown scorer {name!r}; known: "
                              f"{', '.join(NAMED)} (term: NAME[=SOURCE][@BACKBONE][:WEIGHT])")
        weight = 1.0
        if match["weight"] is not None:
            try:
                weight = float(match["weight"])
            except ValueError:
                weight = float("nan")
            if not torch.isfinite(torch.tensor(weight)):
                raise ConfigError(f"{where} {spec!r}: term {text.strip()!r}: weight {match['weight']!r} is not a "
                                  "finite number")
        terms.append(Term(match["name"], match["source"] or None, match["backbone"] or None, weight))
    labels = [term.label for term in terms]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where} {spec!r}: a scorer is named twice ({', '.join(labels)})")
    return terms


class WeightedReward(RewardModel):
    """r(x, y) = sum_k w_k * s_k(x, y) over the terms' reward models (raw scores; see the module docstring)."""

    def __init__(self, terms: list[Term], models: list[RewardModel]):
        super().__init__()
        self.terms, self.models = terms, nn.ModuleList(models)
        self.members = models  # the same modules, typed (the ModuleList registers them)
        self.files = sorted({file for model in models for file in model.files})

    @property
    def image_size(self) -> int:
        return max(model.image_size for model in self.members)

    @property
    def needs_prompts(self) -> bool:
        return any(model.needs_prompts for model in self.members)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def forward(self, images: torch.Tensor | list[Image.Image], prompts: list[str] | None = None) -> torch.Tensor:
        return sum((term.weight * model(images, prompts) for term, model in zip(self.terms, self.members)),
                   torch.zeros(()))

    def term_scores(self, images: torch.Tensor | list[Image.Image], prompts: list[str] | None = None,
                    batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Each term's raw scores [B] (no_grad, chunked, on the CPU), by label."""
        return {term.label: model.score(images, prompts, batch_size) for term, model in zip(self.terms, self.members)}

    def combine(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_k w_k * s_k from `term_scores`' output."""
        return sum((term.weight * scores[term.label] for term in self.terms), torch.zeros(()))


def load_reward_spec(spec: str, device: str | torch.device = "cpu", where: str = "--reward") -> WeightedReward:
    """The WeightedReward of a spec, every scorer loaded onto `device`, frozen."""
    terms = parse_reward_spec(spec, where)
    models = [load_named(t.name, t.source, t.backbone, device).requires_grad_(False) for t in terms]
    return WeightedReward(terms, models)


def weights_of(reward: WeightedReward) -> dict[str, float]:
    """The weight of each term, by label (recorded beside the scores)."""
    return {term.label: term.weight for term in reward.terms}

