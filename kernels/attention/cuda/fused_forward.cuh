#pragma once

// The fused dilated-attention forward kernel (tensor cores through mma.sync m16n8k16, sm_80 and
// newer). One CTA per tile of the work list (gpu_tiles.h): up to kBlockM (128, or 64 for
// D = 256) evenly spaced query rows of one (sequence, head) that share one key set. The CTA walks the key spans of every branch the
// tile's rows take part in, 64 keys at a time, with one online softmax across all of them, so
// longnet's union-of-keys softmax needs no merge pass. Dilated rows are gathered straight from
// the (tokens, H, D) tensors with cp.async; K/V tiles stream through a kStages-deep ring in
// shared memory.
//
// Warp w owns 16 * kMTiles consecutive query rows, in m16 tiles. Per m-tile each thread keeps two
// rows' softmax state (rows lane/4 and lane/4 + 8) and its slice of the 16 x D accumulator in
// registers.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/attention/cuda/kernel_params.h"
#include "kernels/attention/cuda/launch.h"
#include "kernels/attention/tile_spans.h"

namespace dilattn::attention::cuda {

inline constexpr int kBlockN = 64;
// Warps per CTA and m16 tiles per warp (the build can override them for tuning experiments).
#ifndef DILATTN_FUSED_WARPS
#define DILATTN_FUSED_WARPS 4
#endif
#ifndef DILATTN_FUSED_MTILES
#define DILATTN_FUSED_MTILES 2
#endif
#ifndef DILATTN_FUSED_MIN_BLOCKS
#define DILATTN_FUSED_MIN_BLOCKS 0  // 0: as the warp layout implies
#endif
#ifndef DILATTN_FUSED_Q_IN_REGISTERS
#define DILATTN_FUSED_Q_IN_REGISTERS 1
#endif

template <typename T>
struct MmaType;
template <>
struct MmaType<__half> {
  __device__ static uint32_t Pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static void Mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct MmaType<__nv_bfloat16> {
  __device__ static uint32_t Pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static void Mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

// 2^x by the SFU (relative error 2^-22); 2^-inf is +0, which masked scores rely on.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  // src-size 0 fills the 16 bytes with zeros: rows past a span's end read nothing.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Shared-memory tiles are [rows][D] of 16-byte chunks, XOR-swizzled so that the 8 rows an
// ldmatrix phase reads at one column land in 8 different bank groups.
template <int D>
__device__ __forceinline__ int SwizzledOffset(int row, int chunk) {
  constexpr int kChunks = D / 8;
  const int x = kChunks >= 8 ? (row & 7) : kChunks == 4 ? ((row >> 1) & 3) : ((row >> 2) & 1);
  return row * D + ((chunk ^ x) << 3);
}

template <int D, typename T>
struct FusedForwardKernel {
  // Query rows per warp: 32 (two m16 tiles) where registers allow, so each K/V fragment read
  // from shared memory feeds two mma instructions; 16 for D = 256.
  static constexpr int kWarps = D <= 128 ? DILATTN_FUSED_WARPS : 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMTiles = D <= 128 ? DILATTN_FUSED_MTILES : 1;
  // Eight single-tile warps must fit twice per SM to keep enough warps resident.
  static constexpr int kMinBlocks = DILATTN_FUSED_MIN_BLOCKS > 0 && D <= 64
                                        ? DILATTN_FUSED_MIN_BLOCKS
                                        : (kWarps == 8 && kMTiles == 1 ? 2 : 1);
  static constexpr int kBlockM = kWarps * 16 * kMTiles;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kDTiles = D / 8;  // 8-wide output column tiles
  static constexpr int kKSteps = D / 16;
  static constexpr bool kQInRegisters = D <= 64 && DILATTN_FUSED_Q_IN_REGISTERS;
  // K/V tiles in flight: loads of a tile have kStages - 1 tiles of compute to arrive.
  static constexpr int kStages = D <= 64 ? 3 : 2;
  static constexpr int kSmemElements = kBlockM * D + 2 * kStages * kBlockN * D;  // Q, K[], V[]
  static constexpr int kSmemBytes = kSmemElements * static_cast<int>(sizeof(T));

  // Row gathers: thread tid copies 16-byte chunk (tid % kChunks) of rows tid / kChunks + j *
  // kRowsPerPass of the tile, so its source pointer advances by a fixed step per pass and its
  // shared-memory offsets are fixed for the whole kernel.
  static constexpr int kRowsPerPass = kThreads / kChunks;

  // Issues the copies of a `rows`-row tile whose row i is at src_row0 + i * step (src_row0 is
  // already at this thread's row and chunk); rows at or past `valid` are zero-filled.
  template <int kRows>
  __device__ static void LoadRows(uint32_t smem_tile, int thread_row, int chunk, const T* src,
                                  int64_t step, int valid, const T* any_valid) {
#pragma unroll
    for (int j = 0; j < kRows / kRowsPerPass; ++j) {
      const int row = thread_row + j * kRowsPerPass;
      const bool ok = row < valid;
      CpAsync16(smem_tile + SwizzledOffset<D>(row, chunk) * static_cast<int>(sizeof(T)),
                ok ? src + j * kRowsPerPass * step : any_valid, ok);
    }
  }

  __device__ static void Run(const FusedForwardParams& params) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sq = reinterpret_cast<T*>(smem_raw);
    T* sk = sq + kBlockM * D;                // [kStages][kBlockN][D]
    T* sv = sk + kStages * kBlockN * D;      // [kStages][kBlockN][D]
    const uint32_t sq_addr = SharedAddress(sq);
    const uint32_t sk_addr = SharedAddress(sk);
    const uint32_t sv_addr = SharedAddress(sv);
    constexpr int kTileBytes = kBlockN * D * static_cast<int>(sizeof(T));

    const DilatedAttentionParams& p = params.attn;
    const GpuTile tile = params.tiles[blockIdx.x];
    const int64_t seq_base = p.seq_offsets[tile.seq];
    const int64_t seq_len = p.seq_offsets[tile.seq + 1] - seq_base;
    const int head = tile.head;
    const int64_t head_off = static_cast<int64_t>(head) * D;
    const int64_t q_stride = tile.q_stride;
    const int64_t q_first = tile.q_pos;
    const int64_t q_last = q_first + (tile.count - 1) * q_stride;
    const T* q = static_cast<const T*>(p.q);
    const T* k = static_cast<const T*>(p.k);
    const T* v = static_cast<const T*>(p.v);

    // The tile's key spans: one per branch its rows take part in, clipped to the last query
    // when causal (later keys are masked for every row).
    __shared__ int64_t span_first[kMaxBranches];
    __shared__ int64_t span_rate[kMaxBranches];
    __shared__ int64_t span_count[kMaxBranches];
    __shared__ int span_tiles_end[kMaxBranches];
    __shared__ int num_spans;
    if (threadIdx.x == 0) {
      int n = 0;
      int tiles = 0;
      for (int b = 0; b < p.num_branches; ++b) {
        int64_t first = 0, count = 0;
        if (!BranchKeySpan(p, b, head, seq_len, q_first, &first, &count)) continue;
        const int64_t rate = p.dilation_rate[b];
        if (p.causal) {
          if (first > q_last) continue;
          const int64_t visible = (q_last - first) / rate + 1;
          count = count < visible ? count : visible;
        }
        span_first[n] = first;
        span_rate[n] = rate;
        span_count[n] = count;
        tiles += static_cast<int>((count + kBlockN - 1) / kBlockN);
        span_tiles_end[n] = tiles;
        ++n;
      }
      num_spans = n;
    }
    __syncthreads();
    const int total_tiles = num_spans > 0 ? span_tiles_end[num_spans - 1] : 0;

    const int thread_row = threadIdx.x / kChunks;
    const int thread_chunk = threadIdx.x % kChunks;
    // Key tile t: span index and first key index within the span.
    auto locate = [&](int t, int* span, int64_t* k0) {
      int s = 0;
      while (span_tiles_end[s] <= t) ++s;
      const int begin = s == 0 ? 0 : span_tiles_end[s - 1];
      *span = s;
      *k0 = static_cast<int64_t>(t - begin) * kBlockN;
    };
    auto load_kv = [&](int t, int stage) {
      int s;
      int64_t k0;
      locate(t, &s, &k0);
      const int valid = static_cast<int>(Min64(kBlockN, span_count[s] - k0));
      const int64_t first = seq_base + span_first[s] + (k0 + thread_row) * span_rate[s];
      const int64_t step_k = span_rate[s] * p.k_row_stride;
      const int64_t step_v = span_rate[s] * p.v_row_stride;
      const int64_t col = head_off + thread_chunk * 8;
      LoadRows<kBlockN>(sk_addr + stage * kTileBytes, thread_row, thread_chunk,
                        k + first * p.k_row_stride + col, step_k, valid, k);
      LoadRows<kBlockN>(sv_addr + stage * kTileBytes, thread_row, thread_chunk,
                        v + first * p.v_row_stride + col, step_v, valid, v);
    };

    LoadRows<kBlockM>(sq_addr, thread_row, thread_chunk,
                      q + (seq_base + q_first + thread_row * q_stride) * p.q_row_stride +
                          head_off + thread_chunk * 8,
                      q_stride * p.q_row_stride, tile.count, q);
    CpAsyncCommit();
#pragma unroll
    for (int st = 0; st + 1 < kStages; ++st) {
      if (st < total_tiles) load_kv(st, st);
      CpAsyncCommit();
    }

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int warp_row = warp * 16 * kMTiles;
    // This thread's rows: m-tile mt, half h (0: lane/4, 1: lane/4 + 8).
    int64_t pos[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        pos[mt][h] = q_first + (warp_row + mt * 16 + lane / 4 + h * 8) * q_stride;
      }
    }

    // With causal, a warp skips key tiles that lie wholly after its last row, and masks only
    // tiles that reach past its first row: rows of a tile are spread across a cell, so each key
    // tile is diagonal for at most one or two warps, not for the whole CTA.
    const int warp_last_row = min(warp_row + 16 * kMTiles, static_cast<int>(tile.count)) - 1;
    const int64_t warp_first_pos = q_first + warp_row * q_stride;
    const int64_t warp_last_pos = q_first + warp_last_row * q_stride;

    float acc[kMTiles][kDTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int i = 0; i < kDTiles; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[mt][i][j] = 0.f;
      }
    }
    // Running max in raw score units (scaled only inside the exponent) and running sum.
    float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      row_max[mt][0] = row_max[mt][1] = -INFINITY;
      row_sum[mt][0] = row_sum[mt][1] = 0.f;
    }
    const float scale_log2 = params.scale_log2;

