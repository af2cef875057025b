// The CPU kernel layer's entry points as the glue calls them: one forward and
// one backward per dtype, each taking the epilogue as data. Their definitions
// (dtype_instances.h) expand the activation list (csrc/common/activation.h)
// into the kernels' template instances, one translation unit per input dtype
// (kernels_<dtype>.cpp), so a build compiles them side by side.
#pragma once

#include <cstdint>

#include "../common/activation.h"
#include "../common/epilogue.h"
#include "../common/geometry.h"
#include "channel_finalize.h"
#include "vec.h"

namespace fused_bn::cpu {

// Which forward: training (batch statistics), training with all ranks'
// gathered statistics (all_stats[ranks][C][3]), or eval (running statistics).
enum class ForwardKind { kTrain, kTrainWithStats, kEval };

template <typename scalar_t, typename param_t>
struct ForwardArgs {
  ForwardKind kind = ForwardKind::kTrain;
  const scalar_t* x = nullptr;
  const scalar_t* residual = nullptr;  // null: no residual
  scalar_t* y = nullptr;
  common::Geometry geometry;
  ChannelTensors<param_t> channels;
  common::ActivationArgs activation;
  double factor = 0.0, eps = 0.0;
  acc_type<scalar_t>* save_mean = nullptr;    // training
  acc_type<scalar_t>* save_invstd = nullptr;  // training
  const double* all_stats = nullptr;          // kTrainWithStats
  int64_t ranks = 0;                          // kTrainWithStats
};

template <typename scalar_t, typename param_t>
void run_forward(const ForwardArgs<scalar_t, param_t>& args);

struct GradSums;
struct SumsExchange;
template <typename scalar_t, typename param_t>
struct BackwardOutputs;

// The backward's per-channel tensors are in the accumulation type (the glue
// converts half/bfloat16 parameters: C values): its passes depend on the input
// dtype and the epilogue only.
template <typename scalar_t>
struct BackwardArgs {
  using Acc = acc_type<scalar_t>;
  const scalar_t* dy = nullptr;
  const scalar_t* x = nullptr;
  common::Geometry geometry;
  const Acc* weight = nullptr;  // nullable: 1
  const Acc* bias = nullptr;    // a recomputed z's shift; nullable: 0
  const scalar_t* aux = nullptr;  // the residual or y (common::GradSource)
  common::ActivationArgs activation;
  common::GradSource source = common::GradSource::kNone;
  const Acc* mean = nullptr;
  const Acc* invstd = nullptr;
  bool training = true;
  double eps = 0.0;
  // Training, one call (no SumsExchange), grad_input wanted, a recomputed u of
  // an activation with kCostlyDerivative: g is written once (Grad's kOnce),
  // to outputs->grad_residual, which is then grad_input's memory.
  bool grad_once = false;
  const BackwardOutputs<scalar_t, Acc>* outputs = nullptr;
  const SumsExchange* exchange = nullptr;
};

template <typename scalar_t>
void run_backward(const BackwardArgs<scalar_t>& args);

}  // namespace fused_bn::cpu
