#pragma once

// The Hopper kernel for D = 128 with a producer warpgroup: the same tiles, spans, softmax and
// products as HopperForwardKernel (fused_forward_sm90.cuh), but the K/V ring is filled by a
// third warpgroup and handed over through mbarriers, one "full" and one "empty" barrier per
// stage, instead of a CTA barrier per key tile. At D = 128 only one CTA fits an SM, and the CTA
// barrier held its two compute warpgroups in step: both issued their products at once, then
// both ran their exponentials while the tensor cores waited. Without it each consumer
// warpgroup runs at its own pace, and the loads' instructions leave the consumers' issue slots.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/attention/cuda/fused_forward.cuh"
#include "kernels/attention/cuda/fused_forward_sm90.cuh"

namespace dilattn::attention::cuda {

__device__ __forceinline__ void MbarrierInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void MbarrierArrive(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
               "r"(count)
               : "memory");
}
// Returns once the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void MbarrierWait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (done == 0);
}
// Arrives on the barrier once this thread's earlier cp.async copies have landed (the barrier's
// count includes this arrival).
__device__ __forceinline__ void CpAsyncArriveOn(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

template <typename T>
struct HopperWsForwardKernel {
  static constexpr int D = 128;
  static constexpr int kConsumerThreads = 256;  // two warpgroups, 64 query rows each
  static constexpr int kProducerThreads = 128;  // one warpgroup: Q and the K/V ring
  static constexpr int kThreads = kConsumerThreads + kProducerThreads;
  static constexpr int kBlockM = 128;
  static constexpr int kStages = 4;
  static constexpr int kQPanelBytes = kBlockM * 64 * 2;                        // 16 KiB
  static constexpr int kKVPanelBytes = kBlockN * 64 * 2;                       // 8 KiB
  static constexpr int kTileBytes = kBlockN * D * static_cast<int>(sizeof(T));  // 16 KiB
  // Barriers: Q, then full and empty per stage.
  static constexpr int kBarrierBytes = 8 * (1 + 2 * kStages);
  static constexpr int kSmemBytes = kBlockM * D * 2 + 2 * kStages * kTileBytes + 1024 + 128;
  // Arrivals that free a stage: lane 0 of each of the eight consumer warps, once per tile it
  // computed; a warpgroup whose walk is longer than the other's counts for both.
  static constexpr uint32_t kEmptyArrivals = 8;

  __device__ static void Run(const FusedForwardParams& params) {
#if defined(DILATTN_HAVE_WGMMA)
    extern __shared__ unsigned char smem_raw[];
    const uint32_t raw_addr = SharedAddress(smem_raw);
    const uint32_t base = (raw_addr + 1023u) & ~1023u;
    const uint32_t sq_addr = base;
    const uint32_t sk_addr = sq_addr + kBlockM * D * 2;
    const uint32_t sv_addr = sk_addr + kStages * kTileBytes;
    const uint32_t bar_addr = sv_addr + kStages * kTileBytes;  // 8-byte aligned
    const uint32_t q_full = bar_addr;
    auto full = [&](int stage) { return bar_addr + 8 * (1 + stage); };
    auto empty = [&](int stage) { return bar_addr + 8 * (1 + kStages + stage); };

    const DilatedAttentionParams& p = params.attn;
    __shared__ KeySpans spans;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    // Warps 0-3 produce; 4-11 consume. The producer's gathers spread over its 128 threads.
    const bool producer = warp < 4;
    const TileGather<D, kProducerThreads, T, 64> gather(params, threadIdx.x % kProducerThreads);
    const GpuTile& tile = gather.tile;
    if (threadIdx.x == 0) {
      MbarrierInit(q_full, kProducerThreads);
      for (int st = 0; st < kStages; ++st) {
        MbarrierInit(full(st), kProducerThreads);
        MbarrierInit(empty(st), kEmptyArrivals);
      }
    }
    if (producer) gather.template LoadQ<kBlockM>(sq_addr);
    gather.PlanSpans(&spans, kBlockM / 2);  // warp 0 plans; its barrier also publishes the inits
    if (producer) CpAsyncArriveOn(q_full);  // once the barrier is initialised: after the above
    const int total_tiles = spans.total_tiles();
    // Key tiles per consumer warpgroup, as in HopperForwardKernel: with causal the first stops
    // after the last key its rows see; the second has nothing to do in a tile of <= 64 rows.
    const int walk0 = spans.split_tiles;
    const int walk1 = tile.count > kBlockM / 2 ? total_tiles : 0;
    const int walk_max = walk0 > walk1 ? walk0 : walk1;
    const int walk_min = walk0 < walk1 ? walk0 : walk1;

    if (producer) {
      KeyTile next = SpanStart(spans, 0);
      for (int t = 0; t < walk_max; ++t) {
        const int stage = t % kStages;
        if (t >= kStages) MbarrierWait(empty(stage), (t / kStages - 1) & 1);
        gather.LoadKV(next, sk_addr + stage * kTileBytes, sv_addr + stage * kTileBytes);
        CpAsyncArriveOn(full(stage));
        NextKeyTile(spans, &next);
      }
      CpAsyncWait<0>();
      return;
    }

    const int group = __shfl_sync(0xffffffffu, (warp - 4) / 4, 0);  // query rows 64 * group ...
    const int warp_row = (warp - 4) * 16;  // this warp's 16 rows within the tile
    const int walk = group == 0 ? walk0 : walk1;
    // Lane 0 of each warp frees a stage once its products are done with it; where only this
    // warpgroup computes the tile, its arrival stands for the other's too.
    auto release = [&](int t) {
      if (lane == 0) MbarrierArrive(empty(t % kStages), t < walk_min ? 1 : 2);
    };
    const int64_t seq_base = gather.seq_base;
    const int64_t head_off = gather.head_off;
    const int64_t q_stride = tile.q_stride;
    const int64_t q_first = tile.q_pos;
    int64_t pos[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) pos[h] = q_first + (warp_row + lane / 4 + h * 8) * q_stride;
    const int warp_first_pos = static_cast<int>(q_first + warp_row * q_stride);

    float acc[64];  // O: 16 rows x 128 per warp, the m64n128 accumulator
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};
    const uint32_t q_group = sq_addr + group * 64 * 64 * 2;

    float s[32];
    uint32_t probs[4][4];
    const uint32_t q_desc = WgmmaDescriptorLow(q_group);
    const uint32_t k_desc = WgmmaDescriptorLow(sk_addr);
    // V as the B operand of n128 products: the leading byte offset steps between its panels.
    const uint32_t v_desc =
        WgmmaDescriptorLow(sv_addr) - (1u << 16) + ((kKVPanelBytes >> 4) << 16);
    auto issue_scores = [&](int stage) {
      const uint32_t k_tile = k_desc + ((stage * kTileBytes) >> 4);
      WgmmaFence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const int q_off = (ks / 4) * kQPanelBytes + (ks % 4) * 32;
        const int k_off = (ks / 4) * kKVPanelBytes + (ks % 4) * 32;
        Wgmma<T>::SS(s, q_desc + (q_off >> 4), k_tile + (k_off >> 4), ks > 0);
      }
      WgmmaCommit();
    };
    auto issue_pv = [&](int stage) {
      const uint32_t v_tile = v_desc + ((stage * kTileBytes) >> 4);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) Wgmma<T>::RS128(acc, probs[kk], v_tile + ((kk * 2048) >> 4));
      WgmmaCommit();
    };
    auto need_causal = [&](const KeyTile& kt) {
      return p.causal && kt.pos0 + (kt.valid() - 1) * kt.rate > warp_first_pos;
    };
    auto softmax = [&](const KeyTile& kt, float* alpha) {
      return SoftmaxStep<0>(s, nullptr, row_max, row_sum, lane, kt, need_causal(kt), pos,
                            params.scale_log2, alpha);
    };
    auto softmax_stale = [&](const KeyTile& kt) {
      float sums[2];
      const bool ok = SoftmaxAgainstStaleMax(s, row_max, sums, lane, kt, need_causal(kt), pos,
                                             params.scale_log2);
      int any_failed;
      asm volatile(
          "{\n.reg .pred failed, any;\nsetp.eq.u32 failed, %1, 0;\n"
          "bar.red.or.pred any, %2, 128, failed;\nselp.u32 %0, 1, 0, any;\n}\n"
          : "=r"(any_failed)
          : "r"(static_cast<int>(ok)), "r"(1 + group)
          : "memory");
      if (any_failed != 0) return false;
      row_sum[0] += sums[0];
      row_sum[1] += sums[1];
      return true;
    };
    auto pack = [&] {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) PackProbabilities<T>(s, kk, probs[kk]);
    };
    // Waits for key tile t's stage to be full; cp.async wrote it through the generic proxy.
    auto wait_full = [&](int t) {
      MbarrierWait(full(t % kStages), (t / kStages) & 1);
      FenceProxyAsync();
    };

    if (walk > 0) {
      MbarrierWait(q_full, 0);
      wait_full(0);
      float alpha[2];
      issue_scores(0);
      WgmmaWait0();
      softmax(SpanStart(spans, 0), alpha);
      pack();
    }
    KeyTile next_tile = SpanStart(spans, 0);
    for (int t = 0; t + 1 < walk; ++t) {
      NextKeyTile(spans, &next_tile);
      wait_full(t + 1);
      const int stage = static_cast<int>(__shfl_sync(0xffffffffu, static_cast<unsigned>(t), 0) %
                                         static_cast<unsigned>(kStages));
      const int next_stage = (stage + 1) % kStages;
      issue_scores(next_stage);
      issue_pv(stage);
      WgmmaWait1();
      const bool settled = softmax_stale(next_tile);
      WgmmaWait0();
      release(t);
      float alpha[2];
      bool rescale = false;
      if (!settled) {
        issue_scores(next_stage);
        WgmmaWait0();
        rescale = softmax(next_tile, alpha);
      }
      if (rescale) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int j = 0; j < 16; ++j) {
            acc[4 * j + 2 * h] *= alpha[h];
            acc[4 * j + 2 * h + 1] *= alpha[h];
          }
        }
      }
      pack();
    }
    if (walk > 0) {
      issue_pv((walk - 1) % kStages);
      WgmmaWait0();
      release(walk - 1);
    }
    StoreRows<D, T>(acc, row_sum, warp_row, tile.count, pos, static_cast<T*>(p.o), seq_base,
                    p.o_row_stride, head_off, lane);
#endif
  }
};

template <typename T>
__global__ void __launch_bounds__(HopperWsForwardKernel<T>::kThreads, 1)
    HopperWsForward(const __grid_constant__ FusedForwardParams params) {
  if (ZeroedKeylessTile<HopperWsForwardKernel<T>::kThreads, 128>(params)) return;
  HopperWsForwardKernel<T>::Run(params);
}

template <typename T>
int LaunchHopperWsForward(const FusedForwardParams& params, cudaStream_t stream) {
  using K = HopperWsForwardKernel<T>;
  static_assert(K::kBlockM == FusedBlockM(128), "tile list and kernel disagree on tile height");
  if (params.num_tiles == 0) return 0;
  cudaError_t err = cudaFuncSetAttribute(HopperWsForward<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         K::kSmemBytes);
  if (err != cudaSuccess) return err;
  HopperWsForward<T><<<static_cast<unsigned>(params.num_tiles), K::kThreads, K::kSmemBytes,
                       stream>>>(params);
  return cudaGetLastError();
}

}  // namespace dilattn::attention::cuda
