"""soft_moe: the Soft MoE layer (routing, shapes, training), its network override, and what walks it."""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import pytest
import torch
from torch import nn

from learner.dqn import DQN, DQNConfig
from learner.networks import NetworkConfig, build_network
from plasticity import diagnostics as D
from plasticity.base import network_overrides
from plasticity.interventions import build_interventions, describe, format_help
from plasticity.interventions.architecture import SoftMoEIntervention
from plasticity.interventions.resets import Reset
from plasticity.soft_moe import SoftMoE
from tests.unit.plasticity.nets import MLP, make_ctx, regression_step


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny networks: intra-op threads only add synchronization (see tests/unit/learner/conftest.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Small inputs with more than one token: Nature CNN 44x44 -> a 2x2 map of 64 channels (4 tokens);
# IMPALA 12x12 with channels (4, 6) -> 3x3 of 6 (9 tokens).
OBS = {"nature_cnn": (2, 44, 44), "impala": (2, 12, 12)}
TOKENS = {"nature_cnn": (4, 64), "impala": (9, 6)}
SMALL = dict(cnn_dense_size=16, impala_channels=(4, 6), impala_blocks=1, impala_dense_size=10)
MOE = dict(penultimate="soft_moe", moe_experts=3, moe_slots_per_expert=2, moe_expert_hidden=5)
ACTIONS = 3


def _net(encoder: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = NetworkConfig(encoder=encoder, **{**SMALL, **MOE, **overrides})
    return build_network(config, obs_shape=OBS[encoder], num_actions=ACTIONS, obs_dtype="uint8")


def _obs(encoder: str, batch: int = 6, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, *OBS[encoder]), generator=gen, dtype=torch.uint8)


def _moe(net) -> SoftMoE:
    return net.encoder.moe


def _feature_map(net, obs):
    """The feature map the Soft MoE reads (what the encoder computes before it)."""
    seen = []
    handle = _moe(net).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        net(obs)
    handle.remove()
    return seen[0]


# ------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("encoder", list(OBS))
@pytest.mark.parametrize("head", [(False, "none"), (True, "none"), (True, "qr")], ids=["plain", "dueling", "dueling-qr"])
@pytest.mark.parametrize("activation", ["relu", "crelu"])
def test_output_and_feature_shapes(encoder, head, activation):
    dueling, distributional = head
    net = _net(encoder, dueling=dueling, distributional=distributional, num_quantiles=4, activation=activation,
               norm="layer_norm")
    obs = _obs(encoder)
    tokens, width = TOKENS[encoder]
    width *= 2 if activation == "crelu" else 1  # CReLU doubles the channels each position carries
    assert net(obs).shape == ((6, ACTIONS, 4) if distributional == "qr" else (6, ACTIONS))
    assert net.features(obs).shape == (6, tokens * width) and net.feature_dim == tokens * width
    moe = _moe(net)
    assert len(moe.experts) == 3 and moe.num_slots == 6 and moe.token_dim == width
    assert not hasattr(net.encoder, "dense"), "the dense layer is replaced, not kept beside the experts"


def test_expert_hidden_zero_means_the_width_of_the_replaced_dense_layer():
    nature = _net("nature_cnn", moe_expert_hidden=0)
    assert [layer.num_units for layer in nature.hidden_layers()][-3:] == [16, 16, 16]
    impala = _net("impala", moe_expert_hidden=0)
    assert [layer.num_units for layer in impala.hidden_layers()][-3:] == [10, 10, 10]


def test_full_size_nature_cnn_defaults():
    (iv,) = build_interventions("soft_moe")
    config = dataclasses.replace(NetworkConfig(encoder="nature_cnn"), **iv.network_overrides())
    net = build_network(config, obs_shape=(4, 84, 84), num_actions=18, obs_dtype="uint8")
    moe = _moe(net)
    assert len(moe.experts) == 8 and moe.num_slots == 8 and moe.token_dim == 64
    assert net.feature_dim == 7 * 7 * 64
    assert [layer.num_units for layer in net.hidden_layers()][3:] == [512] * 8
    assert net(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).shape == (2, 18)


# ------------------------------------------------------------------------------------ routing
@pytest.mark.parametrize("encoder", list(OBS))
def test_dispatch_sums_to_one_over_tokens_and_combine_over_slots(encoder):
    net = _net(encoder)
    fmap = _feature_map(net, _obs(encoder))
    with torch.no_grad():
        _moe(net).router.scale.fill_(4.0)  # sharper than at init, so uniform weights would not pass
        dispatch, combine = _moe(net).routing(fmap)
    tokens, _ = TOKENS[encoder]
    assert dispatch.shape == combine.shape == (6, tokens, 6)
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(6, 6))
    torch.testing.assert_close(combine.sum(dim=2), torch.ones(6, tokens))
    assert (dispatch >= 0).all() and (combine >= 0).all()
    assert not torch.allclose(dispatch, torch.full_like(dispatch, 1 / tokens)), "routing depends on the tokens"


