"""Plasticity diagnostics: pinned definitions, pure functions, and one scheduled entry point.

Every diagnostic is a plain function of tensors (tested against hand-computed values) and is also
reachable by name through :class:`Diagnostics`, which measures a network (the network contract:
``features``/``head``/``hidden_layers()``; plain ``nn.Sequential`` works too) on a probe batch on a
schedule and returns one flat ``{name: float}`` dict whose keys carry layer names, e.g.
``dormant_ratio/encoder.fc0``, ``dormant_ratio/total``, ``srank``, ``weight_norm/head.q.out``.

Example::

    diag = Diagnostics(net, names="default", every=1000, probe_obs=probe_obs,
                       loss_fn=per_sample_loss, policy_fn=q_value_policy(temperature=1.0))
    for step in range(num_steps):
        loss = per_sample_loss(net, batch).mean()
        opt.zero_grad(); loss.backward()
        diag.before_step()          # snapshots parameters when the next measurement is due
        opt.step()
        metrics = diag.after_step(loss_batch=batch)   # {} except every 1000th call
    print(Diagnostics.valid_names())

Layer names. Every key names a layer the same way (:func:`plasticity.layers.layer_names`): a
hidden layer's producer by ``HiddenLayer.name`` (``weight_norm/encoder.fc0`` and
``dormant_ratio/encoder.fc0`` are the same layer), its normalization module ``<name>.norm``, a
parametrized activation ``<name>.act``, and any other parametrized module (output layers such as
``head.q.out``) by its module path.

Pinned definitions (public code disagrees; these are the choices made here):

* ``dormant_ratio`` (tau 0.025) / ``dead_ratio`` (tau 0): unit score ``s_i = E|h_i| / mean_k E|h_k|``
  within a layer (:func:`plasticity.layers.unit_scores`, the one ReDo uses), the expectation over
  probe samples, spatial positions and the activation's ``out_multiplier`` copies; a unit is
  dormant when ``s_i <= tau``. A layer whose every unit has ``E|h| = 0`` has all scores 0 (all
  dormant). Per layer: dormant units / units in the layer. **Total: dormant units / all units,
  pooled over every hidden layer** (a unit-weighted average, not the mean of per-layer ratios).
* ``active_units``: for ReLU-family activations (ReLU, ReLU6, CReLU) the fraction of activation
  outputs that are nonzero, averaged over samples, positions and units (total pooled over units of
  all ReLU-family layers). ``saturated_units``: for tanh, the same average of ``|f| > 0.99``.
  Layers with other activations get neither key.
* Feature matrix ``Phi``: the penultimate features ``network.features(probe_obs)`` ``[n, d]``
  (without ``features``: the last hidden layer's activation output, flattened per sample), singular
  values ``sigma_1 >= ... >= sigma_d``, computed in float64.
* ``srank``: min k with ``sum_{i<=k} sigma_i / sum_i sigma_i >= 1 - delta`` (delta 0.01); 0 if
  ``Phi`` is all zeros.
* ``effective_rank``: ``exp(-sum_i p_i log p_i)``, ``p = sigma / sum sigma``, ``0 log 0 = 0``.
* ``feature_rank``: ``#{i : sigma_i(Phi / sqrt(n)) > eps}`` (eps 0.01).
* ``feature_norm``: mean over samples of ``||phi(x)||_2``; ``feature_var``: mean over feature units
  of the population variance (``1/n``) across samples.
* ``weight_norm/<layer>``: L2 norm of all parameters owned directly by the module (weight and
  bias together; LayerNorm gain/offset included); ``dist_to_init/<layer>``: ``||theta - theta_0||``
  with ``theta_0`` recorded when the :class:`Diagnostics` is built (or passed in). ``/total`` over
  all parameters.
* ``effective_lr/<layer>``: ``||theta_after - theta_before|| / ||theta_before||`` across one
  optimizer step (modules with ``||theta_before|| = 0``, or not present at both ends, are left
  out); ``/total`` over the modules measured. :class:`EffectiveLRTracker` holds the snapshot.
* ``grad_l1/<layer>``, ``grad_l2/<layer>``, ``grad_zero_frac/<layer>`` (fraction of gradient
  entries exactly 0): of a fresh gradient of ``loss_fn`` on ``loss_batch`` when a loss is given,
  else of the parameters' current ``.grad`` (the last backward pass); parameters without a
  gradient count as all-zero gradients.
* ``hessian_max_eig``: the **largest algebraic** eigenvalue ``lambda_max`` of the Hessian of the mean
  loss over the first ``hessian_samples`` (512) rows of the loss batch w.r.t. all trainable
  parameters. Power iteration on Hessian-vector products (double backprop) finds the dominant
  (largest-magnitude) eigenvalue ``lambda_d``; if ``lambda_d < 0`` a second power iteration on
  ``H - lambda_d I`` (whose eigenvalues ``lambda_i - lambda_d`` are all >= 0) finds its dominant
  eigenvalue ``mu`` and ``lambda_max = mu + lambda_d``. Each run: 20 iterations or until
  ``|lambda_k - lambda_{k-1}| <= 1e-4 |lambda_k|``, start vector from the generator.
* ``plasticity_probe``: a deep copy of the network is given a fresh linear regression head on its
  features (``out_dim`` outputs), and all its parameters are trained full-batch with Adam for
  ``steps`` steps on MSE to targets ``~ N(0, 1)`` on the probe inputs; the final MSE is
  ``plasticity_probe/loss``. The same from a copy whose modules were re-initialized
  (``reset_parameters``) with identical head init and targets is ``plasticity_probe/fresh_loss``;
  ``plasticity_probe/ratio = loss / fresh_loss`` (> 1: less plastic than a fresh network).
* Policy. ``policy_fn(output) -> PolicyView`` maps the network's forward output on the probe batch
  (``head(features(obs))``, else ``network(obs)``) to the policy's ``actions`` (``[B]`` integer for
  discrete actions, ``[B, d]`` float for continuous ones) and per-state ``entropy`` (``[B]`` nats, or
  None). Default :func:`q_value_policy`: greedy argmax of the Q-values (QR heads averaged over
  quantiles first), entropy of ``softmax(Q / temperature)``.
* ``churn``: fraction of probe states whose action changed between this measurement and the previous
  one (the update window is the schedule's period); absent on the first measurement and when the
  action shape or kind changed. Integer actions: the action differs. Float actions: it moved by more
  than ``churn_tolerance`` (1e-3) in max-norm, ``max_j |a_j - a'_j| > tol``.
* ``policy_entropy``: mean over states of the policy's entropy (nats); absent when ``policy_fn``
  gives ``entropy=None``.
* ``grad_interference``: mean over pairs ``i < j`` of the cosine similarity between the per-sample
  gradients (all trainable parameters, flattened) of the first ``interference_samples`` samples of
  ``loss_fn``; a pair with a zero gradient counts 0.

Bad input. A NaN/inf anywhere in the probe batch, or in what the network computes from it (any
hidden activation, the features, the output, the policy's actions/entropy), makes **every** forward
diagnostic of that measurement NaN (same keys as usual; ``churn`` NaN if a previous measurement
exists, and the next measurement starts a new churn window), and ``plasticity_probe`` NaN. Likewise
a NaN/inf in the loss batch or in its per-sample losses makes ``hessian_max_eig``,
``grad_interference`` and the loss-based ``grad_*`` NaN. Each such occurrence (probe side, loss side)
adds 1 to :attr:`Diagnostics.nonfinite_inputs` and emits one ``RuntimeWarning``. A probe or loss
batch with 0 rows is a ValueError naming its shape.

``loss_fn(network, loss_batch) -> Tensor[B]`` returns **per-sample** losses (the mean is the loss).
A loss batch is a tensor, an array, or a dict/list/tuple of them whose leading dimension is the row.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from plasticity.layers import (
    ActivationRecorder,
    HiddenLayer,
    hidden_layers,
    layer_names,
    unit_activity,
    unit_scores,
)

LossFn = Callable[[nn.Module, Any], torch.Tensor]

#: Every diagnostic name, in output order.
ALL_NAMES = (
    "dormant_ratio",
    "dead_ratio",
    "active_units",
    "srank",
    "effective_rank",
    "feature_rank",
    "feature_norm",
    "weight_norm",
    "dist_to_init",
    "effective_lr",
    "grad_norm",
    "churn",
    "policy_entropy",
    "hessian_max_eig",
    "plasticity_probe",
    "grad_interference",
)
#: The cheap set: one forward pass on the probe batch, one SVD, and parameter arithmetic.
DEFAULT_NAMES = tuple(n for n in ALL_NAMES if n not in ("hessian_max_eig", "plasticity_probe", "grad_interference"))
_NEEDS_LOSS = ("hessian_max_eig", "grad_interference")
_FORWARD_NAMES = ("dormant_ratio", "dead_ratio", "active_units", "srank", "effective_rank", "feature_rank",
                  "feature_norm", "churn", "policy_entropy")
_FEATURE_KEYS = {"srank": ("srank",), "effective_rank": ("effective_rank",), "feature_rank": ("feature_rank",),
                 "feature_norm": ("feature_norm", "feature_var")}
_RELU_FAMILY = (nn.ReLU, nn.ReLU6)
_NAN = float("nan")


# --------------------------------------------------------------------------------- batches
def _tensors(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor | np.ndarray]]:
    """(path, tensor or array) for every tensor/array in a tensor, array, dict, list or tuple."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{path}[{index}]")


