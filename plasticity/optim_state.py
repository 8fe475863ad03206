"""Optimizer-state surgery for interventions that re-initialize or replace parameters.

Works for any ``torch.optim`` optimizer whose per-parameter state holds tensors shaped like the
parameter (Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; SGD ``momentum_buffer``;
RMSprop ``square_avg``, ``momentum_buffer``, ``grad_avg``; ...): every such tensor is zeroed at exactly
the requested entries. Scalar state (Adam's ``step``) is shared by the whole parameter, so it is only
reset when the whole parameter is reset and ``reset_step=True``; after a partial reset Adam keeps the
parameter's step count, so the zeroed entries restart from zero moments with bias correction ~1
(what ReDo's and continual backprop's public code do).

Example::

    reset_entries(opt, layer.producer.weight, rows)                      # fresh units' incoming weights
    reset_entries(opt, consumer.weight, layer.consumer_columns(consumer, rows), dim=1)  # outgoing
    reset_parameter(opt, head.weight, reset_step=True)                   # a re-initialized layer
    add_parameters(opt, new_head.parameters())                           # hyper-parameters of group 0
    replace_parameter(opt, old, new, keep_state=False)                   # swap in place
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def _state_tensors(optimizer: torch.optim.Optimizer, param: torch.Tensor):
    state = optimizer.state.get(param)
    if not state:
        return []
    return [value for key, value in state.items() if key != "step" and isinstance(value, torch.Tensor)
            and value.shape == param.shape]


def find_group(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    """The param group holding ``param``; ``ValueError`` if the optimizer does not hold it."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError(f"parameter of shape {tuple(param.shape)} is not in the optimizer")


def reset_entries(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, index: torch.Tensor | Iterable[int], *, dim: int = 0
) -> None:
    """Zero the optimizer state of ``param`` at ``index`` along ``dim`` (rows: 0, columns/in-channels: 1).

    Nothing happens before the optimizer's first step (there is no state yet). Indices are checked
    before anything is written.
    """
    find_group(optimizer, param)
    index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    if not -param.dim() <= dim < param.dim():
        raise ValueError(f"dim {dim} is out of range for a parameter of shape {tuple(param.shape)}")
    size = param.shape[dim]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ValueError(f"indices {index.tolist()} out of range [0, {size}) along dim {dim}")
    for tensor in _state_tensors(optimizer, param):
        tensor.index_fill_(dim, index.to(tensor.device), 0)


def reset_parameter(optimizer: torch.optim.Optimizer, param: torch.Tensor, *, reset_step: bool = True) -> None:
    """Zero every state tensor of ``param``; with ``reset_step`` also its step count (fresh Adam)."""
    find_group(optimizer, param)
    for tensor in _state_tensors(optimizer, param):
        tensor.zero_()
    state = optimizer.state.get(param)
    if reset_step and state and "step" in state:
        # Zero in place: a tensor step may be shared with compiled/fused kernels (capturable Adam).
        if isinstance(state["step"], torch.Tensor):
            state["step"].zero_()
        else:
            state["step"] = 0


def reset_module(optimizer: torch.optim.Optimizer, module: nn.Module, *, reset_step: bool = True) -> None:
    """:func:`reset_parameter` for every parameter of ``module`` that the optimizer holds."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for param in module.parameters():
        if id(param) in held:
            reset_parameter(optimizer, param, reset_step=reset_step)


def add_parameters(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], *, like: torch.Tensor | None = None, **overrides
) -> dict:
    """Register new parameters as a new param group with the hyper-parameters of ``like``'s group.

    ``like`` defaults to the first group, so a learning rate changed by a scheduler carries over (a
    plain ``add_param_group`` would take the constructor defaults). ``overrides`` replace single
    hyper-parameters (e.g. ``lr=...``). Returns the new group.
    """
    params = list(params)
    if not params:
        raise ValueError("add_parameters: no parameters given")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    duplicate = [tuple(p.shape) for p in params if id(p) in held]
    if duplicate:
        raise ValueError(f"add_parameters: parameters of shapes {duplicate} are already in the optimizer")
    template = find_group(optimizer, like) if like is not None else optimizer.param_groups[0]
    unknown = sorted(set(overrides) - set(template))
    if unknown:
        raise ValueError(f"add_parameters: unknown hyper-parameters {unknown}; expected some of "
                         f"{sorted(k for k in template if k != 'params')}")
    group = {key: value for key, value in template.items() if key != "params"}
    group.update(overrides)
    group["params"] = params
    optimizer.add_param_group(group)
    return optimizer.param_groups[-1]


def replace_parameter(
    optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor, *, keep_state: bool = False
) -> None:
    """Put ``new`` where ``old`` is in its param group (same position, same hyper-parameters).

    With ``keep_state`` the old state moves over (shapes must match); otherwise the new parameter
    starts with fresh state.
    """
    group = find_group(optimizer, old)
    if keep_state and new.shape != old.shape:
        raise ValueError(f"replace_parameter: keep_state needs equal shapes, got {tuple(old.shape)} -> {tuple(new.shape)}")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if id(new) in held:
        raise ValueError("replace_parameter: the new parameter is already in the optimizer")
    position = next(i for i, p in enumerate(group["params"]) if p is old)
    group["params"][position] = new
    state = optimizer.state.pop(old, None)
    if keep_state and state is not None:
        optimizer.state[new] = state


def remove_parameters(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Drop parameters (and their state) from the optimizer; empty groups are removed."""
    params = list(params)
    for param in params:
        find_group(optimizer, param)
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    for param in params:
        optimizer.state.pop(param, None)


__all__ = [
    "add_parameters",
    "find_group",
    "remove_parameters",
    "replace_parameter",
    "reset_entries",
    "reset_module",
    "reset_parameter",
]
