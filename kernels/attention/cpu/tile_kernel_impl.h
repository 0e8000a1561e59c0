// The tile kernel's body, included once by each tile_kernel_<isa>.cc after it defines
//   DILATTN_VEC       floats per vector register (4, 8, 16)
//   DILATTN_ROWS      query rows per register block
//   DILATTN_QK_VECS   vectors of keys per register block of S = Q K^T
//   DILATTN_PV_VECS   vectors of head dim per register block of acc += P V
// Everything here has internal linkage and calls nothing with external linkage in the hot path,
// so code compiled for one instruction set can never be picked by the linker for another.

#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "kernels/attention/cpu/tile_kernel.h"

namespace dilattn::attention::cpu {
namespace {

constexpr int kVec = DILATTN_VEC;
typedef float Vf __attribute__((vector_size(kVec * sizeof(float))));
typedef int32_t Vi __attribute__((vector_size(kVec * sizeof(int32_t))));

static_assert(kTileK % (kVec * DILATTN_QK_VECS) == 0, "key tile must hold whole S blocks");
static_assert(kDimPad % kVec == 0, "head-dim padding must hold whole vectors");
static_assert(kTileQ % DILATTN_ROWS == 0, "query tile must hold whole row blocks");

constexpr float kNegInf = -__builtin_inff();
constexpr float kLog2e = 1.4426950408889634f;

inline Vf Load(const float* p) {
  Vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, Vf v) { __builtin_memcpy(p, &v, sizeof(v)); }
// x - 0 is x for every x (-0 included), so GCC broadcasts straight from memory; 0 + x is not
// (0 + -0 is +0), and costs an addition before every broadcast of the inner loops.
inline Vf Splat(float x) { return x - Vf{}; }
inline Vf Max(Vf a, Vf b) { return a > b ? a : b; }
inline int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int RoundUp(int x, int m) { return (x + m - 1) / m * m; }

inline float HorizontalMax(Vf v) {
  float r = v[0];
  for (int i = 1; i < kVec; ++i) r = v[i] > r ? v[i] : r;
  return r;
}
inline float HorizontalSum(Vf v) {
  float r = 0;
  for (int i = 0; i < kVec; ++i) r += v[i];
  return r;
}

// 2^x: round-to-nearest split, a degree-5 polynomial for 2^f on [-0.5, 0.5] (fitted by least
// squares on relative error, max 3e-7), the exponent built in the bits. Inputs below -126 give
// exactly 0, so masked (-inf) scores contribute nothing.
inline Vf Exp2(Vf x) {
  const Vi underflow = x < -126.0f;
  x = x < -126.0f ? Splat(-126.0f) : x;
  x = x > 127.0f ? Splat(127.0f) : x;
  const Vf rounded = (x + 12582912.0f) - 12582912.0f;  // 1.5 * 2^23 rounds to an integer
  const Vf f = x - rounded;
  Vf p = Splat(1.3260914711281657e-3f);
  p = p * f + 9.670180268585682e-3f;
  p = p * f + 5.5507123470306396e-2f;
  p = p * f + 2.402222454547882e-1f;
  p = p * f + 6.931470036506653e-1f;
  p = p * f + 1.0f;
  const Vi bits = (__builtin_convertvector(rounded, Vi) + 127) << 23;
  Vf pow2;
  __builtin_memcpy(&pow2, &bits, sizeof(pow2));
  const Vf y = p * pow2;
  return underflow ? Splat(0.0f) : y;
}

// Widens `count` elements at `src` (element offset `offset`) to fp32, times `scale`.
inline void LoadRow(const void* base, DType dtype, int64_t offset, int count, float scale,
                    float* dst) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* src = static_cast<const float*>(base) + offset;
      for (int d = 0; d < count; ++d) dst[d] = src[d] * scale;
      return;
    }
    case DType::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      int d = 0;
      // GCC converts _Float16 one element at a time even where F16C converts eight or sixteen.
#if defined(__AVX512F__)
      for (; d + 16 <= count; d += 16) {
        // Zero-masked forms here and below: GCC 12 warns that the plain ones' merge sources are
        // uninitialised.
        const __m512 f = _mm512_maskz_cvtph_ps(
            0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d)));
        _mm512_storeu_ps(dst + d, _mm512_mul_ps(f, _mm512_set1_ps(scale)));
      }
#endif
#if defined(__F16C__) && defined(__AVX__)
      for (; d + 8 <= count; d += 8) {
        const __m256 f =
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d)));
        _mm256_storeu_ps(dst + d, _mm256_mul_ps(f, _mm256_set1_ps(scale)));
      }
