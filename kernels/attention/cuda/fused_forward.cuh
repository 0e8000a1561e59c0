#pragma once

// The fused dilated-attention forward kernel (tensor cores through mma.sync m16n8k16, sm_80 and
// newer). One CTA per tile of the work list (gpu_tiles.h): up to kBlockM (128, or 64 for
// D = 256) evenly spaced query rows of one (sequence, head) that share one key set. The CTA
// walks the key spans of every branch the tile's rows take part in, 64 keys at a time, with one
// online softmax across all of them, so longnet's union-of-keys softmax needs no merge pass.
// Dilated rows are gathered straight from the (tokens, H, D) tensors with cp.async; K/V tiles
// stream through a kStages-deep ring in shared memory.
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

// The key spans of one tile, in shared memory: one per branch the tile's rows take part in,
// clipped to the last query when causal (later keys are masked for every row), with the running
// count of 64-key tiles. Positions, rates and counts are within one sequence (< 2^31).
// With causal, each span is walked in two parts: first every span's tiles that reach the split
// row (the last row of the Hopper kernel's first warpgroup), then the rest of every span, which
// only rows after the split see. The first warpgroup stops after `split_tiles`; without causal,
// or without a split, the second parts are empty.
struct KeySpans {
  int first[2 * kMaxBranches];
  int rate[2 * kMaxBranches];
  int row_first[2 * kMaxBranches];  // K/V row positions: first and rate but for packed keys
  int row_rate[2 * kMaxBranches];
  int count[2 * kMaxBranches];
  int tiles_end[2 * kMaxBranches];
  int num;
  int split_tiles;
  __device__ int total_tiles() const { return num > 0 ? tiles_end[num - 1] : 0; }
};

// Inclusive prefix sum over the warp's lanes.
__device__ __forceinline__ int WarpInclusiveSum(int x, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int below = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x += below;
  }
  return x;
}

// One warp fills the table, lane b planning branch b (kMaxBranches <= 32), so the divisions of
// the branches run side by side instead of one after another in one thread. Positions within a
// sequence are < 2^31 (the selector checks): 32-bit unsigned divisions. q_first <= q_split <=
// q_last are query positions of the tile.
__device__ __forceinline__ void PlanKeySpans(const DilatedAttentionParams& p,
                                             const PackedKeys* packed, int head, uint32_t seq_len,
                                             uint32_t q_first, uint32_t q_split, uint32_t q_last,
                                             KeySpans* spans, int lane) {
  uint32_t first = 0, count = 0;
  bool kept = lane < p.num_branches &&
              BranchKeySpan<uint32_t>(p, lane, head, seq_len, q_first, &first, &count);
  // As BranchKeySpan clamps it: the causal mask divides by this rate.
  const uint32_t rate = lane < p.num_branches ? ClampedRate<uint32_t>(p, lane) : 1;
  // Where the span's keys are read: at their positions, or packed (PackedKeys).
  uint32_t row_first = first, row_rate = rate;
  if (kept && packed[lane].begin >= 0) {
    const auto segment = static_cast<uint32_t>(
        p.segment_length[lane] < static_cast<int64_t>(seq_len) ? p.segment_length[lane] : seq_len);
    row_first = PackedSegmentRow<uint32_t>(packed[lane], first / segment * segment, segment);
    row_rate = 1;
  }
  uint32_t head_count = count;  // keys of the first part: whole tiles up to the split row's
  if (kept && p.causal) {
    kept = first <= q_last;
    if (kept) {
      const uint32_t visible = (q_last - first) / rate + 1;
      count = count < visible ? count : visible;
      // q_first is kept by the branch, so first <= q_split: the first part is never empty.
      const uint32_t split_tiles = ((q_split - first) / rate + kBlockN) / kBlockN;
      head_count = split_tiles * kBlockN < count ? split_tiles * kBlockN : count;
    }
  }
  const uint32_t tail_count = kept ? count - head_count : 0;
  const unsigned below = (1u << lane) - 1;
  const unsigned head_mask = __ballot_sync(0xffffffffu, kept);
  const unsigned tail_mask = __ballot_sync(0xffffffffu, tail_count > 0);
  const int num_heads = __popc(head_mask);
  const int head_tiles =
      WarpInclusiveSum(kept ? static_cast<int>((head_count + kBlockN - 1) / kBlockN) : 0, lane);
  const int split = __shfl_sync(0xffffffffu, head_tiles, 31);
  const int tail_tiles =
      split + WarpInclusiveSum(static_cast<int>((tail_count + kBlockN - 1) / kBlockN), lane);
  if (kept) {
    const int n = __popc(head_mask & below);
    spans->first[n] = static_cast<int>(first);
    spans->rate[n] = static_cast<int>(rate);
    spans->row_first[n] = static_cast<int>(row_first);
    spans->row_rate[n] = static_cast<int>(row_rate);
    spans->count[n] = static_cast<int>(head_count);
    spans->tiles_end[n] = head_tiles;
  }
  if (tail_count > 0) {
    const int n = num_heads + __popc(tail_mask & below);
    spans->first[n] = static_cast<int>(first + head_count * rate);
    spans->rate[n] = static_cast<int>(rate);
    spans->row_first[n] = static_cast<int>(row_first + head_count * row_rate);
    spans->row_rate[n] = static_cast<int>(row_rate);
    spans->count[n] = static_cast<int>(tail_count);
    spans->tiles_end[n] = tail_tiles;
  }
  if (lane == 0) {
    spans->num = num_heads + __popc(tail_mask);
    spans->split_tiles = split;
  }
}

