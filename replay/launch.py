"""Start replay shards as subprocesses (``python -m replay.server``) and manage their lifetime.

    from replay.auth import ensure_token_file
    from replay.launch import ShardProcess
    from replay.client import ReplayClient

    token = ensure_token_file("runs/r1/replay.token")
    shards = [ShardProcess([config], checkpoint_dir=f"ckpt/{i}", metrics_port=0, shard_index=i,
                           token_file="runs/r1/replay.token") for i in range(2)]
    client = ReplayClient([s.address for s in shards], token=token)
    ...
    shards[0].kill()          # SIGKILL, as a crash would
    shards[0].restart()       # same port (so the client's address stays valid), restores its checkpoint
    for s in shards:
        s.stop()              # SIGTERM: the shard checkpoints (if it has a directory) and exits

Authentication: ``token_file`` (mode 0600) is passed as ``--token-file``; a ``token`` given as a string
is written to a private temporary file (mode 0600 in a 0700 directory, removed when this object goes)
and passed the same way, never on the command line (which other users can read in ``ps``). Without
either, the shard serves with ``--insecure-no-auth``. ``tls`` (``replay.auth.ServerTls``) is written to
that private directory too. ``rebase_limiter_on_restore`` and ``max_blocked_calls`` are passed through.

With ``exit_with_parent`` (the default) a shard stops by itself, checkpointing, when the process that
launched it dies without stopping it (SIGKILL, crash). The constructor returns once the shard printed
its ``REPLAY_SERVER_READY`` line; if the process exits or stays silent past ``ready_timeout_s``, it raises
``RuntimeError`` with the exit status and the tail of the shard's stderr (e.g. the schema mismatch that
made it refuse a checkpoint).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

from replay.auth import ServerTls, write_token_file
from replay.server import READY_PREFIX
from replay.table import TableConfig

_TAIL_LINES = 200


class ShardProcess:
    """One replay shard in its own process (see the module docstring)."""

    def __init__(
        self,
        tables: Sequence[TableConfig],
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        metrics_port: int | None = None,
        shard_index: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        ready_timeout_s: float = 60.0,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        exit_with_parent: bool = True,
        token: str | None = None,
        token_file: str | os.PathLike | None = None,
        tls: ServerTls | None = None,
        rebase_limiter_on_restore: bool = False,
        max_blocked_calls: int | None = None,
    ):
        self.tables = list(tables)
        if not self.tables:
            raise ValueError("tables is empty; a shard needs at least one TableConfig")
        if token is not None and token_file is not None:
            raise ValueError("give token or token_file, not both")
        self._private: Path | None = None
        if token is not None or tls is not None:
            # Secrets go to files only this user can read; the command line is visible to everyone.
            self._private = Path(tempfile.mkdtemp(prefix="replay-shard-"))
            os.chmod(self._private, 0o700)
            weakref.finalize(self, shutil.rmtree, str(self._private), True)
        if token is not None:
            token_file = self._private / "token"
            write_token_file(token_file, token)
        self.token_file = Path(token_file) if token_file is not None else None
        self._tls_files: list[str] = []
        if tls is not None:
            names = [("--tls-cert-file", "cert.pem", tls.cert_pem), ("--tls-key-file", "key.pem", tls.key_pem),
                     ("--tls-client-ca-file", "client-ca.pem", tls.client_ca_pem)]
            for flag, name, pem in names:
                if pem is not None:
                    path = self._private / name
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(pem)
                    self._tls_files += [flag, str(path)]
        self.rebase_limiter_on_restore = rebase_limiter_on_restore
        self.max_blocked_calls = max_blocked_calls
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.shard_index = int(shard_index)
        self.host = host
        self.ready_timeout_s = float(ready_timeout_s)
        self.extra_args = list(extra_args)
        self.env = env
        self.exit_with_parent = exit_with_parent
        self.port: int = int(port)
        self._requested_metrics_port = metrics_port
        self.metrics_port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._start(port=self.port, metrics_port=metrics_port)

    # -- properties ----------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def stderr_tail(self) -> str:
        """The last lines the shard wrote to stderr."""
        return "".join(self._stderr)

    # -- lifecycle -----------------------------------------------------------------------------------
    def command(self, *, port: int, metrics_port: int | None) -> list[str]:
        cmd = [sys.executable, "-m", "replay.server", "--host", self.host, "--port", str(port),
               "--shard-index", str(self.shard_index)]
        for config in self.tables:
            cmd += ["--table-json", json.dumps(config.to_json(), sort_keys=True)]
        if self.checkpoint_dir is not None:
            cmd += ["--checkpoint-dir", str(self.checkpoint_dir)]
        if metrics_port is not None:
            cmd += ["--metrics-port", str(metrics_port)]
        if self.exit_with_parent:
            cmd.append("--exit-with-parent")
        if self.token_file is not None:
            cmd += ["--token-file", str(self.token_file)]
        else:
            cmd.append("--insecure-no-auth")
        cmd += self._tls_files
        if self.rebase_limiter_on_restore:
            cmd.append("--rebase-limiter-on-restore")
        if self.max_blocked_calls is not None:
            cmd += ["--max-blocked-calls", str(self.max_blocked_calls)]
        return cmd + self.extra_args

    def _start(self, *, port: int, metrics_port: int | None) -> None:
        self._stderr.clear()
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen(
            self.command(port=port, metrics_port=metrics_port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True, env=env,
            # Its own session: a terminal's Ctrl-C reaches the parent, which checkpoints replay and
            # then stops the shard; the shard must not have already gone.
            start_new_session=True,
        )
        self._proc = proc
        ready: dict[str, str] = {}
        got_ready = threading.Event()

        def read_stdout():
            for line in proc.stdout:
                if line.startswith(READY_PREFIX) and not got_ready.is_set():
                    ready.update(part.split("=", 1) for part in line.split()[1:] if "=" in part)
                    got_ready.set()
            got_ready.set()   # EOF: the process exited (ready stays empty)

        def read_stderr():
            # Drained continuously so that a chatty shard never blocks on a full pipe.
            for line in proc.stderr:
                self._stderr.append(line)

        threading.Thread(target=read_stdout, daemon=True, name=f"shard{self.shard_index}-stdout").start()
        self._stderr_thread = threading.Thread(target=read_stderr, daemon=True, name=f"shard{self.shard_index}-stderr")
        self._stderr_thread.start()
        if not got_ready.wait(self.ready_timeout_s) or not ready:
            if proc.poll() is None:
                proc.kill()
            code = proc.wait()
            self._stderr_thread.join(timeout=2)
            reason = "exited" if got_ready.is_set() else f"was not ready within {self.ready_timeout_s:.0f} s"
            raise RuntimeError(
                f"replay shard {self.shard_index} ({self.host}:{port}) {reason} (exit status {code}); stderr:\n"
                f"{self.stderr_tail().rstrip() or '(empty)'}"
            )
        self.port = int(ready["port"])
        self.metrics_port = None if ready.get("metrics_port", "none") == "none" else int(ready["metrics_port"])

    def stop(self, *, timeout: float = 30.0) -> int | None:
        """SIGTERM (the shard checkpoints if it has a directory), wait; SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would (no final checkpoint)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self, *, attempts: int = 20) -> None:
        """Stop if running, then start again on the same port (and metrics port, if it had one).

        The port can be briefly unavailable after a kill; binding is retried ``attempts`` times.
        """
        self.stop()
        metrics_port = self.metrics_port if self._requested_metrics_port is not None else None
        last: RuntimeError | None = None
        for _ in range(attempts):
            try:
                self._start(port=self.port, metrics_port=metrics_port)
                return
            except RuntimeError as e:
                last = e
                if "bind" not in str(e) and "in use" not in str(e) and "Address" not in str(e):
                    raise
                time.sleep(0.25)
        raise RuntimeError(f"replay shard {self.shard_index} could not restart on port {self.port}: {last}")

    def __enter__(self) -> ShardProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        # A forgotten shard must not outlive the test or run that started it.
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
