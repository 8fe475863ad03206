"""learner.parallel: two gloo ranks train exactly as one process on the concatenated batches.

Each test spawns two real processes that form a ``torch.distributed`` group through a rendezvous
hosted here (as the driver hosts it), runs 20 updates of DQN or SAC with ReDo, a reset, a
shrink-and-perturb, normalize-and-project and a plasticity injection firing mid-way, and compares:

* rank against rank: the digest of every parameter, optimizer moment and generator after every
  update is the same on both ranks (bit-identical replicas);
* ranks against one process: the final parameters equal (to 1e-6) those of one algorithm trained
  on the concatenation of the two ranks' batches, whose mean loss is the mean of the two ranks'.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.checkpoint import state_digest
from learner.parallel import SINGLE, Rendezvous, ReplicaGroup

UPDATES, BATCH, PROBE = 20, 16, 32
#: Fire mid-way: ReDo every 5 updates, shrink-and-perturb every 6, a head reset every 8, NaP's projection
#: every update, one plasticity injection at update 12.
INTERVENTIONS = "nap,redo,shrink_perturb,reset,plasticity_injection"
OPTIONS = {"nap": {"period": 1}, "redo": {"period": 5, "tau": 0.3}, "shrink_perturb": {"period": 6},
           "reset": {"period": 8, "layers": "head"}, "plasticity_injection": {"step": 12, "on_task_switch": False}}


def _build(kind: str, parallel):
    from plasticity.interventions import bind_interventions

    if kind == "dqn":
        from learner.dqn import DQN, DQNConfig
        from learner.networks import NetworkConfig

        return DQN(DQNConfig(compile=False, target_period=4, lr=1e-3), NetworkConfig(hidden_sizes=(32, 32)), obs_shape=(4,),
                   num_actions=3, obs_dtype="float32", seed=3,
                   interventions=bind_interventions(INTERVENTIONS, OPTIONS, networks=DQN.NETWORKS), parallel=parallel)
    from learner.sac import SAC, SACConfig

    return SAC(SACConfig(hidden=(32, 32), normalize_observations=True), obs_shape=(4,), action_low=[-2.0, -1.0],
               action_high=[2.0, 1.0], seed=3,
               interventions=bind_interventions(INTERVENTIONS, OPTIONS, networks=SAC.NETWORKS), parallel=parallel)


def _batch(kind: str, update: int, rank: int) -> dict[str, np.ndarray]:
    """Rank ``rank``'s batch of update ``update`` (a function of both only)."""
    rng = np.random.default_rng([update, rank])
    action = (rng.integers(0, 3, BATCH) if kind == "dqn"
              else np.clip(rng.standard_normal((BATCH, 2)), -1, 1).astype(np.float32))
    return {"obs": rng.standard_normal((BATCH, 4)).astype(np.float32), "action": action,
            "reward": rng.standard_normal(BATCH).astype(np.float32),
            "discount": rng.choice([0.0, 0.99], BATCH).astype(np.float32),
            "next_obs": rng.standard_normal((BATCH, 4)).astype(np.float32)}


def _probe() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(99).standard_normal((PROBE, 4)).astype(np.float32))


def _train(algorithm, kind: str, batches_of) -> tuple[list[str], set[str]]:
    """Digests after each update, and the interventions that acted (non-zero ``<name>/...`` metrics)."""
    algorithm.set_probe(_probe())
    digests, fired = [], set()
    for update in range(UPDATES):
        metrics = algorithm.update(batches_of(update)).metrics
        fired |= {key.split("/")[0] for key, value in metrics.items() if "/" in key and value}
        digests.append(state_digest(algorithm.state_dict()))
    return digests, fired


def _rank_main(kind: str, address: str, rank: int, out: str) -> None:
    torch.set_num_threads(1)
    group = ReplicaGroup.join(address, rank=rank, world_size=2, device=torch.device("cpu"))
    algorithm = _build(kind, group)
    digests, _ = _train(algorithm, kind, lambda update: _batch(kind, update, rank))
    group.check_identical(digests[-1], what="at the end")
    torch.save({"digests": digests, "state": algorithm.state_dict()}, out)
    group.close()


