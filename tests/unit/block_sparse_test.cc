// Block-sparse attention: the CPU backend and the reference against a naive implementation that
// asks the pattern predicate about every (query, key) token pair; layout and validation checks.

#include "kernels/block_sparse/block_sparse.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/block_sparse/gpu_work.h"
#include "tests/common/random_config.h"
#include "tests/common/test_util.h"

namespace dilattn::block_sparse {
namespace {

using attention::DType;
using testing::RelativeError;
using testing::SplitMix64;
using testing::TypedBuffer;
using ::testing::HasSubstr;

std::vector<double> Naive(const BlockSparsePlan& plan, const TypedBuffer& q, const TypedBuffer& k,
                          const TypedBuffer& v) {
  const auto& o = plan.options;
  const int64_t heads = plan.shape.num_heads;
  const int64_t dim = plan.shape.head_dim;
  const double scale =
      o.softmax_scale.value_or(1.0 / std::sqrt(static_cast<double>(plan.shape.head_dim)));
  std::vector<double> out(q.count(), 0.0);
  int64_t base = 0;
  for (int64_t n : plan.shape.seq_lengths) {
    const int64_t nb = (n + o.block_size - 1) / o.block_size;
    for (int64_t h = 0; h < heads; ++h) {
      auto at = [&](int64_t t, int64_t d) {
        return static_cast<size_t>(((base + t) * heads + h) * dim + d);
      };
      for (int64_t p = 0; p < n; ++p) {
        std::vector<int64_t> keys;
        for (int64_t key = 0; key < n; ++key) {
          if (o.causal && key > p) continue;
          if (PairKept(o, p / o.block_size, key / o.block_size, nb)) keys.push_back(key);
        }
        if (keys.empty()) continue;
        std::vector<double> w(keys.size());
        double mx = -INFINITY;
        for (size_t i = 0; i < keys.size(); ++i) {
          double dot = 0;
          for (int64_t d = 0; d < dim; ++d) dot += double{q.Get(at(p, d))} * k.Get(at(keys[i], d));
          w[i] = dot * scale;
          mx = std::max(mx, w[i]);
        }
        double den = 0;
        for (double& x : w) den += (x = std::exp(x - mx));
        for (int64_t d = 0; d < dim; ++d) {
          double acc = 0;
          for (size_t i = 0; i < keys.size(); ++i) acc += w[i] * v.Get(at(keys[i], d));
          out[at(p, d)] = acc / den;
        }
      }
    }
    base += n;
  }
  return out;
}

BlockSparseOptions DrawOptions(SplitMix64& rng) {
  BlockSparseOptions o;
  o.block_size = rng.Uniform(1, 48);
  testing::DrawBlockSparsePattern(rng, &o);
  return o;
}

// Up to `max_seqs` sequences of random lengths up to `max_len` for `o` (explicit pairs name
// blocks 0..2, so its sequences hold at least 3 blocks).
void DrawSequences(SplitMix64& rng, const BlockSparseOptions& o, int64_t max_seqs, int64_t max_len,
                   attention::ProblemShape* shape) {
  const int64_t min_len = o.pattern == Pattern::kExplicit ? 3 * o.block_size : 1;
  for (int64_t s = rng.Uniform(1, max_seqs); s > 0; --s) {
    shape->seq_lengths.push_back(rng.Uniform(min_len, std::max<int64_t>(min_len, max_len)));
  }
}

// Fresh random Q, K, V of a plan, its output buffer and the naive float64 output.
struct RandomCase {
  RandomCase(const BlockSparsePlan& plan, SplitMix64& rng)
      : n(plan.tensor_bytes / attention::DTypeSize(plan.shape.dtype)),
        q(plan.shape.dtype, n),
        k(plan.shape.dtype, n),
        v(plan.shape.dtype, n),
        out(plan.shape.dtype, n) {
    for (TypedBuffer* t : {&q, &k, &v}) {
      for (size_t i = 0; i < n; ++i) t->Set(i, rng.NextFloat(1.0f));
    }
    expected = Naive(plan, q, k, v);
  }
  attention::AttentionTensors tensors() { return {q.cref(), k.cref(), v.cref(), out.ref()}; }

