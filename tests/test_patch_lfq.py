"""vqkern.patch on vector-quantize-pytorch 1.32's own LFQ classes (LFQ, and ResidualLFQ /
GroupedResidualLFQ through their LFQ layers): the entropy aux loss from vqkern's streamed
op, everything else as the library computes it."""
import copy

import pytest
import torch
from torch import nn

import vqkern

from patch_parity import assert_state_dicts_equal, grad_within_twice, patched_copy, tensor_objects

vqp = pytest.importorskip("vector_quantize_pytorch",
                          reason="vector-quantize-pytorch is installed by requirements-test.txt")

IN = 8  # features of the encoder's input

# name -> (class, constructor options, input layout); every one with an entropy loss.
MODELS = {
    "lfq_projected_commit": (vqp.LFQ, dict(dim=10, codebook_size=2 ** 6, entropy_loss_weight=0.1,
                                          commitment_loss_weight=0.25), "seq"),
    "lfq_codebooks_spherical": (vqp.LFQ, dict(dim=8, codebook_size=2 ** 4, num_codebooks=2, spherical=True,
                                             codebook_scale=0.5, entropy_loss_weight=0.2), "seq"),
    "lfq_frac_softplus_gamma": (vqp.LFQ, dict(dim=6, codebook_size=2 ** 6, frac_per_sample_entropy=0.5,
                                             experimental_softplus_entropy_loss=True, diversity_gamma=0.5,
                                             entropy_loss_weight=0.1), "seq"),
    "lfq_image_rotation": (vqp.LFQ, dict(dim=6, codebook_size=2 ** 6, orthogonal_rotation=True,
                                        entropy_loss_weight=0.1), "image"),
    "residual": (vqp.ResidualLFQ, dict(dim=8, codebook_size=2 ** 5, num_quantizers=3, entropy_loss_weight=0.1,
                                      commitment_loss_weight=0.1), "seq"),
    "grouped_residual": (vqp.GroupedResidualLFQ, dict(dim=8, groups=2, codebook_size=2 ** 4, num_quantizers=2,
                                                      entropy_loss_weight=0.1), "seq"),
}


class Model(nn.Module):
    """A linear encoder in front of the quantizer, so that every configuration has parameters
    upstream of the entropy loss for Adam to train."""

    def __init__(self, quantizer, dim, layout):
        super().__init__()
        self.encoder, self.quantizer, self.layout = nn.Linear(IN, dim), quantizer, layout

    def forward(self, x, **kw):
        h = self.encoder(x)
        if self.layout == "image":  # (B, H*W, dim) -> (B, dim, H, W)
            h = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], 2, -1)
        return self.quantizer(h, **kw)


def build(name):
    cls, kw, layout = MODELS[name]
    torch.manual_seed(1)
    return Model(cls(**kw), kw["dim"], layout)


def batches(steps=4, batch=3, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, IN, generator=g) for _ in range(steps)]


def step(model, opt, x, seed, **kw):
    """One Adam step: (quantized, indices, aux loss, breakdown or None, input gradient)."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # frac_per_sample_entropy's draw comes from the global generator
    out = model(x, **kw)
    breakdown = None
    if kw.get("return_loss_breakdown"):
        out, breakdown = out
    quantized, indices, loss = out[:3]
    w = torch.linspace(-1, 1, quantized.numel()).reshape(quantized.shape)
    opt.zero_grad()
    ((quantized * w).sum() + loss.sum()).backward()
    opt.step()
    return quantized.detach(), indices, loss.detach(), breakdown, x.grad


def assert_close(ours, ref, what):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, what
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6, msg=what)


def assert_training_matches(ref, ours, steps=4, **kw):
    opt_r, opt_o = torch.optim.Adam(ref.parameters(), lr=1e-2), torch.optim.Adam(ours.parameters(), lr=1e-2)
    for i, x in enumerate(batches(steps)):
        q_r, i_r, l_r, b_r, g_r = step(ref, opt_r, x, 100 + i, **kw)
        q_o, i_o, l_o, b_o, g_o = step(ours, opt_o, x, 100 + i, **kw)
        assert i_o.dtype == i_r.dtype and torch.equal(i_o, i_r), f"step {i}: {(i_o != i_r).sum()} indices differ"
        assert_close(q_o, q_r, f"step {i}: quantized")
        assert_close(l_o, l_r, f"step {i}: aux loss")
        assert l_r.abs().max() > 0, "the aux loss is zero: nothing compared"
        if b_r is not None:
            assert type(b_o)._fields == type(b_r)._fields
            for field, a, b in zip(b_r._fields, b_r, b_o):
                assert_close(b.detach(), a.detach(), f"step {i}: {field}")
        # Adam divides each update by the root of its running second moment, so the entropy
        # backward's per-step rounding differences (~1e-6 of the largest gradient, see
        # test_one_step_gradient_within_twice_the_libraries_error) compound over the steps:
        # measured up to 2e-5 of the largest after 6 steps (ResidualLFQ).
        torch.testing.assert_close(g_o, g_r, rtol=1e-4, atol=1e-4 * g_r.abs().max().item(),
                                   msg=f"step {i}: input gradient")
    sr, so = ref.state_dict(), ours.state_dict()
    assert list(so) == list(sr)
    for key in sr:
        assert_close(so[key], sr[key], key)


def lfq_layers(model):
    return [m for m in model.modules() if isinstance(m, vqp.LFQ)]


@pytest.mark.parametrize("name", list(MODELS))
def test_training_matches_the_library(name):
    ref = build(name)
    ours, patched = patched_copy(ref)
    assert sorted(patched.values()) == ["LFQ"] * len(lfq_layers(ref))
    assert all("forward" in m.__dict__ for m in lfq_layers(ours))
    kw = dict(return_loss_breakdown=True) if MODELS[name][0] is vqp.LFQ else {}
    assert_training_matches(ref, ours, **kw)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_step_gradient_within_twice_the_libraries_error(name):
    """CONVENTIONS.md's gradient rule on one step: against an fp64 copy of the library's layer
    (its quantization then in fp64 too), the patched layer's input gradient errs at most twice
    as much as the library's own fp32 computation."""
    ref = build(name)
    ours, _ = patched_copy(ref)
    exact = copy.deepcopy(ref).double()
    for m in lfq_layers(exact):
        m.force_quantization_f32 = False
    x = batches(1, seed=7)[0]
    grads = {}
    for key, model in (("ref", ref), ("ours", ours), ("exact", exact)):
        xx = x.to(torch.float64 if key == "exact" else torch.float32).detach().requires_grad_()
        torch.manual_seed(3)
        quantized, _, loss = model(xx)[:3]
        w = torch.linspace(-1, 1, quantized.numel(), dtype=quantized.dtype).reshape(quantized.shape)
        ((quantized * w).sum() + loss.sum()).backward()
        grads[key] = xx.grad
    grad_within_twice(grads["ours"], grads["ref"], grads["exact"], what="input gradient")


