#pragma once

// The Hopper kernel for D = 128 with a producer warpgroup: the same tiles, spans, softmax and
// products as HopperForwardKernel (fused_forward_sm90.cuh), but the K/V ring is filled by a
// third warpgroup and handed over through mbarriers, one "full" and one "empty" barrier per
// stage, instead of a CTA barrier per key tile. At D = 128 only one CTA fits an SM, and the CTA
// barrier held its two compute warpgroups in step: both issued their products at once, then
// both ran their exponentials while the tensor cores waited. Without it each consumer
// warpgroup runs at its own pace, and the loads' instructions leave the consumers' issue slots.
// A stage holds two key tiles, so both products are n128; the consumers' registers for that
// (232 each) come from the producer's through setmaxnreg.

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

template <typename T, class Spans = KeySpans>
struct HopperWsForwardKernel {
  static constexpr int D = 128;
  static constexpr int kHeadDim = D;
  static constexpr int kMinBlocks = 1;  // 224 KiB of shared memory
  static constexpr int kConsumerThreads = 256;  // two warpgroups, 64 query rows each
  static constexpr int kProducerThreads = 128;  // one warpgroup: Q and the K/V ring
  static constexpr int kThreads = kConsumerThreads + kProducerThreads;
  static constexpr int kBlockM = 128;
  // Each stage holds two key tiles (128 keys): the scores are one n128 product per k-step.
  static constexpr int kKeyTiles = 2;
  static constexpr int kStageKeys = kBlockN * kKeyTiles;
  static constexpr int kStages = 3;
  static constexpr int kQPanelBytes = kBlockM * 64 * 2;                           // 16 KiB
  static constexpr int kKVPanelBytes = kStageKeys * 64 * 2;                       // 16 KiB
  static constexpr int kTileBytes = kStageKeys * D * static_cast<int>(sizeof(T));  // 32 KiB
  // Barriers: Q, then full and empty per stage.
  static constexpr int kBarrierBytes = 8 * (1 + 2 * kStages);
  static constexpr int kSmemBytes =
      kBlockM * D * 2 + 2 * kStages * kTileBytes + 1024 + kBarrierBytes;
  // Arrivals that free a stage: every lane of each of the eight consumer warps, once per tile
  // it computed; a warpgroup whose walk is longer than the other's counts for both.
  static constexpr uint32_t kEmptyArrivals = 8 * 32;
  // Registers per thread: the launch gives every thread kLaunchRegs (the most 384 threads can
  // have); setmaxnreg then moves them from the producer to the consumers. A consumer's
  // setmaxnreg.inc waits until the CTA's pool holds its request, so a build whose kernel got
  // fewer than kLaunchRegs would hang: the launch checks (LaunchHopperWsForward).
  static constexpr int kLaunchRegs = 168;
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = 232;
  static_assert(kProducerThreads * kProducerRegs + kConsumerThreads * kConsumerRegs <=
                    kThreads * kLaunchRegs,
                "setmaxnreg asks for more registers than the launch holds");

