#include "kernels/multihead/safetensors.h"

#include <cctype>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/attention/dtype.h"
#include "kernels/common/quote.h"

namespace dilattn::multihead {
namespace {

// The format's own limit on the header, which also bounds what a hostile length can make us read.
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;
// Nesting beyond this is not a safetensors header; the limit keeps the recursion shallow.
constexpr int kMaxDepth = 8;

// Just enough JSON for the header: objects, arrays, strings, integers, and skipping the
// literals and numbers that only __metadata__ or unknown keys may hold.
class HeaderParser {
 public:
  explicit HeaderParser(absl::string_view text) : text_(text) {}

  absl::Status Fail(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(what, " at byte ", at_, " of the header"));
  }

  void SkipSpace() {
    while (at_ < text_.size() &&
           (text_[at_] == ' ' || text_[at_] == '\t' || text_[at_] == '\n' || text_[at_] == '\r')) {
      ++at_;
    }
  }
  bool Peek(char c) {
    SkipSpace();
    return at_ < text_.size() && text_[at_] == c;
  }
  absl::Status Expect(char c) {
    if (!Peek(c)) return Fail(absl::StrCat("expected '", std::string(1, c), "'"));
    ++at_;
    return absl::OkStatus();
  }
  bool AtEnd() {
    SkipSpace();
    return at_ == text_.size();
  }

  absl::StatusOr<std::string> String() {
    if (absl::Status s = Expect('"'); !s.ok()) return s;
    std::string out;
    while (at_ < text_.size() && text_[at_] != '"') {
      char c = text_[at_++];
      if (static_cast<unsigned char>(c) < 0x20) return Fail("control character in a string");
      if (c != '\\') {
        out.push_back(c);
        continue;
      }
      if (at_ >= text_.size()) break;
      c = text_[at_++];
      switch (c) {
        case '"':
        case '\\':
        case '/':
          out.push_back(c);
          break;
        case 'b':
          out.push_back('\b');
          break;
        case 'f':
          out.push_back('\f');
          break;
        case 'n':
          out.push_back('\n');
          break;
        case 'r':
          out.push_back('\r');
          break;
        case 't':
          out.push_back('\t');
          break;
        case 'u': {
          if (text_.size() - at_ < 4) return Fail("short \\u escape");
          uint32_t code = 0;
          for (int i = 0; i < 4; ++i) {
            const char h = text_[at_++];
            code <<= 4;
            if (h >= '0' && h <= '9')
              code |= static_cast<uint32_t>(h - '0');
            else if (h >= 'a' && h <= 'f')
              code |= static_cast<uint32_t>(h - 'a' + 10);
            else if (h >= 'A' && h <= 'F')
              code |= static_cast<uint32_t>(h - 'A' + 10);
            else
              return Fail("bad \\u escape");
          }
          // Names are compared as bytes; a code point is kept as UTF-8 (surrogates as they are).
          if (code < 0x80) {
            out.push_back(static_cast<char>(code));
          } else if (code < 0x800) {
            out.push_back(static_cast<char>(0xc0 | (code >> 6)));
            out.push_back(static_cast<char>(0x80 | (code & 0x3f)));
          } else {
            out.push_back(static_cast<char>(0xe0 | (code >> 12)));
            out.push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3f)));
            out.push_back(static_cast<char>(0x80 | (code & 0x3f)));
          }
          break;
        }
        default:
          return Fail("bad escape in a string");
      }
    }
    if (at_ >= text_.size()) return Fail("unterminated string");
    ++at_;
    return out;
  }

  // A non-negative integer that fits in 63 bits.
  absl::StatusOr<int64_t> Integer() {
    SkipSpace();
    const size_t start = at_;
    int64_t v = 0;
    while (at_ < text_.size() && text_[at_] >= '0' && text_[at_] <= '9') {
      if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, text_[at_] - '0', &v)) {
        return Fail("integer too large");
      }
      ++at_;
    }
    if (at_ == start) return Fail("expected a non-negative integer");
    if (at_ < text_.size() && (text_[at_] == '.' || text_[at_] == 'e' || text_[at_] == 'E')) {
      return Fail("expected an integer, found a fraction");
    }
    return v;
  }

  absl::StatusOr<std::vector<int64_t>> IntegerArray() {
    if (absl::Status s = Expect('['); !s.ok()) return s;
    std::vector<int64_t> out;
    if (Peek(']')) {
      ++at_;
      return out;
    }
    while (true) {
      if (out.size() >= 64) return Fail("array longer than 64 integers");
      absl::StatusOr<int64_t> v = Integer();
      if (!v.ok()) return v.status();
      out.push_back(*v);
      if (Peek(',')) {
        ++at_;
        continue;
      }
      if (absl::Status s = Expect(']'); !s.ok()) return s;
      return out;
    }
  }

  // Any value, discarded.
  absl::Status Skip(int depth) {
    if (depth > kMaxDepth) return Fail("nesting too deep");
    SkipSpace();
    if (at_ >= text_.size()) return Fail("unexpected end");
    const char c = text_[at_];
    if (c == '"') return String().status();
    if (c == '{' || c == '[') {
      const char close = c == '{' ? '}' : ']';
      ++at_;
      if (Peek(close)) {
        ++at_;
        return absl::OkStatus();
      }
      while (true) {
        if (c == '{') {
          if (absl::Status s = String().status(); !s.ok()) return s;
          if (absl::Status s = Expect(':'); !s.ok()) return s;
        }
        if (absl::Status s = Skip(depth + 1); !s.ok()) return s;
        if (Peek(',')) {
          ++at_;
          continue;
        }
        return Expect(close);
      }
    }
    const size_t start = at_;
    while (at_ < text_.size() && (std::isalnum(static_cast<unsigned char>(text_[at_])) ||
                                  text_[at_] == '-' || text_[at_] == '+' || text_[at_] == '.')) {
      ++at_;
    }
    if (at_ == start) return Fail("unexpected character");
    return absl::OkStatus();
  }

  absl::StatusOr<SafetensorsEntry> Entry() {
    if (absl::Status s = Expect('{'); !s.ok()) return s;
    SafetensorsEntry e;
    bool has_dtype = false, has_shape = false, has_offsets = false;
    if (!Peek('}')) {
      while (true) {
        absl::StatusOr<std::string> key = String();
        if (!key.ok()) return key.status();
        if (absl::Status s = Expect(':'); !s.ok()) return s;
        if (*key == "dtype") {
          absl::StatusOr<std::string> v = String();
          if (!v.ok()) return v.status();
          e.dtype = *v;
          has_dtype = true;
        } else if (*key == "shape") {
          absl::StatusOr<std::vector<int64_t>> v = IntegerArray();
          if (!v.ok()) return v.status();
          e.shape = *v;
          has_shape = true;
        } else if (*key == "data_offsets") {
          absl::StatusOr<std::vector<int64_t>> v = IntegerArray();
          if (!v.ok()) return v.status();
          if (v->size() != 2) return Fail("data_offsets must hold two integers");
          e.begin = static_cast<uint64_t>((*v)[0]);
          e.end = static_cast<uint64_t>((*v)[1]);
          has_offsets = true;
        } else if (absl::Status s = Skip(2); !s.ok()) {
          return s;
        }
        if (Peek(',')) {
          ++at_;
          continue;
        }
        break;
      }
    }
    if (absl::Status s = Expect('}'); !s.ok()) return s;
    if (!has_dtype || !has_shape || !has_offsets) {
      return Fail("a tensor entry needs dtype, shape and data_offsets");
    }
    return e;
  }

 private:
  absl::string_view text_;
  size_t at_ = 0;
};