// A cursor over a tile's walk of key tiles, span by span. The walk only ever moves one tile on,
// so the span table is read when a span starts, not per tile.
struct KeyTile {
  int span;       // == spans.num once past the last tile
  int remaining;  // keys of the span from this tile's first key on
  int pos0;       // position of the tile's first key in its sequence
  int rate;       // positions between consecutive keys
  int row0;       // K/V row position of the tile's first key (pos0 but for packed keys)
  int row_rate;   // row positions between consecutive keys
  __device__ int valid() const { return remaining < kBlockN ? remaining : kBlockN; }
};

__device__ __forceinline__ KeyTile SpanStart(const KeySpans& spans, int span) {
  KeyTile kt{span, 0, 0, 1, 0, 1};
  if (span < spans.num) {
    kt.remaining = spans.count[span];
    kt.pos0 = spans.first[span];
    kt.rate = spans.rate[span];
    kt.row0 = spans.row_first[span];
    kt.row_rate = spans.row_rate[span];
  }
  return kt;
}

// The walk's next tile; `Spans` is KeySpans or another table with a SpanStart (block-sparse's
// key runs), found by argument-dependent lookup.
template <class Spans>
__device__ __forceinline__ void NextKeyTile(const Spans& spans, KeyTile* kt) {
  kt->remaining -= kBlockN;
  if (kt->remaining > 0) {
    kt->pos0 += kBlockN * kt->rate;
    kt->row0 += kBlockN * kt->row_rate;
  } else {
    *kt = SpanStart(spans, kt->span + 1);
  }
}

// a * b as 64 bits. Written as uint64_t(a) * b, the compiler hoisted the widening of b out of
// the key-tile loop, and ptxas, left with a 64 x 64-bit product, added b's (zero) high word to
// every K/V address and copied the row base first: 8 instructions per key tile and thread that
// this explicit widening multiply (one IMAD.WIDE.U32 with the base as addend) does not take.
__device__ __forceinline__ uint64_t MulWide(uint32_t a, uint32_t b) {
  uint64_t r;
  asm("mul.wide.u32 %0, %1, %2;" : "=l"(r) : "r"(a), "r"(b));
  return r;
}

// Element offset of 16-byte chunk `chunk` of row `row` in a kRows-row shared tile stored as
// column panels of kPanel elements: panel after panel, each [kRows][kPanel] and swizzled. The
// mma.sync kernel keeps whole rows (kPanel = D); the wgmma kernel needs 128-byte rows, the
// width of the hardware swizzle, so with D = 128 it takes two 64-column panels.
template <int kPanel, int kRows>
__device__ __forceinline__ int PanelOffset(int row, int chunk) {
  constexpr int kPanelChunks = kPanel / 8;
  return (chunk / kPanelChunks) * kRows * kPanel +
         SwizzledOffset<kPanel>(row, chunk % kPanelChunks);
}