  __device__ static void Run(const FusedForwardParams& params) {
#if defined(DILATTN_HAVE_WGMMA)
    extern __shared__ unsigned char smem_raw[];
    const HopperSmem smem = LayoutHopperSmem<kBlockM * D * 2, kStages * kTileBytes>(smem_raw);
    const uint32_t bar_addr = smem.end;  // 8-byte aligned
    const uint32_t q_full = bar_addr;
    auto full = [&](int stage) { return bar_addr + 8 * (1 + stage); };
    auto empty = [&](int stage) { return bar_addr + 8 * (1 + kStages + stage); };

    const DilatedAttentionParams& p = params.attn;
    __shared__ Spans spans;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    // Warps 0-3 produce; 4-11 consume. The producer's gathers spread over its 128 threads.
    const bool producer = warp < 4;
    const TileGather<D, kProducerThreads, T, 64, kStageKeys> gather(
        params, threadIdx.x % kProducerThreads);
    const GpuTile& tile = gather.tile;
    if (threadIdx.x == 0) {
      MbarrierInit(q_full, kProducerThreads);
      for (int st = 0; st < kStages; ++st) {
        MbarrierInit(full(st), kProducerThreads);
        MbarrierInit(empty(st), kEmptyArrivals);
      }
    }
    if (producer) gather.template LoadQ<kBlockM>(smem.q);
    // Warp 0 plans; its barrier also publishes the inits.
    PlanTileSpans(gather, &spans, kBlockM / 2);
    if (producer) CpAsyncArriveOn(q_full);  // once the barrier is initialised: after the above
    const int total_tiles = spans.total_tiles();
    // Key tiles per consumer warpgroup, as in HopperForwardKernel: with causal the first stops
    // after the last key its rows see; the second has nothing to do in a tile of <= 64 rows.
    // Counted in stages (pairs of key tiles): a pair's second tile past a warpgroup's walk is
    // masked out for it (past the last key, or after its rows: causal).
    const int walk0 = (spans.split_tiles + 1) / 2;
    const int walk1 = tile.count > kBlockM / 2 ? (total_tiles + 1) / 2 : 0;
    const int walk_max = walk0 > walk1 ? walk0 : walk1;
    const int walk_min = walk0 < walk1 ? walk0 : walk1;

    if (producer) {
      // The producer needs few registers; the consumers take them.
      asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs) : "memory");
      KeyTile next = SpanStart(spans, 0);
      for (int t = 0; t < walk_max; ++t) {
        const int stage = t % kStages;
        if (t >= kStages) MbarrierWait(empty(stage), (t / kStages - 1) & 1);
#pragma unroll
        for (int half = 0; half < kKeyTiles; ++half) {
          // Keys 64 * half.. of the stage: 64 rows further into each 128-row panel.
          const uint32_t row_off = half * kBlockN * 64 * 2;
          gather.LoadKV(next, smem.k + stage * kTileBytes + row_off,
                        smem.v + stage * kTileBytes + row_off);
          NextKeyTile(spans, &next);
        }
        CpAsyncArriveOn(full(stage));
      }
      CpAsyncWait<0>();
      return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs) : "memory");
    const int group = __shfl_sync(0xffffffffu, (warp - 4) / 4, 0);  // query rows 64 * group ...
    const int warp_row = (warp - 4) * 16;  // this warp's 16 rows within the tile
    const int walk = group == 0 ? walk0 : walk1;
    // Every lane of each warp frees a stage once its products are done with it (its own reads
    // too: a warp's recomputation reads the stage with ldmatrix, and racecheck takes no lane's
    // arrival for another's reads); where only this warpgroup computes the tile, its arrival
    // stands for the other's too.
    auto release = [&](int t) { MbarrierArrive(empty(t % kStages), t < walk_min ? 1 : 2); };
    WarpgroupRows<T, 64, kKeyTiles> rows(params, tile, warp_row, lane);
    const uint32_t q_desc = WgmmaDescriptorLow(smem.q + group * 64 * 64 * 2);
    const uint32_t k_desc = WgmmaDescriptorLow(smem.k);
    // V as the B operand of n128 products: the leading byte offset steps between its panels.
    const uint32_t v_desc =
        WgmmaDescriptorLow(smem.v) - (1u << 16) + ((kKVPanelBytes >> 4) << 16);
    auto issue_scores = [&](int stage) {
      rows.template IssueScores<D, kQPanelBytes>(q_desc, k_desc + ((stage * kTileBytes) >> 4));
    };
    auto issue_pv = [&](int stage) { rows.IssuePv(v_desc + ((stage * kTileBytes) >> 4)); };
    auto warp_scores = [&](int stage) {
      WarpScores<T, D, kKeyTiles * kBlockN, kBlockM, kKeyTiles * kBlockN>(
          rows.s, smem.q, warp_row, smem.k + stage * kTileBytes, lane);
    };
    // Waits for key tile t's stage to be full; cp.async wrote it through the generic proxy.
    auto wait_full = [&](int t) {
      MbarrierWait(full(t % kStages), (t / kStages) & 1);
      FenceProxyAsync();
    };

    KeyTile lo = SpanStart(spans, 0);  // the stage's two key tiles
    KeyTile hi = lo;
    NextKeyTile(spans, &hi);
    if (walk > 0) {
      MbarrierWait(q_full, 0);
      wait_full(0);
      rows.First(lo, hi, [&] { issue_scores(0); });
    }
    for (int t = 0; t + 1 < walk; ++t) {
      lo = hi;
      NextKeyTile(spans, &lo);
      hi = lo;
      NextKeyTile(spans, &hi);
      wait_full(t + 1);
      const int stage = static_cast<int>(__shfl_sync(0xffffffffu, static_cast<unsigned>(t), 0) %
                                         static_cast<unsigned>(kStages));
      const int next_stage = (stage + 1) % kStages;
      rows.Step(
          lo, hi, [&] { issue_scores(next_stage); }, [&] { issue_pv(stage); },
          [&] { warp_scores(next_stage); }, [&] { release(t); });
    }
    if (walk > 0) {
      issue_pv((walk - 1) % kStages);
      WgmmaWait0();
      release(walk - 1);
    }
    StoreRows<D, T>(rows.acc, rows.row_sum, warp_row, tile.count, rows.pos, static_cast<T*>(p.o),
                    gather.seq_base, p.o_row_stride, gather.head_off, lane);
#endif
  }
};

template <typename T, class Spans = KeySpans>
int LaunchHopperWsForward(const FusedForwardParams& params, cudaStream_t stream) {
  using K = HopperWsForwardKernel<T, Spans>;
  if (params.num_tiles == 0) return 0;
  static const int regs = [] {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, FusedForwardOverTiles<K>) == cudaSuccess ? attr.numRegs
                                                                                 : 0;
  }();
  if (regs < K::kLaunchRegs) return cudaErrorInvalidKernelImage;  // setmaxnreg could not be met
  return LaunchOverTiles<K>(params, stream);
}

}  // namespace dilattn::attention::cuda