// Bytes per element of the dtypes safetensors names; 0 for names it does not have.
size_t ElementBytes(absl::string_view dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" ||
      dtype == "F8_E5M2") {
    return 1;
  }
  return 0;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

absl::StatusOr<SafetensorsFile> SafetensorsFile::Read(const std::string& path) {
  // Read to its end: a FIFO or a device (/dev/zero) would hang the start-up or exhaust memory.
  std::error_code ec;
  const std::filesystem::file_status status = std::filesystem::status(path, ec);
  if (ec || status.type() == std::filesystem::file_type::not_found) {
    return absl::InvalidArgumentError(absl::StrCat("weights file ", Quote(path),
                                                   " cannot be opened",
                                                   ec ? absl::StrCat(": ", ec.message()) : ""));
  }
  if (status.type() != std::filesystem::file_type::regular) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights file ", Quote(path), " is not a regular file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights file ", Quote(path), " cannot be opened"));
  }
  std::stringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights file ", Quote(path), " cannot be read"));
  }
  return Parse(std::move(bytes).str(), path);
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Parse(std::string bytes, std::string source) {
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights file ", Quote(source), " is not valid safetensors: ", what));
  };
  if (bytes.size() < 8) return bad(absl::StrCat("only ", bytes.size(), " bytes"));
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) {
    header_bytes = (header_bytes << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  }
  if (header_bytes > kMaxHeaderBytes || header_bytes > bytes.size() - 8) {
    return bad(absl::StrCat("header length ", header_bytes, " exceeds the file's ",
                            bytes.size() - 8, " bytes after the length (or 100 MiB)"));
  }
  SafetensorsFile file;
  file.source_ = source;
  file.data_begin_ = 8 + static_cast<size_t>(header_bytes);
  const uint64_t data_bytes = bytes.size() - file.data_begin_;
  HeaderParser p(absl::string_view(bytes).substr(8, static_cast<size_t>(header_bytes)));
  absl::Status s = p.Expect('{');
  if (s.ok() && p.Peek('}'))
    s = p.Expect('}');
  else {
    while (s.ok()) {
      absl::StatusOr<std::string> name = p.String();
      if (!name.ok()) {
        s = name.status();
        break;
      }
      if (s = p.Expect(':'); !s.ok()) break;
      if (*name == "__metadata__") {
        s = p.Skip(1);
      } else {
        absl::StatusOr<SafetensorsEntry> e = p.Entry();
        if (!e.ok()) {
          s = e.status();
          break;
        }
        const size_t width = ElementBytes(e->dtype);
        uint64_t count = 1;
        for (int64_t d : e->shape) {
          if (__builtin_mul_overflow(count, static_cast<uint64_t>(d), &count)) {
            return bad(absl::StrCat("tensor ", Quote(*name), " shape ", ShapeText(e->shape),
                                    " overflows"));
          }
        }
        uint64_t expected = 0;
        if (e->begin > e->end || e->end > data_bytes) {
          return bad(absl::StrCat("tensor ", Quote(*name), " data_offsets [", e->begin, ", ",
                                  e->end, "] lie outside the ", data_bytes, " data bytes"));
        }
        if (width != 0 &&
            (__builtin_mul_overflow(count, width, &expected) || expected != e->end - e->begin)) {
          return bad(absl::StrCat("tensor ", Quote(*name), " of ", e->dtype, " ",
                                  ShapeText(e->shape), " spans ", e->end - e->begin, " bytes, not ",
                                  count, " x ", width));
        }
        if (!file.entries_.emplace(*name, *std::move(e)).second) {
          return bad(absl::StrCat("tensor ", Quote(*name), " is listed twice"));
        }
      }
      if (!s.ok()) break;
      if (p.Peek(',')) {
        s = p.Expect(',');
        continue;
      }
      s = p.Expect('}');
      break;
    }
  }
  if (s.ok() && !p.AtEnd()) s = p.Fail("text after the header object");
  if (!s.ok()) return bad(s.message());
  file.bytes_ = std::move(bytes);
  return file;
}

