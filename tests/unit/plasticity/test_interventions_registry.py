"""Registry: names, typed options, describe(), override merging and composition."""

from __future__ import annotations

import pytest
import torch

from plasticity.base import network_overrides
from plasticity.interventions import INTERVENTIONS, build_interventions, describe, format_help
from plasticity.interventions.units import ReDo
from tests.unit.plasticity.nets import MLP, make_ctx, regression_step

EXPECTED = {
    "layer_norm", "weight_decay", "l2", "l2_init", "nap", "hare_tortoise", "plasticity_injection", "infer",
    "weight_clipping", "shrink_perturb", "redo", "reset", "continual_backprop", "crelu", "fourier_features",
    "parseval", "soft_reset", "rational_activation", "elr_increase", "soft_moe",
}


def test_every_intervention_is_registered_under_its_name():
    assert set(INTERVENTIONS) == EXPECTED
    for name, cls in INTERVENTIONS.items():
        assert cls.name == name


def test_build_from_string_and_list_with_options():
    ivs = build_interventions(" layer_norm, weight_decay ,redo", {"redo": {"period": 7, "tau": 0}})
    assert [iv.name for iv in ivs] == ["layer_norm", "weight_decay", "redo"]
    redo = ivs[2]
    assert isinstance(redo, ReDo) and redo.period == 7 and redo.tau == 0.0 and isinstance(redo.tau, float)
    assert [iv.name for iv in build_interventions(["redo"])] == ["redo"]
    assert build_interventions("") == [] and build_interventions("none") == [] and build_interventions([]) == []


def test_every_intervention_builds_with_defaults():
    for name in EXPECTED:
        (iv,) = build_interventions(name)
        assert iv.name == name


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown intervention\(s\) \['redoo'\]; valid names: layer_norm, "):
        build_interventions("layer_norm,redoo")


def test_duplicates_and_stray_options_refused():
    with pytest.raises(ValueError, match="more than once"):
        build_interventions("redo,redo")
    with pytest.raises(ValueError, match=r"options given for \['reset'\], which are not selected"):
        build_interventions("redo", {"reset": {"period": 3}})
    with pytest.raises(ValueError, match="comma-separated string or a list"):
        build_interventions(3)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"redo: unknown option 'periodd'; valid options: period: int = 1000, "
                                         r"tau: float = 0.025, max_probe: int = 2048"):
        build_interventions("redo", {"redo": {"periodd": 3}})
    with pytest.raises(ValueError, match="valid options: none"):
        build_interventions("layer_norm", {"layer_norm": {"eps": 1e-5}})


@pytest.mark.parametrize(
    ("option", "value"),
    [("period", 2.5), ("period", True), ("period", "1000"), ("tau", "0.1"), ("tau", None), ("tau", False)],
)
def test_ill_typed_options_refused(option, value):
    with pytest.raises(ValueError, match=f"redo: option '{option}' must be"):
        build_interventions("redo", {"redo": {option: value}})


def test_literal_and_bool_options():
    (reset,) = build_interventions("reset", {"reset": {"layers": "head", "soft": True}})
    assert reset.layers == "head" and reset.soft is True
    with pytest.raises(ValueError, match="option 'layers' must be 'output' | 'head'"):
        build_interventions("reset", {"reset": {"layers": "everything"}})
    with pytest.raises(ValueError, match="option 'soft' must be bool"):
        build_interventions("reset", {"reset": {"soft": 1}})


def test_value_errors_from_constructors():
    with pytest.raises(ValueError, match=r"redo: option 'period' must be >= 1, got 0"):
        build_interventions("redo", {"redo": {"period": 0}})
    with pytest.raises(ValueError, match="never triggers"):
        build_interventions("reset", {"reset": {"period": 0, "on_task_switch": False}})


def test_describe_and_help():
    info = describe()
    assert set(info) == EXPECTED
    assert info["redo"]["options"]["tau"] == {"type": "float", "default": 0.025}
    assert info["redo"]["summary"].startswith("ReDo")
    assert info["continual_backprop"]["options"]["decay"]["default"] == 0.99
    assert info["infer"]["options"]["num_heads"]["default"] == 10
    assert info["parseval"]["options"]["lam"]["default"] == 1e-3
    assert info["layer_norm"]["options"] == {}
    assert "    period (int) = 1000" in format_help()


def test_override_conflict_refused():
    with pytest.raises(ValueError, match="'crelu' and 'fourier_features' both set network 'activation'"):
        build_interventions("crelu,fourier_features")
    # same value twice is fine: layer_norm and nap both want norm=layer_norm
    ivs = build_interventions("layer_norm,nap,crelu")
    assert network_overrides(ivs) == {"norm": "layer_norm", "activation": "crelu"}


def test_composition_layer_norm_weight_decay_redo():
    ivs = build_interventions("layer_norm,weight_decay,redo", {"redo": {"period": 2, "tau": 0.5},
                                                               "weight_decay": {"weight_decay": 0.1}})
    overrides = network_overrides(ivs)
    assert overrides == {"norm": "layer_norm"}
    net = MLP(norm=overrides["norm"], hidden=(8, 6))
    ctx = make_ctx(net, lr=0.01)
    for iv in ivs:
        iv.setup(ctx)
    obs = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    m1 = regression_step(ctx, obs, ivs, probe_obs=obs)
    assert m1 == {}
    m2 = regression_step(ctx, obs, ivs, probe_obs=obs)
    assert set(m2) == {"redo/units_reset", "redo/dormant_fraction", "redo/skipped_nonfinite"}
    assert m2["redo/skipped_nonfinite"] == 0.0
    assert m2["redo/dormant_fraction"] == m2["redo/units_reset"] / 14
    for value in net.state_dict().values():
        assert torch.isfinite(value).all()


def test_layer_norm_setup_refuses_unnormalized_network():
    (ln,) = build_interventions("layer_norm")
    with pytest.raises(ValueError, match="no normalized hidden layers"):
        ln.setup(make_ctx(MLP()))
    ln.setup(make_ctx(MLP(norm="layer_norm")))
