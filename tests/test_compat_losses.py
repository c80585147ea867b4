"""Cross-entropy of codes (commitment_use_cross_entropy_loss, forward indices=) streamed over
code tiles: values and gradients as vector-quantize-pytorch's full-matrix F.cross_entropy."""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from vqkern.compat import VectorQuantize
from vqkern.compat.losses import code_cross_entropy

from test_compat import DIM, K, assert_states_close, make_input, make_pair
from test_compat_options import assert_steps_match, random_mask, step

vqp = pytest.importorskip("vector_quantize_pytorch")


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
@pytest.mark.parametrize("tile_bytes", [None, 4 * 1024 * 3], ids=["one_tile", "tiles_of_3_codes"])
def test_streaming_cross_entropy_matches_full_matrix(cosine, tile_bytes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 6, generator=g, dtype=torch.float64)
    e = torch.randn(10, 6, generator=g, dtype=torch.float64)
    if cosine:
        x, e = F.normalize(x, dim=-1), F.normalize(e, dim=-1)
    target = torch.randint(0, 10, (1500,), generator=g)
    target[::7] = -1
    w = torch.rand(1500, generator=g, dtype=torch.float64)

    x32, e32 = x.float().requires_grad_(), e.float().requires_grad_()
    loss = code_cross_entropy(x32, e32, target, cosine=cosine, tile_bytes=tile_bytes)
    (loss * w.float()).sum().backward()

    x64, e64 = x.clone().requires_grad_(), e.clone().requires_grad_()
    logits = x64 @ e64.t() if cosine else -torch.cdist(x64, e64)
    ref = F.cross_entropy(logits, target, ignore_index=-1, reduction="none")
    (ref * w).sum().backward()
    assert (loss[target == -1] == 0).all()
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x32.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(e32.grad.double(), e64.grad, atol=1e-4, rtol=1e-4)


def test_bad_targets_name_indices():
    with pytest.raises(ValueError, match="indices"):
        code_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 5, 0]))
    with pytest.raises(ValueError, match="indices"):
        code_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2]))


CE_OPTIONS = {
    "default": dict(),
    "cosine": dict(use_cosine_sim=True),
    "heads_separate": dict(heads=2, separate_codebook_per_head=True, codebook_dim=4),
    "heads_shared": dict(heads=2, codebook_dim=8),
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "weighted_dead_code": dict(commitment_weight=0.3, threshold_ema_dead_code=1),
}


def true_gradient_reference(ref, x, seed, **forward_kw):
    """vector_quantize_pytorch's step, with its input gradient taken without the EMA update.

    Its EMA step rewrites the codebook through ``embed.data`` after the logits were
    computed, so its backward silently uses the updated codes for the logits'
    gradient. A copy of the same state run without the EMA update gives the gradient
    of the loss it returns, which is what vqkern computes.
    """
    stepped = step(ref, x, seed, **forward_kw)
    if not ref.ema_update:
        return stepped
    frozen = copy.deepcopy(ref_states[id(ref)])
    grad = step(frozen, x, seed, freeze_codebook=True, **forward_kw)[3]
    return (*stepped[:3], grad)


ref_states = {}


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("name", list(CE_OPTIONS))
def test_cross_entropy_commitment_matches(name, masked):
    kw = dict(dim=DIM, codebook_size=K, commitment_use_cross_entropy_loss=True, **CE_OPTIONS[name])
    ref, ours = make_pair(**kw)
    for s in range(3):
        x = make_input(kw, seed=s)
        forward_kw = dict(mask=random_mask(3, 10, seed=s)) if masked else {}
        ref_states[id(ref)] = copy.deepcopy(ref)
        assert_steps_match(true_gradient_reference(ref, x, s, **forward_kw), step(ours, x, s, **forward_kw), s)
        if kw.get("learnable_codebook"):
            torch.testing.assert_close(ours._codebook.embed.grad, ref._codebook.embed.grad, atol=1e-6, rtol=1e-4)
    assert_states_close(ref, ours)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["default", "cosine", "heads_separate", "heads_shared", "learnable"])