def has_nonfinite(value: Any) -> bool:
    """True if any floating tensor/array in ``value`` (see :func:`_tensors`) holds a NaN or inf."""
    for _, t in _tensors(value):
        if isinstance(t, torch.Tensor):
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                return True
        elif np.issubdtype(t.dtype, np.inexact) and not bool(np.isfinite(t).all()):
            return True
    return False


def _check_rows(what: str, value: Any) -> None:
    """ValueError naming the shape if any tensor of the batch has 0 rows (leading dimension 0)."""
    for path, t in _tensors(value):
        if t.ndim >= 1 and t.shape[0] == 0:
            raise ValueError(f"{what}{path} has 0 rows (shape {tuple(t.shape)}); expected at least 1 row")


def _head_rows(value: Any, rows: int) -> Any:
    """The first ``rows`` rows of every tensor/array in ``value`` (0-dim entries and others unchanged)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value[:rows] if value.ndim >= 1 else value
    if isinstance(value, dict):
        return {key: _head_rows(item, rows) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_head_rows(item, rows) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuple: by position
    return value


# ----------------------------------------------------------------------------------------- units
def _per_unit_fraction(mask: torch.Tensor, *, num_units: int, multiplier: int) -> torch.Tensor:
    return mask.to(torch.float64).reshape(mask.shape[0], multiplier, num_units, -1).mean(dim=(0, 1, 3))


def active_fraction(output: torch.Tensor, *, num_units: int, multiplier: int = 1) -> torch.Tensor:
    """Per-unit fraction of nonzero outputs (ReLU family), ``[units]``."""
    return _per_unit_fraction(output.detach() != 0, num_units=num_units, multiplier=multiplier)


def saturated_fraction(
    output: torch.Tensor, *, num_units: int, multiplier: int = 1, threshold: float = 0.99
) -> torch.Tensor:
    """Per-unit fraction of outputs with ``|f| > threshold`` (tanh saturation), ``[units]``."""
    return _per_unit_fraction(output.detach().abs() > threshold, num_units=num_units, multiplier=multiplier)


# -------------------------------------------------------------------------------------- features
def _as_matrix(features: torch.Tensor) -> torch.Tensor:
    if features.dim() < 2 or features.shape[0] == 0:
        raise ValueError(f"features must be [n >= 1, d, ...], got shape {tuple(features.shape)}")
    return features.detach().reshape(features.shape[0], -1).to(torch.float64)


def singular_values(features: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of the feature matrix ``[n, d]`` (extra dims flattened)."""
    return torch.linalg.svdvals(_as_matrix(features))