def _two_ranks(kind: str, tmp_path: Path) -> list[dict]:
    rendezvous = Rendezvous()
    ctx = multiprocessing.get_context("spawn")
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    procs = [ctx.Process(target=_rank_main, args=(kind, rendezvous.address, r, outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed (its traceback is above)"
    return [torch.load(o, weights_only=False) for o in outs]


def _params(state) -> dict[str, torch.Tensor]:
    """Every network tensor of an algorithm state dict, by a flat name."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values()) and value:
            flat.update({f"{key}.{name}": v for name, v in value.items()})
    return flat


@pytest.mark.parametrize("kind", ["dqn", "sac"])
def test_two_ranks_match_one_process_on_the_concatenated_batches(kind, tmp_path):
    torch.set_num_threads(1)
    ranks = _two_ranks(kind, tmp_path)
    assert ranks[0]["digests"] == ranks[1]["digests"], "the replicas differ after some update"

    alone = _build(kind, SINGLE)
    _, fired = _train(alone, kind, lambda update: {k: np.concatenate([_batch(kind, update, 0)[k], _batch(kind, update, 1)[k]])
                                        for k in _batch(kind, update, 0)})
    mine, theirs = _params(alone.state_dict()), _params(ranks[0]["state"])
    assert mine and mine.keys() == theirs.keys()
    worst = max((mine[k].double() - theirs[k].double()).abs().max().item() for k in mine)
    assert worst <= 1e-6, f"largest parameter difference {worst:.3g} between 2 ranks and 1 process"
    # The interventions did act mid-way (or the comparison would prove little); NaP projects every step.
    assert fired >= {"redo", "shrink_perturb", "reset", "plasticity_injection"}


#: Every intervention alone, on the network it can be built on (soft MoE needs a conv encoder, the
#: effective-learning-rate increase a normalized network).
EACH = [("mlp", name) for name in ("continual_backprop", "crelu", "fourier_features", "hare_tortoise", "infer", "l2",
                                   "l2_init", "layer_norm", "nap", "parseval", "plasticity_injection",
                                   "rational_activation", "redo", "reset", "shrink_perturb", "soft_reset",
                                   "weight_clipping", "weight_decay", "layer_norm,elr_increase")] + \
       [("cnn", "soft_moe"), ("cnn", "soft_moe,redo")]
EACH_OPTIONS = {"redo": {"period": 2}, "reset": {"period": 3}, "shrink_perturb": {"period": 2},
                "plasticity_injection": {"step": 3, "on_task_switch": False}, "soft_reset": {"warmup": 2}}


def _each_rank(address: str, rank: int, out) -> None:
    """Every EACH entry in turn: 6 updates with a task switch after the third; the replicas compared after each."""
    from learner.dqn import DQN, DQNConfig
    from learner.networks import NetworkConfig
    from plasticity.interventions import bind_interventions

    torch.set_num_threads(1)
    group = ReplicaGroup.join(address, rank=rank, world_size=2, device=torch.device("cpu"))
    differ = []
    for encoder, spec in EACH:
        shape, dtype = ((4,), "float32") if encoder == "mlp" else ((4, 36, 36), "uint8")
        net = NetworkConfig(hidden_sizes=(16, 16)) if encoder == "mlp" else NetworkConfig(encoder="nature_cnn",
                                                                                            cnn_dense_size=16)
        options = {k: v for k, v in EACH_OPTIONS.items() if k in spec.split(",")}
        dqn = DQN(DQNConfig(lr=1e-3), net, obs_shape=shape, num_actions=3, obs_dtype=dtype, seed=5,
                  interventions=bind_interventions(spec, options, networks=DQN.NETWORKS), parallel=group)
        rng = np.random.default_rng(7)   # the same probe on both ranks
        dqn.set_probe(torch.from_numpy(rng.integers(0, 255, (8, *shape)).astype(dtype)))
        for update in range(6):
            rng = np.random.default_rng([update, rank])
            obs, next_obs = (rng.integers(0, 255, (8, *shape)).astype(dtype) for _ in range(2))
            dqn.update({"obs": obs, "action": rng.integers(0, 3, 8), "reward": rng.standard_normal(8).astype(np.float32),
                        "discount": np.full(8, 0.99, np.float32), "next_obs": next_obs})
            if update == 2:
                dqn.task_switch(1)
            try:
                group.check_identical(state_digest(dqn.state_dict()), what=f"{spec} at update {update}")
            except Exception as exc:  # noqa: BLE001 - reported by the test
                differ.append(str(exc))
                break
    out.put((rank, differ))
    group.close()


def test_every_intervention_keeps_the_replicas_identical():
    rendezvous = Rendezvous()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_each_rank, args=(rendezvous.address, r, out)) for r in range(2)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + 300
    while len(results) < 2 and time.monotonic() < deadline:
        try:
            rank, differ = out.get(timeout=1.0)
            results[rank] = differ
        except queue.Empty:
            assert all(p.exitcode in (None, 0) for p in procs), "a rank failed (its traceback is above)"
    for p in procs:
        p.join(timeout=60)
    assert results == {0: [], 1: []}, results


def test_single_process_group_is_the_identity():
    grads = [torch.ones(3)]
    SINGLE.grad_sync(grads)
    assert grads[0].tolist() == [1.0, 1.0, 1.0]
    assert SINGLE.agree([True, False]) == [True, False]
    assert SINGLE.gather_rows(torch.ones(2, 3)).shape == (2, 3)


@pytest.mark.parametrize("address", ["nohost", "host:", ":123", "host:99999", "host:port"])
def test_bad_rendezvous_addresses_are_refused(address):
    with pytest.raises(ValueError, match="rendezvous address must be 'host:port'"):
        ReplicaGroup.join(address, rank=0, world_size=2, device=torch.device("cpu"))


@pytest.mark.parametrize(("rank", "world", "match"), [(0, 1, "world_size must be an integer >= 2"),
                                                      (2, 2, r"rank must be an integer in \[0, 2\)"),
                                                      (-1, 2, "rank must be"), (True, 2, "rank must be")])
def test_bad_ranks_are_refused(rank, world, match):
    with pytest.raises(ValueError, match=match):
        ReplicaGroup.join("127.0.0.1:1", rank=rank, world_size=world, device=torch.device("cpu"))


def test_nccl_needs_a_cuda_device():
    with pytest.raises(ValueError, match="the nccl backend needs a CUDA device"):
        ReplicaGroup.join("127.0.0.1:1", rank=0, world_size=2, device=torch.device("cpu"), backend="nccl")
