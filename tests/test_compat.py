"""vqkern.compat against vector-quantize-pytorch: same outputs, buffers, gradients, checkpoints."""
import pytest
import torch

from vqkern.compat import ResidualVQ, VectorQuantize

vqp = pytest.importorskip("vector_quantize_pytorch")

# (constructor options, how to lay out x)
OPTIONS = {
    "default": dict(),
    "codebook_dim": dict(codebook_dim=8),
    "heads_shared": dict(heads=2),
    "heads_separate": dict(heads=2, separate_codebook_per_head=True),
    "heads_projected": dict(heads=2, codebook_dim=4, separate_codebook_per_head=True),
    "decay_eps": dict(decay=0.95, eps=1e-3),
    "kmeans_init": dict(kmeans_init=True, kmeans_iters=4),
    "kmeans_init_cosine": dict(kmeans_init=True, kmeans_iters=3, use_cosine_sim=True),
    "kmeans_init_heads_shared": dict(kmeans_init=True, kmeans_iters=2, heads=2, threshold_ema_dead_code=1),
    "cosine": dict(use_cosine_sim=True),
    "dead_code": dict(threshold_ema_dead_code=2),
    "dead_code_heads": dict(threshold_ema_dead_code=1.5, heads=2, separate_codebook_per_head=True),
    "channel_first": dict(channel_last=False),
    "image_fmap": dict(accept_image_fmap=True),
    "commitment_weight": dict(commitment_weight=0.25),
    "no_commitment": dict(commitment_weight=0.0),
    "straight_through": dict(rotation_trick=False),
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "learnable_dead_code": dict(learnable_codebook=True, ema_update=False, threshold_ema_dead_code=1.0),
    "no_ema": dict(ema_update=False),
    "sync_codebook_off": dict(sync_codebook=False),
}
DIM, K = 16, 24