const SafetensorsEntry* SafetensorsFile::Find(absl::string_view name) const {
  auto it = entries_.find(std::string(name));
  return it == entries_.end() ? nullptr : &it->second;
}

absl::StatusOr<std::vector<float>> SafetensorsFile::ReadFloat(
    absl::string_view name, const std::vector<int64_t>& shape) const {
  const SafetensorsEntry* e = Find(name);
  if (e == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("weights file ", Quote(source_), " has no tensor ", Quote(name)));
  }
  if (e->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat("weights file ", Quote(source_), ": tensor ",
                                                   Quote(name), " has shape ", ShapeText(e->shape),
                                                   "; expected ", ShapeText(shape)));
  }
  attention::DType type;
  if (e->dtype == "F32")
    type = attention::DType::kFloat32;
  else if (e->dtype == "F16")
    type = attention::DType::kFloat16;
  else if (e->dtype == "BF16")
    type = attention::DType::kBFloat16;
  else {
    return absl::InvalidArgumentError(absl::StrCat("weights file ", Quote(source_), ": tensor ",
                                                   Quote(name), " has dtype ", e->dtype,
                                                   "; supported: F32, F16, BF16"));
  }
  const size_t count = static_cast<size_t>(e->end - e->begin) / attention::DTypeSize(type);
  // The data section has no alignment guarantee: copy out before reading elements.
  std::vector<unsigned char> raw(static_cast<size_t>(e->end - e->begin));
  std::memcpy(raw.data(), bytes_.data() + data_begin_ + e->begin, raw.size());
  std::vector<float> out(count);
  for (size_t i = 0; i < count; ++i) {
    out[i] = attention::LoadAsFloat(raw.data(), type, i);
    if (!std::isfinite(out[i])) {
      return absl::InvalidArgumentError(absl::StrCat("weights file ", Quote(source_), ": tensor ",
                                                     Quote(name), " holds a non-finite value at ",
                                                     "element ", i));
    }
  }
  return out;
}

}  // namespace dilattn::multihead