#endif
#if defined(__FLT16_MAX__)
      for (; d < count; ++d) {
        _Float16 h;
        __builtin_memcpy(&h, src + d, sizeof(h));
        dst[d] = static_cast<float>(h) * scale;
      }
#else
      for (; d < count; ++d) {
        const uint32_t sign = static_cast<uint32_t>(src[d] & 0x8000u) << 16;
        const uint32_t exponent = (src[d] >> 10) & 0x1fu;
        const uint32_t mantissa = src[d] & 0x3ffu;
        float value;
        if (exponent == 0) {
          value = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
          if (sign != 0) value = -value;
        } else {
          const uint32_t bits = sign | (exponent == 0x1f ? 0x7f800000u : (exponent + 112u) << 23) |
                                (mantissa << 13);
          __builtin_memcpy(&value, &bits, sizeof(value));
        }
        dst[d] = value * scale;
      }
#endif
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int d = 0; d < count; ++d) {
        const uint32_t bits = static_cast<uint32_t>(src[d]) << 16;
        float value;
        __builtin_memcpy(&value, &bits, sizeof(value));
        dst[d] = value * scale;
      }
      return;
    }
  }
}

inline void StoreRow(void* base, DType dtype, int64_t offset, int count, float scale,
                     const float* src) {
  switch (dtype) {
    case DType::kFloat32: {
      float* dst = static_cast<float*>(base) + offset;
      for (int d = 0; d < count; ++d) dst[d] = src[d] * scale;
      return;
    }
    case DType::kFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
      int d = 0;
      // Round to nearest even, as the conversions below.
#if defined(__AVX512F__)
      for (; d + 16 <= count; d += 16) {
        const __m512 f = _mm512_mul_ps(_mm512_loadu_ps(src + d), _mm512_set1_ps(scale));
        _mm256_storeu_si256(
            reinterpret_cast<__m256i*>(dst + d),
            _mm512_maskz_cvtps_ph(0xffff, f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
#endif
#if defined(__F16C__) && defined(__AVX__)
      for (; d + 8 <= count; d += 8) {
        const __m256 f = _mm256_mul_ps(_mm256_loadu_ps(src + d), _mm256_set1_ps(scale));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d),
                         _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
#endif
#if defined(__FLT16_MAX__)
      for (; d < count; ++d) {
        const _Float16 h = static_cast<_Float16>(src[d] * scale);
        __builtin_memcpy(dst + d, &h, sizeof(h));
      }
#else
      for (; d < count; ++d) {
        // Same rounding as dtype.h's FloatToHalfBits, restated here for internal linkage.
        const float f = src[d] * scale;
        uint32_t x;
        __builtin_memcpy(&x, &f, sizeof(x));
        const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
        uint32_t m = x & 0x7fffffffu;
        uint16_t h;
        if (m >= 0x7f800000u) {
          h = sign | 0x7c00u | (m > 0x7f800000u ? 0x200u : 0u);
        } else if (m >= 0x477ff000u) {
          h = sign | 0x7c00u;
        } else if (m < 0x38800000u) {
          float a;
          __builtin_memcpy(&a, &m, sizeof(a));
          h = sign | static_cast<uint16_t>(__builtin_nearbyintf(a * 16777216.0f));
        } else {
          m += 0xfffu + ((m >> 13) & 1u);
          h = sign | static_cast<uint16_t>((m - 0x38000000u) >> 13);
        }
        dst[d] = h;
      }
#endif
      return;
    }
    case DType::kBFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
      for (int d = 0; d < count; ++d) {
        const float f = src[d] * scale;
        uint32_t x;
        __builtin_memcpy(&x, &f, sizeof(x));
        const bool nan = (x & 0x7fffffffu) > 0x7f800000u;
        x += 0x7fffu + ((x >> 16) & 1u);
        dst[d] = nan ? static_cast<uint16_t>((x >> 16) | 0x40u) : static_cast<uint16_t>(x >> 16);
      }
      return;
    }
  }
}

// S[i0.., j0..] = Q[i0.., :dim] . K^T[:dim, j0..] for a ROWS x (VECS * kVec) block.
template <int ROWS, int VECS>
inline void ScoreBlock(const float* q, int q_stride, const float* kt, int dim, float* s,
                       int i0, int j0) {
  Vf c[ROWS][VECS];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) c[r][v] = Splat(0.0f);
  }
  for (int d = 0; d < dim; ++d) {
    Vf b[VECS];
#pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) b[v] = Load(kt + d * kTileK + j0 + v * kVec);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const Vf a = Splat(q[(i0 + r) * q_stride + d]);
#pragma GCC unroll 8
      for (int v = 0; v < VECS; ++v) c[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) Store(s + (i0 + r) * kTileK + j0 + v * kVec, c[r][v]);
  }
}

