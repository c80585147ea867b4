"""VectorQuantizer against ReferenceVectorQuantizer; EMA, dead codes, channel-first, compile."""
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
