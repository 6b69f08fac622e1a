"""``python -m mtflow`` is the ``mtflow`` command."""

from mtflow.cli import main

main()
