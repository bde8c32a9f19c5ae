#!/usr/bin/env bash
# Brings eu-stack (elfutils), which benchmarks/native_stacks.py runs, to the lent GPU machine, which
# may not have it and cannot download it: writes .stage/native-tools.tar.gz (~0.8 MB: bin/eu-stack
# and lib/ with libdw, libelf and the compression libraries they open; glibc 2.34 or later). Run it
# here, from the project root, after ../shared/gpu/stage-dali; carry the file in the third device
# call beside .stage/part-2 (gpu_checks.sh's header says how); gpu_checks.sh unpacks it where no
# eu-stack is installed.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
grep -qxF '/.stage/' "$root/.git/info/exclude" 2>/dev/null || echo '/.stage/' >>"$root/.git/info/exclude"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download elfutils libdw1 libelf1 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/x"; done
mkdir -p "$work/tools/bin" "$work/tools/lib"
cp "$work/x/usr/bin/eu-stack" "$work/tools/bin/"
cp -P "$work"/x/usr/lib/x86_64-linux-gnu/libdw[.-]* "$work"/x/usr/lib/x86_64-linux-gnu/libelf[.-]* "$work/tools/lib/"
for lib in libbz2.so.1.0 liblzma.so.5 libz.so.1 libzstd.so.1; do  # what libdw and libelf open, as this machine has them
    cp -L "/lib/x86_64-linux-gnu/$lib" "$work/tools/lib/" 2>/dev/null || true
done
LD_LIBRARY_PATH="$work/tools/lib" "$work/tools/bin/eu-stack" --version | head -1
mkdir -p "$root/.stage"
tar -czf "$root/.stage/native-tools.tar.gz" -C "$work/tools" .
echo "staged: .stage/native-tools.tar.gz ($(du -h "$root/.stage/native-tools.tar.gz" | cut -f1))"
