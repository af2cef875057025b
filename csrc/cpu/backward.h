// The backward: reduction pass, per-channel finalization, dx pass.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/channel_math.h"
#include "../common/exchange.h"
#include "accumulators.h"
#include "channel_finalize.h"
#include "coefficients.h"
#include "epilogue.h"
#include "nchw_planes.h"
#include "nchw_short_planes.h"
#include "parallel.h"
#include "plan.h"
#include "rows.h"
#include "scratch.h"

namespace fused_bn::cpu {

// Outputs of the backward op (null where the output mask is false).
// grad_residual is the activation's g, written where the gradient transform
// writes it (Grad::kWritesGrad).
template <typename scalar_t, typename param_t>
struct BackwardOutputs {
  scalar_t* grad_input = nullptr;
  param_t* grad_weight = nullptr;
  param_t* grad_bias = nullptr;
  scalar_t* grad_residual = nullptr;
};

// The backward's scale, w · invstd: also an activation's forward scale
// (set_normalize_coefs from the saved invstd), which a recomputed z relies on.
template <typename scalar_t, typename param_t>
inline acc_type<scalar_t> backward_scale(const param_t* weight, const acc_type<scalar_t>* invstd, int64_t c) {
  return static_cast<acc_type<scalar_t>>(param_or(weight, c, 1.0) * static_cast<double>(invstd[c]));
}

// Backward coefficients of channel c from its sums (see ChannelCoefs); k.mean
// is already set.
template <typename scalar_t, typename param_t>
void finalize_channel_grads(int64_t c, const GradSums& s, int64_t count, bool training, bool centered,
                            const param_t* weight, const acc_type<scalar_t>* invstd,
                            const BackwardOutputs<scalar_t, param_t>& out, ChannelCoefs<scalar_t>& k) {
  using Acc = acc_type<scalar_t>;
  const double istd = static_cast<double>(invstd[c]);
  // Σg·(x − x̄) needs every value's sums: a rank's own share (SumsExchange's
  // local) takes its sums about the saved mean, as ranks add up those shares.
  const double sum_dy_xmu = training && centered && count > 0 ? s.centered_sum_dy_xmu(count) : s.sum_dy_xmu;
  if (out.grad_weight) out.grad_weight[c] = static_cast<param_t>(sum_dy_xmu * istd);
  if (out.grad_bias) out.grad_bias[c] = static_cast<param_t>(s.sum_dy);
  const common::GradInputCoefficients coefs =
      common::grad_input_coefficients(param_or(weight, c, 1.0), istd, s.sum_dy, sum_dy_xmu, count, training);
  k.scale[c] = backward_scale<scalar_t>(weight, invstd, c);  // coefs.scale, as a recomputed z needs it
  k.projection[c] = static_cast<Acc>(coefs.projection);
  k.shift[c] = static_cast<Acc>(coefs.shift);
}

// FusedSyncBatchNorm2d's training backward is two calls of `backward` around
// an all_reduce of the sums:
//   local : the reduction pass only; this rank's sums are written to local[C]
//           (with grad_input null, nothing else is read or written).
//   global: no reduction pass; dx from every rank's summed sums, global[C],
//           over global_count values per channel.
struct SumsExchange {
  GradSums* local = nullptr;
  const GradSums* global = nullptr;
  int64_t global_count = 0;
};
static_assert(sizeof(GradSums) == common::kExchangedGradSums * sizeof(double),
              "GradSums is exchanged as three doubles per channel (csrc/common/exchange.h)");

// The training backward of a channel of two values (common::two_values_grads);
// g is dy under G, as in the general path.
template <typename scalar_t, typename param_t, typename G>
void two_values_backward(const scalar_t* dy, const scalar_t* x, const Geometry& g, const param_t* weight,
                         const param_t* bias, const scalar_t* aux, const ActParams<scalar_t, typename G::Activation>& params,
                         const acc_type<scalar_t>* mean, const acc_type<scalar_t>* invstd, double eps,
                         const BackwardOutputs<scalar_t, param_t>& out) {
  using Acc = acc_type<scalar_t>;
  // The two values are two rows of C channels (NHWC, or N = 2 with H·W = 1),
  // else neighbours in the channel's plane.
  const bool rows = g.channels_last || g.HW == 1;
  for (int64_t c = 0; c < g.C; ++c) {
    const int64_t at[2] = {rows ? c : 2 * c, rows ? g.C + c : 2 * c + 1};
    double xv[2], gv[2];
    for (int64_t i = 0; i < 2; ++i) {
      const Acc xi = static_cast<Acc>(x[at[i]]);
      Acc gi = static_cast<Acc>(dy[at[i]]);
      if constexpr (!G::kIdentity) {
        const Acc a = G::kReadsAux ? static_cast<Acc>(aux[at[i]]) : Acc(0);
        gi = common::transform_grad<typename G::Activation, G::kFrom, common::ScalarMath<Acc>>(
            gi, xi, a, mean[c], backward_scale<scalar_t>(weight, invstd, c),
            static_cast<Acc>(param_or(bias, c, 0.0)), params);
      }
      if constexpr (G::kWritesGrad) out.grad_residual[at[i]] = static_cast<scalar_t>(gi);
      xv[i] = static_cast<double>(xi);
      gv[i] = static_cast<double>(gi);
    }
    const common::TwoValuesGrads r = common::two_values_grads(xv, gv, param_or(weight, c, 1.0), eps);
    if (out.grad_weight) out.grad_weight[c] = static_cast<param_t>(r.grad_weight);
    if (out.grad_bias) out.grad_bias[c] = static_cast<param_t>(r.grad_bias);
    if (!out.grad_input) continue;
    for (int64_t i = 0; i < 2; ++i) out.grad_input[at[i]] = static_cast<scalar_t>(r.grad_input[i]);
  }
}

// One backward call: its inputs and outputs, what it needs (the plan of the
// call, decided once), and the stages every traversal below is written as:
//   reduce   : the reduction pass over x and dy (and the residual or y, where
//              G reads one: it then writes g),
//              into per-block GradSums
//   finalize : per channel, the block sums merged in block order, exchanged
//              (SumsExchange), grad_weight/grad_bias and the dx coefficients
//   dx       : the element pass over x and g, writing dx
// Eval's dx needs no sums; with sums wanted too (eval_dx_with_sums) the
// reduce and dx passes are one.
template <typename scalar_t, typename param_t, typename G>
struct BackwardCall {
  using Acc = acc_type<scalar_t>;
  // The dx pass's transform: none where the reduction pass wrote g.
  using Dx = DxGrad<G>;

