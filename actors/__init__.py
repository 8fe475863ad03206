"""Ray actor processes: vectorized environments, acting policy, n-step adder, actor pool."""
