"""Soft mixture of experts over the positions of a conv feature map (Puigcerver et al. 2023).

The layer that ``learner.networks`` puts in place of the penultimate dense layer when
``NetworkConfig.penultimate == "soft_moe"`` (the ``soft_moe`` intervention; Obando-Ceron et al.
2024, "Mixtures of Experts Unlock Parameter Scaling for Deep RL"). With ``T`` tokens ``X [T, d]``,
``n`` experts of ``p`` slots each (``S = n * p`` slots) and the router parameter ``Phi [d, S]``:

* ``logits = scale * normalize(X) @ normalize(Phi)``, each token and each slot's column l2-normalized
  and ``scale`` learnable (init 1): Soft MoE's normalization, which keeps the softmaxes from
  saturating as token norms grow. It is used for the logits only; slots mix the raw tokens.
* dispatch ``D = softmax(logits)`` over tokens (each slot's column sums to one), combine
  ``C = softmax(logits)`` over slots (each token's row sums to one);
* slot inputs ``D^T X [S, d]``; expert ``i`` maps its ``p`` slots; output tokens ``Y = C @ outputs``.

Tokens are "PerConv" (the paper's choice): the conv output ``[B, C, H, W]`` becomes ``H * W`` tokens
of dimension ``C``, one per position. The output tokens are flattened, ``[B, T * d_out]``, for the
head. The experts are whatever modules the caller passes (``learner.networks`` builds small MLPs and
lists their hidden units as hidden layers); each gets the slots of every sample as rows of one 2-D
batch ``[B * p, d]``, so an activation inside it has its units on dim 1, as the hidden-layer contract
(:mod:`plasticity.layers`) and the dormant-unit scores expect.

Example::

    experts = [nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 64)) for _ in range(8)]
    moe = SoftMoE(token_dim=64, experts=experts, slots_per_expert=1)
    fmap = torch.randn(32, 64, 7, 7)
    moe(fmap).shape                         # [32, 49 * 64]
    dispatch, combine = moe.routing(fmap)   # [32, 49, 8] each; dispatch.sum(1) == 1, combine.sum(2) == 1
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SoftRouter(nn.Module):
    """Routing logits ``scale * normalize(X) @ normalize(Phi)`` ``[B, T, S]`` for tokens ``[B, T, d]``.

    ``Phi`` is held as an ``nn.Linear(d, S, bias=False)`` (``phi.weight`` is ``Phi^T``) rather than a
    bare parameter so that it is an ordinary consumer of the token channels: a unit reset of the
    layer producing the tokens zeroes its columns like any other outgoing weight.
    """

    def __init__(self, token_dim: int, slots: int):
        super().__init__()
        self.phi = nn.Linear(token_dim, slots, bias=False)
        self.scale = nn.Parameter(torch.ones(()))

    def reset_parameters(self) -> None:
        """Own parameter only (``phi`` resets itself): what resets and fresh draws call."""
        with torch.no_grad():
            self.scale.fill_(1.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # An all-zero token (a position where every ReLU is off) normalizes to zero: logits 0, no NaN.
        return self.scale * (F.normalize(tokens, dim=-1) @ F.normalize(self.phi.weight, dim=1).t())


class SoftMoE(nn.Module):
    """``[B, C, H, W]`` feature map -> ``[B, H * W * d_out]`` flattened output tokens (module docstring)."""

    def __init__(self, *, token_dim: int, experts: Sequence[nn.Module], slots_per_expert: int):
        super().__init__()
        if not experts:
            raise ValueError("SoftMoE needs at least one expert")
        if isinstance(slots_per_expert, bool) or not isinstance(slots_per_expert, int) or slots_per_expert < 1:
            raise ValueError(f"SoftMoE slots_per_expert must be an integer >= 1, got {slots_per_expert!r}")
        self.token_dim = token_dim
        self.slots_per_expert = slots_per_expert
        self.experts = nn.ModuleList(experts)
        # Slot s belongs to expert s // slots_per_expert (expert-major, as forward splits them).
        self.router = SoftRouter(token_dim, len(experts) * slots_per_expert)

    @property
    def num_slots(self) -> int:
        return len(self.experts) * self.slots_per_expert

    def tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        """PerConv tokens: ``[B, C, H, W]`` -> ``[B, H * W, C]`` (row-major positions)."""
        if fmap.dim() != 4 or fmap.shape[1] != self.token_dim:
            raise ValueError(f"SoftMoE expects a feature map [B, {self.token_dim}, H, W], got {tuple(fmap.shape)}")
        return fmap.flatten(2).transpose(1, 2)

    def _weights(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.router(tokens)  # [B, T, S]
        return logits.softmax(dim=1), logits.softmax(dim=2)

    def routing(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dispatch, combine), each ``[B, T, S]``: dispatch sums to one over tokens, combine over slots."""
        return self._weights(self.tokens(fmap))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(fmap)
        dispatch, combine = self._weights(tokens)
        slots = dispatch.transpose(1, 2) @ tokens  # [B, S, d]: each slot a convex mix of tokens
        batch, p = tokens.shape[0], self.slots_per_expert
        outputs = []
        for index, expert in enumerate(self.experts):
            rows = slots[:, index * p:(index + 1) * p].reshape(batch * p, self.token_dim)
            outputs.append(expert(rows).reshape(batch, p, -1))
        return (combine @ torch.cat(outputs, dim=1)).flatten(1)  # [B, T, d_out] -> [B, T * d_out]


__all__ = ["SoftMoE", "SoftRouter"]