  const scalar_t *dy, *x;
  const Geometry& g;
  const param_t *weight, *bias;
  const scalar_t* aux;  // the residual or y, where G reads one
  ActParams<scalar_t, typename G::Activation> params;
  const Acc *mean, *invstd;
  bool training;
  const BackwardOutputs<scalar_t, param_t>& out;
  const SumsExchange& exchange;
  ChannelCoefs<scalar_t>& k;
  // Values per channel the coefficients are for (all ranks' with exchange.global).
  int64_t count;
  bool need_sums, eval_dx_with_sums, stream, staged;
  const scalar_t* dx_grad;

  BackwardCall(const scalar_t* dy_, const scalar_t* x_, const Geometry& g_, const param_t* weight_,
               const param_t* bias_, const scalar_t* aux_, const ActParams<scalar_t, typename G::Activation>& params_,
               const Acc* mean_, const Acc* invstd_, bool training_, const BackwardOutputs<scalar_t, param_t>& out_,
               const SumsExchange& exchange_, ChannelCoefs<scalar_t>& k_)
      : dy(dy_), x(x_), g(g_), weight(weight_), bias(bias_), aux(aux_), params(params_), mean(mean_),
        invstd(invstd_), training(training_), out(out_), exchange(exchange_), k(k_) {
    count = exchange.global ? exchange.global_count : g.per_channel();
    // Training's dx and both parameter grads need the sums, and the reduction
    // pass is what writes g where G writes it.
    need_sums = !exchange.global &&
                (exchange.local || G::kWritesGrad ||
                 (training ? out.grad_input || out.grad_weight || out.grad_bias : out.grad_weight || out.grad_bias));
    eval_dx_with_sums = !training && need_sums && out.grad_input && !exchange.local;
    stream = streams_training_output<scalar_t>(g);
    staged = stages_training_output<scalar_t>(g);
    dx_grad = G::kWritesGrad ? out.grad_residual : dy;
  }

