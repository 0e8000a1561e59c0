#pragma once

#include "absl/status/status.h"
#include "kernels/attention/attention.h"

namespace dilattn::attention {

// A direct float64 evaluation of DESIGN.md section 1, in torchscale's formulation: every branch's
// attention is computed on its own (a two-pass softmax per segment), then the branches are mixed
// with weights proportional to their softmax denominators. Slow and simple, host memory only; it
// anchors the tests of every faster path.
absl::Status ReferenceAttention(const AttentionPlan& plan, const AttentionTensors& tensors);

}  // namespace dilattn::attention
