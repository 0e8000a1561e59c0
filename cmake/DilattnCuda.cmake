# CUDA detection: the CUDA paths build when nvcc is present and are simply left out otherwise.
include(CheckLanguage)
check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  # sm_90a (Hopper: wgmma, TMA) and sm_80 (Ampere). Architectures are passed as -gencode flags
  # because arch-specific targets like 90a postdate this CMake's table.
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  # This CMake's table stops before nvcc knew C++20; teach it the flag.
  set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(DILATTN_CUDA_GENCODE
      "-gencode=arch=compute_90a,code=sm_90a"
      "-gencode=arch=compute_80,code=sm_80")
  set(DILATTN_HAVE_CUDA ON)
else()
  message(STATUS "dilattn: no CUDA compiler found; building the CPU paths only")
endif()
