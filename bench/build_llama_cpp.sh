#!/usr/bin/env bash
# Build the llama.cpp that the llama-cpp-python sdist vendors: llama-quantize, llama-perplexity and the shared
# libllama (+ libggml*), installed into one prefix.  The llama.cpp backend of corpus mode, the llama.cpp match
# bench and the slow llama.cpp tests use this prefix (env var KL_ESTIMATION_LLAMA_CPP).
#
#   bench/build_llama_cpp.sh [PREFIX]         (default: $KL_ESTIMATION_LLAMA_CPP or ~/.cache/kl_estimation/llama.cpp)
#   JOBS=2 bench/build_llama_cpp.sh           (default: nproc)
#   WITH_PYTHON=1 bench/build_llama_cpp.sh    also pip-install the llama-cpp-python binding into the current
#                                             python (PYTHON=...), without a second C++ build: it loads
#                                             PREFIX/lib/libllama.so through LLAMA_CPP_LIB_PATH.
#
# Building from the sdist pins llama.cpp to the version the Python binding was written for (its ctypes signatures
# must match the library's).  Only the three targets are built: on 2 cores that is the difference between ~10 and
# ~60 minutes.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PREFIX="${1:-${KL_ESTIMATION_LLAMA_CPP:-$HOME/.cache/kl_estimation/llama.cpp}}"
JOBS="${JOBS:-$(nproc)}"
PYTHON="${PYTHON:-python3}"
WORK="${LLAMA_CPP_BUILD_DIR:-$PREFIX/build}"
SDIST_DIR="${LLAMA_CPP_SDIST_DIR:-$WORK/sdist}"

mkdir -p "$PREFIX/bin" "$PREFIX/lib" "$WORK" "$SDIST_DIR"
PREFIX="$(cd "$PREFIX" && pwd)"
SDIST="$(ls "$SDIST_DIR"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
if [ -z "$SDIST" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: --dest "$SDIST_DIR" "llama-cpp-python==$VERSION"
    SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
fi
SRC="$WORK/llama_cpp_python-$VERSION"
[ -d "$SRC" ] || tar -xzf "$SDIST" -C "$WORK"

start=$(date +%s)
# No AMX: -march=native turns ggml's AMX kernels on wherever the CPU lists AMX, but some VMs list it without running
# it (here: a Sapphire Rapids guest whose tileloadd raises SIGILL in the first decode of a Q4_1 model, which killed the
# test process). Explicit -mno-* flags win over -march=native in GCC and clang, whatever their order.
NO_AMX=""
if [ "$(uname -m)" = x86_64 ] && echo 'int main(void){return 0;}' | ${CC:-cc} -mno-amx-tile -mno-amx-int8 \
        -mno-amx-bf16 -x c -o /dev/null - 2>/dev/null; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
# RPATH $ORIGIN/../lib: the binaries find the shared libraries of the prefix wherever it is moved.
# No OpenSSL/curl (nothing here downloads), no OpenMP dependency beyond the compiler's.
cmake -S "$SRC/vendor/llama.cpp" -B "$WORK/cmake" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN/../lib' \
    -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
    ${LLAMA_CPP_CMAKE_ARGS:-}
cmake --build "$WORK/cmake" --config Release -j "$JOBS" --target llama llama-quantize llama-perplexity
# --remove-destination: a new file, not the old one rewritten in place under a process that has it mapped (a test
# run using the prefix crashed while CI copied the same libraries over it)
cp -a --remove-destination "$WORK"/cmake/bin/llama-quantize "$WORK"/cmake/bin/llama-perplexity "$PREFIX/bin/"
find "$WORK/cmake" -name 'lib*.so*' -exec cp -a --remove-destination {} "$PREFIX/lib/" \;
echo "$VERSION" > "$PREFIX/VERSION"
echo "built llama.cpp (llama-cpp-python $VERSION) into $PREFIX in $(( $(date +%s) - start )) s with $JOBS jobs"

if [ "${WITH_PYTHON:-0}" = 1 ]; then
    # LLAMA_BUILD=OFF: the binding's package only, no C++ compile; it loads our lib via LLAMA_CPP_LIB_PATH.
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PYTHON" -m pip install "$SDIST"
    LLAMA_CPP_LIB_PATH="$PREFIX/lib" "$PYTHON" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'loads', '$PREFIX/lib')"
fi
echo "export KL_ESTIMATION_LLAMA_CPP=$PREFIX"
