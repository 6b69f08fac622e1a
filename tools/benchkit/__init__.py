"""Benchmark machinery of ``tools/bench.py``; it lives with the tools and is not part of the mtflow wheel (the
library never imports it).

- ``timing``: wall times, line fits, peak-RSS probes, call counting;
- ``harness``: the tiny Kontext model and real RL iterations (``FlowRLModule`` in a Lightning ``Trainer``);
  ``recorder``: the per-iteration callback and the settings flipped between iterations; ``worker``: one
  measurement in a fresh process;
- ``passes``: the model passes one iteration cannot avoid and their cost measured alone;
- ``naive``: the anchor-style loop mtflow is compared with;
- ``projection``: the FLOP model and the GPU projection of the paper setting;
- ``report`` and ``context``: the Markdown report and the state its sections share; ``sections``: one module per
  section of the report.

``tools/bench.py`` finds this package next to itself; tests put ``tools/`` on ``sys.path`` (``tests/test_bench.py``).
"""