  size_t n;
  TypedBuffer q, k, v, out;
  std::vector<double> expected;
};

// Runs `backend` into c.out, poisoned first, with a 64-byte aligned host workspace.
absl::Status RunPoisoned(BlockSparseBackend& backend, const BlockSparsePlan& plan, RandomCase& c) {
  c.out.Poison();
  std::vector<unsigned char> ws(backend.WorkspaceBytes(plan) + 64);
  void* aligned = ws.data() + (64 - reinterpret_cast<uintptr_t>(ws.data()) % 64) % 64;
  return backend.Run(plan, c.tensors(), {aligned, ws.size() - 64, DeviceLoc::Host()});
}

TEST(BlockSparseRandom, MatchesNaiveImplementation) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(absl::StrCat("DILATTN_TEST_SEED=", seed));
  SplitMix64 rng(seed);
  auto backend = CreateCpuBlockSparseBackend({3, "auto"});
  ASSERT_TRUE(backend.ok());
  for (int c = 0; c < 150; ++c) {
    const BlockSparseOptions o = DrawOptions(rng);
    attention::ProblemShape shape;
    shape.dtype = std::vector<DType>{DType::kFloat32, DType::kFloat16, DType::kBFloat16}
        [static_cast<size_t>(rng.Uniform(0, 2))];
    shape.num_heads = rng.Uniform(1, 4);
    shape.head_dim = std::vector<int64_t>{1, 8, 16, 33, 64}[static_cast<size_t>(rng.Uniform(0, 4))];
    DrawSequences(rng, o, 3, 150, &shape);
    SCOPED_TRACE(absl::StrCat("config ", c, ": ", PatternName(o.pattern), " bs=", o.block_size,
                              o.causal ? " causal " : " ", attention::DescribeShape(shape)));
    absl::StatusOr<BlockSparsePlan> plan = PlanBlockSparse(o, shape);
    ASSERT_TRUE(plan.ok()) << plan.status();
    RandomCase rc(*plan, rng);
    const double tol = testing::Tolerance(shape.dtype);

    rc.out.Poison();
    ASSERT_TRUE(ReferenceBlockSparse(*plan, rc.tensors()).ok());
    auto err = RelativeError(rc.out.ToFloats(), rc.expected);
    ASSERT_TRUE(err.ok(tol)) << "reference rel " << err.relative << " nan " << err.nan_count;

    ASSERT_TRUE(RunPoisoned(**backend, *plan, rc).ok());
    err = RelativeError(rc.out.ToFloats(), rc.expected);
    ASSERT_TRUE(err.ok(tol)) << "cpu rel " << err.relative << " nan " << err.nan_count;
  }
}

// The CPU backend takes head dims up to 256 where the random configurations above stop at 64:
// the widest, and ones that leave part of a vector (200: half an AVX-512 vector; 255: part of
// every width), on every instruction set this processor runs. Short sequences and few heads
// keep the naive float64 implementation fast.
TEST(BlockSparseRandom, HeadDimsPast128MatchNaiveImplementation) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(absl::StrCat("DILATTN_TEST_SEED=", seed));
  SplitMix64 rng(seed);
  std::vector<std::unique_ptr<BlockSparseBackend>> backends;
  for (const char* isa : {"avx512", "avx2", "generic"}) {
    auto backend = CreateCpuBlockSparseBackend({3, isa});
    if (backend.ok()) backends.push_back(*std::move(backend));
  }
  ASSERT_FALSE(backends.empty());
  for (const int64_t dim : {200, 255, 256}) {
    for (const DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      BlockSparseOptions o = DrawOptions(rng);
      attention::ProblemShape shape;
      shape.dtype = dtype;
      shape.num_heads = rng.Uniform(1, 3);
      shape.head_dim = dim;
      DrawSequences(rng, o, 2, 96, &shape);
      SCOPED_TRACE(absl::StrCat(PatternName(o.pattern), " bs=", o.block_size,
                                o.causal ? " causal " : " ", attention::DescribeShape(shape)));
      absl::StatusOr<BlockSparsePlan> plan = PlanBlockSparse(o, shape);
      ASSERT_TRUE(plan.ok()) << plan.status();
      RandomCase rc(*plan, rng);
      const double tol = testing::Tolerance(shape.dtype);
      for (auto& backend : backends) {
        ASSERT_TRUE(backend->Supports(*plan).ok()) << backend->name();
        const absl::Status run = RunPoisoned(*backend, *plan, rc);
        ASSERT_TRUE(run.ok()) << backend->name() << ": " << run;
        const auto err = RelativeError(rc.out.ToFloats(), rc.expected);
        EXPECT_TRUE(err.ok(tol)) << backend->name() << ": rel " << err.relative << ", nan "
                                 << err.nan_count;
      }
    }
  }
}

