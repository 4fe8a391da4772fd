"""Small layers megatron-core lacks without Transformer Engine."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule


class ReplicatedLinear(MegatronModule):
    """A linear layer whose full weight lives on every tensor-parallel rank.

    MLA's down projections (hidden -> q/kv latent) are small and feed a layer norm over the whole
    latent, so they are replicated rather than split (Transformer Engine calls this the
    'duplicated' parallel mode). Their input is replicated and the gradient of their output is
    already summed over tensor-parallel ranks by the column-parallel up projection (or by an
    explicit copy_to_tensor_model_parallel_region), so the weight gradient is identical on every
    rank and needs no extra reduction. Returns (output, bias) like megatron's linears.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = False, **_):
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        init_method(self.weight)
        self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype)) if bias else None

    def forward(self, x: torch.Tensor):
        return F.linear(x, self.weight, self.bias), None


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the tensor-parallel group.

    megatron-core's copy_to_tensor_model_parallel_region does the same, but all-reduces
    `grad.contiguous()` and returns the original tensor: for a non-contiguous gradient (a transposed
    or expanded use, as in attention) the sum lands in a temporary and is lost. We make the gradient
    contiguous first.
    """

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        from megatron.core import parallel_state

        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return grad
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad


def sum_gradient_over_tp(x: torch.Tensor) -> torch.Tensor:
    """Mark a TP-replicated tensor that rank-local heads consume: its gradient is summed over ranks."""
    return _SumGradOverTP.apply(x)
