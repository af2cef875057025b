// The forwards' launchers: training (moments, finalize, normalize) and eval
// (normalize). The design is described in batch_norm_kernels.cuh.
#include "batch_norm_kernels.cuh"
#include "forward_kernels.cuh"
#include "launch.cuh"

#include <cstdint>

namespace fused_bn {
namespace cuda {

using namespace detail;

namespace {

template <typename acc_t>
struct ForwardWorkspace {
  int64_t* counter_snapshot;
  double* partial_mean;
  double* partial_m2;
  double* partial_count;
  acc_t* mean_hi;
  acc_t* mean_lo;
  acc_t* scale;
  acc_t* shift;
  size_t bytes;
};

template <typename acc_t>
ForwardWorkspace<acc_t> carve_forward_workspace(void* base, int64_t channels, int64_t splits) {
  WorkspaceCarver carver(base);
  ForwardWorkspace<acc_t> ws;
  ws.counter_snapshot = carver.take<int64_t>(1);
  ws.partial_mean = carver.take<double>(splits * channels);
  ws.partial_m2 = carver.take<double>(splits * channels);
  ws.partial_count = carver.take<double>(splits * channels);
  ws.mean_hi = carver.take<acc_t>(channels);
  ws.mean_lo = carver.take<acc_t>(channels);
  ws.scale = carver.take<acc_t>(channels);
  ws.shift = carver.take<acc_t>(channels);
  ws.bytes = carver.bytes();
  return ws;
}

// The moments pass runs with this plan; the workspace is sized by it.
template <typename scalar_t>
LaunchPlan moments_plan(const Geometry& g, const scalar_t* input) {
  const int vec = pick_vector_width<scalar_t>(g, {input});
  if (uses_staged_planes(g, vec)) {
    return make_staged_plan(g, resident_threads_per_multiprocessor<staged_moments_kernel<scalar_t>, kMaxThreads>());
  }
  return with_vector_width<scalar_t>(vec, [&](auto v) {
    constexpr int kVec = decltype(v)::value;
    return make_pass_plan<channels_first_moments_kernel<scalar_t, kVec>, channels_last_moments_kernel<scalar_t, kVec>>(
        g, vec);
  });
}

template <typename scalar_t, typename param_t>
LaunchPlan forward_moments_plan(const TrainForwardParams<scalar_t, param_t>& p) {
  return moments_plan(p.geometry, p.input);
}

// Moments pass (both layouts) into the workspace's partials, with the
// counter snapshot the finalize pass relies on (counter nullable).
template <typename scalar_t, typename acc_t>
cudaError_t launch_moments(const Geometry& g, const LaunchPlan& plan, const scalar_t* input, const int64_t* counter,
                           const ForwardWorkspace<acc_t>& ws, cudaStream_t stream) {
  if (plan.staged) {
    return launch_kernel<staged_moments_kernel<scalar_t>, kMaxThreads>(
        plan.grid, plan.block, stream, input, g, plan.work_per_split, ws.partial_mean, ws.partial_m2,
        ws.partial_count, counter, ws.counter_snapshot);
  }
  return with_vector_width<scalar_t>(plan, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    return launch_for_layout<channels_first_moments_kernel<scalar_t, kVec>,
                             channels_last_moments_kernel<scalar_t, kVec>>(
        g, plan, stream, input, g, plan.work_per_split, ws.partial_mean, ws.partial_m2, ws.partial_count, counter,
        ws.counter_snapshot);
  });
}

template <typename scalar_t, typename param_t>
cudaError_t launch_finalize(const FinalizeMomentsArgs<scalar_t, param_t>& args, cudaStream_t stream) {
  const int64_t finalize_blocks = ceil_div(args.channels, kFinalizeChannelsPerBlock);
  return launch_kernel<finalize_moments_kernel<scalar_t, param_t>, kFinalizeThreads>(
      dim3(static_cast<unsigned>(finalize_blocks)), dim3(kFinalizeThreads), stream, args);
}

// Whether the epilogue (activation, residual) normalizes with the saved
// statistics' coefficients (common::Epilogue::kCoefficientsFromSaved).
inline bool coefficients_from_saved(const common::ActivationArgs& activation, bool has_residual) {
  return common::with_epilogue(activation.kind, has_residual,
                               [](auto epilogue) { return decltype(epilogue)::kCoefficientsFromSaved; });
}

// The normalize pass under the epilogue of (activation, residual): one
// kernel per input dtype, layout, vector width and common::Epilogue of the list.
template <typename scalar_t>
cudaError_t launch_normalize(const Geometry& g, const scalar_t* input, const scalar_t* residual, scalar_t* output,
                             const common::ActivationArgs& activation,
                             const NormalizeCoefficients<acc_type<scalar_t>>& coefficients,
                             cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  return common::with_epilogue(activation.kind, residual != nullptr, [&](auto epilogue) {
    using Epi = decltype(epilogue);
    using A = typename Epi::Activation;
    const NormalizeArgs<acc_t, A> args{coefficients, ActivationParams<A, acc_t>::from(activation)};
    const int vec = pick_activation_vector_width<scalar_t, A>(g, {input, output, residual});
    return with_activation_vector_width<scalar_t, A>(vec, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      constexpr auto kChannelsFirst = channels_first_normalize_kernel<scalar_t, kVec, Epi>;
      constexpr auto kChannelsLast = channels_last_normalize_kernel<scalar_t, kVec, Epi>;
      const LaunchPlan plan = make_element_pass_plan<kChannelsFirst, kChannelsLast>(g, vec);
      return launch_for_layout<kChannelsFirst, kChannelsLast>(g, plan, stream, input, residual, output, g,
                                                              plan.work_per_split, args);
    });
  });
}

}  // namespace

