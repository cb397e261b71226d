"""`plinth jobs list|get|cancel`: the jobs of a running server."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from google.protobuf.json_format import MessageToDict

from plinth.clients import PlinthError
from plinth.clients.cli.common import add_remote_flags, connect, refused, usage


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("jobs", help="list, show or cancel jobs on a server")
    p.add_argument("action", choices=["list", "get", "cancel"])
    p.add_argument("job_id", nargs="?", help="for get and cancel")
    p.add_argument("--status", action="append", default=[], help="list: only these statuses (repeatable)")
    p.add_argument("--limit", type=int, default=20, help="list: how many, newest first (default: 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_remote_flags(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.job_id:
        print(f"plinth jobs {args.action}: a job id is needed", file=sys.stderr)
        return 2
    if not args.server:
        print("plinth jobs: --server HOST:PORT is needed (jobs live in a running server)", file=sys.stderr)
        return 2
    try:
        with connect(args) as client:
            if args.action == "list":
                jobs = list(client.list_jobs(statuses=args.status, page_size=args.limit).jobs)
            elif args.action == "get":
                jobs = [client.get_job(args.job_id)]
            else:
                jobs = [client.cancel(args.job_id)]
    except PlinthError as exc:
        return refused(exc)
    except KeyError as exc:  # a --status the wire does not know
        return usage(f"unknown status {exc}")
    if args.json:
        found = [MessageToDict(j, preserving_proto_field_name=True) for j in jobs]
        print(json.dumps(found if args.action == "list" else found[0]))
        return 0
    for job in jobs:
        status = job.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[job.status].name
        status = status.removeprefix("JOB_STATUS_").lower()
        print(f"{job.job_id}  {status:<9}  {len(job.outputs)} output(s)  {job.error}".rstrip())
    return 0