def srank(features: torch.Tensor, *, delta: float = 0.01) -> int:
    """min k with ``sum_{i<=k} sigma_i / sum sigma >= 1 - delta``; 0 for an all-zero matrix."""
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    sigma = singular_values(features)
    total = sigma.sum()
    if total == 0:
        return 0
    # A tiny slack so that exact ties (cumsum == (1-delta)*total) are not lost to rounding.
    reached = torch.cumsum(sigma, 0) / total >= (1 - delta) - 1e-12
    return int(torch.nonzero(reached)[0, 0]) + 1


def effective_rank(features: torch.Tensor) -> float:
    """``exp(-sum p log p)`` with ``p = sigma / sum sigma`` (``0 log 0 = 0``); 0 for all zeros."""
    sigma = singular_values(features)
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def feature_rank(features: torch.Tensor, *, eps: float = 0.01) -> int:
    """``#{sigma_i(Phi / sqrt(n)) > eps}``."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    matrix = _as_matrix(features)
    return int((torch.linalg.svdvals(matrix / math.sqrt(matrix.shape[0])) > eps).sum())


def feature_stats(features: torch.Tensor) -> dict[str, float]:
    """``feature_norm``: mean ``||phi(x)||_2``; ``feature_var``: mean per-unit population variance."""
    matrix = _as_matrix(features)
    return {
        "feature_norm": float(matrix.norm(dim=1).mean()),
        "feature_var": float(matrix.var(dim=0, unbiased=False).mean()),
    }


# ------------------------------------------------------------------------------------ parameters
def parameter_groups(network: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``{layer name: parameters the module owns directly}`` for every module owning any.

    Names come from :func:`plasticity.layers.layer_names` (hidden-layer names for hidden layers'
    producers and norms, module paths otherwise), so parameter and unit diagnostics agree.
    """
    return {name: list(module.parameters(recurse=False)) for module, name in layer_names(network).items()}


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def weight_norms(network: nn.Module) -> dict[str, float]:
    """``weight_norm/<layer>`` (all its own parameters together) and ``weight_norm/total``."""
    out = {f"weight_norm/{name}": float(_flat(ps).norm()) for name, ps in parameter_groups(network).items()}
    out["weight_norm/total"] = float(_flat(network.parameters()).norm())
    return out


def snapshot_parameters(network: nn.Module) -> dict[str, torch.Tensor]:
    """Detached float64 copies of every module's own parameters, flattened, keyed like :func:`parameter_groups`."""
    return {name: _flat(ps).clone() for name, ps in parameter_groups(network).items()}


def distances_to_init(network: nn.Module, initial: dict[str, torch.Tensor]) -> dict[str, float]:
    """``dist_to_init/<layer>`` = ``||theta - theta_0||`` and ``dist_to_init/total``.

    Modules without a same-sized ``theta_0`` entry (e.g. a head added by plasticity injection after
    ``theta_0`` was recorded) are left out of the per-module keys and the total; if no module
    matches at all, ``initial`` belongs to another network and ValueError is raised.
    """
    current = snapshot_parameters(network)
    matched = {n: t for n, t in current.items() if n in initial and initial[n].shape == t.shape}
    if not matched:
        raise ValueError(
            f"initial parameters are for modules {sorted(initial)}, the network has {sorted(current)}"
        )
    out: dict[str, float] = {}
    total = 0.0
    for name, theta in matched.items():
        sq = float(((theta - initial[name]) ** 2).sum())
        out[f"dist_to_init/{name}"] = math.sqrt(sq)
        total += sq
    out["dist_to_init/total"] = math.sqrt(total)
    return out


class EffectiveLRTracker:
    """``||delta theta|| / ||theta||`` per module across one optimizer step.

    Example::

        tracker = EffectiveLRTracker(net)
        tracker.snapshot(); opt.step(); print(tracker.measure())   # {'effective_lr/encoder.fc0': ..., ...}
    """

    def __init__(self, network: nn.Module):
        self.network = network
        self._before: dict[str, torch.Tensor] | None = None

    @property
    def armed(self) -> bool:
        return self._before is not None

    def snapshot(self) -> None:
        self._before = snapshot_parameters(self.network)

    def measure(self) -> dict[str, float]:
        """Ratios since the last :meth:`snapshot` (which it consumes); raises if none was taken."""
        if self._before is None:
            raise RuntimeError("EffectiveLRTracker.measure() needs a snapshot() before the optimizer step")
        before, self._before = self._before, None
        # Only modules present (same size) at both ends: a head swapped in between has no "before".
        after = {n: t for n, t in snapshot_parameters(self.network).items()
                 if n in before and before[n].shape == t.shape}
        out: dict[str, float] = {}
        delta_sq = norm_sq = 0.0
        for name, theta in after.items():
            d = float(((theta - before[name]) ** 2).sum())
            n = float((before[name] ** 2).sum())
            delta_sq, norm_sq = delta_sq + d, norm_sq + n
            if n > 0:
                out[f"effective_lr/{name}"] = math.sqrt(d / n)
        if norm_sq > 0:
            out["effective_lr/total"] = math.sqrt(delta_sq / norm_sq)
        return out


