#include "kernels/attention/gpu_tiles.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <map>
#include <numeric>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/attention/tile_spans.h"

namespace dilattn::attention {
namespace {

// lcm(a, b), or 0 when it exceeds any sequence length (then every query is a tile of its own).
int64_t Lcm(int64_t a, int64_t b) {
  if (a == 0) return 0;
  const int64_t q = a / std::gcd(a, b);
  if (q > kGpuMaxSeqLen / b) return 0;
  return q * b;
}

// The key spans of a group's positions, the same for every position and every head of its
// class: planned once per group rather than per tile.
struct GroupSpans {
  struct Span {
    int64_t first, count, rate;
  };
  std::array<Span, kMaxBranches> span;
  int num = 0;
};

GroupSpans SpansOfGroup(const DilatedAttentionParams& p, int64_t n, int head, int64_t q_pos) {
  GroupSpans g;
  for (int b = 0; b < p.num_branches; ++b) {
    int64_t first = 0, count = 0;
    if (BranchKeySpan(p, b, head, n, q_pos, &first, &count)) {
      g.span[static_cast<size_t>(g.num++)] = {first, count, p.dilation_rate[b]};
    }
  }
  return g;
}

// Cost estimate of a tile: queries times the keys they can see.
double TileCost(const GroupSpans& g, bool causal, int64_t q_pos, int64_t stride, int count) {
  double keys = 0;
  const int64_t q_last = q_pos + (count - 1) * stride;
  for (int i = 0; i < g.num; ++i) {
    const GroupSpans::Span& sp = g.span[static_cast<size_t>(i)];
    int64_t span = sp.count;
    if (causal) {
      // On average a query sees the keys up to itself: half the way from q_pos to q_last.
      const int64_t visible_last = std::min(sp.first + (span - 1) * sp.rate, (q_pos + q_last) / 2);
      span = visible_last < sp.first ? 1 : (visible_last - sp.first) / sp.rate + 1;
    }
    keys += static_cast<double>(span);
  }
  return keys * count;
}

// What the Hopper kernels compute for a group of positions q_pos, q_pos + stride, ... (rows of
// them), without the causal mask, in units of 64 rows x 64 keys: each 64-row warpgroup walks its
// rows' keys, plus one unit for its start (Q, the first keys, the output). Compares plans of a
// cell.
double WalkCost(const DilatedAttentionParams& p, int64_t n, int head, int64_t q_pos, int64_t rows) {
  const GroupSpans g = SpansOfGroup(p, n, head, q_pos);
  if (g.num == 0) return 0;  // zeros only
  double key_tiles = 0;
  for (int i = 0; i < g.num; ++i) {
    key_tiles += static_cast<double>((g.span[static_cast<size_t>(i)].count + 63) / 64);
  }
  return static_cast<double>((rows + 63) / 64) * (1 + key_tiles);
}

// Cosets {a : a = a0 (mod d)} of Z/M, d dividing M, that partition the residues of a cell into
// classes of equal key sets (mask[a]: the branches that keep residue a), each as wide as it can
// be: positions that share a key set but were split by residue would span the whole cell in one
// tile, and with causal every such tile reaches to the cell's last key.
struct Coset {
  int64_t a0, d;
  bool keyless;  // no branch keeps these positions
};

std::vector<Coset> CosetsOfEqualMasks(const std::vector<uint32_t>& mask) {
  const int64_t m = static_cast<int64_t>(mask.size());
  std::vector<bool> taken(mask.size(), false);
  std::vector<Coset> cosets;
  for (int64_t d = 1; d <= m; ++d) {
    if (m % d != 0) continue;
    for (int64_t a0 = 0; a0 < d; ++a0) {
      bool fits = !taken[a0];
      for (int64_t a = a0 + d; fits && a < m; a += d) fits = !taken[a] && mask[a] == mask[a0];
      if (!fits) continue;
      for (int64_t a = a0; a < m; a += d) taken[a] = true;
      cosets.push_back(Coset{a0, d, mask[a0] == 0});
    }
  }
  return cosets;
}

// Moduli up to this get their residues grouped by key set; beyond it (rates with a huge lcm)
// each residue is a group of its own, as grouping would cost O(M) per cell.
constexpr int64_t kMaxGroupedModulus = 4096;
// A cell's plan may cut out at most this many positions of branches whose rate fits the cell:
// each is a walk of its own, while grouping modulo such a branch's rate splits off a few walks
// per doubling of the modulus. Cutting out 64 (LongNet's whole-sequence branch at N = 64K)
// already computes 7.75 x the needed work where grouping computes 1.0 (bench/gpu_tile_work
// --global 1); more would cost more still, and costing a choice takes a walk per cut position.
constexpr int64_t kMaxCutPositions = 64;
// Residue x branch evaluations a whole plan may spend on grouping (about 40 ms): many head
// classes with a large lcm (thousands of heads, rates in the thousands) would otherwise take
// seconds; cells past the budget are planned a residue per group, which is always valid.
constexpr int64_t kMaxMaskEvaluations = int64_t{1} << 21;

// Calls visit(seq, q_pos, stride, rows, head_begin, head_end, keyless) for every group of
// positions that share one key set and form one arithmetic progression within a cell (a stretch
// where no branch's segment boundary falls); the group's rows are then cut into tiles.
template <typename Visit>
void ForEachGroup(const AttentionPlan& plan, Visit visit) {
  const DilatedAttentionParams& p = plan.params;
  // Head classes: consecutive heads that take part in the same branches at the same offsets, so
  // they keep the same positions (longnet offsets h / divisor never decrease with h).
  struct HeadClass {
    int head_begin, head_end;
    std::vector<int> branches;
  };
  std::vector<HeadClass> classes;
  if (p.mode == Mode::kLongNet) {
    std::vector<int> all(static_cast<size_t>(p.num_branches));
    std::iota(all.begin(), all.end(), 0);
    for (int h = 0; h < p.num_heads; ++h) {
      bool same = !classes.empty();
      for (int b = 0; same && b < p.num_branches; ++b) {
        same = h / p.offset_divisor[b] == classes.back().head_begin / p.offset_divisor[b];
      }
      if (same) {
        classes.back().head_end = h + 1;
      } else {
        classes.push_back(HeadClass{h, h + 1, all});
      }
    }
  } else {
    for (int b = 0; b < p.num_branches; ++b) {
      classes.push_back(HeadClass{p.group_head_begin[b], p.group_head_begin[b + 1], {b}});
    }
  }
  std::vector<int64_t> bounds;
  std::vector<uint32_t> mask;
  // Which branches keep residue a of a cell depends only on the head class, the branches'
  // segment lengths (clipped to the sequence) and the cell's phase against each branch's segment
  // start (modulo its rate): cells, and sequences, alike in those share their cosets.
  std::map<std::vector<int64_t>, std::vector<Coset>> cosets_of;
  std::vector<int64_t> key;
  std::vector<int> periodic_branches, sparse;  // a cell's branches whose rate fits it, and not
  std::vector<int64_t> cut;  // the cell's positions that they keep
  // Which branches a cell cuts out, by its head class, lengths and phases (see choice_key).
  std::map<std::vector<int64_t>, int64_t> choice_of;
  std::vector<int64_t> choice_key, thresholds;
  int64_t mask_budget = kMaxMaskEvaluations;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t n = plan.seq_offsets[s + 1] - plan.seq_offsets[s];
    for (size_t ci = 0; ci < classes.size(); ++ci) {
      const HeadClass& c = classes[ci];
      int64_t modulus = 1;
      bounds.assign({0, n});
      key.assign({static_cast<int64_t>(ci)});  // then each branch's clipped segment length
      for (int b : c.branches) {
        modulus = Lcm(modulus, p.dilation_rate[b]);
        const int64_t w = std::min(p.segment_length[b], n);
        key.push_back(w);
        for (int64_t x = w; x < n; x += w) bounds.push_back(x);
      }
      const size_t key_prefix = key.size();
      std::sort(bounds.begin(), bounds.end());
      bounds.erase(std::unique(bounds.begin(), bounds.end()), bounds.end());
      // Plans cell [c0, c0 + len) with the branches whose rate exceeds `cut_above` cut out
      // (below), calling emit(q_pos, stride, rows, keyless) for each group.
      auto plan_cell = [&](int64_t c0, int64_t len, int64_t cut_above, auto&& emit) {
        // The residues are grouped by the key sets of the branches whose rate is at most
        // cut_above, modulo the lcm of those rates; each position that another ("sparse")
        // branch keeps is cut out of its group as a tile of its own. A branch whose rate exceeds
        // the cell (LongNet's widest, w = N and r = N / 2048, once N / 2048 passes the shortest
        // segment) is always sparse: grouping modulo its rate would plan a tile per position.
        int64_t periodic = 1;
        periodic_branches.clear();
        sparse.clear();
        key.resize(key_prefix);  // and the cell's phase against each periodic branch's segments
        for (size_t i = 0; i < c.branches.size(); ++i) {
          const int b = c.branches[i];
          const int64_t w = key[1 + i];
          if (p.dilation_rate[b] > cut_above) {
            sparse.push_back(b);
            key.push_back(-1);
            continue;
          }
          periodic_branches.push_back(b);
          periodic = Lcm(periodic, p.dilation_rate[b]);
          key.push_back((c0 - c0 / w * w) % p.dilation_rate[b]);
        }
        auto it = cosets_of.end();
        if (periodic != 0 && periodic <= kMaxGroupedModulus && len >= periodic) {
          it = cosets_of.find(key);
          const int64_t evaluations = periodic * static_cast<int64_t>(c.branches.size());
          if (it == cosets_of.end() && evaluations <= mask_budget) {
            mask_budget -= evaluations;
            mask.assign(static_cast<size_t>(periodic), 0);
            for (int64_t a = 0; a < periodic; ++a) {
              for (int b : periodic_branches) {
                int64_t first = 0, count = 0;
                if (BranchKeySpan(p, b, c.head_begin, n, c0 + a, &first, &count)) {
                  mask[static_cast<size_t>(a)] |= uint32_t{1} << b;
                }
              }
            }
            it = cosets_of.emplace(key, CosetsOfEqualMasks(mask)).first;
          }
        }
        if (it == cosets_of.end()) {
          const int64_t stride = modulus == 0 ? len : std::min(modulus, len);
          for (int64_t a = 0; a < stride; ++a) {
            emit(c0 + a, stride, (len - a + stride - 1) / stride, false);
          }
          return;
        }
        // The positions (within the cell) that sparse branches keep, ascending. The cell lies
        // in one segment of each branch: a sparse branch keeps every rate-th position from its
        // first in the cell.
        cut.clear();
        for (int b : sparse) {
          const int64_t w = std::min(p.segment_length[b], n);
          const int64_t r = p.dilation_rate[b];
          const int64_t start = c0 / w * w;
          int64_t offset = 0;
          if (!BranchHeadOffset<int64_t>(p, b, c.head_begin, r, &offset)) continue;
          // The segment keeps start + offset + k r.
          int64_t a = 0;
          if (!FirstInRange<int64_t>(start + offset - c0, r, 0, len, &a)) continue;
          for (;; a += r) {
            int64_t first = 0, count = 0;
            if (!BranchKeySpan(p, b, c.head_begin, n, c0 + a, &first, &count)) break;
            cut.push_back(a);
            if (r >= len - a) break;
          }
        }
        std::sort(cut.begin(), cut.end());
        cut.erase(std::unique(cut.begin(), cut.end()), cut.end());
        for (const Coset& co : it->second) {
          const int64_t rows = (len - co.a0 + co.d - 1) / co.d;
          int64_t row = 0;  // the progression's rows before the next cut position
          for (int64_t a : cut) {
            if (a < co.a0 || (a - co.a0) % co.d != 0) continue;
            const int64_t k = (a - co.a0) / co.d;
            if (k > row) emit(c0 + co.a0 + row * co.d, co.d, k - row, co.keyless);
            emit(c0 + a, co.d, 1, false);
            row = k + 1;
          }
          if (rows > row) emit(c0 + co.a0 + row * co.d, co.d, rows - row, co.keyless);
        }
      };
      for (size_t cell = 0; cell + 1 < bounds.size(); ++cell) {
        const int64_t c0 = bounds[cell];
        const int64_t len = bounds[cell + 1] - c0;
        // Which branches to cut out. Grouping modulo a branch's rate splits the residues it
        // keeps off their class, into progressions of ever wider stride down to single rows
        // (log of the rate of them); cutting it out makes a tile of each position it keeps
        // (len / rate of them) and splits the group around it. Which costs less depends on the
        // rates and the phases, so each choice (every rate below the cell, or none) is costed
        // as the kernel walks its tiles, once per arrangement of the cell against the segments
        // of every branch (cells alike in that are planned alike). Without the causal mask:
        // with it, costs vary along the segments, and one cell would stand for all.
        int64_t cut_above = len;
        thresholds.clear();
        for (int b : c.branches) {
          if (p.dilation_rate[b] < len) thresholds.push_back(p.dilation_rate[b]);
        }
        std::sort(thresholds.begin(), thresholds.end());
        thresholds.erase(std::unique(thresholds.begin(), thresholds.end()), thresholds.end());
        // A choice differs from the default (cut_above = len) only if a branch's rate lies in
        // (t, len], and is costed only if it cuts out at most kMaxCutPositions of the cell.
        thresholds.erase(std::remove_if(thresholds.begin(), thresholds.end(),
                                        [&](int64_t t) {
                                          int64_t positions = 0;
                                          for (int b : c.branches) {
                                            const int64_t r = p.dilation_rate[b];
                                            if (r > t && r <= len) positions += (len + r - 1) / r;
                                          }
                                          return positions == 0 || positions > kMaxCutPositions;
                                        }),
                         thresholds.end());
        if (!thresholds.empty()) {
          // The class and its segment lengths (clipped to the sequence), the cell's length and
          // its phase against each branch's segments.
          choice_key.assign(key.begin(), key.begin() + static_cast<std::ptrdiff_t>(key_prefix));
          choice_key.push_back(len);
          for (size_t i = 0; i < c.branches.size(); ++i) {
            choice_key.push_back((c0 - c0 / key[1 + i] * key[1 + i]) %
                                 p.dilation_rate[c.branches[i]]);
          }
          auto chosen = choice_of.find(choice_key);
          if (chosen == choice_of.end()) {
            double best = std::numeric_limits<double>::infinity();
            thresholds.push_back(len);
            for (auto t = thresholds.rbegin(); t != thresholds.rend(); ++t) {
              double cost = 0;
              plan_cell(c0, len, *t, [&](int64_t q_pos, int64_t, int64_t rows, bool) {
                cost += WalkCost(p, n, c.head_begin, q_pos, rows);
              });
              if (cost < best) {
                best = cost;
                cut_above = *t;
              }
            }
            chosen = choice_of.emplace(choice_key, cut_above).first;
          }
          cut_above = chosen->second;
        }
        plan_cell(c0, len, cut_above,
                  [&](int64_t q_pos, int64_t stride, int64_t rows, bool keyless) {
                    visit(s, q_pos, stride, rows, c.head_begin, c.head_end, keyless);
                  });
      }
    }
  }
}

absl::Status CheckLimits(const DilatedAttentionParams& p, int block_m) {
  if (block_m < 1 || block_m > 32767) {
    return absl::InvalidArgumentError(absl::StrCat("tile height ", block_m, " out of range"));
  }
  if (p.max_seq_len > kGpuMaxSeqLen || p.num_heads > kGpuMaxHeads) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the GPU path takes sequences of at most ", kGpuMaxSeqLen, " tokens and at most ",
        kGpuMaxHeads, " heads, got N=", p.max_seq_len, " and H=", p.num_heads));
  }
  return absl::OkStatus();
}

}  // namespace

