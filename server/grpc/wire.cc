#include "server/grpc/wire.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <utility>

#include "google/protobuf/io/coded_stream.h"

namespace dilattn::server {
namespace {

constexpr int kRawInputContentsField = 7;    // ModelInferRequest.raw_input_contents
constexpr int kRawOutputContentsField = 6;   // ModelInferResponse.raw_output_contents
constexpr int kInferResponseField = 2;       // ModelStreamInferResponse.infer_response
constexpr int kAttendHeaderField = 1;        // dilattn.v1.AttendRequest.header
constexpr int kAttendChunkField = 2;         // dilattn.v1.AttendRequest.chunk
constexpr int kChunkTensorField = 1;         // dilattn.v1.Chunk.tensor
constexpr int kChunkTokenField = 2;          // dilattn.v1.Chunk.token
constexpr int kChunkDataField = 3;           // dilattn.v1.Chunk.data
constexpr int kAttendOutputField = 2;        // dilattn.v1.AttendResponse.output
constexpr int kOutputTokenField = 1;         // dilattn.v1.OutputChunk.token
constexpr int kOutputDataField = 2;          // dilattn.v1.OutputChunk.data
constexpr int kVarint = 0;
constexpr int kLengthDelimited = 2;

void AppendVarint(std::string* out, uint64_t v) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

// Reads across the slices of a received message.
class Cursor {
 public:
  explicit Cursor(const std::vector<grpc::Slice>& slices) : slices_(slices) { Settle(); }

  bool done() const { return index_ == slices_.size(); }
  size_t index() const { return index_; }
  size_t offset() const { return offset_; }
  size_t consumed() const { return consumed_; }

