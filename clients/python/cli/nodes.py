"""`plinth nodes`: every node's schema, as the server validates with it (--markdown, the
docs table from this install's registry, is answered by the server side of the command line)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from google.protobuf.json_format import MessageToDict

from plinth.clients import PlinthError
from plinth.clients.cli.common import add_remote_flags, connect, refused


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("nodes", help="list the nodes and their schemas")
    add_remote_flags(p)
    p.add_argument("--json", action="store_true", help="an object keyed by class_type")
    p.add_argument("--markdown", action="store_true", help="the docs/nodes.md table, from this install's registry")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    try:
        with connect(args) as client:
            schemas = client.list_nodes()
    except PlinthError as exc:
        return refused(exc)
    if args.json:
        print(json.dumps({s.class_type: schema_json(s) for s in schemas}, indent=1))
        return 0
    for s in sorted(schemas, key=lambda s: (s.category, s.class_type)):
        ins = ", ".join(i.name for i in s.inputs)
        outs = ", ".join(o.type for o in s.outputs) or "(output node)"
        print(f"{s.category:<14} {s.class_type:<24} ({ins}) -> {outs}")
    return 0


def schema_json(schema: Any) -> dict[str, Any]:
    """A NodeSchema message as JSON, with each input's default decoded."""
    data = MessageToDict(schema, preserving_proto_field_name=True)
    for item in data.get("inputs", []):
        if "default_json" in item:
            item["default"] = json.loads(item.pop("default_json"))
    return data
