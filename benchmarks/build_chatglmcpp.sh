#!/usr/bin/env bash
# Build chatglm.cpp's `main` (CMake, Release, native CPU, CPU only, nothing else) from the chatglm-cpp source
# package on PyPI, for the ChatGLM-6B peer comparison.
#   benchmarks/build_chatglmcpp.sh [OUT_DIR]        (default: ~/.cache/glmx/chatglmcpp)
# Pinned: chatglm-cpp 0.4.2 (sha256 below). The source package carries no git commit id: its own version string
# (chatglm_cpp/__init__.py) and the archive's sha256 are recorded instead. It is downloaded without build isolation
# (pip would otherwise fetch and run its build requirements only to read its metadata).
# Needs pip (the PyPI registry), cmake >= 3.12, a C++17 compiler. Writes OUT_DIR/bin/main, OUT_DIR/chatglm_cpp
# (its Python converter, for benchmarks/chatglmcpp.py) and OUT_DIR/BUILD_INFO. glmx itself never builds anything.
set -euo pipefail
VERSION=0.4.2
SHA256=${CHATGLMCPP_SHA256:-8c70215eafdcd60895d1b72db517f584ba2db21d5a5f09a2396ba49bd65104d0}
OUT=${1:-$HOME/.cache/glmx/chatglmcpp}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download -q --no-deps --no-build-isolation -d "$WORK" "chatglm-cpp==$VERSION"
ARCHIVE="$WORK/chatglm_cpp-$VERSION.tar.gz"
GOT=$(sha256sum "$ARCHIVE" | cut -d' ' -f1)
if [ -n "$SHA256" ] && [ "$GOT" != "$SHA256" ]; then echo "chatglm-cpp $VERSION: sha256 $GOT, expected $SHA256" >&2; exit 1; fi
tar xzf "$ARCHIVE" -C "$WORK"
SRC="$WORK/chatglm_cpp-$VERSION"
grep -q "__version__ = \"$VERSION\"" "$SRC/chatglm_cpp/__init__.py" || { echo "not chatglm-cpp $VERSION" >&2; exit 1; }
# the source package leaves out tests/perplexity.cpp, which its CMakeLists declares with the examples: a stub
# lets CMake generate (only `main` is built)
mkdir -p "$SRC/tests" && [ -f "$SRC/tests/perplexity.cpp" ] || echo 'int main() { return 0; }' > "$SRC/tests/perplexity.cpp"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF \
  -DCHATGLM_ENABLE_PYBIND=OFF -DCHATGLM_ENABLE_EXAMPLES=ON -DCHATGLM_ENABLE_TESTING=OFF -DBUILD_SHARED_LIBS=OFF \
  > "$WORK/cmake.log"
cmake --build "$WORK/build" --config Release -j "$(nproc)" --target main > "$WORK/build.log"
mkdir -p "$OUT/bin.partial"
cp "$WORK/build/bin/main" "$OUT/bin.partial/"
rm -rf "$OUT/chatglm_cpp" && cp -r "$SRC/chatglm_cpp" "$OUT/chatglm_cpp"
rm -rf "$OUT/bin" && mv "$OUT/bin.partial" "$OUT/bin"   # whole or not at all
{ echo "chatglm-cpp $VERSION (PyPI source package, sha256 $GOT; it carries no git commit id)"
  echo "cmake: Release, GGML_NATIVE=ON, CPU only (no CUDA / Metal), static, main only"
  echo "compiler: $(c++ --version | head -1)"; echo "built: $(date -u +%FT%TZ) on $(uname -m)"
  echo "cpu flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|amx|fma|f16c)' | tr '\n' ' ')"; } > "$OUT/BUILD_INFO"
echo "$OUT/bin/main"
