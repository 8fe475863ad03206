"""What the end-to-end tests share: waiting on a live run, with a failure that says what never happened.

    placement = wait_for(lambda: read_placement(run_dir), "placement.json", timeout_s=90)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 90.0, poll_s: float = 0.2) -> Any:
    """``predicate()``'s first truthy value, polled every ``poll_s``; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")
