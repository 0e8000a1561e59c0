#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: install what is missing, build, start the server.
#
#   ./setup.sh              install + build, then run dilattn-server on the built-in models
#   ./setup.sh --no-serve   install + build only (CI, Docker)
#
# Idempotent: every step checks before it acts, so a second run only rebuilds what changed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
serve=1
build_dir=${DILATTN_BUILD_DIR:-$root/build}
for arg in "$@"; do
  case "$arg" in
    --no-serve) serve=0 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

# shellcheck source=scripts/deps.sh
source "$root/scripts/deps.sh"

install_debian_packages
install_prometheus_cpp "$root/third_party/prometheus-cpp"
install_python_env "$root/.venv"
install_perf_analyzer "$root/third_party/perf_analyzer"

echo "== building into $build_dir"
cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build_dir" -j"$(nproc)"

if [[ $serve == 1 ]]; then
  server="$build_dir/server/dilattn-server"
  if [[ ! -x $server ]]; then
    echo "setup.sh: build finished but $server is missing" >&2
    exit 1
  fi
  echo "== starting dilattn-server (gRPC :8001, metrics :8002); Ctrl-C stops it"
  exec "$server" --device auto
fi
echo "== build done: $build_dir"
