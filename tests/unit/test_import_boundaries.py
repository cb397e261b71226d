"""The import rules of docs/architecture.md, checked on the source: every import statement in a
package's files (module level or inside a function, so a lazy import cannot slip past), compared
with what that package may not import.

- plinth.nodes imports neither the server nor the client: a node reaches the server only through
  the NodeContext protocol it is handed.
- plinth.clients imports neither torch (nor the libraries built on it) nor the server nor the
  nodes, so the SDK and the client commands install light and start fast.
- The server's core (engine, jobs, storage, model manager, config) is gRPC-free; only server/api,
  server/app.py and the command line speak gRPC.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# (files, forbidden module prefixes, why)
RULES = [
    (["nodes"], ["plinth.server", "plinth.clients"], "nodes reach the server only through NodeContext"),
    (
        ["clients/python"],
        ["torch", "torchvision", "diffusers", "transformers", "safetensors", "plinth.server", "plinth.nodes"],
        "the SDK and client commands stay light",
    ),
    (
        ["server/engine", "server/jobs", "server/storage", "server/model_manager.py", "server/config.py"],
        ["grpc", "google.rpc", "plinth.clients", "plinth.server.api", "plinth.server.app", "plinth.server.cli"],
        "the server's core is gRPC-free",
    ),
]


def _python_files(root: str) -> list[Path]:
    path = REPO / root
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    return [f for f in files if "/v1/" not in f.as_posix()]  # generated stubs import grpc by design


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _breaks(module: str, prefixes: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("roots, forbidden, why", RULES, ids=[r[0][0] for r in RULES])
def test_package_imports_only_what_it_may(roots: list[str], forbidden: list[str], why: str) -> None:
    files = [f for root in roots for f in _python_files(root)]
    assert files, f"no files under {roots}"
    broken = [
        f"{f.relative_to(REPO)}:{line} imports {module}"
        for f in files
        for line, module in imported_modules(f)
        if _breaks(module, forbidden)
    ]
    assert not broken, f"{why}:\n" + "\n".join(broken)


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from plinth.server.app import PlinthServer\n    import torch.nn\n")
    modules = [m for _, m in imported_modules(source)]
    assert modules == ["plinth.server.app", "torch.nn"]
    assert _breaks("torch.nn", ["torch"]) and not _breaks("torchvision", ["torch"])
