"""The `evergreen` command line.

    evergreen train --preset cartpole            # a training run (see `evergreen train --help`)
    evergreen train --resume runs/cartpole-...   # continue a run from its last checkpoint
    evergreen replay serve --port 0 --token-file F --table ...  # one replay shard as a standalone process
    evergreen report runs/cartpole-...           # PNG plots + HTML page from a run's metrics log
    evergreen eval runs/cartpole-... --episodes 10   # evaluate a checkpoint on the run's tasks
    evergreen bench plasticity                   # the synthetic plasticity-loss benchmark
    evergreen status runs/cartpole-...           # a running job's components, from any shell
    evergreen scale runs/cartpole-... --actors 3 # add or remove actors while it runs
    evergreen stop runs/cartpole-...             # graceful stop with a final checkpoint
    evergreen runs                               # the runs the control plane knows
    evergreen deploy render --preset pong --actors 8 --gpus 1 --out k8s/pong   # KubeRay manifests for a run

Each subcommand lives with the code it runs; this module only dispatches, importing lazily so that
`evergreen replay serve` does not pay for torch and Ray.
"""

from __future__ import annotations

import sys

USAGE = """usage: evergreen COMMAND ...

commands:
  train             run a training job (presets in configs/; --help for every option)
  replay serve      run one replay shard as a gRPC server (--token-file, --table; --help)
  report RUN_DIR... render runs' metrics logs to PNG plots and an HTML page (several runs: grouped by seed)
  eval RUN_DIR      evaluate a checkpoint on every task of the run (--checkpoint, --tasks, --episodes)
  bench plasticity  synthetic continual-learning benchmark of plasticity interventions
  status RUN        a running job's components: state, node, heartbeat, rates (--json)
  scale RUN --actors N   change the number of actors of a running job
  stop RUN          stop a running job gracefully (final checkpoint)
  runs              the runs the control plane knows, with their state
  deploy render     Kubernetes (KubeRay) manifests for a run (--preset, --actors, --gpus, --out)
  deploy tree       regenerate the kustomize tree deploy/k8s from the defaults
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from evergreen.train import main as train_main

        return train_main(rest)
    if command == "replay" and rest[:1] == ["serve"]:
        from replay.server import main as serve_main

        return serve_main(rest[1:])
    if command == "report":
        from evergreen.report import main as report_main

        return report_main(rest)
    if command == "eval":
        from evergreen.evaluation import main as eval_main

        return eval_main(rest)
    if command in ("status", "scale", "stop", "runs"):
        from evergreen.control.commands import main as control_main

        return control_main(command, rest)
    if command == "deploy":
        from evergreen.deploy import main as deploy_main

        return deploy_main(rest)
    if command == "bench" and rest[:1] == ["plasticity"]:
        from evergreen.bench.plasticity import main as bench_main

        return bench_main(rest[1:])
    print(f"evergreen: unknown command {' '.join(argv[:2])!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
