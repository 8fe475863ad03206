"""The learner as a Ray actor: ``LearnerService`` in its own process, with the resources it declares.

    learner = RayLearner.options(num_cpus=1, num_gpus=1, resources={"learner": 1}).remote(**service_kwargs)
    extra = ray.get(learner.restore.remote())
    report = ray.get(learner.train.remote(seconds=0.25, env_steps=12_000))   # learner.service.TrainReport

Experience does not pass through Ray: the service samples replay over gRPC from inside this process.
"""

from __future__ import annotations

import ray

from learner.service import LearnerService


class LearnerProcess(LearnerService):
    """``LearnerService`` plus where it runs (node id), for placement checks and ``evergreen status``."""

    def info(self) -> dict:
        return {**super().info(), "node_id": ray.get_runtime_context().get_node_id()}


RayLearner = ray.remote(LearnerProcess)

__all__ = ["LearnerProcess", "RayLearner"]
