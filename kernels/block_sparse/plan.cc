#include <algorithm>
#include <cmath>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "kernels/block_sparse/block_sparse.h"
#include "kernels/common/quote.h"

namespace dilattn::block_sparse {
namespace {

uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr int64_t kMaxBlocks = int64_t{1} << 24;  // per sequence; layouts are built on the host
// Layouts live in host memory (4 bytes a kept pair) and are built per request: a pattern that
// keeps more pairs than kMaxKeptPairs, or a random pattern over more block pairs than
// kMaxRandomPairs (it draws every pair, about a second per 2^28 on one core, on the thread that
// checks the request), is refused rather than left to exhaust memory or time.
constexpr int64_t kMaxRandomPairs = int64_t{1} << 28;
constexpr size_t kMaxRates = 64;

absl::Status CheckOptions(const BlockSparseOptions& o) {
  if (o.block_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("block_size must be >= 1, got ", o.block_size));
  }
  switch (o.pattern) {
    case Pattern::kLocalWindow:
      if (o.window < 0) {
        return absl::InvalidArgumentError(absl::StrCat("window must be >= 0, got ", o.window));
      }
      break;
    case Pattern::kDilatedSparse:
      if (o.rates.empty()) {
        return absl::InvalidArgumentError("pattern dilated_sparse needs at least one rate");
      }
      // Each query block walks every rate: a long list would cost planning time on every
      // request without adding a pair past the first few dozen distinct rates.
      if (o.rates.size() > kMaxRates) {
        return absl::InvalidArgumentError(absl::StrCat("pattern dilated_sparse takes at most ",
                                                       kMaxRates, " rates, got ", o.rates.size()));
      }
      for (size_t i = 0; i < o.rates.size(); ++i) {
        if (o.rates[i] < 1) {
          return absl::InvalidArgumentError(
              absl::StrCat("rates[", i, "]=", o.rates[i], " must be >= 1"));
        }
      }
      break;
    case Pattern::kGlobalLocal:
      if (o.global_blocks < 0 || o.window < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("global_local needs global_blocks >= 0 and window >= 0, got ",
                         o.global_blocks, " and ", o.window));
      }
      break;
    case Pattern::kStrided:
      if (o.stride < 1) {
        return absl::InvalidArgumentError(absl::StrCat("stride must be >= 1, got ", o.stride));
      }
      break;
    case Pattern::kRandom:
      if (!(o.density >= 0 && o.density <= 1)) {
        return absl::InvalidArgumentError(
            absl::StrCat("density must be in [0, 1], got ", o.density));
      }
      break;
    case Pattern::kExplicit:
      if (o.pairs.empty()) {
        return absl::InvalidArgumentError("pattern explicit needs at least one (i, j) pair");
      }
      break;
  }
  return attention::CheckSoftmaxScale(o.softmax_scale);
}

