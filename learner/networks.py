"""Q-networks built from parts: an encoder and a head, with pluggable normalization and activation.

Encoders: ``"mlp"`` (flatten, Linear layers), ``"nature_cnn"`` (Mnih et al. 2015: 32x8x8/4, 64x4x4/2,
64x3x3/1, dense 512) and ``"impala"`` (Espeholt et al. 2018: three stacks of conv 3x3, max-pool 3x3/2
and two residual blocks, widths 16/32/32, then dense 256). Heads: plain or dueling (Wang et al. 2016,
``Q = V + A - mean_a A``), scalar Q-values or QR-DQN quantiles (Dabney et al. 2018).

Every network follows the network contract (docs/architecture.md, "The network contract"):

* ``forward(obs)`` -> ``[B, A]`` (QR: ``[B, A, N]``) and ``forward(obs) == head(encoder(obs))``;
* ``features(obs)`` -> ``[B, feature_dim]``, the encoder output the head reads (after the last activation);
* ``hidden_layers()`` -> :class:`plasticity.layers.HiddenLayer` for every hidden layer of encoder and head;
* ``output_layers()`` -> the Linear layer(s) producing the outputs.

uint8 observations (Atari frames) are divided by 255 inside the encoder, so replay and actors keep
frames as uint8 end to end.

Choices worth knowing:

* ``norm="layer_norm"`` puts a LayerNorm on the pre-activations, before every hidden nonlinearity
  (including the pre-activation nonlinearities of IMPALA's residual blocks). On conv feature maps
  the statistics are taken **over the channels at each spatial position** (:class:`ChannelLayerNorm`),
  not over ``(C, H, W)``: gain and offset are then per channel, i.e. per unit, so a unit reset or
  a norm projection touches exactly that unit's parameters, and the layer works at any resolution.
* IMPALA: :meth:`QNetwork.hidden_layers` lists the inner convolution of each residual block (its
  output passes through one activation and is read only by the block's second convolution) and
  the dense layer. The first convolution of each stack and the blocks' second convolutions write
  into the residual stream, a sum of several producers, so they have no unit-wise reset and are
  not listed.
* ``penultimate="soft_moe"`` (the ``soft_moe`` intervention; Obando-Ceron et al. 2024) replaces the
  CNN encoders' dense layer by a Soft MoE (:mod:`plasticity.soft_moe`) whose tokens are the
  positions of the last feature map and whose experts are MLPs ``token -> expert_hidden -> token``;
  the features are the flattened output tokens (a linear read-out, no activation after it). Its
  hidden layers are each expert's hidden units (``encoder.moe.expert<i>.fc0``, read only by that
  expert's output Linear, so a unit reset is as exact as in a dense layer). The Nature CNN's last
  convolution stays a hidden layer whose consumers are the router's ``phi`` and every expert's first
  Linear; zeroing those columns removes a channel from what the slots and logits read, except that
  the router l2-normalizes each token, so the channel still enters that token's norm.
* Weights use PyTorch's default initialization; seeding is the caller's business
  (``learner.dqn.DQN`` builds under a forked, seeded RNG).

Example::

    cfg = NetworkConfig(encoder="nature_cnn", dueling=True, norm="layer_norm")
    net = build_network(cfg, obs_shape=(4, 84, 84), num_actions=18, obs_dtype="uint8")
    q = net(torch.zeros(32, 4, 84, 84, dtype=torch.uint8))          # [32, 18]
    for layer in net.hidden_layers():
        print(layer.name, layer.num_units, [c.weight.shape for c in layer.consumers])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from plasticity.activations import ACTIVATION_NAMES, make_activation
from plasticity.layers import HiddenLayer
from plasticity.layers import hidden_layers as infer_hidden_layers
from plasticity.soft_moe import SoftMoE

ENCODERS = ("mlp", "nature_cnn", "impala")
DISTRIBUTIONAL = ("none", "qr")
NORMS = ("none", "layer_norm")
#: What sits between a CNN torso and the head: the dense layer, or a Soft MoE over the feature map.
PENULTIMATE = ("dense", "soft_moe")
#: Observation dtypes a network accepts; uint8 is scaled by 1/255 inside the encoder.
OBS_DTYPES = ("uint8", "float16", "float32", "float64")
_TORCH_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
#: Nature CNN convolutions: (out_channels, kernel, stride).
NATURE_CONVS = ((32, 8, 4), (64, 4, 2), (64, 3, 1))


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of a Q-network; :func:`build_network` turns it into a module.

    Example::

        NetworkConfig(encoder="mlp", hidden_sizes=(64, 64), dueling=True).validate()
    """

    encoder: Literal["mlp", "nature_cnn", "impala"] = "mlp"
    """Observation encoder: "mlp" (vector observations), "nature_cnn" or "impala" (images [C, H, W])."""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """MLP encoder: widths of its hidden Linear layers; () makes the features the flattened observation."""
    cnn_dense_size: int = 512
    """Nature CNN: width of the dense layer after the convolutions (the feature size)."""
    impala_channels: tuple[int, ...] = (16, 32, 32)
    """IMPALA encoder: channels of each stack (conv 3x3 + max-pool 3x3/2 + residual blocks)."""
    impala_blocks: int = 2
    """IMPALA encoder: residual blocks per stack."""
    impala_dense_size: int = 256
    """IMPALA encoder: width of the dense layer after the stacks (the feature size)."""
    head_hidden_size: int = 0
    """Width of one hidden Linear layer in the head (in each stream when dueling); 0 = linear head."""
    dueling: bool = False
    """Dueling head: separate value and advantage streams, Q = V + A - mean_a A."""
    distributional: Literal["none", "qr"] = "none"
    """"none": one Q-value per action; "qr": QR-DQN, num_quantiles quantiles per action."""
    num_quantiles: int = 200
    """QR-DQN: quantiles per action (used only when distributional == "qr")."""
    norm: Literal["none", "layer_norm"] = "none"
    """"layer_norm": LayerNorm on the pre-activations of every hidden layer (conv: over channels)."""
    activation: str | Callable[[], nn.Module] = "relu"
    """Hidden activation: relu|tanh|gelu|elu|leaky_relu|crelu|fourier|rational, or a zero-arg module factory."""
    penultimate: Literal["dense", "soft_moe"] = "dense"
    """CNN encoders: "dense" layer after the convolutions, or "soft_moe" over the feature map's positions."""
    moe_experts: int = 8
    """Soft MoE: number of experts (used only when penultimate == "soft_moe")."""
    moe_slots_per_expert: int = 1
    """Soft MoE: slots per expert; the router mixes the tokens into experts * slots_per_expert slots."""
    moe_expert_hidden: int = 0
    """Soft MoE: hidden width of each expert MLP; 0 = the width of the dense layer it replaces."""

    def __post_init__(self) -> None:
        # JSON and CLI hand tuples over as lists; keep the frozen config hashable and comparable.
        for name in ("hidden_sizes", "impala_channels"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def validate(self) -> NetworkConfig:
        """Raise ValueError naming the first bad field; return self."""
        _choice("encoder", self.encoder, ENCODERS)
        _choice("distributional", self.distributional, DISTRIBUTIONAL)
        _choice("norm", self.norm, NORMS)
        _choice("penultimate", self.penultimate, PENULTIMATE)
        if not isinstance(self.hidden_sizes, tuple) or not all(_is_pos_int(h) for h in self.hidden_sizes):
            raise ValueError(f"network.hidden_sizes must be a tuple of integers >= 1, got {self.hidden_sizes!r}")
        if (
            not isinstance(self.impala_channels, tuple)
            or not self.impala_channels
            or not all(_is_pos_int(c) for c in self.impala_channels)
        ):
            raise ValueError(
                f"network.impala_channels must be a non-empty tuple of integers >= 1, got {self.impala_channels!r}"
            )
        for name in ("cnn_dense_size", "impala_dense_size", "impala_blocks", "num_quantiles", "moe_experts",
                     "moe_slots_per_expert"):
            if not _is_pos_int(getattr(self, name)):
                raise ValueError(f"network.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("head_hidden_size", "moe_expert_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"network.{name} must be an integer >= 0, got {value!r}")
        if self.penultimate == "soft_moe" and self.encoder not in ("nature_cnn", "impala"):
            raise ValueError(
                f"network.penultimate 'soft_moe' (the soft_moe intervention) needs a convolutional encoder, "
                f"'nature_cnn' or 'impala': its tokens are the positions of the conv feature map; "
                f"got encoder {self.encoder!r}"
            )
        if not isinstance(self.dueling, bool):
            raise ValueError(f"network.dueling must be true or false, got {self.dueling!r}")
        if isinstance(self.activation, str):
            _choice("activation", self.activation, ACTIVATION_NAMES)
        elif callable(self.activation):
            _checked_activation(self.activation)  # builds one instance to check what the factory returns
        else:
            raise ValueError(
                f"network.activation must be a name ({', '.join(ACTIVATION_NAMES)}) or a zero-argument "
                f"nn.Module factory, got {self.activation!r}"
            )
        return self


def _is_pos_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"network.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _checked_activation(spec: str | Callable[[], nn.Module]) -> nn.Module:
    module = make_activation(spec) if isinstance(spec, str) else spec()
    if not isinstance(module, nn.Module):
        raise ValueError(f"network.activation factory {spec!r} must return an nn.Module, returned {module!r}")
    multiplier = getattr(module, "out_multiplier", 1)
    if not _is_pos_int(multiplier):
        raise ValueError(
            f"network.activation {type(module).__name__}.out_multiplier must be an integer >= 1, got {multiplier!r}"
        )
    return module


class _Parts:
    """Makes the norm and activation modules of one network; refuses a factory that reuses instances."""

    def __init__(self, config: NetworkConfig):
        self.config = config
        self._seen: set[int] = set()

    def activation(self) -> nn.Module:
        module = _checked_activation(self.config.activation)
        if id(module) in self._seen:
            raise ValueError(
                f"network.activation factory {self.config.activation!r} returned the same module twice; "
                "hooks are registered per module, so it must return a new instance on every call"
            )
        self._seen.add(id(module))
        return module

    def norm(self, units: int, *, conv: bool) -> nn.Module | None:
        if self.config.norm == "none":
            return None
        return ChannelLayerNorm(units) if conv else nn.LayerNorm(units)


def _multiplier(module: nn.Module) -> int:
    return int(getattr(module, "out_multiplier", 1))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of ``[B, C, H, W]`` at each position (gain/offset per channel).

    Example::

        ChannelLayerNorm(32)(torch.randn(8, 32, 20, 20))   # each [:, :, h, w] vector normalized over C
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        normalized = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return normalized.permute(0, 3, 1, 2)


class ObsScale(nn.Module):
    """Casts observations to float32; uint8 frames are divided by 255. Refuses a dtype mismatch."""

    def __init__(self, obs_dtype: str):
        super().__init__()
        self.obs_dtype = obs_dtype
        self.is_uint8 = obs_dtype == "uint8"

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        # A float batch fed to a uint8 network (or the reverse) would be silently mis-scaled.
        if (obs.dtype == torch.uint8) != self.is_uint8 or not (self.is_uint8 or obs.is_floating_point()):
            raise ValueError(f"observations have dtype {obs.dtype}; this network expects {self.obs_dtype}")
        return obs.to(torch.float32).div(255.0) if self.is_uint8 else obs.to(torch.float32)

    def extra_repr(self) -> str:
        return f"obs_dtype={self.obs_dtype}"


@dataclass(eq=False)
class _Slot:
    """A hidden layer inside an encoder; ``consumers`` None = read by the head."""

    name: str
    producer: nn.Linear | nn.Conv2d
    norm: nn.Module | None
    activation: nn.Module
    consumers: list[nn.Linear | nn.Conv2d] | None


class Encoder(nn.Module):
    """Base of the encoders: ``forward(obs) -> features [B, output_dim]`` and the hidden-layer map."""

    output_dim: int
    _slots: list[_Slot]

    def hidden_layers(self, *, head_consumers: list[nn.Linear | nn.Conv2d]) -> list[HiddenLayer]:
        """Hidden layers of the encoder; the last one (the features) is read by ``head_consumers``."""
        return [
            HiddenLayer(
                name=slot.name,
                producer=slot.producer,
                activation=slot.activation,
                consumers=list(head_consumers if slot.consumers is None else slot.consumers),
                norm=slot.norm,
            )
            for slot in self._slots
        ]


def _dense_stack(parts: _Parts, width: int, sizes: Sequence[int], prefix: str) -> tuple[list[nn.Module], list[_Slot], int]:
    """Linear -> (LayerNorm) -> activation for each size; each slot's consumer is the next Linear."""
    modules: list[nn.Module] = []
    slots: list[_Slot] = []
    for index, units in enumerate(sizes):
        linear = nn.Linear(width, units)
        if slots:
            slots[-1].consumers = [linear]
        norm = parts.norm(units, conv=False)
        act = parts.activation()
        modules += [linear, *([norm] if norm is not None else []), act]
        slots.append(_Slot(f"{prefix}{index}", linear, norm, act, None))
        width = units * _multiplier(act)
    return modules, slots, width


@dataclass(frozen=True)
class SoftMoESpec:
    """Sizes of a Soft MoE penultimate layer (``NetworkConfig.moe_*``, ``expert_hidden`` resolved)."""

    experts: int
    slots_per_expert: int
    expert_hidden: int


def _soft_moe(parts: _Parts, spec: SoftMoESpec, token_dim: int) -> tuple[SoftMoE, list[_Slot], list[nn.Linear]]:
    """The Soft MoE over a ``[B, token_dim, H, W]`` map, its experts' hidden slots, and its token readers.

    Each expert is Linear(token_dim, expert_hidden) -> (LayerNorm) -> activation -> Linear(., token_dim),
    as Soft MoE's MLP experts; output tokens keep the token width. The token readers (the router's
    ``phi`` and every expert's first Linear) are the consumers of the layer producing the tokens.
    """
    experts: list[nn.Module] = []
    slots: list[_Slot] = []
    readers: list[nn.Linear] = []
    for index in range(spec.experts):
        modules, expert_slots, width = _dense_stack(parts, token_dim, [spec.expert_hidden], f"encoder.moe.expert{index}.fc")
        out = nn.Linear(width, token_dim)
        # An expert's hidden units are read by its own output layer only: resetting one is exact.
        expert_slots[-1].consumers = [out]
        experts.append(nn.Sequential(*modules, out))
        slots += expert_slots
        readers.append(modules[0])
    moe = SoftMoE(token_dim=token_dim, experts=experts, slots_per_expert=spec.slots_per_expert)
    return moe, slots, [moe.router.phi, *readers]


class MLPEncoder(Encoder):
    """Flatten -> [Linear -> (LayerNorm) -> activation] per hidden size."""

    def __init__(self, *, obs_shape: tuple[int, ...], obs_dtype: str, hidden_sizes: Sequence[int], parts: _Parts):
        super().__init__()
        self.scale = ObsScale(obs_dtype)
        modules, self._slots, self.output_dim = _dense_stack(parts, math.prod(obs_shape), hidden_sizes, "encoder.fc")
        self.body = nn.Sequential(nn.Flatten(), *modules)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.body(self.scale(obs))


def _conv_out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class NatureCNNEncoder(Encoder):
    """Mnih et al. (2015): conv 32x8x8/4, 64x4x4/2, 64x3x3/1, flatten, dense; each followed by (LN) + activation.

    With ``soft_moe`` the dense layer is replaced by a Soft MoE over the last feature map's positions.
    """

    def __init__(self, *, obs_shape: tuple[int, ...], obs_dtype: str, dense_size: int, parts: _Parts,
                 soft_moe: SoftMoESpec | None = None):
        super().__init__()
        channels, height, width = obs_shape
        self.scale = ObsScale(obs_dtype)
        modules: list[nn.Module] = []
        self._slots = []
        in_channels, h, w = channels, height, width
        for index, (out_channels, kernel, stride) in enumerate(NATURE_CONVS):
            h, w = _conv_out(h, kernel, stride), _conv_out(w, kernel, stride)
            if h < 1 or w < 1:
                raise ValueError(
                    f"obs_shape {obs_shape} is too small for the Nature CNN; expected height and width >= 36"
                )
            conv = nn.Conv2d(in_channels, out_channels, kernel, stride)
            if self._slots:
                self._slots[-1].consumers = [conv]
            norm = parts.norm(out_channels, conv=True)
            act = parts.activation()
            modules += [conv, *([norm] if norm is not None else []), act]
            self._slots.append(_Slot(f"encoder.conv{index}", conv, norm, act, None))
            in_channels = out_channels * _multiplier(act)
        self.moe: SoftMoE | None = None
        if soft_moe is None:
            dense_modules, dense_slots, self.output_dim = _dense_stack(
                parts, in_channels * h * w, [dense_size], "encoder.dense"
            )
            self._slots[-1].consumers = [dense_modules[0]]
            self._slots += dense_slots
            self.body = nn.Sequential(*modules, nn.Flatten(), *dense_modules)
        else:
            self.moe, moe_slots, self._slots[-1].consumers = _soft_moe(parts, soft_moe, in_channels)
            self._slots += moe_slots
            self.body = nn.Sequential(*modules)
            self.output_dim = h * w * in_channels

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.body(self.scale(obs))
        return x if self.moe is None else self.moe(x)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: ``x + conv1(act1(norm1(conv0(act0(norm0(x))))))``."""

    def __init__(self, channels: int, parts: _Parts):
        super().__init__()
        self.norm0 = parts.norm(channels, conv=True) or nn.Identity()
        self.act0 = parts.activation()
        self.conv0 = nn.Conv2d(channels * _multiplier(self.act0), channels, 3, padding=1)
        self.norm1 = parts.norm(channels, conv=True) or nn.Identity()
        self.act1 = parts.activation()
        self.conv1 = nn.Conv2d(channels * _multiplier(self.act1), channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv0(self.act0(self.norm0(x)))
        return x + self.conv1(self.act1(self.norm1(y)))


class ImpalaEncoder(Encoder):
    """Espeholt et al. (2018): per stack conv 3x3 -> max-pool 3x3/2 -> residual blocks; then activation,
    flatten, dense. Hidden layers: each block's inner conv, and the dense layer (see the module docstring).

    With ``soft_moe`` the flatten and dense layer are replaced by a Soft MoE over the feature map's
    positions (its tokens come from the residual stream, which has no unit-wise reset).
    """

    def __init__(
        self,
        *,
        obs_shape: tuple[int, ...],
        obs_dtype: str,
        channels: Sequence[int],
        blocks: int,
        dense_size: int,
        parts: _Parts,
        soft_moe: SoftMoESpec | None = None,
    ):
        super().__init__()
        in_channels, h, w = obs_shape
        self.scale = ObsScale(obs_dtype)
        self._slots = []
        stacks: list[nn.Module] = []
        for s, out_channels in enumerate(channels):
            residual = [ResidualBlock(out_channels, parts) for _ in range(blocks)]
            stacks.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 3, padding=1),
                    nn.MaxPool2d(3, stride=2, padding=1),
                    *residual,
                )
            )
            for b, block in enumerate(residual):
                norm = None if isinstance(block.norm1, nn.Identity) else block.norm1
                self._slots.append(_Slot(f"encoder.stack{s}.block{b}", block.conv0, norm, block.act1, [block.conv1]))
            in_channels = out_channels
            h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
        self.stacks = nn.Sequential(*stacks)
        self.final_norm = parts.norm(in_channels, conv=True) or nn.Identity()
        self.final_act = parts.activation()
        token_dim = in_channels * _multiplier(self.final_act)
        self.moe: SoftMoE | None = None
        if soft_moe is None:
            dense_modules, dense_slots, self.output_dim = _dense_stack(parts, token_dim * h * w, [dense_size], "encoder.dense")
            self._slots += dense_slots
            self.dense = nn.Sequential(*dense_modules)
        else:
            self.moe, moe_slots, _ = _soft_moe(parts, soft_moe, token_dim)
            self._slots += moe_slots
            self.output_dim = h * w * token_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.stacks(self.scale(obs))
        x = self.final_act(self.final_norm(x))
        # The dense layer reads the map flattened; the Soft MoE reads its positions as tokens.
        return self.dense(x.flatten(1)) if self.moe is None else self.moe(x)


class Stream(nn.Module):
    """Optional hidden layer (Linear -> LN -> activation), then the output Linear."""

    def __init__(self, *, in_dim: int, hidden_size: int, out_dim: int, parts: _Parts, name: str):
        super().__init__()
        self.name = name
        modules, slots, width = _dense_stack(parts, in_dim, [hidden_size] if hidden_size else [], f"{name}.hidden")
        self.hidden = nn.Sequential(*modules)
        self.out = nn.Linear(width, out_dim)
        if slots:
            slots[-1].consumers = [self.out]
        self._slots = slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))

    def input_layer(self) -> nn.Linear:
        return self.hidden[0] if len(self.hidden) else self.out

    def hidden_layers(self) -> list[HiddenLayer]:
        return [HiddenLayer(s.name, s.producer, s.activation, list(s.consumers or []), s.norm) for s in self._slots]


class QHead(nn.Module):
    """Maps features to Q-values ``[B, A]`` or quantiles ``[B, A, N]``; plain or dueling.

    Besides ``forward`` it describes itself for :class:`QNetwork`: ``input_layers()`` (the layers
    reading the features), ``hidden_layers()`` and ``output_layers()``. A module replacing the head
    at runtime (plasticity injection) should provide the same three methods, or be built from
    modules that do (see :func:`collect_head_layers`).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        num_actions: int,
        num_quantiles: int | None,
        dueling: bool,
        hidden_size: int,
        parts: _Parts,
    ):
        super().__init__()
        self.num_actions = num_actions
        self.num_quantiles = num_quantiles
        self.dueling = dueling
        per_action = num_quantiles or 1
        if dueling:
            self.value = Stream(in_dim=in_dim, hidden_size=hidden_size, out_dim=per_action, parts=parts, name="head.value")
            self.advantage = Stream(
                in_dim=in_dim, hidden_size=hidden_size, out_dim=num_actions * per_action, parts=parts, name="head.advantage"
            )
            self.streams = [self.value, self.advantage]
        else:
            self.q = Stream(in_dim=in_dim, hidden_size=hidden_size, out_dim=num_actions * per_action, parts=parts, name="head.q")
            self.streams = [self.q]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch = features.shape[0]
        per_action = self.num_quantiles or 1
        if self.dueling:
            value = self.value(features).view(batch, 1, per_action)
            advantage = self.advantage(features).view(batch, self.num_actions, per_action)
            out = value + advantage - advantage.mean(dim=1, keepdim=True)
        else:
            out = self.q(features).view(batch, self.num_actions, per_action)
        return out if self.num_quantiles else out.view(batch, self.num_actions)

    def input_layers(self) -> list[nn.Linear]:
        return [stream.input_layer() for stream in self.streams]

    def hidden_layers(self) -> list[HiddenLayer]:
        return [layer for stream in self.streams for layer in stream.hidden_layers()]

    def output_layers(self) -> list[nn.Linear]:
        return [stream.out for stream in self.streams]


