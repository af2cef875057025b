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

// f(A{}, std::integral_constant<GradSource, s>{}) for the backward's
// activation and source (common::with_activation, common::with_grad_source:
// instantiated from FUSED_BN_ACTIVATIONS; a pair outside them aborts).
template <typename scalar_t, typename param_t, typename F>
decltype(auto) with_grad(const BackwardParams<scalar_t, param_t>& p, F&& f) {
  return common::with_activation(p.activation.kind, [&](auto activation) -> decltype(auto) {
    using A = decltype(activation);
    return common::with_grad_source<A>(p.source, [&](auto source) -> decltype(auto) { return f(activation, source); });
  });
}

// Whether the reduction pass writes g to grad_residual (kInputAndResidual, kOutput).
template <typename scalar_t, typename param_t>
bool writes_residual_grad(const BackwardParams<scalar_t, param_t>& p) {
  return with_grad(p, [](auto, auto source) { return common::kWritesResidualGrad<decltype(source)::value>; });
}

// The tensor the transform reads beside dy and x: the residual or y.
template <typename scalar_t, typename param_t>
const scalar_t* grad_aux(const BackwardParams<scalar_t, param_t>& p) {
  return p.source == GradSource::kOutput ? p.output : p.source == GradSource::kInputAndResidual ? p.residual : nullptr;
}

// The reduction pass runs unless all ranks' sums come in (global_sums): for
// training's dx and the parameter grads, for this rank's sums (local_sums),
// and for the sources whose reduction pass writes g.
template <typename scalar_t, typename param_t>
bool backward_needs_sums(const BackwardParams<scalar_t, param_t>& p) {
  if (p.global_sums != nullptr) return false;
  return (p.training && p.grad_input != nullptr) || p.grad_weight != nullptr || p.grad_bias != nullptr ||
         p.local_sums != nullptr || writes_residual_grad(p);
}

// The finalize pass runs when there are sums to finalize, or dx coefficients to set.
template <typename scalar_t, typename param_t>
bool backward_needs_finalize(const BackwardParams<scalar_t, param_t>& p) {
  return backward_needs_sums(p) || p.grad_input != nullptr;
}