// A layout of a sequence of `n` tokens past `budget` kept pairs: over the batch's share when
// `budget` is less than kMaxKeptPairs (`sequences`: the batch's, for the message).
absl::Status TooManyPairs(const BlockSparseOptions& o, int64_t n, int64_t budget,
                          size_t sequences) {
  if (budget < kMaxKeptPairs) {
    return absl::InvalidArgumentError(
        absl::StrCat("pattern ", PatternName(o.pattern), " keeps more than ", kMaxKeptPairs,
                     " block pairs over the batch's ", sequences, " sequences with block_size ",
                     o.block_size, "; use larger blocks, a sparser pattern or smaller batches"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("pattern ", PatternName(o.pattern), " keeps more than ", kMaxKeptPairs,
                   " block pairs in a sequence of ", n, " tokens with block_size ", o.block_size,
                   "; use larger blocks or a sparser pattern"));
}

// `budget`: the kept pairs this layout may hold (kMaxKeptPairs, or less where other sequences of
// the batch took their share); building stops within one query block's pairs past it.
// `sequences`: the batch's, for the message.
absl::StatusOr<BlockLayout> BuildLayout(const BlockSparseOptions& o, int64_t n, int64_t budget,
                                        size_t sequences) {
  BlockLayout layout;
  layout.seq_len = n;
  layout.num_blocks = n / o.block_size + (n % o.block_size != 0 ? 1 : 0);  // no n + bs overflow
  const int64_t nb = layout.num_blocks;
  if (nb > kMaxBlocks) {
    return absl::InvalidArgumentError(absl::StrCat("sequence of ", n, " tokens makes ", nb,
                                                   " blocks of ", o.block_size,
                                                   "; at most ", kMaxBlocks, " are supported"));
  }
  if (o.pattern == Pattern::kRandom && nb > kMaxRandomPairs / nb) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pattern random draws every block pair: ", nb, " blocks of ", o.block_size,
        " make more than ", kMaxRandomPairs, " pairs; use larger blocks"));
  }
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(nb));
  int64_t kept = 0;
  auto add = [&](int64_t i, int64_t j) {
    if (j < 0 || j >= nb || (o.causal && j > i)) return;
    rows[static_cast<size_t>(i)].push_back(static_cast<int32_t>(j));
    ++kept;
  };
  // Checked after each query block, so a pattern stops within one block's pairs of the cap.
  auto too_many = [&] { return kept > budget; };
  switch (o.pattern) {
    case Pattern::kLocalWindow:
      for (int64_t i = 0; i < nb && !too_many(); ++i) {
        const int64_t last = o.window >= nb ? nb - 1 : std::min(nb - 1, i + o.window);
        for (int64_t j = std::max<int64_t>(0, i - o.window); j <= last; ++j) add(i, j);
      }
      break;
    case Pattern::kDilatedSparse:
      for (int64_t i = 0; i < nb && !too_many(); ++i) {
        add(i, i);
        for (int64_t r : o.rates) {
          if (r >= nb) continue;  // no pair that far (and i + r must not overflow)
          add(i, i - r);
          add(i, i + r);
        }
      }
      break;
    case Pattern::kStrided:
      for (int64_t i = 0; i < nb && !too_many(); ++i) {
        for (int64_t j = i % o.stride; j < nb; j = o.stride >= nb - j ? nb : j + o.stride) {
          add(i, j);
        }
      }
      break;
    case Pattern::kGlobalLocal:
      // The kept pairs only (PairKept's rule): every key block for a global query block, else
      // the global key blocks and the window.
      for (int64_t i = 0; i < nb && !too_many(); ++i) {
        if (i < o.global_blocks) {
          for (int64_t j = 0; j < nb; ++j) add(i, j);
          continue;
        }
        const int64_t globals = std::min(o.global_blocks, nb);
        const int64_t first = o.window >= i ? 0 : i - o.window;
        const int64_t last = o.window >= nb ? nb - 1 : std::min(nb - 1, i + o.window);
        for (int64_t j = 0; j < std::min(globals, first); ++j) add(i, j);
        for (int64_t j = first; j <= last; ++j) add(i, j);
        for (int64_t j = std::max(last + 1, first); j < globals; ++j) add(i, j);
      }
      break;
    case Pattern::kRandom:
      for (int64_t i = 0; i < nb && !too_many(); ++i) {
        for (int64_t j = 0; j < nb; ++j) {
          if (PairKept(o, i, j, nb)) add(i, j);
        }
      }
      break;
    case Pattern::kExplicit:
      for (const auto& [i, j] : o.pairs) {
        if (i < 0 || j < 0 || i >= nb || j >= nb) {
          return absl::InvalidArgumentError(absl::StrCat(
              "explicit pair (", i, ", ", j, ") is outside the ", nb, " blocks of a ", n,
              "-token sequence with block_size ", o.block_size));
        }
        add(i, j);
      }
      break;
  }
  if (too_many()) return TooManyPairs(o, n, budget, sequences);
  layout.row_begin.reserve(static_cast<size_t>(nb) + 1);
  layout.row_begin.push_back(0);
  for (auto& r : rows) {
    std::sort(r.begin(), r.end());
    r.erase(std::unique(r.begin(), r.end()), r.end());
    layout.cols.insert(layout.cols.end(), r.begin(), r.end());
    layout.row_begin.push_back(static_cast<int64_t>(layout.cols.size()));
  }
  return layout;
}

// Everything a layout depends on: the pattern's options (density exactly) and the length.
std::string LayoutKey(const BlockSparseOptions& o, int64_t n) {
  std::string pairs;
  for (const auto& [i, j] : o.pairs) absl::StrAppend(&pairs, i, ":", j, ",");
  return absl::StrCat(static_cast<int>(o.pattern), "|", o.block_size, "|", o.window, "|",
                      absl::StrJoin(o.rates, ","), "|", o.global_blocks, "|", o.stride, "|",
                      absl::StrFormat("%a", o.density), "|", o.seed, "|", pairs, "|", o.causal, "|",
                      n);
}

// Layouts already built, so that a request checked on its handler's thread and then planned
// again for its batch, and every request of a shape seen before, build theirs once: a layout can
// take a second to build (the random pattern draws every block pair). Least recently used go
// first; bounded in bytes, and a layout larger than the bound is not kept.
class LayoutCache {
 public:
  static constexpr size_t kDefaultMaxBytes = size_t{64} << 20;

