// The one preparation both devices' glue makes of an input: the tensor in a
// layout the kernels read natively (one copy otherwise), the memory format of
// every output (checks.h's batch_norm_memory_format, nn's rule), and the
// kernels' Geometry (csrc/common/geometry.h), whose layout is the one the
// kernels read best where both describe the memory.
#pragma once

#include <ATen/ATen.h>

#include "../common/epilogue.h"
#include "../common/geometry.h"
#include "checks.h"

namespace fused_bn {

struct PreparedInput {
  at::Tensor tensor;
  at::MemoryFormat format;
  common::Geometry geometry;
};

inline PreparedInput prepare(const at::Tensor& input) {
  const at::MemoryFormat format = batch_norm_memory_format(input);
  at::Tensor x = input.contiguous(format);
  common::Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.HW *= x.size(d);
  g.channels_last = format == at::MemoryFormat::ChannelsLast || format == at::MemoryFormat::ChannelsLast3d;
  // With one position per image (BatchNorm1d's (N, C) rows) or one channel both
  // layouts address the same memory: take the one whose contiguous run is
  // longer, rows of C channels or whole planes, which the kernels read
  // vectorized (on the CPU the planes of one element made (N, C) 10-50x
  // slower than nn, bench/NOTES.md).
  if (g.HW == 1) {
    g.channels_last = true;
  } else if (g.C == 1) {
    g.channels_last = false;
  }
  return {x, format, g};
}

// The forward's epilogue: its activation, and its residual in the input's
// layout (undefined when there is none).
struct PreparedEpilogue {
  common::ActivationArgs activation;
  at::Tensor residual;
  bool has_residual() const { return residual.defined(); }
};

inline PreparedEpilogue prepare_epilogue(c10::string_view activation, at::ArrayRef<double> activation_params,
                                         const c10::optional<at::Tensor>& residual, const PreparedInput& in) {
  const common::ActivationArgs args = parse_activation(activation, activation_params);
  if (residual.has_value() && residual->defined()) return {args, residual->contiguous(in.format)};
  return {args, at::Tensor()};
}

}  // namespace fused_bn