template <typename scalar_t, typename param_t>
size_t train_forward_workspace_bytes(const TrainForwardParams<scalar_t, param_t>& params) {
  using acc_t = acc_type<scalar_t>;
  if (params.geometry.C == 0) return 0;
  const int64_t splits = params.gathered_moments != nullptr ? 0 : forward_moments_plan(params).splits;
  return carve_forward_workspace<acc_t>(nullptr, params.geometry.C, splits).bytes;
}

template <typename scalar_t, typename param_t>
cudaError_t launch_batch_norm_train_forward(const TrainForwardParams<scalar_t, param_t>& p,
                                            cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const Geometry& g = p.geometry;
  if (g.C == 0) {
    if (p.num_batches_tracked == nullptr) return cudaSuccess;
    return launch_kernel<increment_counter_kernel, 1>(dim3(1), dim3(1), stream, p.num_batches_tracked);
  }

  const bool gathered = p.gathered_moments != nullptr;
  const LaunchPlan plan = forward_moments_plan(p);
  const int64_t splits = gathered ? 0 : plan.splits;
  const ForwardWorkspace<acc_t> ws = carve_forward_workspace<acc_t>(p.workspace, g.C, splits);
  // Pass 1 also runs for an empty batch: its partials are empty and it takes
  // the counter snapshot the finalize pass relies on.
  cudaError_t err = cudaSuccess;
  if (!gathered) {
    err = launch_moments(g, plan, p.input, p.num_batches_tracked, ws, stream);
  } else if (p.num_batches_tracked != nullptr) {
    err = launch_kernel<snapshot_counter_kernel, 1>(dim3(1), dim3(1), stream, p.num_batches_tracked,
                                                    ws.counter_snapshot);
  }
  if (err != cudaSuccess) return err;

  FinalizeMomentsArgs<scalar_t, param_t> args;
  args.partial_mean = ws.partial_mean;
  args.partial_m2 = ws.partial_m2;
  args.partial_count = ws.partial_count;
  args.splits = splits;
  args.channels = g.C;
  args.count_per_channel = count_per_channel(g);
  args.input = p.input;
  args.first_element_stride = !g.channels_last ? g.HW : 1;
  args.weight = p.weight;
  args.bias = p.bias;
  args.running_mean = p.running_mean;
  args.running_var = p.running_var;
  args.counter = p.num_batches_tracked;
  args.counter_snapshot = ws.counter_snapshot;
  args.save_mean = p.save_mean;
  args.save_invstd = p.save_invstd;
  args.mean_hi = ws.mean_hi;
  args.mean_lo = ws.mean_lo;
  args.scale = ws.scale;
  args.shift = ws.shift;
  args.eps = p.eps;
  args.momentum = p.momentum;
  args.cumulative_momentum = p.cumulative_momentum;
  args.coefficients_from_saved = coefficients_from_saved(p.activation, p.residual != nullptr);
  args.gathered_moments = p.gathered_moments;
  args.ranks = p.ranks;
  err = launch_finalize(args, stream);
  if (err != cudaSuccess) return err;

  if (count_per_channel(g) == 0) return cudaSuccess;
  NormalizeCoefficients<acc_t> coefficients;
  coefficients.mean_hi = ws.mean_hi;
  coefficients.mean_lo = ws.mean_lo;
  coefficients.scale = ws.scale;
  coefficients.shift = ws.shift;
  return launch_normalize<scalar_t>(g, p.input, p.residual, p.output, p.activation, coefficients, stream);
}

template <typename scalar_t>
size_t stats_workspace_bytes(const StatsParams<scalar_t>& params) {
  using acc_t = acc_type<scalar_t>;
  if (params.geometry.C == 0) return 0;
  return carve_forward_workspace<acc_t>(nullptr, params.geometry.C, moments_plan(params.geometry, params.input).splits)
      .bytes;
}

