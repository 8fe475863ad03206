"""``learner.dqn.adam_step``: the one-kernel Adam step must be ``Optimizer.step`` bit for bit."""

import copy

import pytest
import torch

from learner.dqn import _adam, adam_step


def _pair(**adam_options):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    twin = copy.deepcopy(net)
    if adam_options:
        return (net, torch.optim.Adam(net.parameters(), **adam_options)), (twin, torch.optim.Adam(twin.parameters(), **adam_options))
    cpu = torch.device("cpu")
    return (net, _adam(net.parameters(), lr=1e-2, eps=1e-4, device=cpu)), (twin, _adam(twin.parameters(), lr=1e-2, eps=1e-4, device=cpu))


def _train(net, optimizer, step, batches, *, drop_state_at=None, lr_at=None):
    for i, x in enumerate(batches):
        if i == drop_state_at:  # e.g. an intervention that resets a layer's optimizer state
            optimizer.state.pop(net[0].weight)
        if lr_at is not None:
            optimizer.param_groups[0]["lr"] = lr_at(i)
        optimizer.zero_grad()
        net(x).pow(2).sum().backward()
        step(optimizer)


@pytest.mark.parametrize("case", ["plain", "state dropped midway", "lr schedule", "weight decay, multi-tensor"])
def test_adam_step_equals_optimizer_step(case):
    batches = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    options = {"lr": 1e-2, "weight_decay": 0.1, "foreach": True} if case.startswith("weight decay") else {}
    (net_a, opt_a), (net_b, opt_b) = _pair(**options)
    extra = {"drop_state_at": 5} if case == "state dropped midway" else {}
    if case == "lr schedule":
        extra = {"lr_at": lambda i: 1e-2 / (1 + i)}
    _train(net_a, opt_a, lambda optimizer: optimizer.step(), batches, **extra)
    _train(net_b, opt_b, adam_step, batches, **extra)
    for p, q in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt_a.state[p]["exp_avg"], opt_b.state[q]["exp_avg"])
        assert torch.equal(opt_a.state[p]["exp_avg_sq"], opt_b.state[q]["exp_avg_sq"])
        assert torch.equal(torch.as_tensor(opt_a.state[p]["step"]), torch.as_tensor(opt_b.state[q]["step"]))
    # The state was really dropped and rebuilt: that layer's step count restarted.
    if case == "state dropped midway":
        assert int(opt_b.state[net_b[0].weight]["step"]) == len(batches) - 5
        assert int(opt_b.state[net_b[2].weight]["step"]) == len(batches)


def test_adam_step_moves_the_parameters():
    (net, optimizer), _ = _pair()
    before = [p.detach().clone() for p in net.parameters()]
    _train(net, optimizer, adam_step, [torch.randn(8, 4) for _ in range(3)])
    assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
