"""Generate the Python stubs in clients/python/v1 from protos/plinth/v1/*.proto.

Run from anywhere: `python protos/generate.py` (needs the `dev` extra for grpcio-tools).
`--check` exits non-zero when the committed stubs differ from what the .proto files give,
which is what the test suite runs.

protoc names generated modules after the proto package (`plinth.v1`), but the SDK ships them
as `plinth.clients.v1`; the imports are rewritten accordingly so the stubs live inside the
client package without a top-level `plinth.v1` of their own.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
STUB_DIR = PROTO_ROOT.parent / "clients" / "python" / "v1"
IMPORT_RE = re.compile(r"^from plinth\.v1 import", re.MULTILINE)


def generate() -> dict[str, str]:
    """Return {file name: text} of the stubs the .proto files generate."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "plinth" / "v1").glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as out:
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                *protos,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        files = {}
        for path in sorted((Path(out) / "plinth" / "v1").iterdir()):
            files[path.name] = IMPORT_RE.sub("from plinth.clients.v1 import", path.read_text())
    files["__init__.py"] = '"""Generated gRPC stubs of protos/plinth/v1 (python protos/generate.py)."""\n'
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    files = generate()
    if args.check:
        present = {p.name for p in STUB_DIR.glob("*.py*")} if STUB_DIR.exists() else set()
        stale = sorted(
            n for n, text in files.items() if not (STUB_DIR / n).exists() or (STUB_DIR / n).read_text() != text
        )
        extra = sorted(present - set(files))
        if stale or extra:
            print(f"stubs out of date: differ {stale}, not generated {extra}; run python protos/generate.py")
            return 1
        return 0
    STUB_DIR.mkdir(parents=True, exist_ok=True)
    for name in set(p.name for p in STUB_DIR.glob("*.py*")) - set(files):
        (STUB_DIR / name).unlink()
    for name, text in files.items():
        (STUB_DIR / name).write_text(text)
    print(f"wrote {len(files)} files to {STUB_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
