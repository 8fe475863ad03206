"""Hidden layers: the units that interventions reset and diagnostics measure.

A *hidden layer* is a group of units produced by one Linear/Conv2d (the *producer*), optionally
normalized, passed through an activation module (whose output is each unit's value), and read by
one or more Linear/Conv2d *consumers* (the outgoing weights). Resetting unit ``i`` means: fresh
incoming weights (producer row/filter ``i`` and its bias), and zero outgoing weights (the consumer
input columns that read unit ``i``), plus the matching optimizer state.

Networks describe their layers by defining ``hidden_layers() -> list[HiddenLayer]``; for a plain
``nn.Sequential`` of Linear/Conv2d, optional norm, activation modules (and ``nn.Flatten``)
:func:`hidden_layers` infers them.

Consumer column layout. A consumer's input is viewed as ``(multiplier, units, spatial)`` flattened
in that order: ``column = j * units * spatial + i * spatial + s``. That covers

* Linear -> act -> Linear:              multiplier 1, spatial 1
* Conv -> act -> Flatten -> Linear:     multiplier 1, spatial H*W  (channel-major flatten)
* Conv -> act -> Conv:                  the consumer's *input channels* are indexed, spatial 1
* CReLU-style activations that concatenate ``[f(x), g(x)]`` along the unit axis: multiplier 2.

Shared definitions: :func:`unit_activity` / :func:`unit_scores` are the one dormancy score (ReDo and
the diagnostics), and :func:`layer_names` the one name of every parametrized module (every
diagnostic and metric key).

Example::

    with ActivationRecorder(hidden_layers(net)) as recorder:
        net(probe_obs)
    for layer in hidden_layers(net):
        print(layer.name, layer.num_units, [c.weight.shape for c in layer.consumers])
        cols = layer.consumer_columns(layer.consumers[0], units=torch.tensor([0, 3]))
        scores = unit_scores(unit_activity(layer, recorder.outputs[layer.name]))   # dormant: scores <= tau
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

WeightLayer = nn.Linear | nn.Conv2d
_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Mish)


@dataclass(eq=False)
class HiddenLayer:
    """One group of hidden units (see the module docstring)."""

    name: str
    producer: WeightLayer
    activation: nn.Module
    consumers: list[WeightLayer] = field(default_factory=list)
    norm: nn.Module | None = None

    @property
    def num_units(self) -> int:
        return self.producer.out_features if isinstance(self.producer, nn.Linear) else self.producer.out_channels

    @property
    def multiplier(self) -> int:
        """How many values each unit contributes (2 for CReLU / Fourier features)."""
        return int(getattr(self.activation, "out_multiplier", 1))

    def consumer_columns(self, consumer: WeightLayer, units: torch.Tensor) -> torch.Tensor:
        """Indices of ``consumer``'s input columns (Linear) or input channels (Conv2d) that read ``units``."""
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1)
        fan_in = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
        per_unit = fan_in // (self.multiplier * self.num_units)
        if per_unit * self.multiplier * self.num_units != fan_in:
            raise ValueError(
                f"layer {self.name!r}: consumer fan-in {fan_in} is not multiplier {self.multiplier} x "
                f"units {self.num_units} x spatial"
            )
        spatial = torch.arange(per_unit)
        blocks = torch.arange(self.multiplier) * self.num_units * per_unit
        cols = blocks[:, None, None] + units[None, :, None] * per_unit + spatial[None, None, :]
        return cols.reshape(-1)


def hidden_layers(network: nn.Module) -> list[HiddenLayer]:
    """The network's hidden layers: its own ``hidden_layers()`` if defined, else inferred.

    Inference walks an ``nn.Sequential`` (nested Sequentials are flattened) and pairs each
    Linear/Conv2d followed by an activation with the next Linear/Conv2d as its consumer.
    """
    own = getattr(network, "hidden_layers", None)
    if callable(own):
        return list(own())
    modules = list(_flatten(network))
    layers: list[HiddenLayer] = []
    pending: HiddenLayer | None = None
    producer: WeightLayer | None = None
    norm: nn.Module | None = None
    for index, module in enumerate(modules):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if pending is not None:
                pending.consumers.append(module)
                pending = None
            producer, norm = module, None
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            norm = module
        elif producer is not None and is_activation(module):
            pending = HiddenLayer(name=f"layer{len(layers)}_{index}", producer=producer, activation=module, norm=norm)
            layers.append(pending)
            producer = None
    return [layer for layer in layers if layer.consumers]


def is_activation(module: nn.Module) -> bool:
    """True for torch activations and for any module that declares ``is_activation = True``."""
    return isinstance(module, _ACTIVATIONS) or bool(getattr(module, "is_activation", False))


def _flatten(module: nn.Module):
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from _flatten(child)
    else:
        yield module


