"""weight_decay, l2, l2_init, parseval, weight_clipping: exact effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plasticity.interventions.regularization import L2, L2Init, Parseval, WeightClipping, WeightDecay
from tests.unit.plasticity.nets import MLP, make_ctx


def _ctx_linear(weight, bias, *, lr=0.1, optimizer=torch.optim.SGD, **kwargs):
    net = MLP(in_dim=2, hidden=(2,), actions=1)
    fc = net._hidden[0][0]
    with torch.no_grad():
        fc.weight.copy_(torch.tensor(weight))
        fc.bias.copy_(torch.tensor(bias))
    ctx = make_ctx(net)
    ctx.optimizer = optimizer(net.parameters(), lr=lr, **kwargs)
    return net, fc, ctx


def test_decoupled_weight_decay_uses_group_lr_and_skips_biases():
    net, fc, ctx = _ctx_linear([[1.0, -2.0], [0.5, 4.0]], [1.0, 1.0], lr=0.1)
    ctx.optimizer.add_param_group({"params": [], "lr": 0.5})
    wd = WeightDecay(weight_decay=0.2)
    wd.setup(ctx)
    assert wd.loss(ctx, obs=torch.zeros(1, 2), features=torch.zeros(1, 2)) is None
    head_w = net.head.weight.detach().clone()
    wd.after_step(ctx)
    # factor 1 - 0.1 * 0.2 = 0.98
    assert torch.allclose(fc.weight, torch.tensor([[0.98, -1.96], [0.49, 3.92]]), atol=0, rtol=1e-7)
    assert fc.bias.tolist() == [1.0, 1.0]
    assert torch.allclose(net.head.weight, head_w * 0.98, atol=0, rtol=1e-7)
    # biases too, when asked; frozen parameters never decay
    net.head.weight.requires_grad_(False)
    frozen = net.head.weight.detach().clone()
    WeightDecay(weight_decay=0.2, decay_biases=True).after_step(ctx)
    assert torch.allclose(fc.bias, torch.tensor([0.98, 0.98]), atol=0, rtol=1e-7)
    assert torch.equal(net.head.weight, frozen)


def test_decoupled_decay_follows_a_changed_learning_rate():
    net, fc, ctx = _ctx_linear([[1.0, 1.0], [1.0, 1.0]], [0.0, 0.0], lr=0.1)
    ctx.optimizer.param_groups[0]["lr"] = 0.5
    WeightDecay(weight_decay=0.1).after_step(ctx)
    assert torch.allclose(fc.weight, torch.full((2, 2), 0.95))


def test_coupled_weight_decay_gradient_is_wd_times_p():
    net, fc, ctx = _ctx_linear([[1.0, -2.0], [0.5, 4.0]], [1.0, 1.0])
    wd = WeightDecay(weight_decay=0.2, coupled=True)
    loss = wd.loss(ctx, obs=torch.zeros(1, 2), features=torch.zeros(1, 2))
    loss.backward()
    assert torch.allclose(fc.weight.grad, 0.2 * fc.weight.detach())
    assert fc.bias.grad is None
    before = fc.weight.detach().clone()
    assert wd.after_step(ctx) == {} and torch.equal(fc.weight, before)


def test_weight_decay_refuses_optimizer_with_its_own_decay():
    net = MLP()
    ctx = make_ctx(net)
    ctx.optimizer = torch.optim.AdamW(net.parameters())
    with pytest.raises(ValueError, match="group 0 already has weight_decay=0.01"):
        WeightDecay().setup(ctx)
    with pytest.raises(ValueError, match="'weight_decay' must be >= 0.0"):
        WeightDecay(weight_decay=-1.0)


def test_l2_exact_loss():
    net, fc, ctx = _ctx_linear([[1.0, -2.0], [0.5, 4.0]], [1.0, 1.0])
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([[3.0, 0.0]]))
    loss = L2(lam=0.5).loss(ctx, obs=torch.zeros(1, 2), features=torch.zeros(1, 2))
    # 0.5 * (1 + 4 + 0.25 + 16 + 9)
    assert loss.item() == pytest.approx(15.125)
    with_b = L2(lam=0.5, include_biases=True).loss(ctx, obs=torch.zeros(1, 2), features=torch.zeros(1, 2))
    assert with_b.item() == pytest.approx(15.125 + 0.5 * (2 + net.head.bias.item() ** 2))


def test_l2_init_exact_and_state_roundtrip():
    net, fc, ctx = _ctx_linear([[1.0, -2.0], [0.5, 4.0]], [1.0, 1.0])
    reg = L2Init(lam=0.1)
    reg.setup(ctx)
    assert reg.loss(ctx, obs=torch.zeros(1, 2), features=torch.zeros(1, 2)).item() == 0.0
    with torch.no_grad():
        fc.weight[0, 0] += 2.0
        fc.bias[1] -= 3.0
    loss = reg.loss(ctx, obs=torch.zeros(1, 2), features=torch.zeros(1, 2))
    assert loss.item() == pytest.approx(0.1 * (4.0 + 9.0))
    loss.backward()
    assert fc.weight.grad[0, 0].item() == pytest.approx(0.4) and fc.bias.grad[1].item() == pytest.approx(-0.6)
    other = L2Init(lam=0.1)
    other.load_state_dict(reg.state_dict())
    other.setup(ctx)  # keeps the loaded anchors
    assert other.loss(ctx, obs=torch.zeros(1, 2), features=torch.zeros(1, 2)).item() == pytest.approx(1.3)
    with pytest.raises(ValueError, match="expected state keys"):
        other.load_state_dict({"anchors": {}})


def test_parseval_exact():
    net, fc, ctx = _ctx_linear([[1.0, 0.0], [1.0, 1.0]], [0.0, 0.0])
    # W W^T = [[1, 1], [1, 2]]; minus I -> [[0, 1], [1, 1]]; squared Frobenius 3
    loss = Parseval(lam=0.5, scale=1.0).loss(ctx, obs=torch.zeros(1, 2), features=torch.zeros(1, 2))
    assert loss.item() == pytest.approx(1.5)
    # s = 2: [[-1, 1], [1, 0]] -> 3 as well; s = 0.5: [[.5, 1], [1, 1.5]] -> 0.25 + 2 + 2.25
    assert Parseval(lam=1.0, scale=0.5).loss(ctx, obs=None, features=None).item() == pytest.approx(4.5)


def test_parseval_on_conv_rows():
    from tests.unit.plasticity.nets import ConvNet

    net = ConvNet()
    ctx = make_ctx(net)
    with torch.no_grad():
        for m in (net.conv1, net.conv2, net.fc):
            m.weight.zero_()
    # every W W^T is 0: ||0 - I||^2 = rows: 4 + 3 + 5
    assert Parseval(lam=1.0).loss(ctx, obs=None, features=None).item() == pytest.approx(12.0)


def test_weight_clipping_exact():
    net, fc, ctx = _ctx_linear([[1.0, -2.0], [0.5, 0.1]], [3.0, -0.2])
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([[0.1, 0.1]]))
        net.head.bias.fill_(0.0)
    metrics = WeightClipping(kappa=1.0).after_step(ctx)
    b = 1 / 2**0.5  # fan_in 2 for both layers
    assert torch.allclose(fc.weight, torch.tensor([[b, -b], [0.5, 0.1]]))
    assert torch.allclose(fc.bias, torch.tensor([b, -0.2]))
    assert metrics == {"weight_clipping/clipped_fraction": pytest.approx(3 / 9)}
    with pytest.raises(ValueError, match="'kappa' must be > 0.0"):
        WeightClipping(kappa=0.0)
    assert isinstance(net.head, nn.Linear)
