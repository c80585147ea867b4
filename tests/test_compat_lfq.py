"""vqkern.compat's LFQ family against vector-quantize-pytorch: outputs, indices, every loss
term, gradients, state_dict keys and checkpoints both ways, masks, multiple codebooks,
residual and grouped stacks, quantize dropout."""
import pytest
import torch
from torch import nn

from vqkern.compat import LFQ, GroupedResidualLFQ, ResidualLFQ

vqp = pytest.importorskip("vector_quantize_pytorch")

# (constructor options, input layout)
OPTIONS = {
    "default": (dict(codebook_size=2 ** 8, dim=8), "seq"),
    "projected": (dict(codebook_size=2 ** 6, dim=10), "seq"),
    "codebooks_commit": (dict(codebook_size=2 ** 5, dim=16, num_codebooks=2, commitment_loss_weight=0.25), "seq"),
    "spherical_scale": (dict(codebook_size=2 ** 10, dim=10, spherical=True, codebook_scale=0.5), "seq"),
    "cosine_project_clamp_softplus": (dict(codebook_size=2 ** 5, dim=12, cosine_sim_project_in=True,
                                           soft_clamp_input_value=2.0, experimental_softplus_entropy_loss=True), "seq"),
    "rotation_no_bias": (dict(codebook_size=2 ** 6, dim=9, orthogonal_rotation=True, projection_has_bias=False), "seq"),
    "gamma_weights": (dict(codebook_size=2 ** 7, dim=7, diversity_gamma=0.5, entropy_loss_weight=0.3,
                           commitment_loss_weight=1.0), "seq"),
    "activation": (dict(codebook_size=2 ** 6, dim=6, straight_through_activation=nn.Tanh()), "seq"),
    "keep_dim_one_codebook": (dict(codebook_size=2 ** 4, dim=4, keep_num_codebooks_dim=True), "seq"),
    "image": (dict(codebook_size=2 ** 6, dim=6), "image"),
    "video_codebooks": (dict(codebook_size=2 ** 4, dim=8, num_codebooks=2), "video"),
    "channel_first_seq": (dict(codebook_size=2 ** 6, dim=6, channel_first=True), "channel_first"),
    "not_f32": (dict(codebook_size=2 ** 6, dim=6, force_quantization_f32=False), "seq"),
}


def make_pair(cls_ref, cls_ours, **kw):
    torch.manual_seed(1)
    ref = cls_ref(**kw)
    torch.manual_seed(1)
    ours = cls_ours(**kw)
    assert list(ref.state_dict()) == list(ours.state_dict())
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_input(dim, layout, seed, batch=3, n=10):
    g = torch.Generator().manual_seed(seed)
    shape = {"seq": (batch, n, dim), "image": (batch, dim, 2, n // 2), "video": (batch, dim, 2, 2, 3),
             "channel_first": (batch, dim, n)}[layout]
    return torch.randn(shape, generator=g)


def run(module, x, seed, **forward):
    xx = x.clone().requires_grad_()
    torch.manual_seed(seed)
    if isinstance(module, (LFQ, vqp.LFQ)):
        out = module(xx, return_loss_breakdown=True, **forward)
    else:
        out = module(xx, **forward)
    if isinstance(out[0], tuple):
        (quantized, indices, loss), breakdown = out
    else:
        (quantized, indices, loss), breakdown = out[:3], None
    w = torch.linspace(-1, 1, quantized.numel()).reshape(quantized.shape)
    ((quantized * w).sum() + loss.sum()).backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return quantized.detach(), indices, loss.detach(), breakdown, xx.grad, grads


def assert_same(ref_out, our_out):
    q1, i1, l1, b1, g1, p1 = ref_out
    q2, i2, l2, b2, g2, p2 = our_out
    assert i1.dtype == i2.dtype and i1.shape == i2.shape and torch.equal(i1, i2)
    assert q1.dtype == q2.dtype and q1.shape == q2.shape
    torch.testing.assert_close(q2, q1, rtol=1e-5, atol=1e-6)
    assert l1.dtype == l2.dtype and l1.shape == l2.shape
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    if b1 is not None:
        for name, a, b in zip(b1._fields, b1, b2):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6, msg=name)
    scale = g1.abs().max().item()
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5 * scale)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * max(1e-3, a.abs().max().item()))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_lfq_matches_vector_quantize_pytorch(name):
    kw, layout = OPTIONS[name]
    ref, ours = make_pair(vqp.LFQ, LFQ, **kw)
    masks = [None]
    if layout == "seq":
        masks += [torch.tensor([True, False, True]),
                  torch.rand(3, 10, generator=torch.Generator().manual_seed(7)) > 0.3]
    for step, mask in enumerate(masks):
        x = make_input(kw["dim"], layout, seed=step)
        for inv_t in (100.0, 3.0):
            assert_same(run(ref, x, step, mask=mask, inv_temperature=inv_t),
                        run(ours, x, step, mask=mask, inv_temperature=inv_t))
    ref.eval(), ours.eval()
    x = make_input(kw["dim"], layout, seed=9)
    (q1, i1, l1), (q2, i2, l2) = ref(x), ours(x)
    assert torch.equal(i1, i2) and torch.equal(q1, q2) and float(l1) == float(l2) == 0.0
    assert (ours.indices_to_codes(i2) == q2).all()
    torch.testing.assert_close(ours.indices_to_codes(i2, project_out=False),
                               ref.indices_to_codes(i1, project_out=False))


