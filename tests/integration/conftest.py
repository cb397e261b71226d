"""The shared real server (tests/support/live_server.py): `server`, `client`, and an output
cache emptied before each module."""

from support.live_server import client, fresh_output_cache, server

__all__ = ["client", "fresh_output_cache", "server"]
