"""vqkern.compat's FSQ family against vector-quantize-pytorch: outputs, indices (and their
dtype), gradients, buffers and state_dict, residual and grouped stacks, quantize dropout."""
import pytest
import torch

from vqkern.compat import FSQ, GroupedResidualFSQ, ResidualFSQ

from test_compat_lfq import make_pair as make_lfq_pair

vqp = pytest.importorskip("vector_quantize_pytorch")

LEVELS = [8, 5, 5, 3]
OPTIONS = {
    "default": (dict(levels=LEVELS), "seq"),
    "symmetric_hard": (dict(levels=LEVELS, preserve_symmetry=True, bound_hard_clamp=True), "seq"),
    "hard_clamp": (dict(levels=LEVELS, bound_hard_clamp=True), "seq"),
    "levels_two": (dict(levels=[2, 4, 3], preserve_symmetry=True), "seq"),
    "projected_codebooks": (dict(levels=[5, 3], dim=10, num_codebooks=2), "seq"),
    "no_bias_no_indices": (dict(levels=LEVELS, dim=6, projection_has_bias=False, return_indices=False), "seq"),
    "rotation": (dict(levels=[5, 5, 5], orthogonal_rotation=True), "seq"),
    "noise_dropout": (dict(levels=LEVELS, preserve_symmetry=True, noise_dropout=0.5), "seq"),
    "image": (dict(levels=LEVELS), "image"),
    "channel_first": (dict(levels=LEVELS, channel_first=True), "channel_first"),
    "keep_dim": (dict(levels=LEVELS, keep_num_codebooks_dim=True), "seq"),
}


def make_pair(cls_ref, cls_ours, **kw):
    """As the LFQ tests' make_pair, and the (non-persistent) buffers must match too."""
    ref, ours = make_lfq_pair(cls_ref, cls_ours, **kw)
    ref_buffers, our_buffers = dict(ref.named_buffers()), dict(ours.named_buffers())
    assert list(ref_buffers) == list(our_buffers)
    for key, value in ref_buffers.items():
        assert value is None and our_buffers[key] is None or torch.equal(our_buffers[key], value), key
    return ref, ours


def make_input(dim, layout, seed):
    g = torch.Generator().manual_seed(seed)
    shape = {"seq": (2, 12, dim), "image": (2, dim, 3, 4), "channel_first": (2, dim, 12)}[layout]
    return torch.randn(shape, generator=g) * 1.5


def run(module, x, seed, **forward):
    xx = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out, indices, *codes = module(xx, **forward)
    w = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * w).sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return out.detach(), indices, xx.grad, grads, codes


def assert_same(a, b):
    (o1, i1, g1, p1, c1), (o2, i2, g2, p2, c2) = a, b
    assert o1.dtype == o2.dtype and o1.shape == o2.shape
    torch.testing.assert_close(o2, o1, rtol=1e-6, atol=1e-6)
    if i1 is None:
        assert i2 is None
    else:
        assert i1.dtype == i2.dtype and torch.equal(i1, i2)
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)
    for x, y in zip(p1, p2):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    for x, y in zip(c1, c2):
        torch.testing.assert_close(y, x)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_fsq_matches_vector_quantize_pytorch(name):
    kw, layout = OPTIONS[name]
    ref, ours = make_pair(vqp.FSQ, FSQ, **kw)
    dim = kw.get("dim", len(kw["levels"]) * kw.get("num_codebooks", 1))
    for step in range(2):
        x = make_input(dim, layout, seed=step)
        assert_same(run(ref, x, step), run(ours, x, step))
    ref.eval(), ours.eval()
    x = make_input(dim, layout, seed=5)
    (o1, i1), (o2, i2) = ref(x), ours(x)
    assert torch.equal(o1, o2)
    if i1 is not None:
        assert torch.equal(i1, i2) and i2.dtype == torch.int32
        torch.testing.assert_close(ours.indices_to_codes(i2), o2)
        assert torch.equal(ours.indices_to_codes(i2), ref.indices_to_codes(i1))


@pytest.mark.parametrize("kw", [
    dict(dim=16, levels=[8, 5, 5, 3], num_quantizers=3),
    dict(levels=[5, 5, 3], num_quantizers=4, quantize_dropout=True, quantize_dropout_cutoff_index=1,
         quantize_dropout_multiple_of=2),
    dict(dim=6, levels=[4, 4], num_quantizers=2, bound_hard_clamp=False, soft_clamp_input_value=[1.5, 1.2]),
    dict(dim=6, levels=[5, 3], num_quantizers=2, is_channel_first=True),
])
def test_residual_fsq_matches(kw):
    ref, ours = make_pair(vqp.ResidualFSQ, ResidualFSQ, **kw)
    dim = kw.get("dim", len(kw["levels"]))
    layout = "channel_first" if kw.get("is_channel_first") else "seq"
    for step in range(4):
        x = make_input(dim, layout, seed=step)
        assert_same(run(ref, x, 60 + step, return_all_codes=not kw.get("is_channel_first")),
                    run(ours, x, 60 + step, return_all_codes=not kw.get("is_channel_first")))
    ref.eval(), ours.eval()
    x = make_input(dim, layout, seed=7)
    (q1, i1), (q2, i2) = ref(x), ours(x)
    assert torch.equal(q1, q2) and torch.equal(i1, i2) and i1.dtype == i2.dtype
    if not kw.get("is_channel_first"):
        assert torch.equal(ours.get_output_from_indices(i2), ref.get_output_from_indices(i1))
        assert torch.equal(ours.codebooks, ref.codebooks) and ours.codebook_size == ref.codebook_size


def test_grouped_residual_fsq_matches():
    kw = dict(dim=8, groups=2, levels=[5, 5, 3, 3], num_quantizers=3, quantize_dropout=True)
    ref, ours = make_pair(vqp.GroupedResidualFSQ, GroupedResidualFSQ, **kw)
    for step in range(3):
        x = make_input(8, "seq", seed=step)
        assert_same(run(ref, x, 80 + step), run(ours, x, 80 + step))
    assert ours.codebook_size == ref.codebook_size
    ref.eval(), ours.eval()
    x = make_input(8, "seq", seed=9)
    (q1, i1), (q2, i2) = ref(x), ours(x)
    assert torch.equal(q1, q2) and torch.equal(i1, i2)
    torch.testing.assert_close(ours.get_output_from_indices(i2), ref.get_output_from_indices(i1))


@pytest.mark.parametrize("kw, match", [
    (dict(levels=[2, 3]), "preserve_symmetry"),
    (dict(levels=[4, 3], noise_dropout=0.1), "noise_dropout"),
    (dict(levels=[]), "levels"),
    (dict(levels=[3], num_codebooks=2, keep_num_codebooks_dim=False), "keep_num_codebooks_dim"),
])
def test_bad_arguments_name_themselves(kw, match):
    with pytest.raises(ValueError, match=match):
        FSQ(**kw)