def test_frac_per_sample_entropy_draws_the_same_rows():
    kw = dict(codebook_size=2 ** 8, dim=8, frac_per_sample_entropy=0.5)
    ref, ours = make_pair(vqp.LFQ, LFQ, **kw)
    x = make_input(8, "seq", seed=3)
    assert_same(run(ref, x, 11), run(ours, x, 11))
    mask = torch.tensor([False, True, True])
    assert_same(run(ref, x, 12, mask=mask), run(ours, x, 12, mask=mask))


def test_exact_masked_batch_entropy_is_the_entropy_of_the_masked_rows():
    """With a (B, N) mask vector_quantize_pytorch's batch entropy equals the per-sample one;
    exact_masked_batch_entropy=True gives what it computes on the masked rows alone."""
    kw = dict(codebook_size=2 ** 6, dim=6)
    torch.manual_seed(1)
    ref = vqp.LFQ(**kw)
    ours = LFQ(exact_masked_batch_entropy=True, **kw)
    ours.load_state_dict(ref.state_dict())
    x = make_input(6, "seq", seed=4) * 0.02
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(2)) > 0.4
    (_, _, _), upstream_masked = ref(x, return_loss_breakdown=True, mask=mask)
    assert torch.equal(upstream_masked.per_sample_entropy, upstream_masked.batch_entropy)
    (_, _, _), on_rows = ref(x[mask][None], return_loss_breakdown=True)
    (_, _, loss), ours_masked = ours(x, return_loss_breakdown=True, mask=mask)
    for name, a, b in zip(on_rows._fields, on_rows, ours_masked):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ours_masked.per_sample_entropy, ours_masked.batch_entropy)


def test_checkpoints_load_both_ways_and_codebook_matches():
    kw = dict(codebook_size=2 ** 6, dim=10, orthogonal_rotation=True, num_codebooks=1)
    torch.manual_seed(0)
    ours = LFQ(**kw)
    ref = vqp.LFQ(**kw)
    ref.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(ref.state_dict()[key], value), key
    assert torch.equal(ours.codebook, ref.codebook) and ours.codebook.dtype == ref.codebook.dtype
    assert ours.dtype == ref.dtype == torch.float32


@pytest.mark.parametrize("kw", [
    dict(dim=16, codebook_size=2 ** 6, num_quantizers=3),
    dict(dim=6, codebook_size=2 ** 6, num_quantizers=4, quantize_dropout=True, quantize_dropout_cutoff_index=1,
         quantize_dropout_multiple_of=2, commitment_loss_weight=0.5),
    dict(dim=8, codebook_size=2 ** 4, num_quantizers=2, soft_clamp_input_value=1.5, spherical=True),
])
def test_residual_lfq_matches(kw):
    ref, ours = make_pair(vqp.ResidualLFQ, ResidualLFQ, **kw)
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(5)) > 0.3
    for step in range(4):
        x = make_input(kw["dim"], "seq", seed=step)
        assert_same(run(ref, x, 20 + step, mask=mask if step % 2 else None),
                    run(ours, x, 20 + step, mask=mask if step % 2 else None))
    x = make_input(kw["dim"], "seq", seed=8)
    torch.manual_seed(3)
    r = ref(x, return_all_codes=True)
    torch.manual_seed(3)
    o = ours(x, return_all_codes=True)
    assert torch.equal(o[1], r[1]) and torch.equal(o[3], r[3])
    torch.testing.assert_close(ours.get_output_from_indices(o[1]), ref.get_output_from_indices(r[1]))
    assert torch.equal(ours.codebooks, ref.codebooks)
    ref.eval(), ours.eval()
    q, i, _ = ours(x)
    if not kw.get("spherical"):  # both libraries decode from the unnormalized codebook
        assert torch.equal(q, ours.get_output_from_indices(i))
    if kw.get("quantize_dropout"):
        torch.testing.assert_close(ours.get_codes_from_indices(i[..., :2]), ref.get_codes_from_indices(i[..., :2]))


def test_grouped_residual_lfq_matches():
    kw = dict(dim=12, groups=2, codebook_size=2 ** 4, num_quantizers=3, quantize_dropout=True)
    ref, ours = make_pair(vqp.GroupedResidualLFQ, GroupedResidualLFQ, **kw)
    for step in range(3):
        x = make_input(12, "seq", seed=step)
        assert_same(run(ref, x, 40 + step), run(ours, x, 40 + step))
    x = make_input(12, "seq", seed=5)
    ref.eval(), ours.eval()
    (q1, i1, l1), (q2, i2, l2) = ref(x), ours(x)
    assert torch.equal(i1, i2) and i2.shape == (2, 3, 10, 3) and torch.equal(q1, q2)
    # Evaluation: no auxiliary loss, one zero per (group, quantizer) in both libraries.
    assert l1.dtype == l2.dtype and l2.shape == (2, 3) and torch.equal(l1, l2) and not l2.any()
    torch.testing.assert_close(ours.get_output_from_indices(i2), ref.get_output_from_indices(i1))


