"""`python -m watcher` is the `productiv-watcher` command."""

import sys

from .cli import main

sys.exit(main())