  // The dx pass's activation parameters.
  ActParams<scalar_t, typename Dx::Activation> dx_params() const {
    if constexpr (std::is_same_v<Dx, G>) {
      return params;
    } else {
      return {};
    }
  }

  // The coefficients known before any sums: the mean, a recomputed z's forward
  // coefficients (as finalize_channel_stats with coefs_from_saved and
  // finalize_channel_grads compute them), and the scale of an eval dx that
  // comes with the reduction.
  void set_known_coefficients() const {
    const int64_t C = g.C;
    std::copy(mean, mean + C, k.mean);
    if constexpr (G::kRecomputes) {
      for (int64_t c = 0; c < C; ++c) {
        k.scale[c] = backward_scale<scalar_t>(weight, invstd, c);
        k.forward_shift[c] = static_cast<Acc>(param_or(bias, c, 0.0));
      }
    }
    if (eval_dx_with_sums) {
      for (int64_t c = 0; c < C; ++c) k.scale[c] = backward_scale<scalar_t>(weight, invstd, c);
    }
  }

  // finalize: channel c's coefficients and parameter grads from its reduced sums.
  void finalize(int64_t c, const GradSums& reduced) const {
    if (exchange.local) exchange.local[c] = reduced;
    const GradSums& sums = exchange.global ? exchange.global[c] : reduced;
    finalize_channel_grads<scalar_t>(c, sums, count, training, !exchange.local, weight, invstd, out, k);
  }

  // The transform H's inputs for channel c (H is G, or Dx for the dx pass),
  // pointers at the channel's base (offset is that base for the NCHW
  // long-plane walk, 0 for the short-plane one). scale is also the dx's.
  template <typename H>
  ChannelGrad<scalar_t, H> channel_grad(int64_t c, int64_t offset) const {
    ChannelGrad<scalar_t, H> cg;
    cg.scale = k.scale[c];
    cg.forward_shift = k.forward_shift[c];
    if constexpr (H::kReadsAux) cg.aux = aux + offset;
    if constexpr (H::kWritesGrad) cg.grad = out.grad_residual + offset;
    if constexpr (std::is_same_v<H, G>) {
      cg.params = params;
    } else {
      cg.params = dx_params();
    }
    return cg;
  }