int64_t CountGpuTiles(const AttentionPlan& plan, int block_m) {
  if (!CheckLimits(plan.params, block_m).ok()) return 0;
  int64_t count = 0;
  ForEachGroup(plan, [&](int64_t, int64_t, int64_t, int64_t rows, int head_begin, int head_end,
                         bool keyless) {
    const int64_t height = keyless ? KeylessTileRows(block_m) : block_m;
    count += (rows + height - 1) / height * (head_end - head_begin);
  });
  return count;
}

absl::Status BuildGpuTiles(const AttentionPlan& plan, int block_m, std::vector<GpuTile>* tiles,
                           KeylessPlacement* keyless) {
  const DilatedAttentionParams& p = plan.params;
  if (absl::Status s = CheckLimits(p, block_m); !s.ok()) return s;
  struct Costed {
    GpuTile tile;
    double cost;
  };
  std::vector<Costed> all;
  ForEachGroup(plan, [&](int64_t s, int64_t q_pos0, int64_t stride, int64_t rows, int head_begin,
                         int head_end, bool keyless) {
    const int64_t height = keyless ? KeylessTileRows(block_m) : block_m;
    const int64_t n = plan.seq_offsets[s + 1] - plan.seq_offsets[s];
    const GroupSpans spans = SpansOfGroup(p, n, head_begin, q_pos0);
    for (int64_t j0 = 0; j0 < rows; j0 += height) {
      const int count = static_cast<int>(std::min<int64_t>(height, rows - j0));
      const int64_t q_pos = q_pos0 + j0 * stride;
      const double cost = TileCost(spans, p.causal, q_pos, stride, count);
      for (int h = head_begin; h < head_end; ++h) {
        GpuTile t{static_cast<int32_t>(s), static_cast<int32_t>(q_pos),
                  static_cast<int32_t>(stride), static_cast<int16_t>(h),
                  static_cast<int16_t>(count)};
        all.push_back({t, cost});
      }
    }
  });
  // Keyless tiles (cost 0: a tile with keys costs at least 1) go one every `period` entries over
  // the list's first half, so that they write zeros beside CTAs that compute. Gathered at its
  // start, they wrote on every SM at once with the tensor cores idle (head_groups, most of whose
  // output they are: spreading them gained 1-2% there, 3.5% with causal at 128K-512K); at its
  // end they lengthened the tail (N = 32K). The others: first the tiles costlier than the
  // median (at most half) in the order they were made (sequence, head, cell, progression), so
  // that tiles reading the same keys run together: with causal, costs vary along each segment,
  // and a strict costliest-first order scattered those tiles (L2 hit rate 34% against 79%
  // without causal; 512K causal ran 6% slower). Last the rest, costliest first by
  // quarter-octave buckets of cost, so the grid still ends on short tiles. A counting sort,
  // linear in the tiles.
  double threshold = std::numeric_limits<double>::infinity();
  {
    std::vector<double> costs;
    for (const Costed& c : all) {
      if (c.cost >= 1) costs.push_back(c.cost);
    }
    if (!costs.empty()) {
      const auto median = costs.begin() + static_cast<std::ptrdiff_t>(costs.size() / 2);
      std::nth_element(costs.begin(), median, costs.end());
      threshold = *median;
    }
  }
  constexpr int kBuckets = 256;
  auto bucket = [threshold](double cost) {
    if (cost < 1) return 0;
    if (cost > threshold) return 1;  // strictly: ties at the median stay in the sorted half
    return kBuckets - 1 - std::min(kBuckets - 3, static_cast<int>(std::log2(cost) * 4));
  };
  std::vector<uint8_t> buckets(all.size());
  std::vector<int64_t> start(kBuckets + 1, 0);
  for (size_t i = 0; i < all.size(); ++i) {
    buckets[i] = static_cast<uint8_t>(bucket(all[i].cost));
    ++start[buckets[i] + size_t{1}];
  }
  KeylessPlacement placement;
  placement.count = start[1];
  if (placement.count > 0) {
    placement.period = std::max<int64_t>(
        1, static_cast<int64_t>(all.size()) / 2 / placement.count);
  }
  // Sorted rank r of a tile with keys -> its index: the first count * (period - 1) of them
  // fill the gaps between keyless slots, the rest follow.
  const int64_t gaps = placement.count * (placement.period - 1);
  auto index_of_keyed = [&](int64_t r) {
    return r < gaps ? r + r / (placement.period - 1) + 1 : r + placement.count;
  };
  for (int b = 0; b < kBuckets; ++b) start[b + 1] += start[b];
  tiles->resize(all.size());
  for (size_t i = 0; i < all.size(); ++i) {
    const int64_t rank = start[buckets[i]]++;
    const int64_t index =
        buckets[i] == 0 ? rank * placement.period : index_of_keyed(rank - placement.count);
    (*tiles)[static_cast<size_t>(index)] = all[i].tile;
  }
  if (keyless != nullptr) *keyless = placement;
  return absl::OkStatus();
}

