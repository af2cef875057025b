// Operator schemas for every fused_bn op. Device kernels register elsewhere
// (csrc/cpu/, csrc/cuda/) with TORCH_LIBRARY_IMPL; fake kernels and autograd
// are registered from Python (fused_bn/_registration.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fused_bn._C loads this shared object, which runs the static
// registrations below; the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_bn, m) {
  // Training forward: batch statistics, normalize + affine, and (when given)
  // the running-statistics update and num_batches_tracked increment, all in one
  // op. momentum=None means the cumulative average 1/num_batches_tracked.
  // Returns (output, save_mean, save_invstd); the saved statistics are float32
  // (float64 for float64 input) and feed batch_norm_backward.
  // relu=True returns relu(batch_norm(input)); with a residual (same shape and
  // dtype as input), relu(batch_norm(input) + residual).
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float eps, "
      "bool relu=False, Tensor? residual=None) -> (Tensor, Tensor, Tensor)");
  // Inference forward with the running statistics: one pass over memory
  // (relu and residual as in batch_norm_train).
  m.def(
      "batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor running_mean, Tensor running_var, float eps, "
      "bool relu=False, Tensor? residual=None) -> Tensor");
  // Backward of either forward. `mean`/`invstd` are the saved batch statistics
  // (training=True) or the running mean and 1/sqrt(running_var + eps)
  // (training=False). An output whose mask entry is false comes back as an
  // empty tensor of shape [0]. eps is the forward's (training only: a channel
  // of two values needs it, see cpu::two_values_backward).
  // relu=True: the backward of relu(batch_norm(input)); the ReLU's mask is
  // recomputed from input, mean, invstd, weight and the forward's bias.
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, "
      "Tensor mean, Tensor invstd, bool training, float eps, bool[3] output_mask, "
      "Tensor? bias=None, bool relu=False) -> (Tensor, Tensor, Tensor)");
  // Backward of relu(batch_norm(input) + residual), the ReLU's mask taken
  // from the forward's output. grad_residual is the masked grad_output.
  m.def(
      "batch_norm_add_relu_backward(Tensor grad_output, Tensor output, Tensor input, "
      "Tensor? weight, Tensor mean, Tensor invstd, bool training, float eps, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");

  // Data-parallel batch norm (FusedSyncBatchNorm2d) splits the training ops
  // around one collective each. Forward: batch_norm_stats gives this rank's
  // per-channel (count, mean, M2) as a [C, 3] float64 tensor (weight, bias and
  // running statistics are only checked, so bad calls fail before the
  // collective); the ranks' stats are all-gathered into [ranks, C, 3] and
  // batch_norm_train_with_stats merges them in rank order, then does what
  // batch_norm_train does after its statistics pass.
  m.def(
      "batch_norm_stats(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var) -> Tensor");
  m.def(
      "batch_norm_train_with_stats(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float eps, Tensor all_stats, "
      "bool relu=False) -> (Tensor, Tensor, Tensor)");
  // Backward: batch_norm_backward_sums gives this rank's [C, 3] float64
  // (Σdy, Σdy·(x − mean), Σ(x − mean): cpu::GradSums) and the rank's own grad_weight and grad_bias
  // (param_mask); after an all_reduce of the sums, batch_norm_backward_with_sums
  // writes grad_input for `count` values per channel over all ranks (a
  // one-element float64 or int64 tensor on the input's device: the gathered
  // counts' sum, never read by the host).
  m.def(
      "batch_norm_backward_sums(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor invstd, bool[2] param_mask, Tensor? bias=None, bool relu=False) "
      "-> (Tensor sums, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "batch_norm_backward_with_sums(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor invstd, Tensor sums, Tensor count, Tensor? bias=None, bool relu=False) -> Tensor");
}
