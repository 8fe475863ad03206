"""Learner: networks, algorithms (DQN family), the learner loop and checkpoints.

    from learner import DQN, DQNConfig, NetworkConfig, build_network
"""

from learner.dqn import DQN, DQNConfig, UpdateResult
from learner.networks import NetworkConfig, QNetwork, build_network

__all__ = ["DQN", "DQNConfig", "NetworkConfig", "QNetwork", "UpdateResult", "build_network"]
