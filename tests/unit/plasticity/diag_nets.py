"""Tiny hand-weighted networks for the diagnostics tests (the network contract, by hand)."""

from __future__ import annotations

import torch
from torch import nn

from plasticity.layers import HiddenLayer

#: Probe inputs: all positive, so ReLU(x) = x on the identity rows.
OBS = torch.tensor([[1.0, 2.0], [3.0, 4.0]])


class HandNet(nn.Module):
    """encoder: Linear(2,4) ReLU Linear(4,3) ReLU; head: Linear(3,2). Weights below, biases 0.

    On ``OBS``, ``encoder.0`` units output [x0, x1, relu(-x0)=0, 0.01*x0]: scores E|h| = 2, 3, 0, 0.02
    (unit 2 dead, unit 3 dormant at tau 0.025); ``encoder.2`` units output [h0, h1, relu(-h0)=0]
    (E|h| = 2, 3, 0: unit 2 dead). Features = [[1, 2, 0], [3, 4, 0]]; Q = [[1, 2], [3, 4]].
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU())
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.encoder[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.01, 0.0]]))
            self.encoder[2].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [-1.0, 0, 0, 0]]))
            self.head.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
            for layer in (self.encoder[0], self.encoder[2], self.head):
                layer.bias.zero_()

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        return self.encoder(obs)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(obs))

    def hidden_layers(self) -> list[HiddenLayer]:
        return [
            HiddenLayer("encoder.0", self.encoder[0], self.encoder[1], [self.encoder[2]]),
            HiddenLayer("encoder.2", self.encoder[2], self.encoder[3], [self.head]),
        ]

    def output_layers(self) -> list[nn.Linear]:
        return [self.head]


def tanh_net() -> nn.Sequential:
    """Linear(1,2) Tanh Linear(2,1) (layers inferred): unit 0 weight 10 (saturates on x = 1), unit 1 weight 0.1."""
    net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[10.0], [0.1]]))
        net[0].bias.zero_()
    return net


def linear_scorer() -> nn.Module:
    """Linear(2, 1, bias=False) with weight [1, 1]: per-sample loss ``w . x`` has gradient ``x``."""
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    return net
