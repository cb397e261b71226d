"""`python -m plinth.server.cli`, the same as the `plinth` command."""

import sys

from plinth.server.cli.main import main

sys.exit(main())
