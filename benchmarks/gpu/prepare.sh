#!/usr/bin/env bash
# Run here, in the checkout that the `run` tool sends (the session's own checkout), right
# before the first GPU call: everything the GPU machine needs and cannot fetch, in two
# git-ignored folders that the call carries, then a check that what travels fits.
#   .whl/      the peers' wheels (fetch_wheels.sh; kept when already there). WITH_FAISS=1
#              adds faiss-cpu (18 MiB, no GPU index: off by default)
#   .gpudata/  source.txt: the commit under test, since the copy sent there may lack .git;
#              with WITH_TRAIN_DATA=1 also fashion-mnist/: Fashion-MNIST's first TRAIN_IMAGES
#              training images and its 10000 test images as gzipped IDX files (12.5 MiB, for
#              the train step only; removed otherwise, so it does not travel for nothing)
# What travels (the `run` tool's rule): tracked files, untracked files that git does not
# ignore, shared/ when the checkout has one, and the carried paths; at most 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
TRAIN_IMAGES=${TRAIN_IMAGES:-20000}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
LIMIT_MIB=${LIMIT_MIB:-60}   # of the tool's 64: the margin covers files written after this check

bash benchmarks/gpu/fetch_wheels.sh

mkdir -p .gpudata
if [ "${WITH_TRAIN_DATA:-0}" != 1 ]; then
  rm -rf .gpudata/fashion-mnist
  echo "== .gpudata/fashion-mnist/: not carried (WITH_TRAIN_DATA=1 for the train step)"
elif [ -s .gpudata/fashion-mnist/train-images-idx3-ubyte.gz ]; then
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
  echo "== no Fashion-MNIST at $FMNIST: the train step will report it missing"
fi

{
  echo "commit $(git rev-parse HEAD)"
  echo "dirty $(git status --porcelain --untracked-files=no | wc -l)"
  echo "diff-sha256 $(git diff HEAD | sha256sum | cut -d' ' -f1)"
  echo "stamped $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >.gpudata/source.txt
echo "== .gpudata/source.txt"; sed 's/^/   /' .gpudata/source.txt

# Every file that travels, with its size: the tree as git sees it, shared/, the carry.
listing=$(mktemp)
trap 'rm -f "$listing"' EXIT
{
  git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c '%s %n' 2>/dev/null || true
  [ -d shared ] && find shared -type f -printf '%s %p\n'
  find .whl .gpudata -type f -printf '%s %p\n'
} | sort -rn >"$listing"
total=$(awk '{s += $1} END {print s + 0}' "$listing")
carry=$(grep -E ' \.(whl|gpudata)/' "$listing" | awk '{s += $1} END {print s + 0}')
echo "== what travels: $((total / 1024)) KiB = $((total / 1048576)) MiB of the 64 MiB limit" \
     "(carry .whl + .gpudata $((carry / 1024)) KiB, the rest the tree); largest:"
head -n 5 "$listing" | awk '{printf "   %8d KiB  %s\n", $1 / 1024, $2}'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "prepare: over ${LIMIT_MIB} MiB, too close to the 64 MiB limit: leave out WITH_FAISS/WITH_TRAIN_DATA," \
       "fewer TRAIN_IMAGES, or commit/ignore the large untracked files above" >&2
  exit 1
fi
