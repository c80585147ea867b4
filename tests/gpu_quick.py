"""VQKERN_GPU_QUICK=1: the fewest parametrized cases that still reach every kernel path.

A GPU lease is short (benchmarks/gpu/README.md) and on a GPU most of a test's time
is Triton compiling and autotuning a new specialization, so the GPU session runs
each parametrized test on a covering subset of its grid instead of the full grid:

- every value of every parameter appears in at least one kept case (each dtype,
  each shape, each split count: a greedy set cover picks the fewest cases);
- the names of one ``parametrize`` ("z_dtype,cb_dtype", "n,k,d") form one axis,
  so a mixed-dtype pair or a shape is kept whole, never split into its parts;
- the backend and the boolean parameters (deterministic, tensor_cores, ema, ...)
  are modes, not values: the cover is taken separately for each combination of
  them, so every backend meets every dtype and a deterministic case is kept for
  each shape that has one;
- a test with one parameter keeps all its cases (a fuzz test's seeds, say);
- the tests in QUICK_SKIP are deselected, each with its reason.

The rule reads only the parameters pytest collected, so it needs no list of test
names or ids and stays right when tests are added or renamed.
"""
from __future__ import annotations

import os

ENV = "VQKERN_GPU_QUICK"

# Deselected under VQKERN_GPU_QUICK=1, with the reason (matched on the function name).
QUICK_SKIP = {
    "test_kernels_compile_for_sm90": "compiles every Triton kernel for sm_90 on the CPU (about 70 s); "
                                     "the GPU run compiles and runs them for real",
}


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


# Parameters crossed with everything else whatever their values.
MODE_NAMES = ("backend",)


def _key(value) -> str:
    return repr(value)


def _is_mode(axis, cases) -> bool:
    names = axis if isinstance(axis, tuple) else (axis,)
    if any(n in MODE_NAMES for n in names):
        return True
    return all(isinstance(v, bool) for c in cases
               for v in (c.get(axis) if isinstance(axis, tuple) else (c.get(axis),)))


def covering_subset(cases: list[dict]) -> list[int]:
    """Indices (in order) of a small subset of ``cases`` (each a dict axis -> value,
    where an axis is a parameter name or a tuple of the names of one parametrize)
    in which every (axis, value) occurs, the mode axes crossed."""
    if not cases:
        return []
    names = list(cases[0])
    modes = [n for n in names if _is_mode(n, cases)]
    groups: dict[tuple, list[int]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(tuple(case.get(m) for m in modes), []).append(i)
    keep: list[int] = []
    for members in groups.values():
        cover = {i: {(n, _key(v)) for n, v in cases[i].items() if n not in modes} for i in members}
        todo = set().union(*cover.values())
        if not todo:  # only boolean parameters: one case per combination
            keep.append(members[0])
        while todo:
            # The case that covers the most values not yet covered; ties to the first.
            best = max(members, key=lambda i: (len(cover[i] & todo), -i))
            keep.append(best)
            todo -= cover[best]
    return sorted(set(keep))


def _axes(item) -> dict:
    """The item's parameters as {axis: value}: the names of one parametrize mark together."""
    params = dict(item.callspec.params)
    out = {}
    for mark in item.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        names = tuple(n for n in names if n in params)
        if names:
            out[names if len(names) > 1 else names[0]] = tuple(params.pop(n) for n in names) \
                if len(names) > 1 else params.pop(names[0])
    out.update(params)  # parametrized fixtures and generated parameters: one axis each
    return out


def select(items) -> tuple[list, list, dict]:
    """(kept items, deselected items, counts) for pytest's collection hook."""
    groups: dict[tuple, list] = {}
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is not None and spec.params:
            groups.setdefault((str(item.path), getattr(item, "originalname", item.name)), []).append(item)
    drop = set()
    for members in groups.values():
        chosen = set(covering_subset([_axes(m) for m in members]))
        drop.update(id(m) for i, m in enumerate(members) if i not in chosen)
    skipped = 0
    for item in items:
        if getattr(item, "originalname", item.name) in QUICK_SKIP and id(item) not in drop:
            drop.add(id(item))
            skipped += 1
    kept = [i for i in items if id(i) not in drop]
    gone = [i for i in items if id(i) in drop]
    counts = {"parametrized": sum(len(m) for m in groups.values()),
              "reduced": len(gone) - skipped, "skipped": skipped}
    return kept, gone, counts


def report_line(counts: dict) -> str:
    kept = counts["parametrized"] - counts["reduced"]
    line = (f"{ENV}=1: {kept} of {counts['parametrized']} parametrized cases kept (every value of every "
            f"parameter at least once; backends and boolean modes crossed)")
    if counts["skipped"]:
        line += f"; {counts['skipped']} left out by name ({', '.join(QUICK_SKIP)})"
    return line
