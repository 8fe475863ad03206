"""plasticity.optim_state: exactly the requested entries are zeroed, nothing else moves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plasticity.optim_state import (
    add_parameters,
    find_group,
    remove_parameters,
    replace_parameter,
    reset_entries,
    reset_module,
    reset_parameter,
)
from tests.unit.plasticity.nets import ConvNet


def _stepped(module, opt_cls=torch.optim.Adam, **kwargs):
    torch.manual_seed(0)
    opt = opt_cls(module.parameters(), **kwargs)
    for _ in range(2):
        opt.zero_grad()
        module(torch.randn(5, *_input_shape(module))).pow(2).sum().backward()
        opt.step()
    return opt


def _input_shape(module):
    return (module.in_features,) if isinstance(module, nn.Linear) else (2, 9, 9)


def _snapshot(opt):
    return {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
            for p, s in opt.state.items()}


def test_reset_rows_of_adam_moments_exactly():
    torch.manual_seed(0)
    layer = nn.Linear(3, 4)
    opt = _stepped(layer, lr=0.1)
    before = _snapshot(opt)
    reset_entries(opt, layer.weight, [1, 3])
    state = opt.state[layer.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        old = before[id(layer.weight)][key]
        assert torch.equal(state[key][[1, 3]], torch.zeros(2, 3))
        assert torch.equal(state[key][[0, 2]], old[[0, 2]])
        assert old[[1, 3]].abs().sum() > 0  # the test can fail: there was something to zero
    assert float(state["step"]) == 2.0  # partial reset keeps the step count
    # the bias was not touched
    assert torch.equal(opt.state[layer.bias]["exp_avg"], before[id(layer.bias)]["exp_avg"])


def test_reset_columns_exactly():
    layer = nn.Linear(3, 4)
    opt = _stepped(layer, lr=0.1)
    before = opt.state[layer.weight]["exp_avg"].clone()
    reset_entries(opt, layer.weight, torch.tensor([2]), dim=1)
    after = opt.state[layer.weight]["exp_avg"]
    assert torch.equal(after[:, 2], torch.zeros(4))
    assert torch.equal(after[:, :2], before[:, :2])


def test_conv_flatten_linear_consumer_columns():
    net = ConvNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net(torch.randn(3, 2, 9, 9)).pow(2).sum().backward()
    opt.step()
    layer = net.hidden_layers()[1]  # conv2 (3 channels, 3x3 spatial) -> flatten -> fc (27 inputs)
    columns = layer.consumer_columns(net.fc, torch.tensor([1]))
    assert columns.tolist() == [9, 10, 11, 12, 13, 14, 15, 16, 17]
    before = opt.state[net.fc.weight]["exp_avg_sq"].clone()
    reset_entries(opt, net.fc.weight, columns, dim=1)
    after = opt.state[net.fc.weight]["exp_avg_sq"]
    assert torch.equal(after[:, 9:18], torch.zeros(5, 9))
    assert torch.equal(after[:, :9], before[:, :9]) and torch.equal(after[:, 18:], before[:, 18:])
    # conv -> conv: the consumer's input channel 2 of conv2 (all kernel positions)
    conv_layer = net.hidden_layers()[0]
    channels = conv_layer.consumer_columns(net.conv2, torch.tensor([2]))
    assert channels.tolist() == [2]
    before = opt.state[net.conv2.weight]["exp_avg"].clone()
    reset_entries(opt, net.conv2.weight, channels, dim=1)
    after = opt.state[net.conv2.weight]["exp_avg"]
    assert torch.equal(after[:, 2], torch.zeros(3, 2, 2))
    assert torch.equal(after[:, :2], before[:, :2]) and torch.equal(after[:, 3:], before[:, 3:])


def test_sgd_momentum_buffer_rows():
    layer = nn.Linear(2, 3)
    opt = _stepped(layer, torch.optim.SGD, lr=0.1, momentum=0.9)
    before = opt.state[layer.weight]["momentum_buffer"].clone()
    reset_entries(opt, layer.weight, [0])
    after = opt.state[layer.weight]["momentum_buffer"]
    assert torch.equal(after[0], torch.zeros(2)) and torch.equal(after[1:], before[1:])


def test_sgd_without_momentum_has_nothing_to_reset():
    layer = nn.Linear(2, 3)
    opt = _stepped(layer, torch.optim.SGD, lr=0.1)
    weights = [p.detach().clone() for p in layer.parameters()]
    before = _snapshot(opt)
    reset_entries(opt, layer.weight, [0])  # no momentum buffer: no error
    reset_parameter(opt, layer.weight)
    assert _snapshot(opt) == before == {}  # plain SGD keeps no state, and none was made up
    assert all(torch.equal(p, w) for p, w in zip(layer.parameters(), weights, strict=True))


def test_before_first_step_is_a_no_op():
    layer = nn.Linear(2, 3)
    opt = torch.optim.Adam(layer.parameters())
    reset_entries(opt, layer.weight, [0])
    reset_parameter(opt, layer.weight)
    assert len(opt.state) == 0


def test_reset_whole_parameter_and_step():
    layer = nn.Linear(3, 2)
    opt = _stepped(layer, lr=0.1)
    reset_parameter(opt, layer.weight, reset_step=True)
    state = opt.state[layer.weight]
    assert torch.equal(state["exp_avg"], torch.zeros(2, 3)) and float(state["step"]) == 0.0
    reset_parameter(opt, layer.bias, reset_step=False)
    assert float(opt.state[layer.bias]["step"]) == 2.0
    assert torch.equal(opt.state[layer.bias]["exp_avg_sq"], torch.zeros(2))
    # a fresh Adam step after a full reset equals the very first Adam step: -lr * sign(grad)
    w = layer.weight.detach().clone()
    opt.zero_grad()
    layer.weight.grad = torch.full((2, 3), 0.5)
    layer.bias.grad = torch.zeros(2)
    opt.step()
    assert torch.allclose(layer.weight.detach(), w - 0.1, atol=1e-6)


def test_reset_module():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 2)).sum().backward()
    opt.step()
    reset_module(opt, net[1])
    assert torch.equal(opt.state[net[1].weight]["exp_avg"], torch.zeros(1, 2))
    assert opt.state[net[0].weight]["exp_avg"].abs().sum() > 0


def test_bad_inputs_leave_state_untouched():
    layer = nn.Linear(3, 4)
    opt = _stepped(layer, lr=0.1)
    before = opt.state[layer.weight]["exp_avg"].clone()
    with pytest.raises(ValueError, match=r"indices \[1, 4\] out of range \[0, 4\)"):
        reset_entries(opt, layer.weight, [1, 4])
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        reset_entries(opt, layer.weight, [0], dim=2)
    assert torch.equal(opt.state[layer.weight]["exp_avg"], before)
    stranger = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"shape \(4, 3\) is not in the optimizer"):
        reset_entries(opt, stranger, [0])


def test_add_parameters_copies_current_hyperparameters():
    layer = nn.Linear(2, 2)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3, betas=(0.8, 0.9))
    opt.param_groups[0]["lr"] = 5e-4  # e.g. a scheduler changed it
    extra = nn.Linear(2, 1)
    group = add_parameters(opt, extra.parameters())
    assert group["lr"] == 5e-4 and group["betas"] == (0.8, 0.9) and len(group["params"]) == 2
    assert find_group(opt, extra.weight) is group
    other = nn.Linear(1, 1)
    assert add_parameters(opt, other.parameters(), lr=0.1)["lr"] == 0.1
    with pytest.raises(ValueError, match="already in the optimizer"):
        add_parameters(opt, [extra.weight])
    with pytest.raises(ValueError, match="unknown hyper-parameters"):
        add_parameters(opt, nn.Linear(1, 1).parameters(), learning_rate=1.0)
    with pytest.raises(ValueError, match="no parameters"):
        add_parameters(opt, [])
    assert len(opt.param_groups) == 3


def test_replace_parameter_in_place():
    layer = nn.Linear(2, 3)
    opt = _stepped(layer, lr=0.1)
    old = layer.weight
    moments = opt.state[old]["exp_avg"].clone()
    new = nn.Parameter(torch.zeros(3, 2))
    replace_parameter(opt, old, new, keep_state=True)
    assert opt.param_groups[0]["params"][0] is new
    assert torch.equal(opt.state[new]["exp_avg"], moments) and old not in opt.state
    fresh = nn.Parameter(torch.zeros(5))
    replace_parameter(opt, layer.bias, fresh)
    assert opt.param_groups[0]["params"][1] is fresh and fresh not in opt.state
    with pytest.raises(ValueError, match="keep_state needs equal shapes"):
        replace_parameter(opt, new, nn.Parameter(torch.zeros(1)), keep_state=True)


def test_remove_parameters():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.Adam(a.parameters())
    add_parameters(opt, b.parameters())
    remove_parameters(opt, list(b.parameters()))
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="not in the optimizer"):
        remove_parameters(opt, [b.weight])
