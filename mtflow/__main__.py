"""``python -m mtflow`` is the ``mtflow`` command (same exit statuses and one-line errors)."""

import sys

from mtflow.cli import console_main

sys.exit(console_main())