def test_cross_entropy_of_given_indices_matches(name, training):
    kw = dict(dim=DIM, codebook_size=K, **CE_OPTIONS[name])
    ref, ours = make_pair(**kw)
    ref.train(training), ours.train(training)
    for s in range(2):
        x = make_input(kw, seed=s)
        g = torch.Generator().manual_seed(s)
        shape = (3, 10) if kw.get("heads", 1) == 1 else (3, 10, kw["heads"])
        indices = torch.randint(0, K, shape, generator=g)
        indices[0, :3] = -1
        outs = []
        # vector_quantize_pytorch's EMA step corrupts its own input gradient (see
        # true_gradient_reference): its gradient comes from a copy without that step.
        grad_ref = copy.deepcopy(ref)
        for module, forward_kw in ((ref, {}), (ours, {}), (grad_ref, dict(freeze_codebook=True))):
            xx = x.clone().requires_grad_()
            torch.manual_seed(s)
            quantized, ce = module(xx, indices=indices, **forward_kw)
            (ce + 0.1 * quantized.square().sum()).backward()
            outs.append((quantized.detach(), ce.detach(), xx.grad))
        (q_r, ce_r, _), (q_o, ce_o, g_o), (_, _, g_r) = outs
        assert q_o.shape == q_r.shape and ce_o.shape == ce_r.shape == ()
        torch.testing.assert_close(q_o, q_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ce_o, ce_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_o, g_r, atol=1e-5, rtol=1e-4)
        if kw.get("learnable_codebook"):
            torch.testing.assert_close(ours._codebook.embed.grad, ref._codebook.embed.grad, atol=1e-6, rtol=1e-4)
    assert_states_close(ref, ours)


def test_given_indices_are_checked():
    vq = VectorQuantize(dim=DIM, codebook_size=K)
    with pytest.raises(ValueError, match="indices"):
        vq(make_input({}), indices=torch.full((3, 10), K))
    with pytest.raises(ValueError, match="indices"):
        vq(make_input({}), indices=torch.zeros(3, 9, dtype=torch.int64))


