#include "kernels/multihead/cpu/gemm.h"

#include <algorithm>

namespace dilattn::multihead::cpu {
namespace {

// A work item: 64 rows by 384 columns of c, a multiple of every build's register block (8 x 32,
// 4 x 24, 4 x 8), so that only the matrix's own edges take the ragged path.
constexpr int64_t kItemRows = 64;
constexpr int64_t kItemCols = 384;

}  // namespace

GemmBlockFn GemmBlockFor(absl::string_view isa) {
#if defined(__x86_64__)
  if (isa == "avx512") return Avx512GemmBlock();
  if (isa == "avx2") return Avx2GemmBlock();
#endif
  return GenericGemmBlock();
}

void Gemm(const GemmArgs& g, GemmBlockFn block, attention::cpu::ThreadPool& pool) {
  if (g.m <= 0 || g.n <= 0) return;
  const int64_t row_items = (g.m + kItemRows - 1) / kItemRows;
  const int64_t col_items = (g.n + kItemCols - 1) / kItemCols;
  pool.ParallelFor(row_items * col_items, [&](int64_t item, int) {
    const int64_t r0 = item / col_items * kItemRows;
    const int64_t c0 = item % col_items * kItemCols;
    block(g, r0, std::min(kItemRows, g.m - r0), c0, std::min(kItemCols, g.n - c0));
  });
}

}  // namespace dilattn::multihead::cpu