// Row gathers: thread tid copies 16-byte chunk (tid % (D / 8)) of rows tid / (D / 8) + j * pass
// of a kRows-row tile, so its source pointer advances by a fixed step per pass and its
// shared-memory offsets are fixed. `src` is already at this thread's first row and chunk; row i
// of the tile is at src + (i - thread_row) * step; rows at or past `valid` are zero-filled.
template <int D, int kPanel, int kThreads, int kRows, typename T>
__device__ __forceinline__ void GatherRows(uint32_t smem_tile, int thread_row, int chunk,
                                           const T* src, int64_t step, int valid,
                                           const T* any_valid) {
  constexpr int kRowsPerPass = kThreads / (D / 8);
#pragma unroll
  for (int j = 0; j < kRows / kRowsPerPass; ++j) {
    const int row = thread_row + j * kRowsPerPass;
    const bool ok = row < valid;
    CpAsync16(smem_tile + PanelOffset<kPanel, kRows>(row, chunk) * static_cast<int>(sizeof(T)),
              ok ? src + j * kRowsPerPass * step : any_valid, ok);
  }
}

// Where a CTA's tile is and the gathers that fill its shared tiles (column panels of kPanel
// elements, PanelOffset; a K/V stage's panels hold kStageRows rows, one or two key tiles);
// both kernels start here. Thread tid gathers 16-byte chunk tid % (D / 8) of rows
// tid / (D / 8) + j * (kThreads / (D / 8)).
template <int D, int kThreads, typename T, int kPanel = D, int kStageRows = kBlockN>
struct TileGather {
  const FusedForwardParams& params;
  const DilatedAttentionParams& p;
  GpuTile tile;
  int64_t seq_base;  // the tile's sequence starts at this token
  int64_t head_off;  // element offset of the tile's head within a token row
  int thread_row;
  int thread_chunk;
  // This thread's 16-byte chunk of the sequence's first K and V rows and the row strides, in
  // bytes: a row's address is then one widening multiply-add. Strides < 2^31 elements (the
  // selector checks) are < 2^32 bytes.
  const char* k_row;
  const char* v_row;
  uint32_t k_stride;
  uint32_t v_stride;
  uint32_t kv_dst;  // byte offset of this thread's chunk of its first row in a K or V tile

  // `thread`: this thread's index among the kThreads that gather (all of the CTA's by default).
  __device__ explicit TileGather(const FusedForwardParams& fused, int thread = threadIdx.x)
      : params(fused),
        p(fused.attn),
        tile(fused.tiles[blockIdx.x]),
        seq_base(p.seq_offsets[tile.seq]),
        head_off(static_cast<int64_t>(tile.head) * D),
        thread_row(thread / (D / 8)),
        thread_chunk(thread % (D / 8)),
        k_row(reinterpret_cast<const char*>(static_cast<const T*>(p.k) + seq_base * p.k_row_stride +
                                            head_off + thread_chunk * 8)),
        v_row(reinterpret_cast<const char*>(static_cast<const T*>(p.v) + seq_base * p.v_row_stride +
                                            head_off + thread_chunk * 8)),
        k_stride(static_cast<uint32_t>(p.k_row_stride * sizeof(T))),
        v_stride(static_cast<uint32_t>(p.v_row_stride * sizeof(T))),
        kv_dst(PanelOffset<kPanel, kStageRows>(thread_row, thread_chunk) * sizeof(T)) {}

  // Warp 0 plans the tile's key spans, split after the first `split_rows` rows; every thread
  // waits for them.
  __device__ void PlanSpans(KeySpans* spans, int split_rows) const {
    if (threadIdx.x < 32) {
      const auto seq_len = static_cast<uint32_t>(p.seq_offsets[tile.seq + 1] - seq_base);
      // Position of the last of the tile's first `rows` rows.
      const auto last_of = [&](int rows) {
        return static_cast<uint32_t>(tile.q_pos + (rows - 1) * tile.q_stride);
      };
      const int count = tile.count;
      PlanKeySpans(p, params.packed, tile.head, seq_len, static_cast<uint32_t>(tile.q_pos),
                   last_of(split_rows < count ? split_rows : count), last_of(count), spans,
                   threadIdx.x);
    }
    __syncthreads();
  }

  // The tile's (up to) kRows query rows into the shared tile at `sq`.
  template <int kRows>
  __device__ void LoadQ(uint32_t sq) const {
    const T* q = static_cast<const T*>(p.q);
    GatherRows<D, kPanel, kThreads, kRows>(sq, thread_row, thread_chunk,
                                   q + (seq_base + tile.q_pos + thread_row * tile.q_stride) *
                                           p.q_row_stride + head_off + thread_chunk * 8,
                                   tile.q_stride * p.q_row_stride, tile.count, q);
  }

