"""Two CPU processes with gloo: codebooks stay identical across ranks and match one process on the union.

One spawn (two ranks) runs every scenario in turn and saves what it saw; the
tests below check those results against single-process runs on the union of
both ranks' data.
"""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import vqkern
from vqkern import distributed
from vqkern.compat import VectorQuantize
from vqkern.kmeans import kmeans

WORLD = 2
DDP_STEPS = 4
# rows each rank sees at each step of the ragged scenario: none anywhere, one rank
# empty, fewer rows than codes, very unequal counts.
RAGGED_ROWS = [(0, 0), (0, 7), (5, 0), (30, 1), (2, 40), (0, 3)]


def ddp_batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, 12, 8, generator=g) + rank  # different data on each rank


def ragged_batch(step, rank):
    g = torch.Generator().manual_seed(5000 + 1000 * step + rank)
    return torch.randn(1, RAGGED_ROWS[step][rank], 6, generator=g) * (1 + rank)


def kmeans_rows(rank):
    g = torch.Generator().manual_seed(77 + rank)
    return torch.randn(40 + 25 * rank, 5, generator=g) + 3 * rank


def make_ddp_model():
    torch.manual_seed(0)
    return VectorQuantize(dim=8, codebook_size=16, codebook_dim=4, decay=0.9)


def train_ddp_style(model, batches, optimizer_params):
    opt = torch.optim.SGD(optimizer_params, lr=0.1)
    for x in batches:
        quantized, _, loss = model(x)
        (F.mse_loss(quantized, x) + loss).backward()
        opt.step()
        opt.zero_grad()


