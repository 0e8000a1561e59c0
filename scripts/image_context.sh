#!/usr/bin/env bash
# Writes the Docker build context of deploy/docker/Dockerfile into DIR: the built server and
# client, the shared libraries they load (scripts/runtime_libs.sh), cuBLASLt where the build has
# CUDA (the server loads it at run time for multihead models), and the Dockerfile.
#   scripts/image_context.sh DIR        (after ./setup.sh --no-serve)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:?usage: scripts/image_context.sh DIR}
# shellcheck source=scripts/runtime_libs.sh
source "$root/scripts/runtime_libs.sh"
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
for bin in "$root/build/server/dilattn-server" "$root/build/client/dilattn-client"; do
  [[ -x $bin ]] || { echo "missing $bin: build first (./setup.sh --no-serve)" >&2; exit 1; }
  cp "$bin" "$out/bin/"
  copy_runtime_libs "$bin" "$out/lib"
done
# Loaded with dlopen, so ldd does not list it; the toolkit that built the server has it.
if ldd "$root/build/server/dilattn-server" | grep -q libcudart; then
  cudart=$(ldd "$root/build/server/dilattn-server" | awk '/libcudart/ {print $3}')
  lt=$(ls "$(dirname "$cudart")"/libcublasLt.so.[0-9]* 2>/dev/null | head -1)
  [[ -n $lt ]] || { echo "no libcublasLt beside $cudart" >&2; exit 1; }
  cp -L "$lt" "$out/lib/"
  copy_runtime_libs "$lt" "$out/lib"
fi
cp "$root/deploy/docker/Dockerfile" "$out/"
du -sh "$out"
