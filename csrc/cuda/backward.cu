// The backward's launcher: grad sums, finalize, grad input (or the
// two-values closed form). The design is described in batch_norm_kernels.cuh.
#include "backward_kernels.cuh"
#include "batch_norm_kernels.cuh"
#include "launch.cuh"

#include <cstdint>
#include <type_traits>

namespace fused_bn {
namespace cuda {

using namespace detail;

namespace {

template <typename acc_t>
struct BackwardWorkspace {
  GradPartials partials;
  GradInputCoefficients<acc_t> coefficients;
  size_t bytes;
};

template <typename acc_t>
BackwardWorkspace<acc_t> carve_backward_workspace(void* base, int64_t channels, int64_t splits) {
  WorkspaceCarver carver(base);
  BackwardWorkspace<acc_t> ws;
  ws.partials.sum_dy = carver.take<double>(splits * channels);
  ws.partials.sum_dy_xmu = carver.take<double>(splits * channels);
  ws.partials.sum_xmu = carver.take<double>(splits * channels);
  ws.coefficients.scale = carver.take<acc_t>(channels);
  ws.coefficients.projection = carver.take<acc_t>(channels);
  ws.coefficients.shift = carver.take<acc_t>(channels);
  ws.coefficients.forward_shift = carver.take<acc_t>(channels);
  ws.bytes = carver.bytes();
  return ws;
}

// The reduction pass runs unless all ranks' sums come in (global_sums): for
// training's dx and the parameter grads, for this rank's sums (local_sums),
// and for kReluOfOutput, whose reduction pass writes g.
template <typename scalar_t, typename param_t>
bool backward_needs_sums(const BackwardParams<scalar_t, param_t>& p) {
  if (p.global_sums != nullptr) return false;
  return (p.training && p.grad_input != nullptr) || p.grad_weight != nullptr || p.grad_bias != nullptr ||
         p.local_sums != nullptr || p.mask == GradMask::kReluOfOutput;
}

// The finalize pass runs when there are sums to finalize, or dx coefficients to set.
template <typename scalar_t, typename param_t>
bool backward_needs_finalize(const BackwardParams<scalar_t, param_t>& p) {
  return backward_needs_sums(p) || p.grad_input != nullptr;
}

// The reduction pass runs with this plan; the workspace is sized by it.
template <typename scalar_t, typename param_t>
LaunchPlan backward_sums_plan(const BackwardParams<scalar_t, param_t>& p) {
  const int vec = pick_vector_width<scalar_t>(p.geometry, {p.input, p.grad_output, p.output, p.grad_residual});
  return with_grad_mask(p.mask, [&](auto kind) {
    constexpr GradMask kMask = decltype(kind)::value;
    return with_vector_width<scalar_t>(vec, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      return make_pass_plan<channels_first_grad_sums_kernel<scalar_t, param_t, kVec, kMask>,
                            channels_last_grad_sums_kernel<scalar_t, param_t, kVec, kMask>>(p.geometry, vec);
    });
  });
}

}  // namespace

template <typename scalar_t, typename param_t>
size_t backward_workspace_bytes(const BackwardParams<scalar_t, param_t>& params) {
  using acc_t = acc_type<scalar_t>;
  if (params.geometry.C == 0) return 0;
  const int64_t splits = backward_needs_sums(params) ? backward_sums_plan(params).splits : 0;
  return carve_backward_workspace<acc_t>(nullptr, params.geometry.C, splits).bytes;
}

template <typename scalar_t, typename param_t>
cudaError_t launch_batch_norm_backward(const BackwardParams<scalar_t, param_t>& p, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const Geometry& g = p.geometry;
  const bool needs_sums = backward_needs_sums(p);
  if (g.C == 0 || !backward_needs_finalize(p)) return cudaSuccess;
  const bool exchanges = p.local_sums != nullptr || p.global_sums != nullptr;
  if (p.training && !exchanges && count_per_channel(g) == 2) {
    return with_grad_mask(p.mask, [&](auto kind) {
      return launch_kernel<two_values_backward_kernel<scalar_t, param_t, decltype(kind)::value>, kFinalizeThreads>(
          dim3(static_cast<unsigned>(ceil_div(g.C, kFinalizeThreads))), dim3(kFinalizeThreads), stream, p);
    });
  }

  const LaunchPlan sums_plan = backward_sums_plan(p);
  const int64_t splits = needs_sums ? sums_plan.splits : 0;
  const BackwardWorkspace<acc_t> ws = carve_backward_workspace<acc_t>(p.workspace, g.C, splits);
  if (needs_sums) {
    GradSumsArgs<scalar_t, param_t> sums_args;
    sums_args.mask = GradMaskSource<acc_t, param_t>{p.mean, p.invstd, p.weight, p.bias};
    sums_args.output = p.output;
    sums_args.grad_residual = p.grad_residual;
    sums_args.partials = ws.partials;
    // Also runs for an empty batch, leaving zero sums.
    const cudaError_t err = with_grad_mask(p.mask, [&](auto kind) {
      constexpr GradMask kMask = decltype(kind)::value;
      return with_vector_width<scalar_t>(sums_plan, [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        return launch_for_layout<channels_first_grad_sums_kernel<scalar_t, param_t, kVec, kMask>,
                                 channels_last_grad_sums_kernel<scalar_t, param_t, kVec, kMask>>(
            g, sums_plan, stream, p.grad_output, p.input, g, sums_plan.work_per_split, sums_args);
      });
    });
    if (err != cudaSuccess) return err;
  }

  FinalizeGradArgs<scalar_t, param_t> args;
  args.partials = ws.partials;
  args.splits = splits;
  args.channels = g.C;
  args.count_per_channel = count_per_channel(g);
  args.weight = p.weight;
  args.invstd = p.invstd;
  args.training = p.training;
  args.grad_weight = p.grad_weight;
  args.grad_bias = p.grad_bias;
  args.coefficients = ws.coefficients;
  args.bias = p.mask == GradMask::kReluOfInput ? p.bias : nullptr;
  args.local_sums = p.local_sums;
  args.global_sums = p.global_sums;
  args.global_count = p.global_count;
  const int64_t finalize_blocks = ceil_div(g.C, kFinalizeChannelsPerBlock);
  const cudaError_t err = launch_kernel<finalize_grad_kernel<scalar_t, param_t>, kFinalizeThreads>(
      dim3(static_cast<unsigned>(finalize_blocks)), dim3(kFinalizeThreads), stream, args);
  if (err != cudaSuccess) return err;

  if (p.grad_input == nullptr || count_per_channel(g) == 0) return cudaSuccess;
  // kReluOfOutput's dx reads the g its reduction pass wrote, unmasked.
  const bool reads_g = p.mask == GradMask::kReluOfOutput;
  const scalar_t* dx_grad = reads_g ? p.grad_residual : p.grad_output;
  const GradMask dx_mask = reads_g ? GradMask::kNone : p.mask;
  const GradInputArgs<acc_t> args_dx{p.mean, ws.coefficients};
  const bool reads_x = p.training || dx_mask == GradMask::kReluOfInput;
  const int vec = reads_x ? pick_vector_width<scalar_t>(g, {dx_grad, p.input, p.grad_input})
                          : pick_vector_width<scalar_t>(g, {dx_grad, p.grad_input});
  return with_vector_width<scalar_t>(vec, [&](auto v) {
    constexpr int kVec = decltype(v)::value;
    auto launch = [&](auto training, auto kind) {
      constexpr bool kTraining = decltype(training)::value;
      constexpr GradMask kMask = decltype(kind)::value;
      constexpr auto kChannelsFirst = channels_first_grad_input_kernel<scalar_t, kVec, kTraining, kMask>;
      constexpr auto kChannelsLast = channels_last_grad_input_kernel<scalar_t, kVec, kTraining, kMask>;
      const LaunchPlan plan = make_pass_plan<kChannelsFirst, kChannelsLast>(g, vec);
      return launch_for_layout<kChannelsFirst, kChannelsLast>(g, plan, stream, dx_grad, p.input, p.grad_input, g,
                                                              plan.work_per_split, args_dx);
    };
    using None = std::integral_constant<GradMask, GradMask::kNone>;
    using ReluOfInput = std::integral_constant<GradMask, GradMask::kReluOfInput>;
    if (dx_mask == GradMask::kReluOfInput) {
      return p.training ? launch(std::true_type{}, ReluOfInput{}) : launch(std::false_type{}, ReluOfInput{});
    }
    return p.training ? launch(std::true_type{}, None{}) : launch(std::false_type{}, None{});
  });
}

#define FUSED_BN_INSTANTIATE(scalar_t, param_t) \
  template size_t backward_workspace_bytes<scalar_t, param_t>(const BackwardParams<scalar_t, param_t>&); \
  template cudaError_t launch_batch_norm_backward<scalar_t, param_t>(const BackwardParams<scalar_t, param_t>&, \
                                                                     cudaStream_t);

FUSED_BN_CUDA_DTYPE_PAIRS(FUSED_BN_INSTANTIATE)

#undef FUSED_BN_INSTANTIATE

}  // namespace cuda
}  // namespace fused_bn
