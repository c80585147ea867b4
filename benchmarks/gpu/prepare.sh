#!/usr/bin/env bash
# Run here, right before each GPU `run` call: everything the GPU machine needs and
# cannot fetch, in two git-ignored folders that the call carries.
#   .whl/      the peers' wheels (fetch_wheels.sh; kept when already there)
#   .gpudata/  fashion-mnist/: Fashion-MNIST's first TRAIN_IMAGES training images and
#              its 10000 test images as gzipped IDX files (vqkern/train/data.py reads them);
#              source.txt: the commit under test, since the copy sent there may lack .git
# Then it prints what travels, which must stay under the 64 MiB a call may carry.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
TRAIN_IMAGES=${TRAIN_IMAGES:-20000}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}

bash benchmarks/gpu/fetch_wheels.sh

mkdir -p .gpudata
if [ -s .gpudata/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "== .gpudata/fashion-mnist/ already there"
elif [ -d "$FMNIST" ]; then
  echo "== .gpudata/fashion-mnist/: $TRAIN_IMAGES training images and the test set from $FMNIST"
  mkdir -p .gpudata/fashion-mnist
  nice -n 19 "$PY" - "$FMNIST" .gpudata/fashion-mnist "$TRAIN_IMAGES" <<'EOF'
import gzip, struct, sys
from pathlib import Path

src, dst, keep = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for name, limit in (("train-images-idx3-ubyte", keep), ("t10k-images-idx3-ubyte", None)):
    path = src / name if (src / name).exists() else src / f"{name}.gz"
    raw = path.read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    magic, n, rows, cols = struct.unpack(">4I", raw[:16])
    n = n if limit is None else min(n, limit)
    body = raw[16:16 + n * rows * cols]
    with gzip.GzipFile(dst / f"{name}.gz", "wb", compresslevel=9, mtime=0) as f:
        f.write(struct.pack(">4I", magic, n, rows, cols) + body)
    print(f"   {name}.gz: {n} images of {rows}x{cols}")
EOF
else
  echo "== no Fashion-MNIST at $FMNIST: the train phase will report it missing"
fi

{
  echo "commit $(git rev-parse HEAD)"
  echo "dirty $(git status --porcelain --untracked-files=no | wc -l)"
  echo "diff-sha256 $(git diff HEAD | sha256sum | cut -d' ' -f1)"
  echo "stamped $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >.gpudata/source.txt
echo "== .gpudata/source.txt"; sed 's/^/   /' .gpudata/source.txt

tree_bytes=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carry_bytes=$(du -sb .whl .gpudata | awk '{s += $1} END {print s}')
total=$((tree_bytes + carry_bytes))
echo "== what travels: tree $((tree_bytes / 1024)) KiB + .whl and .gpudata $((carry_bytes / 1024)) KiB" \
     "= $((total / 1048576)) MiB of the 64 MiB limit"
if [ "$total" -gt $((56 * 1048576)) ]; then
  echo "prepare: over 56 MiB, too close to the limit: carry fewer images (TRAIN_IMAGES) or wheels" >&2
  exit 1
fi