  std::shared_ptr<const BlockLayout> Find(const std::string& key) {
    absl::MutexLock lock(&mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->key == key) {
        entries_.splice(entries_.begin(), entries_, it);
        return it->layout;
      }
    }
    return nullptr;
  }

  void Insert(std::string key, std::shared_ptr<const BlockLayout> layout) {
    const size_t bytes = layout->cols.size() * sizeof(int32_t) +
                         layout->row_begin.size() * sizeof(int64_t) + key.size();
    absl::MutexLock lock(&mu_);
    if (bytes > max_bytes_) return;
    entries_.push_front(Entry{std::move(key), std::move(layout), bytes});
    bytes_ += bytes;
    EvictPastBound();
  }

  size_t SetMaxBytes(size_t max_bytes) {
    absl::MutexLock lock(&mu_);
    const size_t previous = max_bytes_;
    max_bytes_ = max_bytes;
    EvictPastBound();
    return previous;
  }

 private:
  void EvictPastBound() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    while (bytes_ > max_bytes_) {
      bytes_ -= entries_.back().bytes;
      entries_.pop_back();
    }
  }

  struct Entry {
    std::string key;
    std::shared_ptr<const BlockLayout> layout;
    size_t bytes;
  };
  absl::Mutex mu_;
  std::list<Entry> entries_ ABSL_GUARDED_BY(mu_);
  size_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  size_t max_bytes_ ABSL_GUARDED_BY(mu_) = kDefaultMaxBytes;
};

LayoutCache& Layouts() {
  static LayoutCache* const cache = new LayoutCache;
  return *cache;
}

// BuildLayout through the cache. A cached layout is held to `budget` by its pair count.
absl::StatusOr<BlockLayout> CachedLayout(const BlockSparseOptions& o, int64_t n, int64_t budget,
                                         size_t sequences) {
  std::string key = LayoutKey(o, n);
  if (std::shared_ptr<const BlockLayout> cached = Layouts().Find(key)) {
    if (static_cast<int64_t>(cached->cols.size()) <= budget) return *cached;
    return TooManyPairs(o, n, budget, sequences);
  }
  absl::StatusOr<BlockLayout> built = BuildLayout(o, n, budget, sequences);
  if (built.ok()) Layouts().Insert(std::move(key), std::make_shared<const BlockLayout>(*built));
  return built;
}

}  // namespace

size_t SetLayoutCacheBytesForTesting(size_t max_bytes) { return Layouts().SetMaxBytes(max_bytes); }

absl::StatusOr<Pattern> ParsePattern(absl::string_view name) {
  const std::string lower = absl::AsciiStrToLower(name);
  for (Pattern p : {Pattern::kLocalWindow, Pattern::kDilatedSparse, Pattern::kGlobalLocal,
                    Pattern::kStrided, Pattern::kRandom, Pattern::kExplicit}) {
    if (lower == PatternName(p)) return p;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "pattern ", Quote(name),
      " is not one of local_window, dilated_sparse, global_local, strided, random, explicit"));
}

absl::string_view PatternName(Pattern pattern) {
  switch (pattern) {
    case Pattern::kLocalWindow: return "local_window";
    case Pattern::kDilatedSparse: return "dilated_sparse";
    case Pattern::kGlobalLocal: return "global_local";
    case Pattern::kStrided: return "strided";
    case Pattern::kRandom: return "random";
    case Pattern::kExplicit: return "explicit";
  }
  return "unknown";
}

bool PairKept(const BlockSparseOptions& o, int64_t i, int64_t j, int64_t num_blocks) {
  if (i < 0 || j < 0 || i >= num_blocks || j >= num_blocks) return false;
  const int64_t distance = i > j ? i - j : j - i;
  switch (o.pattern) {
    case Pattern::kLocalWindow: return distance <= o.window;
    case Pattern::kDilatedSparse:
      return distance == 0 || std::find(o.rates.begin(), o.rates.end(), distance) != o.rates.end();
    case Pattern::kGlobalLocal:
      return i < o.global_blocks || j < o.global_blocks || distance <= o.window;
    case Pattern::kStrided: return distance % o.stride == 0;
    case Pattern::kRandom: {
      if (i == j) return true;
      const uint64_t key = (static_cast<uint64_t>(i) << 32) | static_cast<uint64_t>(j);
      const uint64_t z = Mix(o.seed ^ Mix(key));
      return static_cast<double>(z >> 11) * 0x1p-53 < o.density;
    }
    case Pattern::kExplicit:
      return std::find(o.pairs.begin(), o.pairs.end(), std::make_pair(i, j)) != o.pairs.end();
  }
  return false;
}