def grad_stats(network: nn.Module, grads: dict[nn.Parameter, torch.Tensor | None] | None = None) -> dict[str, float]:
    """``grad_l1``, ``grad_l2``, ``grad_zero_frac`` per module and ``/total``.

    ``grads`` maps parameters to gradients; default: each parameter's ``.grad`` (``None`` = zeros).
    """
    out: dict[str, float] = {}
    l1 = l2 = zeros = count = 0.0
    for name, params in parameter_groups(network).items():
        g_l1 = g_l2 = g_zero = g_count = 0.0
        for p in params:
            g = p.grad if grads is None else grads.get(p)
            n = p.numel()
            g_count += n
            if g is None:
                g_zero += n
                continue
            g = g.detach().to(torch.float64)
            g_l1 += float(g.abs().sum())
            g_l2 += float((g * g).sum())
            g_zero += float((g == 0).sum())
        out[f"grad_l1/{name}"] = g_l1
        out[f"grad_l2/{name}"] = math.sqrt(g_l2)
        out[f"grad_zero_frac/{name}"] = g_zero / g_count
        l1, l2, zeros, count = l1 + g_l1, l2 + g_l2, zeros + g_zero, count + g_count
    out.update({"grad_l1/total": l1, "grad_l2/total": math.sqrt(l2), "grad_zero_frac/total": zeros / max(count, 1)})
    return out


# --------------------------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class PolicyView:
    """What the policy does on the probe batch (the output of a ``policy_fn``).

    ``actions``: ``[B]`` integer (discrete actions) or ``[B, d]`` floating (continuous actions).
    ``entropy``: ``[B]`` entropy in nats of each state's action distribution, or None (e.g. a
    deterministic actor), in which case ``policy_entropy`` is not reported.

    Example (a deterministic continuous actor whose head outputs the action)::

        Diagnostics(actor, probe_obs=obs, policy_fn=lambda out: PolicyView(actions=out))
    """

    actions: torch.Tensor
    entropy: torch.Tensor | None = None

    def check(self, rows: int) -> PolicyView:
        """Raise ValueError unless the shapes fit a probe batch of ``rows`` states; return self."""
        a = self.actions
        discrete = isinstance(a, torch.Tensor) and a.dim() == 1 and not (a.is_floating_point() or a.is_complex())
        continuous = isinstance(a, torch.Tensor) and a.dim() == 2 and a.is_floating_point()
        if not (discrete or continuous) or a.shape[0] != rows:
            raise ValueError(
                f"PolicyView.actions must be [{rows}] integer or [{rows}, d] float for {rows} probe states, got "
                f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}"
                f"{' ' + str(a.dtype) if isinstance(a, torch.Tensor) else ''}"
            )
        e = self.entropy
        if e is not None and not (isinstance(e, torch.Tensor) and e.shape == (rows,)):
            raise ValueError(
                f"PolicyView.entropy must be None or a [{rows}] tensor (nats per state), got "
                f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}"
            )
        return self


PolicyFn = Callable[[Any], PolicyView]


def _action_values(q: torch.Tensor) -> torch.Tensor:
    """``[B, A]`` from ``[B, A]`` or a QR head's ``[B, A, N]`` (mean over quantiles)."""
    if q.dim() == 3:
        return q.mean(dim=2)
    if q.dim() != 2:
        raise ValueError(f"expected Q-values [B, A] or [B, A, quantiles], got shape {tuple(q.shape)}")
    return q


def q_value_policy(temperature: float = 1.0) -> PolicyFn:
    """The ``policy_fn`` of a Q-network: greedy actions, Boltzmann entropy at ``temperature``.

    Actions: ``argmax_a Q(s, a)`` (QR heads: of the quantile mean). Entropy: of ``softmax(Q / temperature)``
    in nats, computed in float64.

    Example::

        view = q_value_policy(0.5)(net(obs))     # PolicyView(actions=[B] long, entropy=[B] float64)
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")

    def policy(q: torch.Tensor) -> PolicyView:
        values = _action_values(q.detach()).to(torch.float64)
        logp = torch.log_softmax(values / temperature, dim=1)
        return PolicyView(actions=values.argmax(dim=1), entropy=-(logp.exp() * logp).sum(dim=1))

    return policy


def greedy_actions(q: torch.Tensor) -> torch.Tensor:
    """``argmax_a Q`` per state (QR: of the quantile mean), ``[B]``."""
    return q_value_policy()(q).actions


def policy_entropy(logits: torch.Tensor, *, temperature: float = 1.0) -> float:
    """Mean entropy (nats) of ``softmax(logits / temperature)`` over the batch (QR: quantile mean)."""
    return float(q_value_policy(temperature)(logits).entropy.mean())


def churn(actions_before: torch.Tensor, actions_after: torch.Tensor, *, tolerance: float = 1e-3) -> float:
    """Fraction of states whose action changed between two snapshots.

    Integer ``[B]`` actions: the action differs. Float ``[B, d]`` actions: it moved by more than
    ``tolerance`` in max-norm (``max_j |a_j - a'_j| > tolerance``). NaN if a float action is NaN/inf.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    before, after = actions_before.detach(), actions_after.detach()
    if before.shape != after.shape or before.dim() not in (1, 2):
        raise ValueError(
            f"churn needs two [B] (integer) or [B, d] (float) action tensors of equal shape, got "
            f"{tuple(before.shape)} and {tuple(after.shape)}"
        )
    floats = before.is_floating_point(), after.is_floating_point()
    if before.dim() == 1 and not any(floats):
        return float((before != after).to(torch.float64).mean())
    if before.dim() == 2 and all(floats):
        moved = (after.to(torch.float64) - before.to(torch.float64)).abs().amax(dim=1)
        if not bool(torch.isfinite(moved).all()):
            return _NAN
        return float((moved > tolerance).to(torch.float64).mean())
    raise ValueError(
        f"churn needs [B] integer or [B, d] float actions, got shape {tuple(before.shape)} with dtypes "
        f"{before.dtype} and {after.dtype}"
    )


# ----------------------------------------------------------------------------------- loss-based
def _trainable(network: nn.Module) -> list[nn.Parameter]:
    return [p for p in network.parameters() if p.requires_grad]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def _dominant_eigenvalue(hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]], params: list[torch.Tensor], *,
                         shift: float, iters: int, tol: float, generator: torch.Generator | None) -> float:
    """Power iteration for the dominant eigenvalue of ``H - shift * I`` (Rayleigh quotient ``v . (H - sI) v``)."""
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    eig = None
    for _ in range(iters):
        hv = [h - shift * x for h, x in zip(hvp(v), v, strict=True)] if shift else hvp(v)
        new_eig = float(_dot(hv, v))
        if not math.isfinite(new_eig):
            return _NAN
        norm = torch.sqrt(_dot(hv, hv))
        if norm == 0:  # v is an eigenvector with eigenvalue exactly 0
            return 0.0
        v = [x.detach() / norm for x in hv]
        if eig is not None and abs(new_eig - eig) <= tol * abs(new_eig):
            return new_eig
        eig = new_eig
    return float(eig)


