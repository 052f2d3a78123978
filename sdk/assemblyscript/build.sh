#!/usr/bin/env bash
# Build the AssemblyScript codec: sdk/assemblyscript/build/acme_th8.wasm
# Needs Node.js and npm (the AssemblyScript compiler comes from the npm registry, pinned in
# package-lock.json). Then: twin plugin test, or a kind: Plugin with wasm: pointing at it.
set -euo pipefail
cd "$(dirname "$0")"
[ -x node_modules/.bin/asc ] || npm ci --no-audit --no-fund --loglevel=error
npm run --silent build
echo "built $(pwd)/build/acme_th8.wasm"
