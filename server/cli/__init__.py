"""The `plinth` command line: main.py builds it from one module per command. The server-side
commands (serve, demo, models init, local listings, nodes --markdown) live here; the client
commands live beside the SDK in plinth.clients.cli and import neither torch nor the server."""
