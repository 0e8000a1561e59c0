#include "kernels/multihead/cuda/cublaslt_loader.h"

#include <dlfcn.h>

#include "absl/strings/str_cat.h"

namespace dilattn::multihead::cuda {
namespace {

absl::StatusOr<CublasLt> Load() {
  const std::string name = absl::StrCat("libcublasLt.so.", CUBLAS_VER_MAJOR);
  void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    return absl::FailedPreconditionError(
        absl::StrCat("cannot load ", name,
                     " (cuBLAS of the CUDA toolkit): ", why == nullptr ? "unknown error" : why));
  }
  CublasLt lt{};
  absl::Status missing;
  auto bind = [&](auto& fn, const char* symbol) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, symbol));
    if (fn == nullptr && missing.ok()) {
      missing = absl::FailedPreconditionError(absl::StrCat(name, " has no ", symbol));
    }
  };
  bind(lt.Create, "cublasLtCreate");
  bind(lt.Destroy, "cublasLtDestroy");
  bind(lt.GetStatusName, "cublasLtGetStatusName");
  bind(lt.Matmul, "cublasLtMatmul");
  bind(lt.MatmulAlgoGetHeuristic, "cublasLtMatmulAlgoGetHeuristic");
  bind(lt.MatmulDescCreate, "cublasLtMatmulDescCreate");
  bind(lt.MatmulDescDestroy, "cublasLtMatmulDescDestroy");
  bind(lt.MatmulDescSetAttribute, "cublasLtMatmulDescSetAttribute");
  bind(lt.MatmulPreferenceCreate, "cublasLtMatmulPreferenceCreate");
  bind(lt.MatmulPreferenceDestroy, "cublasLtMatmulPreferenceDestroy");
  bind(lt.MatmulPreferenceSetAttribute, "cublasLtMatmulPreferenceSetAttribute");
  bind(lt.MatrixLayoutCreate, "cublasLtMatrixLayoutCreate");
  bind(lt.MatrixLayoutDestroy, "cublasLtMatrixLayoutDestroy");
  if (!missing.ok()) return missing;
  // Never closed: the functions stay valid for the life of the process.
  return lt;
}

}  // namespace

absl::StatusOr<const CublasLt*> LoadCublasLt() {
  static const absl::StatusOr<CublasLt>* loaded = new absl::StatusOr<CublasLt>(Load());
  if (!loaded->ok()) return loaded->status();
  return &**loaded;
}

}  // namespace dilattn::multihead::cuda
