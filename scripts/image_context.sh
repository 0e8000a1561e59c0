#!/usr/bin/env bash
# Writes the Docker build context of deploy/docker/Dockerfile into DIR: the built server and
# client, the shared libraries they load (scripts/runtime_libs.sh), and the Dockerfile.
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
cp "$root/deploy/docker/Dockerfile" "$out/"
du -sh "$out"