  // One key tile into one K and one V ring stage. Offsets within the sequence are 32-bit
  // products widened once (rows < 2^31, row strides < 2^31 elements: the selector checks).
  __device__ void LoadKV(const KeyTile& kt, uint32_t sk, uint32_t sv) const {
    constexpr int kRowsPerPass = kThreads / (D / 8);
    const int valid = kt.valid();
#pragma unroll
    for (int j = 0; j < kBlockN / kRowsPerPass; ++j) {
      const int row = thread_row + j * kRowsPerPass;
      const bool ok = row < valid;
      const int pos = ok ? kt.row0 + row * kt.row_rate : 0;
      // Whole 8-row swizzle periods per pass keep this thread's swizzle term.
      const uint32_t dst =
          kRowsPerPass % 8 == 0
              ? kv_dst + j * kRowsPerPass * kPanel * static_cast<int>(sizeof(T))
              : PanelOffset<kPanel, kStageRows>(row, thread_chunk) * static_cast<int>(sizeof(T));
      // Both factors are non-negative: one 32 x 32 -> 64-bit multiply-add each (MulWide).
      CpAsync16(sk + dst, k_row + MulWide(static_cast<uint32_t>(pos), k_stride), ok);
      CpAsync16(sv + dst, v_row + MulWide(static_cast<uint32_t>(pos), v_stride), ok);
    }
  }
};

// Warp 0 plans the branch spans (the dilated operator); other span tables overload this.
template <typename Gather>
__device__ __forceinline__ void PlanTileSpans(const Gather& gather, KeySpans* spans,
                                              int split_rows) {
  gather.PlanSpans(spans, split_rows);
}

// The K/V ring's loader: the cursor of the next key tile to load and the ring's stages.
template <typename Gather, typename Spans>
struct KeyTileLoader {
  const Gather& gather;
  const Spans& spans;
  KeyTile next;
  uint32_t sk, sv;  // stage 0 of the K and V rings
  int stage_bytes;
  __device__ void Load(int stage) {
    gather.LoadKV(next, sk + stage * stage_bytes, sv + stage * stage_bytes);
    NextKeyTile(spans, &next);
  }
};

// Both kernels start a tile alike: Q on its way while warp 0 plans the key spans (split after
// kSplitRows rows), then the first kPrefetch key tiles into the ring, one commit group each
// (empty past the last tile).
template <int kRows, int kSplitRows, int kPrefetch, typename Gather, typename Spans>
__device__ __forceinline__ KeyTileLoader<Gather, Spans> StartTile(const Gather& gather,
                                                                  Spans* spans, uint32_t sq,
                                                                  uint32_t sk, uint32_t sv,
                                                                  int stage_bytes) {
  gather.template LoadQ<kRows>(sq);
  CpAsyncCommit();
  PlanTileSpans(gather, spans, kSplitRows);
  KeyTileLoader<Gather, Spans> loader{gather, *spans, SpanStart(*spans, 0), sk, sv, stage_bytes};
  const int total_tiles = spans->total_tiles();
#pragma unroll
  for (int st = 0; st < kPrefetch; ++st) {
    if (st < total_tiles) loader.Load(st);
    CpAsyncCommit();
  }
  return loader;
}

// Sets the scores of invisible keys to -inf: only where it can matter, a span's last, partial
// tile, and with causal the tiles that reach past the slice's rows. Per row, the last visible
// column: one division, then 32-bit compares. (Layout as in SoftmaxStep below.)
__device__ __forceinline__ void MaskScores(float* s, int lane, const KeyTile& kt, bool need_causal,
                                           const int64_t* pos) {
  if (kt.remaining < kBlockN || need_causal) {
    const int tcol = 2 * (lane % 4);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int last = kt.valid() - 1;
      if (need_causal) {
        // Positions within one sequence are < 2^31: the difference fits 32 bits, and the
        // division, unsigned, takes none of the sign fix-ups of a signed one.
        const int ahead = static_cast<int>(pos[h]) - kt.pos0;
        const int seen = ahead < 0 ? -1
                                   : static_cast<int>(static_cast<uint32_t>(ahead) /
                                                      static_cast<uint32_t>(kt.rate));
        last = seen < last ? seen : last;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j * 8 + tcol > last) s[4 * j + 2 * h] = -INFINITY;
        if (j * 8 + tcol + 1 > last) s[4 * j + 2 * h + 1] = -INFINITY;
      }
    }
  }
}

