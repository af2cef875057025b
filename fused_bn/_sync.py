"""Batch norm with statistics synchronised over a ``torch.distributed`` process group.

Each training step exchanges C-sized statistics only, one collective each way:

* forward: ``batch_norm_stats`` (this rank's per-channel count, mean and M2, one read of
  the input) -> ``all_gather`` of those ``[C, 3]`` float64 tensors ->
  ``batch_norm_train_with_stats`` (merges the ranks' moments in rank order, updates the
  running statistics, normalizes: one read, one write). Every rank merges the same gathered
  tensor in the same order, so every rank gets bit-identical statistics and running
  statistics, whatever its own batch size (0 included).
* backward: ``batch_norm_backward_sums`` (this rank's Σdy, Σdy·(x − mean) and Σ(x − mean), and its own
  share of grad_weight/grad_bias, which data-parallel training sums across ranks) ->
  ``all_reduce`` of the ``[C, 3]`` sums -> ``batch_norm_backward_with_sums`` (dx).

The collectives are backend-agnostic (gloo for CPU tensors, NCCL for CUDA tensors), and
the four ops have CPU and CUDA kernels. Nothing here reads a device value on the host:
the global count stays on the device for the backward (nn.SyncBatchNorm instead masks
empty ranks on the host), so a synchronised training step can be captured in a CUDA
graph. The one exception is nn's error for a global batch of one value per channel:
a rank holding at most one value per channel reads the gathered count to tell.
"""
import torch
import torch.distributed as dist

from . import _activations
from ._extension import ops


# torch 2.13 renamed all_gather_into_tensor (now deprecated); older releases
# have only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _values_per_channel_message(size):
    return f"Expected more than 1 value per channel when training, got input size {size}"


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, activation, residual, process_group, world_size):
        stats = ops.batch_norm_stats(input, weight, bias, running_mean, running_var)
        # Gathered as the ranks' [C, 3] blocks end to end (the output layout
        # gloo and NCCL both take), viewed as [ranks, C, 3].
        all_stats = stats.new_empty((world_size * stats.shape[0], stats.shape[1]))
        _all_gather_single(all_stats, stats, group=process_group)
        all_stats = all_stats.view(world_size, *stats.shape)
        # Every channel has the same count; every rank sees the same total,
        # kept on the device (batch_norm_backward_with_sums reads it there).
        count = all_stats[:, :1, 0].sum()
        local_count = input.numel() // input.size(1) if input.size(1) else 0
        if local_count <= 1 and int(count.item()) == 1:
            # What nn.BatchNorm2d raises for the global batch. A global count
            # of 1 leaves every rank at most one value, so every rank reads it
            # and raises, before any state changes.
            raise ValueError(_values_per_channel_message(input.size()))
        output, mean, invstd = ops.batch_norm_train_with_stats(
            input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
            all_stats, activation.name, list(activation.params), residual)
        # As the single-process autograd saves (fused_bn/_autograd.py): y where
        # the activation's derivative comes from it, else the residual.
        from_output = (residual is not None and not activation.is_identity
                       and _activations.grad_from_output(activation, output.dtype))
        saved_residual = residual if residual is not None and not activation.is_identity and not from_output else None
        ctx.save_for_backward(input, weight, bias, mean, invstd, saved_residual, output if from_output else None)
        ctx.activation = activation
        ctx.has_residual = residual is not None
        ctx.count = count
        ctx.process_group = process_group
        ctx.param_dtypes = (None if weight is None else weight.dtype,
                            None if bias is None else bias.dtype)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, mean, invstd, residual, output = ctx.saved_tensors
        activation = ctx.activation
        needs_weight = weight is not None and ctx.needs_input_grad[1]
        needs_bias = ctx.param_dtypes[1] is not None and ctx.needs_input_grad[2]
        sums, grad_weight, grad_bias, g = ops.batch_norm_backward_sums(
            grad_output, input, weight, mean, invstd, [needs_weight, needs_bias], bias,
            activation.name, list(activation.params), residual, output)
        # With a residual the reduction pass wrote the activation's g, which the
        # dx pass then reads in place of grad_output (the identity's g is
        # grad_output itself).
        if ctx.has_residual and not activation.is_identity:
            dx_args = (g, None, "identity", [])
        else:
            g = grad_output
            dx_args = (grad_output, bias, activation.name, list(activation.params))
        grad_input = None
        if ctx.needs_input_grad[0]:
            dist.all_reduce(sums, group=ctx.process_group)
            dy, dx_bias, name, params = dx_args
            grad_input = ops.batch_norm_backward_with_sums(
                dy, input, weight, mean, invstd, sums, ctx.count, dx_bias, name, params)
        # Without a weight the op returns the accumulation dtype; a bias of its
        # own dtype gets its gradient in that dtype.
        if needs_bias and grad_bias.dtype != ctx.param_dtypes[1]:
            grad_bias = grad_bias.to(ctx.param_dtypes[1])
        grad_residual = g if ctx.has_residual and ctx.needs_input_grad[9] else None
        return (grad_input, grad_weight if needs_weight else None, grad_bias if needs_bias else None,
                None, None, None, None, None, None, grad_residual, None, None)


def sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                    num_batches_tracked, activation, residual, process_group, world_size):
    """Training ``activation(batch_norm(input) [+ residual])`` over the batches
    of every rank in ``process_group`` (``world_size`` ranks); ``activation``
    a fused_bn._activations.Activation. Every rank must call it, in the same order."""
    return _SyncBatchNorm.apply(input, weight, bias, running_mean, running_var,
                                num_batches_tracked, momentum, eps, activation, residual,
                                process_group, world_size)
