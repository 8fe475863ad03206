"""Plasticity diagnostics: pinned definitions, pure functions, and one scheduled entry point.

Every diagnostic is a plain function of tensors (tested against hand-computed values) and is also
reachable by name through :class:`Diagnostics`, which measures a network (the network contract:
``features``/``head``/``hidden_layers()``; plain ``nn.Sequential`` works too) on a probe batch on a
schedule and returns one flat ``{name: float}`` dict whose keys carry layer names, e.g.
``dormant_ratio/encoder.0``, ``dormant_ratio/total``, ``srank``, ``effective_lr/head.2``.

Example::

    diag = Diagnostics(net, names="default", every=1000, probe_obs=probe_obs, optimizer=opt)
    for step in range(num_steps):
        loss = loss_fn(net, batch).mean()
        opt.zero_grad(); loss.backward()
        diag.before_step()          # snapshots parameters when the next measurement is due
        opt.step()
        metrics = diag.after_step() # {} except every 1000th call
    print(Diagnostics.valid_names())

Pinned definitions (public code disagrees; these are the choices made here):

* ``dormant_ratio`` (tau 0.025) / ``dead_ratio`` (tau 0): unit score ``s_i = E|h_i| / mean_k E|h_k|``
  within a layer, the expectation over probe samples, spatial positions and the activation's
  ``out_multiplier`` copies; a unit is dormant when ``s_i <= tau``. A layer whose every unit has
  ``E|h| = 0`` has all scores 0 (all dormant). Per layer: dormant units / units in the layer.
  **Total: dormant units / all units, pooled over every hidden layer** (a unit-weighted average, not
  the mean of per-layer ratios).
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
* ``weight_norm/<module>``: L2 norm of all parameters owned directly by the module (weight and
  bias together; LayerNorm gain/offset included); ``dist_to_init/<module>``: ``||theta - theta_0||``
  with ``theta_0`` recorded when the :class:`Diagnostics` is built (or passed in). ``/total`` over
  all parameters.
* ``effective_lr/<module>``: ``||theta_after - theta_before|| / ||theta_before||`` across one
  optimizer step (modules with ``||theta_before|| = 0``, or not present at both ends, are left
  out); ``/total`` over the modules measured. :class:`EffectiveLRTracker` holds the snapshot.
* ``grad_l1/<module>``, ``grad_l2/<module>``, ``grad_zero_frac/<module>`` (fraction of gradient
  entries exactly 0): of a fresh gradient of ``loss_fn`` on ``loss_batch`` when a loss is given,
  else of the parameters' current ``.grad`` (the last backward pass); parameters without a
  gradient count as all-zero gradients.
* ``hessian_max_eig``: the eigenvalue of largest magnitude of the Hessian of the mean loss w.r.t.
  all trainable parameters, by power iteration on Hessian-vector products (double backprop), 20
  iterations or until ``|lambda_k - lambda_{k-1}| <= 1e-4 |lambda_k|``; start vector from the
  generator.
* ``plasticity_probe``: a deep copy of the network is given a fresh linear regression head on its
  features (``out_dim`` outputs), and all its parameters are trained full-batch with Adam for
  ``steps`` steps on MSE to targets ``~ N(0, 1)`` on the probe inputs; the final MSE is
  ``plasticity_probe/loss``. The same from a copy whose modules were re-initialized
  (``reset_parameters``) with identical head init and targets is ``plasticity_probe/fresh_loss``;
  ``plasticity_probe/ratio = loss / fresh_loss`` (> 1: less plastic than a fresh network).
* ``churn``: fraction of probe states whose greedy action (argmax of Q; QR heads averaged over
  quantiles first) differs between this measurement and the previous one (the update window is
  the schedule's period); absent on the first measurement.
* ``policy_entropy``: mean over states of the entropy (nats) of ``softmax(Q / temperature)``.
* ``grad_interference``: mean over pairs ``i < j`` of the cosine similarity between the per-sample
  gradients (all trainable parameters, flattened) of the first ``interference_samples`` samples of
  ``loss_fn``; a pair with a zero gradient counts 0.

``loss_fn(network, loss_batch) -> Tensor[B]`` returns **per-sample** losses (the mean is the loss).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from plasticity.layers import ActivationRecorder, HiddenLayer, hidden_layers

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
_RELU_FAMILY = (nn.ReLU, nn.ReLU6)


# ----------------------------------------------------------------------------------------- units
def unit_scores(output: torch.Tensor, *, num_units: int, multiplier: int = 1) -> torch.Tensor:
    """ReDo score per unit: ``E|h_i| / mean_k E|h_k|`` of an activation output ``[B, m*units, ...]``.

    The expectation runs over samples, spatial positions and the ``multiplier`` copies (CReLU and
    Fourier features emit two values per unit, unit-major within each copy). All-zero layer: 0s.
    """
    if output.dim() < 2 or output.shape[1] != multiplier * num_units:
        raise ValueError(
            f"activation output of shape {tuple(output.shape)} does not have multiplier {multiplier} x "
            f"{num_units} units on dim 1"
        )
    mean_abs = output.detach().to(torch.float64).abs().reshape(output.shape[0], multiplier, num_units, -1).mean(dim=(0, 1, 3))
    layer_mean = mean_abs.mean()
    if layer_mean == 0:
        return torch.zeros_like(mean_abs)
    return mean_abs / layer_mean


def dormant_counts(output: torch.Tensor, *, num_units: int, multiplier: int = 1, tau: float = 0.025) -> int:
    """Number of units with ReDo score ``<= tau`` (tau 0: dead units)."""
    if tau < 0 or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    return int((unit_scores(output, num_units=num_units, multiplier=multiplier) <= tau).sum())


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
    """``{module name: parameters it owns directly}`` for every module owning any (root: ``"root"``)."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, module in network.named_modules():
        params = list(module.parameters(recurse=False))
        if params:
            groups[name or "root"] = params
    return groups


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def weight_norms(network: nn.Module) -> dict[str, float]:
    """``weight_norm/<module>`` (all its own parameters together) and ``weight_norm/total``."""
    out = {f"weight_norm/{name}": float(_flat(ps).norm()) for name, ps in parameter_groups(network).items()}
    out["weight_norm/total"] = float(_flat(network.parameters()).norm())
    return out


