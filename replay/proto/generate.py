"""Regenerate (or check) the Python modules for ``replay/proto/replay.proto``.

    python -m replay.proto.generate            # rewrite replay_pb2.py and replay_pb2_grpc.py
    python -m replay.proto.generate --check    # exit 1 (naming the stale files) if they are not current

protoc writes ``import replay_pb2 as replay__pb2`` into the gRPC module, which only works when
``replay/proto`` itself is on ``sys.path``; we rewrite it to a package-relative import so the modules
work as ``replay.proto.replay_pb2_grpc`` wherever the package is installed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "replay.proto"
# No .pyi: ruff would lint it (pyproject excludes only *_pb2*.py) and nothing here type-checks against it.
GENERATED = ("replay_pb2.py", "replay_pb2_grpc.py")

_ABSOLUTE_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def generate(*, out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc on ``proto_dir/replay.proto`` into ``out_dir``; return the generated files.

    Example: ``generate(out_dir=Path(tempfile.mkdtemp()))``.
    """
    from grpc_tools import protoc  # imported here: grpcio-tools is a dev dependency only

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto_dir / PROTO_FILE),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} on {proto_dir / PROTO_FILE}")
    grpc_module = out_dir / "replay_pb2_grpc.py"
    text = grpc_module.read_text()
    grpc_module.write_text(_ABSOLUTE_IMPORT.sub(r"from . import \1 as \2", text))
    return [out_dir / name for name in GENERATED]


def stale_files(*, proto_dir: Path = PROTO_DIR) -> list[str]:
    """Names of the committed generated files that differ from a fresh generation (empty = current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(out_dir=Path(tmp), proto_dir=proto_dir)
        stale = []
        for path in fresh:
            committed = proto_dir / path.name
            if not committed.exists() or committed.read_bytes() != path.read_bytes():
                stale.append(path.name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replay.proto.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the generated files are current")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated files in {PROTO_DIR}: {', '.join(stale)}; "
                  "run `python -m replay.proto.generate`", file=sys.stderr)
            return 1
        print("generated files are current")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(out_dir=Path(tmp)):
            shutil.copyfile(path, PROTO_DIR / path.name)
            print(f"wrote {PROTO_DIR / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