def _scenarios(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    # 1. DDP, equal row counts, EMA codebook: comparable with one process on the union.
    model = make_ddp_model()
    out["ddp_sync_flag"] = model._codebook.use_ddp
    ddp = DDP(model)
    train_ddp_style(ddp, [ddp_batch(s, rank) for s in range(DDP_STEPS)], ddp.parameters())
    out["ddp"] = {k: v.clone() for k, v in model.state_dict().items()}

    # 2. Ragged and empty batches with k-means init, dead-code re-seeding and
    # separate codebooks: every rank must make the same collective calls.
    torch.manual_seed(10 + rank)  # ranks draw different local randomness on purpose
    vq = VectorQuantize(dim=6, codebook_size=12, codebook_dim=3, heads=2, separate_codebook_per_head=True,
                        kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=3, decay=0.8, sync_codebook=True)
    vq.train()
    initted = []
    for step in range(len(RAGGED_ROWS)):
        vq(ragged_batch(step, rank))
        initted.append(bool(vq._codebook.initted))
    out["ragged"] = {k: v.clone() for k, v in vq.state_dict().items()}
    out["ragged_initted"] = initted

    # 3. k-means on the union from the same initial centroids, and from drawn seeds.
    x = kmeans_rows(rank)
    init = torch.linspace(-2, 5, 6 * 5).reshape(6, 5)
    out["kmeans_init"] = kmeans(x, 6, 5, init=init, sync=True)
    torch.manual_seed(rank)
    out["kmeans_drawn"] = kmeans(x, 6, 5, sync=True)
    out["kmeans_empty_rank"] = kmeans(x if rank == 1 else x[:0], 6, 3, init=init, sync=True)

    # 4. Row sampling from the union: rows tagged (rank, position).
    n = (3, 9)[rank]
    tagged = torch.stack([torch.full((n,), float(rank)), torch.arange(n, dtype=torch.float32)], dim=1)
    torch.manual_seed(rank)
    out["sample_rows"] = [distributed.sample_rows(tagged, 8), distributed.sample_rows(tagged, 20),
                          distributed.sample_rows(tagged, 20, allow_duplicates=True),
                          distributed.sample_rows(tagged if rank == 1 else tagged[:0], 4)]

    # 5. The core layer's EMA statistics go through the same all-reduce.
    torch.manual_seed(0)
    core = vqkern.VectorQuantizer(16, 8, ema=True, decay=0.9)
    for step in range(3):
        core(ddp_batch(step, rank).reshape(-1, 8))
    out["core"] = {k: v.clone() for k, v in core.state_dict().items()}

    # 6. The core layer with dead-code re-seeding on ragged and empty batches (rank 0
    # empty while rank 1 has rows, and the reverse), then a NaN on one rank only.
    torch.manual_seed(20 + rank)  # ranks draw different local randomness on purpose
    core = vqkern.VectorQuantizer(12, 6, ema=True, decay=0.5, dead_code_threshold=0.9)
    core.load_state_dict(core_start_state())
    for step in range(len(RAGGED_ROWS)):
        core(ragged_batch(step, rank)[0])
    out["core_ragged"] = {k: v.clone() for k, v in core.state_dict().items()}
    z = ddp_batch(9, rank).reshape(-1, 8)[:, :6]
    if rank == 1:
        z[3, 2] = float("nan")
    out["core_nan_loss"] = core(z).loss
    out["core_after_nan"] = {k: v.clone() for k, v in core.state_dict().items()}

    # 7. The core layer's k-means init over two batches on ragged and empty batches:
    # ranks draw different local randomness, except rank 0, whose draw is the seeds.
    core = vqkern.VectorQuantizer(KMEANS_INIT_K, 5, init="kmeans", kmeans_iters=4, kmeans_batches=2)
    core.load_state_dict(kmeans_init_start_state())
    torch.manual_seed(KMEANS_INIT_SEED if rank == 0 else 99)
    initted = []
    for step in range(len(KMEANS_INIT_ROWS)):
        core(kmeans_init_batch(step, rank))
        initted.append(bool(core.initted))
    out["core_kmeans"] = {k: v.clone() for k, v in core.state_dict().items()}
    out["core_kmeans_initted"] = initted
    return out


KMEANS_INIT_SEED, KMEANS_INIT_K = 31, 6
# rows per rank and step: none anywhere (not counted), one rank empty, both with rows
# (the second k-means batch: the init runs here), then a batch after the init.
KMEANS_INIT_ROWS = [(0, 0), (0, 7), (5, 9), (4, 4)]


def kmeans_init_batch(step, rank):
    g = torch.Generator().manual_seed(9000 + 100 * step + rank)
    return torch.randn(KMEANS_INIT_ROWS[step][rank], 5, generator=g) + 2 * rank


def kmeans_init_start_state():
    torch.manual_seed(0)
    return vqkern.VectorQuantizer(KMEANS_INIT_K, 5, init="kmeans", kmeans_iters=4, kmeans_batches=2).state_dict()


def core_start_state():
    torch.manual_seed(0)
    start = vqkern.VectorQuantizer(12, 6, ema=True, decay=0.5, dead_code_threshold=0.9)
    with torch.no_grad():
        start.codebook[6:] = 1e3  # unreachable: re-seeded from the rows of whichever ranks have some
        start.embed_avg.copy_(start.codebook)
    return start.state_dict()


def _worker(rank, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_scenarios(rank), os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, path: str, timeout_s: float = 180):
    """Spawn WORLD gloo processes of ``worker(rank, port, path)``, fail the test if they hang,
    and return what each saved as ``path/rank{r}.pt``."""
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.start_processes(worker, args=(_free_port(), path), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail(f"distributed workers did not finish in {timeout_s:.0f} s (a collective hung)")
    return [torch.load(os.path.join(path, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, str(tmp_path_factory.mktemp("dist")))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs across ranks"


def test_ddp_codebooks_identical_across_ranks(results):
    assert results[0]["ddp_sync_flag"] and results[1]["ddp_sync_flag"]
    assert_bitwise_equal(results[0]["ddp"], results[1]["ddp"])


def test_ddp_matches_single_process_on_union(results):
    model = make_ddp_model()
    assert not model._codebook.use_ddp
    batches = [torch.cat([ddp_batch(s, r) for r in range(WORLD)]) for s in range(DDP_STEPS)]
    train_ddp_style(model, batches, model.parameters())
    single = model.state_dict()
    for key, value in results[0]["ddp"].items():
        torch.testing.assert_close(value, single[key], atol=1e-5, rtol=1e-4, msg=key)
    # and the statistics really were summed over ranks: one rank alone gives something else
    alone = make_ddp_model()
    train_ddp_style(alone, [ddp_batch(s, 0) for s in range(DDP_STEPS)], alone.parameters())
    assert (alone.state_dict()["_codebook.cluster_size"] - single["_codebook.cluster_size"]).abs().max() > 0.1


def test_ragged_and_empty_batches_keep_ranks_identical(results):
    assert_bitwise_equal(results[0]["ragged"], results[1]["ragged"])
    # no rows anywhere at step 0: k-means waits; rank 1's rows alone seed it at step 1
    assert results[0]["ragged_initted"] == results[1]["ragged_initted"] == [False] + [True] * (len(RAGGED_ROWS) - 1)
    assert torch.isfinite(results[0]["ragged"]["_codebook.embed"]).all()


def test_distributed_kmeans_equals_kmeans_on_union(results):
    union = torch.cat([kmeans_rows(r) for r in range(WORLD)])
    init = torch.linspace(-2, 5, 6 * 5).reshape(6, 5)
    single = kmeans(union, 6, 5, init=init)
    for key in ("kmeans_init", "kmeans_drawn", "kmeans_empty_rank"):
        assert torch.equal(results[0][key].centroids, results[1][key].centroids), key
        assert torch.equal(results[0][key].counts, results[1][key].counts), key
    assert torch.equal(results[0]["kmeans_init"].counts, single.counts)
    torch.testing.assert_close(results[0]["kmeans_init"].centroids, single.centroids, atol=1e-5, rtol=1e-5)
    assert results[0]["kmeans_drawn"].counts.sum() == union.shape[0]
    only_rank1 = kmeans(kmeans_rows(1), 6, 3, init=init)
    torch.testing.assert_close(results[0]["kmeans_empty_rank"].centroids, only_rank1.centroids)


def test_sample_rows_draws_from_the_union(results):
    union = {(0.0, float(i)) for i in range(3)} | {(1.0, float(i)) for i in range(9)}
    r0, r1 = results[0]["sample_rows"], results[1]["sample_rows"]
    for a, b in zip(r0, r1):
        assert torch.equal(a, b)
    eight, capped, duplicated, empty = r0
    rows = [tuple(r) for r in eight.tolist()]
    assert len(rows) == 8 and len(set(rows)) == 8 and set(rows) <= union
    assert {tuple(r) for r in capped.tolist()} == union and capped.shape[0] == 12
    assert duplicated.shape[0] == 20 and {tuple(r) for r in duplicated.tolist()} <= union
    assert empty.shape[0] == 4 and all(r[0] == 1.0 for r in empty.tolist())  # only rank 1 had rows


def test_core_vector_quantizer_ema_is_all_reduced(results):
    assert_bitwise_equal(results[0]["core"], results[1]["core"])


def test_core_vector_quantizer_reseeds_on_ragged_batches_without_hanging(results):
    assert_bitwise_equal(results[0]["core_ragged"], results[1]["core_ragged"])
    codebook = results[0]["core_ragged"]["codebook"]
    assert torch.isfinite(codebook).all() and codebook.abs().max() < 100, "dead codes were not re-seeded"


def test_core_vector_quantizer_nan_on_one_rank_leaves_every_rank_unchanged(results):
    # Rank 1's NaN reaches rank 0 through the all-reduced sums: both ranks must skip.
    assert torch.isnan(results[1]["core_nan_loss"])
    for r in range(WORLD):
        assert_bitwise_equal(results[r]["core_after_nan"], results[r]["core_ragged"])


def test_core_kmeans_init_is_identical_across_ranks_and_clusters_the_union(results):
    assert_bitwise_equal(results[0]["core_kmeans"], results[1]["core_kmeans"])
    # the step without rows anywhere is not counted: the init runs at the third step
    assert results[0]["core_kmeans_initted"] == results[1]["core_kmeans_initted"] == [False, False, True, True]
    # the union in rank order, each rank's gathered batches in step order
    union = torch.cat([kmeans_init_batch(s, r) for r in range(WORLD) for s in (1, 2)])
    torch.manual_seed(KMEANS_INIT_SEED)
    want = kmeans(union, KMEANS_INIT_K, 4)
    torch.testing.assert_close(results[0]["core_kmeans"]["codebook"], want.centroids, atol=1e-5, rtol=1e-5)
    # usage: the k-means counts per gathered batch, then the EMA steps of the init batch and the next
    size = (want.counts / 2).clamp(min=1)
    for step in (2, 3):
        size = 0.99 * size + 0.01 * _union_counts(step, want.centroids)
    torch.testing.assert_close(results[0]["core_kmeans"]["cluster_size"], size, atol=1e-5, rtol=1e-5)


def _union_counts(step, centroids):
    """Code counts (K,) float32 of both ranks' rows at ``step`` under ``centroids``."""
    rows = torch.cat([kmeans_init_batch(step, r) for r in range(WORLD)])
    return torch.bincount(vqkern.reference.nearest_code(rows, centroids), minlength=KMEANS_INIT_K).float()


def test_helpers_are_local_outside_a_process_group():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.rank() == 0
    t = torch.ones(3)
    distributed.all_reduce_(t)
    distributed.broadcast_(t)
    assert torch.equal(t, torch.ones(3))
    assert distributed.gather_sizes(5, "cpu") == [5]
    x = torch.randn(4, 2)
    assert distributed.sample_rows(x, 10).shape == (4, 2)
    assert distributed.sample_rows(x, 10, allow_duplicates=True).shape == (10, 2)
    with pytest.raises(ValueError, match="num"):
        distributed.sample_rows(x, -1)
