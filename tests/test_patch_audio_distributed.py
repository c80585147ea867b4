"""encodec's and moshi's quantizers under a process group (2 CPU processes, gloo), patched and
not: the same steps on every rank, so the patched layers make the syncs the libraries make
(encodec: rank 0's buffers broadcast after k-means and code expiry; moshi: k-means over every
rank's rows, buffers broadcast, EMA statistics averaged across ranks)."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from test_distributed import WORLD, run_ranks

STEPS = 3
# ~30 s on 2 cores, most of it spawning two processes that import torch, vqkern and the libraries.


def _batches(rank, shape):
    g = torch.Generator().manual_seed(100 + rank)  # different rows on each rank
    return [torch.randn(*shape, generator=g) * (1 + rank) for _ in range(STEPS)]


def _worker(rank, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        import vqkern

        from patch_audio_helpers import train
        from test_patch_encodec_moshi import call_encodec, call_moshi, encodec_rvq, moshi_rvq

        torch.set_num_threads(1)
        out = {}
        for name, build, call in (("encodec", encodec_rvq, call_encodec), ("moshi", moshi_rvq, call_moshi)):
            for patched in (False, True):
                model = build()  # seeded: the same weights on every rank
                if patched:
                    vqkern.patch(model)
                # ranks draw different local randomness on purpose: only rank 0's draws may count
                torch.manual_seed(10 + rank)
                out[name, patched] = train(model, _batches(rank, (4, 16, 30)), call)
        torch.save(out, os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, str(tmp_path_factory.mktemp("dist_patch_audio")))


@pytest.mark.parametrize("name", ["encodec", "moshi"])
def test_patched_steps_match_on_every_rank(results, name):
    """Each rank's patched steps match its unpatched ones: rank 1 quantizes with rank 0's
    k-means codebook (encodec's broadcast; moshi's k-means of the union on rank 0) and
    draws nothing of its own for it. (Leaving out encodec's broadcast, or clustering only
    each rank's rows for moshi, fails this.)"""
    from patch_audio_helpers import assert_same_training

    for rank in range(WORLD):
        assert_same_training(results[rank][name, True], results[rank][name, False])


def test_moshi_buffers_identical_across_ranks(results):
    """moshi averages every codebook's EMA buffers across ranks at each training step."""
    for step in range(STEPS):
        a, b = (results[rank]["moshi", True][step]["state"] for rank in range(WORLD))
        for key in a:
            if key.endswith(("cluster_usage", "embedding_sum", "_initialized")):
                assert torch.equal(a[key], b[key]), f"step {step}: {key} differs across ranks"
