"""Ray actor processes: vectorized environments, acting policy, n-step adder, actor pool.

Modules (``actors`` never imports ``learner`` or ``evergreen``; the acting network comes in as a factory):

- ``actors.envs``: ``EnvConfig``, ``make_vector_env`` (ALE ``AtariVectorEnv`` / gymnasium control envs
  behind one ``VectorEnv`` interface, NEXT_STEP autoreset, raw-reward episode statistics).
- ``actors.adder``: ``NStepAdder`` (vectorized n-step transitions as column arrays) and ``schema``.
- ``actors.policy``: epsilon schedules, Ape-X per-actor epsilons, batched ``epsilon_greedy``.
- ``actors.actor``: ``Actor``, the acting loop without Ray, and ``ActorStats``.
- ``actors.ray_actor``: ``RayActor`` and the elastic, self-healing ``ActorPool`` (imports Ray).
- Acting throughput against a single-process baseline: ``benchmarks/actor_throughput.py``.
"""
