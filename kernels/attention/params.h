#pragma once

// The launch parameters shared by every backend (CPU, CUDA). A plain struct of pointers, strides
// and sizes: no methods, no CUDA types, so host and device code include it alike. It is filled
// only by PlanAttention() (attention.h), so kernels may assume every field is validated.

#include <cstdint>

namespace dilattn::attention {

inline constexpr int kMaxBranches = 16;

enum class DType : uint8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class Mode : uint8_t { kLongNet = 0, kHeadGroups = 1 };

struct DilatedAttentionParams {
  // Sequences lie end to end: sequence s owns token rows [seq_offsets[s], seq_offsets[s + 1]).
  // A token row holds num_heads * head_dim values, head-major; strides are in elements.
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int64_t q_row_stride;
  int64_t k_row_stride;
  int64_t v_row_stride;
  int64_t o_row_stride;
  const int64_t* seq_offsets;  // [num_seqs + 1], in the backend's memory space

  int64_t num_seqs;
  int64_t total_tokens;
  int64_t max_seq_len;
  int32_t num_heads;
  int32_t head_dim;

  DType dtype;
  Mode mode;
  bool causal;
  float scale;  // multiplies q.k before the softmax

  int32_t num_branches;
  // Branch i: segments of segment_length[i] tokens (a sequence shorter than that forms one
  // segment), keeping every dilation_rate[i]-th position from a head-dependent offset.
  int64_t segment_length[kMaxBranches];
  int64_t dilation_rate[kMaxBranches];
  // longnet: head h uses offset h / offset_divisor[i], with offset_divisor[i] = ceil(H / r_i).
  int32_t offset_divisor[kMaxBranches];
  // head_groups: heads [group_head_begin[i], group_head_begin[i + 1]) use branch i only, at
  // offset i % r_i.
  int32_t group_head_begin[kMaxBranches + 1];
};

}  // namespace dilattn::attention
