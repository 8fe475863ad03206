"""learner.networks: shapes, the hidden-layer map (consumers and column layout), features, norms, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from learner.networks import ChannelLayerNorm, NetworkConfig, QHead, QNetwork, build_network
from plasticity.activations import ACTIVATION_NAMES, CReLU
from plasticity.layers import hidden_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Small but structurally complete variants of every encoder; CNN inputs are as small as each allows.
OBS = {"mlp": ((5,), "float32"), "nature_cnn": ((2, 36, 36), "uint8"), "impala": ((2, 12, 12), "uint8")}
SMALL = dict(hidden_sizes=(8, 6), cnn_dense_size=16, impala_channels=(4, 6), impala_blocks=2, impala_dense_size=10)
ACTIONS = 3


def _config(encoder: str, **overrides) -> NetworkConfig:
    return NetworkConfig(encoder=encoder, **{**SMALL, **overrides})


def _build(config: NetworkConfig, seed: int = 0) -> QNetwork:
    torch.manual_seed(seed)
    shape, dtype = OBS[config.encoder]
    return build_network(config, obs_shape=shape, num_actions=ACTIONS, obs_dtype=dtype)


def _obs(encoder: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    shape, dtype = OBS[encoder]
    gen = torch.Generator().manual_seed(seed)
    if dtype == "uint8":
        return torch.randint(0, 256, (batch, *shape), generator=gen, dtype=torch.uint8)
    return torch.randn(batch, *shape, generator=gen)


def _factory():
    return nn.Softplus()


# (dueling, distributional, head_hidden_size): every head kind, with and without a hidden head layer.
HEADS = [(False, "none", 0), (False, "qr", 5), (True, "none", 5), (True, "qr", 0)]


@pytest.mark.parametrize("encoder", list(OBS))
@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"{'dueling' if h[0] else 'plain'}-{h[1]}-h{h[2]}")
@pytest.mark.parametrize("norm", ["none", "layer_norm"])
@pytest.mark.parametrize("activation", [*ACTIVATION_NAMES, _factory])
def test_output_shapes_every_encoder_head_norm_activation(encoder, head, norm, activation):
    dueling, distributional, head_hidden_size = head
    net = _build(_config(encoder, dueling=dueling, distributional=distributional, num_quantiles=7, norm=norm,
                         head_hidden_size=head_hidden_size, activation=activation))
    obs = _obs(encoder)
    assert net(obs).shape == ((4, ACTIONS, 7) if distributional == "qr" else (4, ACTIONS))
    multiplier = 2 if activation in ("crelu", "fourier") else 1
    feature_dim = {"mlp": 6, "nature_cnn": 16, "impala": 10}[encoder] * multiplier
    assert net.features(obs).shape == (4, feature_dim)
    assert net.feature_dim == feature_dim
    layers = net.hidden_layers()
    assert all(layer.multiplier == multiplier for layer in layers)
    acts = [layer.activation for layer in layers]
    assert len({id(a) for a in acts}) == len(acts), "activation modules must be distinct instances"
    assert all(isinstance(layer.norm, nn.LayerNorm) == (norm == "layer_norm") for layer in layers)


def _perturb_unit(layer, unit: int, amount: float = 10.0):
    """Forward hook adding ``amount`` to every value that belongs to ``unit`` (all multiplier blocks)."""
    channels = [j * layer.num_units + unit for j in range(layer.multiplier)]

    def hook(_module, _inputs, output):
        output = output.clone()
        output[:, channels] += amount
        return output

    return layer.activation.register_forward_hook(hook)


EXPECTED_LAYERS = {
    # name: number of consumers (dueling with a linear head: the features feed value and advantage)
    "mlp": ["encoder.fc0", "encoder.fc1"],
    "nature_cnn": ["encoder.conv0", "encoder.conv1", "encoder.conv2", "encoder.dense0"],
    "impala": [f"encoder.stack{s}.block{b}" for s in range(2) for b in range(2)] + ["encoder.dense0"],
}


@pytest.mark.parametrize("encoder", list(OBS))
@pytest.mark.parametrize("activation", ["relu", "crelu", "fourier"])
@pytest.mark.parametrize("dueling", [False, True])
@pytest.mark.parametrize("head_hidden_size", [0, 5])
def test_hidden_layers_consumers_and_columns(encoder, activation, dueling, head_hidden_size):
    """Zeroing a unit's outgoing columns in every listed consumer removes the unit's influence."""
    net = _build(_config(encoder, activation=activation, dueling=dueling, norm="layer_norm",
                         head_hidden_size=head_hidden_size))
    layers = net.hidden_layers()
    streams = ["value", "advantage"] if dueling else ["q"]
    expected = EXPECTED_LAYERS[encoder] + ([f"head.{s}.hidden0" for s in streams] if head_hidden_size else [])
    assert [layer.name for layer in layers] == expected
    feature_layer = layers[len(EXPECTED_LAYERS[encoder]) - 1]
    assert len(feature_layer.consumers) == (2 if dueling else 1)
    obs = _obs(encoder)
    for layer in layers:
        assert isinstance(layer.norm, ChannelLayerNorm if isinstance(layer.producer, nn.Conv2d) else nn.LayerNorm)
        assert layer.norm.normalized_shape == (layer.num_units,)
        unit = layer.num_units - 1
        with torch.no_grad():
            base = net(obs)
            handle = _perturb_unit(layer, unit)
            changed = net(obs)
            assert (changed - base).abs().max() > 1e-3, f"{layer.name}: perturbing unit {unit} had no effect"
            saved = [c.weight.detach().clone() for c in layer.consumers]
            for consumer in layer.consumers:
                consumer.weight[:, layer.consumer_columns(consumer, torch.tensor([unit]))] = 0.0
            zeroed = net(obs)
            handle.remove()
            unperturbed_zeroed = net(obs)
            torch.testing.assert_close(zeroed, unperturbed_zeroed, rtol=0, atol=1e-6, msg=lambda m, n=layer.name: f"{n}: {m}")
            for consumer, weight in zip(layer.consumers, saved, strict=True):
                consumer.weight.copy_(weight)


@pytest.mark.parametrize("encoder", list(OBS))
@pytest.mark.parametrize("dueling", [False, True])
def test_features_are_the_head_input_and_forward_is_head_of_encoder(encoder, dueling):
    net = _build(_config(encoder, dueling=dueling, head_hidden_size=5))
    seen = []
    net.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    obs = _obs(encoder)
    out = net(obs)
    assert torch.equal(seen[0], net.features(obs))
    assert torch.equal(out, net.head(net.encoder(obs)))


def test_dueling_combines_value_and_mean_centred_advantage():
    net = _build(_config("mlp", dueling=True))
    obs = _obs("mlp")
    features = net.features(obs)
    value, advantage = net.head.value(features), net.head.advantage(features)
    torch.testing.assert_close(net(obs), value + advantage - advantage.mean(dim=1, keepdim=True))
    qr = _build(_config("mlp", dueling=True, distributional="qr", num_quantiles=4))
    features = qr.features(obs)
    value = qr.head.value(features).view(4, 1, 4)
    advantage = qr.head.advantage(features).view(4, ACTIONS, 4)
    torch.testing.assert_close(qr(obs), value + advantage - advantage.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("dueling", [False, True])
@pytest.mark.parametrize("distributional", ["none", "qr"])
def test_output_layers(dueling, distributional):
    net = _build(_config("mlp", dueling=dueling, distributional=distributional, num_quantiles=4, head_hidden_size=5))
    outs = net.output_layers()
    n = 4 if distributional == "qr" else 1
    if dueling:
        assert outs == [net.head.value.out, net.head.advantage.out]
        assert [o.out_features for o in outs] == [n, ACTIONS * n]
    else:
        assert outs == [net.head.q.out]
        assert outs[0].out_features == ACTIONS * n
    assert all(isinstance(o, nn.Linear) and o.in_features == 5 for o in outs)


def test_uint8_frames_are_scaled_by_255_inside_the_encoder():
    u8 = _build(NetworkConfig(encoder="nature_cnn", cnn_dense_size=16))
    torch.manual_seed(0)
    f32 = build_network(NetworkConfig(encoder="nature_cnn", cnn_dense_size=16), obs_shape=(2, 36, 36), num_actions=ACTIONS,
                        obs_dtype="float32")
    f32.load_state_dict(u8.state_dict())
    frames = _obs("nature_cnn")
    torch.testing.assert_close(u8(frames), f32(frames.to(torch.float32) / 255.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"dtype torch.float32; this network expects uint8"):
        u8(frames.float())
    with pytest.raises(ValueError, match=r"dtype torch.uint8; this network expects float32"):
        f32(frames)


def test_full_size_atari_shapes():
    nature = build_network(NetworkConfig(encoder="nature_cnn"), obs_shape=(4, 84, 84), num_actions=18, obs_dtype="uint8")
    assert nature.hidden_layers()[-1].producer.in_features == 64 * 7 * 7
    assert nature(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).shape == (2, 18)
    impala = build_network(NetworkConfig(encoder="impala"), obs_shape=(4, 84, 84), num_actions=18, obs_dtype="uint8")
    # 84 -> 42 -> 21 -> 11 after three 3x3/2 max-pools with padding 1
    assert impala.hidden_layers()[-1].producer.in_features == 32 * 11 * 11
    assert impala(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).shape == (2, 18)


def test_channel_layer_norm_normalizes_each_position_over_channels():
    norm = ChannelLayerNorm(5)
    x = torch.randn(2, 5, 3, 4) * 3 + 2
    y = norm(x)
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(2, 3, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.var(dim=1, unbiased=False), torch.ones(2, 3, 4), rtol=0, atol=1e-3)
    assert norm.weight.shape == (5,)


def test_no_norm_means_no_layer_norm_modules():
    for encoder in OBS:
        net = _build(_config(encoder, dueling=True, head_hidden_size=5))
        assert not any(isinstance(m, nn.LayerNorm) for m in net.modules())
        assert all(layer.norm is None for layer in net.hidden_layers())


def test_linear_mlp_has_no_hidden_layers():
    net = _build(_config("mlp", hidden_sizes=()))
    assert net.hidden_layers() == []
    assert net.feature_dim == 5
    obs = _obs("mlp")
    torch.testing.assert_close(net(obs), obs @ net.head.q.out.weight.T + net.head.q.out.bias)


def test_plasticity_hidden_layers_uses_the_network_method():
    net = _build(_config("mlp"))
    assert [layer.name for layer in hidden_layers(net)] == ["encoder.fc0", "encoder.fc1"]


def test_replaced_heads_are_described():
    net = _build(_config("mlp"))
    seq = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, ACTIONS))
    net.head = seq
    layers = net.hidden_layers()
    assert layers[1].consumers == [seq[0]]
    assert layers[2].producer is seq[0] and layers[2].consumers == [seq[2]]
    assert net.output_layers() == [seq[2]]

    class Injected(nn.Module):  # the shape of plasticity injection: h + h1 - h2
        def __init__(self, heads):
            super().__init__()
            self.heads = nn.ModuleList(heads)

        def forward(self, x):
            return self.heads[0](x) + self.heads[1](x) - self.heads[2](x)

    heads = [QHead(in_dim=6, num_actions=ACTIONS, num_quantiles=None, dueling=True, hidden_size=0,
                   parts=_parts_for(_config("mlp"))) for _ in range(3)]
    net.head = Injected(heads)
    assert net(_obs("mlp")).shape == (4, ACTIONS)
    assert net.hidden_layers()[1].consumers == [layer for h in heads for layer in h.input_layers()]
    assert net.output_layers() == [layer for h in heads for layer in h.output_layers()]


def _parts_for(config):
    from learner.networks import _Parts

    return _Parts(config)


def test_lists_from_json_become_tuples():
    cfg = NetworkConfig(hidden_sizes=[4, 4], impala_channels=[8])
    assert cfg.hidden_sizes == (4, 4) and cfg.impala_channels == (8,)


class _Shared:
    module = nn.ReLU()

    def __call__(self):
        return self.module


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("encoder", "resnet", r"network.encoder must be one of 'mlp', 'nature_cnn', 'impala', got 'resnet'"),
        ("distributional", "c51", r"network.distributional must be one of 'none', 'qr', got 'c51'"),
        ("norm", "batch_norm", r"network.norm must be one of 'none', 'layer_norm', got 'batch_norm'"),
        ("activation", "swish", r"network.activation must be one of .*'rational', got 'swish'"),
        ("activation", 3, r"network.activation must be a name .* got 3"),
        ("activation", lambda: 1, r"must return an nn.Module, returned 1"),
        ("hidden_sizes", (4, 0), r"network.hidden_sizes must be a tuple of integers >= 1, got \(4, 0\)"),
        ("impala_channels", (), r"network.impala_channels must be a non-empty tuple"),
        ("cnn_dense_size", 0, r"network.cnn_dense_size must be an integer >= 1, got 0"),
        ("num_quantiles", 0, r"network.num_quantiles must be an integer >= 1, got 0"),
        ("impala_blocks", True, r"network.impala_blocks must be an integer >= 1, got True"),
        ("head_hidden_size", -1, r"network.head_hidden_size must be an integer >= 0, got -1"),
        ("dueling", "yes", r"network.dueling must be true or false, got 'yes'"),
    ],
)
def test_bad_config_values_are_refused(field, value, message):
    cfg = dataclasses.replace(NetworkConfig(), **{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()
    with pytest.raises(ValueError, match=message):
        build_network(cfg, obs_shape=(4,), num_actions=2, obs_dtype="float32")


def test_activation_factory_must_return_new_instances():
    cfg = NetworkConfig(activation=_Shared(), hidden_sizes=(4, 4))
    cfg.validate()  # one instance is fine
    with pytest.raises(ValueError, match=r"returned the same module twice"):
        build_network(cfg, obs_shape=(4,), num_actions=2, obs_dtype="float32")


def test_activation_out_multiplier_is_checked():
    class Bad(CReLU):
        out_multiplier = 0

    with pytest.raises(ValueError, match=r"Bad.out_multiplier must be an integer >= 1, got 0"):
        NetworkConfig(activation=Bad).validate()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(encoder="nature_cnn", obs_shape=(84, 84)), r"encoder 'nature_cnn' needs image observations \(C, H, W\)"),
        (dict(encoder="nature_cnn", obs_shape=(4, 30, 84)), r"obs_shape \(4, 30, 84\) is too small for the Nature CNN"),
        (dict(obs_shape=(4, 0)), r"obs_shape must be a non-empty tuple of positive integers, got \(4, 0\)"),
        (dict(num_actions=0), r"num_actions must be an integer >= 1, got 0"),
        (dict(obs_dtype="int32"), r"obs_dtype must be one of uint8, float16, float32, float64, got 'int32'"),
    ],
)
def test_bad_build_arguments_are_refused(kwargs, message):
    encoder = kwargs.pop("encoder", "mlp")
    args = dict(obs_shape=(4,), num_actions=2, obs_dtype="float32") | kwargs
    with pytest.raises(ValueError, match=message):
        build_network(NetworkConfig(encoder=encoder), **args)


@pytest.mark.parametrize("encoder", list(OBS))
def test_state_dict_holds_each_tensor_once(encoder):
    net = _build(_config(encoder, dueling=True, head_hidden_size=5, norm="layer_norm"))
    pointers = [t.data_ptr() for t in net.state_dict().values()]
    assert len(pointers) == len(set(pointers)) == len(list(net.parameters()))
