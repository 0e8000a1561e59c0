#pragma once

// The Hopper (sm_90a) variant of the fused kernel for D = 64: the same tiles, gathers and online
// softmax as fused_forward.cuh, with both products on wgmma. Two warpgroups each own 64 of the
// tile's 128 query rows. S = Q K^T reads Q and K straight from shared memory through matrix
// descriptors; O += P V takes P from registers and V from shared memory (transposed). Within a
// warpgroup the scores of key tile t + 1 and O += P_t V_t are issued together (see Run); at 128
// registers two CTAs, four warpgroups, share an SM and fill each other's gaps. D = 128 runs
// fused_forward_sm90_ws.cuh, with these wgmma wrappers.
// Shared tiles are panels of 64 columns (PanelOffset; one at D = 64): their 16-byte XOR swizzle
// by row % 8 over 128-byte rows is exactly the hardware's 128-byte swizzle, so the loaders only
// place the panels; tiles are 1024-byte aligned as that swizzle requires.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/attention/cuda/fused_forward.cuh"

namespace dilattn::attention::cuda {

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DILATTN_HAVE_WGMMA 1
#endif

// A wgmma matrix descriptor for a 128-byte-swizzled tile with 16-byte leading and 1024-byte
// stride offsets is (address >> 4) | (1 << 16) in its low word and a constant high word (the
// stride, 64, and the 128-byte swizzle mode in bits 62-63). The kernels keep only the low words:
// offsets within shared memory (< 2^18 bytes, so the 14-bit address field never carries) are then
// one 32-bit add, where 64-bit descriptors cost an add with carry and two moves to uniform
// registers per product.
inline constexpr uint32_t kWgmmaDescHigh = (1024u >> 4) | (1u << 30);
__device__ __forceinline__ uint32_t WgmmaDescriptorLow(uint32_t smem_address) {
  return ((smem_address & 0x3ffff) >> 4) | (1u << 16);
}

template <typename T>
struct Wgmma;

#define DILATTN_WGMMA_ACC32                                                                     \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),          \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),  \
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),           \
      "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),           \
      "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

#define DILATTN_WGMMA_REGS32                                                                  \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"

#define DILATTN_WGMMA_ACC64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), \
      "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
      "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), \
      "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), \
      "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
      "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), \
      "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), \
      "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), \
      "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

#define DILATTN_WGMMA_REGS64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

#define DILATTN_DEFINE_WGMMA(TYPE, PTX)                                                        \
  template <>                                                                                  \
  struct Wgmma<TYPE> {                                                                         \
    /* d[32] (+)= A(smem, K-major) B(smem, K-major): m64 n64 k16; descriptors' low words. */   \
    __device__ static void SS(float* d, uint32_t a, uint32_t b, int accumulate) {              \
      asm volatile("{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %34, 0;\n"             \
                   "mov.b64 da, {%32, %35};\nmov.b64 db, {%33, %35};\n"                        \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " "               \
                   DILATTN_WGMMA_REGS32 ", da, db, p, 1, 1, 0, 0;\n}\n"                        \
                   : DILATTN_WGMMA_ACC32                                                       \
                   : "r"(a), "r"(b), "r"(accumulate), "n"(kWgmmaDescHigh));                    \
    }                                                                                          \
    /* d[64] (+)= A(smem, K-major) B(smem, K-major, 128 rows): m64 n128 k16. */                 \
    __device__ static void SS128(float* d, uint32_t a, uint32_t b, int accumulate) {           \
      asm volatile("{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %66, 0;\n"             \
                   "mov.b64 da, {%64, %67};\nmov.b64 db, {%65, %67};\n"                        \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " "              \
                   DILATTN_WGMMA_REGS64 ", da, db, p, 1, 1, 0, 0;\n}\n"                        \
                   : DILATTN_WGMMA_ACC64                                                       \
                   : "r"(a), "r"(b), "r"(accumulate), "n"(kWgmmaDescHigh));                    \
    }                                                                                          \
    /* d[64] += A(registers) B(smem, transposed, two 64-column panels): m64 n128 k16. */       \
    __device__ static void RS128(float* d, const uint32_t* a, uint32_t b) {                    \
      asm volatile("{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, 1, 0;\n"                   \
                   "mov.b64 db, {%68, %69};\n"                                                 \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " "              \
                   DILATTN_WGMMA_REGS64 ", {%64, %65, %66, %67}, db, p, 1, 1, 1;\n}\n"     \
                   : DILATTN_WGMMA_ACC64                                                       \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b),                       \
                     "n"(kWgmmaDescHigh));                                                     \
    }                                                                                          \
    /* d[32] += A(registers) B(smem, transposed: N contiguous): m64 n64 k16. */                \
    __device__ static void RS(float* d, const uint32_t* a, uint32_t b) {                       \
      asm volatile("{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, 1, 0;\n"                   \
                   "mov.b64 db, {%36, %37};\n"                                                 \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " "               \
                   DILATTN_WGMMA_REGS32 ", {%32, %33, %34, %35}, db, p, 1, 1, 1;\n}\n"         \
                   : DILATTN_WGMMA_ACC32                                                       \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b),                       \
                     "n"(kWgmmaDescHigh));                                                     \
    }                                                                                          \
  };

