"""vqkern.patch on encodec's and moshi's real quantizers: each model built from a tiny config
(seeded), copied, one copy patched, both trained on the same batches; outputs, codes,
losses, gradients, EMA buffers, k-means init, code expiry and the random draws compared."""
import copy

import pytest
import torch

import vqkern

from helpers import assert_nearest
from patch_audio_helpers import (
    LargestTensor,
    assert_same_searches,
    assert_same_training,
    check_mechanics,
    library,
    one_thread,  # noqa: F401 (a fixture)
    patched_copy,
    train,
    train_parity,
)

STEPS = 4
pytestmark = pytest.mark.usefixtures("one_thread")


def encodec_rvq(**kw):
    core_vq = library("encodec.quantization.core_vq")
    torch.manual_seed(0)
    args = dict(num_quantizers=3, dim=16, codebook_dim=8, codebook_size=64, decay=0.9, kmeans_init=True,
                kmeans_iters=4, threshold_ema_dead_code=2)
    return core_vq.ResidualVectorQuantization(**{**args, **kw})


def moshi_rvq(split=False, check_unused_every=2, **kw):
    vq = library("moshi.quantization.vq")
    torch.manual_seed(0)
    args = dict(dimension=8, input_dimension=16, output_dimension=16, bins=64, decay=0.9, threshold_usage_ratio=0.5)
    if split:
        model = vq.SplitResidualVectorQuantizer(n_q=4, n_q_semantic=1, q_dropout=True, **{**args, **kw})
    else:
        model = vq.ResidualVectorQuantizer(**{"n_q": 3, "q_dropout": True, **args, **kw})
    for codebook in codebooks(model):  # the quantizers do not pass this codebook option on
        codebook.check_unused_every = codebook._next_unused_check = check_unused_every
    return model


def batches(steps, shape=(4, 16, 50), offset=0.0):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) * 2 + offset for _ in range(steps)]


def codebooks(model):
    return [m for m in model.modules() if type(m).__name__ == "EuclideanCodebook"]


def parity(build, call, method, codebook_of, xs):
    return train_parity(build, call, xs, codebooks, method, codebook_of)


def call_encodec(model, x):
    quantized, codes, losses = model(x)
    return quantized, codes, losses.sum()


def call_moshi(model, x):
    out = model(x, 12)
    return out.x, out.codes, out.penalty


def test_encodec_training_parity():
    """k-means init at the first step, dead codes expired (with their K-row draw) and the
    EMA with Laplace smoothing at every step, on every layer of the residual quantizer."""
    got = parity(encodec_rvq, call_encodec, "quantize", lambda cb: cb.embed, batches(STEPS))
    first = got[0]["state"]
    assert all(first[f"layers.{i}._codebook.inited"].item() == 1 for i in range(3))
    # the step's EMA moved every layer's codes away from their k-means centroids
    assert not torch.equal(got[-1]["state"]["layers.0._codebook.embed"], first["layers.0._codebook.embed"])


def test_encodec_eval_far_from_origin():
    """Evaluation on rows far from the origin (encodec's encoder outputs are): the patched
    codes are the nearest by fp64 distances, and the original's but for near-ties."""
    model = encodec_rvq(kmeans_init=False)
    model.eval()
    patched, logs = patched_copy(model, codebooks, "quantize", lambda cb: cb.embed)
    x = batches(1, offset=40.0)[0]
    with torch.no_grad():
        got, want = patched(x), model(x)
        codes, codes0 = patched.encode(x), model.encode(x)
    assert_same_searches(*logs)
    for rows, codebook, indices in logs[0]:
        assert_nearest(rows, codebook, indices)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(codes, got[1]) and torch.equal(codes0, want[1])


def test_moshi_training_parity():
    """k-means init (layer by layer, 50 resampling steps), code expiry every 2 steps,
    quantizer dropout from the layer's own RNG, EMA, and the residual's averaging."""
    got = parity(moshi_rvq, call_moshi, "_quantize", lambda cb: cb.embedding, batches(5))
    # layer by layer, as far as quantizer dropout let the batches reach
    assert [got[-1]["state"][f"vq.layers.{i}._codebook._initialized"].item() for i in range(3)] == [1, 1, 0]


def test_moshi_split_training_parity():
    parity(lambda: moshi_rvq(split=True), call_moshi, "_quantize", lambda cb: cb.embedding, batches(3))


def test_moshi_encode_decode():
    model = moshi_rvq(split=True)
    model.train()
    model(batches(1)[0], 12)  # k-means initialization of the first layers
    model.eval()
    patched, logs = patched_copy(model, codebooks, "_quantize", lambda cb: cb.embedding)
    x = batches(1)[0]
    with torch.no_grad():
        got, want = patched.encode(x), model.encode(x)
        torch.testing.assert_close(patched.decode(got), model.decode(want))
    assert_same_searches(*logs)


@pytest.mark.parametrize("build", [encodec_rvq, moshi_rvq], ids=["encodec", "moshi"])
def test_patch_mechanics(build):
    model = build()
    expected = {path: "EuclideanCodebook" for path, m in model.named_modules() if m in codebooks(model)}
    check_mechanics(model, expected)


def test_no_n_by_k_tensor():
    """At N = 2048 rows and K = 512 codes of 8 dimensions, no op of a patched training step
    (k-means init, code expiry, EMA) returns a tensor larger than N x D; the original's
    search, one-hot and k-means differences do (the probe sees them)."""
    n, k, d = 2048, 512, 8
    encodec = encodec_rvq(num_quantizers=1, dim=d, codebook_dim=d, codebook_size=k, kmeans_iters=2)
    moshi = moshi_rvq(dimension=d, input_dimension=d, output_dimension=d, n_q=1, bins=k, check_unused_every=1)
    for model, call in ((encodec, call_encodec), (moshi, call_moshi)):
        x = torch.randn(4, d, n // 4)
        largest = {}
        for patched in (False, True):
            m = copy.deepcopy(model)
            if patched:
                vqkern.patch(m)
            with LargestTensor() as probe:
                call(m, x)
                call(m, x)  # after the k-means step: search, expiry and EMA
            largest[patched] = probe.largest
        assert largest[True] <= n * d, largest
        assert largest[False] >= n * k, largest


@pytest.mark.slow
@pytest.mark.parametrize("build,call", [
    (encodec_rvq, call_encodec),
    pytest.param(moshi_rvq, call_moshi, marks=pytest.mark.xfail(
        strict=True, reason="compiled, the patched moshi quantizer's random draws differ from eager's at the second "
                            "step (layer 1's k-means) even with inductor's fallback_random; whether the unpatched "
                            "one does too is not yet checked")),
], ids=["encodec", "moshi"])
def test_compile(build, call):
    """torch.compile (with the graph breaks the libraries' own host reads make) gives the
    same training steps as the patched eager model (about 15-40 s a case)."""
    model = build()
    vqkern.patch(model)
    compiled = copy.deepcopy(model)
    fn = torch.compile(compiled)
    # Inductor draws randperm/randint in a compiled graph from its own generator unless
    # told to fall back to eager's: then the k-means seeds and expiry draws are eager's.
    with torch._inductor.config.patch(fallback_random=True):
        got = train(compiled, batches(3), lambda m, x: call(fn, x))
    assert_same_training(got, train(model, batches(3), call))
