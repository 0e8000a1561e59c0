#pragma once

// Pinned host staging for the small tables a CUDA backend uploads before each launch (tile
// lists, sequence offsets, key runs), so that the upload is an asynchronous copy on the
// backend's stream. The buffer is rewritten only once the previous upload from it is done.
// Host compiler only: the stream is an opaque cudaStream_t.

#include <cstddef>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dilattn::attention::cuda {

// cudaError_t as Status: RESOURCE_EXHAUSTED for out of memory, INTERNAL otherwise.
absl::Status CudaErrorStatus(int err, absl::string_view what);

class StagedUpload {
 public:
  StagedUpload() = default;
  StagedUpload(const StagedUpload&) = delete;
  StagedUpload& operator=(const StagedUpload&) = delete;
  ~StagedUpload();

  // At least `bytes` of pinned memory to write the next upload into, once the last upload
  // from it has completed.
  absl::StatusOr<unsigned char*> Reserve(size_t bytes);
  // Copies the first `bytes` of the staging buffer to `device` on `stream`.
  absl::Status Upload(void* device, size_t bytes, void* stream);

 private:
  void* host_ = nullptr;
  size_t bytes_ = 0;
  void* done_ = nullptr;  // cudaEvent_t recorded after the last upload
};

}  // namespace dilattn::attention::cuda
