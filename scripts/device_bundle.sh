#!/usr/bin/env bash
# Packs binaries built here, their shared libraries (all but glibc and the C++ runtime, which the
# GPU machine has in newer versions) and the conformance data into .device/ (git-ignored), for
# the lent GPU machine, which has no gRPC or Abseil of its own.
#   scripts/device_bundle.sh BINARY...
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="$root/.device"
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
for bin in "$@"; do
  cp "$bin" "$out/bin/"
  ldd "$bin" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libstdc++.so*|libgcc_s.so*) ;;
      *) cp -L "$lib" "$out/lib/" ;;
    esac
  done
done
cp -r "$root/../shared/conformance" "$out/conformance"
du -sh "$out"
