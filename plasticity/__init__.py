"""Plasticity interventions and diagnostics: pure PyTorch (no Ray, gRPC or Prometheus).

See plasticity.base for the intervention hooks and plasticity.layers for how hidden units are found.
"""
