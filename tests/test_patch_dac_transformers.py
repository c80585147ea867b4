"""vqkern.patch on descript's DAC quantizer and transformers' audio codecs (DAC, Encodec,
Mimi, X-Codec, WavTokenizer), each built from a tiny config offline (seeded)."""
import copy

import pytest
import torch

import vqkern
from vqkern.integrations.dac import latent_rows

from helpers import RANK_RTOL, assert_nearest
from patch_audio_helpers import (  # noqa: F401
    LargestTensor,
    assert_same_searches,
    check_mechanics,
    library,
    one_thread,
    patched_copy,
    train_parity,
)

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers", reason="transformers is installed by requirements-test.txt")


def waves(steps, shape=(2, 1, 800)):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(*shape, generator=g) for _ in range(steps)]


def dac_layers(model):
    return [m for m in model.modules() if type(m).__name__ in ("VectorQuantize", "DacVectorQuantize")]


def dac_record(model_layers_of):
    return dict(layers_of=model_layers_of, method="decode_latents", codebook_of=lambda q: q.codebook.weight,
                metric="cosine", rows_of=latent_rows, codes_of=lambda out: out[1])


def descript_rvq(**kw):
    quantize = library("dac.nn.quantize")
    torch.manual_seed(0)
    return quantize.ResidualVectorQuantize(**{**dict(input_dim=16, n_codebooks=3, codebook_size=64, codebook_dim=4,
                                                     quantizer_dropout=0.5), **kw})


def call_descript(model, x):
    z_q, codes, latents, commitment, codebook = model(x)
    return z_q, codes, commitment * 0.25 + codebook


def test_descript_dac_training_parity():
    """Factorized weight-normed projections, l2-normalized search, quantizer dropout (its
    torch.randint draws), both losses, gradients to the input, projections and codebooks."""
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 16, 40, generator=g) for _ in range(4)]
    train_parity(descript_rvq, call_descript, xs, **dac_record(dac_layers))
    model, patched = descript_rvq().eval(), descript_rvq().eval()
    vqkern.patch(patched)
    latents = torch.randn(2, 12, 9)
    with torch.no_grad():
        for got, want in zip(patched.from_latents(latents), model.from_latents(latents)):
            torch.testing.assert_close(got, want)


def tiny_dac(**kw):
    torch.manual_seed(0)
    config = transformers.DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 2], decoder_hidden_size=16,
                                    n_codebooks=3, codebook_size=64, codebook_dim=4, hidden_size=16,
                                    quantizer_dropout=0.5, **kw)
    return transformers.DacModel(config)


def call_dac(model, x):
    out = model(x)
    return out.audio_values, out.audio_codes, out.loss.sum()


def test_transformers_dac_training_parity():
    train_parity(tiny_dac, call_dac, waves(3), **dac_record(dac_layers))


def test_transformers_dac_zero_codes():
    """A code of norm zero scores as a unit code at cosine -0.5 in transformers' ranking
    (descript's DAC ranks it at 0.5): the patched search picks it exactly where the
    original does."""
    layer = tiny_dac().quantizer.quantizers[0]
    with torch.no_grad():
        layer.codebook.weight[:] = layer.codebook.weight[0]  # one direction (exact ties: lowest index)
        layer.codebook.weight[1:4] = 0.0
    patched = copy.deepcopy(layer)
    vqkern.patch(patched)
    latents = torch.randn(3, 4, 200)
    with torch.no_grad():
        got, want = patched.decode_latents(latents), layer.decode_latents(latents)
    assert torch.equal(got[1], want[1])
    assert 0 < (want[1] == 1).float().mean() < 1  # the zero code wins on some rows only
    torch.testing.assert_close(got[0], want[0])


