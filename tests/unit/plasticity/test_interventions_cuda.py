"""On a CUDA device with a CUDA generator (what learner.dqn passes): same seed -> same parameters."""

from __future__ import annotations

import copy

import pytest
import torch

from plasticity.interventions import build_interventions
from tests.unit.plasticity.nets import MLP, make_ctx, regression_step

pytestmark = pytest.mark.gpu

SPEC = "redo,reset,shrink_perturb,continual_backprop,soft_reset,plasticity_injection"
OPTIONS = {
    "redo": {"period": 2, "tau": 0.9},
    "reset": {"period": 3},
    "shrink_perturb": {"period": 2},
    "continual_backprop": {"replacement_rate": 0.3, "maturity": 1},
    "soft_reset": {"warmup": 1, "kappa_min": 0.01},
    "plasticity_injection": {"step": 2},
}


def _run(seed):
    net = MLP(hidden=(8, 6)).cuda()
    ctx = make_ctx(net, target=copy.deepcopy(net))
    ctx.generator = torch.Generator(device="cuda").manual_seed(seed)
    ivs = build_interventions(SPEC, OPTIONS)
    for iv in ivs:
        iv.setup(ctx)
    obs = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)).cuda()
    for _ in range(6):
        regression_step(ctx, obs, ivs, probe_obs=obs)
    return {k: v.cpu() for k, v in net.state_dict().items()}


def test_cuda_generator_determinism():
    a, b = _run(3), _run(3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())