// The training forward's first two passes, stopping at the channel's moments.
template <typename scalar_t>
cudaError_t launch_batch_norm_stats(const StatsParams<scalar_t>& p, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const Geometry& g = p.geometry;
  if (g.C == 0) return cudaSuccess;
  const LaunchPlan plan = moments_plan(g, p.input);
  const ForwardWorkspace<acc_t> ws = carve_forward_workspace<acc_t>(p.workspace, g.C, plan.splits);
  cudaError_t err = launch_moments(g, plan, p.input, static_cast<const int64_t*>(nullptr), ws, stream);
  if (err != cudaSuccess) return err;
  FinalizeMomentsArgs<scalar_t, float> args{};
  args.partial_mean = ws.partial_mean;
  args.partial_m2 = ws.partial_m2;
  args.partial_count = ws.partial_count;
  args.splits = plan.splits;
  args.channels = g.C;
  args.count_per_channel = count_per_channel(g);
  args.input = p.input;
  args.first_element_stride = !g.channels_last ? g.HW : 1;
  args.exchanged_moments = p.exchanged_moments;
  return launch_finalize(args, stream);
}

// Eval's workspace: the per-channel coefficients, as the training forward's.
template <typename acc_t>
NormalizeCoefficients<acc_t> carve_eval_workspace(void* base, int64_t channels, size_t* bytes) {
  WorkspaceCarver carver(base);
  NormalizeCoefficients<acc_t> k;
  k.mean_hi = carver.take<acc_t>(channels);
  k.mean_lo = carver.take<acc_t>(channels);
  k.scale = carver.take<acc_t>(channels);
  k.shift = carver.take<acc_t>(channels);
  if (bytes != nullptr) *bytes = carver.bytes();
  return k;
}

template <typename scalar_t, typename param_t>
size_t eval_forward_workspace_bytes(const EvalForwardParams<scalar_t, param_t>& params) {
  using acc_t = acc_type<scalar_t>;
  if (params.geometry.C == 0 || count_per_channel(params.geometry) == 0) return 0;
  size_t bytes = 0;
  carve_eval_workspace<acc_t>(nullptr, params.geometry.C, &bytes);
  return bytes;
}

template <typename scalar_t, typename param_t>
cudaError_t launch_batch_norm_eval_forward(const EvalForwardParams<scalar_t, param_t>& p,
                                           cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const Geometry& g = p.geometry;
  if (g.C == 0 || count_per_channel(g) == 0) return cudaSuccess;
  const NormalizeCoefficients<acc_t> coefficients = carve_eval_workspace<acc_t>(p.workspace, g.C, nullptr);
  EvalCoefficientsArgs<acc_t, param_t> args;
  args.channels = g.C;
  args.running_mean = p.running_mean;
  args.running_var = p.running_var;
  args.weight = p.weight;
  args.bias = p.bias;
  args.eps = p.eps;
  args.from_saved = coefficients_from_saved(p.activation, p.residual != nullptr);
  args.mean_hi = const_cast<acc_t*>(coefficients.mean_hi);
  args.mean_lo = const_cast<acc_t*>(coefficients.mean_lo);
  args.scale = const_cast<acc_t*>(coefficients.scale);
  args.shift = const_cast<acc_t*>(coefficients.shift);
  const cudaError_t err = launch_kernel<finalize_eval_coefficients_kernel<acc_t, param_t>, kFinalizeThreads>(
      dim3(static_cast<unsigned>(ceil_div(g.C, kFinalizeThreads))), dim3(kFinalizeThreads), stream, args);
  if (err != cudaSuccess) return err;
  return launch_normalize<scalar_t>(g, p.input, p.residual, p.output, p.activation, coefficients, stream);
}

#define FUSED_BN_INSTANTIATE(scalar_t, param_t) \
  template size_t train_forward_workspace_bytes<scalar_t, param_t>(const TrainForwardParams<scalar_t, param_t>&); \
  template cudaError_t launch_batch_norm_train_forward<scalar_t, param_t>(const TrainForwardParams<scalar_t, param_t>&, \
                                                                          cudaStream_t); \
  template size_t eval_forward_workspace_bytes<scalar_t, param_t>(const EvalForwardParams<scalar_t, param_t>&); \
  template cudaError_t launch_batch_norm_eval_forward<scalar_t, param_t>(const EvalForwardParams<scalar_t, param_t>&, \
                                                                         cudaStream_t);

FUSED_BN_CUDA_DTYPE_PAIRS(FUSED_BN_INSTANTIATE)

#define FUSED_BN_INSTANTIATE_STATS(scalar_t)                                                    \
  template size_t stats_workspace_bytes<scalar_t>(const StatsParams<scalar_t>&);                \
  template cudaError_t launch_batch_norm_stats<scalar_t>(const StatsParams<scalar_t>&, cudaStream_t);

FUSED_BN_INSTANTIATE_STATS(float)
FUSED_BN_INSTANTIATE_STATS(double)
FUSED_BN_INSTANTIATE_STATS(__half)
FUSED_BN_INSTANTIATE_STATS(__nv_bfloat16)

#undef FUSED_BN_INSTANTIATE_STATS

#undef FUSED_BN_INSTANTIATE

}  // namespace cuda
}  // namespace fused_bn