def snapshot_parameters(network: nn.Module) -> dict[str, torch.Tensor]:
    """Detached float64 copies of every module's own parameters, flattened, keyed like :func:`parameter_groups`."""
    return {name: _flat(ps).clone() for name, ps in parameter_groups(network).items()}


def distances_to_init(network: nn.Module, initial: dict[str, torch.Tensor]) -> dict[str, float]:
    """``dist_to_init/<module>`` = ``||theta - theta_0||`` and ``dist_to_init/total``.

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
        tracker.snapshot(); opt.step(); print(tracker.measure())   # {'effective_lr/0': ..., ...}
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
def _action_values(q: torch.Tensor) -> torch.Tensor:
    """``[B, A]`` from ``[B, A]`` or a QR head's ``[B, A, N]`` (mean over quantiles)."""
    if q.dim() == 3:
        return q.mean(dim=2)
    if q.dim() != 2:
        raise ValueError(f"expected Q-values [B, A] or [B, A, quantiles], got shape {tuple(q.shape)}")
    return q


def greedy_actions(q: torch.Tensor) -> torch.Tensor:
    return _action_values(q.detach()).argmax(dim=1)


def churn(actions_before: torch.Tensor, actions_after: torch.Tensor) -> float:
    """Fraction of states whose greedy action differs between two snapshots (``[B]`` action indices)."""
    if actions_before.shape != actions_after.shape or actions_before.dim() != 1:
        raise ValueError(
            f"churn needs two [B] action tensors of equal shape, got {tuple(actions_before.shape)} "
            f"and {tuple(actions_after.shape)}"
        )
    return float((actions_before != actions_after).float().mean())


def policy_entropy(logits: torch.Tensor, *, temperature: float = 1.0) -> float:
    """Mean entropy (nats) of ``softmax(logits / temperature)`` over the batch (QR: quantile mean)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logp = torch.log_softmax(_action_values(logits.detach()).to(torch.float64) / temperature, dim=1)
    return float(-(logp.exp() * logp).sum(dim=1).mean())


# ----------------------------------------------------------------------------------- loss-based
def _trainable(network: nn.Module) -> list[nn.Parameter]:
    return [p for p in network.parameters() if p.requires_grad]


def hessian_max_eig(
    loss_closure: Callable[[], torch.Tensor],
    params: list[torch.Tensor],
    *,
    iters: int = 20,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> float:
    """Largest-magnitude Hessian eigenvalue of ``loss_closure()`` w.r.t. ``params`` by power iteration.

    Each iteration is one Hessian-vector product (double backprop); stops after ``iters`` or when
    ``|lambda_k - lambda_{k-1}| <= tol * |lambda_k|``. The eigenvalue estimate is ``v . H v`` with
    ``||v|| = 1``.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters!r}")
    if not params:
        raise ValueError("hessian_max_eig needs at least one parameter")
    loss = loss_closure()
    if loss.dim() != 0:
        raise ValueError(f"loss_closure must return a scalar, got shape {tuple(loss.shape)}")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # Gradients that do not depend on the parameters (or are absent) contribute zero curvature.
    live = [(g, p) for g, p in zip(grads, params, strict=True) if g is not None and g.requires_grad]
    if not live:
        return 0.0
    grads, params = [g for g, _ in live], [p for _, p in live]
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    eig = None
    for _ in range(iters):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True, allow_unused=True)
        hv = [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params, strict=True)]
        new_eig = float(sum((a * b).sum() for a, b in zip(hv, v, strict=True)))
        norm = torch.sqrt(sum((x * x).sum() for x in hv))
        if norm == 0:
            return 0.0
        v = [x.detach() / norm for x in hv]
        if eig is not None and abs(new_eig - eig) <= tol * abs(new_eig):
            return new_eig
        eig = new_eig
    return float(eig)


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
    """Mean pairwise cosine similarity over pairs ``i < j`` of rows of ``[S, P]``; zero rows count 0."""
    if per_sample.dim() != 2 or per_sample.shape[0] < 2:
        raise ValueError(f"need [S >= 2, P] per-sample gradients, got shape {tuple(per_sample.shape)}")
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


