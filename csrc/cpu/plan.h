// Which path runs when: the geometry of the work, how it is split into blocks
// and tasks, and every predicate that picks a strategy. The kernels branch on
// these alone.
//
//   op / input                           predicate                    traversal (file)
//   -----------------------------------  ---------------------------  ----------------------------------------
//   training forward, backward, stats:
//     NHWC (also any input with H·W = 1) g.channels_last              RowBlocking row blocks (in column
//                                                                     strips when few: RowBlockStrips),
//                                                                     merged per channel; rows by row_grain
//                                                                     (rows.h)
//     NCHW, planes <= kShortPlaneBytes,  walks_channel_blocks         ChannelBlocking blocks image by image
//       C >= 4 x threads                                              (nchw_short_planes.h); element pass plane
//                                                                     by plane when kChannelBlockPassesByPlane
//                                                                     (float, double), else as the block's
//                                                                     runs (rows.h)
//     NCHW, C >= 4 x threads             !has_few_channels_per_thread one channel per task: its PlaneBlocking
//                                                                     blocks, then its planes while in cache
//                                                                     (nchw_planes.h)
//     NCHW, C < 4 x threads              has_few_channels_per_thread  every channel's blocks over all threads,
//                                                                     merged in block order, then the planes
//                                                                     over all threads (nchw_planes.h)
//   training backward, 2 values/channel  has_two_values_per_channel   closed form in double (backward.h)
//   eval forward (normalize):
//     NHWC                               g.channels_last              rows (rows.h)
//     NCHW bf16/fp16, short planes       eval_walks_block_runs        channel blocks as runs (rows.h)
//       under four pairs
//     otherwise                                                       planes in memory order (nchw_planes.h)
//
//   outputs: training streams y / dx past kTrainingStreamBytes (streams_training_output) except on the
//   channel-block path, which stages its runs (stages_training_output); eval streams past
//   kCacheResidentBytes (streams_eval_output); NHWC streams only rows_stream_aligned rows.
//   loads: the NCHW walks prefetch when prefetch_planes.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/geometry.h"
#include "parallel.h"
#include "tuning.h"
#include "vec.h"

namespace fused_bn::cpu {

// The input as N x C x HW, channels-first or channels-last (csrc/common).
using Geometry = common::Geometry;

// Rows of `width` elements, `stride` elements apart, with per-column
// coefficients: an NHWC tensor's N·H·W rows of C channels (stride C), or an
// NCHW channel block's N image runs, each the block's planes back to back
// (stride C·H·W; a column is then one position of one channel's plane).
struct Rows {
  int64_t width, stride;
};

// NCHW blocks of one channel: either a chunk of one plane (large planes) or a
// group of whole planes (small planes).
struct PlaneBlocking {
  int64_t planes_per_block, chunk, chunks_per_plane, blocks;
  PlaneBlocking(int64_t N, int64_t HW) {
    if (HW >= kBlockElements) {
      planes_per_block = 1;
      chunk = kBlockElements;
      chunks_per_plane = (HW + chunk - 1) / chunk;
    } else {
      planes_per_block = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(HW, 1));
      chunk = HW;
      chunks_per_plane = 1;
    }
    blocks = ((N + planes_per_block - 1) / planes_per_block) * chunks_per_plane;
  }
  // Planes [n_begin, n_end) and positions [hw_begin, hw_end) of block b.
  void range(int64_t b, int64_t N, int64_t HW, int64_t& n_begin, int64_t& n_end,
             int64_t& hw_begin, int64_t& hw_end) const {
    const int64_t group = b / chunks_per_plane, piece = b % chunks_per_plane;
    n_begin = group * planes_per_block;
    n_end = std::min(N, n_begin + planes_per_block);
    hw_begin = piece * chunk;
    hw_end = std::min(HW, hw_begin + chunk);
  }
};

// NHWC row blocks: a fixed count (by shape) so partials stay small for any C.
// Every block costs O(C) beyond its rows (zeroed totals, per-channel moments
// or sums, one more step of the merge), so a block spans at least
// kMinRowsPerBlock rows: with many blocks of few rows the merge dominated
// (bench/NOTES.md, "Figures behind the kernels' choices").
struct RowBlocking {
  static constexpr int64_t kMaxBlocks = 64;
  static constexpr int64_t kMinRowsPerBlock = 256;
  int64_t rows_per_block, blocks;
  RowBlocking(int64_t rows, int64_t C) {
    const int64_t min_rows = std::max<int64_t>(kMinRowsPerBlock, kBlockElements / std::max<int64_t>(C, 1));
    blocks = std::min(kMaxBlocks, std::max<int64_t>(1, (rows + min_rows - 1) / min_rows));
    rows_per_block = (rows + blocks - 1) / blocks;
    blocks = rows == 0 ? 0 : (rows + rows_per_block - 1) / rows_per_block;
  }
  int64_t begin(int64_t b) const { return b * rows_per_block; }
  int64_t end(int64_t b, int64_t rows) const { return std::min(rows, (b + 1) * rows_per_block); }
};