def test_forward_is_combine_of_experts_on_dispatched_slots():
    net = _net("impala")
    moe = _moe(net)
    fmap = _feature_map(net, _obs("impala"))
    with torch.no_grad():
        dispatch, combine = moe.routing(fmap)
        x = fmap.flatten(2).transpose(1, 2)  # PerConv tokens [B, H*W, C]
        slots = torch.einsum("bts,btd->bsd", dispatch, x)
        outputs = torch.stack([moe.experts[s // 2](slots[:, s]) for s in range(moe.num_slots)], dim=1)
        expected = torch.einsum("bts,bsd->btd", combine, outputs).flatten(1)
        torch.testing.assert_close(moe(fmap), expected)
        # One token per position, its channels as features: token t is position (t // W, t % W).
        torch.testing.assert_close(moe.tokens(fmap)[:, 4], fmap[:, :, 1, 1])


def test_router_logits_are_l2_normalized_with_a_learnable_scale():
    moe = _moe(_net("impala"))
    fmap = torch.rand(2, 6, 3, 3)
    with torch.no_grad():
        logits = moe.router(moe.tokens(fmap))
        torch.testing.assert_close(moe.router(moe.tokens(5.0 * fmap)), logits)  # token norms do not matter
        assert logits.abs().max() <= 1.0 + 1e-6  # cosines times the initial scale 1
        moe.router.scale.fill_(3.0)
        torch.testing.assert_close(moe.router(moe.tokens(fmap)), 3.0 * logits)
    assert moe.router.scale.requires_grad
    zero = moe.routing(torch.zeros(1, 6, 3, 3))  # all-ReLU-off positions: uniform weights, no NaN
    assert all(torch.isfinite(w).all() for w in zero)


# ----------------------------------------------------------------------------------- training
def test_a_few_adam_steps_reduce_a_fixed_regression_loss():
    net = _net("nature_cnn")
    obs = _obs("nature_cnn", batch=16)
    targets = torch.randn(16, ACTIONS, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = (net(obs) - targets).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    grads = [p.grad for p in _moe(net).parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert _moe(net).router.scale.item() != 1.0, "the router scale trains"


def _dqn(encoder="nature_cnn", seed=0, **options):
    options = {"experts": 2, "slots_per_expert": 2, "expert_hidden": 8, **options}
    return DQN(DQNConfig(target_period=2), NetworkConfig(encoder=encoder, **SMALL, dueling=True),
               obs_shape=OBS[encoder], num_actions=ACTIONS, obs_dtype="uint8", seed=seed,
               interventions=build_interventions("soft_moe", {"soft_moe": options}))


def _batch(encoder, rng, size=8):
    frames = lambda: rng.integers(0, 256, (size, *OBS[encoder]), dtype=np.uint8)  # noqa: E731
    return {"obs": frames(), "action": rng.integers(0, ACTIONS, size),
            "reward": rng.standard_normal(size).astype(np.float32),
            "discount": rng.choice([0.0, 0.99], size).astype(np.float32), "next_obs": frames()}


@pytest.mark.parametrize("encoder", list(OBS))
def test_dqn_updates_with_soft_moe_and_a_resumed_learner_rebuilds_the_same_network(encoder):
    dqn = _dqn(encoder)
    assert dqn.network_config.penultimate == "soft_moe" and dqn.network_config.moe_experts == 2
    assert len(_moe(dqn.online).experts) == 2 and _moe(dqn.online).slots_per_expert == 2
    rng = np.random.default_rng(0)
    batches = [_batch(encoder, rng) for _ in range(4)]
    before = copy.deepcopy(_moe(dqn.online).state_dict())
    for batch in batches[:2]:
        result = dqn.update(batch)
        assert all(np.isfinite(v) for v in result.metrics.values())
    after = _moe(dqn.online).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the Soft MoE's parameters train"
    buffer = io.BytesIO()
    torch.save(dqn.state_dict(), buffer)
    expected = [dqn.update(batch) for batch in batches[2:]]
    resumed = _dqn(encoder, seed=5)  # a different init: everything must come from the checkpoint
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    for want, batch in zip(expected, batches[2:], strict=True):
        got = resumed.update(batch)
        assert got.metrics == want.metrics
        np.testing.assert_array_equal(got.priorities, want.priorities)


# ------------------------------------------------------------------ hidden layers and interventions
def _perturb(layer, unit: int, amount: float = 10.0):
    def hook(_module, _inputs, output):
        output = output.clone()
        output[:, [j * layer.num_units + unit for j in range(layer.multiplier)]] += amount
        return output

    return layer.activation.register_forward_hook(hook)


@pytest.mark.parametrize("encoder", list(OBS))
@pytest.mark.parametrize("activation", ["relu", "crelu"])
def test_expert_hidden_units_are_hidden_layers_whose_reset_is_exact(encoder, activation):
    net = _net(encoder, activation=activation, norm="layer_norm")
    layers = net.hidden_layers()
    experts = [layer for layer in layers if layer.name.startswith("encoder.moe.")]
    assert [layer.name for layer in experts] == [f"encoder.moe.expert{i}.fc0" for i in range(3)]
    moe = _moe(net)
    obs = _obs(encoder)
    for index, layer in enumerate(experts):
        assert layer.producer is moe.experts[index][0] and layer.consumers == [moe.experts[index][-1]]
        assert isinstance(layer.norm, nn.LayerNorm) and layer.multiplier == (2 if activation == "crelu" else 1)
        with torch.no_grad():
            base = net(obs)
            handle = _perturb(layer, layer.num_units - 1)
            assert (net(obs) - base).abs().max() > 1e-3, f"{layer.name}: the unit has no effect"
            for consumer in layer.consumers:
                consumer.weight[:, layer.consumer_columns(consumer, torch.tensor([layer.num_units - 1]))] = 0.0
            zeroed = net(obs)
            handle.remove()
            torch.testing.assert_close(zeroed, net(obs), rtol=0, atol=1e-6)


def test_nature_last_conv_is_read_by_the_router_and_every_expert():
    net = _net("nature_cnn", activation="crelu")
    conv2 = next(layer for layer in net.hidden_layers() if layer.name == "encoder.conv2")
    moe = _moe(net)
    assert conv2.consumers == [moe.router.phi, *(expert[0] for expert in moe.experts)]
    for consumer in conv2.consumers:  # CReLU: channel c of the token is read at c and 64 + c
        assert conv2.consumer_columns(consumer, torch.tensor([3])).tolist() == [3, 67]


def test_redo_continual_backprop_and_diagnostics_run_on_the_moe_network():
    net = _net("nature_cnn")
    obs = _obs("nature_cnn", batch=8)
    ivs = build_interventions("soft_moe,redo,continual_backprop", {
        "soft_moe": {"experts": 3, "slots_per_expert": 2, "expert_hidden": 5},
        "redo": {"period": 1, "tau": 0.9},
        "continual_backprop": {"replacement_rate": 0.5, "maturity": 0},
    })
    ctx = make_ctx(net, seed=1)
    for iv in ivs:
        iv.setup(ctx)
    metrics = regression_step(ctx, obs, ivs, probe_obs=obs)
    assert metrics["redo/units_reset"] > 0 and metrics["redo/skipped_nonfinite"] == 0.0
    assert metrics["continual_backprop/units_replaced"] > 0
    assert all(torch.isfinite(p).all() for p in net.parameters())
    out = D.Diagnostics(net, names="default,plasticity_probe", probe_obs=obs, probe_steps=2).compute()
    for i in range(3):
        assert f"dormant_ratio/encoder.moe.expert{i}.fc0" in out
        assert f"weight_norm/encoder.moe.expert{i}.fc0" in out
    assert "weight_norm/encoder.moe.router.phi" in out and "weight_norm/encoder.moe.router" in out
    assert all(np.isfinite(v) for v in out.values()), {k: v for k, v in out.items() if not np.isfinite(v)}


def test_reset_restores_the_router_scale_to_its_initial_value():
    net = _net("impala")
    ctx = make_ctx(net, seed=2)
    with torch.no_grad():
        _moe(net).router.scale.fill_(7.0)
    assert Reset(layers="encoder").apply(ctx)["reset/layers_reset"] > 0
    assert _moe(net).router.scale.item() == 1.0


# ------------------------------------------------------------------------- options and refusals
def test_registry_builds_it_with_options_and_lists_it():
    (iv,) = build_interventions("soft_moe", {"soft_moe": {"experts": 4, "slots_per_expert": 2, "expert_hidden": 64}})
    assert isinstance(iv, SoftMoEIntervention)
    assert network_overrides([iv]) == {"penultimate": "soft_moe", "moe_experts": 4, "moe_slots_per_expert": 2,
                                       "moe_expert_hidden": 64}
    assert describe()["soft_moe"]["options"] == {
        "experts": {"type": "int", "default": 8},
        "slots_per_expert": {"type": "int", "default": 1},
        "expert_hidden": {"type": "int", "default": 0},
    }
    text = format_help()
    assert "soft_moe: A Soft MoE in place of the penultimate dense layer" in text
    assert "    experts (int) = 8" in text and "    slots_per_expert (int) = 1" in text


@pytest.mark.parametrize(
    "options, message",
    [
        ({"experts": 0}, r"soft_moe: option 'experts' must be >= 1, got 0"),
        ({"slots_per_expert": -1}, r"soft_moe: option 'slots_per_expert' must be >= 1, got -1"),
        ({"expert_hidden": -3}, r"soft_moe: option 'expert_hidden' must be >= 0, got -3"),
        ({"experts": 2.5}, r"soft_moe: option 'experts' must be int, got 2.5"),
        ({"slots_per_expert": True}, r"soft_moe: option 'slots_per_expert' must be int, got True"),
        ({"experts": "8"}, r"soft_moe: option 'experts' must be int, got '8'"),
    ],
)
def test_bad_options_are_refused_naming_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        build_interventions("soft_moe", {"soft_moe": options})


def test_bad_options_are_refused_when_constructed_directly():
    with pytest.raises(ValueError, match=r"soft_moe: option 'experts' must be an int, got 2.5"):
        SoftMoEIntervention(experts=2.5)
    with pytest.raises(ValueError, match=r"soft_moe: option 'slots_per_expert' must be >= 1, got 0"):
        SoftMoEIntervention(slots_per_expert=0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("penultimate", "moe", r"network.penultimate must be one of 'dense', 'soft_moe', got 'moe'"),
        ("moe_experts", 0, r"network.moe_experts must be an integer >= 1, got 0"),
        ("moe_slots_per_expert", 1.5, r"network.moe_slots_per_expert must be an integer >= 1, got 1.5"),
        ("moe_expert_hidden", -1, r"network.moe_expert_hidden must be an integer >= 0, got -1"),
    ],
)
def test_bad_network_config_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(NetworkConfig(encoder="nature_cnn"), **{field: value}).validate()


def test_an_mlp_encoder_is_refused_naming_the_encoder():
    message = r"'soft_moe' .* needs a convolutional encoder, 'nature_cnn' or 'impala'.*got encoder 'mlp'"
    with pytest.raises(ValueError, match=message):
        DQN(DQNConfig(), NetworkConfig(encoder="mlp", hidden_sizes=(8,)), obs_shape=(4,), num_actions=2,
            obs_dtype="float32", interventions=build_interventions("soft_moe"))
    with pytest.raises(ValueError, match=message):
        build_network(NetworkConfig(encoder="mlp", penultimate="soft_moe"), obs_shape=(4,), num_actions=2,
                      obs_dtype="float32")


def test_setup_refuses_a_network_built_without_the_override_or_with_other_sizes():
    with pytest.raises(ValueError, match=r"soft_moe: the network has no Soft MoE layer; build it with network_overrides"):
        SoftMoEIntervention().setup(make_ctx(MLP()))
    with pytest.raises(ValueError, match=r"has \(experts, slots_per_expert\) \(3, 2\); these options ask for \(8, 1\)"):
        SoftMoEIntervention().setup(make_ctx(_net("impala")))
    SoftMoEIntervention(experts=3, slots_per_expert=2).setup(make_ctx(_net("impala")))