def collect_head_layers(head: nn.Module, method: str) -> list:
    """``head.<method>()`` where defined, else the concatenation over its children, recursively.

    ``method`` is "input_layers", "hidden_layers" or "output_layers". A replacement head built from
    :class:`QHead` modules (e.g. injection's ``h + h1 - h2``) is thereby described without help. An
    ``nn.Linear`` is its own input and output layer; an ``nn.Sequential`` without the method has its
    first weight layer as input, its last Linear as output and hidden layers inferred by
    :func:`plasticity.layers.hidden_layers`.
    """
    own = getattr(head, method, None)
    if callable(own):
        return list(own())
    if isinstance(head, nn.Linear):
        return [] if method == "hidden_layers" else [head]
    if isinstance(head, nn.Sequential):
        weights = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if method == "hidden_layers":
            return infer_hidden_layers(head)
        if method == "input_layers":
            return weights[:1]
        return [m for m in weights[-1:] if isinstance(m, nn.Linear)]
    return [layer for child in head.children() for layer in collect_head_layers(child, method)]


class QNetwork(nn.Module):
    """``forward(obs) = head(encoder(obs))``; see the module docstring for the contract."""

    def __init__(self, *, encoder: Encoder, head: nn.Module, num_actions: int, num_quantiles: int | None):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.num_actions = num_actions
        self.num_quantiles = num_quantiles
        self.feature_dim = encoder.output_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(obs))

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        return self.encoder(obs)

    def hidden_layers(self) -> list[HiddenLayer]:
        head_inputs = collect_head_layers(self.head, "input_layers")
        return self.encoder.hidden_layers(head_consumers=head_inputs) + collect_head_layers(self.head, "hidden_layers")

    def output_layers(self) -> list[nn.Linear]:
        return collect_head_layers(self.head, "output_layers")


