// How a block walks its share of the input: the channels-first cursor, and
// the element passes of both layouts.
#pragma once

#include "device_primitives.cuh"

#include <cstdint>

namespace fused_bn {
namespace cuda {
// Internal to the kernel layer (forward.cu, backward.cu).
namespace detail {

// ---------------------------------------------------------------------------
// Channels-first traversal: a block owns one channel's slice [begin, end) of
// the N x (HW / kVec) vector positions; each thread visits begin + tid,
// begin + tid + blockDim.x, ... The cursor keeps (image, vector in plane) and
// steps without a division per element.
class PlaneCursor {
 public:
  __device__ PlaneCursor(int64_t position, int64_t stride, int64_t plane_vectors)
      : plane_vectors_(plane_vectors),
        image_(position / plane_vectors),
        vector_(position % plane_vectors),
        stride_images_(stride / plane_vectors),
        stride_vectors_(stride % plane_vectors) {}

  // Element offset from the channel's first element; image_stride = C * HW.
  __device__ int64_t offset(int64_t image_stride, int vec) const {
    return image_ * image_stride + vector_ * vec;
  }

  __device__ void advance() {
    vector_ += stride_vectors_;
    image_ += stride_images_;
    if (vector_ >= plane_vectors_) {
      vector_ -= plane_vectors_;
      ++image_;
    }
  }

 private:
  int64_t plane_vectors_;
  int64_t image_;
  int64_t vector_;
  int64_t stride_images_;
  int64_t stride_vectors_;
};

// Flattened channels-first traversal (scalar element passes): a thread
// visits elements index, index + stride, ... of the whole N x C x HW tensor;
// the cursor keeps the channel of the one it is at (and where in its plane),
// stepping without a division per element.
class FlatChannelCursor {
 public:
  __device__ FlatChannelCursor(int64_t index, int64_t stride, int64_t plane, int64_t channels)
      : plane_(plane),
        channels_(channels),
        within_(index % plane),
        channel_((index / plane) % channels),
        stride_within_(stride % plane),
        stride_channels_((stride / plane) % channels) {}

  __device__ int64_t channel() const { return channel_; }

  __device__ void advance() {
    within_ += stride_within_;
    channel_ += stride_channels_;
    if (within_ >= plane_) {
      within_ -= plane_;
      ++channel_;
    }
    if (channel_ >= channels_) channel_ -= channels_;  // at most 2C - 1 before
  }

