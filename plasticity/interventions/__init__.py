"""Plasticity interventions, one module per family; `build_interventions` selects them by name."""
