"""Flow-DPO: Diffusion-DPO for flow-matching models (SD3), on per-sample velocity errors.

With x_t = (1 - sigma) x0 + sigma eps shared by winner and loser, and e = mean (v_theta(x_t) - (eps - x0))^2
for the policy and the reference, the loss is Diffusion-DPO's -log sigmoid(-0.5 beta ((e_w - e_l) - (e'_w - e'_l))).
`mmalign diffusion dpo` already trains SD3 pipelines this way; this command is the same trainer that
insists on a flow model. Flow-GRPO's flow-DPO baseline reports beta 100 (its scale convention is not
public); the default here stays at Diffusion-DPO's 5000 in the -0.5*beta form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from . import dpo


@dataclass
class Config(dpo.Config):
    """Flow-DPO settings: Diffusion-DPO's, on flow-matching models only."""

    schedule: ClassVar[Literal["flow", "diffusion"] | None] = "flow"


def run(config: Config) -> list[dict[str, float]]:
    """`mmalign diffusion flow-dpo`: Flow-DPO training of an SD3-style pipeline into config.output."""
    return dpo.run(config)
