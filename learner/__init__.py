"""Learner: networks, algorithms (DQN family), the learner loop and checkpoints."""