TEST(BlockSparse, CausalMasksAcrossBlocks) {
  // Block 0 is told to attend to block 1; with causal every key there lies after every query of
  // block 0, so the pair must vanish from the layout and block 0 keeps only its own past.
  BlockSparseOptions o;
  o.block_size = 4;
  o.pattern = Pattern::kExplicit;
  o.pairs = {{0, 1}, {1, 0}, {1, 1}};
  o.causal = true;
  absl::StatusOr<BlockSparsePlan> plan = PlanBlockSparse(o, attention::DenseShape(DType::kFloat32, 1, 8, 1, 4));
  ASSERT_TRUE(plan.ok());
  const BlockLayout& layout = plan->layouts[0];
  EXPECT_EQ(layout.row_begin, (std::vector<int64_t>{0, 0, 2}));
  EXPECT_EQ(layout.cols, (std::vector<int32_t>{0, 1}));
  // Block 0 keeps no pair, so its rows are exactly zero.
  TypedBuffer q(DType::kFloat32, 32), out(DType::kFloat32, 32);
  for (size_t i = 0; i < 32; ++i) q.Set(i, 0.1f * static_cast<float>(i % 7));
  auto backend = CreateCpuBlockSparseBackend({1, "generic"});
  ASSERT_TRUE(backend.ok());
  out.Poison();
  std::vector<float> ws((*backend)->WorkspaceBytes(*plan) / 4 + 16);
  ASSERT_TRUE((*backend)->Run(*plan, {q.cref(), q.cref(), q.cref(), out.ref()},
                              {ws.data(), ws.size() * 4, DeviceLoc::Host()}).ok());
  for (size_t i = 0; i < 16; ++i) EXPECT_EQ(out.Get(i), 0.0f);
  for (size_t i = 16; i < 32; ++i) EXPECT_FALSE(std::isnan(out.Get(i)));
}

// The CPU path lists a task per (sequence, head, query block, 64 rows): block_size 1 makes one
// per token and head, so a problem past 2^26 of them is refused by name, not listed.
TEST(BlockSparse, CpuBackendRefusesMoreTasksThanItLists) {
  BlockSparseOptions o;
  o.block_size = 1;
  o.window = 0;
  auto backend = CreateCpuBlockSparseBackend({1, "generic"});
  ASSERT_TRUE(backend.ok());
  const auto under = PlanBlockSparse(o, attention::DenseShape(DType::kFloat16, 1, 1 << 20, 64, 1));
  ASSERT_TRUE(under.ok()) << under.status();
  EXPECT_TRUE((*backend)->Supports(*under).ok());
  const auto over = PlanBlockSparse(o, attention::DenseShape(DType::kFloat16, 1, 1 << 20, 65, 1));
  ASSERT_TRUE(over.ok()) << over.status();
  const absl::Status s = (*backend)->Supports(*over);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("(sequence, head, query block) tasks"));
  o.block_size = 64;  // one task per block and head: far under the cap
  const auto wide = PlanBlockSparse(o, attention::DenseShape(DType::kFloat16, 1, 1 << 20, 65, 1));
  ASSERT_TRUE(wide.ok()) << wide.status();
  EXPECT_TRUE((*backend)->Supports(*wide).ok());
}

