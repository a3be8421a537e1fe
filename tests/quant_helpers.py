"""Helpers shared by the quantization tests (small quantizers, Triton interpreter checks)."""
import torch


class ExactSTE(torch.autograd.Function):
    """Forward returns ``q`` exactly; backward passes the gradient to ``x`` unchanged (STE)."""

    @staticmethod
    def forward(ctx, x, q):
        return q.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


def skip_old_triton_interpreter() -> None:
    """Skip the calling test below Triton 3.8: Triton 3.6's interpreter fails on the fused
    kernels' loops over a runtime bound (seen on the GPU machine: "only 0-dimensional arrays
    can be converted to Python scalars"); the compiled kernels work there (GPU tests)."""
    import pytest
    import triton

    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run these kernels (needs 3.8+)")
