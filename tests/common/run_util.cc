#include "tests/common/run_util.h"

namespace dilattn::testing {

absl::Status RunWithWorkspace(attention::AttentionBackend& backend,
                              const attention::AttentionPlan& plan,
                              const attention::AttentionTensors& tensors) {
  static memory::BufferPool* pool = [] {
    auto created = memory::BufferPool::Create({"test-workspace", size_t{16} << 30},
                                              memory::NewHostAllocator());
    return created.ok() ? created->release() : nullptr;
  }();
  if (pool == nullptr) return absl::InternalError("cannot create the test workspace pool");
  const size_t bytes = backend.WorkspaceBytes(plan);
  memory::Buffer workspace;
  if (bytes > 0) {
    absl::StatusOr<memory::Buffer> leased = pool->Acquire(bytes);
    if (!leased.ok()) return leased.status();
    workspace = *std::move(leased);
  }
  return backend.Run(plan, tensors, {workspace.data(), workspace.size(), DeviceLoc::Host()});
}

std::vector<std::unique_ptr<attention::AttentionBackend>> AllCpuBackends(int threads) {
  std::vector<std::unique_ptr<attention::AttentionBackend>> out;
  for (const char* isa : {"avx512", "avx2", "generic"}) {
    auto backend = attention::CreateCpuBackend({threads, isa});
    if (backend.ok()) out.push_back(*std::move(backend));
  }
  return out;
}

}  // namespace dilattn::testing
