// Hand-written CPU batch-norm kernels on raw pointers.
//
// Memory traffic (x, dy read; y, dx written), per op:
//   training forward : statistics pass reads x, normalize pass reads x, writes y.
//                      NCHW with enough channels runs both passes per channel
//                      back to back, so the second read hits L2, not DRAM.
//   eval forward     : reads x, writes y.
//   backward         : reduction pass reads x and dy, dx pass reads them again
//                      and writes dx (per channel back to back for NCHW).
//
// Determinism: every reduction is split into blocks fixed by the shape alone
// (never by the thread count), each block is reduced by one thread in a fixed
// order, and blocks are merged in block order. Results are bitwise identical
// run to run and for any number of threads.
//
// Numerical stability: a block accumulates shifted sums, Σ(x−K) and Σ(x−K)²
// with K the block's first element (per channel), in the accumulation type;
// blocks are merged with Chan's parallel-variance formula in double. With the
// shift near the data, the sums carry no catastrophic cancellation even for a
// mean of 1e4 and a std of 1 in float32.
//
// The kernel layer (no torch headers beyond ATen's vec and parallel, each in
// one file): tuning.h, vec.h, parallel.h, accumulators.h, scratch.h,
// coefficients.h, epilogue.h, plan.h (which path runs when), the traversals
// (nchw_planes.h, nchw_short_planes.h, rows.h), channel_statistics.h,
// channel_finalize.h, forward.h, backward.h, data_parallel.h.
#pragma once

#include "backward.h"
#include "data_parallel.h"
#include "forward.h"
