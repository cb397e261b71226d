"""The command line's package boundary: building `plinth`'s parser and loading every client
command imports neither torch, diffusers nor the node library (so client commands start fast),
and every command is on the parser."""

from __future__ import annotations

import subprocess
import sys

COMMANDS = ["serve", "run", "nodes", "jobs", "models", "upload", "demo"]


def test_parser_and_client_commands_import_nothing_heavy():
    code = (
        "import sys\n"
        "from plinth.server.cli.main import parser\n"
        "import plinth.clients.cli.jobs, plinth.clients.cli.models, plinth.clients.cli.nodes\n"
        "import plinth.clients.cli.run, plinth.clients.cli.upload\n"
        "parser().parse_args(['jobs', 'list', '--server', '127.0.0.1:1'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')\n"
        "               or m.startswith('plinth.nodes'))\n"
        "assert not heavy, heavy[:5]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_help_lists_every_command():
    proc = subprocess.run(
        [sys.executable, "-m", "plinth.server.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert command in proc.stdout, f"{command} missing from plinth --help"


def test_a_client_command_without_server_says_so():
    proc = subprocess.run(
        [sys.executable, "-m", "plinth.server.cli", "jobs", "list"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "--server HOST:PORT is needed" in proc.stderr