    // ldmatrix lane addressing: lane supplies row (lane % 8) of matrix (lane / 8). Every row a
    // lane addresses is congruent to lm_row modulo 8, so its swizzle term is fixed per lane.
    const int lm_row = lane % 8;
    const int lm_mat = lane / 8;
    const int lane_swizzle = SwizzledOffset<D>(lm_row, 0) ^ (lm_row * D);  // (0 ^ x) << 3
    auto chunk_off = [&](int chunk) { return ((chunk << 3) ^ lane_swizzle); };
    // K as the B operand of S = Q K^T: per key pair, matrices (keys 0-7, k 0-7),
    // (keys 0-7, k 8-15), (keys 8-15, k 0-7), (keys 8-15, k 8-15).
    const int k_lane_row = ((lm_mat >> 1) * 8 + lm_row) * D;
    const int k_lane_chunk = lm_mat & 1;
    // V (row-major keys x d) as the B operand of O += P V through .trans: per d pair, matrices
    // (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15). Q as the
    // A operand: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
    const int v_lane_row = ((lm_mat & 1) * 8 + lm_row) * D;
    const int v_lane_chunk = lm_mat >> 1;
    const int q_lane_row = (warp_row + (lm_mat & 1) * 8 + lm_row) * D;

    uint32_t q_frag[kQInRegisters ? kMTiles : 1][kQInRegisters ? kKSteps : 1][4];
    auto load_q_frag = [&](int mt, int ks, uint32_t* frag) {
      LdMatrixX4(frag, sq_addr + 2 * (q_lane_row + mt * 16 * D + chunk_off(ks * 2 + v_lane_chunk)));
    };