  // dx of NCHW plane (c, n) into dst, `writable` elements from it (streamed
  // when `stream_dst`).
  void grad_input_plane_into(int64_t c, int64_t n, scalar_t* dst, int64_t writable, bool stream_dst) const {
    const int64_t C = g.C, HW = g.HW;
    const int64_t offset = n * C * HW + c * HW;
    const ChannelGrad<scalar_t, Dx> cg = channel_grad<Dx>(c, offset);
    if (training) {
      grad_input_run<scalar_t, Dx>(x + offset, dx_grad + offset, dst, HW, g.numel() - offset, writable, k.mean[c],
                                   k.projection[c], k.shift[c], cg, stream_dst);
    } else {
      scale_run<scalar_t, Dx>(x + offset, dx_grad + offset, dst, HW, g.numel() - offset, writable, k.mean[c], cg,
                              stream_dst);
    }
  }
  void grad_input_plane(int64_t c, int64_t n) const {
    grad_input_plane_into(c, n, out.grad_input + n * g.C * g.HW + c * g.HW, g.HW, stream);
  }
};

// NHWC: row blocks reduced in parallel, merged per channel range, then the rows' dx.
template <typename scalar_t, typename param_t, typename G>
void nhwc_backward(const BackwardCall<scalar_t, param_t, G>& call) {
  using Call = BackwardCall<scalar_t, param_t, G>;
  const Geometry& g = call.g;
  const auto& out = call.out;
  const int64_t C = g.C, rows = g.N * g.HW;
  const RowBlockStrips tasks(rows, C, kTileWidth<scalar_t>, sizeof(scalar_t));
  const RowBlocking& rb = tasks.blocks;
  const bool stream_rows = call.stream && rows_stream_aligned(out.grad_input, C);
  // reduce: block partials as structure of arrays, summed in block order with
  // a loop over channels that vectorizes.
  const int64_t block_sums_size = call.need_sums ? rb.blocks * C : 0;
  double* block_sum_dy = thread_scratch<double, ScratchSlot::kBlockSumDy>(block_sums_size);
  double* block_sum_dy_xmu = thread_scratch<double, ScratchSlot::kBlockSumDyXmu>(block_sums_size);
  double* block_sum_xmu = thread_scratch<double, ScratchSlot::kBlockSumXmu>(block_sums_size);
  if (call.need_sums) {
    parallel_over(tasks.tasks(), [&](int64_t t) {
      const int64_t b = tasks.block(t);
      nhwc_block_grad_sums<scalar_t, G>(call.x, call.dy, C, tasks.strip(t, C), call.k, call.aux,
                                        out.grad_residual, call.params, rb.begin(b), rb.end(b, rows), block_sum_dy + b * C,
                                            block_sum_dy_xmu + b * C, block_sum_xmu + b * C,
                                            call.eval_dx_with_sums ? out.grad_input : nullptr, stream_rows);
    });
  }
  // finalize
  parallel_for(0, C, kMergeGrain, [&](int64_t c_begin, int64_t c_end) {
    double* sum_dy = thread_scratch_filled<double, ScratchSlot::kSumDy>(c_end - c_begin, 0.0);
    double* sum_dy_xmu = thread_scratch_filled<double, ScratchSlot::kSumDyXmu>(c_end - c_begin, 0.0);
    double* sum_xmu = thread_scratch_filled<double, ScratchSlot::kSumXmu>(c_end - c_begin, 0.0);
    for (int64_t b = 0; call.need_sums && b < rb.blocks; ++b) {
      const double* bs = block_sum_dy + b * C + c_begin;
      const double* bsx = block_sum_dy_xmu + b * C + c_begin;
      const double* bx = block_sum_xmu + b * C + c_begin;
      for (int64_t i = 0; i < c_end - c_begin; ++i) {
        sum_dy[i] += bs[i];
        sum_dy_xmu[i] += bsx[i];
        sum_xmu[i] += bx[i];
      }
    }
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t i = c - c_begin;
      call.finalize(c, GradSums{sum_dy[i], sum_dy_xmu[i], sum_xmu[i]});
    }
  });
  // dx
  if (out.grad_input && !call.eval_dx_with_sums) {
    parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
      grad_input_rows<scalar_t, typename Call::Dx>(call.x, call.dx_grad, out.grad_input, Rows{C, C}, begin, end,
                                                   call.k, call.dx_params(), call.training, stream_rows,
                                                   /*reversed=*/call.need_sums);
      stream_fence();
    });
  }
}

