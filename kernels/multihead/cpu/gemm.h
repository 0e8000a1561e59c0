#pragma once

// The CPU path's matrix product for the projections: c (m, n) = a (m, k) . b (k, n) + bias (n),
// fp32, row-major with leading dimensions. Built once per instruction set (gemm_<isa>.cc, the
// same source with different register blocks); the driver splits c into blocks over a thread pool.

#include <cstdint>

#include "absl/strings/string_view.h"
#include "kernels/attention/cpu/thread_pool.h"

namespace dilattn::multihead::cpu {

struct GemmArgs {
  const float* a;
  int64_t lda;
  const float* b;
  int64_t ldb;
  const float* bias;  // may be null
  float* c;
  int64_t ldc;
  int64_t m, n, k;
};

// Computes c's rows [row0, row0 + rows) x columns [col0, col0 + cols) over the whole k.
using GemmBlockFn = void (*)(const GemmArgs& g, int64_t row0, int64_t rows, int64_t col0,
                             int64_t cols);

GemmBlockFn GenericGemmBlock();
GemmBlockFn Avx2GemmBlock();
GemmBlockFn Avx512GemmBlock();

// The block function for an instruction set the attention backends name ("avx512", "avx2",
// "generic").
GemmBlockFn GemmBlockFor(absl::string_view isa);

void Gemm(const GemmArgs& g, GemmBlockFn block, attention::cpu::ThreadPool& pool);

}  // namespace dilattn::multihead::cpu
