# Sourced: copy_runtime_libs BINARY DIR [--no-toolkit] copies the shared libraries BINARY loads
# into DIR, all but glibc's and the C++ runtime's (every target has them, in versions at least
# Debian 12's). --no-toolkit also leaves out NCCL (218 MB) and cuBLAS (540 MB), for a machine
# with the CUDA toolkit and NCCL installed.
copy_runtime_libs() {
  local bin=$1 dir=$2 toolkit=1
  [[ ${3:-} == --no-toolkit ]] && toolkit=0
  mkdir -p "$dir"
  ldd "$bin" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libstdc++.so*|libgcc_s.so*) ;;
      libnccl.so*|libcublas*.so*) if [[ $toolkit == 1 ]]; then cp -L "$lib" "$dir/"; fi ;;
      *) cp -L "$lib" "$dir/" ;;
    esac
  done
}
