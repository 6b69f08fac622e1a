"""``python -m mtflow.sweeps ...`` is ``mtflow sweep ...`` without importing torch or Lightning until a command needs
them (the Slurm script records a failed task with it, even on a node whose environment is broken)."""

from mtflow.sweeps.cli import main

raise SystemExit(main())
