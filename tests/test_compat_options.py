"""vqkern.compat options beyond a plain VQ-VAE, against vector-quantize-pytorch 1.32:
masks, per-call EMA control, frozen codebooks, 3-d feature maps, residual-VQ dropout,
shared codebooks, grouped residual VQ. Same outputs, losses, gradients and buffers
from the same initial state and inputs; deterministic options exactly."""
import pytest
import torch

from vqkern.compat import GroupedResidualVQ, ResidualVQ, VectorQuantize

from test_compat import DIM, K, assert_states_close, make_input, make_pair

vqp = pytest.importorskip("vector_quantize_pytorch")


def random_mask(batch, n, seed, keep=0.6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, n, generator=g) < keep
    mask[:, 0] = True  # every sequence has a row
    return mask


def step(module, x, seed, **forward_kw):
    """One forward/backward with a non-trivial output gradient; returns what both must agree on."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = module(x, **forward_kw)
    quantized, indices, loss = out[:3]
    w = torch.linspace(-1, 1, quantized.shape[-1])  # position-independent: padded and unpadded runs agree
    ((quantized * w).sum() + loss.sum()).backward()
    return quantized.detach(), indices, loss.detach(), x.grad


def assert_steps_match(ref, ours, seed):
    (q_r, i_r, l_r, g_r), (q_o, i_o, l_o, g_o) = ref, ours
    assert i_o.shape == i_r.shape and i_o.dtype == i_r.dtype
    assert torch.equal(i_o, i_r), f"seed {seed}: {(i_o != i_r).sum()} indices differ"
    assert q_o.shape == q_r.shape and q_o.dtype == q_r.dtype
    torch.testing.assert_close(q_o, q_r, atol=1e-5, rtol=1e-5)
    assert l_o.shape == l_r.shape and l_o.dtype == l_r.dtype
    torch.testing.assert_close(l_o, l_r, atol=1e-6, rtol=1e-5)
    if g_r is None:
        assert g_o is None
    else:
        torch.testing.assert_close(g_o, g_r, atol=1e-5, rtol=1e-4)


# ---- masks ------------------------------------------------------------------------

MASK_OPTIONS = {
    "default": dict(),
    "cosine": dict(use_cosine_sim=True),
    "kmeans_init": dict(kmeans_init=True, kmeans_iters=3),
    "dead_code": dict(threshold_ema_dead_code=2),
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "straight_through": dict(rotation_trick=False),
    "channel_first": dict(channel_last=False),
    "padding_is_input": dict(return_zeros_for_masked_padding=False),
    "no_commitment": dict(commitment_weight=0.0),
}


@pytest.mark.parametrize("how", ["mask", "lens"])
@pytest.mark.parametrize("name", list(MASK_OPTIONS))
def test_mask_matches(name, how):
    kw = dict(dim=DIM, codebook_size=K, **MASK_OPTIONS[name])
    ref, ours = make_pair(**kw)
    for s in range(3):
        x = make_input(kw, batch=3, n=12, seed=s)
        lens = torch.tensor([12, 5, 1])
        ref_kw = ours_kw = dict(mask=random_mask(3, 12, seed=s)) if how == "mask" else dict(lens=lens)
        if how == "lens" and kw.get("channel_last") is False:
            # vector_quantize_pytorch measures lens against x.shape[1], the features of a
            # channel-first input, and fails; vqkern measures it against the sequence.
            ref_kw = dict(mask=torch.arange(12) < lens[:, None])
        r = step(ref, x, 100 + s, **ref_kw)
        o = step(ours, x, 100 + s, **ours_kw)
        assert_steps_match(r, o, s)
        if kw.get("learnable_codebook"):
            torch.testing.assert_close(ours._codebook.embed.grad, ref._codebook.embed.grad, atol=1e-6, rtol=1e-5)
    assert_states_close(ref, ours)
    ref.eval(), ours.eval()
    x = make_input(kw, batch=3, n=12, seed=9)
    mask = random_mask(3, 12, seed=9)
    for a, b in zip(ours(x, mask=mask), ref(x, mask=mask)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kw", [
    dict(), dict(heads=2, separate_codebook_per_head=True, codebook_dim=4), dict(heads=2),
    dict(codebook_dim=8, threshold_ema_dead_code=1.5), dict(kmeans_init=True, kmeans_iters=2, heads=2),
], ids=["plain", "heads_separate_projected", "heads_shared", "projected_dead_code", "kmeans_heads"])
def test_padding_takes_no_part(kw):
    # A batch with padding rows behaves as the batch of its real rows alone: the same
    # codes, outputs, loss, gradients and codebook state (a check that needs no
    # upstream, and covers the head layouts where vector_quantize_pytorch's masked
    # commitment loss fails on shapes).
    kw = dict(dim=DIM, codebook_size=K, decay=0.7, **kw)
    torch.manual_seed(0)
    padded = VectorQuantize(**kw)
    alone = VectorQuantize(**kw)
    alone.load_state_dict(padded.state_dict())
    for s in range(3):
        x = make_input({}, batch=1, n=14, seed=s)
        n_real = 9 - s
        x_pad = x.clone()
        x_pad[:, n_real:] = 1e3  # would dominate every statistic if it took part
        mask = torch.arange(14) < n_real
        q_p, i_p, l_p, g_p = step(padded, x_pad, seed=s, mask=mask[None])
        q_a, i_a, l_a, g_a = step(alone, x[:, :n_real], seed=s)
        assert torch.equal(i_p[:, :n_real], i_a) and (i_p[:, n_real:] == -1).all()
        torch.testing.assert_close(q_p[:, :n_real], q_a, atol=1e-6, rtol=1e-6)
        assert (q_p[:, n_real:] == 0).all()
        torch.testing.assert_close(l_p, l_a, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g_p[:, :n_real], g_a, atol=1e-6, rtol=1e-5)
        assert_states_close(alone, padded, atol=1e-6, rtol=1e-6)


def test_mask_errors_name_the_argument():
    vq = VectorQuantize(dim=DIM, codebook_size=K)
    x = make_input({})
    with pytest.raises(ValueError, match="mask"):
        vq(x, mask=torch.ones(3, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        vq(x, mask=torch.ones(3, 10))
    with pytest.raises(ValueError, match="mask or lens"):
        vq(x, mask=torch.ones(3, 10, dtype=torch.bool), lens=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="lens"):
        vq(x, lens=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="mask"):
        VectorQuantize(dim=DIM, codebook_size=K, accept_image_fmap=True)(
            torch.randn(1, DIM, 2, 2), mask=torch.ones(1, 4, dtype=torch.bool))


# ---- per-call EMA control, frozen codebooks --------------------------------------------

def _weights(kind):
    w = (torch.arange(K) % 3 == 0).float() * 0.5 + (torch.arange(K) % 3 == 1).float()
    return w if kind == "tensor" else (lambda sums, counts: w)


FORWARD_OPTIONS = {
    "ema_weight_tensor": (dict(), lambda: dict(ema_update_weight=_weights("tensor"))),
    "ema_weight_callable": (dict(use_cosine_sim=True), lambda: dict(ema_update_weight=_weights("callable"))),
    "ema_update_off": (dict(threshold_ema_dead_code=2), lambda: dict(ema_update=False)),
    "ema_update_off_no_dead": (dict(), lambda: dict(ema_update=False)),
    "freeze_forward": (dict(threshold_ema_dead_code=2), lambda: dict(freeze_codebook=True)),
    "freeze_learnable": (dict(learnable_codebook=True, ema_update=False), lambda: dict(freeze_codebook=True)),
    "temperature_zero": (dict(stochastic_sample_codes=True, sample_codebook_temp=0.5),
                         lambda: dict(sample_codebook_temp=0.0)),
}


@pytest.mark.parametrize("name", list(FORWARD_OPTIONS))
def test_forward_options_match(name):
    ctor, forward_kw = FORWARD_OPTIONS[name]
    kw = dict(dim=DIM, codebook_size=K, **ctor)
    ref, ours = make_pair(**kw)
    start = ours.state_dict()
    for s in range(3):
        x = make_input(kw, seed=s)
        assert_steps_match(step(ref, x, s, **forward_kw()), step(ours, x, s, **forward_kw()), s)
        if kw.get("learnable_codebook"):
            for a, b in ((ours._codebook.embed.grad, ref._codebook.embed.grad),):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b)
    assert_states_close(ref, ours)
    if name.startswith("freeze") or name == "ema_update_off_no_dead":
        for key, value in ours.state_dict().items():
            assert torch.equal(value, start[key]), f"{key} moved with a frozen codebook"


CTOR_OPTIONS = {
    "freeze_ctor": dict(freeze_codebook=True, threshold_ema_dead_code=2),
    "manual_ema": dict(manual_ema_update=True),
    "layernorm_after_project_in": dict(codebook_dim=8, layernorm_after_project_in=True),
    "no_route_to_input": dict(route_gradients_to_input=False),
    "sync_kmeans_off": dict(sync_kmeans=False, kmeans_init=True, kmeans_iters=2),
    "accept_3d_fmap": dict(accept_3d_fmap=True, heads=2, separate_codebook_per_head=True, codebook_dim=DIM // 2),
    "stochastic_eval_only_temp": dict(stochastic_sample_codes=True, sample_codebook_temp=0.0),
    "orthogonal_reg": dict(orthogonal_reg_weight=0.5),
    "orthogonal_reg_active_max": dict(orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True,
                                      orthogonal_reg_max_codes=5, codebook_dim=4),
    "orthogonal_reg_learnable": dict(orthogonal_reg_weight=0.3, learnable_codebook=True, ema_update=False,
                                     orthogonal_reg_max_codes=7),
    "sync_update_v": dict(learnable_codebook=True, ema_update=False, sync_update_v=0.4),
    "directional_reparam": dict(directional_reparam=True, threshold_ema_dead_code=1, directional_reparam_variance=0.1),
}


@pytest.mark.parametrize("name", list(CTOR_OPTIONS))
def test_constructor_options_match(name):
    kw = dict(dim=DIM, codebook_size=K, **CTOR_OPTIONS[name])
    ref, ours = make_pair(**kw)
    for s in range(3):
        x = torch.randn(2, DIM, 2, 3, 2) if kw.get("accept_3d_fmap") else make_input(kw, seed=s)
        assert_steps_match(step(ref, x, s), step(ours, x, s), s)
        if ref._codebook.learnable_codebook:
            torch.testing.assert_close(ours._codebook.embed.grad, ref._codebook.embed.grad, atol=1e-6, rtol=1e-5)
            ref.zero_grad(), ours.zero_grad()
    assert_states_close(ref, ours)
    ref.eval(), ours.eval()
    x = torch.randn(2, DIM, 2, 3, 2) if kw.get("accept_3d_fmap") else make_input(kw, seed=7)
    q_r, i_r, _ = ref(x)
    q_o, i_o, _ = ours(x)
    assert torch.equal(i_o, i_r)
    torch.testing.assert_close(q_o, q_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.get_output_from_indices(i_o), ref.get_output_from_indices(i_r))


def test_accumulated_ema_update_matches():
    kw = dict(dim=DIM, codebook_size=K, decay=0.6)
    ref, ours = make_pair(**kw)
    start = ours.codebook.clone()
    for s, accum in enumerate((True, True, False, True, False)):
        x = make_input(kw, seed=s)
        assert_steps_match(step(ref, x, s, accum_ema_update=accum), step(ours, x, s, accum_ema_update=accum), s)
        if s == 1:
            assert torch.equal(ours.codebook, start), "accumulating steps must not move the codebook"
        assert_states_close(ref, ours)
    assert not torch.equal(ours.codebook, start)


@pytest.mark.parametrize("kw", [dict(), dict(heads=2, separate_codebook_per_head=True), dict(heads=2, codebook_dim=4),
                                dict(threshold_ema_dead_code=2)],
                         ids=["plain", "heads_separate", "heads_shared", "dead_code"])
def test_update_indices_matches(kw):
    # Codes chosen without an EMA step, then the EMA step from outside, as the
    # upstream's beam search and manual updates do.
    kw = dict(dim=DIM, codebook_size=K, **kw)
    ref, ours = make_pair(**kw)
    for s in range(3):
        x = make_input(kw, seed=s)
        mask = random_mask(3, 10, seed=s)
        with torch.no_grad():
            ref.eval(), ours.eval()
            _, idx, _ = ours(x)
            _, idx_ref, _ = ref(x)
            ref.train(), ours.train()
        assert torch.equal(idx, idx_ref)
        torch.manual_seed(s)
        ref.update_ema_indices(x, idx_ref, mask=mask)
        torch.manual_seed(s)
        ours.update_ema_indices(x, idx, mask=mask)
        assert_states_close(ref, ours)


def test_update_indices_leaves_out_minus_one():
    # -1 (a masked or dropped position) takes no part, as a masked row does.
    kw = dict(dim=DIM, codebook_size=K)
    _, a = make_pair(**kw)
    _, b = make_pair(**kw)
    x = make_input(kw)
    a.eval()
    _, idx, _ = a(x)
    a.train()
    mask = random_mask(3, 10, seed=1)
    a.update_indices(x, idx.masked_fill(~mask, -1))
    b.update_indices(x, idx, mask=mask)
    assert_states_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="indices"):
        a.update_indices(x, idx.clamp(max=K - 1) + 1)


def test_ema_update_weight_bad_shape_leaves_state():
    vq = VectorQuantize(dim=DIM, codebook_size=K)
    start = {k: v.clone() for k, v in vq.state_dict().items()}
    with pytest.raises(ValueError, match="ema_update_weight"):
        vq(make_input({}), ema_update_weight=torch.ones(K + 1))
    for key, value in vq.state_dict().items():
        assert torch.equal(value, start[key]), key


def test_codebook_setter():
    ref, ours = make_pair(dim=DIM, codebook_size=K, heads=2, separate_codebook_per_head=True)
    codes = torch.randn(2, K, DIM)
    ours.codebook = codes
    ref.codebook = codes
    assert torch.equal(ours.codebook, ref.codebook)
    with pytest.raises(ValueError, match="codebook"):
        ours.codebook = torch.randn(K, DIM)


# ---- residual VQ -------------------------------------------------------------------

RVQ_OPTIONS = {
    "dropout": dict(num_quantizers=4, codebook_size=K, quantize_dropout=True),
    "dropout_cutoff_multiple": dict(num_quantizers=6, codebook_size=K, quantize_dropout=True,
                                    quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2),
    "shared": dict(num_quantizers=3, codebook_size=K, shared_codebook=True),
    # Re-seeding a shared codebook from every layer's residuals makes near-duplicate
    # codes (residuals of ~0 where a row's own copy was its code), near-ties that the
    # two searches may break apart; at 0.7 (each layer decays the shared counts) a few
    # codes die at each step and no such near-tie arises.
    "shared_dead_code_dropout": dict(num_quantizers=3, codebook_size=K, shared_codebook=True,
                                     threshold_ema_dead_code=0.7, quantize_dropout=True),
    "shared_kmeans": dict(num_quantizers=2, codebook_size=8, shared_codebook=True, kmeans_init=True, kmeans_iters=2),
    "quant_grad_frac": dict(num_quantizers=3, codebook_size=K, quant_grad_frac=0.3, codebook_dim=8),
    "learnable_grad_frac": dict(num_quantizers=2, codebook_size=K, quant_grad_frac=0.5, learnable_codebook=True,
                                ema_update=False),
    "diveq": dict(num_quantizers=3, codebook_size=K, diveq=True),
    "implicit_neural_codebook": dict(num_quantizers=3, codebook_size=K, implicit_neural_codebook=True,
                                     mlp_kwargs=dict(depth=2, dim_hidden=8)),
    "implicit_dropout_projected": dict(num_quantizers=3, codebook_size=K, implicit_neural_codebook=True,
                                      quantize_dropout=True, codebook_dim=8),
    "implicit_shared": dict(num_quantizers=2, codebook_size=K, implicit_neural_codebook=True, shared_codebook=True),
}


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("name", list(RVQ_OPTIONS))
def test_residual_vq_options_match(name, masked):
    kw = dict(dim=DIM, **RVQ_OPTIONS[name])
    ref, ours = make_pair(vqp.ResidualVQ, ResidualVQ, **kw)
    dropped, reseeded = set(), False
    for s in range(4):
        x = make_input({}, batch=3, n=12, seed=s)
        forward_kw = dict(mask=random_mask(3, 12, seed=s)) if masked else {}
        r = step(ref, x, 10 + s, **forward_kw)
        o = step(ours, x, 10 + s, **forward_kw)
        assert_steps_match(r, o, s)
        dropped.add(int((o[1][0, 0] == -1).sum()))
        if kw.get("threshold_ema_dead_code"):
            # A re-seeded code's count is reset to the threshold exactly.
            reseeded = reseeded or bool((ours.layers[0]._codebook.cluster_size == kw["threshold_ema_dead_code"]).any())
        for p_r, p_o in zip(ref.parameters(), ours.parameters()):
            if p_r.grad is not None:
                torch.testing.assert_close(p_o.grad, p_r.grad, atol=1e-5, rtol=1e-4)
    assert_states_close(ref, ours)
    if kw.get("threshold_ema_dead_code"):
        assert reseeded, "no code was re-seeded"
    if kw.get("quantize_dropout"):
        assert len(dropped) > 1, "dropout depth never changed over the steps"
    ref.eval(), ours.eval()
    x = make_input({}, batch=3, n=12, seed=7)
    torch.manual_seed(0)  # diveq draws noise in evaluation too
    out_ours = ours(x, return_all_codes=True)
    torch.manual_seed(0)
    for a, b in zip(out_ours, ref(x, return_all_codes=True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    if not kw.get("diveq"):
        # The output is the sum of the codes it names (for QINCo, codes remade layer by layer).
        torch.testing.assert_close(ours.get_output_from_indices(out_ours[1]), out_ours[0], atol=1e-5, rtol=1e-5)


def test_dropout_fixed_seed_and_codes_from_indices():
    kw = dict(dim=DIM, num_quantizers=5, codebook_size=K, quantize_dropout=True, quantize_dropout_cutoff_index=1)
    ref, ours = make_pair(vqp.ResidualVQ, ResidualVQ, **kw)
    x = make_input({}, batch=2, n=6)
    for seed in (0, 1, 2, 3, 11):
        q_r, i_r, l_r = ref(x, rand_quantize_dropout_fixed_seed=seed, freeze_codebook=True)
        q_o, i_o, l_o = ours(x, rand_quantize_dropout_fixed_seed=seed, freeze_codebook=True)
        assert torch.equal(i_o, i_r)
        torch.testing.assert_close(q_o, q_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l_o, l_r)
        # Dropped layers are -1 and give zero codes; the output is their sum.
        codes = ours.get_codes_from_indices(i_o)
        torch.testing.assert_close(codes, ref.get_codes_from_indices(i_r))
        torch.testing.assert_close(ours.get_output_from_indices(i_o), q_o.detach(), atol=1e-5, rtol=1e-5)
    # Coarse codes (fewer layers) are padded as dropped.
    torch.testing.assert_close(ours.get_codes_from_indices(i_o[..., :2]), ref.get_codes_from_indices(i_r[..., :2]))
    assert torch.equal(ours.codebooks, ref.codebooks)
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=K).get_codes_from_indices(i_o[..., :2])


def test_shared_codebook_is_one_module_with_upstream_keys():
    kw = dict(dim=DIM, num_quantizers=3, codebook_size=K, shared_codebook=True)
    ref, ours = make_pair(vqp.ResidualVQ, ResidualVQ, **kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(layer._codebook is ours.layers[0]._codebook for layer in ours.layers)
    with pytest.raises(ValueError, match="shared_codebook"):
        ResidualVQ(dim=DIM, codebook_size=(K, 8), shared_codebook=True)


@pytest.mark.parametrize("kw", [
    dict(num_quantizers=3, codebook_size=K),
    dict(num_quantizers=4, codebook_size=K, quantize_dropout=True, quantize_dropout_multiple_of=2,
         threshold_ema_dead_code=1),
], ids=["plain", "soundstream"])
def test_grouped_residual_vq_matches(kw):
    kw = dict(dim=DIM, groups=2, **kw)
    ref, ours = make_pair(vqp.GroupedResidualVQ, GroupedResidualVQ, **kw)
    for s in range(4):
        x = make_input({}, batch=2, n=8, seed=s)
        assert_steps_match(step(ref, x, 20 + s), step(ours, x, 20 + s), s)
    assert_states_close(ref, ours)
    ref.eval(), ours.eval()
    x = make_input({}, batch=2, n=8, seed=5)
    q_r, i_r, l_r, c_r = ref(x, return_all_codes=True)
    q_o, i_o, l_o, c_o = ours(x, return_all_codes=True)
    assert i_o.shape == i_r.shape == (2, 2, 8, kw["num_quantizers"]) and l_o.shape == l_r.shape
    assert torch.equal(i_o, i_r)
    torch.testing.assert_close(q_o, q_r, atol=1e-6, rtol=1e-6)
    for a, b in zip(c_o, c_r):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.get_output_from_indices(i_o), ref.get_output_from_indices(i_r))
    torch.testing.assert_close(ours.get_codes_from_indices(i_o), ref.get_codes_from_indices(i_r))
    # Trained by EMA: the per-code sums are vqkern's blocked ones, so equal up to rounding.
    torch.testing.assert_close(ours.codebooks, ref.codebooks)


# ---- top-k codes and beam search ---------------------------------------------------------

@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kw", [dict(), dict(use_cosine_sim=True, rotation_trick=False), dict(commitment_weight=0.0),
                                dict(channel_last=False)], ids=["l2", "cosine_ste", "no_commitment", "channel_first"])
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_topk_matches(kw, training, masked):
    kw = dict(dim=DIM, codebook_size=K, **kw)
    ref, ours = make_pair(**kw)
    ref.train(training), ours.train(training)
    for s in range(2):
        x = make_input(kw, seed=s)
        forward_kw = dict(topk=3, mask=random_mask(3, 10, seed=s) if masked else None)
        r, o = step(ref, x, s, **forward_kw), step(ours, x, s, **forward_kw)
        assert o[1].shape == (3, 10, 3)
        assert_steps_match(r, o, s)
    assert_states_close(ref, ours)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_topk_with_loss_breakdown_matches(training):
    kw = dict(dim=DIM, codebook_size=K, orthogonal_reg_weight=0.5)
    ref, ours = make_pair(**kw)
    ref.train(training), ours.train(training)
    x = make_input(kw, seed=0)
    torch.manual_seed(0)
    *_, want = ref(x.clone(), topk=3, return_loss_breakdown=True)
    torch.manual_seed(0)
    *_, got = ours(x.clone(), topk=3, return_loss_breakdown=True)
    assert type(got).__name__ == "LossBreakdown"
    for name in got._fields:
        torch.testing.assert_close(torch.as_tensor(getattr(got, name)).float(),
                                   torch.as_tensor(getattr(want, name)).float(), msg=name)


def test_topk_one_is_the_search():
    vq = VectorQuantize(dim=DIM, codebook_size=K).eval()
    x = make_input({})
    q1, i1, _ = vq(x, topk=1)
    q, i, _ = vq(x)
    assert torch.equal(i1[..., 0], i) and torch.equal(q1[..., 0, :], q)
    with pytest.raises(ValueError, match="topk"):
        vq(x, topk=0)
    with pytest.raises(ValueError, match="topk"):
        VectorQuantize(dim=DIM, codebook_size=K, heads=2)(x, topk=2)


BEAM_OPTIONS = {
    "beam": dict(num_quantizers=3, codebook_size=K, beam_size=2, eval_beam_size=3),
    "beam_dropout_projected": dict(num_quantizers=4, codebook_size=K, beam_size=3, quantize_dropout=True,
                                   codebook_dim=8),
    "beam_weights_dead_code": dict(num_quantizers=3, codebook_size=K, beam_size=2, threshold_ema_dead_code=1,
                                   beam_score_quantizer_weights=[1.0, 0.5, 2.0]),
}


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("name", list(BEAM_OPTIONS))
def test_beam_search_matches(name, masked):
    import copy

    kw = dict(dim=DIM, **BEAM_OPTIONS[name])
    ref, ours = make_pair(vqp.ResidualVQ, ResidualVQ, **kw)
    before = copy.deepcopy(ours)
    x = make_input({}, batch=1, n=12, seed=0)
    mask = random_mask(1, 12, seed=0) if masked else None
    r, o = step(ref, x, 30, mask=mask), step(ours, x, 30, mask=mask)
    assert o[1].shape == (1, 12, kw["num_quantizers"]) and o[2].shape == (kw["num_quantizers"],)
    assert_steps_match(r, o, 0)
    for p_r, p_o in zip(ref.parameters(), ours.parameters()):
        if p_r.grad is not None:
            torch.testing.assert_close(p_o.grad, p_r.grad, atol=1e-5, rtol=1e-4)
    # The first layer is updated as vector_quantize_pytorch updates it. The others:
    # vector_quantize_pytorch updates none of them (it passes the first layer's input
    # for every layer and zip stops after one); vqkern updates each used layer from
    # its input on the best path and that path's codes.
    assert_states_close(ref.layers[0], ours.layers[0])
    indices = o[1]
    residual = before.project_in(x)
    torch.manual_seed(30)  # the forward draws nothing before the updates (no dropout with dead codes here)
    for q, layer in enumerate(before.layers):
        codes = indices[..., q]
        if (codes == -1).all():
            break
        code_vectors = layer.get_codes_from_indices(codes.clamp(min=0)) * (codes >= 0).unsqueeze(-1)
        layer.update_indices(residual, codes, mask=mask)
        residual = residual - code_vectors
        if q > 0:
            assert_states_close(layer, ours.layers[q])
    # Evaluation from one state: the same outputs.
    ref.load_state_dict(ours.state_dict())
    ref.eval(), ours.eval()
    for s in range(2):
        x = make_input({}, batch=1, n=12, seed=8 + s)
        for a, b in zip(ours(x, return_all_codes=True, mask=mask), ref(x, return_all_codes=True, mask=mask)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
