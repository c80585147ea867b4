"""VectorQuantizer against ReferenceVectorQuantizer; EMA, dead codes, channel-first, compile;
k-means init, SimVQ codebooks and projected search spaces."""
import copy
import warnings

import pytest
import torch
from torch import nn

import vqkern
from vqkern.reference import ReferenceVectorQuantizer

from conftest import backend_params

BACKENDS = backend_params()


def _pair(backend, **kw):
    """A vqkern layer and a reference layer with identical state."""
    layer = vqkern.VectorQuantizer(50, 12, backend=backend, **kw)
    ref = ReferenceVectorQuantizer(50, 12, **kw)
    ref.load_state_dict(layer.state_dict())
    return layer, ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward_matches_reference(backend, device):
    layer, ref = _pair(backend)
    layer, ref = layer.to(device), ref.to(device)
    z = torch.randn(4, 9, 12, device=device) * 0.05
    outs = []
    for module in (layer, ref):
        zz = z.clone().requires_grad_()
        out = module(zz)
        (out.loss + out.quantized.square().sum()).backward()
        outs.append((out, zz.grad, module.codebook.grad))
    (o1, gz1, gc1), (o2, gz2, gc2) = outs
    assert torch.equal(o1.indices, o2.indices)
    assert torch.equal(o1.quantized, o2.quantized)
    torch.testing.assert_close(o1.loss, o2.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(o1.perplexity, o2.perplexity)
    torch.testing.assert_close(gz1, gz2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gc1, gc2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_buffers_follow_reference(backend, device):
    layer, ref = _pair(backend, ema=True, decay=0.9)
    layer, ref = layer.to(device), ref.to(device)
    for step in range(5):
        z = torch.randn(64, 12, device=device) + step * 0.1
        o1, o2 = layer(z), ref(z)
        assert torch.equal(o1.indices, o2.indices), f"step {step}"
        torch.testing.assert_close(o1.loss, o2.loss, rtol=1e-5, atol=0)
    for name in ("codebook", "cluster_size", "embed_avg"):
        torch.testing.assert_close(getattr(layer, name), getattr(ref, name), rtol=1e-5, atol=1e-6, msg=name)
    assert not isinstance(layer.codebook, nn.Parameter)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_are_reseeded_from_the_batch(backend, ema, device):
    layer, ref = _pair(backend, ema=ema, decay=0.5, dead_code_threshold=0.9)
    with torch.no_grad():
        for m in (layer, ref):
            m.codebook[10:] = 1e3  # unreachable codes: their usage decays below the threshold
    layer, ref = layer.to(device), ref.to(device)
    z = torch.randn(40, 12, device=device)
    for step in range(2):
        torch.manual_seed(step)
        layer(z)
        torch.manual_seed(step)
        ref(z)
        if step == 0:  # usage 1 -> 0.5 < 0.9: every unreachable code is re-seeded now
            rows = {tuple(r.tolist()) for r in z}
            assert all(tuple(c.tolist()) in rows for c in layer.codebook[10:].float())
    torch.testing.assert_close(layer.codebook, ref.codebook)
    torch.testing.assert_close(layer.cluster_size, ref.cluster_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_first_feature_maps(backend, device):
    layer = vqkern.VectorQuantizer(30, 6, channel_dim=1, backend=backend).to(device).eval()
    z = torch.randn(2, 6, 5, 7, device=device) * 0.05
    out = layer(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 5, 7)
    flat = vqkern.quantize(z.movedim(1, -1), layer.codebook, backend=backend)
    assert torch.equal(out.indices, flat.indices)
    assert torch.equal(out.quantized, flat.quantized.movedim(-1, 1))


def test_perplexity_and_usage(device):
    layer = vqkern.VectorQuantizer(8, 4, backend="torch").to(device)
    with torch.no_grad():
        layer.codebook.copy_(torch.eye(8, 4, device=device) * 10)
    z = layer.codebook[torch.arange(4, device=device).repeat(25)].detach().clone()  # 4 codes used evenly
    out = layer(z)
    assert out.perplexity.item() == pytest.approx(4.0, rel=1e-5)
    usage = layer.codebook_usage()
    assert usage.shape == (8,)
    assert bool((usage[:4] > usage[4:].max()).all())
    collapsed = layer(layer.codebook[:1].detach().expand(50, 4))
    assert collapsed.perplexity.item() == pytest.approx(1.0)
    assert "num_embeddings=8" in repr(layer) and "backend='torch'" in repr(layer)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("warmup", [0, 3])
def test_nan_input_poisons_loss_not_codebook(backend, warmup, device):
    layer = vqkern.VectorQuantizer(20, 4, ema=True, decay=0.5, dead_code_threshold=0.9, backend=backend).to(device)
    with torch.no_grad():
        layer.codebook[10:] = 1e3  # unreachable: re-seeded during the warm-up steps
    for _ in range(warmup):
        layer(torch.randn(30, 4, device=device))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    z = torch.randn(30, 4, device=device)
    z[5, 1] = float("nan")
    out = layer(z)
    assert torch.isnan(out.loss)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a non-finite batch"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(ema=True), dict(dead_code_threshold=0.9), dict(ema=True, dead_code_threshold=0.9)],
                         ids=["ema", "dead_codes", "ema_dead_codes"])
def test_backward_after_training_step_updates_codebook(backend, kw, device):
    """The EMA update and the re-seeding rewrite the codebook in place during forward;
    the backward must still run and use the codes of the search, as the reference does."""
    layer, ref = _pair(backend, decay=0.5, **kw)
    with torch.no_grad():
        for m in (layer, ref):
            m.codebook[40:] = 1e3  # unreachable: re-seeded at this step when dead codes are on
    layer, ref = layer.to(device), ref.to(device)
    z = torch.randn(4, 9, 12, device=device)
    g = torch.randn(4, 9, 12, device=device)
    outs = []
    for module in (layer, ref):
        zz = z.clone().requires_grad_()
        torch.manual_seed(1)
        out = module(zz)
        (out.loss + (out.quantized * g).sum()).backward()
        outs.append((out, zz.grad, module.codebook.grad))
    (o1, gz1, gc1), (o2, gz2, gc2) = outs
    assert torch.equal(o1.indices, o2.indices)
    torch.testing.assert_close(o1.loss, o2.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(gz1, gz2, rtol=1e-5, atol=1e-7)
    if kw.get("ema"):
        assert gc1 is None and gc2 is None
    else:
        torch.testing.assert_close(gc1, gc2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.codebook, ref.codebook)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ema", [False, True])
def test_empty_batch_in_training(backend, ema, device):
    layer, ref = _pair(backend, ema=ema, decay=0.5, dead_code_threshold=0.9, channel_dim=1)
    layer, ref = layer.to(device), ref.to(device)
    for module in (layer, ref):
        z = torch.randn(0, 12, 3, 5, device=device, requires_grad=True)
        out = module(z)
        assert out.quantized.shape == z.shape and out.indices.shape == (0, 3, 5)
        assert out.indices.dtype == torch.int64 and out.loss.item() == 0.0
        (out.loss + out.quantized.sum()).backward()
        assert z.grad.shape == z.shape
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[name], value, msg=name)
    assert torch.equal(layer.cluster_size, torch.full_like(layer.cluster_size, 0.5))  # decayed, nothing counted


def test_failed_call_leaves_module_untouched(device):
    layer = vqkern.VectorQuantizer(20, 4, ema=True, backend="torch").to(device)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad in (torch.randn(10, 5, device=device), torch.randint(3, (10, 4), device=device)):
        with pytest.raises((ValueError, TypeError)):
            layer(bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


class TinyVQVAE(nn.Module):
    def __init__(self, backend, **vq_kwargs):
        super().__init__()
        self.enc = nn.Conv2d(1, 8, 4, stride=2, padding=1)
        self.vq = vqkern.VectorQuantizer(16, 8, channel_dim=1, backend=backend, **vq_kwargs)
        self.dec = nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1)

    def forward(self, x):
        out = self.vq(self.enc(x))
        recon = self.dec(out.quantized)
        return ((recon - x) ** 2).mean() + out.loss, out.perplexity


def _train(model, step, x, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        loss, _ = step(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# With EMA or re-seeding the codebook is rewritten in place inside the compiled
# forward; the backward must still see the codes the search chose.
QUANTIZER_CONFIGS = {
    "gradient": dict(),
    "ema_dead_codes": dict(ema=True, decay=0.5, dead_code_threshold=0.9),
    "dead_codes": dict(decay=0.5, dead_code_threshold=0.9),
}


@pytest.mark.parametrize("config", list(QUANTIZER_CONFIGS))
@pytest.mark.parametrize("use_compile", [True])
def test_small_vqvae_trains_under_compile(use_compile, config, device):
    """torch.compile(fullgraph=True) of forward+backward follows eager step for step."""
    kw = QUANTIZER_CONFIGS[config]
    torch.manual_seed(0)
    eager = TinyVQVAE("torch", **kw).to(device)
    compiled = TinyVQVAE("torch", **kw).to(device)
    compiled.load_state_dict(eager.state_dict())
    start = eager.vq.codebook.detach().clone()
    x = torch.rand(8, 1, 8, 8, device=device)
    torch.manual_seed(1)
    expected = _train(eager, eager, x)
    step = torch.compile(compiled, fullgraph=True) if use_compile else compiled
    torch.manual_seed(1)
    # Eager's random calls in the compiled graph, so that re-seeding draws the same rows.
    with torch._inductor.config.patch(fallback_random=True):
        got = _train(compiled, step, x)
    assert got == pytest.approx(expected, rel=1e-4)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert (eager.vq.codebook - start).abs().max() > 1e-3
    if not kw.get("ema"):
        assert compiled.vq.codebook.grad.abs().sum() > 0


# ---------------------------------------------------------------- large-codebook options

def _rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + torch.arange(d, dtype=torch.float32) * 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_init_sets_the_codebook_to_the_centroids_of_the_first_batches(backend, device):
    layer = vqkern.VectorQuantizer(6, 5, init="kmeans", kmeans_iters=4, kmeans_batches=2, backend=backend).to(device)
    start = layer.codebook.detach().clone()
    b1, b2, b3 = (_rows(n, 5, s).to(device) for n, s in ((9, 1), (0, 2), (7, 3)))
    torch.manual_seed(5)
    layer(b1)
    assert not layer.initted and torch.equal(layer.codebook, start), "initialized before its last k-means batch"
    layer(b2)  # no rows: not counted
    assert not layer.initted
    torch.manual_seed(7)
    layer(b3)
    torch.manual_seed(7)
    want = vqkern.kmeans(torch.cat([b1, b3]), 6, 4, backend=backend)
    assert layer.initted
    torch.testing.assert_close(layer.codebook.detach(), want.centroids)
    # usage starts from the per-batch k-means counts, then takes this batch's EMA step
    counts = torch.bincount(vqkern.reference.nearest_code(b3, want.centroids), minlength=6).float()
    torch.testing.assert_close(layer.cluster_size, 0.99 * (want.counts / 2).clamp(min=1) + 0.01 * counts)
    after = layer.codebook.detach().clone()
    layer(_rows(30, 5, 4).to(device))  # never again
    assert torch.equal(layer.codebook, after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_init_with_ema_seeds_the_running_statistics(backend, device):
    layer = vqkern.VectorQuantizer(8, 4, ema=True, decay=0.5, init="kmeans", kmeans_iters=3, backend=backend).to(device)
    z = _rows(40, 4, 9).to(device)
    torch.manual_seed(3)
    layer(z)
    torch.manual_seed(3)
    centroids, counts = vqkern.kmeans(z, 8, 3, backend=backend)
    size, avg = counts.clamp(min=1), centroids * counts.clamp(min=1).unsqueeze(1)
    # then this batch's EMA step, from those statistics
    codebook, ref_size, ref_avg = centroids.clone(), size.clone(), avg.clone()
    idx = vqkern.reference.nearest_code(z, centroids)
    vqkern.reference.ema_update(codebook, ref_size, ref_avg, z, idx, 0.5, layer.eps)
    torch.testing.assert_close(layer.cluster_size, ref_size)
    torch.testing.assert_close(layer.embed_avg, ref_avg)
    torch.testing.assert_close(layer.codebook, codebook)


def test_kmeans_init_in_the_search_space_and_not_in_eval(device):
    layer = vqkern.VectorQuantizer(5, 6, init="kmeans", kmeans_iters=3, codebook_dim=3, metric="cosine",
                                   channel_dim=1).to(device)
    z = torch.randn(2, 6, 4, 4, device=device)
    start = layer.codebook.detach().clone()
    layer.eval()(z)
    assert not layer.initted and torch.equal(layer.codebook, start)
    layer.train()
    torch.manual_seed(2)
    layer(z)
    rows = layer.project_in(z.movedim(1, -1).reshape(-1, 6)).detach()
    torch.manual_seed(2)
    want = vqkern.kmeans(torch.nn.functional.normalize(rows, dim=1), 5, 3, metric="cosine")
    torch.testing.assert_close(layer.codebook.detach(), want.centroids)
    torch.testing.assert_close(layer.codebook.norm(dim=1), torch.ones(5, device=device))


def test_kmeans_init_warns_when_there_are_fewer_rows_than_codes(device):
    layer = vqkern.VectorQuantizer(64, 4, init="kmeans", kmeans_batches=2).to(device)
    layer(torch.randn(20, 4, device=device))
    with pytest.warns(UserWarning, match=r"40 rows for 64 codes.*kmeans_batches=4 or more"):
        layer(torch.randn(20, 4, device=device))
    assert bool(layer.initted)
    enough = vqkern.VectorQuantizer(16, 4, init="kmeans").to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enough(torch.randn(20, 4, device=device))


def test_kmeans_init_is_saved_so_resume_does_not_init_again(device):
    torch.manual_seed(0)
    layer = vqkern.VectorQuantizer(6, 4, init="kmeans", kmeans_iters=2, ema=True, decay=0.8).to(device)
    fresh = copy.deepcopy(layer)
    layer(_rows(20, 4, 1).to(device))
    assert bool(layer.initted)
    fresh.load_state_dict(layer.state_dict())
    assert "initted" in layer.state_dict() and fresh._initted_host
    z = _rows(15, 4, 2).to(device) * 3  # k-means on this batch would give other codes
    a, b = layer(z), fresh(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.loss, b.loss)
    for k, v in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # a module that has not run k-means yet loads as pending, and runs it on its next batch
    pending = vqkern.VectorQuantizer(6, 4, init="kmeans", kmeans_iters=2).to(device)
    pending.load_state_dict(vqkern.VectorQuantizer(6, 4, init="kmeans").state_dict())
    assert not pending._initted_host
    pending(z)
    assert pending._initted_host


@pytest.mark.parametrize("backend", BACKENDS)
def test_simvq_codebook_is_the_basis_times_the_learned_map(backend, device):
    torch.manual_seed(0)
    layer = vqkern.VectorQuantizer(40, 6, simvq=True, backend=backend).to(device)
    assert set(layer.state_dict()) == {"basis", "codebook_map.weight", "cluster_size"}
    assert [n for n, _ in layer.named_parameters()] == ["codebook_map.weight"]
    basis, weight = layer.basis.clone(), layer.codebook_map.weight.detach().clone()
    torch.testing.assert_close(layer.codebook, basis @ weight.T)
    z = torch.randn(3, 5, 6, device=device)
    zz, w = z.clone().requires_grad_(), weight.clone().requires_grad_()
    out = layer(z.clone().requires_grad_())
    ref = vqkern.reference.quantize(zz, basis @ w.T, 0.25)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(layer.codebook_map.weight.grad, w.grad, rtol=1e-5, atol=1e-7)
    # one optimizer step moves every code, the unused ones too
    used = torch.zeros(40, dtype=torch.bool, device=device)
    used[out.indices.reshape(-1)] = True
    before = layer.codebook.detach().clone()
    torch.optim.SGD(layer.parameters(), lr=0.5).step()
    moved = (layer.codebook.detach() - before).abs().amax(dim=1) > 0
    assert bool(moved.all()) and not bool(used.all())
    assert torch.equal(layer.basis, basis), "the basis is frozen"


@pytest.mark.parametrize("backend", BACKENDS)
def test_projected_cosine_search_matches_plain_pytorch(backend, device):
    torch.manual_seed(0)
    layer = vqkern.VectorQuantizer(30, 10, codebook_dim=4, metric="cosine", channel_dim=1, backend=backend).to(device)
    z = torch.randn(2, 10, 3, 5, device=device)
    g = torch.randn_like(z)
    zz = z.clone().requires_grad_()
    out = layer(zz)
    ((out.quantized * g).sum() + out.loss).backward()
    # the same computation in plain PyTorch, on copies of the weights
    p_in, p_out = copy.deepcopy(layer.project_in), copy.deepcopy(layer.project_out)
    cb = layer.codebook.detach().clone().requires_grad_()
    z2 = z.clone().requires_grad_()
    x = torch.nn.functional.normalize(p_in(z2.movedim(1, -1)), dim=-1)
    ref = vqkern.reference.quantize(x, torch.nn.functional.normalize(cb, dim=-1), 0.25)
    quantized = p_out(ref.quantized).movedim(-1, 1)
    ((quantized * g).sum() + ref.loss).backward()
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.quantized, quantized, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(zz.grad, z2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.codebook.grad, cb.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(layer.project_in.weight.grad, p_in.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.project_out.weight.grad, p_out.weight.grad, rtol=1e-4, atol=1e-6)
    assert out.quantized.dtype == z.dtype and out.indices.shape == (2, 3, 5)


@pytest.mark.parametrize("kw", [dict(simvq=True, codebook_dim=3, metric="cosine"), dict(ema=True, codebook_dim=3),
                                dict(metric="cosine")], ids=["simvq_projected", "ema_projected", "cosine"])
def test_dequantize_gives_what_forward_outputs(kw, device):
    layer = vqkern.VectorQuantizer(12, 5, channel_dim=1, **kw).to(device).eval()
    z = torch.randn(2, 5, 4, 4, device=device)
    out = layer(z)
    torch.testing.assert_close(layer.dequantize(out.indices).movedim(-1, 1), out.quantized, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(simvq=True, ema=True), "simvq"), (dict(simvq=True, dead_code_threshold=1.0), "simvq"),
    (dict(init="pca"), "init"), (dict(kmeans_iters=0), "kmeans_iters"), (dict(kmeans_batches=0), "kmeans_batches"),
    (dict(codebook_dim=0), "codebook_dim"), (dict(codebook_dim=2.5), "codebook_dim"),
])
def test_large_codebook_options_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        vqkern.VectorQuantizer(8, 4, **kw)


def test_projected_layer_refuses_bad_input_and_keeps_its_state(device):
    layer = vqkern.VectorQuantizer(8, 6, codebook_dim=3, init="kmeans", kmeans_batches=2).to(device)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad, match in ((torch.randn(5, 4, device=device), "embedding_dim"),
                       (torch.randint(3, (5, 6), device=device), "floating")):
        with pytest.raises((ValueError, TypeError), match=match):
            layer(bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert layer._kmeans_rows == []


NEW_CONFIGS = {
    "simvq": dict(simvq=True),
    "projected_cosine": dict(codebook_dim=3, metric="cosine"),
    "kmeans_ema_projected": dict(init="kmeans", kmeans_iters=2, ema=True, decay=0.5, codebook_dim=3, metric="cosine"),
}


@pytest.mark.parametrize("config", list(NEW_CONFIGS))
@pytest.mark.parametrize("use_compile", [True])
def test_large_codebook_options_train_under_compile(use_compile, config, device):
    """torch.compile(fullgraph=True) follows eager step for step; k-means runs eagerly on
    the first batch, before the compiled steps (it is a graph break while pending)."""
    kw = NEW_CONFIGS[config]
    torch.manual_seed(0)
    eager = TinyVQVAE("torch", **kw).to(device)
    x = torch.rand(8, 1, 8, 8, device=device)
    if kw.get("init") == "kmeans":
        eager(x)
    compiled = copy.deepcopy(eager)
    expected = _train(eager, eager, x)
    step = torch.compile(compiled, fullgraph=True) if use_compile else compiled
    got = _train(compiled, step, x)
    assert got == pytest.approx(expected, rel=1e-4)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-4, atol=1e-6, msg=name)
