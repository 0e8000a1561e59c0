#pragma once

// The operator a model runs and its options, as set by a model's config.pbtxt parameters and
// overridden per request by KServe request parameters. One parser serves both, so a name means
// the same thing in either place.

#include <cstdint>
#include <memory>
#include <string>
#include <variant>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "kernels/attention/attention.h"
#include "kernels/block_sparse/block_sparse.h"
#include "kernels/multihead/multihead.h"

namespace dilattn::server {

// kMultihead: hidden states through the model's weights and dilated attention (`dilated`).
enum class OperatorKind { kDilatedAttention, kBlockSparse, kMultihead };

struct OperatorOptions {
  OperatorKind kind = OperatorKind::kDilatedAttention;
  attention::AttentionOptions dilated;
  block_sparse::BlockSparseOptions sparse;
  std::shared_ptr<const multihead::MultiheadWeights> weights;  // kMultihead: loaded at start-up
};

// Whether `kind` takes the dilated-attention options (segment_lengths, dilation_rates, ...).
constexpr bool UsesDilatedOptions(OperatorKind kind) { return kind != OperatorKind::kBlockSparse; }

// A parameter value as it arrives: config.pbtxt gives strings, KServe requests give typed values.
using ParamValue = std::variant<bool, int64_t, uint64_t, double, std::string>;

// Sets one option. INVALID_ARGUMENT naming the parameter for an unknown name (for this operator)
// or a value of the wrong form. `where` ("request parameter", "config parameter") prefixes
// messages.
absl::Status ApplyOperatorParameter(absl::string_view name, const ParamValue& value,
                                    absl::string_view where, OperatorOptions* options);

// True for the names ApplyOperatorParameter accepts for `kind`.
bool IsOperatorParameter(OperatorKind kind, absl::string_view name);

// A canonical text of everything that changes the computation, so that two requests batch
// together exactly when their keys are equal.
std::string OperatorKey(const OperatorOptions& options);

std::string ParamValueToString(const ParamValue& value);

}  // namespace dilattn::server
