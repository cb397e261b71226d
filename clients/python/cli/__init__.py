"""The client commands of `plinth` (run, nodes, jobs, models, upload): one module per command,
beside the SDK they use. They import nothing of the server, the nodes, torch or diffusers
(tests/unit/test_cli_imports.py checks it), so they start fast. Where a command may run against a
server started in this process (no --server), the command line's main hands it that server's
client factory as `args.in_process` (plinth.server.cli.local.in_process_client)."""
