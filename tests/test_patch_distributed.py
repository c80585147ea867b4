"""vqkern.patch under a process group (2 CPU processes, gloo): a patched vector-quantize-pytorch
layer all-reduces the same EMA statistics as the library's, so both keep the same codebook on
every rank; with k-means and dead codes, every rank of the patched model holds one codebook."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from test_distributed import WORLD, run_ranks

pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is installed by requirements-test.txt")
# ~40 s on 2 cores, most of it spawning two processes that import torch, vqkern and the library.
pytestmark = pytest.mark.slow

STEPS = 4


def _worker(rank, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        import copy
        import warnings

        import vector_quantize_pytorch as vqp

        import vqkern

        out = {}
        for name, kw in (("ema", dict()), ("kmeans_dead_code", dict(kmeans_init=True, kmeans_iters=2,
                                                                     threshold_ema_dead_code=2))):
            torch.manual_seed(0)   # the same initial layer on both ranks
            ref = vqp.VectorQuantize(dim=8, codebook_size=16, **kw)
            assert ref._codebook.use_ddp, "sync_codebook defaults to True inside a process group"
            ours = copy.deepcopy(ref)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # the k-means draws caveat
                assert vqkern.patch(ours) == {"": "VectorQuantize"}
            g = torch.Generator().manual_seed(100 + rank)   # each rank its own rows, rank 1 fewer
            for step in range(STEPS):
                x = torch.randn(2, 6 if rank == 0 else 3, 8, generator=g)
                for module in (ref, ours):
                    torch.manual_seed(step)
                    module(x)
            out[name] = dict(ref=ref.state_dict(), ours=ours.state_dict())
        torch.save(out, os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, str(tmp_path_factory.mktemp("patch_dist")))


def test_ema_statistics_are_the_librarys(results):
    for rank in results:
        ref, ours = rank["ema"]["ref"], rank["ema"]["ours"]
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
    for key in results[0]["ema"]["ours"]:
        assert torch.equal(results[0]["ema"]["ours"][key], results[1]["ema"]["ours"][key]), key


def test_kmeans_and_dead_codes_give_one_codebook(results):
    a, b = results[0]["kmeans_dead_code"]["ours"], results[1]["kmeans_dead_code"]["ours"]
    assert bool(a["_codebook.initted"])
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs across ranks"