std::vector<TilePart> CutTilesIntoParts(const std::vector<GpuTile>& tiles,
                                        const KeylessPlacement& keyless,
                                        const std::vector<int64_t>& seq_offsets,
                                        const std::vector<int64_t>& cuts,
                                        std::vector<GpuTile>* parted) {
  const size_t num_parts = cuts.size() < 2 ? 1 : cuts.size() - 1;
  std::vector<std::vector<GpuTile>> keyless_of(num_parts), keyed_of(num_parts);
  std::vector<TilePart> parts(num_parts, TilePart{0, 0, 0, 0});
  for (size_t i = 0; i < tiles.size(); ++i) {
    const GpuTile& tile = tiles[i];
    const int64_t first = seq_offsets[static_cast<size_t>(tile.seq)] + tile.q_pos;
    // The interior cuts at or below the tile's first row.
    const size_t c =
        cuts.size() < 2
            ? 0
            : static_cast<size_t>(std::upper_bound(cuts.begin() + 1, cuts.end() - 1, first) -
                                  (cuts.begin() + 1));
    if (IsKeylessSlot<int64_t>(keyless, static_cast<int64_t>(i))) {
      keyless_of[c].push_back(tile);
    } else {
      keyed_of[c].push_back(tile);
      parts[c].q_end = std::max<int64_t>(
          parts[c].q_end, first + static_cast<int64_t>(tile.count - 1) * tile.q_stride + 1);
    }
  }
  parted->clear();
  parted->reserve(tiles.size());
  for (size_t c = 0; c < num_parts; ++c) {
    TilePart& part = parts[c];
    part.tile_begin = static_cast<int64_t>(parted->size());
    part.keyless = static_cast<int64_t>(keyless_of[c].size());
    part.num_tiles = part.keyless + static_cast<int64_t>(keyed_of[c].size());
    parted->insert(parted->end(), keyless_of[c].begin(), keyless_of[c].end());
    parted->insert(parted->end(), keyed_of[c].begin(), keyed_of[c].end());
    // Never below an earlier part's end nor this part's last row: each part's Q rows then
    // follow the last part's, past every output row of the parts up to it.
    part.q_end = std::max({part.q_end, cuts.size() < 2 ? int64_t{0} : cuts[c + 1],
                           c > 0 ? parts[c - 1].q_end : int64_t{0}});
  }
  return parts;
}

