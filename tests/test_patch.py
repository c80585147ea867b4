"""vqkern.patch / vqkern.unpatch themselves: recognition, idempotence, what a patch leaves
untouched, refusals, errors that change nothing, copies and pickles, every backend.

The layers are the libraries' real classes (vector-quantize-pytorch's and taming's); each
library's parity lives in its own test_patch_<library>.py."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import vqkern
from vqkern import integrations

from conftest import backend_params
from patch_parity import assert_state_dicts_equal, compare_training, patched_copy, tensor_objects

vqp = pytest.importorskip("vector_quantize_pytorch",
                          reason="vector-quantize-pytorch is installed by requirements-test.txt")
taming = pytest.importorskip("taming.modules.vqvae.quantize",
                             reason="taming-transformers-rom1504 is installed by requirements-test-nodeps.txt")

D, K = 8, 32
ADDED = {"forward", "remap_to_used", "update_indices", "update_ema_indices", "_vqkern_patch"}


def model():
    """Two libraries' layers inside a plain container, beside a layer vqkern does not know."""
    torch.manual_seed(0)
    return nn.ModuleDict(dict(pre=nn.Linear(D, D), vq=vqp.VectorQuantize(dim=D, codebook_size=K),
                              gan=taming.VectorQuantizer2(K, D, 0.25)))


def untouched(layer):
    return not ADDED & set(vars(layer))


def test_recognizes_layers_anywhere_and_leaves_the_rest():
    m = model()
    linear_dict = dict(vars(m["pre"]))
    assert vqkern.patch(m) == {"vq": "VectorQuantize", "gan": "VectorQuantizer2"}
    assert vars(m["pre"]) == linear_dict and untouched(m)
    gan = taming.VectorQuantizer2(K, D, 0.25)
    assert vqkern.patch(gan) == {"": "VectorQuantizer2"}   # the model itself


def test_patch_twice_then_unpatch_twice():
    m = model()
    before = tensor_objects(m)
    reference = copy.deepcopy(m)
    first = vqkern.patch(m)
    assert vqkern.patch(m) == {}
    assert vqkern.patch(m, backend="torch") == {}  # a patched layer keeps its first backend
    assert integrations.backend_of(m["vq"]) == "auto"
    assert vqkern.unpatch(m) == first
    assert vqkern.unpatch(m) == {}
    assert untouched(m["vq"]) and untouched(m["gan"])
    assert m["gan"].forward.__func__ is taming.VectorQuantizer2.forward
    after = tensor_objects(m)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert_state_dicts_equal(m, reference)


def test_supported_names_every_adapter():
    names = integrations.supported()
    for name in ("diffusers.models.autoencoders.vae.VectorQuantizer",
                 "taming.modules.vqvae.quantize.VectorQuantizer", "taming.modules.vqvae.quantize.VectorQuantizer2",
                 "transformers.models.chameleon.modeling_chameleon.ChameleonVQVAEVectorQuantizer",
                 "transformers.models.janus.modeling_janus.JanusVQVAEVectorQuantizer",
                 "transformers.models.emu3.modeling_emu3.Emu3VQVAEVectorQuantizer",
                 "transformers.models.glm_image.modeling_glm_image.GlmImageVQVAEVectorQuantizer",
                 "vector_quantize_pytorch.vector_quantize_pytorch.VectorQuantize",
                 "vector_quantize_pytorch.lookup_free_quantization.LFQ"):
        assert name in names
    assert integrations.qualified_name(type(model()["gan"])) == "taming.modules.vqvae.quantize.VectorQuantizer2"


def test_bad_arguments_raise_and_change_nothing():
    m = model()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        vqkern.patch({"vq": m["vq"]})
    with pytest.raises(ValueError, match="backend must be one of"):
        vqkern.patch(m, backend="cuda-fast")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        vqkern.unpatch([m])
    if not torch.cuda.is_available():
        # An explicit backend that cannot run on the layers' device: raised before any binding.
        with pytest.raises(RuntimeError, match=r"backend='cuda' cannot serve vq \(vector_quantize_pytorch.*\) on cpu"):
            vqkern.patch(m, backend="cuda")
    assert untouched(m["vq"]) and untouched(m["gan"])