// Layouts are kept between plans (the random pattern draws every pair): a plan again of the same
// options and length gives the same layout, and every option and the length tell layouts apart.
TEST(BlockSparse, PlansAgainGiveTheSameLayoutsAndOptionsNeverShareOne) {
  const auto shape = attention::DenseShape(DType::kFloat16, 1, 4096, 1, 8);
  BlockSparseOptions o;
  o.block_size = 16;
  o.pattern = Pattern::kRandom;
  o.density = 0.25;
  o.seed = 7;
  auto cols = [&](const BlockSparseOptions& opt, const attention::ProblemShape& sh) {
    absl::StatusOr<BlockSparsePlan> p = PlanBlockSparse(opt, sh);
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? p->layouts[0].cols : std::vector<int32_t>{};
  };
  auto fresh = [&](const BlockSparseOptions& opt, int64_t n) {
    std::vector<int32_t> want;
    const int64_t nb = (n + opt.block_size - 1) / opt.block_size;
    for (int64_t i = 0; i < nb; ++i) {
      for (int64_t j = 0; j < nb; ++j) {
        if (PairKept(opt, i, j, nb) && !(opt.causal && j > i))
          want.push_back(static_cast<int32_t>(j));
      }
    }
    return want;
  };
  const std::vector<int32_t> first = cols(o, shape);
  EXPECT_EQ(first, fresh(o, 4096));
  EXPECT_EQ(cols(o, shape), first);
  BlockSparseOptions other = o;
  other.seed = 8;
  EXPECT_EQ(cols(other, shape), fresh(other, 4096));
  other = o;
  other.density = std::nextafter(0.25, 1.0);
  EXPECT_EQ(cols(other, shape), fresh(other, 4096));
  other = o;
  other.causal = true;
  EXPECT_EQ(cols(other, shape), fresh(other, 4096));
  EXPECT_EQ(cols(o, attention::DenseShape(DType::kFloat16, 1, 4000, 1, 8)), fresh(o, 4000));
  EXPECT_EQ(cols(o, shape), first);
}

// Whether two plans of one problem are the same: every layout, which sequence takes which, and
// what they add up to.
bool SamePlan(const BlockSparsePlan& a, const BlockSparsePlan& b) {
  if (a.layouts.size() != b.layouts.size()) return false;
  for (size_t i = 0; i < a.layouts.size(); ++i) {
    const BlockLayout& x = a.layouts[i];
    const BlockLayout& y = b.layouts[i];
    if (x.seq_len != y.seq_len || x.num_blocks != y.num_blocks || x.row_begin != y.row_begin ||
        x.cols != y.cols) {
      return false;
    }
  }
  return a.seq_layout == b.seq_layout && a.seq_offsets == b.seq_offsets &&
         a.kept_pairs == b.kept_pairs && a.flops == b.flops && a.tensor_bytes == b.tensor_bytes;
}

