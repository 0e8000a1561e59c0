#pragma once

// A problem whose head dim D has no GPU kernel (96, 48, 8, ...) runs as the next head dim Dp that
// has one: Q and K get Dp - D zero columns, which add nothing to a score, the softmax keeps D's
// scale, and O's extra columns are dropped. The server's executor pads dilated and block-sparse
// plans this way, the sequence-parallel runner each GPU's slice, the multihead module its
// projections' outputs. Pure C++.

#include <cstdint>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kernels/attention/attention.h"

namespace dilattn::attention {

// Every head dim a GPU attention kernel is built for, smallest first.
inline constexpr int64_t kKernelHeadDims[] = {16, 32, 64, 128, 256};

// The plan of the same problem at the smallest kernel head dim above plan.shape.head_dim that
// `supported` accepts. `replan(shape)` plans the padded shape (with the original scale fixed);
// `supported(plan)` is the backend's own selector. NOT_FOUND when the plan runs as it is or no
// head dim takes it.
template <class Plan, class Supported, class Replan>
absl::StatusOr<Plan> PadHeadDim(const Plan& plan, Supported&& supported, Replan&& replan) {
  if (supported(plan)) return absl::NotFoundError("runs unpadded");
  for (int64_t dim : kKernelHeadDims) {
    if (dim <= plan.shape.head_dim) continue;
    auto shape = plan.shape;
    shape.head_dim = dim;
    absl::StatusOr<Plan> padded = replan(std::move(shape));
    if (padded.ok() && supported(*padded)) return padded;
  }
  return absl::NotFoundError(absl::StrCat("no GPU kernel for head_dim ", plan.shape.head_dim));
}

// PadHeadDim for a dilated-attention plan on `backend`: the same options with the plan's
// softmax scale fixed, the backend's Supports() as the selector.
inline absl::StatusOr<AttentionPlan> PaddedAttentionPlan(const AttentionPlan& plan,
                                                         const AttentionBackend& backend) {
  AttentionOptions options = plan.options;
  options.softmax_scale = plan.params.scale;
  return PadHeadDim(
      plan, [&](const AttentionPlan& p) { return backend.Supports(p).ok(); },
      [&](const ProblemShape& shape) { return PlanAttention(options, shape); });
}

// The plan as `backend` runs it: `plan` itself where the backend takes it, else padded
// (PaddedAttentionPlan); otherwise the backend's own refusal of `plan`.
inline absl::StatusOr<AttentionPlan> PlanAsRun(const AttentionPlan& plan,
                                               const AttentionBackend& backend) {
  absl::Status own = backend.Supports(plan);
  if (own.ok()) return plan;
  absl::StatusOr<AttentionPlan> padded = PaddedAttentionPlan(plan, backend);
  if (!padded.ok()) return own;
  return padded;
}

}  // namespace dilattn::attention
