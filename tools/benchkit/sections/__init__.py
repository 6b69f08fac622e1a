"""The sections of ``tools/bench.py``'s report, in the order they are measured: GRPO full SDE vs window vs NFT
(``loss_modes``), framework overhead (``overhead``), mtflow vs the anchor-style loop (``naive_vs_batched``),
optimisations (``optimisations``), cost growth in G, T and K (``growth``), the targets and findings (``summary``) and
the GPU projection (``gpu_projection``)."""