// The layout cache is shared by every thread that plans (the handlers check requests, the
// schedulers plan batches): threads planning overlapping shapes through a cache small enough to
// evict all the time get the plans a planner without the cache builds. In the TSan stage.
TEST(BlockSparseLayoutCache, ConcurrentPlansMatchFreshOnes) {
  struct Problem {
    BlockSparseOptions options;
    attention::ProblemShape shape;
  };
  std::vector<Problem> problems;
  for (int pattern = 0; pattern < 5; ++pattern) {  // every pattern but explicit
    for (bool causal : {false, true}) {
      BlockSparseOptions o;
      o.block_size = 4;
      o.pattern = static_cast<Pattern>(pattern);
      o.window = 2;
      o.rates = {1, 3};
      o.global_blocks = 1;
      o.stride = 3;
      o.density = 0.3;
      o.seed = 7;
      o.causal = causal;
      // Batches that share lengths share their layouts, so one layout is found by many shapes.
      for (const std::vector<int64_t>& lengths :
           std::vector<std::vector<int64_t>>{{40}, {72}, {40, 72}, {100, 40}, {128, 72, 128}}) {
        attention::ProblemShape shape;
        shape.dtype = DType::kFloat16;
        shape.num_heads = 2;
        shape.head_dim = 16;
        shape.seq_lengths = lengths;
        problems.push_back({o, shape});
      }
    }
  }
  // A bound of 0 keeps nothing (and drops what other tests left): these plans are built afresh.
  const size_t default_bound = SetLayoutCacheBytesForTesting(0);
  std::vector<BlockSparsePlan> fresh;
  for (const Problem& p : problems) {
    absl::StatusOr<BlockSparsePlan> plan = PlanBlockSparse(p.options, p.shape);
    ASSERT_TRUE(plan.ok()) << plan.status();
    fresh.push_back(*std::move(plan));
  }
  // 40 distinct layouts of up to about 2 KiB each against a bound that holds some of them: hits,
  // misses and evictions all the time.
  SetLayoutCacheBytesForTesting(8192);
  constexpr int kThreads = 8;
  constexpr int kPlansEach = 400;
  std::atomic<int> failures{0}, mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      SplitMix64 rng(static_cast<uint64_t>(t) + 1);
      for (int i = 0; i < kPlansEach; ++i) {
        const size_t k =
            static_cast<size_t>(rng.Uniform(0, static_cast<int64_t>(problems.size()) - 1));
        absl::StatusOr<BlockSparsePlan> plan =
            PlanBlockSparse(problems[k].options, problems[k].shape);
        if (!plan.ok()) {
          ++failures;
        } else if (!SamePlan(*plan, fresh[k])) {
          ++mismatches;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  SetLayoutCacheBytesForTesting(default_bound);
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(BlockSparse, RandomPatternIsDeterministicAndKeepsTheDiagonal) {
  BlockSparseOptions o;
  o.pattern = Pattern::kRandom;
  o.seed = 42;
  o.density = 0.0;
  for (int64_t i = 0; i < 50; ++i) {
    for (int64_t j = 0; j < 50; ++j) ASSERT_EQ(PairKept(o, i, j, 50), i == j);
  }
  o.density = 1.0;
  for (int64_t i = 0; i < 50; ++i) {
    for (int64_t j = 0; j < 50; ++j) ASSERT_TRUE(PairKept(o, i, j, 50));
  }
  o.density = 0.3;
  int kept = 0;
  for (int64_t i = 0; i < 200; ++i) {
    for (int64_t j = 0; j < 200; ++j) kept += PairKept(o, i, j, 200) && i != j;
  }
  EXPECT_NEAR(kept / (200.0 * 199.0), 0.3, 0.02);
  BlockSparseOptions other = o;
  other.seed = 43;
  int same = 0;
  for (int64_t j = 0; j < 200; ++j) same += PairKept(o, 7, j, 200) == PairKept(other, 7, j, 200);
  EXPECT_LT(same, 200) << "a different seed gives a different pattern";
}

TEST(BlockSparse, Validation) {
  const auto shape = attention::DenseShape(DType::kFloat32, 1, 64, 2, 16);
  auto expect = [&](const BlockSparseOptions& o, const char* text) {
    absl::StatusOr<BlockSparsePlan> plan = PlanBlockSparse(o, shape);
    ASSERT_FALSE(plan.ok()) << text;
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(plan.status().message()), HasSubstr(text));
  };
  BlockSparseOptions o;
  o.block_size = 0;
  expect(o, "block_size must be >= 1, got 0");
  o = {};
  o.window = -1;
  expect(o, "window must be >= 0, got -1");
  o = {};
  o.pattern = Pattern::kDilatedSparse;
  expect(o, "at least one rate");
  o.rates = {2, 0};
  expect(o, "rates[1]=0");
  o = {};
  o.pattern = Pattern::kStrided;
  expect(o, "stride must be >= 1");
  o = {};
  o.pattern = Pattern::kRandom;
  o.density = 1.5;
  expect(o, "density must be in [0, 1], got 1.5");
  o = {};
  o.pattern = Pattern::kExplicit;
  expect(o, "at least one (i, j) pair");
  o.block_size = 16;
  o.pairs = {{0, 4}};
  expect(o, "explicit pair (0, 4) is outside the 4 blocks");
  o = {};
  o.softmax_scale = -1;
  expect(o, "softmax_scale");
  EXPECT_THAT(std::string(ParsePattern("diagonal").status().message()), HasSubstr("'diagonal'"));
  EXPECT_EQ(*ParsePattern("GLOBAL_LOCAL"), Pattern::kGlobalLocal);
}

// Layouts are built per request on the host: patterns that would keep too many pairs, or make a
// random pattern draw too many, are refused quickly by name; parameters at the ends of int64
// neither overflow (UBSan in CI) nor keep pairs that are not there.
TEST(BlockSparse, RefusesLayoutsTooLargeAndTakesExtremeParameters) {
  const auto shape = attention::DenseShape(DType::kFloat16, 1, 40000, 1, 8);
  BlockSparseOptions o;
  o.block_size = 1;
  o.window = 40000;
  absl::StatusOr<BlockSparsePlan> plan = PlanBlockSparse(o, shape);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(plan.status().message()), HasSubstr("keeps more than 67108864"));
  o.pattern = Pattern::kGlobalLocal;
  o.global_blocks = 40000;
  EXPECT_THAT(std::string(PlanBlockSparse(o, shape).status().message()),
              HasSubstr("keeps more than"));
  o.pattern = Pattern::kRandom;
  o.density = 0;
  EXPECT_THAT(std::string(PlanBlockSparse(o, shape).status().message()),
              HasSubstr("draws every block pair"));
  BlockSparseOptions rates;
  rates.pattern = Pattern::kDilatedSparse;
  rates.rates.assign(65, 2);
  EXPECT_THAT(std::string(PlanBlockSparse(rates, shape).status().message()),
              HasSubstr("at most 64 rates, got 65"));
  // Under the cap per sequence, over it for the batch: every sequence's pairs are kept (the
  // CPU path holds a 16-byte span per pair; 64 such sequences would need 64 GiB).
  BlockSparseOptions local;
  local.block_size = 1;
  local.window = 8192;
  const auto one = attention::DenseShape(DType::kFloat16, 1, 8192, 1, 1);
  ASSERT_TRUE(PlanBlockSparse(local, one).ok());
  const auto batch = attention::DenseShape(DType::kFloat16, 64, 8192, 1, 1);
  absl::StatusOr<BlockSparsePlan> many = PlanBlockSparse(local, batch);
  EXPECT_EQ(many.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(many.status().message()),
              HasSubstr("keeps more than 67108864 block pairs over the batch's 64 sequences"));
  // Sequences of different lengths, each under the cap, over it together: refused while the
  // layouts are built (each takes what is left of the batch's budget), with the same message.
  attention::ProblemShape mixed = one;
  mixed.seq_lengths = {8192, 8191, 8190, 8189, 8188, 8187, 8186, 8185, 8184};
  absl::StatusOr<BlockSparsePlan> several = PlanBlockSparse(local, mixed);
  EXPECT_EQ(several.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(several.status().message()),
              HasSubstr("block pairs over the batch's 9 sequences"));

  const auto small = attention::DenseShape(DType::kFloat16, 1, 100, 1, 8);
  constexpr int64_t kHuge = std::numeric_limits<int64_t>::max();
  o = {};
  o.block_size = kHuge;  // one block
  plan = PlanBlockSparse(o, small);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->kept_pairs, 1);
  o.block_size = 10;
  o.window = kHuge;
  plan = PlanBlockSparse(o, small);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->kept_pairs, 100);
  o.pattern = Pattern::kGlobalLocal;
  o.global_blocks = kHuge;
  plan = PlanBlockSparse(o, small);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->kept_pairs, 100);
  o.window = 1;
  o.global_blocks = 2;  // rows 0, 1 keep all 10; the others 2 globals + up to 3 window blocks
  plan = PlanBlockSparse(o, small);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->kept_pairs, 20 + /*i=2*/ 4 + /*3..8*/ 6 * 5 + /*i=9*/ 4);
  o.pattern = Pattern::kStrided;
  o.stride = kHuge;
  plan = PlanBlockSparse(o, small);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->kept_pairs, 10);  // the diagonal only
  o.pattern = Pattern::kDilatedSparse;
  o.rates = {kHuge, 3};
  plan = PlanBlockSparse(o, small);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->kept_pairs, 10 + 2 * 7);
}

