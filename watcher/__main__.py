"""`python -m watcher` is the `productiv-watcher` command."""

import sys

from .commands.cli import main

sys.exit(main())
