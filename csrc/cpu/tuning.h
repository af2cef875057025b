// Tuning constants of the CPU kernels: block sizes, cache and streaming
// thresholds. Measured on a 2-core AMD EPYC (1 MB L2 per core, 32 MB shared
// L3); the measurements behind each are in bench/NOTES.md.
#pragma once

#include <cstdint>

namespace fused_bn::cpu {

// ---------------------------------------------------------------------------

// Target elements per reduction block: large enough to amortize the per-block
// merge, small enough that float partial sums stay accurate.
constexpr int64_t kBlockElements = 4096;

// Rows (NHWC) or vector steps (NCHW) summed in the accumulation type before
// folding into double: short float runs keep each lane's rounding tiny even when
// the data sit far from the block's shift.
constexpr int64_t kRowsPerFold = 16;

// Tensors (one of x, y, dy, dx) up to this size stay in the shared 32 MB L3
// next to their partner; larger ones go to and from DRAM, where two things pay:
//  - streaming (non-temporal) stores of the output: they skip the read for
//    ownership an ordinary store of a missing line costs, and they no longer
//    evict the input a second pass re-reads. Eval's output is read by the next
//    layer right away, so below this size it is stored normally and stays in
//    cache for it (training outputs: kTrainingStreamBytes).
//  - software prefetch in the NCHW passes: the hardware prefetcher stops at
//    every 4 KB page and restarts on every plane (one channel's planes lie
//    C·H·W elements apart), which left the statistics pass stalled on loads.
//    On cache-resident data the prefetches only cost instructions.
constexpr int64_t kCacheResidentBytes = int64_t{16} << 20;

// A training step's outputs (forward's y, backward's dx) are streamed once the
// step's four input-sized tensors (x, y, dy, dx) outgrow half the L3. Their
// buffers are fresh allocations, cold in cache, so an ordinary store pays a
// read for ownership of every line and a write-back later, and it evicts the
// x and dy the next pass re-reads. Below that, the lines an ordinary store
// brings in stay in cache for the step (and y for the next layer)
// (bench/NOTES.md, "Figures behind the kernels' choices").
constexpr int64_t kTrainingStreamBytes = int64_t{4} << 20;

// How far ahead of the loads the NCHW passes prefetch.
constexpr int64_t kPrefetchBytes = 4096;

// Channels per task when merging NHWC block partials: below this the merge
// runs on the calling thread, cheaper than waking the pool.
constexpr int64_t kMergeGrain = 256;

// NCHW planes up to this size are walked by channel blocks (ChannelBlocking),
// which keep a block's planes, over all images, within this much of a core's L2.
constexpr int64_t kShortPlaneBytes = 1024;
constexpr int64_t kChannelBlockBytes = int64_t{256} << 10;
constexpr int64_t kMaxRunColumns = 8192;

// Granularity of the row passes that walk their rows backwards (rows_walk).
constexpr int64_t kReverseSpanBytes = int64_t{256} << 10;

}  // namespace fused_bn::cpu
