# Dependency installers shared by setup.sh, test.sh and .ci/run. Each function is idempotent and
# quiet when there is nothing to do. Sourced, not executed.

DILATTN_ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

DILATTN_DEBIAN_PACKAGES=(
  build-essential cmake pkg-config ccache git python3 python3-venv python3-pip
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  libgtest-dev libgmock-dev libbenchmark-dev libcivetweb-dev civetweb
  libcurl4-openssl-dev zlib1g-dev libopenblas-dev
  prometheus libb64-0d unzip openssl
)

# prometheus-cpp is packaged from Debian 13 on; core and pull need nothing Debian 12 lacks, so the
# trixie packages are downloaded and unpacked into a build-local prefix instead of installed.
DILATTN_PROMETHEUS_CPP_PACKAGES=(
  prometheus-cpp-dev libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libprometheus-cpp-push1.0
)

DILATTN_PYTHON_LOCK_FILE=tests/e2e/requirements.lock

_as_root() {
  if [[ $(id -u) == 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    echo "deps.sh: installing needs root: run as root, or install sudo" >&2
    return 1
  fi
}

install_debian_packages() {
  local missing=()
  local pkg
  for pkg in "${DILATTN_DEBIAN_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$pkg")
    fi
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  echo "== installing Debian packages: ${missing[*]}"
  _as_root apt-get update -qq
  # The prometheus package starts a system service on install; it is only used by tests, which
  # run their own instance on a free port.
  _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    _as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
}

# Prints the first Debian archive URI this machine already uses, so a mirror keeps being used.
_debian_archive_uri() {
  local uri=""
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
      /etc/apt/sources.list.d/debian.sources)
  fi
  if [[ -z $uri && -f /etc/apt/sources.list ]]; then
    uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|ftp|file):/) { print $i; exit } }' \
      /etc/apt/sources.list)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

install_prometheus_cpp() {
  local prefix=$1
  if [[ -f $prefix/.complete ]]; then
    return 0
  fi
  echo "== fetching prometheus-cpp from Debian trixie into $prefix"
  local work
  work=$(mktemp -d)
  mkdir -p "$work/parts" "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
  cat >"$work/parts/trixie.sources" <<EOF
Types: deb
URIs: $(_debian_archive_uri)
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  local opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" update -qq
  (cd "$work/debs" && apt-get "${opts[@]}" download -qq "${DILATTN_PROMETHEUS_CPP_PACKAGES[@]}")
  rm -rf "$prefix"
  mkdir -p "$prefix"
  local deb
  for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$prefix"
  done
  rm -rf "$prefix/usr/share/doc"
  rm -rf "$work"
  touch "$prefix/.complete"
}

# Every package, pip and the dependencies included, pinned to a version and to the hashes of its
# files (scripts/lock_python.py writes the lock from requirements.txt), so that a compromised or
# republished release on the index cannot enter the test environment.
install_python_env() {
  local venv=$1
  local lock="$DILATTN_ROOT_DIR/$DILATTN_PYTHON_LOCK_FILE"
  local stamp="$venv/.requirements"
  # Only the lock is installed: a requirements.txt edited without rewriting it is refused here.
  python3 "$DILATTN_ROOT_DIR/scripts/lock_python.py" --check
  if [[ -x $venv/bin/python && -f $stamp ]] && cmp -s "$lock" "$stamp"; then
    return 0
  fi
  echo "== creating Python test environment in $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --require-hashes --no-deps -r "$lock"
  cp "$lock" "$stamp"
}

# Abseil's source, for the ThreadSanitizer build only: Debian's prebuilt libabsl is not
# instrumented, so TSan cannot see its mutexes synchronise and reports every guarded access.
# The same Debian release of Abseil, built from its source package with -fsanitize=thread, fixes
# that. Fetched with a deb-src entry derived from this machine's archive.
fetch_abseil_source() {
  local dest=$1
  if [[ -f $dest/.complete ]]; then
    return 0
  fi
  echo "== fetching Debian's abseil source into $dest"
  local work
  work=$(mktemp -d)
  mkdir -p "$work/parts" "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
  cat >"$work/parts/bookworm-src.sources" <<EOS
Types: deb-src
URIs: $(_debian_archive_uri)
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
  local opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" update -qq
  (cd "$work/src" && apt-get "${opts[@]}" source --download-only -qq abseil)
  rm -rf "$dest"
  mkdir -p "$dest"
  tar -xzf "$work"/src/abseil_*.orig.tar.gz -C "$dest" --strip-components=1
  rm -rf "$work"
  touch "$dest/.complete"
}

# Triton's perf_analyzer, unpacked from the wheels tests/e2e/perf_analyzer.lock pins by version
# and hash (why those versions: the lock's header): only the binary and the CUDA runtime library
# it links; libb64 comes from Debian.
install_perf_analyzer() {
  local dest=$1
  if [[ -f $dest/.complete ]]; then
    return 0
  fi
  if [[ $(uname -m) != x86_64 ]]; then
    echo "== perf_analyzer: no wheel for $(uname -m); its test will fail" >&2
    return 0
  fi
  echo "== fetching perf_analyzer into $dest"
  local work
  work=$(mktemp -d)
  python3 -m pip download -q --no-deps --require-hashes --only-binary=:all: \
    --platform manylinux1_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --python-version 3.11 -d "$work" -r "$DILATTN_ROOT_DIR/tests/e2e/perf_analyzer.lock"
  rm -rf "$dest"
  mkdir -p "$dest/bin" "$dest/lib"
  unzip -q -j -o "$work"/tritonclient-*.whl '*/data/bin/perf_analyzer' -d "$dest/bin"
  unzip -q -j -o "$work"/nvidia_cuda_runtime_cu12-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' \
    -d "$dest/lib"
  chmod +x "$dest/bin/perf_analyzer"
  rm -rf "$work"
  touch "$dest/.complete"
}