class Diagnostics:
    """Selected diagnostics of one network on a probe batch, every ``every`` optimizer steps.

    Args (keyword-only after ``network``):
        names: selection (see :func:`parse_names`); unknown names raise with the valid list.
        every: measure on every ``every``-th :meth:`after_step` call (default 1000).
        probe_obs: default probe observations for the forward-pass diagnostics.
        loss_fn, loss_batch: per-sample loss ``loss_fn(network, loss_batch) -> [B]`` (needed by
            ``hessian_max_eig`` and ``grad_interference``; makes ``grad_norm`` use a fresh gradient).
        initial_parameters: ``theta_0`` for ``dist_to_init`` (default: the network now).
        tau, srank_delta, rank_eps, entropy_temperature, hessian_iters, hessian_tol,
        hessian_samples, interference_samples, probe_steps, probe_lr: the definitions' constants.
        generator: randomness for the Hessian start vector and the plasticity probe.

    Layer names: hidden layers use ``HiddenLayer.name``; parameter diagnostics use module names
    from ``named_modules()``.
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
        initial_parameters: dict[str, torch.Tensor] | None = None,
        tau: float = 0.025,
        srank_delta: float = 0.01,
        rank_eps: float = 0.01,
        entropy_temperature: float = 1.0,
        hessian_iters: int = 20,
        hessian_tol: float = 1e-4,
        interference_samples: int = 32,
        probe_steps: int = 100,
        probe_lr: float = 1e-3,
        generator: torch.Generator | None = None,
    ):
        self.names = parse_names(names)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if tau < 0 or not 0 <= srank_delta < 1 or rank_eps < 0 or not entropy_temperature > 0:
            raise ValueError(
                f"need tau >= 0, 0 <= srank_delta < 1, rank_eps >= 0, entropy_temperature > 0; got "
                f"{tau}, {srank_delta}, {rank_eps}, {entropy_temperature}"
            )
        if interference_samples < 2:
            raise ValueError(f"interference_samples must be >= 2, got {interference_samples!r}")
        missing = [n for n in _NEEDS_LOSS if n in self.names and loss_fn is None]
        if missing:
            raise ValueError(f"diagnostics {missing} need loss_fn=(network, batch) -> per-sample losses")
        # A DDP wrapper exposes neither features/head nor hidden_layers(); measure the wrapped module
        # (its replicas are identical, so any rank's measurement stands for all).
        if isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        self.network = network
        self.every = every
        self.probe_obs = probe_obs
        self.loss_fn = loss_fn
        self.loss_batch = loss_batch
        self.tau, self.srank_delta, self.rank_eps = tau, srank_delta, rank_eps
        self.entropy_temperature = entropy_temperature
        self.hessian_iters, self.hessian_tol = hessian_iters, hessian_tol
        self.interference_samples = interference_samples
        self.probe_steps, self.probe_lr = probe_steps, probe_lr
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.initial = initial_parameters if initial_parameters is not None else snapshot_parameters(network)
        self.tracker = EffectiveLRTracker(network)
        self.steps = 0
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

    def compute(self, *, probe_obs: torch.Tensor | None = None, loss_batch: Any = None) -> dict[str, float]:
        """Measure every selected diagnostic now (``effective_lr`` only after a ``before_step`` snapshot)."""
        obs = probe_obs if probe_obs is not None else self.probe_obs
        batch = loss_batch if loss_batch is not None else self.loss_batch
        wanted = set(self.names)
        out: dict[str, float] = {}
        timing: dict[str, float] = {}
        if (wanted & set(_FORWARD_NAMES) or "plasticity_probe" in wanted) and obs is None:
            raise ValueError(
                f"diagnostics {sorted(wanted & set(_FORWARD_NAMES + ('plasticity_probe',)))} need probe_obs"
            )
        if wanted & {"hessian_max_eig", "grad_interference"} and batch is None:
            raise ValueError("hessian_max_eig / grad_interference need a loss_batch for loss_fn")
        t0 = time.perf_counter()
        if wanted & set(_FORWARD_NAMES):
            out.update(self._forward_diagnostics(obs, wanted))
        timing["forward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if "weight_norm" in wanted:
            out.update(weight_norms(self.network))
        if "dist_to_init" in wanted:
            out.update(distances_to_init(self.network, self.initial))
        if "effective_lr" in wanted and self.tracker.armed:
            out.update(self.tracker.measure())
        if "grad_norm" in wanted:
            out.update(self._grad_norm(batch))
        timing["parameters"] = time.perf_counter() - t0
        if "hessian_max_eig" in wanted:
            t0 = time.perf_counter()
            params = _trainable(self.network)
            out["hessian_max_eig"] = hessian_max_eig(
                lambda: self.loss_fn(self.network, batch).mean(), params,
                iters=self.hessian_iters, tol=self.hessian_tol, generator=self.generator,
            )
            timing["hessian_max_eig"] = time.perf_counter() - t0
        if "grad_interference" in wanted:
            t0 = time.perf_counter()
            rows = per_sample_gradients(self.network, self.loss_fn, batch, max_samples=self.interference_samples)
            out["grad_interference"] = gradient_interference(rows)
            timing["grad_interference"] = time.perf_counter() - t0
        if "plasticity_probe" in wanted:
            t0 = time.perf_counter()
            out.update(plasticity_probe(self.network, obs, steps=self.probe_steps, lr=self.probe_lr,
                                        generator=self.generator))
            timing["plasticity_probe"] = time.perf_counter() - t0
        self.last_timing = timing
        return out

    def _grad_norm(self, batch: Any) -> dict[str, float]:
        if self.loss_fn is None or batch is None:
            return grad_stats(self.network)
        params = _trainable(self.network)
        with torch.enable_grad():
            gs = torch.autograd.grad(self.loss_fn(self.network, batch).mean(), params, allow_unused=True)
        return grad_stats(self.network, dict(zip(params, gs, strict=True)))

    def _forward_diagnostics(self, obs: torch.Tensor, wanted: set[str]) -> dict[str, float]:
        layers = hidden_layers(self.network)
        with torch.no_grad(), ActivationRecorder(layers) as rec:
            encoder_features = getattr(self.network, "features", None)
            head = getattr(self.network, "head", None)
            if callable(encoder_features) and isinstance(head, nn.Module):
                feats = encoder_features(obs)
                q = head(feats)
            else:
                q = self.network(obs)
                feats = rec.outputs[layers[-1].name] if layers else q
        out: dict[str, float] = {}
        out.update(self._unit_diagnostics(layers, rec.outputs, wanted))
        if wanted & {"srank", "effective_rank", "feature_rank", "feature_norm"}:
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
            actions = greedy_actions(q)
            if self._last_actions is not None and self._last_actions.shape == actions.shape:
                out["churn"] = churn(self._last_actions, actions)
            self._last_actions = actions
        if "policy_entropy" in wanted:
            out["policy_entropy"] = policy_entropy(q, temperature=self.entropy_temperature)
        return out

    def _unit_diagnostics(self, layers: list[HiddenLayer], outputs: dict[str, torch.Tensor],
                          wanted: set[str]) -> dict[str, float]:
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
                scores = unit_scores(h, num_units=units, multiplier=mult)
                for name, tau in thresholds:
                    count = int((scores <= tau).sum())
                    out[f"{name}/{layer.name}"] = count / units
                    dormant_total[name] += count
            units_total += units
            if "active_units" in wanted:
                act = layer.activation
                if isinstance(act, _RELU_FAMILY) or type(act).__name__ == "CReLU":
                    frac = active_fraction(h, num_units=units, multiplier=mult)
                    out[f"active_units/{layer.name}"] = float(frac.mean())
                    active_sum += float(frac.sum())
                    active_units += units
                elif isinstance(act, nn.Tanh):
                    out[f"saturated_units/{layer.name}"] = float(
                        saturated_fraction(h, num_units=units, multiplier=mult).mean()
                    )
        for name, _ in thresholds:
            if units_total:
                out[f"{name}/total"] = dormant_total[name] / units_total
        if active_units:
            out["active_units/total"] = active_sum / active_units
        return out
