#pragma once

// Models: a Triton-style repository (one directory per model holding config.pbtxt) or the
// built-in default repository. A config names the operator and its defaults in `parameters`,
// the tensors in `input`/`output`, and the batcher in `dynamic_batching`.

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "inference/model_config.pb.h"
#include "kernels/attention/attention.h"
#include "server/operator_options.h"

namespace dilattn::server {

struct BatchingPolicy {
  int64_t max_batch_size = 0;  // sequences per request (B) and per execution; 0: no batch dim
  bool dynamic = false;        // dynamic_batching: requests join batches; else each runs alone
  std::vector<int64_t> preferred_batch_sizes;
  absl::Duration max_queue_delay = absl::ZeroDuration();
  int priority_levels = 1;    // levels 1..priority_levels, 1 served first (Triton's order)
  int default_priority = 1;
  size_t max_queue_size = 0;  // requests waiting in the model's queue; 0: unbounded
  absl::Duration default_timeout = absl::ZeroDuration();  // zero: none
  bool allow_timeout_override = true;
  int64_t max_batch_tokens = int64_t{1} << 20;  // tokens per execution when batching
};

struct ModelSpec {
  std::string name;
  std::string version = "1";
  inference::ModelConfig config;  // as served by the ModelConfig RPC
  OperatorOptions defaults;
  attention::DType declared_dtype = attention::DType::kFloat32;
  // N, H, D; -1 accepts any. The multihead module fixes H and D by its weights.
  std::array<int64_t, 3> dims = {-1, -1, -1};
  BatchingPolicy batching;
  // What callers send and receive: Q, K, V -> O, each [B, N, H, D]; or, for the multihead module,
  // hidden states X -> Y, each [B, N, E] with E = H * D.
  bool hidden_states() const { return defaults.kind == OperatorKind::kMultihead; }
  std::vector<std::string> input_names() const {
    if (hidden_states()) return {"X"};
    return {"Q", "K", "V"};
  }
  std::string output_name() const { return hidden_states() ? "Y" : "O"; }
  // The inputs for messages: "Q, K and V", or "X".
  std::string InputList() const { return hidden_states() ? "X" : "Q, K and V"; }
};

// Parses and checks one config.pbtxt. `source` names it in messages; `directory_name`, when not
// empty, must match the config's name (an empty config name takes it). A relative `weights` path
// (the multihead module's) is taken from `model_dir`, the model's directory.
absl::StatusOr<ModelSpec> ParseModelConfig(absl::string_view text, absl::string_view source,
                                           absl::string_view directory_name,
                                           absl::string_view model_dir = "");

// Fields of a Triton config that dilattn accepts (configs written for Triton carry them) but does
// not act on, named where their value would change what Triton does: a platform, an
// instance_group of more than one instance, with gpus or of kind KIND_CPU,
// dynamic_batching.preserve_ordering true, an input optional true. One line for the start-up log
// ("model 'm' sets ... ; ignored"), empty when none is set.
std::string IgnoredConfigFieldsWarning(const inference::ModelConfig& config);

// Every <dir>/<model>/config.pbtxt. At least one model, no duplicate names.
absl::StatusOr<std::vector<ModelSpec>> LoadModelRepository(const std::string& dir);

// dilated_attention (longnet), dilated_attention_head_groups, block_sparse_attention.
std::vector<ModelSpec> DefaultModels();

}  // namespace dilattn::server
