#pragma once

// The Hopper (sm_90a) variant of the fused kernel for D = 64: the same tiles, gathers and online
// softmax as fused_forward.cuh, with both products on wgmma. Two warpgroups each own 64 of the
// tile's 128 query rows. S = Q K^T reads Q and K straight from shared memory through matrix
// descriptors; O += P V takes P from registers and V from shared memory (transposed). The shared
// tiles' 16-byte XOR swizzle by row % 8 over 128-byte rows is exactly the hardware's 128-byte
// swizzle, so the loaders are unchanged; tiles are 1024-byte aligned as that swizzle requires.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/attention/cuda/fused_forward.cuh"

namespace dilattn::attention::cuda {

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DILATTN_HAVE_WGMMA 1
#endif

// A wgmma matrix descriptor for a 128-byte-swizzled tile: start address, leading and stride
// byte offsets (16-byte units) and the swizzle mode in bits 62-63.
__device__ __forceinline__ uint64_t WgmmaDescriptor(uint32_t smem_address, uint32_t lead_bytes,
                                                    uint32_t stride_bytes) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((smem_address & 0x3ffff) >> 4);
  d |= static_cast<uint64_t>((lead_bytes >> 4) & 0x3fff) << 16;
  d |= static_cast<uint64_t>((stride_bytes >> 4) & 0x3fff) << 32;
  d |= static_cast<uint64_t>(1) << 62;  // 128-byte swizzle
  return d;
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

#define DILATTN_DEFINE_WGMMA(TYPE, PTX)                                                        \
  template <>                                                                                  \
  struct Wgmma<TYPE> {                                                                         \
    /* d[32] (+)= A(smem, K-major) B(smem, K-major): m64 n64 k16. */                           \
    __device__ static void SS(float* d, uint64_t a, uint64_t b, int accumulate) {              \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " "               \
                   DILATTN_WGMMA_REGS32 ", %32, %33, p, 1, 1, 0, 0;\n}\n"                      \
                   : DILATTN_WGMMA_ACC32                                                       \
                   : "l"(a), "l"(b), "r"(accumulate));                                         \
    }                                                                                          \
    /* d[32] += A(registers) B(smem, transposed: N contiguous): m64 n64 k16. */                \
    __device__ static void RS(float* d, const uint32_t* a, uint64_t b) {                       \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " "               \
                   DILATTN_WGMMA_REGS32 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"        \
                   : DILATTN_WGMMA_ACC32                                                       \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                      \
    }                                                                                          \
  };

DILATTN_DEFINE_WGMMA(__half, "f16")
DILATTN_DEFINE_WGMMA(__nv_bfloat16, "bf16")
#undef DILATTN_DEFINE_WGMMA

__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaWait0() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// cp.async writes shared memory through the generic proxy; wgmma reads it through the async
// proxy.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <typename T>
struct HopperForwardKernel {
  static constexpr int D = 64;
  static constexpr int kWarps = 8;  // two warpgroups
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 128;
  static constexpr int kChunks = D / 8;
  static constexpr int kStages = 3;
  static constexpr int kRowsPerPass = kThreads / kChunks;
  static constexpr int kTileBytes = kBlockN * D * static_cast<int>(sizeof(T));  // 8 KiB
  static constexpr int kSmemBytes = kBlockM * D * 2 + 2 * kStages * kTileBytes + 1024;

  template <int kRows>
  __device__ static void LoadRows(uint32_t smem_tile, int thread_row, int chunk, const T* src,
                                  int64_t step, int valid, const T* any_valid) {
#pragma unroll
    for (int j = 0; j < kRows / kRowsPerPass; ++j) {
      const int row = thread_row + j * kRowsPerPass;
      const bool ok = row < valid;
      CpAsync16(smem_tile + SwizzledOffset<D>(row, chunk) * 2,
                ok ? src + j * kRowsPerPass * step : any_valid, ok);
    }
  }

  __device__ static void Run(const FusedForwardParams& params) {
#if defined(DILATTN_HAVE_WGMMA)
    extern __shared__ unsigned char smem_raw[];
    // 128-byte swizzle atoms are 1024 bytes: align the tiles to that.
    const uint32_t raw_addr = SharedAddress(smem_raw);
    const uint32_t base = (raw_addr + 1023u) & ~1023u;
    const uint32_t sq_addr = base;
    const uint32_t sk_addr = sq_addr + kBlockM * D * 2;
    const uint32_t sv_addr = sk_addr + kStages * kTileBytes;

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
      const int64_t col = head_off + thread_chunk * 8;
      LoadRows<kBlockN>(sk_addr + stage * kTileBytes, thread_row, thread_chunk,
                        k + first * p.k_row_stride + col, span_rate[s] * p.k_row_stride, valid, k);
      LoadRows<kBlockN>(sv_addr + stage * kTileBytes, thread_row, thread_chunk,
                        v + first * p.v_row_stride + col, span_rate[s] * p.v_row_stride, valid, v);
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
    const int group = warp / 4;              // warpgroup: query rows 64 * group ...
    const int warp_row = warp * 16;          // this warp's 16 rows within the tile
    int64_t pos[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) pos[h] = q_first + (warp_row + lane / 4 + h * 8) * q_stride;
    const int group_last_row = min(group * 64 + 64, static_cast<int>(tile.count)) - 1;
    const int64_t group_first_pos = q_first + group * 64 * q_stride;
    const int64_t group_last_pos = q_first + group_last_row * q_stride;

    float acc[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};
    const float scale_log2 = params.scale_log2;
    // The warpgroup's 64 Q rows start 8 KiB into the Q tile; a k16 step is 32 bytes along a row.
    const uint32_t q_group = sq_addr + group * 64 * D * 2;

    for (int t = 0; t < total_tiles; ++t) {
      const int stage = t % kStages;
      if (t + kStages - 1 < total_tiles) load_kv(t + kStages - 1, (t + kStages - 1) % kStages);
      CpAsyncCommit();
      CpAsyncWait<kStages - 1>();
      FenceProxyAsync();
      __syncthreads();

      int span;
      int64_t k0;
      locate(t, &span, &k0);
      const int valid = static_cast<int>(Min64(kBlockN, span_count[span] - k0));
      const int64_t key_pos0 = span_first[span] + k0 * span_rate[span];
      const int64_t key_rate = span_rate[span];
      // Warpgroup-uniform: all 4 warps of a group issue wgmma together or not at all.
      if (!(p.causal && key_pos0 > group_last_pos)) {
        const uint32_t k_tile = sk_addr + stage * kTileBytes;
        const uint32_t v_tile = sv_addr + stage * kTileBytes;
        float s[32];
        WgmmaFence();
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
          Wgmma<T>::SS(s, WgmmaDescriptor(q_group + ks * 32, 16, 1024),
                       WgmmaDescriptor(k_tile + ks * 32, 16, 1024), ks > 0);
        }
        WgmmaCommit();
        WgmmaWait0();

        const bool need_causal = p.causal && key_pos0 + (valid - 1) * key_rate > group_first_pos;
        if (valid < kBlockN || need_causal) {
          const int tcol = 2 * (lane % 4);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            int last = valid - 1;
            if (need_causal) {
              const int64_t ahead = pos[h] - key_pos0;
              const int seen = ahead < 0 ? -1 : static_cast<int>(ahead) / static_cast<int>(key_rate);
              last = seen < last ? seen : last;
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              if (j * 8 + tcol > last) s[4 * j + 2 * h] = -INFINITY;
              if (j * 8 + tcol + 1 > last) s[4 * j + 2 * h + 1] = -INFINITY;
            }
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float m4[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            m4[j] = fmaxf(fmaxf(s[8 * j + 2 * h], s[8 * j + 2 * h + 1]),
                          fmaxf(s[8 * j + 4 + 2 * h], s[8 * j + 4 + 2 * h + 1]));
          }
          float tile_max = fmaxf(fmaxf(m4[0], m4[1]), fmaxf(m4[2], m4[3]));
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
          const float new_max = fmaxf(row_max[h], tile_max);
          const float use = new_max == -INFINITY ? 0.f : new_max * scale_log2;
          const float alpha = Exp2(row_max[h] * scale_log2 - use);
          row_max[h] = new_max;
          float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            s[4 * j + 2 * h] = Exp2(fmaf(s[4 * j + 2 * h], scale_log2, -use));
            s[4 * j + 2 * h + 1] = Exp2(fmaf(s[4 * j + 2 * h + 1], scale_log2, -use));
            part[j % 4] += s[4 * j + 2 * h] + s[4 * j + 2 * h + 1];
          }
          row_sum[h] = row_sum[h] * alpha + ((part[0] + part[1]) + (part[2] + part[3]));
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            acc[4 * j + 2 * h] *= alpha;
            acc[4 * j + 2 * h + 1] *= alpha;
          }
        }
        uint32_t a[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          a[kk][0] = MmaType<T>::Pack(s[8 * kk + 0], s[8 * kk + 1]);
          a[kk][1] = MmaType<T>::Pack(s[8 * kk + 2], s[8 * kk + 3]);
          a[kk][2] = MmaType<T>::Pack(s[8 * kk + 4], s[8 * kk + 5]);
          a[kk][3] = MmaType<T>::Pack(s[8 * kk + 6], s[8 * kk + 7]);
        }
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          // 16 keys are two 8-row swizzle atoms: 2 KiB further into the V tile.
          Wgmma<T>::RS(acc, a[kk], WgmmaDescriptor(v_tile + kk * 2048, 16, 1024));
        }
        WgmmaCommit();
        WgmmaWait0();
      }
      __syncthreads();
    }
    CpAsyncWait<0>();

    T* o = static_cast<T*>(p.o);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = row_sum[h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = warp_row + lane / 4 + h * 8;
      if (row >= tile.count) continue;
      T* out = o + (seq_base + pos[h]) * p.o_row_stride + head_off + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        *reinterpret_cast<uint32_t*>(out + j * 8) =
            MmaType<T>::Pack(acc[4 * j + 2 * h] * inv, acc[4 * j + 2 * h + 1] * inv);
      }
    }
#endif
  }
};

template <typename T>
__global__ void __launch_bounds__(HopperForwardKernel<T>::kThreads)
    HopperForward(const __grid_constant__ FusedForwardParams params) {
  HopperForwardKernel<T>::Run(params);
}

template <typename T>
int LaunchHopperForward(const FusedForwardParams& params, cudaStream_t stream) {
  using K = HopperForwardKernel<T>;
  static_assert(K::kBlockM == FusedBlockM(64), "tile list and kernel disagree on tile height");
  if (params.num_tiles == 0) return 0;
  cudaError_t err = cudaFuncSetAttribute(HopperForward<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         K::kSmemBytes);
  if (err != cudaSuccess) return err;
  HopperForward<T><<<static_cast<unsigned>(params.num_tiles), K::kThreads, K::kSmemBytes,
                     stream>>>(params);
  return cudaGetLastError();
}

}  // namespace dilattn::attention::cuda
