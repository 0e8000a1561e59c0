#pragma once

// What the multihead tests share: a safetensors writer (the format, written independently of the
// reader under test) and random weights and problems.

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/attention/dtype.h"
#include "kernels/multihead/multihead.h"
#include "tests/common/random_config.h"
#include "tests/common/test_util.h"

namespace dilattn::testing {

struct NamedTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
  std::string dtype = "F32";  // F32, F16 or BF16
};

// The bytes of a safetensors file holding `tensors` in order, with a __metadata__ entry.
inline std::string SafetensorsBytes(const std::vector<NamedTensor>& tensors) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  std::string data;
  for (const NamedTensor& t : tensors) {
    const size_t begin = data.size();
    for (float v : t.values) {
      if (t.dtype == "F32") {
        data.append(reinterpret_cast<const char*>(&v), sizeof(v));
      } else {
        const uint16_t bits =
            t.dtype == "F16" ? attention::FloatToHalfBits(v) : attention::FloatToBFloat16Bits(v);
        data.append(reinterpret_cast<const char*>(&bits), sizeof(bits));
      }
    }
    absl::StrAppend(&header, ",\"", t.name, "\":{\"dtype\":\"", t.dtype, "\",\"shape\":[",
                    absl::StrJoin(t.shape, ","), "],\"data_offsets\":[", begin, ",", data.size(),
                    "]}");
  }
  header += "}";
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

// Projections scaled as xavier initialisation would (so activations stay of order one), biases
// and norm parameters drawn around their identities.
inline std::vector<NamedTensor> RandomWeightTensors(
    SplitMix64& rng, int64_t e, bool norm, bool biases, const std::string& prefix = "",
    const std::string& norm_name = "inner_attn_ln") {
  std::vector<NamedTensor> out;
  const float scale = static_cast<float>(std::sqrt(3.0 / static_cast<double>(e)));
  for (const char* p : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
    NamedTensor w{absl::StrCat(prefix, p, ".weight"), {e, e}, {}};
    for (int64_t i = 0; i < e * e; ++i) w.values.push_back(rng.NextFloat(scale));
    out.push_back(std::move(w));
    if (biases) {
      NamedTensor b{absl::StrCat(prefix, p, ".bias"), {e}, {}};
      for (int64_t i = 0; i < e; ++i) b.values.push_back(rng.NextFloat(0.5f));
      out.push_back(std::move(b));
    }
  }
  if (norm) {
    NamedTensor g{absl::StrCat(prefix, norm_name, ".weight"), {e}, {}};
    NamedTensor b{absl::StrCat(prefix, norm_name, ".bias"), {e}, {}};
    for (int64_t i = 0; i < e; ++i) {
      g.values.push_back(1.0f + rng.NextFloat(0.5f));
      b.values.push_back(rng.NextFloat(0.5f));
    }
    out.push_back(std::move(g));
    out.push_back(std::move(b));
  }
  return out;
}

inline std::shared_ptr<const multihead::MultiheadWeights> RandomWeights(SplitMix64& rng, int64_t e,
                                                                        int64_t heads, bool norm,
                                                                        bool biases) {
  absl::StatusOr<multihead::SafetensorsFile> file = multihead::SafetensorsFile::Parse(
      SafetensorsBytes(RandomWeightTensors(rng, e, norm, biases)), "random weights");
  if (!file.ok()) return nullptr;
  absl::StatusOr<std::shared_ptr<const multihead::MultiheadWeights>> w =
      multihead::LoadWeights(*file, {heads, "", 1e-5});
  return w.ok() ? *w : nullptr;
}

}  // namespace dilattn::testing
