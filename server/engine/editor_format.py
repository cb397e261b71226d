"""The words of the editor's workflow files (LiteGraph's) that the converters act on.

Shared by workflow.py, which converts a workflow to the API format, and subgraphs.py, which
first expands the subgraphs in it: node modes, the node types that exist only in the editor,
and the ids of a subgraph's boundary nodes.
"""

from __future__ import annotations

# LiteGraph node modes: 2 is "never" (ComfyUI's mute), 4 is ComfyUI's bypass.
MUTED = 2
BYPASSED = 4

NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
# Nodes that exist only in the editor: the export dissolves them instead of sending them.
EDITOR_ONLY_TYPES = NOTE_TYPES | {REROUTE, PRIMITIVE}

# Inside a subgraph definition, links from the subgraph's inputs start at its input node and
# links to its outputs end at its output node; the editor gives them these ids (a definition's
# "inputNode"/"outputNode" say which it used).
SUBGRAPH_INPUT_ID = -10
SUBGRAPH_OUTPUT_ID = -20
