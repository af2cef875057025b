// The forwards: training (statistics, then the element pass, per traversal)
// and eval (the element pass with the running statistics).
#pragma once

#include <cmath>
#include <cstdint>

#include "channel_finalize.h"
#include "channel_statistics.h"
#include "coefficients.h"
#include "epilogue.h"
#include "nchw_planes.h"
#include "nchw_short_planes.h"
#include "parallel.h"
#include "plan.h"
#include "rows.h"

namespace fused_bn::cpu {

// y = epilogue(batch_norm(x)); `residual` (Epi::kHasResidual) is laid out as x.
template <typename scalar_t, typename param_t, typename Epi>
void train_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, const Geometry& g,
                   const ChannelTensors<param_t>& t, double factor, double eps,
                   const EpilogueArgs<scalar_t, Epi>& epilogue, acc_type<scalar_t>* save_mean,
                   acc_type<scalar_t>* save_invstd) {
  constexpr bool kFromSaved = Epi::kCoefficientsFromSaved;
  const int64_t N = g.N, C = g.C, HW = g.HW;
  ChannelCoefs<scalar_t> k(C);
  const bool stream = streams_training_output<scalar_t>(g);
  const bool staged = stages_training_output<scalar_t>(g);

  if (g.channels_last) {
    const int64_t rows = N * HW;
    nhwc_channel_moments(x, rows, C, [&](int64_t c_begin, int64_t c_end, const double* mean, const double* m2) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        finalize_channel_stats<scalar_t>(c, Moments{rows, mean[c], m2[c]}, t, factor, eps, save_mean,
                                         save_invstd, kFromSaved, k);
      }
    });
    const bool stream_rows = stream && rows_stream_aligned(y, C);
    parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
      normalize_rows<scalar_t, Epi>(x, residual, y, Rows{C, C}, begin, end, k, epilogue, stream_rows,
                                    /*reversed=*/true);
      stream_fence();
    });
    return;
  }

  // Plane (c, n)'s y into dst, `writable` elements from it (streamed when
  // `stream_dst`).
  auto normalize_plane_into = [&](int64_t c, int64_t n, scalar_t* dst, int64_t writable, bool stream_dst) {
    const int64_t offset = n * C * HW + c * HW;
    normalize_run<scalar_t, Epi>(x + offset, residual + offset, dst, HW, g.numel() - offset, writable,
                                 k.mean[c], k.scale[c], k.shift[c], epilogue, stream_dst);
  };
  auto normalize_plane = [&](int64_t c, int64_t n) {
    normalize_plane_into(c, n, y + n * C * HW + c * HW, HW, stream);
  };

  if (walks_channel_blocks<scalar_t>(g)) {
    const ChannelBlocking cb(g, sizeof(scalar_t));
    parallel_over(cb.blocks, [&](int64_t b) {
      const int64_t c0 = cb.begin(b), c1 = cb.end(b, C);
      channel_block_moments(x, g, c0, c1, [&](int64_t c, const Moments& m) {
        finalize_channel_stats<scalar_t>(c, m, t, factor, eps, save_mean, save_invstd, kFromSaved, k);
      });
      if constexpr (kChannelBlockPassesByPlane<scalar_t>) {
        for_block_planes_into(g, c0, c1, y, staged, [&](int64_t c, int64_t n, scalar_t* dst, int64_t writable) {
          normalize_plane_into(c, n, dst, writable, /*stream_dst=*/false);
        });
        if (staged) stream_fence();
      } else {
        normalize_rows<scalar_t, Epi>(x + c0 * HW, residual + c0 * HW, y + c0 * HW, cb.run(g, b), 0, N,
                                      RunCoefs<scalar_t>(k, c0, c1, HW), epilogue, stream, /*reversed=*/false);
      }
    });
    return;
  }
  if (!has_few_channels_per_thread(g)) {
    parallel_over(C, [&](int64_t c) {
      const Moments m = nchw_channel_moments(x, g, c);
      finalize_channel_stats<scalar_t>(c, m, t, factor, eps, save_mean, save_invstd, kFromSaved, k);
      for (int64_t n = 0; n < N; ++n) normalize_plane(c, n);
    });
    return;
  }
  split_channel_moments(x, g, [&](int64_t c, const Moments& m) {
    finalize_channel_stats<scalar_t>(c, m, t, factor, eps, save_mean, save_invstd, kFromSaved, k);
  });
  parallel_over(C * N, [&](int64_t i) { normalize_plane(i / N, i % N); });
}