def with_codebooks(model, seed=4):
    """Random codebooks loaded as a checkpoint would (transformers starts them at zero)."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for key, value in sd.items():
        if key.endswith((".embed", ".embed_sum", ".embed_avg")):
            sd[key] = torch.randn(value.shape, generator=g) * 3
        elif key.endswith((".cluster_usage", ".cluster_size")):
            sd[key] = torch.rand(value.shape, generator=g) + 0.5
    model.load_state_dict(sd)
    return model


def tiny_encodec():
    torch.manual_seed(0)
    config = transformers.EncodecConfig(num_filters=4, upsampling_ratios=[2, 2], codebook_size=64, codebook_dim=8,
                                        hidden_size=8, num_lstm_layers=1, target_bandwidths=[6.0], sampling_rate=800)
    return with_codebooks(transformers.EncodecModel(config))


def tiny_mimi():
    torch.manual_seed(0)
    config = transformers.MimiConfig(hidden_size=16, num_filters=4, upsampling_ratios=[2, 2], codebook_size=64,
                                     codebook_dim=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                     head_dim=8, intermediate_size=32, num_quantizers=4, num_semantic_quantizers=1,
                                     frame_rate=100, sampling_rate=800, upsample_groups=16, sliding_window=16,
                                     vector_quantization_hidden_dimension=8)
    return with_codebooks(transformers.MimiModel(config))


def euclidean_codebooks(model):
    return [m for m in model.modules() if type(m).__name__.endswith("EuclideanCodebook")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("build", [tiny_encodec, tiny_mimi], ids=["encodec", "mimi"])
def test_transformers_codec_encode_decode(build, dtype):
    """Encode and decode; in bf16 the patched codes are the nearest by fp64 distances, and
    transformers Encodec's (ranked by a bf16 matmul) equal them but within bf16 rounding."""
    model = build().eval().to(dtype)
    patched, logs = patched_copy(model, euclidean_codebooks, "quantize", lambda cb: cb.embed)
    x = waves(1)[0].to(dtype)
    with torch.no_grad():
        got, want = patched.encode(x), model.encode(x)
        scales = [getattr(out, "audio_scales", None) for out in (got, want)]  # Encodec's decode takes them
        torch.testing.assert_close(patched.decode(got.audio_codes, *scales[:1] if scales[0] else ()).audio_values,
                                   model.decode(want.audio_codes, *scales[1:] if scales[1] else ()).audio_values)
    assert_same_searches(*logs, want_rtol=RANK_RTOL if dtype == torch.float32 else 2 ** -7)
    for rows, codebook, codes in logs[0]:
        assert_nearest(rows.float(), codebook.float(), codes)
    assert len(logs[0]) == len(euclidean_codebooks(model))  # every layer searched


@pytest.mark.parametrize("module,config,cls", [
    ("xcodec", "XcodecConfig", "XcodecEuclideanCodebook"),
    ("wavtokenizer", "WavTokenizerConfig", "WavTokenizerEuclideanCodebook"),
])
def test_transformers_other_codebooks(module, config, cls):
    """The same codebook design in two more codecs: their real class, from their config."""
    modeling = library(f"transformers.models.{module}.modeling_{module}")
    config = getattr(transformers, config)(codebook_size=64, codebook_dim=8,
                                           **({"hidden_size": 8} if module == "wavtokenizer" else {}))
    layer = with_codebooks(getattr(modeling, cls)(config))
    patched, logs = patched_copy(layer, lambda m: [m], "quantize", lambda cb: cb.embed)
    assert vqkern.patch(copy.deepcopy(layer)) == {"": cls}
    x = torch.randn(3, 50, 8) * 2
    got, want = patched.encode(x), layer.encode(x)
    assert_same_searches(*logs)
    torch.testing.assert_close(patched.decode(got), layer.decode(want))


@pytest.mark.parametrize("build,count", [(tiny_encodec, 5), (tiny_mimi, 4), (tiny_dac, 3), (descript_rvq, 3)],
                         ids=["encodec", "mimi", "dac", "descript-dac"])
def test_patch_mechanics(build, count):
    model = build()
    expected = {path: type(m).__name__ for path, m in model.named_modules()
                if m in euclidean_codebooks(model) + dac_layers(model)}
    assert len(expected) == count
    check_mechanics(model, expected)


def test_no_n_by_k_tensor():
    """DAC's training step at N = 4096 rows and K = 1024 codes: no op of the patched layers
    returns more than N x 16 elements (the projections' input); the original's N x K does."""
    n, k = 4096, 1024
    largest = {}
    for patched in (False, True):
        model = descript_rvq(n_codebooks=1, codebook_size=k, codebook_dim=8)
        if patched:
            vqkern.patch(model)
        with LargestTensor() as probe:
            call_descript(model, torch.randn(4, 16, n // 4))[2].backward()
        largest[patched] = probe.largest
    assert largest[True] <= n * 16 and largest[False] >= n * k, largest
