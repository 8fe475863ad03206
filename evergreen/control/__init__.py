"""The run's control plane: registry, heartbeats and commands on Redis (see ``plane``), and the Redis
server a run starts for itself when none is configured (see ``redis_server``)."""
