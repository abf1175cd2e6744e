"""Fused inference kernels (Triton) and the fast runtime for MPS-CLIP."""

from mpsclip.kernels.g2a import FusedG2Adapter, g2a_adapter_forward
from mpsclip.kernels.maxsim import maxsim_topk, maxsim_topk_reference
from mpsclip.kernels.runtime import OptimizedCLIP, optimize

__all__ = [
    "FusedG2Adapter",
    "OptimizedCLIP",
    "g2a_adapter_forward",
    "maxsim_topk",
    "maxsim_topk_reference",
    "optimize",
]