    for (int t = 0; t < total_tiles; ++t) {
      const int stage = t % kStages;
      if (t + kStages - 1 < total_tiles) load_kv(t + kStages - 1, (t + kStages - 1) % kStages);
      CpAsyncCommit();
      CpAsyncWait<kStages - 1>();  // Q and key tiles 0..t have landed
      __syncthreads();
      if constexpr (kQInRegisters) {
        if (t == 0) {
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
            for (int ks = 0; ks < kKSteps; ++ks) load_q_frag(mt, ks, q_frag[mt][ks]);
          }
        }
      }
      int span;
      int64_t k0;
      locate(t, &span, &k0);
      const int valid = static_cast<int>(Min64(kBlockN, span_count[span] - k0));
      const int64_t key_pos0 = span_first[span] + k0 * span_rate[span];
      const int64_t key_rate = span_rate[span];
      if (!(p.causal && key_pos0 > warp_last_pos)) {
        const uint32_t tk = sk_addr + stage * kTileBytes;
        const uint32_t tv = sv_addr + stage * kTileBytes;

        // S = Q K^T: per m-tile, 16 rows x 64 keys in 8 column tiles of 8 keys.
        float s[kMTiles][8][4];
  #pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
  #pragma unroll
          for (int j = 0; j < 8; ++j) {
  #pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
          }
        }
  #pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
          uint32_t a_local[kQInRegisters ? 1 : kMTiles][4];
          if constexpr (!kQInRegisters) {
  #pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) load_q_frag(mt, ks, a_local[mt]);
          }
          // All of the k-step's K fragments before its mmas: the asm statements keep program
          // order, so interleaving would stall on every ldmatrix.
          uint32_t b[4][4];
          const int koff = chunk_off(ks * 2 + k_lane_chunk);
  #pragma unroll
          for (int jp = 0; jp < 4; ++jp) {
            LdMatrixX4(b[jp], tk + 2 * (k_lane_row + jp * 16 * D + koff));
          }
  #pragma unroll
          for (int jp = 0; jp < 4; ++jp) {
  #pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
              const uint32_t* a = kQInRegisters ? q_frag[kQInRegisters ? mt : 0][kQInRegisters ? ks : 0]
                                                : a_local[kQInRegisters ? 0 : mt];
              MmaType<T>::Mma(s[mt][2 * jp], a, b[jp][0], b[jp][1]);
              MmaType<T>::Mma(s[mt][2 * jp + 1], a, b[jp][2], b[jp][3]);
            }
          }
        }

        // Masking only where it can matter: a span's last, partial tile, and with causal the
        // tiles that reach past the warp's first row.
        const bool need_causal = p.causal && key_pos0 + (valid - 1) * key_rate > warp_first_pos;
        if (valid < kBlockN || need_causal) {
          // Per row, the last visible column: keys past the span, and with causal keys after
          // the row's position, are hidden. One division per row, then 32-bit compares.
          const int tcol = 2 * (lane % 4);
  #pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
  #pragma unroll
            for (int h = 0; h < 2; ++h) {
              int last = valid - 1;
              if (need_causal) {
                const int64_t ahead = pos[mt][h] - key_pos0;  // < 2^31 within one sequence
                const int seen = ahead < 0 ? -1 : static_cast<int>(ahead) / static_cast<int>(key_rate);
                last = seen < last ? seen : last;
              }
  #pragma unroll
              for (int j = 0; j < 8; ++j) {
                if (j * 8 + tcol > last) s[mt][j][2 * h] = -INFINITY;
                if (j * 8 + tcol + 1 > last) s[mt][j][2 * h + 1] = -INFINITY;
              }
            }
          }
        }
  #pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
  #pragma unroll
          for (int h = 0; h < 2; ++h) {
            float m4[4];
  #pragma unroll
            for (int j = 0; j < 4; ++j) {
              m4[j] = fmaxf(fmaxf(s[mt][2 * j][2 * h], s[mt][2 * j][2 * h + 1]),
                            fmaxf(s[mt][2 * j + 1][2 * h], s[mt][2 * j + 1][2 * h + 1]));
            }
            float tile_max = fmaxf(fmaxf(m4[0], m4[1]), fmaxf(m4[2], m4[3]));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            const float new_max = fmaxf(row_max[mt][h], tile_max);
            // A row with nothing visible yet keeps max -inf; exponents then use 0 and give 0.
            const float use = new_max == -INFINITY ? 0.f : new_max * scale_log2;
            const float alpha = Exp2(row_max[mt][h] * scale_log2 - use);
            row_max[mt][h] = new_max;
            float part[4] = {0.f, 0.f, 0.f, 0.f};
  #pragma unroll
            for (int j = 0; j < 8; ++j) {
              s[mt][j][2 * h] = Exp2(fmaf(s[mt][j][2 * h], scale_log2, -use));
              s[mt][j][2 * h + 1] = Exp2(fmaf(s[mt][j][2 * h + 1], scale_log2, -use));
              part[j % 4] += s[mt][j][2 * h] + s[mt][j][2 * h + 1];
            }
            const float sum = (part[0] + part[1]) + (part[2] + part[3]);
            row_sum[mt][h] = row_sum[mt][h] * alpha + sum;
  #pragma unroll
            for (int i = 0; i < kDTiles; ++i) {
              acc[mt][i][2 * h] *= alpha;
              acc[mt][i][2 * h + 1] *= alpha;
            }
          }
        }

        // O += P V: P's accumulator layout is the A-operand layout of the next mma, two key tiles
        // (16 keys) per k-step.
  #pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          uint32_t a[kMTiles][4];
  #pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            a[mt][0] = MmaType<T>::Pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
            a[mt][1] = MmaType<T>::Pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
            a[mt][2] = MmaType<T>::Pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
            a[mt][3] = MmaType<T>::Pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
          }
          uint32_t b[kDTiles / 2][4];
  #pragma unroll
          for (int dp = 0; dp < kDTiles / 2; ++dp) {
            LdMatrixX4Trans(b[dp], tv + 2 * (v_lane_row + kk * 16 * D + chunk_off(dp * 2 + v_lane_chunk)));
          }
  #pragma unroll
          for (int dp = 0; dp < kDTiles / 2; ++dp) {
  #pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
              MmaType<T>::Mma(acc[mt][2 * dp], a[mt], b[dp][0], b[dp][1]);
              MmaType<T>::Mma(acc[mt][2 * dp + 1], a[mt], b[dp][2], b[dp][3]);
            }
          }
        }
      }
      __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }
    CpAsyncWait<0>();

    T* o = static_cast<T*>(p.o);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float l = row_sum[mt][h];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int row = warp_row + mt * 16 + lane / 4 + h * 8;
        if (row >= tile.count) continue;
        T* out = o + (seq_base + pos[mt][h]) * p.o_row_stride + head_off + 2 * (lane % 4);
