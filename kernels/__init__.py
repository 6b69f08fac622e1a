"""Fused Triton kernels with torch references (imported as ``mtflow.kernels``)."""
