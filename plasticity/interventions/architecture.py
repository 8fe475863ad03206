"""Architecture family: soft_moe (a Soft MoE in place of the penultimate dense layer).

Example::

    ivs = build_interventions("soft_moe", {"soft_moe": {"experts": 4}})
    network_overrides(ivs)   # {"penultimate": "soft_moe", "moe_experts": 4, "moe_slots_per_expert": 1, ...}
    net = build_network(replace(NetworkConfig(encoder="nature_cnn"), **network_overrides(ivs)),
                        obs_shape=(4, 84, 84), num_actions=18, obs_dtype="uint8")
"""

from __future__ import annotations

from typing import Any

from plasticity.base import Intervention, InterventionContext
from plasticity.interventions._common import check_number
from plasticity.soft_moe import SoftMoE


class SoftMoEIntervention(Intervention):
    """A Soft MoE in place of the penultimate dense layer, over the conv feature map's positions (build-time).

    Obando-Ceron et al. 2024 ("Mixtures of Experts Unlock Parameter Scaling for Deep RL") with the
    Soft MoE layer of Puigcerver et al. 2023 (:mod:`plasticity.soft_moe`): the dense layer after the
    Nature CNN / IMPALA convolutions becomes ``experts`` MLP experts of ``slots_per_expert`` slots each,
    fed "PerConv" tokens (one per position of the last feature map, its channels as features); the
    flattened output tokens are the features the head reads. ``expert_hidden`` is each expert's
    hidden width, 0 = as wide as the dense layer it replaces (512 Nature CNN, 256 IMPALA by default).
    Needs a convolutional encoder: an MLP encoder is refused when the network config is validated.

    The change is made at build time through ``network_overrides`` (``penultimate`` and ``moe_*``
    fields of the network config), so a resumed run that applies the same interventions rebuilds the
    same network. ``setup`` checks that the network really has a Soft MoE of these sizes, so a
    learner that forgot to apply the overrides fails loudly instead of training the dense network.
    """

    name = "soft_moe"

    def __init__(self, *, experts: int = 8, slots_per_expert: int = 1, expert_hidden: int = 0) -> None:
        self.experts = check_number(self.name, "experts", experts, low=1, integer=True)
        self.slots_per_expert = check_number(self.name, "slots_per_expert", slots_per_expert, low=1, integer=True)
        self.expert_hidden = check_number(self.name, "expert_hidden", expert_hidden, low=0, integer=True)

    def network_overrides(self) -> dict[str, Any]:
        return {
            "penultimate": "soft_moe",
            "moe_experts": self.experts,
            "moe_slots_per_expert": self.slots_per_expert,
            "moe_expert_hidden": self.expert_hidden,
        }

    def setup(self, ctx: InterventionContext) -> None:
        layers = [m for m in ctx.network.modules() if isinstance(m, SoftMoE)]
        if not layers:
            raise ValueError(
                f"{self.name}: the network has no Soft MoE layer; build it with network_overrides(interventions) "
                f"(penultimate='soft_moe') on a 'nature_cnn' or 'impala' encoder"
            )
        wrong = [(len(m.experts), m.slots_per_expert) for m in layers
                 if (len(m.experts), m.slots_per_expert) != (self.experts, self.slots_per_expert)]
        if wrong:
            raise ValueError(
                f"{self.name}: the network's Soft MoE has (experts, slots_per_expert) {wrong[0]}; these options "
                f"ask for {(self.experts, self.slots_per_expert)}"
            )


__all__ = ["SoftMoEIntervention"]
