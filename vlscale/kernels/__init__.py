"""Fused kernels: the bottleneck adapter (reference, Triton forward/backward, dispatch)."""

from vlscale.kernels.adapter import (
    ACTIVATIONS,
    KernelConfig,
    adapter_reference,
    default_config,
    fused_adapter,
    select_backend,
)

__all__ = ["ACTIVATIONS", "KernelConfig", "adapter_reference", "default_config", "fused_adapter",
           "select_backend"]
