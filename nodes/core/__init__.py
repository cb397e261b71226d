"""What every node is built on: how a node declares itself (schema), what it may ask of the
server (context), the values flowing along links (types) and the table of all nodes (registry).

Kept apart from the node modules so that the node library's foundations are found in one
place and the nodes themselves read as declarations on top of them.
"""
