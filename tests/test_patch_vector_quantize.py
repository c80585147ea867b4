"""vqkern.patch on models built from vector-quantize-pytorch 1.32's own classes
(VectorQuantize, and ResidualVQ / GroupedResidualVQ through their VectorQuantize layers)."""
import copy

import pytest
import torch

import vqkern

from patch_parity import assert_state_dicts_equal, largest_tensor, patched_copy, tensor_objects

vqp = pytest.importorskip("vector_quantize_pytorch",
                          reason="vector-quantize-pytorch is installed by requirements-test.txt")

DIM, K = 16, 24
OPTIONS = {
    "default": dict(),
    "kmeans_dead_code": dict(kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2),
    "cosine_heads_projected": dict(use_cosine_sim=True, heads=2, separate_codebook_per_head=True, codebook_dim=4),
    "learnable": dict(learnable_codebook=True, ema_update=False, rotation_trick=False),
    "channel_first": dict(channel_last=False, commitment_weight=0.5),
    "image_fmap": dict(accept_image_fmap=True, decay=0.9),
    "cross_entropy_orthogonal": dict(commitment_use_cross_entropy_loss=True, orthogonal_reg_weight=0.1,
                                     learnable_codebook=True, ema_update=False),
}


def layout(kw, x):
    """x (B, N, DIM) in the layer's input layout."""
    if kw.get("accept_image_fmap"):
        return x.transpose(1, 2).reshape(x.shape[0], DIM, 2, -1)
    if kw.get("channel_last") is False:
        return x.transpose(1, 2)
    return x