// acc[i0.., d0..] += P[i0.., :keys] . V[:keys, d0..] for a ROWS x (VECS * kVec) block.
template <int ROWS, int VECS>
inline void ValueBlock(const float* p, const float* v, int dim_pad, int keys, float* acc,
                       int i0, int d0) {
  Vf c[ROWS][VECS];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 8
    for (int x = 0; x < VECS; ++x) c[r][x] = Load(acc + (i0 + r) * dim_pad + d0 + x * kVec);
  }
  for (int j = 0; j < keys; ++j) {
    Vf b[VECS];
#pragma GCC unroll 8
    for (int x = 0; x < VECS; ++x) b[x] = Load(v + j * dim_pad + d0 + x * kVec);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const Vf a = Splat(p[(i0 + r) * kTileK + j]);
#pragma GCC unroll 8
      for (int x = 0; x < VECS; ++x) c[r][x] += a * b[x];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 8
    for (int x = 0; x < VECS; ++x) Store(acc + (i0 + r) * dim_pad + d0 + x * kVec, c[r][x]);
  }
}

void RunTile(const TileContext& ctx, const TileTask& task, float* scratch) {
  const TileParams& p = *ctx.params;
  const int dim = p.head_dim;
  const int dim_pad = RoundUp(dim, kDimPad);
  const int64_t heads = p.num_heads;
  const int64_t stride = task.stride;
  const int64_t head_offset = static_cast<int64_t>(task.head) * dim;
  const int rows = RoundUp(task.q_count, DILATTN_ROWS);  // whole register blocks

  float* q = scratch;                  // [kTileQ, dim_pad], pre-scaled into the log2 domain
  float* kt = q + kTileQ * dim_pad;    // [dim_pad, kTileK]
  float* v = kt + dim_pad * kTileK;    // [kTileK, dim_pad]
  float* s = v + kTileK * dim_pad;     // [kTileQ, kTileK], scores then probabilities
  float* acc = s + kTileQ * kTileK;    // [kTileQ, dim_pad]
  float* m = acc + kTileQ * dim_pad;   // [kTileQ]
  float* l = m + kTileQ;               // [kTileQ]

  const float q_scale = p.scale * kLog2e;
  for (int i = 0; i < rows; ++i) {
    float* q_row = q + i * dim_pad;
    float* acc_row = acc + i * dim_pad;
    const int64_t token = task.q_first_row + i * stride;
    if (i < task.q_count) {
      LoadRow(p.q, p.dtype, token * p.q_row_stride + head_offset, dim, q_scale, q_row);
    } else {
      for (int d = 0; d < dim; ++d) q_row[d] = 0;
    }
    for (int d = dim; d < dim_pad; ++d) q_row[d] = 0;
    if (ctx.fresh || i >= task.q_count) {
      m[i] = kNegInf;
      l[i] = 0;
      for (int d = 0; d < dim_pad; ++d) acc_row[d] = 0;
    } else {
      const int64_t state_row = token * heads + task.head;
      m[i] = ctx.state.m[state_row];
      l[i] = ctx.state.l[state_row];
      const float* src = ctx.state.acc + state_row * dim;
      for (int d = 0; d < dim; ++d) acc_row[d] = src[d];
      for (int d = dim; d < dim_pad; ++d) acc_row[d] = 0;
    }
  }

  const int64_t q_first = task.q_first_row;
  const int64_t q_last = task.q_first_row + (task.q_count - 1) * stride;
  for (int sp = 0; sp < task.span_count; ++sp) {
    const KeySpan span = ctx.spans[task.span_begin + sp];
    int64_t span_keys = span.count;
    if (p.causal) {
      // Keys after the tile's last query are masked for every row: do not load them.
      if (span.first_row > q_last) continue;
      span_keys = Min64(span_keys, (q_last - span.first_row) / stride + 1);
    }
    for (int64_t k0 = 0; k0 < span_keys; k0 += kTileK) {
      const int keys = static_cast<int>(Min64(kTileK, span_keys - k0));
      // Scores and probabilities in whole vectors up to the last key: a span of a short sequence
      // or a high rate holds a few keys, and the full tile width would be mostly masked work.
      const int width = RoundUp(keys, kVec);
      const int64_t key_first = span.first_row + k0 * stride;
      for (int j = 0; j < keys; ++j) {
        const int64_t token = key_first + j * stride;
        float* v_row = v + j * dim_pad;
        LoadRow(p.k, p.dtype, token * p.k_row_stride + head_offset, dim, 1.0f, v_row);
        for (int d = 0; d < dim; ++d) kt[d * kTileK + j] = v_row[d];
        LoadRow(p.v, p.dtype, token * p.v_row_stride + head_offset, dim, 1.0f, v_row);
        for (int d = dim; d < dim_pad; ++d) v_row[d] = 0;
      }
      // Scores past the last key are masked below; these zeros only keep them finite. V's rows
      // past it are never read.
      for (int d = 0; d < dim; ++d) {
        for (int j = keys; j < width; ++j) kt[d * kTileK + j] = 0;
      }

      const int64_t key_last = key_first + (keys - 1) * stride;
      const bool masked = p.causal && key_last > q_first;
      // The tile's keys at or before `query`: keys ascend, so they are its first ones.
      auto seen_by = [&](int64_t query) {
        if (query < key_first) return 0;
        return static_cast<int>(Min64(keys, (query - key_first) / stride + 1));
      };
      // With causal, a block of rows sees the keys up to its last row only: its scores and its
      // share of P V stop there (the mask below turns the rest of its scores to -inf).
      auto visible = [&](int i0) {
        return masked ? seen_by(task.q_first_row + (i0 + DILATTN_ROWS - 1) * stride) : keys;
      };

      for (int i0 = 0; i0 < rows; i0 += DILATTN_ROWS) {
        const int block_width = RoundUp(visible(i0), kVec);
        int j0 = 0;
        for (; j0 + DILATTN_QK_VECS * kVec <= block_width; j0 += DILATTN_QK_VECS * kVec) {
          ScoreBlock<DILATTN_ROWS, DILATTN_QK_VECS>(q, dim_pad, kt, dim, s, i0, j0);
        }
        for (; j0 < block_width; j0 += kVec) {
          ScoreBlock<DILATTN_ROWS, 1>(q, dim_pad, kt, dim, s, i0, j0);
        }
      }

      for (int i = 0; i < rows; ++i) {
        float* s_row = s + i * kTileK;
        for (int j = keys; j < width; ++j) s_row[j] = kNegInf;
        if (masked) {
          for (int j = seen_by(task.q_first_row + i * stride); j < keys; ++j) s_row[j] = kNegInf;
        }
        Vf vmax = Splat(kNegInf);
        for (int j = 0; j < width; j += kVec) vmax = Max(vmax, Load(s_row + j));
        const float tile_max = HorizontalMax(vmax);
        const float m_new = tile_max > m[i] ? tile_max : m[i];
        if (m_new == kNegInf) {
          for (int j = 0; j < width; ++j) s_row[j] = 0;
          continue;
        }
        const Vf m_splat = Splat(m_new);
        Vf vsum = Splat(0.0f);
        for (int j = 0; j < width; j += kVec) {
          const Vf e = Exp2(Load(s_row + j) - m_splat);
          Store(s_row + j, e);
          vsum += e;
        }
        const float alpha = Exp2(Splat(m[i] - m_new))[0];
        l[i] = l[i] * alpha + HorizontalSum(vsum);
        m[i] = m_new;
        if (alpha != 1.0f) {
          float* acc_row = acc + i * dim_pad;
          const Vf a = Splat(alpha);
          for (int d = 0; d < dim_pad; d += kVec) Store(acc_row + d, Load(acc_row + d) * a);
        }
      }

      for (int i0 = 0; i0 < rows; i0 += DILATTN_ROWS) {
        const int block_keys = visible(i0);
        int d0 = 0;
        for (; d0 + DILATTN_PV_VECS * kVec <= dim_pad; d0 += DILATTN_PV_VECS * kVec) {
          ValueBlock<DILATTN_ROWS, DILATTN_PV_VECS>(s, v, dim_pad, block_keys, acc, i0, d0);
        }
        for (; d0 < dim_pad; d0 += kVec) {
          ValueBlock<DILATTN_ROWS, 1>(s, v, dim_pad, block_keys, acc, i0, d0);
        }
      }
    }
  }

  for (int i = 0; i < task.q_count; ++i) {
    const int64_t token = task.q_first_row + i * stride;
    const float* acc_row = acc + i * dim_pad;
    if (ctx.final) {
      const float inv = l[i] > 0 ? 1.0f / l[i] : 0.0f;
      StoreRow(p.o, p.dtype, token * p.o_row_stride + head_offset, dim, inv, acc_row);
    } else {
      const int64_t state_row = token * heads + task.head;
      ctx.state.m[state_row] = m[i];
      ctx.state.l[state_row] = l[i];
      float* dst = ctx.state.acc + state_row * dim;
      for (int d = 0; d < dim; ++d) dst[d] = acc_row[d];
    }
  }
}

}  // namespace
}  // namespace dilattn::attention::cpu
