"""vqkern.patch on diffusers' VectorQuantizer (VQModel's quantizer), built from tiny configs."""
import copy

import numpy as np
import pytest
import torch

import vqkern

from patch_parity import (
    assert_codes_agree,
    assert_no_rows_by_codes,
    assert_state_dicts_equal,
    compare_training,
    patched_copy,
    tensor_objects,
    train_models_alike,
)

diffusers = pytest.importorskip("diffusers", reason="diffusers is installed by requirements-test.txt")
from diffusers import VQModel  # noqa: E402
from diffusers.models.autoencoders.vae import VectorQuantizer  # noqa: E402

D, K = 8, 32


def tiny_vqmodel(**kw):
    torch.manual_seed(0)
    return VQModel(in_channels=1, out_channels=1, block_out_channels=(16,), norm_num_groups=8, latent_channels=D,
                   num_vq_embeddings=K, **kw)


def call(module, z):
    quantized, loss, (_, _, indices) = module(z)
    return quantized, loss, indices


def search_space(module, z):
    return z.movedim(1, -1).reshape(-1, z.shape[1]), module.embedding.weight


@pytest.mark.parametrize("kw", [dict(), dict(legacy=False), dict(sane_index_shape=True)],
                         ids=["legacy", "beta_on_commitment", "sane_index_shape"])
def test_training_matches(kw):
    if kw:
        torch.manual_seed(0)
        layer = VectorQuantizer(K, D, beta=0.25, **kw)
    else:
        layer = tiny_vqmodel().quantize
    compare_training(layer, shape=(2, D, 4, 5), call=call, search_space=search_space, scale=0.05)


def test_bfloat16_training_matches():
    layer = tiny_vqmodel().quantize
    compare_training(layer, shape=(2, D, 4, 4), call=call, search_space=search_space, scale=0.05,
                     dtype=torch.bfloat16, steps=2)


def test_remap_matches(tmp_path):
    # A remap table with a repeated code (the first position wins) and codes the search can
    # pick that are not in it: unknown indices are drawn by torch.randint, or fixed.
    used = np.array([3, 7, 1, 7, 30, 12, 5], dtype=np.int64)
    np.save(tmp_path / "used.npy", used)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, D, 4, 4, generator=g) * 0.05
    for unknown in ("random", "extra", 2):
        torch.manual_seed(0)
        layer = VectorQuantizer(K, D, beta=0.25, remap=str(tmp_path / "used.npy"), unknown_index=unknown)
        ours, _ = patched_copy(layer)
        torch.manual_seed(5)
        _, loss_ref, (_, _, ref) = layer(z)
        torch.manual_seed(5)
        _, loss_our, (_, _, got) = ours(z)
        assert got.shape == ref.shape == (32, 1) and got.dtype == ref.dtype
        assert torch.equal(got, ref), unknown
        assert torch.equal(loss_our, loss_ref) or torch.allclose(loss_our, loss_ref, rtol=1e-6)
        inds = torch.tensor([[3, 7, 1, 30, 31, 0], [5, 12, 12, 4, 7, 6]])
        torch.manual_seed(6)
        want = layer.remap_to_used(inds)
        torch.manual_seed(6)
        assert torch.equal(ours.remap_to_used(inds), want)


def test_whole_model_trains_alike():
    """VQModel's forward (encode, quantize, decode) and three Adam steps, original and patched."""
    model = tiny_vqmodel()
    ours, patched = patched_copy(model)
    assert patched == {"quantize": "VectorQuantizer"}
    seen = {}
    for name, m in (("orig", model), ("ours", ours)):
        # The quantizer's input and codebook as it searched them (the optimizer moves the codebook after).
        m.quantize.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(
            name, (args[0].detach().clone(), mod.embedding.weight.detach().clone(), out[2][2])))

    def loss_of(m, x):
        out = m(x)
        return torch.nn.functional.mse_loss(out.sample, x) + out.commit_loss

    def after_step(step):
        (z, codebook, ref), (_, _, got) = seen["orig"], seen["ours"]
        same = assert_codes_agree(z.movedim(1, -1), codebook, got, ref)
        assert bool(same.all()), f"step {step}: near-ties in the encoder's output; the values need one code"

    g = torch.Generator().manual_seed(1)
    keys = [key for key, _ in model.named_parameters() if key.endswith("attentions.0.to_k.bias")]
    assert keys  # the mid block's attention: its key bias gets only rounding noise
    train_models_alike(model, ours, [torch.rand(2, 1, 8, 8, generator=g) for _ in range(3)], loss_of, after_step,
                       zero_grad_keys=keys)


