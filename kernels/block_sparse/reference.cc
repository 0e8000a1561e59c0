#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/block_sparse/block_sparse.h"

namespace dilattn::block_sparse {

absl::Status ReferenceBlockSparse(const BlockSparsePlan& plan,
                                  const attention::AttentionTensors& tensors) {
  if (absl::Status s = CheckBlockSparseTensors(plan, tensors, DeviceLoc::Host()); !s.ok()) {
    return s;
  }
  const int64_t heads = plan.shape.num_heads;
  const int64_t dim = plan.shape.head_dim;
  const attention::DType dt = plan.shape.dtype;
  const int64_t bs = plan.options.block_size;
  std::vector<double> scores;
  std::vector<int64_t> keys;
  for (size_t s = 0; s < plan.seq_layout.size(); ++s) {
    const BlockLayout& layout = plan.layouts[static_cast<size_t>(plan.seq_layout[s])];
    const int64_t base = plan.seq_offsets[s];
    auto at = [&](int64_t token, int64_t h, int64_t d) {
      return static_cast<size_t>(((base + token) * heads + h) * dim + d);
    };
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t qp = 0; qp < layout.seq_len; ++qp) {
        const int64_t i = qp / bs;
        keys.clear();
        for (int64_t c = layout.row_begin[i]; c < layout.row_begin[i + 1]; ++c) {
          const int64_t j = layout.cols[static_cast<size_t>(c)];
          for (int64_t kp = j * bs; kp < std::min((j + 1) * bs, layout.seq_len); ++kp) {
            if (!plan.options.causal || kp <= qp) keys.push_back(kp);
          }
        }
        scores.assign(keys.size(), 0.0);
        double max_score = -std::numeric_limits<double>::infinity();
        for (size_t k = 0; k < keys.size(); ++k) {
          double dot = 0;
          for (int64_t d = 0; d < dim; ++d) {
            dot += double{attention::LoadAsFloat(tensors.q.data, dt, at(qp, h, d))} *
                   attention::LoadAsFloat(tensors.k.data, dt, at(keys[k], h, d));
          }
          scores[k] = dot * plan.scale;
          max_score = std::max(max_score, scores[k]);
        }
        double denom = 0;
        for (double& x : scores) denom += (x = std::exp(x - max_score));
        for (int64_t d = 0; d < dim; ++d) {
          double acc = 0;
          for (size_t k = 0; k < keys.size(); ++k) {
            acc += scores[k] * attention::LoadAsFloat(tensors.v.data, dt, at(keys[k], h, d));
          }
          attention::StoreFromFloat(tensors.o.data, dt, at(qp, h, d),
                                    keys.empty() ? 0.0f : static_cast<float>(acc / denom));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace dilattn::block_sparse