// Row h (0: lane / 4, 1: lane / 4 + 8) of a score tile of kTiles 8-key column tiles (8: 64
// keys) to 2^(s * scale_log2 - use), in place; returns this thread's part of the row's sum.
template <int kTiles = 8>
__device__ __forceinline__ float RowExp2(float* s, int h, float scale_log2, float use) {
  // Four partial sums, each started from its first pair: 0 + x is not x for x = -0, so ptxas
  // keeps an addition of zero for every partial sum that starts at 0.
  float part[4];
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    s[4 * j + 2 * h] = Exp2(fmaf(s[4 * j + 2 * h], scale_log2, -use));
    s[4 * j + 2 * h + 1] = Exp2(fmaf(s[4 * j + 2 * h + 1], scale_log2, -use));
    const float pair = s[4 * j + 2 * h] + s[4 * j + 2 * h + 1];
    part[j % 4] = j < 4 ? pair : part[j % 4] + pair;
  }
  return (part[0] + part[1]) + (part[2] + part[3]);
}

// Folds one 64-key tile of a 16-row slice into the running softmax. `s` holds the slice's 32
// raw scores as 8 column tiles of 4 (the mma accumulator layout: rows lane / 4 and lane / 4 + 8,
// columns 8j + 2 (lane % 4) + {0, 1}); on return, the probabilities. row_max is the exponent's
// reference in raw score units. It is raised only when some row of the warp would otherwise see
// probabilities above 2^kMaxGrowthLog2: O and the row sum share the reference, so a stale one is
// exact once O is divided by the sum, and most tiles skip the rescale of O. Returns whether this
// tile rescaled (warp-uniform); then `acc` (kAccTiles x 4, same layout over the output columns)
// has been rescaled, or with kAccTiles = 0 the factors are in `alpha` for a caller whose
// accumulator is still being written by an asynchronous product. With kTiles = 16 the scores
// are two 64-key tiles side by side: columns 64.. are `kt_hi`'s (masked by it).
inline constexpr float kMaxGrowthLog2 = 8.f;

template <int kAccTiles, int kTiles = 8>
__device__ __forceinline__ bool SoftmaxStep(float* s, float* acc, float* row_max, float* row_sum,
                                            int lane, const KeyTile& kt, bool need_causal,
                                            const int64_t* pos, float scale_log2,
                                            float* alpha = nullptr,
                                            const KeyTile* kt_hi = nullptr,
                                            bool need_causal_hi = false) {
  MaskScores(s, lane, kt, need_causal, pos);
  if constexpr (kTiles == 16) MaskScores(s + 32, lane, *kt_hi, need_causal_hi, pos);
  float tile_max[2];
  bool grow = false;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float m4[4];  // four partial maxima over pairs of column tiles
#pragma unroll
    for (int j = 0; j < kTiles / 2; ++j) {
      const float m = fmaxf(fmaxf(s[8 * j + 2 * h], s[8 * j + 2 * h + 1]),
                            fmaxf(s[8 * j + 4 + 2 * h], s[8 * j + 4 + 2 * h + 1]));
      m4[j % 4] = j < 4 ? m : fmaxf(m4[j % 4], m);
    }
    float m = fmaxf(fmaxf(m4[0], m4[1]), fmaxf(m4[2], m4[3]));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    tile_max[h] = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    // A first visible key always grows a max of -inf; a fully masked tile (-inf) never grows.
    grow |= (tile_max[h] - row_max[h]) * scale_log2 > kMaxGrowthLog2;
  }
  grow = __any_sync(0xffffffffu, grow);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (grow) {
      const float new_max = fmaxf(row_max[h], tile_max[h]);
      // A row with nothing visible yet keeps max -inf; exponents then use 0 and give 0.
      const float use = new_max == -INFINITY ? 0.f : new_max * scale_log2;
      const float scale = Exp2(row_max[h] * scale_log2 - use);
      if (alpha != nullptr) alpha[h] = scale;
      row_max[h] = new_max;
      row_sum[h] *= scale;
#pragma unroll
      for (int i = 0; i < kAccTiles; ++i) {
        acc[4 * i + 2 * h] *= scale;
        acc[4 * i + 2 * h + 1] *= scale;
      }
    }
    const float use = row_max[h] == -INFINITY ? 0.f : row_max[h] * scale_log2;
    row_sum[h] += RowExp2<kTiles>(s, h, scale_log2, use);
  }
  return grow;
}

