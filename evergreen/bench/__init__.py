"""Benchmarks run by ``evergreen bench ...``; ``plasticity``: the synthetic plasticity-loss benchmark.

They live here, not in their subject's package, because they assemble the whole system (learner
networks, interventions, diagnostics), while ``plasticity/`` imports only torch, numpy and itself.

Example::

    from evergreen.bench.plasticity import main
    main(["--quick", "--out", "runs/bench-quick"])
"""
