"""Evergreen: the system around the components (config, CLI, run wiring, control plane, telemetry).

The only package that imports all of replay/, actors/, learner/ and plasticity/.
"""
