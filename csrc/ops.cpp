// Operator schemas for every fused_bn op. Device kernels register elsewhere
// (csrc/cpu/, csrc/cuda/) with TORCH_LIBRARY_IMPL; fake kernels and autograd
// are registered from Python (fused_bn/_registration.py).
#include <Python.h>
#include <torch/library.h>

#include "common/epilogue.h"
#include "torch/checks.h"

#include <vector>

extern "C" {
// Importing fused_bn._C loads this shared object, which runs the static
// registrations below; the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_bn, m) {
  // Every op takes any memory layout it has kernels for (NCHW, channels_last,
  // channels_last_3d, and copies of others) and gives its outputs the layout
  // the fake kernels (fused_bn/_fake.py) give. An op whose only activation-
  // shaped argument is `input` says so with flexible_layout: Inductor then
  // leaves the strides it chose as they are. The others read their grad_output,
  // residual or output in the input's layout, which no tag can say: they carry
  // none, and fused_bn/_inductor.py registers that constraint with Inductor.
  const std::vector<at::Tag> flexible_layout{at::Tag::flexible_layout};
  // The epilogue every forward takes: y = act(batch_norm(input)) or, with a
  // residual (same shape and dtype as input), act(batch_norm(input) +
  // residual). `activation` is a name from csrc/common/activation.h's list
  // (FUSED_BN_ACTIVATIONS) and `activation_params` its parameters in that
  // activation's order (fused_bn/_activations.py is the one table of names
  // and parameters).
  //
  // Training forward: batch statistics, normalize + affine + epilogue, and
  // (when given) the running-statistics update and num_batches_tracked
  // increment, all in one op. momentum=None means the cumulative average
  // 1/num_batches_tracked. Returns (output, save_mean, save_invstd); the saved
  // statistics are float32 (float64 for float64 input) and feed
  // batch_norm_backward.
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float eps, "
      "str activation=\"identity\", float[] activation_params=[], Tensor? residual=None) "
      "-> (Tensor, Tensor, Tensor)");
  // Inference forward with the running statistics: one pass over memory.
  m.def(
      "batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor running_mean, Tensor running_var, float eps, "
      "str activation=\"identity\", float[] activation_params=[], Tensor? residual=None) -> Tensor");
  // Backward of either forward with its epilogue. `mean`/`invstd` are the
  // saved batch statistics (training=True) or the running mean and
  // 1/sqrt(running_var + eps) (training=False). An output whose mask entry is
  // false comes back as an empty tensor of shape [0]. eps is the forward's
  // (training only: a channel of two values needs it, see
  // common::two_values_grads). The activation's derivative (common::GradSource)
  // is taken from `output` (the forward's y) when it is given, else from
  // u = z (+ residual) recomputed from input with the forward's coefficients
  // (bias is the forward's). grad_residual, the activation's gradient g, is
  // written when a residual or output is given and the activation is not the
  // identity (whose residual gradient is grad_output itself); [0] otherwise.
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, "
      "Tensor mean, Tensor invstd, bool training, float eps, bool[3] output_mask, "
      "Tensor? bias=None, str activation=\"identity\", float[] activation_params=[], "
      "Tensor? residual=None, Tensor? output=None) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");

  // Whether the backward takes this activation's derivative from the
  // forward's output of dtype `dtype` (common::grad_from_output_allowed):
  // autograd then saves y instead of the residual.
  m.def("activation_grad_from_output(str activation, float[] activation_params, ScalarType dtype) -> bool",
        [](c10::string_view activation, at::ArrayRef<double> activation_params, at::ScalarType dtype) {
          const fused_bn::common::ActivationArgs args = fused_bn::parse_activation(activation, activation_params);
          return args.kind != fused_bn::common::Activation::kIdentity &&
                 fused_bn::common::grad_from_output_allowed(args, fused_bn::is_reduced_float(dtype));
        });

  // Data-parallel batch norm (FusedSyncBatchNorm2d) splits the training ops
  // around one collective each. Forward: batch_norm_stats gives this rank's
  // per-channel (count, mean, M2) as a [C, 3] float64 tensor (weight, bias and
  // running statistics are only checked, so bad calls fail before the
  // collective); the ranks' stats are all-gathered into [ranks, C, 3] and
  // batch_norm_train_with_stats merges them in rank order, then does what
  // batch_norm_train does after its statistics pass.
  m.def(
      "batch_norm_stats(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var) -> Tensor",
      flexible_layout);
  m.def(
      "batch_norm_train_with_stats(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float eps, Tensor all_stats, "
      "str activation=\"identity\", float[] activation_params=[], Tensor? residual=None) "
      "-> (Tensor, Tensor, Tensor)");
  // Backward: batch_norm_backward_sums gives this rank's [C, 3] float64
  // (Σg, Σg·(x − mean), Σ(x − mean): cpu::GradSums), the rank's own
  // grad_weight and grad_bias (param_mask) and, as batch_norm_backward does,
  // grad_residual = g where the epilogue has one; after an all_reduce of the
  // sums, batch_norm_backward_with_sums writes grad_input for `count` values
  // per channel over all ranks (a one-element float64 or int64 tensor on the
  // input's device: the gathered counts' sum, never read by the host). With a
  // residual, the caller passes g as grad_output and no activation.
  m.def(
      "batch_norm_backward_sums(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor invstd, bool[2] param_mask, Tensor? bias=None, str activation=\"identity\", "
      "float[] activation_params=[], Tensor? residual=None, Tensor? output=None) "
      "-> (Tensor sums, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  m.def(
      "batch_norm_backward_with_sums(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor invstd, Tensor sums, Tensor count, Tensor? bias=None, str activation=\"identity\", "
      "float[] activation_params=[]) -> Tensor");
}
