"""Checks of vqkern's backends against fp64 plain PyTorch.

- ``policy``: the precision policy's bounds and the fp64 distances;
- ``oracle``: the checks of a search, a gradient and a segment sum;
- ``fuzz``: the seeded fuzz battery of the public API (tests/test_fuzz.py, the CLI);
- ``selfcheck``: the battery each backend passes before it serves a key (``vqkern.backends.resolve``);
- ``cli``: ``python -m vqkern.check`` / ``vqkern-check``, every backend of the machine, a table and a verdict.
"""