// Channels [begin, end) of a row.
struct ColumnRange {
  int64_t begin, end;
  int64_t width() const { return end - begin; }
};

// The NHWC reductions' tasks: each row block (RowBlocking) split into column
// strips when the blocks alone would leave threads idle. A few wide rows (an
// MLP head's (N, C) batch) are a single row block, which one thread reduced
// while the other waited. A strip spans at least kMinStripBytes of each row,
// so each of its rows is a long contiguous run: the 64-128-byte strips of an
// earlier trial cost more in prefetching than they gained (bench/NOTES.md,
// "Fifth cut").
struct RowBlockStrips {
  static constexpr int64_t kMinStripBytes = 4096;
  RowBlocking blocks;
  int64_t per_strip, strips;
  RowBlockStrips(int64_t rows, int64_t C, int64_t tile_width, int64_t element_bytes) : blocks(rows, C) {
    const int64_t threads = std::max<int64_t>(1, thread_count());
    const int64_t wanted = blocks.blocks >= threads ? 1 : (threads + blocks.blocks - 1) / std::max<int64_t>(1, blocks.blocks);
    const int64_t widest = std::max<int64_t>(1, C * element_bytes / kMinStripBytes);
    strips = std::max<int64_t>(1, std::min(wanted, widest));
    // Strips start on tile boundaries: the per-column vectors stay aligned to
    // the padded coefficient arrays.
    per_strip = ((C + strips - 1) / strips + tile_width - 1) / tile_width * tile_width;
    strips = per_strip > 0 ? (C + per_strip - 1) / per_strip : 0;
  }
  int64_t tasks() const { return blocks.blocks * strips; }
  int64_t block(int64_t task) const { return task / strips; }
  ColumnRange strip(int64_t task, int64_t C) const {
    const int64_t begin = task % strips * per_strip;
    return {begin, std::min(C, begin + per_strip)};
  }
};

// Too few channels to keep every thread busy with whole channels: then the
// blocks of every channel are spread across the threads. Otherwise each
// channel is handled whole by one thread (statistics, then the element pass
// while the channel is still in cache).
inline bool has_few_channels_per_thread(const Geometry& g) {
  return g.C < 4 * static_cast<int64_t>(thread_count());
}

// Whether a tensor of this many elements is larger than `bytes`.
template <typename scalar_t>
inline bool larger_than(int64_t numel, int64_t bytes) {
  return numel * static_cast<int64_t>(sizeof(scalar_t)) > bytes;
}

// How far ahead of the loads the NCHW passes prefetch, in elements.
template <typename scalar_t>
constexpr int64_t kPrefetchElements = kPrefetchBytes / sizeof(scalar_t);

// Whether the NCHW passes prefetch (see kCacheResidentBytes). Planes shorter
// than the prefetch distance always do: one channel's planes are only a few
// cache lines each, a page or more apart, so even from L3 every plane is a
// fresh miss the hardware prefetcher never sees coming (bench/NOTES.md, "Figures behind the kernels' choices"). Longer
// planes stream well from L3 and only pay for it once they come from DRAM.
template <typename scalar_t>
inline bool prefetch_planes(const Geometry& g) {
  return g.HW < kPrefetchElements<scalar_t> || larger_than<scalar_t>(g.numel(), kCacheResidentBytes);
}

// One channel's planes of a few cache lines each lie C·H·W elements apart:
// walked a channel at a time they are a gather the hardware prefetcher cannot
// follow, and they come from L3 rather than L2 (bench/NOTES.md, "Figures behind the kernels' choices"). A block of consecutive channels is walked image by
// image instead: one image's planes of the block are a single contiguous run,
// and the block, over all images, stays in L2 for the pass that re-reads it.
struct ChannelBlocking {
  int64_t per_block, blocks;
  // reread_bytes: bytes per element of the tensors the second pass re-reads.
  ChannelBlocking(const Geometry& g, int64_t reread_bytes) {
    const int64_t channel_bytes = std::max<int64_t>(1, g.N * g.HW * reread_bytes);
    const int64_t threads = std::max<int64_t>(1, thread_count());
    int64_t wanted = (g.C * channel_bytes + kChannelBlockBytes - 1) / kChannelBlockBytes;
    // A whole number of blocks per thread: the last thread is not left a
    // block behind.
    wanted = std::max<int64_t>(1, (wanted + threads - 1) / threads) * threads;
    per_block = std::max<int64_t>(1, (g.C + wanted - 1) / wanted);
    // Few images make wide runs, and RunCoefs' per-column scratch would then
    // outweigh the block's data: the run is capped.
    per_block = std::min(per_block, std::max<int64_t>(1, kMaxRunColumns / std::max<int64_t>(g.HW, 1)));
    blocks = (g.C + per_block - 1) / per_block;
  }
  int64_t begin(int64_t b) const { return b * per_block; }
  int64_t end(int64_t b, int64_t C) const { return std::min(C, (b + 1) * per_block); }
  // Block b as rows (see Rows), from the block's first plane in image 0.
  Rows run(const Geometry& g, int64_t b) const { return {(end(b, g.C) - begin(b)) * g.HW, g.C * g.HW}; }
};

