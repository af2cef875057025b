// Batch-norm CUDA kernels on raw pointers: no torch headers, so this layer
// compiles (and is checked with ptxas, `make cuda-check`) on its own. The torch
// glue (batch_norm_cuda.cpp) validates, allocates and fills the params below.
//
// Files: this header (params and launchers, the public interface);
// device_primitives.cuh (constants, conversions, bundles), reductions.cuh (warp
// -> block -> column merges and sums), traversals.cuh; forward_kernels.cuh and
// backward_kernels.cuh (the kernels of each pass family); launch.cuh (vector
// width, grid plans, the layout x vector-width switch); forward.cu and
// backward.cu (the launchers, one translation unit each, built in parallel).
//
// Layouts. Every input is seen as N x C x HW, either channels-first (NCHW
// contiguous, also 3-D/5-D contiguous input) or channels-last (NHWC: N*HW rows
// of C channels; also any input with HW == 1). Each layout has its own kernels.
//
// Memory traffic per op (x, dy read; y, dx written), three launches each:
//   training forward : moments   reads x once (Welford, per-block partials)
//                      finalize  per-channel only (partials, running stats)
//                      normalize reads x, writes y
//                      => 2 reads of x + 1 write of y.
//   eval forward     : coefficients per channel only (from the running
//                      statistics, a launch of its own: its double sqrt and
//                      division stay out of the hot kernel)
//                      normalize reads x, writes y: 1 read + 1 write.
//   backward         : grad sums reads x and dy once (only when dx in training
//                      mode, grad_weight or grad_bias is wanted)
//                      finalize  per-channel only (grad_weight, grad_bias, dx
//                                coefficients)
//                      grad input reads dy (and x in training mode), writes dx
//                      (only when output_mask[0])
//                      => training: 2 reads of x and dy + 1 write of dx;
//                         eval dx only: 1 read of dy + 1 write of dx.
//   epilogues        : y = A(z) or A(z + r), A any activation of
//                      csrc/common/activation.h (its formulas are written
//                      only there; epilogues.cuh is the plumbing). The
//                      normalize pass applies A and reads r when there is
//                      one (+1 read). The backward's g = A'(u) · dy
//                      (common::GradSource) comes from:
//                      kNone  (identity): g = dy; nothing more is read (with
//                               a residual, dr = dy is the caller's).
//                      kInput (A(z)): z recomputed from x with the forward's
//                               coefficients in both the grad-sums and the
//                               grad-input pass (eval's dx then reads x too).
//                      kInputAndResidual (A(z + r)): the grad-sums pass reads
//                               r beside dy and x, recomputes z, and writes
//                               g = dr; the grad-input pass reads g in place
//                               of dy (and x in training).
//                      kOutput (A(z) or A(z + r), derivative from y where A
//                               allows it): as kInputAndResidual with y read
//                               in place of r and nothing recomputed.
//                      => with a residual or y: +1 read of r or y and +1
//                         write of g in the grad-sums pass, which then runs
//                         even in eval.
//   data parallel    : batch_norm_stats is the moments and finalize passes,
//                      writing (count, mean, M2) per channel; the training
//                      forward with gathered moments merges them in rank order
//                      in its finalize pass (no moments pass); the backward's
//                      local sums come from its grad-sums and finalize passes,
//                      and dx from all ranks' sums skips the grad-sums pass.
//
// Determinism (no floating-point atomics anywhere). A reduction is split over a
// grid fixed by the shape, the dtype's vector width and the multiprocessor
// count. Each thread folds its elements in a fixed order, a warp merges with a
// fixed shuffle tree (channels-first) or the block with a fixed shared-memory
// tree (channels-last), and each block writes its partial to the workspace at
// [split][channel]. The finalize kernel then merges a channel's partials in a
// fixed order (lane l takes splits l, l+32, ... in order, then a shuffle tree),
// in double. Same GPU (same multiprocessor count) => bitwise identical results.
//
// Grids. Channels-first: grid (C, splits), 1-D blocks of 32..256 threads over
// one channel's N x HW/vec vector positions; on scalar accesses an element
// pass walks the flattened tensor instead (grid of element runs), and a
// reduction over planes of at most 256 elements stages 8 channels' planes
// through shared memory (grid (C/8 channel groups, splits of the N images)),
// so that warps read whole sectors. Channels-last: grid (column tiles,
// splits), blocks of up to 32 vector columns x rows (256 threads), splits
// cutting the N*HW rows. splits fills the chip with whole waves of ~1024
// threads per multiprocessor (or what the kernel's registers let one hold, when
// fewer: cudaOccupancyMaxActiveBlocksPerMultiprocessor): of the counts filling
// one to four waves, the one whose last wave is fullest, without giving a
// reduction's block fewer than 4 unrolled iterations per thread (an element
// pass's, 1). Loads and stores are 16-byte vectors when every
// pointer involved is 16-byte aligned and HW (channels-first) or C
// (channels-last) is a multiple of 16 / sizeof(scalar); scalar otherwise.
// All element offsets are 64-bit. C == 0 launches only a counter increment.
//
// Numerics (the CPU kernels' rules; the per-channel formulas are shared with
// them in csrc/common/channel_math.h). Welford/Chan moments are taken of x - K,
// with K the channel's first element (0 if it is not finite): for data far from
// zero (mean 1e4, std 1 in float32) the shifted values are exact and their mean
// keeps full precision; the normalize pass uses (x − mean_hi) − mean_lo, the
// double mean in two parts, rather than x − rounded_mean (an epilogue whose
// activation is not the identity normalizes with the saved statistics'
// coefficients instead, common::Epilogue::kCoefficientsFromSaved, so that its
// backward recomputes z bit for bit). Activations are applied in acc_t and
// the output rounded once. float32 moments accumulate in double, half/bfloat16 in
// float. The backward sums Σdy, Σdy·(x − mean) and Σ(x − mean) in double for
// every dtype, centres Σdy·(x − mean) on the exact batch mean, and writes dx in
// nn's factored form (dy − mean(dy) − (x − mean)·projection)·w·invstd. Double
// accumulation costs a few FP64 operations per element: far below H100/H200's
// FP64 rate, but it can make the reduction passes compute-bound on GPUs with
// 1/64-rate FP64 (consumer and L40-class parts): unmeasured so far.
//
// num_batches_tracked. The moments kernel snapshots counter + 1 into the
// workspace; the finalize kernel (a later launch in the same stream) derives
// the cumulative momentum 1/count from the snapshot and stores it back, so no
// block ever reads the counter while another writes it, and the host never
// synchronizes. Nothing in the kernel layer or the glue reads a device value
// on the host (the data-parallel backward's count is a device scalar), so
// every op can be captured in a CUDA graph.
#pragma once