// The inverse standard deviation eval normalizes with. Its backward gets the
// same value rounded to Acc (fused_bn/_autograd.py computes it the same way), and a
// ReLU epilogue normalizes with that rounded value too, so the backward's
// recomputed derivative sees the forward's z (ChannelCoefs).
inline double eval_invstd(double running_var, double eps) { return common::inverse_std(running_var, eps); }

// The element pass y = epilogue((x − mean) · scale + shift) over the whole
// input with fixed coefficients (eval, and training with statistics from
// elsewhere: batch_norm_train_with_stats).
template <typename scalar_t, typename Epi>
void normalize(const scalar_t* x, const scalar_t* residual, scalar_t* y, const Geometry& g,
               const ChannelCoefs<scalar_t>& k, const EpilogueArgs<scalar_t, Epi>& epilogue, bool stream) {
  const int64_t N = g.N, C = g.C, HW = g.HW;
  if (g.channels_last) {
    const bool stream_rows = stream && rows_stream_aligned(y, C);
    parallel_for(0, N * HW, row_grain(C), [&](int64_t begin, int64_t end) {
      normalize_rows<scalar_t, Epi>(x, residual, y, Rows{C, C}, begin, end, k, epilogue, stream_rows,
                                    /*reversed=*/false);
      stream_fence();
    });
    return;
  }
  if (eval_walks_block_runs<scalar_t>(g)) {
    // Runs start anywhere, so nothing is streamed.
    const ChannelBlocking cb(g, sizeof(scalar_t));
    parallel_over(cb.blocks, [&](int64_t b) {
      const int64_t c0 = cb.begin(b), c1 = cb.end(b, C);
      normalize_rows<scalar_t, Epi>(x + c0 * HW, residual + c0 * HW, y + c0 * HW, cb.run(g, b), 0, N,
                                    RunCoefs<scalar_t>(k, c0, c1, HW), epilogue, /*stream=*/false,
                                    /*reversed=*/false);
    });
    return;
  }
  // Planes in memory order, each thread a contiguous range of them: a plane's
  // tail may be stored whole over the start of the next one (FUSED_BN_RUN_LOOP).
  parallel_for(0, N * C, std::max<int64_t>(1, kBlockElements / std::max<int64_t>(HW, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i % C;
      normalize_run<scalar_t, Epi>(x + i * HW, residual + i * HW, y + i * HW, HW, g.numel() - i * HW,
                                   (end - i) * HW, k.mean[c], k.scale[c], k.shift[c], epilogue, stream);
    }
    stream_fence();
  });
}

template <typename scalar_t, typename param_t, typename Epi>
void eval_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, const Geometry& g,
                  const ChannelTensors<param_t>& t, double eps, const EpilogueArgs<scalar_t, Epi>& epilogue) {
  using Acc = acc_type<scalar_t>;
  const int64_t C = g.C;
  ChannelCoefs<scalar_t> k(C);
  // Over the threads, as the training finalize is: a head's 65536 channels
  // of a few rows took longer to set up than to normalize.
  parallel_for(0, C, kMergeGrain, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      double mean = static_cast<double>(t.running_mean[c]);
      double invstd = eval_invstd(static_cast<double>(t.running_var[c]), eps);
      if constexpr (Epi::kCoefficientsFromSaved) {
        mean = static_cast<double>(static_cast<Acc>(mean));
        invstd = static_cast<double>(static_cast<Acc>(invstd));
      }
      set_normalize_coefs<scalar_t>(c, mean, invstd, t, k);
    }
  });
  normalize<scalar_t, Epi>(x, residual, y, g, k, epilogue, streams_eval_output<scalar_t>(g));
}

}  // namespace fused_bn::cpu
