#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels of the benchmark's peers that the GPU
# machine lacks (it has no package registry), for its Python 3.12 on manylinux x86-64.
# They go to .whl/ (git-ignored) and travel with the GPU call as `carry: [".whl"]`.
#
#   benchmarks/gpu/fetch_wheels.sh          # idempotent: keeps wheels already there
#   WITH_FAISS=1 benchmarks/gpu/fetch_wheels.sh   # faiss-cpu too (18 MiB; see below)
#
# The pinned list below is what the CPU test suite runs against. Each wheel's
# Requires-Dist (markers evaluated for CPython 3.12 on Linux x86-64, extras skipped)
# is followed: a requirement that is neither a wheel in .whl/ nor in ON_IMAGE is
# downloaded too (latest version), until nothing is missing. One version per name.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"

PINNED=(
  vector-quantize-pytorch==1.32.0
  einops==0.8.2              # also on the GPU image; carried for vector-quantize-pytorch's >=0.8.1
  einx==0.4.3
  loguru==0.7.3
  torch-einops-utils==0.2.0
  frozendict==2.5.1          # einx
  flash-kmeans==0.3.1
)
# faiss-cpu has no GPU index, so on the GPU machine the faiss provider only reports itself
# skipped: 18 of the 19 MiB of wheels for nothing, unless a CPU comparison there is wanted.
# (faiss-gpu has no wheel that travels.)
if [ "${WITH_FAISS:-0}" = 1 ]; then
  PINNED+=(faiss-cpu==1.15.1)
else
  rm -f "$DEST"/faiss_cpu-*.whl
fi
# Already on the GPU machine's image (the verify phase checks their versions there):
# never downloaded, so that the image's torch stack stays the one that runs.
ON_IMAGE="torch numpy triton sympy packaging tqdm typing-extensions filelock"

download() {  # download NAME[==VERSION]... for CPython 3.12, manylinux x86-64, no deps
  nice -n 19 "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "$@"
}

echo "== pinned wheels -> $DEST/"
download "${PINNED[@]}"

# Requirements of the wheels in .whl/ that neither .whl/ nor the image provide.
missing() {
  ON_IMAGE="$ON_IMAGE" "$PY" - "$DEST" <<'EOF'
import os, re, sys, zipfile
try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import Requirement

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
folder = sys.argv[1]
have = {}
for wheel in sorted(os.listdir(folder)):
    if wheel.endswith(".whl"):
        have.setdefault(norm(wheel.split("-")[0]), []).append(wheel)
dupes = {n: w for n, w in have.items() if len(w) > 1}
if dupes:
    sys.exit(f"two versions of one package in {folder}/ stop the install there: {dupes}")
on_image = set(norm(n) for n in os.environ["ON_IMAGE"].split())
need = set()
for name, (wheel,) in have.items():
    with zipfile.ZipFile(os.path.join(folder, wheel)) as z:
        meta = next(f for f in z.namelist() if f.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, another platform or another Python
            if norm(req.name) not in have and norm(req.name) not in on_image:
                need.add(str(req).split(";")[0].replace(" ", ""))
print(" ".join(sorted(need)))
EOF
}

for _ in 1 2 3 4 5; do
  need=$(missing)
  [ -z "$need" ] && break
  echo "== requirements not yet in $DEST/: $need"
  # shellcheck disable=SC2086  # one argument per requirement
  download $need
done
if [ -n "$(missing)" ]; then
  echo "fetch_wheels: still missing after 5 rounds: $(missing)" >&2
  exit 1
fi

echo "== $DEST/ (one version of each; Requires-Dist closed over; on the image: $ON_IMAGE)"
for w in "$DEST"/*.whl; do printf '%10d  %s\n' "$(stat -c %s "$w")" "$w"; done
du -ch "$DEST"/*.whl | tail -1