#pragma unroll
        for (int i = 0; i < kDTiles; ++i) {
          *reinterpret_cast<uint32_t*>(out + i * 8) =
              MmaType<T>::Pack(acc[mt][i][2 * h] * inv, acc[mt][i][2 * h + 1] * inv);
        }
      }
    }
  }
};

template <int D, typename T>
__global__ void __launch_bounds__(FusedForwardKernel<D, T>::kThreads,
                                  FusedForwardKernel<D, T>::kMinBlocks)
    FusedForward(const __grid_constant__ FusedForwardParams params) {
  FusedForwardKernel<D, T>::Run(params);
}

template <int D, typename T>
int LaunchFusedForwardFor(const FusedForwardParams& params, cudaStream_t stream) {
  using K = FusedForwardKernel<D, T>;
  static_assert(K::kBlockM == FusedBlockM(D), "tile list and kernel disagree on tile height");
  if (params.num_tiles == 0) return 0;
  cudaError_t err = cudaFuncSetAttribute(FusedForward<D, T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         K::kSmemBytes);
  if (err != cudaSuccess) return err;
  // The tile list is walked by blockIdx.x, which reaches 2^31 - 1.
  FusedForward<D, T><<<static_cast<unsigned>(params.num_tiles), K::kThreads, K::kSmemBytes,
                       stream>>>(params);
  return cudaGetLastError();
}

}  // namespace dilattn::attention::cuda
