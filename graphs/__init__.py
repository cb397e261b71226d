"""Saved workflows in ComfyUI's API format, shipped with the package (see graphs/README.md)."""

from importlib import resources


def read(name: str) -> str:
    """The text of a saved graph, e.g. read("txt2img.json")."""
    return resources.files(__name__).joinpath(name).read_text()
