// The definitions of entry_points.h's run_forward / run_backward, included
// by one translation unit per input dtype (kernels_<dtype>.cpp) with
// FUSED_BN_CPU_INSTANCES(scalar_t, param_t...) naming what it instantiates.
#pragma once

#include <type_traits>

#include "entry_points.h"
#include "kernels.h"

namespace fused_bn::cpu {

template <typename scalar_t, typename param_t>
void run_forward(const ForwardArgs<scalar_t, param_t>& a) {
  common::with_epilogue(a.activation.kind, a.residual != nullptr, [&](auto epi) {
    const EpilogueArgs<scalar_t, decltype(epi)> epilogue(a.activation);
    switch (a.kind) {
      case ForwardKind::kTrain:
        train_forward<scalar_t, param_t>(a.x, a.residual, a.y, a.geometry, a.channels, a.factor, a.eps, epilogue,
                                         a.save_mean, a.save_invstd);
        return;
      case ForwardKind::kTrainWithStats:
        train_forward_with_stats<scalar_t, param_t>(a.x, a.residual, a.y, a.geometry, a.channels, a.factor, a.eps,
                                                    epilogue, a.all_stats, a.ranks, a.save_mean, a.save_invstd);
        return;
      case ForwardKind::kEval:
        eval_forward<scalar_t, param_t>(a.x, a.residual, a.y, a.geometry, a.channels, a.eps, epilogue);
        return;
    }
  });
}

template <typename scalar_t>
void run_backward(const BackwardArgs<scalar_t>& a) {
  using Acc = acc_type<scalar_t>;
  common::with_activation(a.activation.kind, [&](auto activation) {
    // decay: GCC reads decltype of the parameter inside the nested lambdas below as a reference.
    using A = std::decay_t<decltype(activation)>;
    common::with_grad_source<A>(a.source, [&](auto source) {
      constexpr common::GradSource kSource = decltype(source)::value;
      auto run = [&](auto grad) {
        backward<scalar_t, Acc, decltype(grad)>(a.dy, a.x, a.geometry, a.weight, a.bias, a.aux,
                                                ActParams<scalar_t, A>::from(a.activation), a.mean, a.invstd,
                                                a.training, a.eps, *a.outputs, *a.exchange);
      };
      if constexpr (kSource == common::GradSource::kInput && A::kCostlyDerivative) {
        if (a.grad_once) return run(Grad<A, kSource, true>{});
      }
      run(Grad<A, kSource>{});
    });
  });
}

}  // namespace fused_bn::cpu

// The instances of one input dtype: its backward, and its forward with each
// parameter dtype it takes.
#define FUSED_BN_CPU_FORWARD_INSTANCE(scalar_t, param_t) \
  template void run_forward<scalar_t, param_t>(const ForwardArgs<scalar_t, param_t>&);
#define FUSED_BN_CPU_BACKWARD_INSTANCE(scalar_t) \
  template void run_backward<scalar_t>(const BackwardArgs<scalar_t>&);
