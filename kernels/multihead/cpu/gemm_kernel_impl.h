// The GEMM block kernel, included by gemm_<isa>.cc after defining DILATTN_GEMM_ROWS and
// DILATTN_GEMM_COLS: an accumulator block of that many rows and columns stays in vector registers
// while k runs, so each step loads one row of b and broadcasts one element of a per row.

#include <algorithm>
#include <cstdint>

#include "kernels/multihead/cpu/gemm.h"

namespace dilattn::multihead::cpu {
namespace {

constexpr int kRows = DILATTN_GEMM_ROWS;
constexpr int kCols = DILATTN_GEMM_COLS;
// k in chunks whose b panel (kChunk x kCols floats) stays in L1 across a block's rows.
constexpr int64_t kChunk = 256;

inline void FullTile(const GemmArgs& g, int64_t r0, int64_t c0, int64_t k0, int64_t kn) {
  float acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r) {
    const float* src = k0 == 0 ? g.bias : g.c + (r0 + r) * g.ldc;
    for (int c = 0; c < kCols; ++c) acc[r][c] = src == nullptr ? 0.0f : src[c0 + c];
  }
  const float* a = g.a + r0 * g.lda + k0;
  const float* b = g.b + k0 * g.ldb + c0;
  for (int64_t kk = 0; kk < kn; ++kk) {
    const float* brow = b + kk * g.ldb;
    for (int r = 0; r < kRows; ++r) {
      const float av = a[r * g.lda + kk];
      for (int c = 0; c < kCols; ++c) acc[r][c] += av * brow[c];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float* dst = g.c + (r0 + r) * g.ldc + c0;
    for (int c = 0; c < kCols; ++c) dst[c] = acc[r][c];
  }
}

// The ragged edges: fewer rows or columns than a full tile.
void EdgeTile(const GemmArgs& g, int64_t r0, int64_t rows, int64_t c0, int64_t cols, int64_t k0,
              int64_t kn) {
  for (int64_t r = r0; r < r0 + rows; ++r) {
    float* dst = g.c + r * g.ldc;
    for (int64_t c = c0; c < c0 + cols; ++c) {
      float s = k0 == 0 ? (g.bias == nullptr ? 0.0f : g.bias[c]) : dst[c];
      const float* a = g.a + r * g.lda + k0;
      for (int64_t kk = 0; kk < kn; ++kk) s += a[kk] * g.b[(k0 + kk) * g.ldb + c];
      dst[c] = s;
    }
  }
}

void Block(const GemmArgs& g, int64_t row0, int64_t rows, int64_t col0, int64_t cols) {
  for (int64_t k0 = 0; k0 < g.k; k0 += kChunk) {
    const int64_t kn = std::min(kChunk, g.k - k0);
    for (int64_t c = col0; c < col0 + cols; c += kCols) {
      const int64_t nc = std::min<int64_t>(kCols, col0 + cols - c);
      for (int64_t r = row0; r < row0 + rows; r += kRows) {
        const int64_t nr = std::min<int64_t>(kRows, row0 + rows - r);
        if (nr == kRows && nc == kCols) {
          FullTile(g, r, c, k0, kn);
        } else {
          EdgeTile(g, r, nr, c, nc, k0, kn);
        }
      }
    }
  }
}

}  // namespace
}  // namespace dilattn::multihead::cpu