  bool Byte(uint8_t* b) {
    if (done()) return false;
    *b = slices_[index_].begin()[offset_++];
    ++consumed_;
    Settle();
    return true;
  }
  // A varint of at most max_bytes bytes (ten hold 64 bits).
  bool Varint(uint64_t* v, int max_bytes = 10) {
    *v = 0;
    for (int shift = 0; shift < 7 * max_bytes; shift += 7) {
      uint8_t b;
      if (!Byte(&b)) return false;
      *v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }
  // A tag or a length prefix as protobuf reads them: at most five bytes (it refuses longer
  // encodings); a tag keeps its low 32 bits (so its field number is at most 2^29 - 1) and must
  // not name field 0, and a length beyond INT32_MAX is malformed.
  bool Tag(uint64_t* v) {
    if (!Varint(v, 5)) return false;
    *v &= 0xFFFFFFFF;
    return (*v >> 3) != 0;
  }
  bool Length(uint64_t* v) { return Varint(v, 5) && *v <= 0x7FFFFFFF; }
  // Advances n bytes, appending them to `out` unless it is null.
  bool Take(size_t n, std::string* out) {
    while (n > 0) {
      if (done()) return false;
      const size_t here = std::min(n, slices_[index_].size() - offset_);
      if (out != nullptr) {
        out->append(reinterpret_cast<const char*>(slices_[index_].begin()) + offset_, here);
      }
      offset_ += here;
      consumed_ += here;
      n -= here;
      Settle();
    }
    return true;
  }

 private:
  void Settle() {
    while (index_ < slices_.size() && offset_ == slices_[index_].size()) {
      ++index_;
      offset_ = 0;
    }
  }
  const std::vector<grpc::Slice>& slices_;
  size_t index_ = 0;
  size_t offset_ = 0;
  size_t consumed_ = 0;
};

// Protobuf's default limit on nested groups and messages.
constexpr int kMaxGroupDepth = 100;

// Skips the value of field `field` of wire type `wire`, appending it to `out` unless that is null
// (varints re-encoded canonically, which protobuf reads alike). Groups (wire types 3 and 4), which
// proto3 messages never carry but protobuf skips as unknown fields, are skipped too, up to the
// matching end, kMaxGroupDepth deep. False when the bytes end first or are not protobuf's.
bool SkipValue(Cursor& c, int wire, uint64_t field, std::string* out, int depth = 0) {
  uint64_t v;
  switch (wire) {
    case 0:
      if (!c.Varint(&v)) return false;
      if (out != nullptr) AppendVarint(out, v);
      return true;
    case 1:
      return c.Take(8, out);
    case 2:
      if (!c.Length(&v)) return false;
      if (out != nullptr) AppendVarint(out, v);
      return c.Take(static_cast<size_t>(v), out);
    case 3:
      if (depth >= kMaxGroupDepth) return false;
      while (true) {
        uint64_t tag;
        if (!c.Tag(&tag)) return false;
        if (out != nullptr) AppendVarint(out, tag);
        if ((tag & 7) == 4) return (tag >> 3) == field;  // its end, or a stray one
        if (!SkipValue(c, static_cast<int>(tag & 7), tag >> 3, out, depth + 1)) return false;
      }
    case 5:
      return c.Take(4, out);
    default:
      return false;  // an end group with no start, or wire types 6 and 7
  }
}

// Calls visit(src, at, bytes) for each slice's part of a run of a message's slices, in order, `at`
// counting the run's bytes before it.
template <typename Visit>
void ForEachPart(const std::vector<grpc::Slice>& slices, SliceRange f, Visit visit) {
  size_t at = 0;
  while (f.length > 0) {
    const size_t here = std::min(f.length, slices[f.slice].size() - f.offset);
    visit(slices[f.slice].begin() + f.offset, at, here);
    at += here;
    f.length -= here;
    ++f.slice;
    f.offset = 0;
  }
}

// Copies a run of a message's slices to dst on the calling thread.
void CopySlicesHere(const std::vector<grpc::Slice>& slices, const SliceRange& f, void* dst) {
  auto* out = static_cast<unsigned char*>(dst);
  ForEachPart(slices, f, [out](const unsigned char* src, size_t at, size_t bytes) {
    std::memcpy(out + at, src, bytes);
  });
}

// Copies a run of a message's slices to dst; runs of hundreds of megabytes are spread over a
// few threads, by whole slices, since one thread copies at a fraction of memory bandwidth.
void CopySlices(const std::vector<grpc::Slice>& slices, const SliceRange& f, void* dst) {
  const size_t threads = std::min<size_t>(kMaxCopyThreads, f.length / kCopyBytesPerThread + 1);
  if (threads <= 1) {
    CopySlicesHere(slices, f, dst);
    return;
  }
  struct Piece {
    const unsigned char* src;
    unsigned char* dst;
    size_t bytes;
  };
  std::vector<Piece> pieces;
  auto* out = static_cast<unsigned char*>(dst);
  ForEachPart(slices, f, [&](const unsigned char* src, size_t at, size_t bytes) {
    pieces.push_back({src, out + at, bytes});
  });
  auto copy = [&](size_t begin, size_t end) {
    for (size_t p = begin; p < end; ++p) std::memcpy(pieces[p].dst, pieces[p].src, pieces[p].bytes);
  };
  if (pieces.size() < threads) {
    copy(0, pieces.size());
    return;
  }
  std::vector<std::thread> workers;
  const size_t per = (pieces.size() + threads - 1) / threads;
  for (size_t t = 1; t < threads; ++t) {
    workers.emplace_back(copy, std::min(pieces.size(), t * per),
                         std::min(pieces.size(), (t + 1) * per));
  }
  copy(0, std::min(pieces.size(), per));
  for (std::thread& w : workers) w.join();
}

// Owns an output lease until gRPC lets go of the slice that points into it.
void ReleaseLease(void* lease) { delete static_cast<memory::Buffer*>(lease); }

grpc::ByteBuffer WithOutput(const std::string& prefix, memory::Buffer output, size_t bytes) {
  grpc::Slice head(prefix);
  if (bytes == 0) return grpc::ByteBuffer(&head, 1);
  void* data = output.data();
  auto* owner = new memory::Buffer(std::move(output));
  grpc::Slice body(data, bytes, &ReleaseLease, owner);
  grpc::Slice parts[2] = {std::move(head), std::move(body)};
  return grpc::ByteBuffer(parts, 2);
}

}  // namespace

absl::StatusOr<RequestBytes> RequestBytes::Split(const grpc::ByteBuffer& message,
                                                 inference::ModelInferRequest* header) {
  RequestBytes r;
  if (!message.Dump(&r.slices_).ok()) {
    return absl::InvalidArgumentError("request message could not be read");
  }
  const absl::Status malformed = absl::InvalidArgumentError(
      "request is not a valid inference.ModelInferRequest (malformed or truncated protobuf, or "
      "a string field that is not UTF-8)");
  std::string small;
  Cursor c(r.slices_);
  while (!c.done()) {
    uint64_t tag;
    if (!c.Tag(&tag)) return malformed;
    const uint64_t field = tag >> 3;
    const int wire = static_cast<int>(tag & 7);
    if (field == kRawInputContentsField && wire == kLengthDelimited) {
      uint64_t length;
      if (!c.Length(&length)) return malformed;
      const SliceRange f{c.index(), c.offset(), static_cast<size_t>(length)};
      if (!c.Take(static_cast<size_t>(length), nullptr)) return malformed;
      r.raw_.push_back(f);
      continue;
    }
    AppendVarint(&small, tag);
    if (!SkipValue(c, wire, field, &small)) return malformed;
  }
  if (!header->ParseFromString(small)) return malformed;
  r.slice_starts_.reserve(r.slices_.size());
  size_t at = 0;
  for (const grpc::Slice& s : r.slices_) {
    r.slice_starts_.push_back(at);
    at += s.size();
  }
  return r;
}

void RequestBytes::CopyRaw(size_t i, void* dst) const { CopySlices(slices_, raw_[i], dst); }

void RequestBytes::CopyRawRange(size_t i, size_t offset, size_t bytes, void* dst) const {
  if (bytes == 0) return;
  const size_t at = slice_starts_[raw_[i].slice] + raw_[i].offset + offset;
  // The last slice that starts at or before `at` holds it.
  const size_t slice = static_cast<size_t>(
      std::upper_bound(slice_starts_.begin(), slice_starts_.end(), at) - slice_starts_.begin() - 1);
  CopySlicesHere(slices_, {slice, at - slice_starts_[slice], bytes}, dst);
}

absl::StatusOr<AttendBytes> AttendBytes::Parse(const grpc::ByteBuffer& message) {
  AttendBytes r;
  if (!message.Dump(&r.slices_).ok()) {
    return absl::InvalidArgumentError("message could not be read");
  }
  const absl::Status malformed = absl::InvalidArgumentError(
      "message is not a valid dilattn.v1.AttendRequest (malformed or truncated protobuf, or a "
      "string field that is not UTF-8)");
  Cursor c(r.slices_);
  while (!c.done()) {
    uint64_t tag;
    if (!c.Tag(&tag)) return malformed;
    const uint64_t field = tag >> 3;
    const int wire = static_cast<int>(tag & 7);
    if (field == kAttendHeaderField && wire == kLengthDelimited) {
      uint64_t length;
      std::string occurrence;
      if (!c.Length(&length) || !c.Take(static_cast<size_t>(length), &occurrence)) {
        return malformed;
      }
      if (r.which_ != Which::kHeader) {  // the oneof switches: the chunk's fields are dropped
        r.tensor_ = 0;
        r.token_ = 0;
        r.data_ = {};
      }
      r.which_ = Which::kHeader;
      // Occurrences merge, as protobuf merges them; each must parse, also one that a later
      // chunk replaces.
      // Parsed one level down, as inside the whole message: protobuf's nesting limit counts
      // from the AttendRequest.
      google::protobuf::io::CodedInputStream input(
          reinterpret_cast<const uint8_t*>(occurrence.data()), static_cast<int>(occurrence.size()));
      input.SetRecursionLimit(kMaxGroupDepth - 1);
      if (!r.header_.MergeFromCodedStream(&input) || !input.ConsumedEntireMessage()) {
        return malformed;
      }
    } else if (field == kAttendChunkField && wire == kLengthDelimited) {
      uint64_t length;
      if (!c.Length(&length)) return malformed;
      if (r.which_ != Which::kChunk) r.header_.Clear();
      r.which_ = Which::kChunk;
      const size_t end = c.consumed() + static_cast<size_t>(length);
      if (end < c.consumed()) return malformed;
      while (c.consumed() < end) {
        uint64_t inner;
        if (!c.Tag(&inner)) return malformed;
        const uint64_t f = inner >> 3;
        const int w = static_cast<int>(inner & 7);
        uint64_t v;
        if (f == kChunkTensorField && w == kVarint) {
          if (!c.Varint(&v)) return malformed;
          r.tensor_ = static_cast<int32_t>(v);  // an int32 enum: the low 32 bits, as protobuf
        } else if (f == kChunkTokenField && w == kVarint) {
          if (!c.Varint(&v)) return malformed;
          r.token_ = static_cast<int64_t>(v);
        } else if (f == kChunkDataField && w == kLengthDelimited) {
          if (!c.Length(&v)) return malformed;
          r.data_ = {c.index(), c.offset(), static_cast<size_t>(v)};
          if (!c.Take(static_cast<size_t>(v), nullptr)) return malformed;
        } else if (!SkipValue(c, w, f, nullptr, /*depth=*/1)) {  // inside the chunk message
          return malformed;
        }
        if (c.consumed() > end) return malformed;  // a field ran past the chunk
      }
    } else if (!SkipValue(c, wire, field, nullptr)) {
      return malformed;
    }
  }
  return r;
}

void AttendBytes::CopyData(void* dst) const { CopySlices(slices_, data_, dst); }

namespace {
void ReleaseSharedLease(void* lease) {
  delete static_cast<std::shared_ptr<const memory::Buffer>*>(lease);
}
}  // namespace

grpc::ByteBuffer AttendOutputBytes(int64_t token, std::shared_ptr<const memory::Buffer> lease,
                                   size_t offset, size_t bytes) {
  std::string chunk;  // OutputChunk up to its data's bytes
  AppendVarint(&chunk, (kOutputTokenField << 3) | kVarint);
  AppendVarint(&chunk, static_cast<uint64_t>(token));
  AppendVarint(&chunk, (kOutputDataField << 3) | kLengthDelimited);
  AppendVarint(&chunk, bytes);
  std::string prefix;
  AppendVarint(&prefix, (kAttendOutputField << 3) | kLengthDelimited);
  AppendVarint(&prefix, chunk.size() + bytes);
  prefix += chunk;
  grpc::Slice head(prefix);
  const char* data = static_cast<const char*>(lease->data()) + offset;
  grpc::Slice body(const_cast<char*>(data), bytes, &ReleaseSharedLease,
                   new std::shared_ptr<const memory::Buffer>(std::move(lease)));
  grpc::Slice parts[2] = {std::move(head), std::move(body)};
  return grpc::ByteBuffer(parts, 2);
}

grpc::ByteBuffer InferResponseBytes(const inference::ModelInferResponse& header,
                                    memory::Buffer output, size_t bytes) {
  std::string prefix = header.SerializeAsString();
  AppendVarint(&prefix, (kRawOutputContentsField << 3) | kLengthDelimited);
  AppendVarint(&prefix, bytes);
  return WithOutput(prefix, std::move(output), bytes);
}

grpc::ByteBuffer StreamResponseBytes(const inference::ModelStreamInferResponse& header,
                                     memory::Buffer output, size_t bytes) {
  inference::ModelStreamInferResponse outer = header;
  outer.clear_infer_response();
  std::string prefix = outer.SerializeAsString();
  std::string inner = header.infer_response().SerializeAsString();
  AppendVarint(&inner, (kRawOutputContentsField << 3) | kLengthDelimited);
  AppendVarint(&inner, bytes);
  AppendVarint(&prefix, (kInferResponseField << 3) | kLengthDelimited);
  AppendVarint(&prefix, inner.size() + bytes);
  prefix += inner;
  return WithOutput(prefix, std::move(output), bytes);
}

}  // namespace dilattn::server
