"""Ends the processes a local run started when its driver dies without stopping them (e.g. SIGKILL).

``ray.init()`` on a machine without a cluster starts Ray's own processes (GCS, raylet, workers,
...) as children of the driver. When the driver exits normally it shuts them down; when it is
killed they would live on. The driver therefore starts this watchdog in a session of its own and
tells it, over a pipe, which processes to end; if the pipe closes without a ``release`` (the driver
died), the watchdog terminates them and their descendants: SIGTERM, then SIGKILL after a grace
period (replay shards checkpoint on SIGTERM). Each process is named by pid *and* start time, so a
recycled pid is never touched.

    guard = ProcessGuard.start()
    guard.watch(psutil.Process().children(recursive=True))   # after ray.init(); again when more appear
    ...
    guard.release()                                          # clean shutdown: nothing is killed

Run as ``python -m evergreen.watchdog [--grace S]``, reading ``watch <pid> <create_time>`` and
``release`` lines on stdin.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from collections.abc import Iterable

import psutil


class ProcessGuard:
    """Driver side of the watchdog (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen):
        self._proc = proc
        self._sent: set[tuple[int, float]] = set()

    @classmethod
    def start(cls, *, grace_s: float = 15.0) -> ProcessGuard:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evergreen.watchdog", "--grace", str(grace_s)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            start_new_session=True,  # a terminal's Ctrl-C or a group kill must not end it with the driver
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def watch(self, processes: Iterable[psutil.Process]) -> None:
        """Add processes to end if the driver dies (already-sent ones are skipped)."""
        lines = []
        for process in processes:
            if process.pid == self._proc.pid:
                continue
            try:
                key = (process.pid, process.create_time())
            except psutil.Error:
                continue
            if key not in self._sent:
                self._sent.add(key)
                lines.append(f"watch {key[0]} {key[1]!r}\n")
        if lines and self._proc.poll() is None:
            try:
                self._proc.stdin.write("".join(lines))
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass

    def watch_descendants(self) -> None:
        """Watch every current descendant of this process (the local Ray cluster and its workers)."""
        self.watch(psutil.Process().children(recursive=True))

    def release(self) -> None:
        """The driver stopped everything itself: let the watchdog exit without killing anything."""
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write("release\n")
                self._proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def _alive(pid: int, create_time: float) -> psutil.Process | None:
    try:
        process = psutil.Process(pid)
        return process if abs(process.create_time() - create_time) < 1e-3 and process.is_running() else None
    except psutil.Error:
        return None


def end_processes(watched: Iterable[tuple[int, float]], *, grace_s: float) -> list[int]:
    """SIGTERM the watched processes still alive (and their descendants), SIGKILL after ``grace_s``."""
    targets: dict[int, psutil.Process] = {}
    for pid, create_time in watched:
        process = _alive(pid, create_time)
        if process is None:
            continue
        targets[process.pid] = process
        with contextlib.suppress(psutil.Error):
            for child in process.children(recursive=True):
                targets.setdefault(child.pid, child)
    for process in targets.values():
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(list(targets.values()), timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return sorted(targets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evergreen.watchdog", description=__doc__.splitlines()[0])
    parser.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    watched: list[tuple[int, float]] = []
    for line in sys.stdin:
        parts = line.split()
        if parts[:1] == ["release"]:
            return 0
        if len(parts) == 3 and parts[0] == "watch":
            watched.append((int(parts[1]), float(parts[2])))
    # stdin closed without a release: the driver is gone.
    end_processes(watched, grace_s=args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
