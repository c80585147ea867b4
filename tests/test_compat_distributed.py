"""Quantize dropout under a process group (2 CPU processes, gloo): every rank drops the same
layers at every step, with one broadcast at the first step and no collective after it."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from test_distributed import WORLD, run_ranks

STEPS = 6
# ~40 s on 2 cores, most of it spawning two processes that import torch and vqkern.
pytestmark = pytest.mark.slow


def _worker(rank, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from vqkern import distributed
        from vqkern.compat import GroupedResidualVQ, ResidualVQ

        broadcasts = []
        original = distributed.broadcast_

        def counted(*tensors, src=0):
            broadcasts.append(len(tensors))
            return original(*tensors, src=src)

        distributed.broadcast_ = counted
        torch.manual_seed(100 + rank)  # ranks draw different local randomness on purpose
        rvq = ResidualVQ(dim=8, num_quantizers=6, codebook_size=16, quantize_dropout=True,
                         quantize_dropout_multiple_of=2, sync_codebook=False)
        grvq = GroupedResidualVQ(dim=8, groups=2, num_quantizers=4, codebook_size=16, quantize_dropout=True,
                                 sync_codebook=False)
        kept, kept_grouped, counts = [], [], []
        for _ in range(STEPS):
            x = torch.randn(2, 5, 8)
            kept.append((rvq(x)[1][0, 0] >= 0).sum().item())
            kept_grouped.append((grvq(x)[1][:, 0, 0] >= 0).sum(-1).tolist())
            counts.append(len(broadcasts))
            if rank == 1:
                # A pass only this rank makes (evaluation, under no_grad): it must need no
                # collective, or the ranks would hang.
                rvq.eval(), grvq.eval()
                with torch.no_grad():
                    rvq(x), grvq(x)
                rvq.train(), grvq.train()
        torch.save(dict(kept=kept, kept_grouped=kept_grouped, counts=counts), os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, str(tmp_path_factory.mktemp("dist_dropout")))


def test_every_rank_drops_the_same_layers(results):
    assert results[0]["kept"] == results[1]["kept"]
    assert results[0]["kept_grouped"] == results[1]["kept_grouped"]
    assert len(set(results[0]["kept"])) > 1, "the dropout depth never changed"
    assert all(k % 2 == 0 for k in results[0]["kept"]), "depths must be multiples of quantize_dropout_multiple_of"
    # Grouped: one seed per step, the same depth for every group.
    assert all(len(set(groups)) == 1 for groups in results[0]["kept_grouped"])


def test_one_broadcast_per_module_then_none(results):
    # One broadcast for the ResidualVQ and one for the GroupedResidualVQ at the first
    # step; none afterwards, whatever one rank does alone.
    for r in results:
        assert r["counts"] == [2] * STEPS