def hessian_max_eig(
    loss_closure: Callable[[], torch.Tensor],
    params: list[torch.Tensor],
    *,
    iters: int = 20,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> float:
    """Largest algebraic Hessian eigenvalue ``lambda_max`` of ``loss_closure()`` w.r.t. ``params``.

    Power iteration (one Hessian-vector product by double backprop per iteration) gives the
    dominant eigenvalue ``lambda_d``. If ``lambda_d >= 0`` it is ``lambda_max``; otherwise a second
    power iteration on ``H - lambda_d I`` (eigenvalues ``lambda_i - lambda_d >= 0``) gives its
    dominant eigenvalue ``mu``, and ``lambda_max = mu + lambda_d``. Each run stops after ``iters``
    or when ``|lambda_k - lambda_{k-1}| <= tol * |lambda_k|``, starting from a random unit vector
    drawn from ``generator``. A non-finite loss or curvature gives NaN.

    Example::

        a = torch.diag(torch.tensor([-3.0, 1.0]))
        x = torch.nn.Parameter(torch.zeros(2))
        hessian_max_eig(lambda: 0.5 * x @ a @ x, [x])     # 1.0 (the dominant eigenvalue is -3)
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters!r}")
    if not params:
        raise ValueError("hessian_max_eig needs at least one parameter")
    loss = loss_closure()
    if loss.dim() != 0:
        raise ValueError(f"loss_closure must return a scalar, got shape {tuple(loss.shape)}")
    if not bool(torch.isfinite(loss)):
        return _NAN
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # Gradients that do not depend on the parameters (or are absent) contribute zero curvature.
    live = [(g, p) for g, p in zip(grads, params, strict=True) if g is not None and g.requires_grad]
    if not live:
        return 0.0
    grads, params = [g for g, _ in live], [p for _, p in live]

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params, strict=True)]

    dominant = _dominant_eigenvalue(hvp, params, shift=0.0, iters=iters, tol=tol, generator=generator)
    if not dominant < 0:  # >= 0, or NaN
        return dominant
    # Every eigenvalue of H - lambda_d I is >= 0, so its dominant one is lambda_max - lambda_d.
    return dominant + _dominant_eigenvalue(hvp, params, shift=dominant, iters=iters, tol=tol, generator=generator)


def per_sample_gradients(network: nn.Module, loss_fn: LossFn, batch: Any, *, max_samples: int) -> torch.Tensor:
    """``[S, P]`` flattened gradients of the first ``S <= max_samples`` per-sample losses (a loop)."""
    params = _trainable(network)
    losses = loss_fn(network, batch)
    if losses.dim() != 1:
        raise ValueError(f"loss_fn must return per-sample losses [B], got shape {tuple(losses.shape)}")
    rows = []
    count = min(max_samples, losses.shape[0])
    for i in range(count):
        gs = torch.autograd.grad(losses[i], params, retain_graph=i + 1 < count, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs, strict=True)]))
    return torch.stack(rows).to(torch.float64)


def gradient_interference(per_sample: torch.Tensor) -> float:
    """Mean pairwise cosine similarity over pairs ``i < j`` of rows of ``[S, P]``; zero rows count 0; NaN/inf: NaN."""
    if per_sample.dim() != 2 or per_sample.shape[0] < 2:
        raise ValueError(f"need [S >= 2, P] per-sample gradients, got shape {tuple(per_sample.shape)}")
    if not bool(torch.isfinite(per_sample).all()):
        return _NAN
    norms = per_sample.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, per_sample / norms.clamp_min(1e-300), torch.zeros_like(per_sample))
    cos = unit @ unit.T
    s = per_sample.shape[0]
    iu = torch.triu_indices(s, s, offset=1)
    return float(cos[iu[0], iu[1]].mean())


# ------------------------------------------------------------------------------ plasticity probe
def _forward_features(network: nn.Module, obs: torch.Tensor) -> torch.Tensor:
    features = getattr(network, "features", None)
    out = features(obs) if callable(features) else network(obs)
    return out.reshape(out.shape[0], -1)


def _reinitialize(network: nn.Module) -> None:
    for module in network.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def _fit_regression(network: nn.Module, obs: torch.Tensor, targets: torch.Tensor, *, steps: int, lr: float,
                    head_seed: int) -> float:
    with torch.no_grad():
        dim = _forward_features(network, obs[:1]).shape[1]
    head = nn.Linear(dim, targets.shape[1]).to(obs.device)
    with torch.no_grad():  # identical head init for the trained and the fresh copy
        g = torch.Generator().manual_seed(head_seed)
        bound = 1 / math.sqrt(dim)
        head.weight.copy_(torch.empty(head.weight.shape).uniform_(-bound, bound, generator=g))
        head.bias.zero_()
    params = _trainable(network) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = ((head(_forward_features(network, obs)) - targets) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((head(_forward_features(network, obs)) - targets) ** 2).mean())


def plasticity_probe(
    network: nn.Module,
    obs: torch.Tensor,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    out_dim: int = 10,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Fit a fresh random-target regression from a copy of ``network`` and from a re-initialized copy.

    Returns ``plasticity_probe/loss``, ``plasticity_probe/fresh_loss`` and ``/ratio`` (see the
    module docstring). ``network`` itself is not touched.
    """
    if steps < 1 or out_dim < 1 or not lr > 0:
        raise ValueError(f"plasticity_probe needs steps >= 1, out_dim >= 1, lr > 0; got {steps}, {out_dim}, {lr}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    targets = torch.randn(obs.shape[0], out_dim, generator=gen).to(obs.device)
    head_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    init_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    trained = copy.deepcopy(network).train()
    fresh = copy.deepcopy(network).train()
    # Re-initialization draws from the global RNG; fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        _reinitialize(fresh)
    with torch.enable_grad():
        loss = _fit_regression(trained, obs, targets, steps=steps, lr=lr, head_seed=head_seed)
        fresh_loss = _fit_regression(fresh, obs, targets, steps=steps, lr=lr, head_seed=head_seed)
    ratio = loss / fresh_loss if fresh_loss > 0 else math.inf
    return {"plasticity_probe/loss": loss, "plasticity_probe/fresh_loss": fresh_loss, "plasticity_probe/ratio": ratio}


# ----------------------------------------------------------------------------------- entry point
def parse_names(names: str | Iterable[str]) -> tuple[str, ...]:
    """``"default"``, ``"all"``, or a comma-separated / iterable selection of :data:`ALL_NAMES`."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    items = [n for n in items if n]
    if not items:
        raise ValueError(f"no diagnostics selected from {names!r}; valid: default, all, {', '.join(ALL_NAMES)}")
    chosen: list[str] = []
    for item in items:
        expanded = DEFAULT_NAMES if item == "default" else ALL_NAMES if item == "all" else (item,)
        for name in expanded:
            if name not in ALL_NAMES:
                raise ValueError(f"unknown diagnostic {name!r}; valid: default, all, {', '.join(ALL_NAMES)}")
            if name not in chosen:
                chosen.append(name)
    return tuple(n for n in ALL_NAMES if n in chosen)


def _check_count(option: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{option} must be an integer >= {low}, got {value!r}")
    return value


class Diagnostics:
    """Selected diagnostics of one network on a probe batch, every ``every`` optimizer steps.

    Args (keyword-only after ``network``):
        names: selection (see :func:`parse_names`); unknown names raise with the valid list.
        every: measure on every ``every``-th :meth:`after_step` call (default 1000).
        probe_obs: default probe observations for the forward-pass diagnostics.
        loss_fn, loss_batch: per-sample loss ``loss_fn(network, loss_batch) -> [B]`` (needed by
            ``hessian_max_eig`` and ``grad_interference``; makes ``grad_norm`` use a fresh gradient).
        policy_fn: ``output -> PolicyView`` for ``churn`` and ``policy_entropy`` (default
            ``q_value_policy(entropy_temperature)``: the network outputs Q-values).
        initial_parameters: ``theta_0`` for ``dist_to_init`` (default: the network now).
        tau, srank_delta, rank_eps, entropy_temperature (of the default policy only),
        churn_tolerance (float actions), hessian_iters, hessian_tol, hessian_samples (rows of the
        loss batch the Hessian uses, default 512), interference_samples, probe_steps, probe_lr:
        the definitions' constants (module docstring).
        generator: randomness for the Hessian start vector and the plasticity probe.

    Attributes: ``nonfinite_inputs`` counts measurements whose probe side or loss side held a NaN/inf
    (see "Bad input" in the module docstring); ``last_timing`` the seconds per diagnostic group of
    the last :meth:`compute`.

    Example::

        diag = Diagnostics(net, names="dormant_ratio,churn", probe_obs=obs, every=1)
        diag.after_step()     # {"dormant_ratio/encoder.fc0": 0.0, ..., "dormant_ratio/total": 0.0}
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        names: str | Iterable[str] = "default",
        every: int = 1000,
        probe_obs: torch.Tensor | None = None,
        loss_fn: LossFn | None = None,
        loss_batch: Any = None,
        policy_fn: PolicyFn | None = None,
        initial_parameters: dict[str, torch.Tensor] | None = None,
        tau: float = 0.025,
        srank_delta: float = 0.01,
        rank_eps: float = 0.01,
        entropy_temperature: float = 1.0,
        churn_tolerance: float = 1e-3,
        hessian_iters: int = 20,
        hessian_tol: float = 1e-4,
        hessian_samples: int = 512,
        interference_samples: int = 32,
        probe_steps: int = 100,
        probe_lr: float = 1e-3,
        generator: torch.Generator | None = None,
    ):
        self.names = parse_names(names)
        self.every = _check_count("every", every, 1)
        if tau < 0 or not 0 <= srank_delta < 1 or rank_eps < 0 or not entropy_temperature > 0:
            raise ValueError(
                f"need tau >= 0, 0 <= srank_delta < 1, rank_eps >= 0, entropy_temperature > 0; got "
                f"{tau}, {srank_delta}, {rank_eps}, {entropy_temperature}"
            )
        if not (math.isfinite(churn_tolerance) and churn_tolerance >= 0):
            raise ValueError(f"churn_tolerance must be a finite number >= 0, got {churn_tolerance!r}")
        if policy_fn is not None and entropy_temperature != 1.0:
            raise ValueError(
                f"entropy_temperature={entropy_temperature} only sets the default q_value_policy; with a policy_fn, "
                "give the temperature to the policy (e.g. policy_fn=q_value_policy(temperature))"
            )
        if policy_fn is not None and not callable(policy_fn):
            raise ValueError(f"policy_fn must be a callable output -> PolicyView, got {policy_fn!r}")
        self.hessian_iters = _check_count("hessian_iters", hessian_iters, 1)
        self.hessian_samples = _check_count("hessian_samples", hessian_samples, 1)
        self.interference_samples = _check_count("interference_samples", interference_samples, 2)
        missing = [n for n in _NEEDS_LOSS if n in self.names and loss_fn is None]
        if missing:
            raise ValueError(f"diagnostics {missing} need loss_fn=(network, batch) -> per-sample losses")
        # A DDP wrapper exposes neither features/head nor hidden_layers(); measure the wrapped module
        # (its replicas are identical, so any rank's measurement stands for all).
        if isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        self.network = network
        self.probe_obs = probe_obs
        self.loss_fn = loss_fn
        self.loss_batch = loss_batch
        self.policy_fn = policy_fn if policy_fn is not None else q_value_policy(entropy_temperature)
        self.tau, self.srank_delta, self.rank_eps = tau, srank_delta, rank_eps
        self.churn_tolerance = churn_tolerance
        self.hessian_tol = hessian_tol
        self.probe_steps, self.probe_lr = probe_steps, probe_lr
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.initial = initial_parameters if initial_parameters is not None else snapshot_parameters(network)
        self.tracker = EffectiveLRTracker(network)
        self.steps = 0
        #: measurements whose probe side or loss side held a NaN/inf (one per side per measurement).
        self.nonfinite_inputs = 0
        self._last_actions: torch.Tensor | None = None
        #: seconds spent in the last :meth:`compute` call, per diagnostic group.
        self.last_timing: dict[str, float] = {}

    @staticmethod
    def valid_names() -> tuple[str, ...]:
        return ALL_NAMES

    def due(self) -> bool:
        """Whether the next :meth:`after_step` call measures."""
        return (self.steps + 1) % self.every == 0

    def before_step(self) -> None:
        """Call just before ``optimizer.step()``: snapshots parameters if ``effective_lr`` is due."""
        if "effective_lr" in self.names and self.due():
            self.tracker.snapshot()

    def after_step(self, *, probe_obs: torch.Tensor | None = None, loss_batch: Any = None) -> dict[str, float]:
        """Call after every optimizer step; returns the diagnostics when due, else ``{}``."""
        due = self.due()
        self.steps += 1
        if not due:
            return {}
        return self.compute(probe_obs=probe_obs, loss_batch=loss_batch)

    def _warn_nonfinite(self, where: str) -> None:
        self.nonfinite_inputs += 1
        # The count in the message makes each occurrence a distinct warning (none is deduplicated away).
        warnings.warn(
            f"plasticity diagnostics after step {self.steps}: NaN/inf in the {where}; its diagnostics are NaN "
            f"(occurrence {self.nonfinite_inputs})",
            RuntimeWarning,
            stacklevel=4,
        )

    def compute(self, *, probe_obs: torch.Tensor | None = None, loss_batch: Any = None) -> dict[str, float]:
        """Measure every selected diagnostic now (``effective_lr`` only after a ``before_step`` snapshot)."""
        obs = probe_obs if probe_obs is not None else self.probe_obs
        batch = loss_batch if loss_batch is not None else self.loss_batch
        wanted = set(self.names)
        probe_wanted = wanted & set(_FORWARD_NAMES + ("plasticity_probe",))
        out: dict[str, float] = {}
        timing: dict[str, float] = {}
        if probe_wanted and obs is None:
            raise ValueError(f"diagnostics {sorted(probe_wanted)} need probe_obs")
        if probe_wanted and (obs.dim() < 1 or obs.shape[0] == 0):
            raise ValueError(f"probe_obs has 0 rows (shape {tuple(obs.shape)}); expected at least one probe state")
        if wanted & set(_NEEDS_LOSS) and batch is None:
            raise ValueError("hessian_max_eig / grad_interference need a loss_batch for loss_fn")
        probe_ok = True
        t0 = time.perf_counter()
        if wanted & set(_FORWARD_NAMES):
            forward, probe_ok = self._forward_diagnostics(obs, wanted)
            out.update(forward)
        elif "plasticity_probe" in wanted and has_nonfinite(obs):
            probe_ok = False
            self._warn_nonfinite("probe batch")
        timing["forward"] = time.perf_counter() - t0
        uses_loss = self.loss_fn is not None and batch is not None and bool(wanted & {"grad_norm", *_NEEDS_LOSS})
        loss_ok = self._check_loss_batch(batch) if uses_loss else True
        t0 = time.perf_counter()
        if "weight_norm" in wanted:
            out.update(weight_norms(self.network))
        if "dist_to_init" in wanted:
            out.update(distances_to_init(self.network, self.initial))
        if "effective_lr" in wanted and self.tracker.armed:
            out.update(self.tracker.measure())
        if "grad_norm" in wanted:
            if not uses_loss:
                out.update(grad_stats(self.network))
            elif loss_ok:
                out.update(self._fresh_grad_stats(batch))
            else:
                out.update(dict.fromkeys(grad_stats(self.network, {}), _NAN))
        timing["parameters"] = time.perf_counter() - t0
        if "hessian_max_eig" in wanted:
            t0 = time.perf_counter()
            rows = _head_rows(batch, self.hessian_samples)
            with torch.enable_grad():  # also when the caller measures under no_grad
                out["hessian_max_eig"] = _NAN if not loss_ok else hessian_max_eig(
                    lambda: self.loss_fn(self.network, rows).mean(), _trainable(self.network),
                    iters=self.hessian_iters, tol=self.hessian_tol, generator=self.generator,
                )
            timing["hessian_max_eig"] = time.perf_counter() - t0
        if "grad_interference" in wanted:
            t0 = time.perf_counter()
            if loss_ok:
                with torch.enable_grad():
                    rows = per_sample_gradients(self.network, self.loss_fn, batch,
                                                max_samples=self.interference_samples)
                out["grad_interference"] = gradient_interference(rows)
            else:
                out["grad_interference"] = _NAN
            timing["grad_interference"] = time.perf_counter() - t0
        if "plasticity_probe" in wanted:
            t0 = time.perf_counter()
            if probe_ok:
                out.update(plasticity_probe(self.network, obs, steps=self.probe_steps, lr=self.probe_lr,
                                            generator=self.generator))
            else:
                out.update(dict.fromkeys(("plasticity_probe/loss", "plasticity_probe/fresh_loss",
                                          "plasticity_probe/ratio"), _NAN))
            timing["plasticity_probe"] = time.perf_counter() - t0
        self.last_timing = timing
        return out

    def _check_loss_batch(self, batch: Any) -> bool:
        """Whether the loss batch and its per-sample losses are finite (else warn); 0 rows raise."""
        _check_rows("loss_batch", batch)
        if has_nonfinite(batch):
            self._warn_nonfinite("loss batch")
            return False
        # One no-grad pass: a finite batch can still give NaN losses (e.g. NaN weights or targets).
        with torch.no_grad():
            losses = self.loss_fn(self.network, batch)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.shape[0] == 0:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"loss_fn must return per-sample losses [B >= 1], got {shape}")
        if not bool(torch.isfinite(losses).all()):
            self._warn_nonfinite("per-sample losses of the loss batch")
            return False
        return True

    def _fresh_grad_stats(self, batch: Any) -> dict[str, float]:
        params = _trainable(self.network)
        with torch.enable_grad():
            gs = torch.autograd.grad(self.loss_fn(self.network, batch).mean(), params, allow_unused=True)
        return grad_stats(self.network, dict(zip(params, gs, strict=True)))

    def _forward_diagnostics(self, obs: torch.Tensor, wanted: set[str]) -> tuple[dict[str, float], bool]:
        """The forward-pass diagnostics and whether everything they read was finite."""
        layers = hidden_layers(self.network)
        with torch.no_grad(), ActivationRecorder(layers) as rec:
            encoder_features = getattr(self.network, "features", None)
            head = getattr(self.network, "head", None)
            if callable(encoder_features) and isinstance(head, nn.Module):
                feats = encoder_features(obs)
                output = head(feats)
            else:
                output = self.network(obs)
                feats = rec.outputs[layers[-1].name] if layers else output
        view = None
        if wanted & {"churn", "policy_entropy"}:
            view = self.policy_fn(output)
            if not isinstance(view, PolicyView):
                raise ValueError(f"policy_fn must return a PolicyView, got {type(view).__name__}")
            view.check(obs.shape[0])
        ok = True
        if has_nonfinite(obs):
            ok = False
            self._warn_nonfinite("probe batch")
        elif has_nonfinite([rec.outputs, feats, output, *((view.actions, view.entropy) if view else ())]):
            ok = False
            self._warn_nonfinite("network's activations/outputs on the probe batch")
        out = self._unit_diagnostics(layers, rec.outputs, wanted, ok)
        feature_names = [n for n in _FEATURE_KEYS if n in wanted]
        if feature_names and not ok:
            out.update({key: _NAN for n in feature_names for key in _FEATURE_KEYS[n]})
        elif feature_names:
            matrix = _as_matrix(feats)
            if "srank" in wanted:
                out["srank"] = float(srank(matrix, delta=self.srank_delta))
            if "effective_rank" in wanted:
                out["effective_rank"] = effective_rank(matrix)
            if "feature_rank" in wanted:
                out["feature_rank"] = float(feature_rank(matrix, eps=self.rank_eps))
            if "feature_norm" in wanted:
                out.update(feature_stats(matrix))
        if "churn" in wanted:
            actions, previous = view.actions.detach(), self._last_actions
            comparable = previous is not None and previous.shape == actions.shape and (
                previous.is_floating_point() == actions.is_floating_point())
            if comparable:
                out["churn"] = churn(previous, actions, tolerance=self.churn_tolerance) if ok else _NAN
            # A NaN measurement is no reference: the next one starts a new window (churn absent).
            self._last_actions = actions.clone() if ok else None
        if "policy_entropy" in wanted and view.entropy is not None:
            out["policy_entropy"] = float(view.entropy.detach().to(torch.float64).mean()) if ok else _NAN
        return out, ok

    def _unit_diagnostics(self, layers: list[HiddenLayer], outputs: dict[str, torch.Tensor],
                          wanted: set[str], ok: bool) -> dict[str, float]:
        """Per-layer and pooled unit diagnostics; all NaN (same keys) when ``ok`` is False."""
        out: dict[str, float] = {}
        thresholds = [(n, t) for n, t in (("dormant_ratio", self.tau), ("dead_ratio", 0.0)) if n in wanted]
        dormant_total = {n: 0 for n, _ in thresholds}
        units_total = 0
        active_sum, active_units = 0.0, 0
        for layer in layers:
            if layer.name not in outputs:  # e.g. a head module replaced at runtime
                continue
            h, units, mult = outputs[layer.name], layer.num_units, layer.multiplier
            if thresholds:
                scores = unit_scores(unit_activity(layer, h)) if ok else None
                for name, tau in thresholds:
                    count = int((scores <= tau).sum()) if ok else 0
                    out[f"{name}/{layer.name}"] = count / units if ok else _NAN
                    dormant_total[name] += count
            units_total += units
            if "active_units" in wanted:
                act = layer.activation
                if isinstance(act, _RELU_FAMILY) or type(act).__name__ == "CReLU":
                    frac = active_fraction(h, num_units=units, multiplier=mult) if ok else None
                    out[f"active_units/{layer.name}"] = float(frac.mean()) if ok else _NAN
                    active_sum += float(frac.sum()) if ok else 0.0
                    active_units += units
                elif isinstance(act, nn.Tanh):
                    out[f"saturated_units/{layer.name}"] = float(
                        saturated_fraction(h, num_units=units, multiplier=mult).mean()) if ok else _NAN
        for name, _ in thresholds:
            if units_total:
                out[f"{name}/total"] = dormant_total[name] / units_total if ok else _NAN
        if active_units:
            out["active_units/total"] = active_sum / active_units if ok else _NAN
        return out
