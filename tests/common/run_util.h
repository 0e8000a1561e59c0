#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/attention/attention.h"
#include "kernels/memory/buffer_pool.h"

namespace dilattn::testing {

// Runs `backend` with a workspace leased from a process-wide host pool, as the engine does.
absl::Status RunWithWorkspace(attention::AttentionBackend& backend,
                              const attention::AttentionPlan& plan,
                              const attention::AttentionTensors& tensors);

// One CPU backend per instruction set this processor runs, with `threads` workers each.
std::vector<std::unique_ptr<attention::AttentionBackend>> AllCpuBackends(int threads);

}  // namespace dilattn::testing
