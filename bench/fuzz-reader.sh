#!/usr/bin/env bash
# Fuzzes the spec reader with cargo-fuzz (libFuzzer) for a while. Not part of CI's time
# budget. Usage: bench/fuzz-reader.sh [SECONDS]   (default 300)
# Seeds the corpus with the example and test specs. Uses RUSTC_BOOTSTRAP because this
# machine has only a stable toolchain and cargo-fuzz passes -Z sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-300}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
mkdir -p fuzz/corpus/reader
cp examples/*.spec obuilder/spec/tests/specs/*.spec obuilder/spec/tests/errors/*.spec fuzz/corpus/reader/
RUSTC_BOOTSTRAP=1 cargo fuzz run reader fuzz/corpus/reader -- -max_total_time="$secs" -max_len=4096 2>&1 | tail -n 20