DILATTN_DEFINE_WGMMA(__half, "f16")
DILATTN_DEFINE_WGMMA(__nv_bfloat16, "bf16")
#undef DILATTN_DEFINE_WGMMA

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaWait0() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaWait1() {
  asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
}
// cp.async writes shared memory through the generic proxy; wgmma reads it through the async
// proxy.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// S = Q K^T for one warp's 16 query rows and kKeys keys through mma.sync, from the shared tiles
// the warpgroup's wgmma products read (64-column panels of kQRows and kKRows rows, PanelOffset),
// into the wgmma accumulator layout, which per warp is mma.sync's. The rare recomputation of a
// warp whose softmax against the stale max failed: done by the warp alone, so that the other
// warps of its warpgroup need not learn of it, where a wgmma recomputation needed all four to
// agree on it at every key tile.
template <typename T, int D, int kKeys, int kQRows, int kKRows>
__device__ __forceinline__ void WarpScores(float* s, uint32_t q_tile, int warp_row,
                                           uint32_t k_stage, int lane) {
  // ldmatrix: lane supplies row lane % 8 of matrix lane / 8. Q as the A operand: matrices (rows
  // 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15); K as the B operand
  // per pair of 8-key column tiles: (keys 0-7, k 0-7), (keys 0-7, k 8-15), (keys 8-15, k 0-7),
  // (keys 8-15, k 8-15).
  const int lm_row = lane % 8;
  const int lm_mat = lane / 8;
  const int q_row = warp_row + (lm_mat & 1) * 8 + lm_row;
  const int k_row = (lm_mat >> 1) * 8 + lm_row;
#pragma unroll
  for (int e = 0; e < kKeys / 2; ++e) s[e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    LdMatrixX4(a, q_tile + 2 * PanelOffset<64, kQRows>(q_row, ks * 2 + (lm_mat >> 1)));
#pragma unroll
    for (int jp = 0; jp < kKeys / 16; ++jp) {
      uint32_t b[4];
      LdMatrixX4(b, k_stage + 2 * PanelOffset<64, kKRows>(jp * 16 + k_row, ks * 2 + (lm_mat & 1)));
      MmaType<T>::Mma(&s[8 * jp], a, b[0], b[1]);
      MmaType<T>::Mma(&s[8 * jp + 4], a, b[2], b[3]);
    }
  }
}

// A consumer warp's share of a warpgroup's 64 query rows, for both Hopper kernels: its scores,
// probabilities, O accumulator (kAcc floats: 16 rows x kAcc / 2 columns) and online softmax
// state, and the step that folds one key tile in. The kernels supply how the products are
// issued. Per key tile t: the scores of tile t + 1 and O += P_t V_t are issued together, and the
// softmax of tile t + 1 starts while O += P_t V_t may still run (ptxas places the wait for it
// before the exponentials; forcing them ahead of it measured slower: BENCHMARKS.md); its
// rescale factors are applied to O once that product is done. Nothing is in flight across
// iterations, so ptxas keeps every wgmma asynchronous.
template <typename T, int kAcc, int kKeyTiles = 1>
struct WarpgroupRows {
  // kKeyTiles 64-key tiles per step (two: one n128 product for the scores).
  static constexpr int kKeys = 64 * kKeyTiles;
  float s[kKeys / 2];            // this warp's 16 rows x kKeys scores, mma accumulator layout
  uint32_t probs[kKeys / 16][4];  // P, packed as the A operand of O += P V
  float acc[kAcc];
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  int64_t pos[2];      // positions of this thread's rows lane / 4 and lane / 4 + 8
  int warp_first_pos;  // positions within a sequence fit 32 bits (kGpuMaxSeqLen)
  int lane;
  bool causal;
  float scale_log2;

