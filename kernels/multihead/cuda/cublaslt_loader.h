#pragma once

// cuBLASLt, loaded when the first GPU multihead backend is made rather than linked. Linked, its
// 94 KiB of static TLS went into every thread of the server, and threads made with small stacks
// (the metrics server's) failed to start. Loaded with dlopen, it costs nothing until a multihead
// model runs on a GPU, and a machine without it serves those models on the CPU path instead.

#include <cublasLt.h>

#include "absl/status/statusor.h"

namespace dilattn::multihead::cuda {

struct CublasLt {
  decltype(&cublasLtCreate) Create;
  decltype(&cublasLtDestroy) Destroy;
  decltype(&cublasLtGetStatusName) GetStatusName;
  decltype(&cublasLtMatmul) Matmul;
  decltype(&cublasLtMatmulAlgoGetHeuristic) MatmulAlgoGetHeuristic;
  decltype(&cublasLtMatmulDescCreate) MatmulDescCreate;
  decltype(&cublasLtMatmulDescDestroy) MatmulDescDestroy;
  decltype(&cublasLtMatmulDescSetAttribute) MatmulDescSetAttribute;
  decltype(&cublasLtMatmulPreferenceCreate) MatmulPreferenceCreate;
  decltype(&cublasLtMatmulPreferenceDestroy) MatmulPreferenceDestroy;
  decltype(&cublasLtMatmulPreferenceSetAttribute) MatmulPreferenceSetAttribute;
  decltype(&cublasLtMatrixLayoutCreate) MatrixLayoutCreate;
  decltype(&cublasLtMatrixLayoutDestroy) MatrixLayoutDestroy;
};

// The library of the toolkit's major version (libcublasLt.so.<major>), loaded once per process;
// FAILED_PRECONDITION naming the library when it or a symbol is missing.
absl::StatusOr<const CublasLt*> LoadCublasLt();

}  // namespace dilattn::multihead::cuda