// The reduction pass runs with this plan; the workspace is sized by it.
template <typename scalar_t, typename param_t>
LaunchPlan backward_sums_plan(const BackwardParams<scalar_t, param_t>& p) {
  return with_grad(p, [&](auto activation, auto source) {
    using A = decltype(activation);
    constexpr GradSource kSource = decltype(source)::value;
    const int vec = pick_activation_vector_width<scalar_t, A>(
        p.geometry, {p.input, p.grad_output, grad_aux(p), p.grad_residual});
    if constexpr (kStagedGradSums<scalar_t, A, kSource>) {
      if (uses_staged_planes(p.geometry, vec)) {
        return make_staged_plan(p.geometry,
                                resident_threads_per_multiprocessor<staged_grad_sums_kernel<scalar_t, A, kSource>,
                                                                    kMaxThreads>());
      }
    }
    return with_activation_vector_width<scalar_t, A>(vec, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      return make_pass_plan<channels_first_grad_sums_kernel<scalar_t, kVec, A, kSource>,
                            channels_last_grad_sums_kernel<scalar_t, kVec, A, kSource>>(p.geometry, vec);
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
    return with_grad(p, [&](auto activation, auto source) {
      using A = decltype(activation);
      constexpr GradSource kSource = decltype(source)::value;
      return launch_kernel<two_values_backward_kernel<scalar_t, param_t, A, kSource>, kFinalizeThreads>(
          dim3(static_cast<unsigned>(ceil_div(g.C, kFinalizeThreads))), dim3(kFinalizeThreads), stream, p);
    });
  }

  const LaunchPlan sums_plan = backward_sums_plan(p);
  const int64_t splits = needs_sums ? sums_plan.splits : 0;
  const BackwardWorkspace<acc_t> ws = carve_backward_workspace<acc_t>(p.workspace, g.C, splits);
  // Outside the anonymous namespace's types: the lambdas below go to common::.
  const GradPartials partials = ws.partials;
  const GradInputCoefficients<acc_t> dx_coefficients = ws.coefficients;
  if (needs_sums) {
    // Also runs for an empty batch, leaving zero sums.
    const cudaError_t err = with_grad(p, [&](auto activation, auto source) {
      using A = decltype(activation);
      constexpr GradSource kSource = decltype(source)::value;
      GradSumsArgs<scalar_t, A> sums_args;
      sums_args.source.mean = p.mean;
      sums_args.source.invstd = p.invstd;
      sums_args.source.weight = ParamArray<scalar_t>::of(p.weight);
      sums_args.source.bias = ParamArray<scalar_t>::of(p.bias);
      sums_args.source.params = ActivationParams<A, acc_t>::from(p.activation);
      sums_args.aux = grad_aux(p);
      sums_args.grad_residual = p.grad_residual;
      sums_args.partials = partials;
      if constexpr (kStagedGradSums<scalar_t, A, kSource>) {
        if (sums_plan.staged) {
          return launch_kernel<staged_grad_sums_kernel<scalar_t, A, kSource>, kMaxThreads>(
              sums_plan.grid, sums_plan.block, stream, p.grad_output, p.input, g, sums_plan.work_per_split, sums_args);
        }
      }
      return with_activation_vector_width<scalar_t, A>(sums_plan.vec, [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        return launch_for_layout<channels_first_grad_sums_kernel<scalar_t, kVec, A, kSource>,
                                 channels_last_grad_sums_kernel<scalar_t, kVec, A, kSource>>(
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
  args.bias = p.source == GradSource::kInput ? p.bias : nullptr;
  args.local_sums = p.local_sums;
  args.global_sums = p.global_sums;
  args.global_count = p.global_count;
  const int64_t finalize_blocks = ceil_div(g.C, kFinalizeChannelsPerBlock);
  const cudaError_t err = launch_kernel<finalize_grad_kernel<scalar_t, param_t>, kFinalizeThreads>(
      dim3(static_cast<unsigned>(finalize_blocks)), dim3(kFinalizeThreads), stream, args);
  if (err != cudaSuccess) return err;

  if (p.grad_input == nullptr || count_per_channel(g) == 0) return cudaSuccess;
  // The sources whose reduction pass wrote g: the dx pass reads that g as dy,
  // under (Identity, kNone).
  const bool reads_g = writes_residual_grad(p);
  const scalar_t* dx_grad = reads_g ? p.grad_residual : p.grad_output;
  const bool reads_x = p.training || (!reads_g && p.source == GradSource::kInput);
  return with_grad(p, [&](auto activation, auto source) {
    constexpr GradSource kSource = decltype(source)::value;
    constexpr bool kTransforms = kSource == GradSource::kInput;
    // (A, kInput) as given; everything else is g = dy under the identity.
    using A = std::conditional_t<kTransforms, decltype(activation), common::Identity>;
    constexpr GradSource kDxSource = kTransforms ? GradSource::kInput : GradSource::kNone;
    const GradInputArgs<acc_t, A> args_dx{p.mean, dx_coefficients, ActivationParams<A, acc_t>::from(p.activation)};
    const int vec = reads_x ? pick_activation_vector_width<scalar_t, A>(g, {dx_grad, p.input, p.grad_input})
                            : pick_activation_vector_width<scalar_t, A>(g, {dx_grad, p.grad_input});
    return with_activation_vector_width<scalar_t, A>(vec, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      auto launch = [&](auto training) {
        constexpr bool kTraining = decltype(training)::value;
        constexpr auto kChannelsFirst = channels_first_grad_input_kernel<scalar_t, kVec, kTraining, A, kDxSource>;
        constexpr auto kChannelsLast = channels_last_grad_input_kernel<scalar_t, kVec, kTraining, A, kDxSource>;
        const LaunchPlan plan = make_element_pass_plan<kChannelsFirst, kChannelsLast>(g, vec);
        return launch_for_layout<kChannelsFirst, kChannelsLast>(g, plan, stream, dx_grad, p.input, p.grad_input, g,
                                                                plan.work_per_split, args_dx);
      };
      return p.training ? launch(std::true_type{}) : launch(std::false_type{});
    });
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