@pytest.mark.parametrize("mask_shape", ["batch", "batch_seq"])
def test_masks_match_the_library(mask_shape):
    ref = build("lfq_projected_commit")
    ours, _ = patched_copy(ref)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand((3,) if mask_shape == "batch" else (3, 10), generator=g) > 0.4
    assert_training_matches(ref, ours, steps=2, mask=mask, return_loss_breakdown=True)


def test_eval_and_state_dict_round_trip():
    ref = build("residual")
    ours, _ = patched_copy(ref)
    x = batches(1)[0]
    ref.eval(), ours.eval()
    with torch.no_grad():
        (q_r, i_r, l_r), (q_o, i_o, l_o) = ref(x), ours(x)
    assert torch.equal(i_o, i_r) and torch.equal(q_o, q_r) and torch.equal(l_o, l_r)
    # A checkpoint of either loads into the other.
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    assert_state_dicts_equal(ours, ref)


def test_patch_keeps_tensors_unpatch_restores_patch_twice_is_a_no_op():
    model = build("grouped_residual")
    before = tensor_objects(model)
    reference = copy.deepcopy(model)
    patched = vqkern.patch(model)
    assert len(patched) == 4 and set(patched.values()) == {"LFQ"}
    assert vqkern.patch(model) == {}
    after = tensor_objects(model)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert_state_dicts_equal(model, reference)
    assert vqkern.unpatch(model) == patched
    assert not any("forward" in m.__dict__ or "_vqkern_patch" in m.__dict__ for m in lfq_layers(model))
    x = batches(1)[0]
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    expected = reference(x)
    for a, b in zip(out, expected):
        assert torch.equal(a, b)


def test_too_many_codes_stay_unpatched_with_a_warning():
    # 2^25 codes per codebook: more than vqkern's entropy op serves. Built on the meta device,
    # where the library's (2^25, 25) codebook buffer takes no memory.
    with torch.device("meta"):
        layer = vqp.LFQ(dim=25, codebook_size=2 ** 25)
    with pytest.warns(UserWarning, match=r"left LFQ \(vector_quantize_pytorch.lookup_free_quantization.LFQ\) "
                                         r"unpatched: codebook_size=33554432"):
        assert vqkern.patch(layer) == {}
    assert "forward" not in layer.__dict__


def test_half_precision_quantization_warns():
    torch.manual_seed(0)
    layer = vqp.LFQ(dim=6, codebook_size=2 ** 6, force_quantization_f32=False).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="force_quantization_f32=False on a torch.bfloat16 layer"):
        assert vqkern.patch(layer) == {"": "LFQ"}


def test_another_release_stays_unpatched(monkeypatch):
    from vqkern.integrations import vector_quantize_lfq
    monkeypatch.setattr(vector_quantize_lfq, "_SOURCES", frozenset({"0" * 64}))
    layer = build("lfq_projected_commit").quantizer
    with pytest.warns(UserWarning, match="is not the code vqkern's adapter reproduces"):
        assert vqkern.patch(layer) == {}
