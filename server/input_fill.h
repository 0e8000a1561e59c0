#pragma once

// A request's inputs still being copied into its staging memory while the request already waits
// in its queue or runs. The copy out of a message's receive buffers takes about as long as the
// copies to the GPU (768 MB at N = 128K: tens of milliseconds), so a handler that finished it
// before enqueueing kept every long job waiting for all of it. Here it runs on threads of its own,
// in row order (rows [0, r) of every input before row r of any), and an executor waits only for
// the rows it is about to read: a job in pieces starts on its first piece while the rest is still
// being copied.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace dilattn::server {

class InputFill {
 public:
  // Copies bytes [offset, offset + bytes) of input `tensor` to `dst`. Called on the fill's
  // threads, for disjoint ranges, each range once.
  using CopyFn = std::function<void(int tensor, size_t offset, size_t bytes, void* dst)>;

  // The unit a thread takes by default: large enough to copy at full speed, small enough to
  // spread a step of rows over every thread.
  static constexpr size_t kItemBytes = size_t{4} << 20;

  // Starts copying `dsts.size()` inputs of `rows` rows of `row_bytes` each into dsts[t] on up to
  // `threads` threads, `item_bytes` at a time. The destinations must stay valid until the fill is
  // destroyed (a request declares its fill after the leases it copies into, so it is destroyed
  // first).
  static std::unique_ptr<InputFill> Start(int64_t rows, size_t row_bytes, std::vector<void*> dsts,
                                          CopyFn copy, int threads, size_t item_bytes = kItemBytes);

  InputFill(const InputFill&) = delete;
  InputFill& operator=(const InputFill&) = delete;
  // Stops the copy at the next item and waits for the items in progress: nothing writes into the
  // destinations afterwards.
  ~InputFill();

  int64_t rows() const { return rows_; }
  size_t row_bytes() const { return row_bytes_; }
  // Blocks until rows [0, rows) of every input are in place (all of them for rows >= rows()).
  void WaitForRows(int64_t rows) const;
  void WaitForAll() const { WaitForRows(rows_); }
  bool complete() const;

 private:
  // A run of one input's bytes; the copy is cut into these, in row order.
  struct Item {
    int tensor;
    size_t offset, bytes;
    int64_t chunk;  // rows [chunk * chunk_rows_, ...) are in place once its chunk's items are
  };

  InputFill(int64_t rows, size_t row_bytes, std::vector<void*> dsts, CopyFn copy);
  void Work();
  // Rows [0, RowsReady()) of every input are in place: all of them once every chunk is.
  int64_t RowsReady() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t rows_;
  const size_t row_bytes_;
  const std::vector<void*> dsts_;
  const CopyFn copy_;
  int64_t chunk_rows_ = 1;
  std::vector<Item> items_;
  std::vector<std::thread> threads_;

  mutable absl::Mutex mu_;
  size_t next_item_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<int> left_in_chunk_ ABSL_GUARDED_BY(mu_);
  int64_t chunks_done_ ABSL_GUARDED_BY(mu_) = 0;  // chunks [0, chunks_done_) are in place
};

}  // namespace dilattn::server