 private:
  int64_t plane_;
  int64_t channels_;
  int64_t within_;
  int64_t channel_;
  int64_t stride_within_;
  int64_t stride_channels_;
};

// A channels-first block's share (grid (C, splits), 1-D blocks): vector
// positions [begin, end) of channel `channel`'s N x HW/kVec, split `split`;
// a thread starts at begin + threadIdx.x and steps by `stride`.
struct ChannelsFirstShare {
  int64_t channel, split, plane_vectors, begin, end, image_stride, stride;
  __device__ __forceinline__ ChannelsFirstShare(const Geometry& g, int vec, int64_t vectors_per_split)
      : channel(blockIdx.x),
        split(blockIdx.y),
        plane_vectors(g.HW / vec),
        begin(split * vectors_per_split),
        end(min_index(g.N * plane_vectors, begin + vectors_per_split)),
        image_stride(g.C * g.HW),
        stride(blockDim.x) {}
};

// A channels-last block's share (grid (column tiles, splits), blocks of
// vector columns x rows): the thread's vector column `column` of `columns`,
// rows [begin, end) of the N*HW, from begin + threadIdx.y by `row_step`.
struct ChannelsLastShare {
  int64_t columns, column, begin, end, row_step;
  __device__ __forceinline__ ChannelsLastShare(const Geometry& g, int vec, int64_t rows_per_split)
      : columns(g.C / vec),
        column(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x),
        begin(static_cast<int64_t>(blockIdx.y) * rows_per_split),
        end(min_index(g.N * g.HW, begin + rows_per_split)),
        row_step(blockDim.y) {}
};

// ---------------------------------------------------------------------------
// Channels-first reductions over short planes that are not whole vectors
// (7x7, 14x14 of 16-bit types, primes): a block per channel had each warp
// request straddle the end of one image's plane and the start of the next's,
// C * HW elements away (7x7 float32: 74% of the sector bytes used, bfloat16
// 57%). Staged instead: grid (channel groups, splits), 256 threads, a block
// owning kStagedChannels consecutive channels, whose planes are one
// contiguous run per image, and a split's images. Per round the block loads
// the runs of a few images into shared memory, consecutive threads on
// consecutive elements (whole sectors), then warp w folds channel
// first + w's plane of each image from there, lane l taking elements l, l + 32, ...
constexpr int kStagedChannels = kMaxThreads / kWarpSize;  // a warp per channel
constexpr int kStagedElements = 2048;                      // per staged tensor and round
constexpr int64_t kStagedPlaneMax = kStagedElements / kStagedChannels;

// Host: whether a channels-first reduction with vector width vec takes the staged traversal.
inline bool uses_staged_planes(const Geometry& g, int vec) {
  return !g.channels_last && vec == 1 && g.HW >= 1 && g.HW <= kStagedPlaneMax;
}

// visit(values, valid) gets a lane's next values of its warp's channel in one
// image, values[u][t] from tensor t, the first `valid` of the kUnroll rows
// set (1..kUnroll); warps past the last channel visit nothing. Every thread
// must call this (it holds the block's barriers). With kWrites the pass also
// writes one output element per element visited: visit(values, valid,
// written) sets written[u] for the valid rows, which go into tensor 0's tile
// in place of the values read (a lane rewrites only what it read), and
// after the round's folds the block stores that tile to `output` through the
// same 32-element windows as the loads (whole sectors too).
template <typename scalar_t, int kTensors, bool kWrites = false, typename Visit>
__device__ __forceinline__ void staged_planes_pass(const scalar_t* const (&inputs)[kTensors], const Geometry& g,
                                                   int64_t images_per_split, Visit&& visit,
                                                   scalar_t* __restrict__ output = nullptr) {
  __shared__ scalar_t tile[kTensors][kStagedElements];
  static_assert(sizeof(tile) <= 48 * 1024, "static shared memory is at most 48 KB a block");
  const int64_t first_channel = static_cast<int64_t>(blockIdx.x) * kStagedChannels;
  const int channels = static_cast<int>(min_index(kStagedChannels, g.C - first_channel));
  const int plane = static_cast<int>(g.HW);
  const int run = channels * plane;
  const int images_per_round = kStagedElements / run;
  const int64_t image_begin = static_cast<int64_t>(blockIdx.y) * images_per_split;
  const int64_t image_end = min_index(g.N, image_begin + images_per_split);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t image_stride = g.C * g.HW;
  const int64_t run_offset = first_channel * g.HW;
  // Each image's run is loaded in a window from the 32-element boundary at or
  // below its start, so a warp's request covers whole sectors whatever the
  // run's alignment (16-bit 7x7 runs start 16 bytes into a sector every other
  // image). Lanes outside the run load its nearest element (a sector the
  // request touches anyway) and keep nothing: every lane issues every load,
  // as the traffic accounting's grouping assumes. The stores of kWrites take
  // the same windows, a lane outside the run storing its nearest element's
  // value again (the one that element's own lane stores: same sectors, same
  // bytes).
  const int window = (run + 2 * kWarpSize - 2) / kWarpSize * kWarpSize;
  // f(i, start, e, at) for each of the round's window slots of this thread:
  // image + i's run at element `start`, slot e of it (-31..run+30), at the
  // element it accesses (e clamped into the run).
  auto for_each_slot = [&](int64_t image, int images, auto&& f) {
    const int slots = images * window;
#pragma unroll 4
    for (int q = static_cast<int>(threadIdx.x); q < slots; q += static_cast<int>(blockDim.x)) {
      const int i = q / window;
      const int64_t start = (image + i) * image_stride + run_offset;
      const int e = q - i * window - static_cast<int>(static_cast<uint64_t>(start) % kWarpSize);
      f(i, start, e, e < 0 ? 0 : (e < run ? e : run - 1));
    }
  };
  for (int64_t image = image_begin; image < image_end; image += images_per_round) {
    const int images = static_cast<int>(min_index(images_per_round, image_end - image));
    for_each_slot(image, images, [&](int i, int64_t start, int e, int at) {
#pragma unroll
      for (int t = 0; t < kTensors; ++t) {
        const scalar_t v = load_bundle<scalar_t, 1>(inputs[t] + start + at).v[0];
        if (at == e) tile[t][i * run + e] = v;
      }
    });
    __syncthreads();
    if (warp < channels) {
      for (int at = warp * plane; at < images * run; at += run) {
        for (int first = 0; first < plane; first += kWarpSize * kUnroll) {
          scalar_t values[kUnroll][kTensors];
          int valid = 0;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int k = first + lane + u * kWarpSize;
            if (k < plane) {
#pragma unroll
              for (int t = 0; t < kTensors; ++t) values[u][t] = tile[t][at + k];
              valid = u + 1;
            }
          }
          if (valid > 0) {
            if constexpr (kWrites) {
              scalar_t written[kUnroll];
              visit(values, valid, written);
#pragma unroll
              for (int u = 0; u < kUnroll; ++u) {
                if (u < valid) tile[0][at + first + lane + u * kWarpSize] = written[u];
              }
            } else {
              visit(values, valid);
            }
          }
        }
      }
    }
    if constexpr (kWrites) {
      __syncthreads();  // every warp's elements are written to the tile
      for_each_slot(image, images, [&](int i, int64_t start, int, int at) {
        Bundle<scalar_t, 1> v;
        v.v[0] = tile[0][i * run + at];
        store_bundle<scalar_t, 1>(output + start + at, v);
      });
    }
    __syncthreads();  // the round's reads are done before the next overwrites
  }
}

// ---------------------------------------------------------------------------
// Element passes, written once per layout: out = f(in0, in1) element by
// element, f one channel's per-element op (an Op holding its coefficients),
// made by Op::of_channel(source, c) from the kernel's coefficient arguments. kInputs is 1 (in0 only: in1 is not
// read, and f, which ignores it, gets in0 again) or 2. Loads of kSteps groups go
// before their stores, so kSteps loads are in flight per thread.

// Channels-first on scalar accesses (planes that are not whole vectors, or
// unaligned pointers): grid (blocks), each block a run of elements_per_block
// consecutive elements of the flattened tensor, so a warp's lanes read 32
// consecutive elements (whole sectors) where a channel's blocks would have
// each warp straddle the end of one image's plane and the start of the
// next's, C * HW elements away (7x7 planes: 74% of the sector bytes used).
// An element's channel comes from the cursor; the op is reloaded when it
// changes (from L1: the coefficients are C-sized).
template <typename Op, typename scalar_t, int kSteps, int kInputs>
__device__ __forceinline__ void flat_element_pass(const scalar_t* __restrict__ in0, const scalar_t* __restrict__ in1,
                                                  scalar_t* __restrict__ out, const Geometry& geometry,
                                                  int64_t elements_per_block, const typename Op::Source& source) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * elements_per_block;
  const int64_t end = min_index(geometry.numel(), begin + elements_per_block);
  const int64_t stride = blockDim.x;
  int64_t index = begin + threadIdx.x;
  if (index >= end) return;