// The common case of SoftmaxStep without the tile's max: exponents against the current reference
// row_max, accepted when none exceeds kMaxStaleSum, which each thread sees in its partial sums
// (positive terms; a -inf reference or an overflow fails the test as inf or NaN). `s` then holds
// the probabilities and `sums` this thread's part of the tile's row sums, for the caller to add
// once everyone who shares the products succeeded; otherwise the caller recomputes the scores
// and takes SoftmaxStep.
inline constexpr float kMaxStaleSum = 4096.f;  // 2^12: fp16 P stays finite

template <int kTiles = 8>
__device__ __forceinline__ bool SoftmaxAgainstStaleMax(float* s, const float* row_max,
                                                       float* sums, int lane,
                                                       const KeyTile& kt, bool need_causal,
                                                       const int64_t* pos, float scale_log2,
                                                       const KeyTile* kt_hi = nullptr,
                                                       bool need_causal_hi = false) {
  MaskScores(s, lane, kt, need_causal, pos);
  if constexpr (kTiles == 16) MaskScores(s + 32, lane, *kt_hi, need_causal_hi, pos);
  bool ok = true;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    sums[h] = RowExp2<kTiles>(s, h, scale_log2, row_max[h] * scale_log2);
    ok = ok && sums[h] <= kMaxStaleSum;  // false for NaN and inf
  }
  return ok;
}

// The A operand (16 rows x 16 keys) of O += P V for keys 16kk..16kk+15: the accumulator layout
// of two column tiles is the A-operand layout.
template <typename T>
__device__ __forceinline__ void PackProbabilities(const float* s, int kk, uint32_t* a) {
  a[0] = MmaType<T>::Pack(s[8 * kk + 0], s[8 * kk + 1]);
  a[1] = MmaType<T>::Pack(s[8 * kk + 2], s[8 * kk + 3]);
  a[2] = MmaType<T>::Pack(s[8 * kk + 4], s[8 * kk + 5]);
  a[3] = MmaType<T>::Pack(s[8 * kk + 6], s[8 * kk + 7]);
}

// Normalises and writes a 16-row slice's output rows (those below `count`).
template <int D, typename T>
__device__ __forceinline__ void StoreRows(const float* acc, const float* row_sum, int slice_row,
                                          int count, const int64_t* pos, T* o,
                                          int64_t seq_base, int64_t o_row_stride,
                                          int64_t head_off, int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = row_sum[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    if (slice_row + lane / 4 + h * 8 >= count) continue;
    T* out = o + (seq_base + pos[h]) * o_row_stride + head_off + 2 * (lane % 4);
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      *reinterpret_cast<uint32_t*>(out + i * 8) =
          MmaType<T>::Pack(acc[4 * i + 2 * h] * inv, acc[4 * i + 2 * h + 1] * inv);
    }
  }
}