TEST(BlockSparse, FlopsCountVisiblePairs) {
  BlockSparseOptions o;
  o.block_size = 4;
  o.window = 0;
  absl::StatusOr<BlockSparsePlan> plan =
      PlanBlockSparse(o, attention::DenseShape(DType::kFloat32, 1, 10, 2, 8));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->kept_pairs, 3);
  EXPECT_DOUBLE_EQ(plan->flops, 4.0 * 8 * 2 * (16 + 16 + 4));
  o.causal = true;
  plan = PlanBlockSparse(o, attention::DenseShape(DType::kFloat32, 1, 10, 2, 8));
  ASSERT_TRUE(plan.ok());
  EXPECT_DOUBLE_EQ(plan->flops, 4.0 * 8 * 2 * (10 + 10 + 3));
}

// The GPU work list: every (sequence, head, position) in exactly one tile of consecutive rows
// within one query block, each tile's runs exactly its block's selected keys (adjacent blocks
// merged, ascending, none empty), lead_tiles the 64-key tiles of all runs but the last, costlier
// tiles first, and the sizes CountBlockSparseGpuWork predicts.
TEST(BlockSparseGpuWork, TilesCoverEveryQueryOnceWithExactlyItsBlocksKeys) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(absl::StrCat("DILATTN_TEST_SEED=", seed));
  SplitMix64 rng(seed);
  for (int c = 0; c < 200; ++c) {
    const BlockSparseOptions o = DrawOptions(rng);
    attention::ProblemShape shape;
    shape.dtype = DType::kBFloat16;
    shape.num_heads = rng.Uniform(1, 3);
    shape.head_dim = 64;
    const int64_t min_len = o.pattern == Pattern::kExplicit ? 3 * o.block_size : 1;
    for (int64_t s = rng.Uniform(1, 3); s > 0; --s) {
      shape.seq_lengths.push_back(rng.Uniform(min_len, std::max<int64_t>(min_len, 400)));
    }
    const int block_m = rng.Uniform(0, 1) == 0 ? 64 : 128;
    SCOPED_TRACE(absl::StrCat("config ", c, ": ", PatternName(o.pattern), " bs=", o.block_size,
                              " block_m=", block_m, " ", attention::DescribeShape(shape)));
    absl::StatusOr<BlockSparsePlan> plan = PlanBlockSparse(o, shape);
    ASSERT_TRUE(plan.ok()) << plan.status();
    BlockSparseGpuWork work;
    ASSERT_TRUE(BuildBlockSparseGpuWork(*plan, block_m, &work).ok());
    const BlockSparseGpuWorkSizes sizes = CountBlockSparseGpuWork(*plan, block_m);
    EXPECT_EQ(sizes.tiles, static_cast<int64_t>(work.tiles.size()));
    EXPECT_EQ(sizes.rows, static_cast<int64_t>(work.rows.size()));
    EXPECT_EQ(sizes.runs, static_cast<int64_t>(work.runs.size()));
    ASSERT_EQ(work.tile_row.size(), work.tiles.size());

    std::vector<int> seen(static_cast<size_t>(plan->seq_offsets.back() * shape.num_heads), 0);
    int64_t last_cost = INT64_MAX;
    for (size_t t = 0; t < work.tiles.size(); ++t) {
      const attention::GpuTile& tile = work.tiles[t];
      const BlockLayout& layout = plan->layouts[static_cast<size_t>(plan->seq_layout[tile.seq])];
      ASSERT_EQ(tile.q_stride, 1);
      ASSERT_GE(tile.count, 1);
      ASSERT_LE(tile.count, block_m);
      const int64_t block = tile.q_pos / o.block_size;
      ASSERT_EQ(block, (tile.q_pos + tile.count - 1) / o.block_size) << "tile crosses a block";
      ASSERT_LE(tile.q_pos + tile.count, layout.seq_len);
      for (int r = 0; r < tile.count; ++r) {
        ++seen[static_cast<size_t>(
            (plan->seq_offsets[tile.seq] + tile.q_pos + r) * shape.num_heads + tile.head)];
      }
      std::vector<int64_t> want;
      for (int64_t i = layout.row_begin[block]; i < layout.row_begin[block + 1]; ++i) {
        const int64_t j = layout.cols[static_cast<size_t>(i)];
        for (int64_t key = j * o.block_size; key < std::min((j + 1) * o.block_size, layout.seq_len);
             ++key) {
          want.push_back(key);
        }
      }
      const attention::cuda::KeyRunRow& row = work.rows[static_cast<size_t>(work.tile_row[t])];
      std::vector<int64_t> got;
      int64_t lead_tiles = 0;
      for (int32_t r = 0; r < row.num_runs; ++r) {
        const attention::cuda::KeyRun& run = work.runs[static_cast<size_t>(row.run_begin + r)];
        ASSERT_GT(run.count, 0);
        if (!got.empty()) {
          ASSERT_GT(run.first, got.back() + 1) << "adjacent runs not merged";
        }
        for (int32_t k = 0; k < run.count; ++k) got.push_back(run.first + k);
        if (r + 1 < row.num_runs) lead_tiles += (run.count + 63) / 64;
      }
      EXPECT_EQ(got, want) << "tile " << t;
      EXPECT_EQ(row.lead_tiles, lead_tiles);
      const int64_t cost = tile.count * static_cast<int64_t>(want.size());
      EXPECT_LE(cost, last_cost) << "tile " << t << " costlier than the one before";
      last_cost = cost;
    }
    EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }));
  }
}

TEST(BlockSparseGpuWork, RefusesTablesBeyondThirtyTwoBits) {
  BlockSparseOptions o;
  o.block_size = 1;
  o.window = 0;
  absl::StatusOr<BlockSparsePlan> plan =
      PlanBlockSparse(o, attention::DenseShape(DType::kBFloat16, 1, 4, 1, 64));
  ASSERT_TRUE(plan.ok());
  plan->params.max_seq_len = attention::kGpuMaxSeqLen + 1;
  BlockSparseGpuWork work;
  const absl::Status s = BuildBlockSparseGpuWork(*plan, 128, &work);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("too large for the GPU tables"));
}

}  // namespace
}  // namespace dilattn::block_sparse
