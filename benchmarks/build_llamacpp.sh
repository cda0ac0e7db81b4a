#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-quantize (CMake, Release, native CPU, nothing else) from the sources
# that the llama-cpp-python source package on PyPI vendors under vendor/llama.cpp, for `glmx bench --llamacpp`.
#   benchmarks/build_llamacpp.sh [OUT_DIR]        (default: ~/.cache/glmx/llamacpp)
# Pinned: llama-cpp-python 0.3.36, whose CHANGELOG says it vendors ggml-org/llama.cpp@0c1e57098.
# Needs pip (the PyPI registry), cmake >= 3.14, a C/C++ compiler. Writes OUT_DIR/bin/{llama-bench,llama-quantize}
# and OUT_DIR/BUILD_INFO (versions, commit, flags). glmx bench itself never downloads or builds anything.
set -euo pipefail
VERSION=0.3.36
COMMIT=0c1e57098
OUT=${1:-$HOME/.cache/glmx/llamacpp}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download -q --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION"
tar xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
grep -q "llama.cpp@$COMMIT" "$WORK/llama_cpp_python-$VERSION/CHANGELOG.md" || {
  echo "llama-cpp-python $VERSION does not say it vendors llama.cpp@$COMMIT" >&2; exit 1; }
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TOOLS=ON > "$WORK/cmake.log"
cmake --build "$WORK/build" --config Release -j "$(nproc)" --target llama-bench llama-quantize > "$WORK/build.log"
mkdir -p "$OUT/bin.partial"
cp "$WORK/build/bin/llama-bench" "$WORK/build/bin/llama-quantize" "$OUT/bin.partial/"
rm -rf "$OUT/bin" && mv "$OUT/bin.partial" "$OUT/bin"   # whole or not at all
{ echo "llama-cpp-python $VERSION"; echo "llama.cpp commit $COMMIT (from its CHANGELOG)"
  echo "cmake: Release, GGML_NATIVE=ON, static, llama-bench + llama-quantize only"
  echo "compiler: $(c++ --version | head -1)"; echo "built: $(date -u +%FT%TZ) on $(uname -m)"
  echo "cpu flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|amx|fma|f16c)' | tr '\n' ' ')"; } > "$OUT/BUILD_INFO"
echo "$OUT/bin"