def test_a_failing_setup_changes_nothing(monkeypatch):
    m = nn.Sequential(vqp.VectorQuantize(dim=D, codebook_size=K), vqp.VectorQuantize(dim=D, codebook_size=K))
    adapter = integrations._registry()["vector_quantize_pytorch.vector_quantize_pytorch.VectorQuantize"]
    calls = []

    def failing(layer, backend):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError("setup failed")
        return adapter.setup(layer, backend)

    monkeypatch.setitem(integrations._REGISTRY, "vector_quantize_pytorch.vector_quantize_pytorch.VectorQuantize",
                        integrations.Adapter(adapter.methods, adapter.check, failing, adapter.caveat, adapter.on_load))
    with pytest.raises(RuntimeError, match="setup failed"):
        vqkern.patch(m)
    assert len(calls) == 2 and untouched(m[0]) and untouched(m[1])


def test_other_source_is_left_unpatched_with_a_warning(monkeypatch):
    m = model()
    monkeypatch.setattr("vqkern.integrations.taming._V2", frozenset())
    with pytest.warns(UserWarning, match=r"left gan \(taming\.modules\.vqvae\.quantize\.VectorQuantizer2\) unpatched: "
                                         r"the source of VectorQuantizer2 is not the code vqkern's adapter reproduces"):
        assert vqkern.patch(m) == {"vq": "VectorQuantize"}
    assert untouched(m["gan"])


def test_a_deep_copy_is_patched_on_its_own_tensors():
    m = model()
    vqkern.patch(m)
    twin = copy.deepcopy(m)
    for name in ("vq", "gan"):
        assert twin[name].forward.__self__ is twin[name]
        assert integrations.state(twin[name]) is not None
    x = torch.randn(2, D, 3, 3)
    assert torch.equal(twin["gan"](x)[0], m["gan"](x)[0])
    twin.train()
    twin["vq"](torch.randn(2, 5, D))   # an EMA step on the copy only
    assert not torch.equal(twin["vq"]._codebook.embed, m["vq"]._codebook.embed)
    assert vqkern.unpatch(twin) == {"vq": "VectorQuantize", "gan": "VectorQuantizer2"}
    assert integrations.state(m["vq"]) is not None


def test_a_pickled_model_loads_unpatched_and_patches_again():
    m = model()
    vqkern.patch(m)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for name in ("vq", "gan"):
        assert integrations.state(loaded[name]) is None
        assert loaded[name].forward.__func__ is type(loaded[name]).forward
    assert_state_dicts_equal(loaded, m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vqkern.patch(loaded) == {"vq": "VectorQuantize", "gan": "VectorQuantizer2"}
    x = torch.randn(2, D, 3, 3)
    assert torch.equal(loaded["gan"](x)[0], m["gan"](x)[0])


def test_module_hooks_still_run():
    m = model()
    vqkern.patch(m)
    seen = []
    m["gan"].register_forward_pre_hook(lambda mod, args: seen.append("pre"))
    m["gan"].register_forward_hook(lambda mod, args, out: seen.append(out[2][2].shape))
    m["gan"](torch.randn(1, D, 2, 2))
    assert seen == ["pre", (4,)]


def test_a_failed_call_changes_nothing():
    m = model()
    vqkern.patch(m)
    m.train()
    layer = m["vq"]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        layer(torch.randn(2, 5, D), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"z must have shape \(B, e_dim, H, W\)"):
        m["gan"](torch.randn(2, D, 3))
    after = layer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("backend", backend_params())
def test_every_backend_trains_alike(backend):
    torch.manual_seed(0)
    layer = taming.VectorQuantizer2(K, D, 0.25, legacy=False)
    compare_training(layer, shape=(2, D, 3, 3), call=lambda m, z: (lambda q, loss, i: (q, loss, i[2]))(*m(z)),
                     search_space=lambda m, z: (z.movedim(1, -1).reshape(-1, D), m.embedding.weight),
                     scale=0.05, steps=2, backend=backend)
    twin, _ = patched_copy(layer, backend=backend)
    assert integrations.backend_of(twin) == backend