// NCHW short planes: each channel block (ChannelBlocking) is reduced,
// finalized and given its dx by one task, image by image.
template <typename scalar_t, typename param_t, typename G>
void channel_blocks_backward(const BackwardCall<scalar_t, param_t, G>& call) {
  using Call = BackwardCall<scalar_t, param_t, G>;
  using Acc = acc_type<scalar_t>;
  const Geometry& g = call.g;
  const auto& out = call.out;
  const int64_t N = g.N, C = g.C, HW = g.HW;
  const scalar_t *x = call.x, *dy = call.dy;
  const ChannelBlocking cb(g, 2 * sizeof(scalar_t));
  const ShortPlane<scalar_t> plane(HW, g.numel());
  parallel_over(cb.blocks, [&](int64_t b) {
    const int64_t c0 = cb.begin(b), c1 = cb.end(b, C);
    constexpr int64_t P = ShortPlane<scalar_t>::kPartials;
    double* sum_dy = thread_scratch_filled<double, ScratchSlot::kBlockSum1>((c1 - c0) * P, 0.0);
    double* sum_dy_xmu = thread_scratch_filled<double, ScratchSlot::kBlockSum2>((c1 - c0) * P, 0.0);
    double* sum_xmu = thread_scratch_filled<double, ScratchSlot::kBlockSum3>((c1 - c0) * P, 0.0);
    unsigned char* g_differs = thread_scratch_filled<unsigned char, ScratchSlot::kBlockFlags>(c1 - c0, 0);
    // reduce, one plane
    auto plane_sums = [&](int64_t c, int64_t n) __attribute__((always_inline)) {
      if (n + 1 < N) {
        plane.prefetch(x + ((n + 1) * C + c) * HW);
        plane.prefetch(dy + ((n + 1) * C + c) * HW);
        if constexpr (G::kReadsAux) plane.prefetch(call.aux + ((n + 1) * C + c) * HW);
      }
      short_plane_grad_sums<scalar_t, G>(x, dy, (n * C + c) * HW, plane, call.mean[c],
                                         static_cast<Acc>(dy[c * HW]), call.template channel_grad<G>(c, 0),
                                             sum_dy + (c - c0) * P, sum_dy_xmu + (c - c0) * P,
                                             sum_xmu + (c - c0) * P, g_differs + (c - c0));
    };
    // dx, planes one by one; with_sums: each plane's sums first (eval's dx
    // then comes while the plane is in L1).
    auto planes_dx = [&](auto with_sums) {
      for_block_planes_into(g, c0, c1, out.grad_input, call.staged,
                            [&](int64_t c, int64_t n, scalar_t* dst, int64_t writable) {
        if constexpr (decltype(with_sums)::value) plane_sums(c, n);
        call.grad_input_plane_into(c, n, dst, writable, /*stream_dst=*/false);
      });
      if (call.staged) stream_fence();
    };
    // Not on the runs path: its dx goes a tile of runs at a time.
    const bool dx_with_sums = kChannelBlockPassesByPlane<scalar_t> && call.eval_dx_with_sums;
    if (dx_with_sums) {
      planes_dx(/*with_sums=*/std::true_type{});
    } else if (call.need_sums) {
      for_block_planes(g, c0, c1, plane_sums);
    }
    // finalize
    for (int64_t c = c0; c < c1; ++c) {
      const double xmu = ShortPlane<scalar_t>::total(sum_xmu + (c - c0) * P);
      call.finalize(c, block_grad_sums(!g_differs[c - c0], dy + c * HW, N * HW,
                                       ShortPlane<scalar_t>::total(sum_dy + (c - c0) * P),
                                       ShortPlane<scalar_t>::total(sum_dy_xmu + (c - c0) * P), xmu));
    }
    // dx
    if (!out.grad_input || dx_with_sums) return;
    if constexpr (kChannelBlockPassesByPlane<scalar_t>) {
      planes_dx(/*with_sums=*/std::false_type{});
    } else {
      grad_input_rows<scalar_t, typename Call::Dx>(x + c0 * HW, call.dx_grad + c0 * HW, out.grad_input + c0 * HW,
                                                   cb.run(g, b), 0, N, RunCoefs<scalar_t>(call.k, c0, c1, HW),
                                                   call.dx_params(), call.training, call.stream, /*reversed=*/false);
    }
  });
}

// Channel c's sums of NCHW block b (PlaneBlocking) of its long planes.
template <typename scalar_t, typename param_t, typename G>
GradSums plane_block_grad_sums(const BackwardCall<scalar_t, param_t, G>& call, const PlaneBlocking& pb,
                               const PlaneWalk<scalar_t>& walk, int64_t c, int64_t b) {
  const int64_t N = call.g.N, HW = call.g.HW;
  int64_t n0, n1, h0, h1;
  pb.range(b, N, HW, n0, n1, h0, h1);
  return nchw_block_grad_sums<scalar_t, G>(call.x + c * HW, call.dy + c * HW, walk.for_channel(c), call.mean[c],
                                           call.template channel_grad<G>(c, c * HW), n0, n1, h0, h1);
}

