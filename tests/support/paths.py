"""Where the tests find the repository's files and their own data, wherever a test module sits."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
GRAPHS = REPO / "graphs"
DATA = REPO / "tests" / "data"
