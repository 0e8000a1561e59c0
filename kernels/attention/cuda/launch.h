#pragma once

// Host entry points of the CUDA kernels. The stream is an opaque cudaStream_t so that this
// header stays free of CUDA types; the error is a cudaError_t value (0 is success).

#include "kernels/attention/cuda/kernel_params.h"

namespace dilattn::attention::cuda {

// Head dims with a compiled kernel.
bool FusedForwardSupportsHeadDim(int head_dim);

// The variant for a device of compute capability `major` and a head dim: the one selector.
FusedVariant SelectFusedVariant(int major, int head_dim);

// Rows per tile the kernel for this head dim expects in the tile list.
constexpr int FusedBlockM(int head_dim) { return head_dim <= 128 ? 128 : 64; }

// Launches the fused forward kernel for params.attn.dtype (fp16 or bf16) and head_dim.
int LaunchFusedForward(const FusedForwardParams& params, void* stream);

// Bits the fp32 <-> fp16 conversions set in a request's flag, so that the caller can refuse that
// request (and only that one of a batch) instead of returning infinities its fp32 arithmetic
// would not have made.
inline constexpr int kFp16InputOverflow = 1;    // a finite input beyond fp16's range
inline constexpr int kFp16NonFiniteOutput = 2;  // an output value is inf or NaN
inline constexpr int kFp16NonFiniteInput = 4;   // an input was inf or NaN already
// Where a conversion flags what it finds: element `first + i` of a packed tensor belongs to the
// request r with bounds[r] <= first + i < bounds[r + 1], and its bits go to flags[r]. The bounds
// are searched only when a value is flagged. Device pointers.
struct ConversionFlags {
  int* flags;             // one per request
  const int64_t* bounds;  // requests + 1 ascending element offsets, from 0
  int requests;
  int64_t first;  // of the converted range within the packed tensor
};
// The fp16 side of a conversion in rows of `row` values `pitch` apart (pitch >= row; equal for
// packed tensors): a head dim that runs padded (the executor's PaddedPlan) leaves the columns
// past `row` to the caller.
struct HalfRows {
  int64_t row;
  int64_t pitch;
};
// Up to three tensors of n fp32 values in one launch: tensor t's values at in + t * n go to
// outs[t] in fp16, flagging kFp16InputOverflow / kFp16NonFiniteInput.
inline constexpr int kMaxConvertTensors = 3;
int LaunchFloatToHalf(const float* in, void* const* outs, int tensors, int64_t n, HalfRows rows,
                      const ConversionFlags& flags, void* stream);
// out[i] = float(in[i]) for n fp16 values, flagging kFp16NonFiniteOutput.
int LaunchHalfToFloat(const void* in, float* out, int64_t n, HalfRows rows,
                      const ConversionFlags& flags, void* stream);

// Rows of one head between a (tokens, H, D) tensor of 2-byte elements (row_stride elements per
// token) and a packed array of D-element rows: `rows` holds n (token, head) pairs. gather:
// packed[i] = tensor row i; otherwise tensor row i = packed[i]. Pairs with a negative token
// are skipped (rows a GPU does not hold).
int LaunchMoveHeadRows(bool gather, void* tensor, int64_t row_stride, int head_dim,
                       const int32_t* rows, int64_t n, void* packed, void* stream);

// Fault injection for the server's tests. A kernel that traps, which leaves the device unusable
// for the rest of the process as a hardware fault or an illegal address does
// (DILATTN_TEST_TRAP_DEVICE); one that runs for `nanoseconds`, as a hung device would
// (DILATTN_TEST_HANG_DEVICE).
int LaunchTrap(void* stream);
int LaunchSpin(int64_t nanoseconds, void* stream);

}  // namespace dilattn::attention::cuda
