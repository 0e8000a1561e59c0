#include "server/input_fill.h"

#include <algorithm>
#include <utility>

namespace dilattn::server {
namespace {

// Rows are published in up to this many steps: fine enough for a job's eight pieces to start
// soon after their own rows, coarse enough that waking waiters costs nothing.
constexpr int64_t kMaxChunks = 64;

}  // namespace

InputFill::InputFill(int64_t rows, size_t row_bytes, std::vector<void*> dsts, CopyFn copy)
    : rows_(rows), row_bytes_(row_bytes), dsts_(std::move(dsts)), copy_(std::move(copy)) {}

std::unique_ptr<InputFill> InputFill::Start(int64_t rows, size_t row_bytes, std::vector<void*> dsts,
                                            CopyFn copy, int threads, size_t item_bytes) {
  std::unique_ptr<InputFill> fill(
      new InputFill(std::max<int64_t>(rows, 0), row_bytes, std::move(dsts), std::move(copy)));
  InputFill& f = *fill;
  item_bytes = std::max<size_t>(item_bytes, 1);
  if (f.rows_ == 0 || f.row_bytes_ == 0 || f.dsts_.empty()) return fill;  // no chunks: complete
  const int64_t chunks = std::min(f.rows_, kMaxChunks);
  f.chunk_rows_ = (f.rows_ + chunks - 1) / chunks;
  const int64_t used_chunks = (f.rows_ + f.chunk_rows_ - 1) / f.chunk_rows_;
  std::vector<int> per_chunk(static_cast<size_t>(used_chunks), 0);
  for (int64_t c = 0; c < used_chunks; ++c) {
    const size_t begin = static_cast<size_t>(c * f.chunk_rows_) * f.row_bytes_;
    const size_t end =
        static_cast<size_t>(std::min(f.rows_, (c + 1) * f.chunk_rows_)) * f.row_bytes_;
    for (int t = 0; t < static_cast<int>(f.dsts_.size()); ++t) {
      for (size_t at = begin; at < end; at += item_bytes) {
        f.items_.push_back({t, at, std::min(item_bytes, end - at), c});
        ++per_chunk[static_cast<size_t>(c)];
      }
    }
  }
  {
    absl::MutexLock lock(&f.mu_);
    f.left_in_chunk_ = std::move(per_chunk);
  }
  const size_t n =
      std::clamp<size_t>(static_cast<size_t>(std::max(threads, 1)), 1, f.items_.size());
  f.threads_.reserve(n);
  for (size_t i = 0; i < n; ++i) f.threads_.emplace_back([&f] { f.Work(); });
  return fill;
}

InputFill::~InputFill() {
  {
    // Whatever is not copied yet never will be read: the request is going.
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void InputFill::Work() {
  while (true) {
    size_t i;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_ || next_item_ == items_.size()) return;
      i = next_item_++;
    }
    const Item& item = items_[i];
    copy_(item.tensor, item.offset, item.bytes,
          static_cast<unsigned char*>(dsts_[static_cast<size_t>(item.tensor)]) + item.offset);
    absl::MutexLock lock(&mu_);
    --left_in_chunk_[static_cast<size_t>(item.chunk)];
    while (chunks_done_ < static_cast<int64_t>(left_in_chunk_.size()) &&
           left_in_chunk_[static_cast<size_t>(chunks_done_)] == 0) {
      ++chunks_done_;
    }
  }
}

int64_t InputFill::RowsReady() const {
  return chunks_done_ == static_cast<int64_t>(left_in_chunk_.size()) ? rows_
                                                                     : chunks_done_ * chunk_rows_;
}

void InputFill::WaitForRows(int64_t rows) const {
  const int64_t want = std::min(rows, rows_);
  auto ready = [this, want]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return RowsReady() >= want; };
  absl::MutexLock lock(&mu_, absl::Condition(&ready));
}

bool InputFill::complete() const {
  absl::MutexLock lock(&mu_);
  return RowsReady() == rows_;
}

}  // namespace dilattn::server