def test_patch_keeps_the_layer():
    model = tiny_vqmodel()
    before = tensor_objects(model)
    text = repr(model)
    reference = copy.deepcopy(model)
    assert vqkern.patch(model) == {"quantize": "VectorQuantizer"}
    assert isinstance(model.quantize, VectorQuantizer) and repr(model) == text
    after = tensor_objects(model)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert_state_dicts_equal(model, reference)
    assert vqkern.patch(model) == {}
    assert vqkern.unpatch(model) == {"quantize": "VectorQuantizer"}
    assert "forward" not in vars(model.quantize) and "remap_to_used" not in vars(model.quantize)
    assert model.quantize.forward.__func__ is VectorQuantizer.forward


def test_no_rows_by_codes_matrix():
    """The original's largest tensor is its N x K distance matrix; the patched layer's,
    forward and backward, stays a small fraction of it."""
    torch.manual_seed(0)
    layer = VectorQuantizer(512, D, beta=0.25)
    assert_no_rows_by_codes(layer, patched_copy(layer)[0], torch.randn(4, D, 16, 16), 512)


def test_bad_input_names_the_argument():
    ours, _ = patched_copy(tiny_vqmodel().quantize)
    with pytest.raises(ValueError, match=r"z must have shape \(B, vq_embed_dim, H, W\) with 8 channels"):
        ours(torch.randn(2, D + 1, 4, 4))
    with pytest.raises(ValueError, match="z must have shape"):
        ours(torch.randn(2, D, 4))
    with pytest.raises(TypeError, match="z must have a floating dtype"):
        ours(torch.zeros(2, D, 4, 4, dtype=torch.int64))


@pytest.mark.slow  # ~30 s on 2 loaded cores, mostly inductor's compile
def test_torch_compile_fullgraph():
    layer = tiny_vqmodel().quantize
    ours, _ = patched_copy(layer)
    compiled = torch.compile(ours, fullgraph=True)
    z = torch.randn(2, D, 4, 4) * 0.05
    for module in (layer, compiled):
        module.zero_grad()
    zz = [z.clone().requires_grad_() for _ in range(2)]
    outs = [layer(zz[0]), compiled(zz[1])]
    for q, loss, _ in outs:
        (q.square().sum() + loss).backward()
    assert torch.equal(outs[1][2][2], outs[0][2][2])
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(zz[1].grad, zz[0].grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.embedding.weight.grad, layer.embedding.weight.grad, rtol=1e-5, atol=1e-7)


_OUT_OF_MEMORY = r"""
import resource, torch, vqkern
from diffusers.models.autoencoders.vae import VectorQuantizer

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

torch.manual_seed(0)
layer = VectorQuantizer(16384, 4, beta=0.25)
ours = VectorQuantizer(16384, 4, beta=0.25)
ours.load_state_dict(layer.state_dict())
vqkern.patch(ours)
z = torch.randn(1, 4, 256, 256) * 0.01   # N = 65536 rows: N x K fp32 is 4 GiB
ours(z[:, :, :8].clone().requires_grad_())  # start the kernel's threads before the limit
limit = vm_bytes() + (2 << 30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    layer(z)
    print("original: ran")
except RuntimeError as exc:
    print("original: out of memory" if "alloc" in str(exc) else f"original: {exc}")
zz = z.clone().requires_grad_()
q, loss, (_, _, idx) = ours(zz)
(q.square().sum() + loss).backward()
finite = bool(torch.isfinite(zz.grad).all()), bool(torch.isfinite(ours.embedding.weight.grad).all())
print("patched: ran", tuple(idx.shape), *finite)
"""


@pytest.mark.slow  # ~30 s: a fresh interpreter imports torch, vqkern and diffusers
def test_patched_layer_runs_where_the_distance_matrix_does_not_fit():
    """Under an address-space limit of 2 GiB above what the process holds, the original's
    4 GiB distance matrix cannot be allocated; the patched layer trains a step in it."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "original: out of memory" in run.stdout, run.stdout
    assert "patched: ran (65536,) True True" in run.stdout, run.stdout