def build_network(config: NetworkConfig, *, obs_shape: tuple[int, ...], num_actions: int, obs_dtype: str) -> QNetwork:
    """Build the Q-network described by ``config`` for observations ``obs_shape`` of ``obs_dtype``.

    Raises ValueError for a bad config, an obs_shape the encoder cannot take (CNNs need
    ``(C, H, W)``), ``num_actions < 1`` or an unsupported dtype.
    """
    config.validate()
    obs_shape = tuple(obs_shape)
    if not obs_shape or not all(_is_pos_int(d) for d in obs_shape):
        raise ValueError(f"obs_shape must be a non-empty tuple of positive integers, got {obs_shape!r}")
    if not _is_pos_int(num_actions):
        raise ValueError(f"num_actions must be an integer >= 1, got {num_actions!r}")
    if obs_dtype not in OBS_DTYPES:
        raise ValueError(f"obs_dtype must be one of {', '.join(OBS_DTYPES)}, got {obs_dtype!r}")
    if config.encoder != "mlp" and len(obs_shape) != 3:
        raise ValueError(f"encoder {config.encoder!r} needs image observations (C, H, W), got obs_shape {obs_shape}")
    parts = _Parts(config)
    dense_size = config.cnn_dense_size if config.encoder == "nature_cnn" else config.impala_dense_size
    soft_moe = None
    if config.penultimate == "soft_moe":  # validate() has refused it for the MLP encoder
        # Experts as wide as the dense layer they replace unless told otherwise (the paper's setup).
        soft_moe = SoftMoESpec(config.moe_experts, config.moe_slots_per_expert, config.moe_expert_hidden or dense_size)
    encoder: Encoder
    if config.encoder == "mlp":
        encoder = MLPEncoder(obs_shape=obs_shape, obs_dtype=obs_dtype, hidden_sizes=config.hidden_sizes, parts=parts)
    elif config.encoder == "nature_cnn":
        encoder = NatureCNNEncoder(obs_shape=obs_shape, obs_dtype=obs_dtype, dense_size=dense_size, parts=parts,
                                   soft_moe=soft_moe)
    else:
        encoder = ImpalaEncoder(
            obs_shape=obs_shape,
            obs_dtype=obs_dtype,
            channels=config.impala_channels,
            blocks=config.impala_blocks,
            dense_size=dense_size,
            parts=parts,
            soft_moe=soft_moe,
        )
    num_quantiles = config.num_quantiles if config.distributional == "qr" else None
    head = QHead(
        in_dim=encoder.output_dim,
        num_actions=num_actions,
        num_quantiles=num_quantiles,
        dueling=config.dueling,
        hidden_size=config.head_hidden_size,
        parts=parts,
    )
    return QNetwork(encoder=encoder, head=head, num_actions=num_actions, num_quantiles=num_quantiles)


def torch_obs_dtype(obs_dtype: str) -> torch.dtype:
    """The torch dtype for an ``obs_dtype`` name (one of :data:`OBS_DTYPES`)."""
    if obs_dtype not in _TORCH_DTYPES:
        raise ValueError(f"obs_dtype must be one of {', '.join(OBS_DTYPES)}, got {obs_dtype!r}")
    return _TORCH_DTYPES[obs_dtype]


__all__ = [
    "ChannelLayerNorm",
    "Encoder",
    "ImpalaEncoder",
    "MLPEncoder",
    "NatureCNNEncoder",
    "NetworkConfig",
    "QHead",
    "QNetwork",
    "SoftMoESpec",
    "build_network",
    "collect_head_layers",
    "torch_obs_dtype",
]
