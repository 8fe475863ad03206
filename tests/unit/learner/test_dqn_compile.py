"""``DQNConfig.compile``: the compiled loss-and-gradient path trains exactly what the eager update trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.dqn import DQN, DQNConfig
from learner.networks import NetworkConfig
from plasticity.interventions import build_interventions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dqn(*, compile: bool, network: NetworkConfig, interventions=(), seed: int = 3) -> DQN:
    config = DQNConfig(compile=compile, lr=1e-2, target_update="polyak", tau=0.05, lr_end=1e-3, lr_decay_steps=8)
    return DQN(config, network, obs_shape=(4,), num_actions=3, obs_dtype="float32", seed=seed,
               interventions=interventions)


def _batches(count: int, size: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{
        "obs": rng.standard_normal((size, 4)).astype(np.float32),
        "action": rng.integers(0, 3, size),
        "reward": rng.standard_normal(size).astype(np.float32),
        "discount": rng.choice([0.0, 0.97], size).astype(np.float32),
        "next_obs": rng.standard_normal((size, 4)).astype(np.float32),
    } for _ in range(count)]


@pytest.mark.parametrize("network", [
    NetworkConfig(hidden_sizes=(16, 16), dueling=True, norm="layer_norm"),
    NetworkConfig(hidden_sizes=(16,), distributional="qr", num_quantiles=5),
], ids=["dueling layer-norm", "qr"])
def test_compiled_updates_match_eager_updates(network):
    eager, compiled = _dqn(compile=False, network=network), _dqn(compile=True, network=network)
    weights = np.linspace(0.5, 1.5, 16).astype(np.float32)  # importance weights: the weighted loss is compiled too
    for batch in _batches(6):
        a = eager.update(batch, weights=weights)
        b = compiled.update(batch, weights=weights)
        np.testing.assert_allclose(b.priorities, a.priorities, rtol=1e-4, atol=1e-5)
        for key in ("loss", "td_loss", "td_error", "q", "grad_norm", "lr"):
            assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-4, abs=1e-5), key
    assert compiled._compile_state == "on"  # it really ran compiled, not the eager fallback
    for p, q in zip(eager.online.parameters(), compiled.online.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    for p, q in zip(eager.target.parameters(), compiled.target.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    for p, q in zip(eager.online.parameters(), compiled.online.parameters(), strict=True):
        sa, sb = eager.optimizer.state[p], compiled.optimizer.state[q]
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-3, atol=1e-7)
        assert int(sb["step"]) == int(sa["step"]) == 6


def test_an_intervention_with_a_loss_term_keeps_the_update_eager():
    network = NetworkConfig(hidden_sizes=(8,))
    dqn = _dqn(compile=True, network=network, interventions=build_interventions("l2_init"))
    result = dqn.update(_batches(1)[0])
    assert dqn._compile_state == "off" and dqn._compiled_grad is None
    assert "l2_init/loss" in result.metrics  # the term was trained, by the eager path


def test_a_failing_compiler_falls_back_to_the_eager_update(monkeypatch, caplog):
    def broken_compile(fn, **_):
        def run(*args, **kwargs):
            raise RuntimeError("no C compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    network = NetworkConfig(hidden_sizes=(8,))
    eager, fallback = _dqn(compile=False, network=network), _dqn(compile=True, network=network)
    for batch in _batches(3):
        a, b = eager.update(batch), fallback.update(batch)
        np.testing.assert_array_equal(b.priorities, a.priorities)
    assert fallback._compile_state == "failed"
    assert "torch.compile of the DQN update failed (RuntimeError: no C compiler found); running eager" in caplog.text
    for p, q in zip(eager.online.parameters(), fallback.online.parameters(), strict=True):
        assert torch.equal(p, q)


def test_compile_must_be_a_boolean():
    with pytest.raises(ValueError, match=r"dqn.compile must be true or false, got 'yes'"):
        DQNConfig(compile="yes").validate()


def test_a_restructured_network_is_recompiled_and_still_matches_eager():
    """Plasticity injection swaps the head mid-run: the compiled function must follow the new tree."""
    network = NetworkConfig(hidden_sizes=(8,))
    pair = [_dqn(compile=flag, network=network,
                 interventions=build_interventions("plasticity_injection", {"plasticity_injection": {"step": 2}}))
            for flag in (False, True)]
    first_compiled = None
    for i, batch in enumerate(_batches(4)):
        a, b = (dqn.update(batch) for dqn in pair)
        if i == 0:
            first_compiled = pair[1]._compiled_grad
        np.testing.assert_allclose(b.priorities, a.priorities, rtol=1e-4, atol=1e-5)
    eager, compiled = pair
    assert compiled._compile_state == "on" and compiled._compiled_grad is not first_compiled
    for p, q in zip(eager.online.parameters(), compiled.online.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