  __device__ WarpgroupRows(const FusedForwardParams& params, const GpuTile& tile, int warp_row,
                           int lane_index)
      : lane(lane_index), causal(params.attn.causal), scale_log2(params.scale_log2) {
    const int64_t q_first = tile.q_pos;
    const int64_t q_stride = tile.q_stride;
#pragma unroll
    for (int h = 0; h < 2; ++h) pos[h] = q_first + (warp_row + lane / 4 + h * 8) * q_stride;
    warp_first_pos = static_cast<int>(q_first + warp_row * q_stride);
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;
  }

  // With causal, whether a key tile reaches past the warp's first row (needs a mask; a warp's
  // 16 rows span less of the cell than the warpgroup's 64, so fewer tiles need one).
  __device__ bool NeedCausal(const KeyTile& kt) const {
    return causal && kt.pos0 + (kt.valid() - 1) * kt.rate > warp_first_pos;
  }
  // The full step; when it returns true, the factors that rescale O are in `alpha`. With two
  // key tiles, `hi` is the second.
  __device__ bool Full(const KeyTile& kt, const KeyTile& hi, float* alpha) {
    return SoftmaxStep<0, kKeys / 8>(s, nullptr, row_max, row_sum, lane, kt, NeedCausal(kt), pos,
                                     scale_log2, alpha, &hi, kKeyTiles == 2 && NeedCausal(hi));
  }
  // The common case: exponents against the current max, no max reduction (see
  // SoftmaxAgainstStaleMax). The warp decides alone (the recomputation's shuffles need every
  // lane): a warp that fails recomputes its own scores (WarpScores). A vote of the whole
  // warpgroup, which a wgmma recomputation needed, held its four warps in step at every key
  // tile: 4-5% of the D = 64 kernel's sustained rate, and up to 9% of the D = 128 kernel's with
  // causal (docs/BENCHMARKS.md).
  __device__ bool Stale(const KeyTile& kt, const KeyTile& hi) {
    float sums[2];
    const bool ok = SoftmaxAgainstStaleMax<kKeys / 8>(s, row_max, sums, lane, kt, NeedCausal(kt),
                                                      pos, scale_log2, &hi,
                                                      kKeyTiles == 2 && NeedCausal(hi));
    if (!__all_sync(0xffffffffu, ok)) return false;
    row_sum[0] += sums[0];
    row_sum[1] += sums[1];
    return true;
  }
  // S = Q K^T for the warpgroup's 64 rows and a 64-key tile, D / 16 k-steps of 32 bytes along
  // 64-column panels (Q's panels are kQPanelBytes apart, K's 8 KiB); descriptors' low words.
  template <int D, int kQPanelBytes>
  __device__ void IssueScores(uint32_t q_desc, uint32_t k_desc) {
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int q_off = (ks / 4) * kQPanelBytes + (ks % 4) * 32;
      const int k_off = (ks / 4) * kKeys * 64 * 2 + (ks % 4) * 32;
      if constexpr (kKeyTiles == 2) {
        Wgmma<T>::SS128(s, q_desc + (q_off >> 4), k_desc + (k_off >> 4), ks > 0);
      } else {
        Wgmma<T>::SS(s, q_desc + (q_off >> 4), k_desc + (k_off >> 4), ks > 0);
      }
    }
    WgmmaCommit();
  }
  // O += P V: per 16 keys (two 8-row swizzle atoms, 2 KiB further into V) one product over all
  // of O's columns (n128: the descriptor's leading byte offset steps between V's two panels).
  __device__ void IssuePv(uint32_t v_desc) {
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      if constexpr (kAcc == 64) {
        Wgmma<T>::RS128(acc, probs[kk], v_desc + ((kk * 2048) >> 4));
      } else {
        Wgmma<T>::RS(acc, probs[kk], v_desc + ((kk * 2048) >> 4));
      }
    }
    WgmmaCommit();
  }
  // P into the A operand's registers; only once the product reading them is done.
  __device__ void Pack() {
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) PackProbabilities<T>(s, kk, probs[kk]);
  }

  // The walk's first key tile: its scores alone (O is still zero: nothing to rescale).
  template <class IssueScores>
  __device__ void First(const KeyTile& kt, const KeyTile& hi, IssueScores&& issue_scores) {
    float alpha[2];
    issue_scores();
    WgmmaWait0();
    Full(kt, hi, alpha);
    Pack();
  }
  // Scores of `next` with O += P V of the previous tile; `done` runs once both products are.
  // `warp_scores` recomputes this warp's scores of `next` alone (WarpScores).
  template <class IssueScores, class IssuePv, class WarpScoresFn, class Done>
  __device__ void Step(const KeyTile& next, const KeyTile& next_hi, IssueScores&& issue_scores,
                       IssuePv&& issue_pv, WarpScoresFn&& warp_scores, Done&& done) {
    issue_scores();
    issue_pv();
    WgmmaWait1();  // the scores; O += P V may still run
    const bool settled = Stale(next, next_hi);
    WgmmaWait0();
    done();
    float alpha[2];
    bool rescale = false;
    if (!settled) {  // some score rose too far above the max: again, with the tile's max
      warp_scores();
      rescale = Full(next, next_hi, alpha);
    }
    if (rescale) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int j = 0; j < kAcc / 4; ++j) {
          acc[4 * j + 2 * h] *= alpha[h];
          acc[4 * j + 2 * h + 1] *= alpha[h];
        }
      }
    }
    Pack();
  }
};

