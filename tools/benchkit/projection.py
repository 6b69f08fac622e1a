"""The FLOP model and GPU projection live in the library (``mtflow.plan.flops``, used by ``mtflow check``); the
benchmark sections import them from here under their old names."""

from mtflow.plan.flops import (  # noqa: F401  (re-exported for benchkit.sections and tests/test_bench.py)
    FlopBreakdown,
    FluxArch,
    Hardware,
    IterationProjection,
    PaperSetting,
    Qwen3VLArch,
    T5Arch,
    counted_flux_flops,
    flux_forward_flops,
    flux_train_flops,
    project_iteration,
    qwen3vl_decode_flops,
    qwen3vl_image_tokens,
    qwen3vl_prefill_flops,
    rollout_storage_bytes,
    t5_encoder_flops,
)
