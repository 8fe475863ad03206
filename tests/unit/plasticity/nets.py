"""Small networks implementing the network contract (docs/architecture.md) for plasticity tests.

They do not depend on learner/networks.py: encoder/head/features/hidden_layers/output_layers only.
"""

from __future__ import annotations

import torch
from torch import nn

from plasticity.activations import make_activation
from plasticity.layers import HiddenLayer


def _act(activation):
    return make_activation(activation) if isinstance(activation, str) else activation()


def _width(act: nn.Module, units: int) -> int:
    return units * int(getattr(act, "out_multiplier", 1))


class MLP(nn.Module):
    """obs [B, in] -> Linear -> (LN) -> act -> ... -> head Linear -> [B, actions]."""

    def __init__(self, in_dim=4, hidden=(8, 6), actions=3, *, norm="none", activation="relu", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        self._hidden: list[tuple[nn.Linear, nn.Module | None, nn.Module]] = []
        width = in_dim
        for units in hidden:
            linear = nn.Linear(width, units)
            ln = nn.LayerNorm(units) if norm == "layer_norm" else None
            act = _act(activation)
            layers += [linear] + ([ln] if ln is not None else []) + [act]
            self._hidden.append((linear, ln, act))
            width = _width(act, units)
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Linear(width, actions)

    def features(self, obs):
        return self.encoder(obs)

    def forward(self, obs):
        return self.head(self.encoder(obs))

    def hidden_layers(self):
        out = []
        for i, (linear, ln, act) in enumerate(self._hidden):
            consumer = self._hidden[i + 1][0] if i + 1 < len(self._hidden) else self.head
            out.append(HiddenLayer(name=f"fc{i}", producer=linear, activation=act, consumers=[consumer], norm=ln))
        return out

    def output_layers(self):
        return [self.head]


class ConvNet(nn.Module):
    """Nature-CNN-like: conv -> act -> conv -> act -> flatten -> linear -> act -> head (obs [B,2,9,9])."""

    def __init__(self, channels=2, actions=3, *, activation="relu", norm="none", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, 4, 3, stride=2)  # 9 -> 4
        self.act1 = _act(activation)
        self.conv2 = nn.Conv2d(_width(self.act1, 4), 3, 2)  # 4 -> 3
        self.act2 = _act(activation)
        self.fc = nn.Linear(_width(self.act2, 3) * 9, 5)
        self.ln = nn.LayerNorm(5) if norm == "layer_norm" else None
        self.act3 = _act(activation)
        mods = [self.conv1, self.act1, self.conv2, self.act2, nn.Flatten(), self.fc]
        mods += ([self.ln] if self.ln is not None else []) + [self.act3]
        self.encoder = nn.Sequential(*mods)
        self.head = nn.Linear(_width(self.act3, 5), actions)

    def features(self, obs):
        return self.encoder(obs)

    def forward(self, obs):
        return self.head(self.encoder(obs))

    def hidden_layers(self):
        return [
            HiddenLayer(name="conv1", producer=self.conv1, activation=self.act1, consumers=[self.conv2]),
            HiddenLayer(name="conv2", producer=self.conv2, activation=self.act2, consumers=[self.fc]),
            HiddenLayer(name="fc", producer=self.fc, activation=self.act3, consumers=[self.head], norm=self.ln),
        ]

    def output_layers(self):
        return [self.head]


class DuelingHead(nn.Module):
    def __init__(self, in_dim, hidden, actions):
        super().__init__()
        self.value_fc, self.value_act, self.value_out = nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        self.adv_fc, self.adv_act, self.adv_out = nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, actions)

    def forward(self, x):
        value = self.value_out(self.value_act(self.value_fc(x)))
        adv = self.adv_out(self.adv_act(self.adv_fc(x)))
        return value + adv - adv.mean(dim=1, keepdim=True)


class DuelingNet(nn.Module):
    """MLP encoder whose last hidden layer feeds two streams (two consumers)."""

    def __init__(self, in_dim=4, feat=6, hidden=5, actions=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc, self.act = nn.Linear(in_dim, feat), nn.ReLU()
        self.encoder = nn.Sequential(self.fc, self.act)
        self.head = DuelingHead(feat, hidden, actions)

    def features(self, obs):
        return self.encoder(obs)

    def forward(self, obs):
        return self.head(self.encoder(obs))

    def hidden_layers(self):
        h = self.head
        return [
            HiddenLayer(name="fc", producer=self.fc, activation=self.act, consumers=[h.value_fc, h.adv_fc]),
            HiddenLayer(name="value", producer=h.value_fc, activation=h.value_act, consumers=[h.value_out]),
            HiddenLayer(name="adv", producer=h.adv_fc, activation=h.adv_act, consumers=[h.adv_out]),
        ]

    def output_layers(self):
        return [self.head.value_out, self.head.adv_out]


class QRHead(nn.Module):
    def __init__(self, in_dim, actions, quantiles):
        super().__init__()
        self.actions, self.quantiles = actions, quantiles
        self.out = nn.Linear(in_dim, actions * quantiles)

    def forward(self, x):
        return self.out(x).view(x.shape[0], self.actions, self.quantiles)


class QRNet(nn.Module):
    """MLP encoder + QR head: output [B, actions, quantiles]."""

    def __init__(self, in_dim=4, feat=6, actions=3, quantiles=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc, self.act = nn.Linear(in_dim, feat), nn.ReLU()
        self.encoder = nn.Sequential(self.fc, self.act)
        self.head = QRHead(feat, actions, quantiles)

    def features(self, obs):
        return self.encoder(obs)

    def forward(self, obs):
        return self.head(self.encoder(obs))

    def hidden_layers(self):
        return [HiddenLayer(name="fc", producer=self.fc, activation=self.act, consumers=[self.head.out])]

    def output_layers(self):
        return [self.head.out]


def make_ctx(net, *, lr=0.01, seed=123, optimizer="adam", target=None, all_reduce_mean=None):
    """An InterventionContext around ``net`` with Adam (or SGD with momentum)."""
    from plasticity.base import InterventionContext

    if optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    kwargs = {"all_reduce_mean": all_reduce_mean} if all_reduce_mean is not None else {}
    return InterventionContext(network=net, optimizer=opt, target_network=target,
                               generator=torch.Generator().manual_seed(seed), **kwargs)


def regression_step(ctx, obs, interventions=(), probe_obs=None):
    """One optimizer step of a fixed regression toward 1.0, with every intervention hook run."""
    features = ctx.network.features(obs)
    loss = (ctx.network.head(features) - 1.0).pow(2).mean()
    for iv in interventions:
        extra = iv.loss(ctx, obs=obs, features=features)
        if extra is not None:
            loss = loss + extra
    ctx.optimizer.zero_grad()
    loss.backward()
    ctx.optimizer.step()
    ctx.step += 1
    metrics = {}
    for iv in interventions:
        metrics.update(iv.after_step(ctx, probe_obs=probe_obs))
    return metrics