#include "../common/epilogue.h"
#include "../common/geometry.h"
#include "cuda_platform.h"

#include <cstddef>
#include <cstdint>

namespace fused_bn {
namespace cuda {

// float for float/half/bfloat16 input, double for double input.
template <typename scalar_t>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccumulateType<scalar_t>::type;

// The input as N x C x HW, channels-first or channels-last, and the
// multiprocessor count the grids are sized for (csrc/common/geometry.h).
using Geometry = common::Geometry;

// param_t is the dtype of weight/bias/running stats: scalar_t, or float for
// half/bfloat16 input (mixed precision). Nullable pointers are marked.
template <typename scalar_t, typename param_t>
struct TrainForwardParams {
  using acc_t = acc_type<scalar_t>;
  Geometry geometry;
  const scalar_t* input = nullptr;
  scalar_t* output = nullptr;
  const param_t* weight = nullptr;   // nullable: 1
  const param_t* bias = nullptr;     // nullable: 0
  param_t* running_mean = nullptr;   // nullable: not updated
  param_t* running_var = nullptr;    // nullable: not updated
  int64_t* num_batches_tracked = nullptr;  // nullable: device scalar, incremented
  acc_t* save_mean = nullptr;        // [C]
  acc_t* save_invstd = nullptr;      // [C]
  void* workspace = nullptr;         // train_forward_workspace_bytes(), 16-byte aligned
  double eps = 1e-5;
  double momentum = 0.1;
  bool cumulative_momentum = false;  // momentum=None: 1 / num_batches_tracked
  // The epilogue: y = activation(z), or activation(z + residual) when
  // residual is not null (laid out as input).
  common::ActivationArgs activation;
  const scalar_t* residual = nullptr;  // nullable: no residual
  // batch_norm_train_with_stats: the statistics are all ranks' moments,
  // gathered_moments[ranks][C][3] (each rank's launch_batch_norm_stats),
  // merged in rank order; the moments pass does not run.
  const double* gathered_moments = nullptr;
  int64_t ranks = 0;
};

// batch_norm_stats: this rank's per-channel (count, mean, M2) into
// exchanged_moments[C][3] (csrc/common/exchange.h); one read of the input.
template <typename scalar_t>
struct StatsParams {
  Geometry geometry;
  const scalar_t* input = nullptr;
  double* exchanged_moments = nullptr;
  void* workspace = nullptr;  // stats_workspace_bytes(), 16-byte aligned
};

template <typename scalar_t, typename param_t>
struct EvalForwardParams {
  Geometry geometry;
  const scalar_t* input = nullptr;
  scalar_t* output = nullptr;
  const param_t* weight = nullptr;  // nullable
  const param_t* bias = nullptr;    // nullable
  const param_t* running_mean = nullptr;
  const param_t* running_var = nullptr;
  double eps = 1e-5;
  common::ActivationArgs activation;   // as TrainForwardParams
  const scalar_t* residual = nullptr;  // nullable: no residual
  void* workspace = nullptr;           // eval_forward_workspace_bytes(), 16-byte aligned
};

// param_t: the weight's dtype, or acc_t when there is no weight; grad_weight
// and grad_bias are written in it.
template <typename scalar_t, typename param_t>
struct BackwardParams {
  using acc_t = acc_type<scalar_t>;
  Geometry geometry;
  const scalar_t* grad_output = nullptr;
  const scalar_t* input = nullptr;
  const param_t* weight = nullptr;  // nullable: 1
  const acc_t* mean = nullptr;      // [C] saved mean (training) or running mean
  const acc_t* invstd = nullptr;    // [C]
  bool training = true;
  double eps = 1e-5;                // the forward's: channels of two values are computed from it
  scalar_t* grad_input = nullptr;   // nullable: output_mask[0] false
  param_t* grad_weight = nullptr;   // nullable: output_mask[1] false
  param_t* grad_bias = nullptr;     // nullable: output_mask[2] false
  void* workspace = nullptr;        // backward_workspace_bytes(), 16-byte aligned
  // The gradient the passes take, g = activation'(u) · dy with u from
  // `source` (common::GradSource; the glue's common::grad_source_for):
  //   kNone            : g = dy (identity activation).
  //   kInput           : z recomputed from x, weight, invstd, mean and bias.
  //   kInputAndResidual: u = z + residual, z recomputed as kInput.
  //   kOutput          : from output (activation::kGradFromOutput).
  // kInputAndResidual and kOutput write g to grad_residual in the reduction
  // pass, which then always runs, and the dx pass reads that g as its dy.
  common::ActivationArgs activation;
  common::GradSource source = common::GradSource::kNone;
  const param_t* bias = nullptr;        // kInput, kInputAndResidual; nullable: 0
  const scalar_t* residual = nullptr;   // kInputAndResidual
  const scalar_t* output = nullptr;     // kOutput
  scalar_t* grad_residual = nullptr;    // kInputAndResidual, kOutput
  // FusedSyncBatchNorm2d's two training calls (exchange format in
  // csrc/common/exchange.h):
  //   local_sums  : the reduction pass only; this rank's sums go to
  //                 local_sums[C][3], and grad_weight / grad_bias are its share
  //                 (about the saved mean, uncentred: ranks add them up).
  //   global_sums : no reduction pass; dx from all ranks' summed sums, over
  //                 *global_count values per channel (a device scalar, so the
  //                 host never reads the gathered counts).
  double* local_sums = nullptr;
  const double* global_sums = nullptr;
  const double* global_count = nullptr;
};

// Every (input, parameter) dtype pair batch norm accepts: X(scalar_t, param_t)
// for each; the launchers are instantiated for these (forward.cu, backward.cu).
#define FUSED_BN_CUDA_DTYPE_PAIRS(X) \
  X(float, float)                    \
  X(double, double)                  \
  X(__half, __half)                  \
  X(__half, float)                   \
  X(__nv_bfloat16, __nv_bfloat16)    \
  X(__nv_bfloat16, float)

template <typename scalar_t, typename param_t>
size_t train_forward_workspace_bytes(const TrainForwardParams<scalar_t, param_t>& params);

template <typename scalar_t, typename param_t>
cudaError_t launch_batch_norm_train_forward(const TrainForwardParams<scalar_t, param_t>& params,
                                            cudaStream_t stream);

template <typename scalar_t, typename param_t>
size_t eval_forward_workspace_bytes(const EvalForwardParams<scalar_t, param_t>& params);

template <typename scalar_t, typename param_t>
cudaError_t launch_batch_norm_eval_forward(const EvalForwardParams<scalar_t, param_t>& params,
                                           cudaStream_t stream);

template <typename scalar_t>
size_t stats_workspace_bytes(const StatsParams<scalar_t>& params);

template <typename scalar_t>
cudaError_t launch_batch_norm_stats(const StatsParams<scalar_t>& params, cudaStream_t stream);

template <typename scalar_t, typename param_t>
size_t backward_workspace_bytes(const BackwardParams<scalar_t, param_t>& params);

template <typename scalar_t, typename param_t>
cudaError_t launch_batch_norm_backward(const BackwardParams<scalar_t, param_t>& params,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_bn