absl::StatusOr<BlockSparsePlan> PlanBlockSparse(const BlockSparseOptions& options,
                                                const attention::ProblemShape& shape) {
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  // Shape, overflow and byte checks are the dilated operator's; one branch of the block size
  // stands in for the branch list.
  attention::AttentionOptions stand_in;
  stand_in.segment_lengths = {options.block_size};
  stand_in.dilation_rates = {1};
  stand_in.softmax_scale = options.softmax_scale;
  absl::StatusOr<attention::AttentionPlan> base = attention::PlanAttention(stand_in, shape);
  if (!base.ok()) return base.status();

  BlockSparsePlan plan;
  plan.options = options;
  plan.shape = shape;
  plan.seq_offsets = base->seq_offsets;
  plan.tensor_bytes = base->tensor_bytes;
  plan.scale = base->params.scale;
  plan.params = base->params;
  plan.params.causal = options.causal;
  // Each layout is built with what is left of the batch's budget, shared by the sequences of its
  // length, so that a batch over the cap stops while building, not after every layout exists.
  std::map<int64_t, int64_t> of_length;
  for (int64_t n : shape.seq_lengths) ++of_length[n];
  std::map<int64_t, int32_t> by_length;
  int64_t budget_left = kMaxKeptPairs;
  for (int64_t n : shape.seq_lengths) {
    auto [it, inserted] = by_length.try_emplace(n, static_cast<int32_t>(plan.layouts.size()));
    if (inserted) {
      const int64_t sharers = of_length[n];
      absl::StatusOr<BlockLayout> layout =
          CachedLayout(options, n, budget_left / sharers, shape.seq_lengths.size());
      if (!layout.ok()) return layout.status();
      budget_left -= static_cast<int64_t>(layout->cols.size()) * sharers;
      plan.layouts.push_back(*std::move(layout));
    }
    plan.seq_layout.push_back(it->second);
  }
  const double per_pair = 4.0 * static_cast<double>(shape.head_dim) *
                          static_cast<double>(shape.num_heads);
  // Each layout once; sequences of one length share it.
  std::vector<int64_t> pairs(plan.layouts.size(), 0);
  std::vector<double> flops(plan.layouts.size(), 0.0);
  for (size_t index = 0; index < plan.layouts.size(); ++index) {
    const BlockLayout& layout = plan.layouts[index];
    const int64_t bs = options.block_size;
    auto block_len = [&](int64_t b) { return std::min(bs, layout.seq_len - b * bs); };
    for (int64_t i = 0; i < layout.num_blocks; ++i) {
      for (int64_t c = layout.row_begin[i]; c < layout.row_begin[i + 1]; ++c) {
        const int64_t j = layout.cols[static_cast<size_t>(c)];
        const double qi = static_cast<double>(block_len(i));
        const double visible = options.causal && j == i
                                   ? qi * (qi + 1) / 2
                                   : qi * static_cast<double>(block_len(j));
        flops[index] += per_pair * visible;
        ++pairs[index];
      }
    }
  }
  for (int32_t index : plan.seq_layout) {
    plan.flops += flops[static_cast<size_t>(index)];
    plan.kept_pairs += pairs[static_cast<size_t>(index)];
  }
  // The backends keep a key span per kept pair of every sequence (16 bytes on the CPU), so the
  // cap holds for the whole batch, not only for each sequence's layout.
  if (plan.kept_pairs > kMaxKeptPairs) {
    return absl::InvalidArgumentError(
        absl::StrCat("pattern ", PatternName(options.pattern), " keeps ", plan.kept_pairs,
                     " block pairs over the batch's ", shape.seq_lengths.size(),
                     " sequences with block_size ", options.block_size, "; at most ", kMaxKeptPairs,
                     " are supported: use larger blocks, a sparser pattern or smaller batches"));
  }
  return plan;
}

absl::Status CheckBlockSparseTensors(const BlockSparsePlan& plan,
                                     const attention::AttentionTensors& tensors, DeviceLoc where) {
  attention::AttentionPlan sizes;  // CheckTensors reads only the byte count and the shape
  sizes.shape = plan.shape;
  sizes.tensor_bytes = plan.tensor_bytes;
  return attention::CheckTensors(sizes, tensors, where);
}

}  // namespace dilattn::block_sparse