// Tiles whose rows attend to no key (head_groups positions no branch keeps) sit every
// keyless.period entries over the list's first half (BuildGpuTiles), up to KeylessTileRows rows
// each. Their CTAs only write zeros; they decide so from blockIdx before any of the attention
// code, which keeps its register allocation. A thread stores a fixed chunk of every
// kThreads / chunks-th row: 16-byte chunks where the output's rows allow (4-byte otherwise, the
// alignment StoreRows assumes), with no division per store; these CTAs write most of
// head_groups' output, and per-element index arithmetic cost them as much issue time as an
// attention tile.
template <int kThreads, int D>
__device__ __forceinline__ bool ZeroedKeylessTile(const FusedForwardParams& params) {
  if (params.keyless.count == 0 || !IsKeylessSlot<uint32_t>(params.keyless, blockIdx.x)) {
    return false;
  }
  const DilatedAttentionParams& p = params.attn;
  const GpuTile tile = params.tiles[blockIdx.x];
  unsigned char* o = static_cast<unsigned char*>(p.o) +
                     (p.seq_offsets[tile.seq] * p.o_row_stride + int64_t{tile.head} * D) * 2;
  const int64_t row_bytes = p.o_row_stride * tile.q_stride * 2;  // between the tile's rows
  auto zero_rows = [&](auto chunk_zero) {
    constexpr int kChunkBytes = static_cast<int>(sizeof(chunk_zero));
    constexpr int kChunks = D * 2 / kChunkBytes;
    constexpr int kRowsPerPass = kThreads / kChunks;
    static_assert(kThreads % kChunks == 0, "whole rows per pass");
    unsigned char* dst = o + tile.q_pos * p.o_row_stride * 2 + (threadIdx.x / kChunks) * row_bytes +
                         (threadIdx.x % kChunks) * kChunkBytes;
    for (int r = threadIdx.x / kChunks; r < tile.count; r += kRowsPerPass) {
      *reinterpret_cast<decltype(chunk_zero)*>(dst) = chunk_zero;
      dst += kRowsPerPass * row_bytes;
    }
  };
  if (D % 8 == 0 && (reinterpret_cast<uintptr_t>(p.o) & 15) == 0 && p.o_row_stride % 8 == 0) {
    zero_rows(make_uint4(0, 0, 0, 0));
  } else {
    zero_rows(0u);
  }
  return true;
}

// `Spans`: where a tile's keys come from (KeySpans: the dilated branches; block-sparse passes its
// key-run table).
template <int D, typename T, class Spans = KeySpans>
struct FusedForwardKernel {
  static constexpr int kHeadDim = D;
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
  static constexpr int kDTiles = D / 8;  // 8-wide output column tiles
  static constexpr int kKSteps = D / 16;
  static constexpr bool kQInRegisters = D <= 64 && DILATTN_FUSED_Q_IN_REGISTERS;
  // K/V tiles in flight: loads of a tile have kStages - 1 tiles of compute to arrive.
  static constexpr int kStages = D <= 64 ? 3 : 2;
  static constexpr int kSmemElements = kBlockM * D + 2 * kStages * kBlockN * D;  // Q, K[], V[]
  static constexpr int kSmemBytes = kSmemElements * static_cast<int>(sizeof(T));

  __device__ static void Run(const FusedForwardParams& params) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sq = reinterpret_cast<T*>(smem_raw);
    T* sk = sq + kBlockM * D;                // [kStages][kBlockN][D]
    T* sv = sk + kStages * kBlockN * D;      // [kStages][kBlockN][D]
    const uint32_t sq_addr = SharedAddress(sq);
    const uint32_t sk_addr = SharedAddress(sk);
    const uint32_t sv_addr = SharedAddress(sv);
    constexpr int kTileBytes = kBlockN * D * static_cast<int>(sizeof(T));

    const TileGather<D, kThreads, T> gather(params);
    const DilatedAttentionParams& p = params.attn;
    const GpuTile& tile = gather.tile;
    const int64_t seq_base = gather.seq_base;
    const int64_t head_off = gather.head_off;
    const int64_t q_stride = tile.q_stride;
    const int64_t q_first = tile.q_pos;

    __shared__ Spans spans;
    auto loader = StartTile<kBlockM, kBlockM, kStages - 1>(gather, &spans, sq_addr, sk_addr,
                                                           sv_addr, kTileBytes);
    const int total_tiles = spans.total_tiles();

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