// Shared memory of the Hopper kernels: Q, then the K ring, then the V ring, from a 1024-byte
// boundary (the 128-byte swizzle's atoms are 1024 bytes); `end` is past the V ring.
struct HopperSmem {
  uint32_t q, k, v, end;
};
template <int kQBytes, int kRingBytes>
__device__ __forceinline__ HopperSmem LayoutHopperSmem(const void* smem_raw) {
  HopperSmem m;
  m.q = (SharedAddress(smem_raw) + 1023u) & ~1023u;
  m.k = m.q + kQBytes;
  m.v = m.k + kRingBytes;
  m.end = m.v + kRingBytes;
  return m;
}

// The CTA barrier of the key-tile loops: with causal the first warpgroup reaches it from its own
// loop once its walk ends, so it is the non-aligned form, which may be executed at different
// places (__syncthreads is barrier.sync.aligned, which may not).
__device__ __forceinline__ void CtaBarrier() { asm volatile("barrier.sync 0;\n" ::: "memory"); }

template <typename T, class Spans = KeySpans>
struct HopperForwardKernel {
  // D = 128 has its own kernel (fused_forward_sm90_ws.cuh): one CTA of this kind per SM held its
  // warpgroups in step.
  static constexpr int D = 64;
  static constexpr int kHeadDim = D;
  static constexpr int kWarps = 8;  // two warpgroups
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 128;
  // Key tiles are loaded three ahead; the stage refilled at tile t is tile t - 1's, whose
  // products completed in the previous iteration.
  static constexpr int kPrefetch = 3;
  static constexpr int kStages = kPrefetch + 1;
  static constexpr int kTileBytes = kBlockN * D * static_cast<int>(sizeof(T));  // 8 KiB
  // 81 KiB and 128 registers: two CTAs per SM.
  static constexpr int kSmemBytes = kBlockM * D * 2 + 2 * kStages * kTileBytes + 1024;
  static constexpr int kMinBlocks = 2;

