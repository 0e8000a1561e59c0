// How much of the fused GPU kernel's computed work its rows need: the tile list (BuildGpuTiles)
// walked as the Hopper kernels walk it, 64 keys at a time, counted on the host. Prints one
// markdown table per call. Columns: score entries computed over entries needed (visible keys
// of every kept row) when a whole 128-row tile walks every key any of its rows sees, when each
// 64-row warpgroup stops after its own last key (the D = 64 kernel since version 17), the same
// in stages of two key tiles (the D = 128 kernel since version 23), and per 16-row warp (the
// floor for m64 products); then the share of warp x key-tile pairs that need the causal mask
// and that are wholly masked. CPU only.
//
// --global 1 adds LongNet's whole-sequence branch (w = N, r = N / 2048) to the default ones.
//
//   build/bench/gpu_tile_work [--n 32768,131072,524288] [--mode longnet|head_groups|both]
//       [--global 0|1]

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/gpu_tiles.h"
#include "kernels/attention/tile_spans.h"

namespace dilattn {
namespace {

using attention::DilatedAttentionParams;
using attention::GpuTile;

struct Work {
  double tile = 0, group = 0, group_pairs = 0, warp = 0, needed = 0;
  double warp_tiles = 0, masked = 0, wholly_masked = 0;
};

// Key tiles of a span that rows up to position `last` see (the span is a branch's keys for the
// tile's rows: first, first + rate, ..., count of them).
int64_t TilesSeen(int64_t first, int64_t rate, int64_t count, int64_t last, bool causal) {
  if (!causal) return (count + 63) / 64;
  if (last < first) return 0;
  const int64_t visible = std::min<int64_t>(count, (last - first) / rate + 1);
  return (visible + 63) / 64;
}

void Count(const DilatedAttentionParams& p, int64_t n, const GpuTile& t, Work* w) {
  auto row_pos = [&](int row) { return t.q_pos + static_cast<int64_t>(row) * t.q_stride; };
  const int last_row = t.count - 1;
  int64_t tile_tiles = 0, group_tiles[2] = {0, 0};
  for (int b = 0; b < p.num_branches; ++b) {
    int64_t first = 0, count = 0;
    if (!attention::BranchKeySpan(p, b, t.head, n, static_cast<int64_t>(t.q_pos), &first,
                                  &count)) {
      continue;
    }
    const int64_t rate = p.dilation_rate[b];
    tile_tiles += TilesSeen(first, rate, count, row_pos(last_row), p.causal);
    for (int g = 0; g < 2 && 64 * g <= last_row; ++g) {
      group_tiles[g] += TilesSeen(first, rate, count, row_pos(std::min(last_row, 64 * g + 63)),
                                  p.causal);
    }
    for (int r = 0; r <= last_row; ++r) {
      w->needed += static_cast<double>(
          p.causal ? std::min<int64_t>(count, (row_pos(r) - first) / rate + 1) : count);
    }
    for (int warp = 0; 16 * warp <= last_row; ++warp) {
      const int64_t warp_first = row_pos(16 * warp);
      const int64_t warp_last = row_pos(std::min(last_row, 16 * warp + 15));
      const int group_last = std::min(last_row, (warp / 4) * 64 + 63);
      const int64_t walked = TilesSeen(first, rate, count, row_pos(group_last), p.causal);
      w->warp += 16.0 * 64 * static_cast<double>(TilesSeen(first, rate, count, warp_last,
                                                           p.causal));
      for (int64_t j = 0; j < walked; ++j) {
        const int64_t key_first = first + j * 64 * rate;
        const int64_t key_last = first + std::min<int64_t>(count - 1, j * 64 + 63) * rate;
        w->warp_tiles += 1;
        if (p.causal && key_last > warp_first) w->masked += 1;
        if (p.causal && key_first > warp_last) w->wholly_masked += 1;
      }
    }
  }
  w->tile += 128.0 * 64 * static_cast<double>(tile_tiles);
  for (int g = 0; g < 2; ++g) {
    w->group += 64.0 * 64 * static_cast<double>(group_tiles[g]);
    w->group_pairs += 64.0 * 128 * static_cast<double>((group_tiles[g] + 1) / 2);
  }
}

int Main(int argc, char** argv) {
  std::vector<int64_t> ns = {32768, 131072, 524288};
  std::string modes = "both";
  bool global = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--n") {
      ns.clear();
      for (absl::string_view v : absl::StrSplit(value, ',')) {
        int64_t x = 0;
        if (!absl::SimpleAtoi(v, &x) || x <= 0) {
          std::fprintf(stderr, "bad --n value %s\n", std::string(v).c_str());
          return 2;
        }
        ns.push_back(x);
      }
    } else if (flag == "--mode") {
      modes = value;
    } else if (flag == "--global") {
      global = value == "1";
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  std::printf("| mode | causal | N | tiles | tile | warpgroup | warpgroup, 2-tile stages | warp | "
              "warp-tiles masked | wholly masked |\n|---|---|---|---|---|---|---|---|---|---|\n");
  for (const char* mode : {"longnet", "head_groups"}) {
    if (modes != "both" && modes != mode) continue;
    for (bool causal : {false, true}) {
      for (int64_t n : ns) {
        attention::AttentionOptions o;
        o.mode = *attention::ParseMode(mode);
        o.causal = causal;
        o.segment_lengths = {2048, 4096, 8192, 16384, 32768};
        o.dilation_rates = {1, 2, 4, 8, 16};
        if (global) {
          o.segment_lengths.push_back(n);
          o.dilation_rates.push_back(std::max<int64_t>(1, n / 2048));
        }
        absl::StatusOr<attention::AttentionPlan> plan = attention::PlanAttention(
            o, attention::DenseShape(attention::DType::kBFloat16, 1, n, 16, 64));
        if (!plan.ok()) {
          std::fprintf(stderr, "%s\n", plan.status().ToString().c_str());
          return 1;
        }
        std::vector<GpuTile> tiles;
        attention::KeylessPlacement keyless;
        if (absl::Status s = attention::BuildGpuTiles(*plan, 128, &tiles, &keyless); !s.ok()) {
          std::fprintf(stderr, "%s\n", s.ToString().c_str());
          return 1;
        }
        Work w;
        for (int64_t i = 0; i < static_cast<int64_t>(tiles.size()); ++i) {
          if (attention::IsKeylessSlot(keyless, i)) continue;  // zeros only
          Count(plan->params, n, tiles[i], &w);
        }
        std::printf("| %s | %d | %lld | %zu | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f |\n", mode,
                    causal ? 1 : 0, static_cast<long long>(n), tiles.size(), w.tile / w.needed,
                    w.group / w.needed, w.group_pairs / w.needed, w.warp / w.needed,
                    w.masked / w.warp_tiles, w.wholly_masked / w.warp_tiles);
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace dilattn

int main(int argc, char** argv) { return dilattn::Main(argc, argv); }