    float acc[kMTiles][kDTiles * 4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int i = 0; i < kDTiles * 4; ++i) acc[mt][i] = 0.f;
    }
    // Running max in raw score units (scaled only inside the exponent) and running sum.
    float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      row_max[mt][0] = row_max[mt][1] = -INFINITY;
      row_sum[mt][0] = row_sum[mt][1] = 0.f;
    }

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
      LdMatrixX4(frag,
                 sq_addr + 2 * (q_lane_row + mt * 16 * D + chunk_off(ks * 2 + v_lane_chunk)));
    };

    KeyTile kt = SpanStart(spans, 0);
    for (int t = 0; t < total_tiles; ++t, NextKeyTile(spans, &kt)) {
      const int stage = t % kStages;
      if (t + kStages - 1 < total_tiles) loader.Load((t + kStages - 1) % kStages);
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
      if (!(p.causal && kt.pos0 > warp_last_pos)) {
        const uint32_t tk = sk_addr + stage * kTileBytes;
        const uint32_t tv = sv_addr + stage * kTileBytes;

        // S = Q K^T: per m-tile, 16 rows x 64 keys in 8 column tiles of 8 keys.
        float s[kMTiles][32];
        auto scores = [&] {
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
            for (int e = 0; e < 32; ++e) s[mt][e] = 0.f;
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
                const uint32_t* a = kQInRegisters
                                        ? q_frag[kQInRegisters ? mt : 0][kQInRegisters ? ks : 0]
                                        : a_local[kQInRegisters ? 0 : mt];
                MmaType<T>::Mma(&s[mt][8 * jp], a, b[jp][0], b[jp][1]);
                MmaType<T>::Mma(&s[mt][8 * jp + 4], a, b[jp][2], b[jp][3]);
              }
            }
          }
        };
        scores();

        // The common case against the current max (SoftmaxAgainstStaleMax); if a row rose too
        // far above it, the warp recomputes the scores and takes the full step.
        const bool need_causal =
            p.causal && kt.pos0 + (kt.valid() - 1) * kt.rate > warp_first_pos;
        bool settled = true;
        float sums[kMTiles][2];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          settled = SoftmaxAgainstStaleMax(s[mt], row_max[mt], sums[mt], lane, kt, need_causal,
                                           pos[mt], params.scale_log2) && settled;
        }
        if (__all_sync(0xffffffffu, settled)) {
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            row_sum[mt][0] += sums[mt][0];
            row_sum[mt][1] += sums[mt][1];
          }
        } else {
          scores();
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            SoftmaxStep<kDTiles>(s[mt], acc[mt], row_max[mt], row_sum[mt], lane, kt, need_causal,
                                 pos[mt], params.scale_log2);
          }
        }

        // O += P V, two key tiles (16 keys) per k-step.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          uint32_t a[kMTiles][4];
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) PackProbabilities<T>(s[mt], kk, a[mt]);
          uint32_t b[kDTiles / 2][4];
#pragma unroll
          for (int dp = 0; dp < kDTiles / 2; ++dp) {
            LdMatrixX4Trans(b[dp], tv + 2 * (v_lane_row + kk * 16 * D +
                                             chunk_off(dp * 2 + v_lane_chunk)));
          }
#pragma unroll
          for (int dp = 0; dp < kDTiles / 2; ++dp) {
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
              MmaType<T>::Mma(&acc[mt][8 * dp], a[mt], b[dp][0], b[dp][1]);
              MmaType<T>::Mma(&acc[mt][8 * dp + 4], a[mt], b[dp][2], b[dp][3]);
            }
          }
        }
      }
      __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }
    CpAsyncWait<0>();

#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      StoreRows<D, T>(acc[mt], row_sum[mt], warp_row + mt * 16, tile.count, pos[mt],
                      static_cast<T*>(p.o), seq_base, p.o_row_stride, head_off, lane);
    }
  }
};

// The entry of each fused kernel K, one CTA per entry of the tile list: keyless tiles write
// their zeros and leave before any of K's code.
template <typename K>
__global__ void __launch_bounds__(K::kThreads, K::kMinBlocks)
    FusedForwardOverTiles(const __grid_constant__ FusedForwardParams params) {
  if (ZeroedKeylessTile<K::kThreads, K::kHeadDim>(params)) return;
  K::Run(params);
}

// Launches K over the tile list, which blockIdx.x walks (up to 2^31 - 1 tiles).
template <typename K>
int LaunchOverTiles(const FusedForwardParams& params, cudaStream_t stream) {
  static_assert(K::kBlockM == FusedBlockM(K::kHeadDim),
                "tile list and kernel disagree on tile height");
  if (params.num_tiles == 0) return 0;
  cudaError_t err = cudaFuncSetAttribute(FusedForwardOverTiles<K>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         K::kSmemBytes);
  if (err != cudaSuccess) return err;
  FusedForwardOverTiles<K><<<static_cast<unsigned>(params.num_tiles), K::kThreads,
                             K::kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

template <int D, typename T, class Spans = KeySpans>
int LaunchFusedForwardFor(const FusedForwardParams& params, cudaStream_t stream) {
  return LaunchOverTiles<FusedForwardKernel<D, T, Spans>>(params, stream);
}

}  // namespace dilattn::attention::cuda