@pytest.mark.slow  # ~40 s: forward and backward over 4096 x 65536 logits on one thread
def test_cross_entropy_never_materializes_n_by_k():
    code = textwrap.dedent("""
        import resource, torch
        torch.set_num_threads(1)
        from vqkern.compat.losses import code_cross_entropy
        x = torch.randn(4096, 4, requires_grad=True)
        e = torch.randn(65536, 4, requires_grad=True)
        t = torch.randint(0, 65536, (4096,))
        code_cross_entropy(x[:8], e[:8], t[:8] % 8).sum().backward()  # load the kernels first
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        code_cross_entropy(x, e, t).sum().backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(x.grad).all() and torch.isfinite(e.grad).all()
        print((after - before) / 1024)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown_mib = float(result.stdout.strip().splitlines()[-1])
    assert grown_mib < 256, f"peak memory grew by {grown_mib:.0f} MiB (N x K would be 1024 MiB)"


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
@pytest.mark.parametrize("tile_bytes", [None, 4 * 1024 * 3], ids=["one_tile", "tiles_of_3_codes"])
def test_streaming_diversity_matches_full_matrix(cosine, tile_bytes):
    from vqkern.compat.losses import codebook_diversity_loss

    g = torch.Generator().manual_seed(0)
    c, groups, positions, k, d = 2, 3, 500, 10, 6
    x = torch.randn(c, groups * positions, d, generator=g, dtype=torch.float64)
    e = torch.randn(c, k, d, generator=g, dtype=torch.float64)
    if cosine:
        x, e = F.normalize(x, dim=-1), F.normalize(e, dim=-1)
    x32, e32 = x.float().requires_grad_(), e.float().requires_grad_()
    loss = codebook_diversity_loss(x32, e32, positions=positions, temperature=3.0, cosine=cosine,
                                   tile_bytes=tile_bytes)
    (loss * 2.0).backward()
    x64, e64 = x.clone().requires_grad_(), e.clone().requires_grad_()
    logits = torch.einsum("cmd,ckd->cmk", x64, e64) if cosine else -torch.cdist(x64, e64)
    prob = (logits * 3.0).softmax(-1).reshape(c, groups, positions, k)
    avg = prob.mean(dim=(0, 1))
    ref = -(-(avg * avg.clamp(min=1e-5).log()).sum(-1)).mean()
    (ref * 2.0).backward()
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x32.grad.double(), x64.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(e32.grad.double(), e64.grad, atol=1e-6, rtol=1e-4)


def test_streaming_diversity_error_at_the_default_temperature():
    # At temperature 100 the softmax amplifies fp32 rounding of the distances a hundredfold:
    # vqkern's gradient error against fp64 stays within twice that of the plain fp32
    # full-matrix computation (the conventions' rule for gradients).
    from vqkern.compat.losses import codebook_diversity_loss

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3 * 40, 8, generator=g, dtype=torch.float64) * 0.3
    e = torch.randn(1, 24, 8, generator=g, dtype=torch.float64) * 0.3

    def full(xx, ee):
        logits = -torch.cdist(xx, ee)
        avg = (logits * 100.0).softmax(-1).reshape(1, 3, 40, 24).mean(dim=(0, 1))
        return (avg * avg.clamp(min=1e-5).log()).sum(-1).mean()

    grads = {}
    for name, fn, dtype in (("fp64", full, torch.float64), ("fp32", full, torch.float32),
                            ("ours", lambda a, b: codebook_diversity_loss(a, b, positions=40, temperature=100.0),
                             torch.float32)):
        xx = x.detach().to(dtype).clone().requires_grad_()
        fn(xx, e.to(dtype)).backward()
        grads[name] = xx.grad.double()
    err_ours = (grads["ours"] - grads["fp64"]).abs().max()
    err_plain = (grads["fp32"] - grads["fp64"]).abs().max()
    assert err_ours <= 2 * err_plain + 1e-7, (err_ours, err_plain)


DIVERSITY_OPTIONS = {
    # Temperature 10, not the default 100, for the comparison with the upstream's fp32
    # gradients: at 100 both sit ~1e-5 from the fp64 gradient (see the test above).
    "default": dict(codebook_diversity_loss_weight=0.5, codebook_diversity_temperature=10.0),
    "cosine_temperature": dict(codebook_diversity_loss_weight=1.0, codebook_diversity_temperature=5.0,
                               use_cosine_sim=True),
    "heads_separate": dict(codebook_diversity_loss_weight=0.5, heads=2, separate_codebook_per_head=True,
                           codebook_dim=4),
    "heads_shared_learnable": dict(codebook_diversity_loss_weight=0.5, codebook_diversity_temperature=10.0,
                                   heads=2, codebook_dim=8,
                                   learnable_codebook=True, ema_update=False),
}


@pytest.mark.parametrize("name", list(DIVERSITY_OPTIONS))
def test_codebook_diversity_loss_matches(name):
    kw = dict(dim=DIM, codebook_size=K, **DIVERSITY_OPTIONS[name])
    ref, ours = make_pair(**kw)
    for s in range(3):
        x = make_input(kw, seed=s)
        ref_states[id(ref)] = copy.deepcopy(ref)
        assert_steps_match(true_gradient_reference(ref, x, s), step(ours, x, s), s)
        if kw.get("learnable_codebook"):
            torch.testing.assert_close(ours._codebook.embed.grad, ref._codebook.embed.grad, atol=1e-6, rtol=1e-4)
            ref.zero_grad(), ours.zero_grad()
    assert_states_close(ref, ours)
    *_, breakdown = ours(make_input(kw, seed=5), return_loss_breakdown=True)
    *_, breakdown_ref = ref(make_input(kw, seed=5), return_loss_breakdown=True)
    torch.testing.assert_close(breakdown.codebook_diversity, breakdown_ref.codebook_diversity, atol=1e-6, rtol=1e-5)