template <typename scalar_t>
inline bool walks_channel_blocks(const Geometry& g) {
  return !g.channels_last && g.numel() > 0 &&
         g.HW * static_cast<int64_t>(sizeof(scalar_t)) <= kShortPlaneBytes &&
         !has_few_channels_per_thread(g);
}

// How the element pass of a channel block goes: plane by plane (normalize_run,
// grad_input_run), or as the block's image runs in pieces of kRowsPerFold
// runs by one tile (normalize_rows, grad_input_rows over RunCoefs), with no
// tail at each plane's end. Runs are faster for bfloat16 (a plane of 49 fills
// 49 of 64 lanes, and each tail converts through a buffer) and slower for
// float32, whose 16 strided runs at once cost more in L1 than the tails do
// (bench/NOTES.md, "Figures behind the kernels' choices").
template <typename scalar_t>
constexpr bool kChannelBlockPassesByPlane = VecPair<scalar_t>::kNative;

// Whether a training pass streams its output in place (kTrainingStreamBytes).
// Not on the channel-block path: a short plane starts on a streamable (64-byte)
// boundary only every few planes (fp32 14x14: one in four; 7x7: one in
// sixteen), so its output would go out as a mix of streamed and ordinary
// lines, which measured slower than ordinary stores alone (bench/NOTES.md).
// That path stages its runs instead (stages_training_output).
template <typename scalar_t>
inline bool streams_training_output(const Geometry& g) {
  return larger_than<scalar_t>(g.numel(), kTrainingStreamBytes) && !walks_channel_blocks<scalar_t>(g);
}

// The channel-block path's plane-by-plane element passes
// (kChannelBlockPassesByPlane) stream a large training output through
// StagedRun instead: each image's run of the block's planes is computed into
// an L1 buffer and copied out in whole lines. Stored in place, every line of
// the cold output buffer was read for ownership and written back later
// (bench/NOTES.md, "Figures behind the kernels' choices").
template <typename scalar_t>
inline bool stages_training_output(const Geometry& g) {
  return kChannelBlockPassesByPlane<scalar_t> && larger_than<scalar_t>(g.numel(), kTrainingStreamBytes) &&
         walks_channel_blocks<scalar_t>(g);
}

// Streaming stores of NHWC tiles need every row to start aligned.
template <typename scalar_t>
inline bool rows_stream_aligned(const scalar_t* out, int64_t C) {
  return stream_aligned(out) && (C * static_cast<int64_t>(sizeof(scalar_t))) % kStreamAlignment == 0;
}

// Rows per parallel task of an NHWC element pass: about kBlockElements
// elements. A fold's worth of rows (kRowsPerFold) as the least, as it was,
// made a batch of a few wide rows (an (8, 65536) head) one thread's work.
inline int64_t row_grain(int64_t C) {
  return std::max<int64_t>(1, (kBlockElements + C - 1) / std::max<int64_t>(C, 1));
}

// A channel of two values has a closed-form backward (two_values_backward).
inline bool has_two_values_per_channel(const Geometry& g) { return g.per_channel() == 2; }

// Eval of bfloat16/float16 planes under four pairs walks channel blocks as runs
// like the training element pass (kChannelBlockPassesByPlane); from four
// whole pairs a plane the memory-order walk wins (bench/NOTES.md, "Figures behind the kernels' choices").
template <typename scalar_t>
inline bool eval_walks_block_runs(const Geometry& g) {
  return !kChannelBlockPassesByPlane<scalar_t> && walks_channel_blocks<scalar_t>(g) && g.HW < 4 * VecPair<scalar_t>::kWidth;
}

// Eval's output is read by the next layer right away: streamed only past what
// stays in cache (kCacheResidentBytes).
template <typename scalar_t>
inline bool streams_eval_output(const Geometry& g) {
  return larger_than<scalar_t>(g.numel(), kCacheResidentBytes);
}

}  // namespace fused_bn::cpu
