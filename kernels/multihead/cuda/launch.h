#pragma once

// Host entry points of the multihead module's own CUDA kernels. No CUDA types: the stream is an
// opaque cudaStream_t, the result a cudaError_t value (0 is success).

#include <cstdint>

#include "kernels/attention/params.h"

namespace dilattn::multihead::cuda {

// In place over `rows` rows of `cols` fp16 or bf16 values (cols % 8 == 0, rows 16-byte aligned):
// y = (x - mean) / sqrt(var + eps) * gamma + beta, statistics in fp32 over two passes.
int LaunchLayerNorm(void* data, int64_t rows, int64_t cols, attention::DType dtype,
                    const float* gamma, const float* beta, float eps, void* stream);

}  // namespace dilattn::multihead::cuda