def make_pair(cls_ref=None, cls_ours=None, **kw):
    """Both classes from the same seed, then ours loads the reference's weights."""
    cls_ref = cls_ref or vqp.VectorQuantize
    cls_ours = cls_ours or VectorQuantize
    torch.manual_seed(1)
    ref = cls_ref(**kw)
    torch.manual_seed(1)
    ours = cls_ours(**kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_input(kw, batch=3, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kw.get("accept_image_fmap"):
        return torch.randn(batch, DIM, 2, n // 2, generator=g)
    if kw.get("channel_last") is False:
        return torch.randn(batch, DIM, n, generator=g)
    return torch.randn(batch, n, DIM, generator=g)


def run_step(module, x, seed):
    """One forward/backward; the seed makes dead-code and k-means draws match."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    quantized, indices, loss = module(x)
    (quantized.square().mean() + loss).backward()
    return quantized.detach(), indices, loss.detach(), x.grad


def assert_states_close(ref, ours, atol=1e-5, rtol=1e-4):
    sr, so = ref.state_dict(), ours.state_dict()
    assert list(sr) == list(so)
    for key in sr:
        assert sr[key].shape == so[key].shape and sr[key].dtype == so[key].dtype, key
        if sr[key].is_floating_point():
            torch.testing.assert_close(so[key], sr[key], atol=atol, rtol=rtol, msg=key)
        else:
            assert torch.equal(so[key], sr[key]), key


@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_vector_quantize_pytorch(name):
    kw = dict(dim=DIM, codebook_size=K, **OPTIONS[name])
    ref, ours = make_pair(**kw)
    for step in range(4):
        x = make_input(kw, seed=step)
        q_ref, i_ref, l_ref, g_ref = run_step(ref, x, seed=100 + step)
        q_our, i_our, l_our, g_our = run_step(ours, x, seed=100 + step)
        assert i_our.shape == i_ref.shape and i_our.dtype == i_ref.dtype == torch.int64
        assert torch.equal(i_our, i_ref), f"step {step}: {(i_our != i_ref).sum()} indices differ"
        assert q_our.shape == q_ref.shape and q_our.dtype == q_ref.dtype
        torch.testing.assert_close(q_our, q_ref, atol=1e-5, rtol=1e-5)
        assert l_our.shape == l_ref.shape and l_our.dtype == l_ref.dtype
        torch.testing.assert_close(l_our, l_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g_our, g_ref, atol=1e-5, rtol=1e-4)
        if OPTIONS[name].get("learnable_codebook"):
            torch.testing.assert_close(ours._codebook.embed.grad, ref._codebook.embed.grad, atol=1e-6, rtol=1e-5)
            ref.zero_grad(), ours.zero_grad()
    assert_states_close(ref, ours)

    ref.eval(), ours.eval()
    x = make_input(kw, seed=99)
    q_ref, i_ref, l_ref = ref(x)
    q_our, i_our, l_our = ours(x)
    assert torch.equal(i_our, i_ref)
    torch.testing.assert_close(q_our, q_ref, atol=1e-6, rtol=1e-6)
    assert float(l_our.detach()) == float(l_ref.detach()) == 0.0 and l_our.dtype == l_ref.dtype


def test_ema_actually_moves_the_codebook():
    # Guards the comparison above: after training steps the codebook must differ from its start.
    kw = dict(dim=DIM, codebook_size=K)
    _, ours = make_pair(**kw)
    start = ours.codebook.clone()
    for step in range(3):
        run_step(ours, make_input(kw, seed=step), seed=step)
    assert (ours.codebook - start).abs().max() > 1e-3


def test_single_vector_input_shapes():
    kw = dict(dim=DIM, codebook_size=K, heads=2, separate_codebook_per_head=True)
    ref, ours = make_pair(**kw)
    x = torch.randn(5, DIM)
    q_ref, i_ref, _ = ref(x)
    q_our, i_our, _ = ours(x)
    assert q_our.shape == q_ref.shape == (5, DIM) and i_our.shape == i_ref.shape == (5, 2)
    assert torch.equal(i_our, i_ref)


def test_rotation_trick_gradient_matches_and_differs_from_straight_through():
    kw = dict(dim=DIM, codebook_size=K, codebook_dim=6)
    ref, ours = make_pair(**kw)
    ref_st, ours_st = make_pair(rotation_trick=False, **kw)
    x = make_input(kw, seed=5)
    w = torch.randn(x.shape)  # a non-trivial upstream gradient

    def grads(module):
        xx = x.clone().requires_grad_()
        q, _, loss = module(xx)
        ((q * w).sum() + loss).backward()
        return xx.grad, module.project_in.weight.grad

    gx_ref, gw_ref = grads(ref)
    gx_our, gw_our = grads(ours)
    torch.testing.assert_close(gx_our, gx_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw_our, gw_ref, atol=1e-5, rtol=1e-4)
    gx_st, _ = grads(ours_st)
    assert (gx_st - gx_our).abs().max() > 1e-2, "rotation trick gradient should differ from straight-through"


def test_rotation_trick_forward_value_is_the_code():
    from vqkern.compat.rotation import rotate_to

    src, tgt = torch.randn(50, 7, dtype=torch.float64), torch.randn(50, 7, dtype=torch.float64)
    torch.testing.assert_close(rotate_to(src, tgt), tgt)


@pytest.mark.parametrize("direction", ["ref_to_ours", "ours_to_ref"])
def test_checkpoints_load_both_ways(direction):
    kw = dict(dim=DIM, codebook_size=K, codebook_dim=8, heads=2, separate_codebook_per_head=True,
              kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1)
    torch.manual_seed(3)
    trained = (vqp.VectorQuantize if direction == "ref_to_ours" else VectorQuantize)(**kw)
    for step in range(3):
        run_step(trained, make_input(kw, seed=step), seed=step)
    fresh = (VectorQuantize if direction == "ref_to_ours" else vqp.VectorQuantize)(**kw)
    missing = fresh.load_state_dict(trained.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    assert bool(fresh._codebook.initted)
    trained.eval(), fresh.eval()
    x = make_input(kw, seed=50)
    q_t, i_t, _ = trained(x)
    q_f, i_f, _ = fresh(x)
    assert torch.equal(i_f, i_t)
    torch.testing.assert_close(q_f, q_t, atol=1e-6, rtol=1e-6)


def test_loading_uninitialized_checkpoint_runs_kmeans_again():
    kw = dict(dim=DIM, codebook_size=K, kmeans_init=True, kmeans_iters=2)
    ours = VectorQuantize(**kw)
    run_step(ours, make_input(kw), seed=0)
    assert bool(ours._codebook.initted)
    ours.load_state_dict(vqp.VectorQuantize(**kw).state_dict())
    assert not bool(ours._codebook.initted)
    run_step(ours, make_input(kw), seed=0)
    assert bool(ours._codebook.initted) and ours.codebook.abs().sum() > 0


def test_codes_from_indices_match():
    for kw in (dict(dim=DIM, codebook_size=K), dict(dim=DIM, codebook_size=K, heads=2, separate_codebook_per_head=True),
               dict(dim=DIM, codebook_size=K, codebook_dim=8)):
        kw = dict(kw)
        ref, ours = make_pair(**kw)
        ref.eval(), ours.eval()
        _, idx, _ = ours(make_input(kw))
        torch.testing.assert_close(ours.get_codes_from_indices(idx), ref.get_codes_from_indices(idx))
        torch.testing.assert_close(ours.get_output_from_indices(idx), ref.get_output_from_indices(idx))


def test_loss_breakdown():
    kw = dict(dim=DIM, codebook_size=K, commitment_weight=0.5)
    ref, ours = make_pair(**kw)
    x = make_input(kw)
    *_, loss_ref, br_ref = ref(x, return_loss_breakdown=True)
    *_, loss_our, br_our = ours(x, return_loss_breakdown=True)
    torch.testing.assert_close(br_our.commitment, br_ref.commitment)
    torch.testing.assert_close(loss_our, loss_ref)


def test_search_and_statistics_go_through_vqkern_ops(monkeypatch):
    from vqkern import _library

    calls = {"search": 0, "segment_sum": 0}
    for name in calls:
        original = getattr(_library, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(_library, name, counted)
    ours = VectorQuantize(dim=DIM, codebook_size=K, kmeans_init=True, kmeans_iters=3)
    run_step(ours, make_input({}), seed=0)
    # 3 k-means assignments + 1 search; 3 k-means updates + 1 EMA update.
    assert calls == {"search": 4, "segment_sum": 4}


SUPPORTED = ("dim", "codebook_size", "codebook_dim", "heads", "separate_codebook_per_head", "decay", "eps",
             "kmeans_init", "kmeans_iters", "use_cosine_sim", "threshold_ema_dead_code", "channel_last",
             "accept_image_fmap", "commitment_weight", "rotation_trick", "learnable_codebook", "ema_update",
             "sync_codebook", "freeze_codebook", "sync_kmeans", "layernorm_after_project_in", "accept_3d_fmap",
             "stochastic_sample_codes", "sample_codebook_temp", "manual_ema_update",
             "manual_in_place_optimizer_update", "return_zeros_for_masked_padding", "route_gradients_to_input",
             "commitment_use_cross_entropy_loss", "directional_reparam", "directional_reparam_variance",
             "sync_update_v", "orthogonal_reg_weight", "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes",
             "codebook_diversity_loss_weight", "codebook_diversity_temperature")
RVQ_SUPPORTED = ("dim", "num_quantizers", "codebook_size", "codebook_dim", "heads", "accept_image_fmap",
                 "shared_codebook", "quantize_dropout", "quantize_dropout_cutoff_index",
                 "quantize_dropout_multiple_of", "quant_grad_frac", "return_zeros_for_masked_padding", "diveq",
                 "beam_size", "eval_beam_size", "beam_score_quantizer_weights", "implicit_neural_codebook",
                 "mlp_kwargs")
FORWARD_SUPPORTED = ("x", "return_loss_breakdown", "indices", "mask", "topk", "codebook_transform_fn", "lens",
                     "sample_codebook_temp", "freeze_codebook", "ema_update_weight", "accum_ema_update", "ema_update")
RVQ_FORWARD_SUPPORTED = ("x", "return_all_codes", "mask", "sample_codebook_temp", "freeze_codebook",
                         "rand_quantize_dropout_fixed_seed", "beam_size")


def _non_default(default):
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    if isinstance(default, dict):
        return {"depth": 2}
    return 1  # None


@pytest.mark.parametrize("cls,supported,required", [
    (VectorQuantize, SUPPORTED, dict(dim=DIM, codebook_size=K)),
    (ResidualVQ, RVQ_SUPPORTED, dict(dim=DIM, num_quantizers=2, codebook_size=K)),
], ids=["VectorQuantize", "ResidualVQ"])
def test_every_argument_is_supported_with_its_default_or_refused_by_name(cls, supported, required):
    import inspect

    ref_params = inspect.signature(getattr(vqp, cls.__name__).__init__).parameters
    ours = inspect.signature(cls.__init__).parameters
    assert set(supported) <= set(ref_params), "a supported option is not an argument of vector_quantize_pytorch"
    for name, param in ref_params.items():
        if name == "self" or param.kind is param.VAR_KEYWORD:
            continue
        assert name in ours, f"{name} is not accepted"
        default = {} if ours[name].default is None and param.default == {} else ours[name].default
        assert default == param.default or (default is param.default), \
            f"{name}: default {default!r} != {param.default!r}"
        if name in supported:
            continue
        with pytest.raises(NotImplementedError, match=name):
            cls(**{**required, name: _non_default(param.default)})


@pytest.mark.parametrize("cls,required,keep", [
    (VectorQuantize, dict(dim=DIM, codebook_size=K), FORWARD_SUPPORTED),
    (ResidualVQ, dict(dim=DIM, num_quantizers=2, codebook_size=K), RVQ_FORWARD_SUPPORTED),
], ids=["VectorQuantize", "ResidualVQ"])
def test_every_other_forward_argument_is_refused_by_name(cls, required, keep):
    import inspect

    module = cls(**required)
    for name, param in inspect.signature(getattr(vqp, cls.__name__).forward).parameters.items():
        if name == "self" or name in keep:
            continue
        assert inspect.signature(module.forward).parameters[name].default == param.default, name
        with pytest.raises(NotImplementedError, match=name):
            module(make_input({}), **{name: _non_default(param.default)})


@pytest.mark.parametrize("arg,value", [("vq_bridge", torch.nn.Identity()), ("straight_through", True),
                                       ("affine_param", True)])
def test_unsupported_arguments_are_named(arg, value):
    with pytest.raises(NotImplementedError, match=arg):
        VectorQuantize(dim=DIM, codebook_size=K, **{arg: value})


def test_bad_forward_arguments_are_named():
    with pytest.raises(ValueError, match="codebook_transform_fn"):
        VectorQuantize(dim=DIM, codebook_size=K)(make_input({}), codebook_transform_fn=lambda e: e)


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="learnable_codebook"):
        VectorQuantize(dim=DIM, codebook_size=K, learnable_codebook=True)  # EMA is on by default
    with pytest.raises(ValueError, match="codebook_size"):
        VectorQuantize(dim=DIM, codebook_size=0)
    with pytest.raises(ValueError, match="dim"):
        VectorQuantize(dim=DIM, codebook_size=K)(torch.randn(2, 3, DIM + 1))
    with pytest.raises(NotImplementedError, match="indices"):
        ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=K)(make_input({}), indices=torch.zeros(3, 10, 2))
    with pytest.raises(ValueError, match="heads"):
        ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=K, heads=2)


RVQ_OPTIONS = {
    "default": dict(num_quantizers=3, codebook_size=K),
    # Fewer codes than rows: with K close to N, k-means leaves singleton clusters whose
    # residuals are ~0, and vector_quantize_pytorch's cdist clamps those distances
    # to one value (a tie it breaks by index, not by distance).
    "projected_kmeans": dict(num_quantizers=2, codebook_size=8, codebook_dim=8, kmeans_init=True, kmeans_iters=2),
    "sizes_dead_code": dict(codebook_size=(K, 16, 8), threshold_ema_dead_code=1, rotation_trick=False),
    "cosine": dict(num_quantizers=2, codebook_size=K, use_cosine_sim=True, decay=0.9),
}


@pytest.mark.parametrize("name", list(RVQ_OPTIONS))
def test_residual_vq_matches(name):
    kw = dict(dim=DIM, **RVQ_OPTIONS[name])
    ref, ours = make_pair(vqp.ResidualVQ, ResidualVQ, **kw)
    for step in range(3):
        x = make_input({}, batch=4, n=16, seed=step)
        q_ref, i_ref, l_ref, g_ref = run_step_rvq(ref, x, 10 + step)
        q_our, i_our, l_our, g_our = run_step_rvq(ours, x, 10 + step)
        assert i_our.shape == i_ref.shape == (*x.shape[:-1], ref.num_quantizers)
        assert torch.equal(i_our, i_ref)
        torch.testing.assert_close(q_our, q_ref, atol=1e-5, rtol=1e-5)
        assert l_our.shape == l_ref.shape and l_our.dtype == l_ref.dtype
        torch.testing.assert_close(l_our, l_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g_our, g_ref, atol=1e-5, rtol=1e-4)
    assert_states_close(ref, ours)
    ref.eval(), ours.eval()
    x = make_input({}, seed=7)
    out_ref, out_our = ref(x, return_all_codes=True), ours(x, return_all_codes=True)
    for a, b in zip(out_our, out_ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # checkpoints, the other way round
    fresh = vqp.ResidualVQ(**kw)
    fresh.load_state_dict(ours.state_dict())
    fresh.eval()
    assert torch.equal(fresh(x)[1], out_our[1])


def run_step_rvq(module, x, seed):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    quantized, indices, losses = module(x)
    (quantized.square().mean() + losses.sum()).backward()
    return quantized.detach(), indices, losses.detach(), x.grad


@pytest.mark.parametrize("training", [False, pytest.param(True, marks=pytest.mark.slow)])  # ~12 s each on CPU
def test_torch_compile_fullgraph(training):
    # Eval, and training with a learnable codebook, are one graph; EMA training is
    # not (see test_torch_compile_ema_training).
    kw = dict(dim=DIM, codebook_size=K, codebook_dim=8)
    if training:
        kw.update(learnable_codebook=True, ema_update=False)
    torch.manual_seed(0)
    eager = VectorQuantize(**kw).train(training)
    torch.manual_seed(0)
    compiled_module = VectorQuantize(**kw).train(training)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = make_input(kw)
    outs = []
    for fn, module in ((eager, eager), (compiled, compiled_module)):
        xx = x.clone().requires_grad_()
        q, i, loss = fn(xx)
        (q.square().sum() + loss).backward()
        outs.append((q.detach(), i, loss.detach(), xx.grad, module.project_in.weight.grad))
    (q_e, i_e, l_e, gx_e, gw_e), (q_c, i_c, l_c, gx_c, gw_c) = outs
    assert torch.equal(i_c, i_e)
    torch.testing.assert_close(q_c, q_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l_c, l_e, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx_c, gx_e, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw_c, gw_e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(use_cosine_sim=True, heads=2, codebook_dim=DIM // 2)],
                         ids=["l2", "cosine_heads"])
def test_bfloat16_input(kw):
    # Both search in fp32 and cast back; the rotation trick then runs in bf16,
    # where the two implementations round differently (by at most an ulp or two).
    ref, ours = make_pair(dim=DIM, codebook_size=K, **kw)
    x = make_input({}, seed=4).bfloat16()
    q_ref, i_ref, l_ref, g_ref = run_step(ref, x, seed=0)
    q_our, i_our, l_our, g_our = run_step(ours, x, seed=0)
    assert q_our.dtype == q_ref.dtype == torch.bfloat16 and l_our.dtype == l_ref.dtype == torch.float32
    assert torch.equal(i_our, i_ref)
    torch.testing.assert_close(q_our, q_ref, atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(l_our, l_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_our.float(), g_ref.float(), atol=2e-2, rtol=1.6e-2)
    assert_states_close(ref, ours)


@pytest.mark.slow  # ~15 s of compilation on CPU
def test_torch_compile_ema_training():
    kw = dict(dim=DIM, codebook_size=K, codebook_dim=8)
    torch.manual_seed(0)
    eager = VectorQuantize(**kw)
    torch.manual_seed(0)
    compiled_module = VectorQuantize(**kw)
    with pytest.raises(Exception, match="(?i)graph break|skip|disable"):
        torch.compile(compiled_module, fullgraph=True)(make_input(kw))
    torch.manual_seed(0)
    compiled_module = VectorQuantize(**kw)
    compiled = torch.compile(compiled_module)  # the EMA update runs eagerly between graphs
    for step in range(3):
        q_e, i_e, l_e, g_e = run_step(eager, make_input(kw, seed=step), seed=step)
        q_c, i_c, l_c, g_c = run_step(compiled, make_input(kw, seed=step), seed=step)
        assert torch.equal(i_c, i_e)
        torch.testing.assert_close(q_c, q_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_c, g_e, atol=1e-5, rtol=1e-4)
    assert_states_close(eager, compiled_module)


def test_top_level_exports():
    # The README's one-line switch imports from vqkern itself.
    import vqkern.compat
    from vqkern.kmeans import kmeans as kmeans_fn

    assert vqkern.VectorQuantize is vqkern.compat.VectorQuantize
    assert vqkern.ResidualVQ is vqkern.compat.ResidualVQ
    assert vqkern.kmeans is kmeans_fn
    assert {"VectorQuantize", "ResidualVQ", "kmeans"} <= set(vqkern.__all__)
