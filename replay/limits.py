"""Size and value limits a replay shard enforces on everything a client sends, before allocating for it.

Every limit is checked on the raw request (lengths of strings, counts of dimensions and columns,
element counts computed without overflow) before numpy or protobuf builds anything from it, so a
hostile request costs at most its own bytes, which gRPC already bounds by ``max_message_bytes``.

=================================  ======  ============================================================
limit                               value   what it bounds
=================================  ======  ============================================================
``MAX_NAME_CHARS``                  128     table and field names (UTF-8 bytes)
``MAX_WRITER_KEY_CHARS``            256     insert writer keys and writer ids
``MAX_DTYPE_CHARS``                 16      dtype names (the longest valid one, ``complex128``, has 10)
``MAX_NDIM``                        8       dimensions of one array (a row axis + up to 7 field axes)
``MAX_COLUMNS``                     64      columns of one insert
``MAX_DIM``                         2**40   any one dimension
``MAX_TIMEOUT_S``                   86400   a call's rate-limiter wait (one day; longer is a bug)
``MAX_SMALL_REQUEST_BYTES``         64 KiB  Sample, Info and the admin requests (Checkpoint, Clear, ...)
``MAX_ITEM_MASS``                   1e100   ``priority ** priority_exponent`` of one item
``MIN_ITEM_MASS``                   1e-100  smallest positive mass kept (smaller ones are raised to it)
``MAX_DETAIL_CHARS``                1024    a status message (gRPC sends it in an 8 KiB trailer)
``MAX_ECHO_CHARS``                  48      how much of a client's value a message repeats
=================================  ======  ============================================================

Why the item-mass bounds: the sum tree's root is the sum of all masses, so with at most ``2**40``
items each at most ``1e100`` the total stays below ``1.1e112``, far from float64's ``1.8e308`` (two
priorities of ``1e308`` used to make it infinite); and the smallest probability a draw can have,
``MIN_ITEM_MASS / total``, stays a normal float, so importance weights ``(N * P) ** -beta`` stay
finite.

Example::

    from replay.limits import clip
    clip("x" * 1000)          # "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (1000 chars)"
"""

from __future__ import annotations

__all__ = [
    "MAX_COLUMNS",
    "MAX_DETAIL_CHARS",
    "MAX_DIM",
    "MAX_DTYPE_CHARS",
    "MAX_ECHO_CHARS",
    "MAX_ITEM_MASS",
    "MAX_NAME_CHARS",
    "MAX_NDIM",
    "MAX_SMALL_REQUEST_BYTES",
    "MAX_TIMEOUT_S",
    "MAX_WRITER_KEY_CHARS",
    "MIN_ITEM_MASS",
    "clip",
    "clip_detail",
]

MAX_NAME_CHARS = 128
MAX_WRITER_KEY_CHARS = 256
MAX_DTYPE_CHARS = 16
MAX_NDIM = 8
MAX_COLUMNS = 64
MAX_DIM = 1 << 40
MAX_TIMEOUT_S = 86400.0
MAX_SMALL_REQUEST_BYTES = 64 * 1024
MAX_ITEM_MASS = 1e100
MIN_ITEM_MASS = 1e-100
MAX_DETAIL_CHARS = 1024
MAX_ECHO_CHARS = 48


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` of at most about ``limit`` characters: a client's input is echoed as a prefix.

    >>> clip("abc")
    "'abc'"
    >>> clip("a" * 100, 4)
    "'aaaa'... (100 chars)"
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value[: limit + 1])
        text = repr(raw[:limit])
        return text if len(value) <= limit else f"{text}... ({len(value)} bytes)"
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} chars)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def clip_detail(text: str) -> str:
    """A status message cut to ``MAX_DETAIL_CHARS`` (the last line of defence for the trailer size)."""
    if len(text) <= MAX_DETAIL_CHARS:
        return text
    return text[: MAX_DETAIL_CHARS - 24] + f"... ({len(text)} chars)"
