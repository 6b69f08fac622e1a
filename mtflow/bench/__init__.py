"""Benchmark support for ``tools/bench.py``: timing and memory helpers, the model passes an iteration cannot avoid,
an anchor-style naive training loop (the baseline mtflow is compared with) and the GPU FLOP projection."""
