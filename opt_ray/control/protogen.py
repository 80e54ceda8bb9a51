"""Generate the gRPC stubs from ``protos/opt_ray/v1/*.proto`` into ``opt_ray/v1/``.

``make proto`` runs this; the stubs are committed, and a test regenerates them into a
temporary directory and compares, so a stale stub fails CI. The proto package
``opt_ray.v1`` maps to the Python package ``opt_ray.v1``, so generated imports resolve.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"


def generate(out_dir: Path = ROOT, only: list[str] | None = None) -> list[Path]:
    """Run protoc on every .proto (or on ``only``: names like ``control.proto``);
    returns the generated files (under ``out_dir``). Each proto's stubs depend on that
    proto alone, so regenerating one leaves the others' stubs untouched."""
    from grpc_tools import protoc
    import grpc_tools

    sources = sorted(PROTOS.rglob("*.proto"))
    if only:
        missing = set(only) - {s.name for s in sources}
        if missing:
            raise SystemExit(f"no such proto(s) under {PROTOS}: {', '.join(sorted(missing))}")
        sources = [s for s in sources if s.name in only]
    if not sources:
        raise SystemExit(f"no .proto files under {PROTOS}")
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
            *[str(s.relative_to(PROTOS)) for s in sources]]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: " + " ".join(args))
    gen = []
    for s in sources:
        stem = out_dir / s.relative_to(PROTOS).with_suffix("")
        gen += [stem.with_name(stem.name + suffix) for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return gen


if __name__ == "__main__":
    # `python -m opt_ray.control.protogen [control.proto ...]`: all protos by default.
    for p in generate(only=sys.argv[1:] or None):
        print(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
    sys.exit(0)
