"""The GPU benchmark grid: what a lent GPU must measure, in order of importance.

    python -m benchmarks.gpu_grid            # one line per item: number, name, estimate, what it shows
    python -m benchmarks.run --device cuda --item fwd-65536x16384x256-bf16

Each item is one ``benchmarks.run`` process (one shape, one dtype): the order is the
order of the GPU targets (benchmarks/NOTES.md), so a lease cut short
has measured the most important ones. ``est`` is the seconds one process takes:
``start`` (Python, torch, the floor rates) and each pass (every provider built,
its codes checked, warmed up, its memory measured and 3 rounds timed; a new
Triton specialization compiles and autotunes on the first call). They were written
before any GPU run, from the CPU dry run and the compile times of a local build:
replace them with the times the GPU session's summary prints. No torch import here:
benchmarks/gpu/session.sh reads this list in a fraction of a second.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

VQKERN = ("vqkern-cuda", "vqkern-triton")
DET = ("vqkern-cuda-det", "vqkern-triton-det")


@dataclass(frozen=True)
class Item:
    name: str
    shape: tuple[int, int, int]
    dtype: str
    passes: tuple[str, ...]
    providers: tuple[str, ...]
    est: dict = field(default_factory=dict)
    target: str = ""
    data: str = "randn"

    def seconds(self) -> int:
        """The estimate of the whole process."""
        return int(sum(self.est.values()))


GPU_GRID = [
    Item("fwd-65536x16384x256-bf16", (65536, 16384, 256), "bf16", ("forward", "backward", "train"),
         VQKERN + DET + ("gemm", "expansion", "flash-kmeans", "vqpt-eval", "vqpt-train-beta"),
         {"start": 20, "forward": 40, "backward": 25, "train": 25},
         "forward >= 70% of the bf16 matmul floor and faster than z @ E.T; backward >= 70% of the copy floor, "
         "deterministic within 1.5x of atomic; >= 1.5x flash-kmeans, >= 20x vector-quantize-pytorch (train)"),
    Item("fwd-65536x262144x64-bf16", (65536, 262144, 64), "bf16", ("forward",),
         VQKERN + ("gemm", "expansion", "flash-kmeans"), {"start": 20, "forward": 45},
         "forward >= 70% of the bf16 matmul floor and faster than z @ E.T at a huge codebook"),
    Item("fwd-65536x16384x256-fp32", (65536, 16384, 256), "fp32", ("forward",),
         VQKERN + ("vqkern-triton-tf32x3", "expansion", "gemm"), {"start": 25, "forward": 55},
         "an fp32 mode with the fp32 reference's codes, >= 3x faster than the fp32 expansion + argmin"),
    Item("splitk-256x1048576x256-bf16", (256, 1048576, 256), "bf16", ("forward", "backward"),
         VQKERN + ("gemm", "expansion", "flash-kmeans"), {"start": 20, "forward": 40, "backward": 15},
         "split-K: >= 60% of the copy bandwidth for reading the codebook"),
    Item("smalld-1048576x65536x8-bf16", (1048576, 65536, 8), "bf16", ("forward",),
         VQKERN + ("gemm", "flash-kmeans"), {"start": 20, "forward": 45},
         "small D: within 1.5x of the compare-and-select cost model, >= 1.5x faster than flash-kmeans"),
    Item("onecode-65536x16384x256-bf16", (65536, 16384, 256), "bf16", ("backward", "train"),
         VQKERN + DET, {"start": 20, "backward": 20, "train": 15},
         "backward with every row on one code: deterministic within 1.5x of atomic", data="one-code"),
    Item("peers-65536x65536x64-bf16", (65536, 65536, 64), "bf16", ("forward", "train"),
         VQKERN + ("gemm", "expansion", "flash-kmeans", "vqpt-eval", "vqpt-train-beta"),
         {"start": 20, "forward": 35, "train": 20}, "peers at the runner's other shapes"),
    Item("peers-65536x4096x64-bf16", (65536, 4096, 64), "bf16", ("forward", "train"),
         VQKERN + ("gemm", "expansion", "flash-kmeans", "vqpt-eval", "vqpt-train-beta"),
         {"start": 20, "forward": 35, "train": 20}, "peers at the runner's other shapes"),
    Item("peers-16384x1024x64-bf16", (16384, 1024, 64), "bf16", ("forward", "train"),
         VQKERN + ("gemm", "expansion", "flash-kmeans", "vqpt-eval", "vqpt-train-beta"),
         {"start": 20, "forward": 35, "train": 20}, "peers at the runner's other shapes"),
]
GRID = {item.name: item for item in GPU_GRID}


def find(key: str) -> Item:
    """An item by its name or its 1-based place in the grid."""
    if key.isdigit() and 1 <= int(key) <= len(GPU_GRID):
        return GPU_GRID[int(key) - 1]
    if key in GRID:
        return GRID[key]
    raise KeyError(f"no GPU grid item {key!r}: 1 to {len(GPU_GRID)} or one of {', '.join(GRID)}")


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    items = GPU_GRID if not args else [find(a) for a in args]
    for item in items:
        print(f"{GPU_GRID.index(item) + 1} {item.name} {item.seconds()} {item.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
