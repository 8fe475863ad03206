"""Replay service: schema, storages, samplers, rate limiter, gRPC shard server and sharded client."""
