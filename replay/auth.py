"""Authentication of replay calls (a per-run shared token) and optional TLS.

A run generates one random token and keeps it in a file only its user can read (mode 0600); shards
are started with that file and refuse every call that does not carry the token (gRPC status
UNAUTHENTICATED), and clients send it with every call as metadata ``authorization: Bearer <token>``.
The comparison is constant-time (``hmac.compare_digest``) and happens in a server interceptor, before
the request is parsed. The token is never printed or logged, and refusals do not repeat what was sent.
The gRPC health service stays open (it reveals only SERVING/NOT_SERVING), so that probes need no secret.

The token authenticates the caller, but on a plain (insecure) channel it travels in clear text, which is
fine on loopback and on a private cluster network. Across networks one does not trust, add TLS: the
server gets a certificate and key (and optionally a client CA, which then requires client certificates),
clients the CA that signed the server's certificate.

Example::

    from replay.auth import ensure_token_file, read_token_file, ServerTls, ClientTls
    token = ensure_token_file("runs/r1/replay.token")     # creates it (0600) once; later calls read it
    server = ReplayServer([config], token=token)           # or: evergreen replay serve --token-file F
    client = ReplayClient([address], token=read_token_file("runs/r1/replay.token"))

    # TLS (clusters): the shard presents cert.pem, clients verify it against ca.pem.
    server = ReplayServer([config], token=token, tls=ServerTls.from_files("cert.pem", "key.pem"))
    client = ReplayClient([address], token=token, tls=ClientTls.from_files("ca.pem"))
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = [
    "TOKEN_METADATA_KEY",
    "ClientTls",
    "ServerTls",
    "TokenInterceptor",
    "ensure_token_file",
    "generate_token",
    "metadata",
    "read_token_file",
    "write_token_file",
]

TOKEN_METADATA_KEY = "authorization"
_PREFIX = "Bearer "
_MAX_TOKEN_CHARS = 512
# Methods callable without the token: the standard health service only.
_EXEMPT = ("/grpc.health.v1.Health/",)


def generate_token() -> str:
    """A new random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def _check_token(token: str, *, where: str) -> str:
    if not isinstance(token, str) or not token:
        raise ValueError(f"{where}: the token is empty; expected a non-empty string")
    if len(token) > _MAX_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
        # gRPC metadata values must be printable ASCII; the message must not repeat the token.
        raise ValueError(f"{where}: the token must be at most {_MAX_TOKEN_CHARS} printable ASCII characters "
                         "without spaces")
    return token


def write_token_file(path: str | os.PathLike, token: str | None = None) -> str:
    """Write ``token`` (a new one if None) to ``path`` with mode 0600, atomically; return the token.

    The file is created by its final name's temporary sibling with ``O_EXCL`` and mode 0600 from the
    start (so the token is never readable by others, not even briefly), fsynced, then renamed.
    """
    token = _check_token(generate_token() if token is None else token, where=f"token for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return token


def read_token_file(path: str | os.PathLike) -> str:
    """The token in ``path``; ValueError if the file is readable or writable by others than its owner
    (as ssh does with keys) or does not hold a valid token. The message never contains the token."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise ValueError(f"replay token file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"replay token file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ValueError(f"replay token file {path} has mode {stat.S_IMODE(st.st_mode):04o}; others may read it. "
                         f"Expected 0600 (chmod 600 {path})")
    if st.st_size > _MAX_TOKEN_CHARS + 2:
        raise ValueError(f"replay token file {path} has {st.st_size} bytes; expected a token of at most "
                         f"{_MAX_TOKEN_CHARS} characters")
    return _check_token(path.read_text(encoding="ascii", errors="replace").strip(), where=f"replay token file {path}")


def ensure_token_file(path: str | os.PathLike) -> str:
    """Read the token in ``path``, creating the file with a new token first if it does not exist (a new
    run creates it, a resumed run reads the same one)."""
    if not Path(path).exists():
        write_token_file(path)
    return read_token_file(path)


def metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata carrying ``token`` (None without one)."""
    return None if token is None else ((TOKEN_METADATA_KEY, _PREFIX + token),)


def _deny(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                  "this replay shard requires its run's token (metadata 'authorization: Bearer <token>'); "
                  "the call carried none or another one")


_DENY = grpc.unary_unary_rpc_method_handler(_deny, request_deserializer=None, response_serializer=None)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` with UNAUTHENTICATED (constant-time
    comparison, before anything is parsed); ``on_reject(method)`` counts refusals."""

    def __init__(self, token: str, *, exempt: Sequence[str] = _EXEMPT,
                 on_reject: Callable[[str], None] | None = None):
        self._expected = (_PREFIX + _check_token(token, where="replay server")).encode("ascii")
        self._exempt = tuple(exempt)
        self._on_reject = on_reject

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._exempt):
            return continuation(handler_call_details)
        supplied = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                supplied = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
                break
        if hmac.compare_digest(supplied, self._expected):
            return continuation(handler_call_details)
        if self._on_reject is not None:
            self._on_reject(method)
        return _DENY


def _read(path: str | os.PathLike | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


@dataclass(frozen=True, repr=False)
class ServerTls:
    """A shard's TLS material (PEM bytes): its certificate chain and key, and optionally the CA whose
    client certificates it requires."""

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None = None

    @classmethod
    def from_files(cls, cert_file, key_file, client_ca_file=None) -> ServerTls:
        return cls(_read(cert_file), _read(key_file), _read(client_ca_file))

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.client_ca_pem,
                                           require_client_auth=self.client_ca_pem is not None)

    def __repr__(self) -> str:   # never the key
        return f"ServerTls(client_auth={self.client_ca_pem is not None})"


@dataclass(frozen=True, repr=False)
class ClientTls:
    """What a client needs for TLS (PEM bytes, so that a pickled client works on any node): the CA that
    signed the shards' certificates, optionally a client certificate and key, and the name to verify
    (``server_name``, when the certificate does not name the address dialled)."""

    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(cls, ca_file, cert_file=None, key_file=None, *, server_name: str | None = None) -> ClientTls:
        return cls(_read(ca_file), _read(cert_file), _read(key_file), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)

    def options(self) -> list[tuple[str, str]]:
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]

    def __repr__(self) -> str:
        return f"ClientTls(server_name={self.server_name!r}, client_cert={self.cert_pem is not None})"