  FlatChannelCursor cursor(index, stride, geometry.HW, geometry.C);
  int64_t op_channel = cursor.channel();
  Op op = Op::of_channel(source, op_channel);
  for (; index < end; index += stride * kSteps) {
    Bundle<scalar_t, 1> a[kSteps], b[kSteps];
    int64_t channels[kSteps];
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      channels[u] = cursor.channel();
      if (index + u * stride < end) {
        a[u] = load_bundle<scalar_t, 1>(in0 + index + u * stride);
        if (kInputs > 1) b[u] = load_bundle<scalar_t, 1>(in1 + index + u * stride);
      }
      cursor.advance();
    }
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      if (index + u * stride < end) {
        if (channels[u] != op_channel) {
          op_channel = channels[u];
          op = Op::of_channel(source, op_channel);
        }
        Bundle<scalar_t, 1> y;
        y.v[0] = op(a[u].v[0], kInputs > 1 ? b[u].v[0] : a[u].v[0]);
        store_bundle<scalar_t, 1>(out + index + u * stride, y);
      }
    }
  }
}

// Channels-first: grid (C, splits), a block over one channel's slice of its
// N x HW/kVec vector positions; scalar accesses (kVec 1) walk the flattened
// tensor instead (flat_element_pass, make_plan's PassKind::kElement grid).
template <typename Op, typename scalar_t, int kVec, int kSteps, int kInputs>
__device__ __forceinline__ void channels_first_element_pass(const scalar_t* __restrict__ in0,
                                                            const scalar_t* __restrict__ in1,
                                                            scalar_t* __restrict__ out, const Geometry& geometry,
                                                            int64_t vectors_per_split,
                                                            const typename Op::Source& source) {
  if constexpr (kVec == 1) {
    flat_element_pass<Op, scalar_t, kSteps, kInputs>(in0, in1, out, geometry, vectors_per_split, source);
    return;
  }
  // First: computing an op may call out (eval's double sqrt and division),
  // and the fewer values live across that call, the fewer ptxas spills.
  const Op op = Op::of_channel(source, blockIdx.x);
  const auto [channel, split, plane_vectors, begin, end, image_stride, stride] =
      ChannelsFirstShare(geometry, kVec, vectors_per_split);
  int64_t position = begin + threadIdx.x;
  if (position >= end) return;

  const int64_t channel_offset = channel * geometry.HW;
  PlaneCursor cursor(position, stride, plane_vectors);
  for (; position < end; position += stride * kSteps) {
    Bundle<scalar_t, kVec> a[kSteps], b[kSteps];
    int64_t offsets[kSteps];
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      offsets[u] = channel_offset + cursor.offset(image_stride, kVec);
      if (position + u * stride < end) {
        a[u] = load_bundle<scalar_t, kVec>(in0 + offsets[u]);
        if (kInputs > 1) b[u] = load_bundle<scalar_t, kVec>(in1 + offsets[u]);
      }
      cursor.advance();
    }
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      if (position + u * stride < end) {
        Bundle<scalar_t, kVec> y;
#pragma unroll
        for (int j = 0; j < kVec; ++j) y.v[j] = op(a[u].v[j], kInputs > 1 ? b[u].v[j] : a[u].v[j]);
        store_bundle<scalar_t, kVec>(out + offsets[u], y);
      }
    }
  }
}