// NCHW, enough channels: one task per channel reduces it, finalizes it and
// writes its dx while its planes are still in cache.
template <typename scalar_t, typename param_t, typename G>
void channel_per_task_backward(const BackwardCall<scalar_t, param_t, G>& call) {
  const Geometry& g = call.g;
  const PlaneBlocking pb(g.N, g.HW);
  const PlaneWalk<scalar_t> walk{g.HW, g.C * g.HW, prefetch_planes<scalar_t>(g), g.numel()};
  parallel_over(g.C, [&](int64_t c) {
    GradSums s;
    for (int64_t b = 0; call.need_sums && b < pb.blocks; ++b) s.add(plane_block_grad_sums(call, pb, walk, c, b));
    call.finalize(c, s);
    for (int64_t n = 0; call.out.grad_input && n < g.N; ++n) call.grad_input_plane(c, n);
  });
}

// NCHW, few channels: every channel's blocks reduced over all threads, merged
// in block order on the calling thread, then every plane's dx over all threads.
template <typename scalar_t, typename param_t, typename G>
void split_channels_backward(const BackwardCall<scalar_t, param_t, G>& call) {
  const Geometry& g = call.g;
  const int64_t C = g.C, N = g.N;
  const PlaneBlocking pb(N, g.HW);
  const PlaneWalk<scalar_t> walk{g.HW, C * g.HW, prefetch_planes<scalar_t>(g), g.numel()};
  // reduce
  std::vector<GradSums> partial(call.need_sums ? C * pb.blocks : 0);
  if (call.need_sums) {
    parallel_over(C * pb.blocks, [&](int64_t i) {
      partial[i] = plane_block_grad_sums(call, pb, walk, i / pb.blocks, i % pb.blocks);
    });
  }
  // finalize
  for (int64_t c = 0; c < C; ++c) {
    GradSums s;
    for (int64_t b = 0; call.need_sums && b < pb.blocks; ++b) s.add(partial[c * pb.blocks + b]);
    call.finalize(c, s);
  }
  // dx
  if (call.out.grad_input) {
    parallel_over(C * N, [&](int64_t i) { call.grad_input_plane(i / N, i % N); });
  }
}

// Gradients of act(batch_norm(x) [+ residual]) with the activation's
// derivative taken as G says (common::GradSource; bias is the forward's, for
// a recomputed z's shift; aux is the residual or the forward's y). Which
// traversal runs is plan.h's table.
template <typename scalar_t, typename param_t, typename G>
void backward(const scalar_t* dy, const scalar_t* x, const Geometry& g, const param_t* weight,
              const param_t* bias, const scalar_t* aux, const ActParams<scalar_t, typename G::Activation>& params,
              const acc_type<scalar_t>* mean, const acc_type<scalar_t>* invstd, bool training, double eps,
              const BackwardOutputs<scalar_t, param_t>& out, const SumsExchange& exchange = {}) {
  if (training && !exchange.local && !exchange.global && has_two_values_per_channel(g)) {
    two_values_backward<scalar_t, param_t, G>(dy, x, g, weight, bias, aux, params, mean, invstd, eps, out);
    return;
  }
  ChannelCoefs<scalar_t> k(g.C);
  const BackwardCall<scalar_t, param_t, G> call(dy, x, g, weight, bias, aux, params, mean, invstd, training, out,
                                                exchange, k);
  call.set_known_coefficients();
  if (g.channels_last) {
    nhwc_backward(call);
  } else if (walks_channel_blocks<scalar_t>(g)) {
    channel_blocks_backward(call);
  } else if (!has_few_channels_per_thread(g)) {
    channel_per_task_backward(call);
  } else {
    split_channels_backward(call);
  }
}

}  // namespace fused_bn::cpu