def run_step(module, x, seed, call=None, **forward_kw):
    """One training step's outputs and gradients (``call``, default the module, runs it); the
    seed makes k-means and dead-code draws match."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    quantized, indices, loss = (module if call is None else call)(x, **forward_kw)[:3]
    (quantized.square().mean() + loss.sum()).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    return quantized.detach(), indices, loss.detach(), x.grad, grads


def assert_steps_match(ref, ours, inputs, call=None, **forward_kw):
    for step, x in enumerate(inputs):
        q_r, i_r, l_r, g_r, p_r = run_step(ref, x, 100 + step, **forward_kw)
        q_o, i_o, l_o, g_o, p_o = run_step(ours, x, 100 + step, call, **forward_kw)
        assert i_o.dtype == i_r.dtype and torch.equal(i_o, i_r), f"step {step}: {(i_o != i_r).sum()} indices differ"
        assert q_o.shape == q_r.shape and q_o.dtype == q_r.dtype
        torch.testing.assert_close(q_o, q_r, atol=1e-5, rtol=1e-5)
        assert l_o.shape == l_r.shape and l_o.dtype == l_r.dtype
        torch.testing.assert_close(l_o, l_r, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g_o, g_r, atol=1e-5, rtol=1e-4)
        assert p_o.keys() == p_r.keys()
        for name in p_r:
            torch.testing.assert_close(p_o[name], p_r[name], atol=1e-6, rtol=1e-5, msg=name)
    sr, so = ref.state_dict(), ours.state_dict()
    assert list(sr) == list(so)
    for key in sr:
        assert so[key].dtype == sr[key].dtype and so[key].shape == sr[key].shape, key
        if sr[key].is_floating_point():
            torch.testing.assert_close(so[key], sr[key], atol=1e-5, rtol=1e-4, msg=key)
        else:
            assert torch.equal(so[key], sr[key]), key


def inputs(steps=3, batch=3, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, DIM, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_vector_quantize_matches(name):
    kw = dict(dim=DIM, codebook_size=K, **OPTIONS[name])
    torch.manual_seed(1)
    ref = vqp.VectorQuantize(**kw)
    ours, patched = patched_copy(ref)
    assert patched == {"": "VectorQuantize"}
    assert_steps_match(ref, ours, [layout(kw, x) for x in inputs()])
    ref.eval(), ours.eval()
    x = layout(kw, inputs(1, seed=9)[0])
    for a, b in zip(ours(x), ref(x)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("how", ["mask", "lens"])
def test_padding_matches(how):
    torch.manual_seed(1)
    ref = vqp.VectorQuantize(dim=DIM, codebook_size=K, threshold_ema_dead_code=1, kmeans_init=True, kmeans_iters=2)
    ours, _ = patched_copy(ref)
    lens = torch.tensor([10, 4, 7])
    extra = dict(lens=lens) if how == "lens" else dict(mask=torch.arange(10) < lens[:, None])
    assert_steps_match(ref, ours, inputs(), **extra)


RVQ = {
    "dropout_shared_kmeans": (vqp.ResidualVQ, dict(num_quantizers=3, codebook_size=K, quantize_dropout=True,
                                                   shared_codebook=True, kmeans_init=True, kmeans_iters=2,
                                                   rotation_trick=False)),
    "beam_dead_code": (vqp.ResidualVQ, dict(num_quantizers=3, codebook_size=K, beam_size=3, threshold_ema_dead_code=2)),
    "grouped_dropout": (vqp.GroupedResidualVQ, dict(groups=2, num_quantizers=3, codebook_size=K, quantize_dropout=True,
                                                    quantize_dropout_cutoff_index=1, threshold_ema_dead_code=1)),
}


@pytest.mark.parametrize("name", list(RVQ))
def test_residual_models_match(name):
    cls, kw = RVQ[name]
    torch.manual_seed(1)
    ref = cls(dim=DIM, **kw)
    ours, patched = patched_copy(ref)
    layers = kw["num_quantizers"] * kw.get("groups", 1)
    assert len(patched) == layers and set(patched.values()) == {"VectorQuantize"}
    assert_steps_match(ref, ours, inputs(batch=2, n=8))
    ref.eval(), ours.eval()
    x = inputs(1, seed=5)[0]
    for a, b in zip(ours(x, return_all_codes=True), ref(x, return_all_codes=True)):
        a, b = (a, b) if isinstance(a, torch.Tensor) else (torch.stack(a), torch.stack(b))
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_patch_keeps_the_layers():
    torch.manual_seed(1)
    model = vqp.ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=K, learnable_codebook=True, ema_update=False)
    reference = copy.deepcopy(model)
    before, text = tensor_objects(model), repr(model)
    assert vqkern.patch(model) == {"layers.0": "VectorQuantize", "layers.1": "VectorQuantize"}
    after = tensor_objects(model)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert repr(model) == text and all(isinstance(layer, vqp.VectorQuantize) for layer in model.layers)
    assert_state_dicts_equal(model, reference)
    assert vqkern.patch(model) == {}
    assert vqkern.unpatch(model) == {"layers.0": "VectorQuantize", "layers.1": "VectorQuantize"}
    for layer in model.layers:
        assert not {"forward", "update_indices", "update_ema_indices"} & set(vars(layer))
        assert layer.forward.__func__ is vqp.VectorQuantize.forward


def test_checkpoint_and_moved_buffers_are_followed():
    """A checkpoint loaded after patch (k-means done in it) is not initialized again, and a
    layer whose buffers were replaced (a dtype round trip) runs on its new buffers."""
    kw = dict(dim=DIM, codebook_size=K, kmeans_init=True, kmeans_iters=2)
    torch.manual_seed(1)
    trained = vqp.VectorQuantize(**kw)
    trained(inputs(1)[0])
    ref = vqp.VectorQuantize(**kw)
    ours, _ = patched_copy(ref)
    ref.load_state_dict(trained.state_dict())
    ours.load_state_dict(trained.state_dict())
    ours.double().float()
    assert ours._codebook.embed is not ref._codebook.embed
    assert_steps_match(ref, ours, inputs(2, seed=4))


def test_options_changed_after_patch_are_followed():
    torch.manual_seed(1)
    ref = vqp.VectorQuantize(dim=DIM, codebook_size=K)
    ours, _ = patched_copy(ref)
    for layer in (ref, ours):
        layer.commitment_weight = 3.0
        layer.freeze_codebook = True
    assert_steps_match(ref, ours, inputs(2))
    ours._codebook.gumbel_sample = ours._codebook.gumbel_sample.func  # a sampler vqkern cannot serve
    with pytest.raises(NotImplementedError, match="a gumbel_sample other than the library's own"):
        ours(inputs(1)[0])


@pytest.mark.parametrize("kw, option", [(dict(straight_through=True, rotation_trick=False), "straight_through=True"),
                                        (dict(affine_param=True), "affine_param=True")])
def test_unsupported_options_stay_unpatched_with_a_warning(kw, option):
    model = torch.nn.Sequential(vqp.VectorQuantize(dim=DIM, codebook_size=K, **kw))
    with pytest.warns(UserWarning, match=rf"left 0 \(vector_quantize_pytorch.*VectorQuantize\) unpatched: {option}"):
        assert vqkern.patch(model) == {}
    assert "forward" not in vars(model[0])


def test_stochastic_sampling_is_patched_with_a_caveat():
    torch.manual_seed(1)
    ref = vqp.VectorQuantize(dim=DIM, codebook_size=K, stochastic_sample_codes=True, sample_codebook_temp=0.5)
    ours = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match="stochastic_sample_codes=True draws codes from the same distribution"):
        assert vqkern.patch(ours) == {"": "VectorQuantize"}
    ref.eval(), ours.eval()   # in evaluation both take the nearest code
    x = inputs(1)[0]
    assert torch.equal(ours(x)[1], ref(x)[1])


def test_cross_entropy_with_ema_is_patched_with_a_caveat():
    ours = vqp.VectorQuantize(dim=DIM, codebook_size=K, commitment_use_cross_entropy_loss=True)
    with pytest.warns(UserWarning, match="the gradient of the cross-entropy commitment loss"):
        assert vqkern.patch(ours) == {"": "VectorQuantize"}


@pytest.mark.parametrize("cls, kw", [
    (vqp.VectorQuantize, dict(kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=2)),
    # ~15 s: the tiled top-k runs 32 tiles per layer under the dispatch mode.
    pytest.param(vqp.ResidualVQ, dict(num_quantizers=2, beam_size=2, threshold_ema_dead_code=2),
                 marks=pytest.mark.slow),
], ids=["ema_kmeans_dead_code", "beam_search_update_indices"])
def test_no_rows_by_codes_matrix(cls, kw, monkeypatch):
    """EMA, k-means init, dead codes and beam search's update_indices, forward and backward:
    the library's largest tensor is N x K, the patched model's a small fraction of it."""
    # Beam search's top-k runs over code tiles of at most TILE_BYTES (16 MiB by default, all
    # of this small N x K): a 1 MiB tile (1/32 of it) shows that it streams.
    monkeypatch.setattr("vqkern.compat.sampling.TILE_BYTES", 1 << 20)
    torch.manual_seed(1)
    ref = cls(dim=DIM, codebook_size=2048, **kw)
    ours, _ = patched_copy(ref)
    x = torch.randn(2, 1024, DIM)
    n = x.numel() // DIM

    def step(m):
        xx = x.clone().requires_grad_()
        q, _, loss = m(xx)
        (q.sum() + loss.sum()).backward()

    assert largest_tensor(lambda: step(ref))[0] >= n * 2048
    size, op = largest_tensor(lambda: step(ours))
    assert size < n * 2048 // 8, (size, op)


@pytest.mark.slow  # ~25 s on 2 loaded cores, mostly inductor's compile
def test_torch_compile_matches():
    """A learnable codebook trains under torch.compile(fullgraph=True) once patched (the
    library's own layer breaks the graph on its ``if self.initted`` branch)."""
    torch.manual_seed(1)
    ref = vqp.VectorQuantize(dim=DIM, codebook_size=K, learnable_codebook=True, ema_update=False, rotation_trick=False)
    ours, _ = patched_copy(ref)
    assert_steps_match(ref, ours, inputs(2), call=torch.compile(ours, fullgraph=True))