// Channels-last: grid (column tiles, splits), blocks of vector columns x rows
// over the N*HW rows of C channels; a thread's kVec channels each have their op.
template <typename Op, typename scalar_t, int kVec, int kSteps, int kInputs>
__device__ __forceinline__ void channels_last_element_pass(const scalar_t* __restrict__ in0,
                                                           const scalar_t* __restrict__ in1,
                                                           scalar_t* __restrict__ out, const Geometry& geometry,
                                                           int64_t rows_per_split,
                                                           const typename Op::Source& source) {
  const auto [columns, column, begin, end, row_step] = ChannelsLastShare(geometry, kVec, rows_per_split);
  int64_t row = begin + threadIdx.y;
  if (column >= columns || row >= end) return;

  Op ops[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) ops[j] = Op::of_channel(source, column * kVec + j);
  const int64_t offset_step = row_step * geometry.C;
  int64_t offset = row * geometry.C + column * kVec;
  for (; row < end; row += row_step * kSteps) {
    Bundle<scalar_t, kVec> a[kSteps], b[kSteps];
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      if (row + u * row_step < end) {
        a[u] = load_bundle<scalar_t, kVec>(in0 + offset + u * offset_step);
        if (kInputs > 1) b[u] = load_bundle<scalar_t, kVec>(in1 + offset + u * offset_step);
      }
    }
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      if (row + u * row_step < end) {
        Bundle<scalar_t, kVec> y;
#pragma unroll
        for (int j = 0; j < kVec; ++j) y.v[j] = ops[j](a[u].v[j], kInputs > 1 ? b[u].v[j] : a[u].v[j]);
        store_bundle<scalar_t, kVec>(out + offset + u * offset_step, y);
      }
    }
    offset += kSteps * offset_step;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace fused_bn