class ActivationRecorder:
    """Context manager that records each hidden layer's activation output during forward passes.

    Example::

        with ActivationRecorder(hidden_layers(net)) as rec:
            net(probe_obs)
        rec.outputs["layer0_1"]   # tensor [batch, units(, H, W)] of the activation's output
    """

    def __init__(self, layers: list[HiddenLayer], *, detach: bool = True):
        self.layers = layers
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> ActivationRecorder:
        for layer in self.layers:
            self._handles.append(layer.activation.register_forward_hook(self._hook(layer.name)))
        return self

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name] = output.detach() if self.detach else output

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def unit_activity(layer: HiddenLayer, output: torch.Tensor) -> torch.Tensor:
    """Per-unit mean absolute activation ``E|h_i|`` of ``layer`` from its activation ``output``.

    ``output`` is ``[batch, multiplier * units(, H, W)]`` (as recorded by :class:`ActivationRecorder`);
    the mean runs over the batch, the multiplier blocks (both halves of a CReLU unit) and spatial
    positions (ReDo's convention for conv layers). Returns a float64 tensor ``[units]`` on
    ``output``'s device (accumulated in float64). A NaN/inf anywhere in ``output`` makes the units
    it belongs to NaN/inf: callers check ``torch.isfinite``; nothing is silently zeroed.
    """
    expected = layer.multiplier * layer.num_units
    if output.dim() < 2 or output.shape[1] != expected:
        raise ValueError(
            f"layer {layer.name!r}: activation output of shape {tuple(output.shape)} does not have "
            f"{expected} (= multiplier {layer.multiplier} x units {layer.num_units}) values on dim 1"
        )
    if output.shape[0] == 0:
        raise ValueError(f"layer {layer.name!r}: activation output of shape {tuple(output.shape)} has 0 samples")
    values = output.detach().abs().reshape(output.shape[0], layer.multiplier, layer.num_units, -1)
    return values.mean(dim=(0, 1, 3), dtype=torch.float64)


def unit_scores(activity: torch.Tensor) -> torch.Tensor:
    """ReDo's dormancy score ``s_i = E|h_i| / mean_k E|h_k|`` of one layer, from :func:`unit_activity`.

    The one definition shared by ReDo and the diagnostics (``dormant_ratio``/``dead_ratio``): a unit
    is dormant when ``s_i <= tau``. Normalized by the layer's *mean* activity (not its max), so
    ``tau`` is relative to an average unit. A layer whose every unit has ``E|h| = 0`` scores all 0
    (all dormant). Any non-finite activity makes every score NaN: a NaN probe must not read as
    "nothing is dormant". Averaging ``activity`` over DDP ranks *before* scoring keeps ranks agreed.

    Example::

        unit_scores(torch.tensor([1.5, 0.15, 3.0, 0.9]))   # [1.081, 0.108, 2.162, 0.649]
    """
    if activity.dim() != 1 or activity.numel() == 0:
        raise ValueError(f"activity must be a non-empty [units] tensor, got shape {tuple(activity.shape)}")
    activity = activity.to(torch.float64)
    if not bool(torch.isfinite(activity).all()):
        return torch.full_like(activity, float("nan"))
    layer_mean = activity.mean()
    if layer_mean == 0:
        return torch.zeros_like(activity)
    return activity / layer_mean


def layer_names(network: nn.Module) -> dict[nn.Module, str]:
    """The one name of every parameter-owning module, used by every diagnostic and metric.

    A hidden layer's producer is named by the layer (``HiddenLayer.name``, e.g. ``encoder.fc0``), its
    normalization module ``<name>.norm`` and a parametrized activation (e.g. rational) ``<name>.act``;
    every other module that owns parameters directly (output layers such as ``head.q.out``, a
    producer outside any hidden layer) by its path in ``named_modules()`` (the root: ``"root"``).
    Modules are listed in ``named_modules()`` order. Two modules that would get the same name raise.

    Example::

        names = layer_names(net)        # {net.encoder.body[1]: "encoder.fc0", net.head.q.out: "head.q.out", ...}
        print(names[net.head.q.out])
    """
    own: dict[nn.Module, str] = {}
    for layer in hidden_layers(network):
        for module, name in ((layer.producer, layer.name), (layer.norm, f"{layer.name}.norm"),
                             (layer.activation, f"{layer.name}.act")):
            if module is not None:
                own.setdefault(module, name)
    out: dict[nn.Module, str] = {}
    owners: dict[str, str] = {}
    for path, module in network.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        name = own.get(module, path or "root")
        if name in owners:
            raise ValueError(
                f"layer name {name!r} is given to both module {owners[name]!r} and module {path or 'root'!r}; "
                f"hidden-layer names must differ from the module paths of other parametrized modules"
            )
        owners[name] = path or "root"
        out[module] = name
    return out