@pytest.mark.parametrize("kw, match", [
    (dict(codebook_size=100, dim=8), "power of 2"),
    (dict(dim=4, frac_per_sample_entropy=0.0), "frac_per_sample_entropy"),
    (dict(dim=4, codebook_scale=2.0, soft_clamp_input_value=1.0), "soft_clamp_input_value"),
    (dict(dim=4, num_codebooks=2, keep_num_codebooks_dim=False), "keep_num_codebooks_dim"),
    (dict(dim=4, backend="gpu"), "backend"),
])
def test_bad_arguments_name_themselves(kw, match):
    with pytest.raises(ValueError, match=match):
        LFQ(**kw)


def test_bad_forward_input_is_refused_before_anything_runs():
    q = LFQ(dim=8, codebook_size=2 ** 4)
    with pytest.raises(ValueError, match="features"):
        q(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="mask"):
        q(torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating"):
        q(torch.ones(2, 5, 8, dtype=torch.long))


def test_public_api_has_docstrings_with_shapes_and_dtypes():
    """The rule of tests/test_docs.py, over this family's modules."""
    import importlib
    import inspect

    from test_docs import DTYPE, SHAPE

    for name in ("vqkern.lfq_entropy", "vqkern.compat.lfq", "vqkern.compat.residual_lfq", "vqkern.compat.fsq",
                 "vqkern.compat.residual_fsq", "vqkern.compat._residual", "vqkern.backends.lfq_torch"):
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            members = [(attr, obj)]
            if inspect.isclass(obj):
                members += [(f"{attr}.{m}", v) for m, v in vars(obj).items()
                            if (not m.startswith("_") or m == "forward")
                            and (inspect.isfunction(v) or isinstance(v, property))]
            for label, member in members:
                if not (inspect.isfunction(member) or inspect.isclass(member) or isinstance(member, property)):
                    continue
                doc = inspect.getdoc(member.fget if isinstance(member, property) else member)
                assert doc, f"{name}.{label} has no docstring"
                if inspect.isfunction(member) and ("Tensor" in str(inspect.signature(member))
                                                   or member.__name__ == "forward"):
                    assert SHAPE.search(doc) and DTYPE.search(doc), \
                        f"{name}.{label}: no shape or dtype in its docstring"


def _distributed_worker(rank, port, path):
    import datetime
    import os

    import torch.distributed as dist

    from vqkern.lfq_entropy import lfq_entropy

    from test_distributed import WORLD

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ref, ours = make_pair(vqp.LFQ, LFQ, codebook_size=2 ** 6, dim=6)
        x = make_input(6, "seq", seed=rank) * (0.05 if rank else 1.0)  # different rows on each rank
        local = lfq_entropy(x.reshape(-1, 1, 6)).prob_sum / 30  # this rank's average distribution
        out = {"ref": run(ref, x, 1)[3], "ours": run(ours, x, 1)[3], "local_avg": local}
        torch.save(out, os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_batch_entropy_is_the_entropy_of_the_mean_over_ranks(tmp_path):
    """2 gloo ranks: the batch entropy is that of the mean over ranks of their average
    distributions, the same on every rank. vector-quantize-pytorch 1.32 means this, but
    its all-reduce's result is discarded: it takes each rank's own average divided by 2."""
    from vqkern.compat.lfq import entropy_of

    from test_distributed import run_ranks

    results = run_ranks(_distributed_worker, str(tmp_path))
    mean = (results[0]["local_avg"] + results[1]["local_avg"]) / 2
    for r in results:
        torch.testing.assert_close(r["ours"].batch_entropy, entropy_of(mean).mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["ours"].per_sample_entropy, r["ref"].per_sample_entropy, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["ref"].batch_entropy, entropy_of(r["local_avg"] / 2).mean(), rtol=1e-5,
                                   atol=1e-6)
    assert not torch.equal(results[0]["ours"].per_sample_entropy, results[1]["ours"].per_sample_entropy)


def test_lfq_compiles_fullgraph_in_training_and_eval():
    torch.manual_seed(0)
    lfq = LFQ(codebook_size=2 ** 6, dim=8, commitment_loss_weight=0.1)
    x = make_input(8, "seq", seed=1)

    def step(x):
        quantized, indices, loss = lfq(x)
        return quantized.square().mean() + loss, indices

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for mode in ("train", "eval"):
        getattr(lfq, mode)()
        (l1, i1), (l2, i2) = step(x), compiled(x)
        assert torch.equal(i1, i2)
        torch.testing.assert_close(l2, l1)