GpuTileCache::GpuTileCache(size_t max_entries, size_t max_bytes)
    : max_entries_(max_entries), max_bytes_(max_bytes) {}

absl::StatusOr<std::shared_ptr<const GpuTileCache::List>> GpuTileCache::Get(
    const std::string& key, const AttentionPlan& plan, int block_m) {
  const std::string full = absl::StrCat(block_m, ":", key);
  {
    absl::MutexLock lock(&mu_);
    if (auto it = index_.find(full); it != index_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);
      ++stats_.hits;
      return it->second->second;
    }
    ++stats_.misses;
  }
  auto list = std::make_shared<List>();
  if (absl::Status s = BuildGpuTiles(plan, block_m, &list->tiles, &list->keyless); !s.ok()) {
    return s;
  }
  const size_t bytes = sizeof(GpuTile) * list->tiles.size();
  absl::MutexLock lock(&mu_);
  if (bytes > max_bytes_ || max_entries_ == 0 || index_.count(full) != 0) return list;
  lru_.emplace_front(full, list);
  index_[full] = lru_.begin();
  stats_.bytes += bytes;
  while (lru_.size() > max_entries_ || stats_.bytes > max_bytes_) {
    stats_.bytes -= sizeof(GpuTile) * lru_.back().second->tiles.size();
    index_.erase(lru_.back().first);
    lru_.pop_back();
  }
  return list;
}

size_t GpuTileCache::Clear() {
  absl::MutexLock lock(&mu_);
  const size_t bytes = stats_.bytes;
  lru_.clear();
  index_.clear();
  stats_.bytes = 0;
  return bytes;
}

GpuTileCache::Stats GpuTileCache::stats() const {
  absl::MutexLock lock(&mu_);
  Stats s = stats_;
  s.entries = lru_.size();
  return s;
}

}  // namespace dilattn::attention
