#pragma once

// Host entry points of the multihead module's own CUDA kernels. No CUDA types: the stream is an
// opaque cudaStream_t, the result a cudaError_t value (0 is success).

#include <cstdint>

#include "kernels/attention/params.h"

namespace dilattn::multihead::cuda {

// A row of the attention's output: num_heads heads of pad_dim values, of which the first
// head_dim are the head's and the rest padding (pad_dim == head_dim when none).
struct RowHeads {
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  int64_t pad_dim = 0;
};

// In place over `rows` rows of fp16 or bf16 values (num_heads * pad_dim % 8 == 0, rows 16-byte
// aligned): y = (x - mean) / sqrt(var + eps) * gamma + beta over each row's num_heads * head_dim
// real values, statistics in fp32 over two passes. gamma and beta are in the row's layout; the
// padding's results are gamma * (x - mean) / sigma + beta like any other column's.
int LaunchLayerNorm(void* data, int64_t rows, RowHeads heads, attention::DType dtype,
                    const float* gamma, const float* beta, float eps, void* stream);

}  // namespace dilattn::multihead::cuda