  __device__ static void Run(const FusedForwardParams& params) {
#if defined(DILATTN_HAVE_WGMMA)
    extern __shared__ unsigned char smem_raw[];
    const HopperSmem smem = LayoutHopperSmem<kBlockM * D * 2, kStages * kTileBytes>(smem_raw);

    const TileGather<D, kThreads, T, 64> gather(params);
    const DilatedAttentionParams& p = params.attn;
    const GpuTile& tile = gather.tile;
    const int64_t seq_base = gather.seq_base;
    const int64_t head_off = gather.head_off;

    __shared__ Spans spans;
    auto loader = StartTile<kBlockM, kBlockM / 2, kPrefetch>(gather, &spans, smem.q, smem.k,
                                                             smem.v, kTileBytes);
    const int total_tiles = spans.total_tiles();

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    // Read back from lane 0 so that ptxas can treat it as the same for the whole warp (its Q
    // descriptor then stays in uniform registers).
    const int group = __shfl_sync(0xffffffffu, warp / 4, 0);  // query rows 64 * group ...
    const int warp_row = warp * 16;          // this warp's 16 rows within the tile
    // The key tiles this warpgroup computes: with causal, the first stops once no key is left
    // that its rows see (KeySpans), and the second has nothing to do in a tile of 64 rows or
    // fewer. It keeps loading and syncing with the other until the walk ends.
    const int group_tiles =
        group == 0 ? spans.split_tiles : (tile.count > kBlockM / 2 ? total_tiles : 0);
    WarpgroupRows<T, 32> rows(params, tile, warp_row, lane);
    // The warpgroup's 64 Q rows start 8 KiB into the Q tile; a k16 step is 32 bytes along a row.
    const uint32_t q_group = smem.q + group * 64 * D * 2;

    // With causal, the first warpgroup's walk ends early (the spans put the tiles only the
    // second sees last): skipping tiles inside the walk would take branches around the
    // asynchronous products, which measured slower in both the causal and the full case
    // (BENCHMARKS.md).
    // Descriptors (their low words) are built once: the address field is (address >> 4) in the
    // low bits, so an offset within shared memory is added as offset >> 4.
    const uint32_t q_desc = WgmmaDescriptorLow(q_group);
    const uint32_t k_desc = WgmmaDescriptorLow(smem.k);
    const uint32_t v_desc = WgmmaDescriptorLow(smem.v);
    auto issue_scores = [&](int stage) {
      rows.template IssueScores<D, kBlockM * D * 2>(q_desc, k_desc + ((stage * kTileBytes) >> 4));
    };
    auto issue_pv = [&](int stage) { rows.IssuePv(v_desc + ((stage * kTileBytes) >> 4)); };
    auto warp_scores = [&](int stage) {
      WarpScores<T, D, kBlockN, kBlockM, kBlockN>(rows.s, smem.q, warp_row,
                                                  smem.k + stage * kTileBytes, lane);
    };

    if (total_tiles > 0) {
      CpAsyncWait<kPrefetch - 1>();  // Q and tile 0
      FenceProxyAsync();
      __syncthreads();
    }
    if (group_tiles > 0) {
      rows.First(SpanStart(spans, 0), SpanStart(spans, 0), [&] { issue_scores(0); });
    }
    KeyTile next_tile = SpanStart(spans, 0);  // tile t + 1 below
    for (int t = 0; t + 1 < group_tiles; ++t) {
      NextKeyTile(spans, &next_tile);
      CpAsyncWait<kPrefetch - 2>();  // tile t + 1 has landed (this thread's part)
      FenceProxyAsync();
      CtaBarrier();  // ... everyone's; and every warpgroup is done with tile t - 1
      if (t + kPrefetch < total_tiles) loader.Load((t + kPrefetch) % kStages);
      CpAsyncCommit();
      // The stages through lane 0, so that ptxas keeps the descriptors in uniform registers.
      const int stage = static_cast<int>(__shfl_sync(0xffffffffu, static_cast<unsigned>(t), 0) %
                                         static_cast<unsigned>(kStages));
      const int next_stage = (stage + 1) % kStages;
      rows.Step(
          next_tile, next_tile, [&] { issue_scores(next_stage); }, [&] { issue_pv(stage); },
          [&] { warp_scores(next_stage); }, [] {});
    }
    if (group_tiles > 0) {
      issue_pv((group_tiles - 1) % kStages);
      WgmmaWait0();
    }
    // The same waits, fences, barriers and loads as the loop above, for the rest of the walk:
    // the other warpgroup's products read what this one's threads copy.
    for (int t = group_tiles > 0 ? group_tiles - 1 : 0; t + 1 < total_tiles; ++t) {
      CpAsyncWait<kPrefetch - 2>();
      FenceProxyAsync();
      CtaBarrier();
      if (t + kPrefetch < total_tiles) loader.Load((t + kPrefetch) % kStages);
      CpAsyncCommit();
    }
    CpAsyncWait<0>();

    StoreRows<D, T>(rows.acc, rows.row_sum, warp_row, tile.count, rows.pos, static_cast<T*>(p.o),
                    seq_base, p.o_row_stride, head_off, lane);
#endif
  }
};

template <typename T, class Spans = KeySpans>
int LaunchHopperForward(const FusedForwardParams& params, cudaStream_t stream) {
  return LaunchOverTiles<HopperForwardKernel<T, Spans>>(params, stream);
}

}  // namespace dilattn::attention::cuda
