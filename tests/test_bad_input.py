"""Bad input: a clear error naming the argument, raised before any kernel runs."""
import math

import pytest
import torch

import vqkern

Z = torch.randn(10, 4)
CB = torch.randn(6, 4)


@pytest.fixture
def no_kernels(monkeypatch):
    """Every op reaches its backend through backends.get: make reaching it fail the test."""
    def get(name):
        raise AssertionError(f"a {name} kernel was reached before the input was refused")

    monkeypatch.setattr(vqkern.backends, "get", get)


@pytest.mark.parametrize("z,codebook,match", [
    (torch.tensor(1.0), CB, "z must have shape"),
    (Z, torch.randn(6, 4, 1), "codebook must have shape"),
    (Z, torch.randn(24), "codebook must have shape"),
    (Z, torch.randn(6, 5), "z's last dimension"),
    (Z, torch.randn(0, 4), "K >= 1"),
    (torch.randint(5, (10, 4)), CB, "z must have a floating dtype"),
    (Z, torch.randint(5, (6, 4)), "codebook must have a floating dtype"),
    (torch.randn(10, 4, dtype=torch.complex64), CB, "z must have a floating dtype"),
    ([[1.0] * 4], CB, "z must be a torch.Tensor"),
])
@pytest.mark.parametrize("fn", ["nearest_code", "quantize"])
@pytest.mark.usefixtures("no_kernels")
def test_bad_tensors(fn, z, codebook, match):
    with pytest.raises((ValueError, TypeError), match=match):
        getattr(vqkern, fn)(z, codebook)


@pytest.mark.usefixtures("no_kernels")
def test_devices_must_match():
    meta = torch.randn(6, 4, device="meta")
    with pytest.raises(ValueError, match="same device"):
        vqkern.quantize(Z, meta)


@pytest.mark.parametrize("beta", [math.nan, math.inf, "a lot"])
@pytest.mark.usefixtures("no_kernels")
def test_beta_must_be_finite(beta):
    with pytest.raises((ValueError, TypeError), match="beta"):
        vqkern.quantize(Z, CB, beta=beta)


@pytest.mark.usefixtures("no_kernels")
def test_unknown_metric_and_backend():
    with pytest.raises(ValueError, match="metric"):
        vqkern.nearest_code(Z, CB, metric="manhattan")
    with pytest.raises(ValueError, match="backend"):
        vqkern.nearest_code(Z, CB, backend="numpy")


@pytest.mark.parametrize("kwargs,match", [
    (dict(decay=math.nan), "decay"),
    (dict(decay=1.5), "decay"),
    (dict(commitment_cost=math.inf), "commitment_cost"),
    (dict(eps=0.0), "eps"),
    (dict(metric="dot"), "metric"),
    (dict(backend="opencl"), "backend"),
    (dict(channel_dim=1.5), "channel_dim"),
])
def test_module_constructor(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        vqkern.VectorQuantizer(8, 4, **kwargs)
    with pytest.raises(ValueError, match="num_embeddings"):
        vqkern.VectorQuantizer(0, 4)


@pytest.mark.usefixtures("no_kernels")
def test_channel_dim_out_of_range():
    layer = vqkern.VectorQuantizer(8, 4, channel_dim=5)
    with pytest.raises(ValueError, match="channel_dim"):
        layer(torch.randn(2, 4, 3, 3))


@pytest.mark.usefixtures("no_kernels")
def test_segment_sum_arguments():
    idx = torch.randint(5, (10,))
    with pytest.raises(TypeError, match="indices"):
        vqkern.segment_sum(idx.int(), Z, 5)
    with pytest.raises(ValueError, match="values"):
        vqkern.segment_sum(idx, torch.randn(9, 4), 5)
    with pytest.raises(ValueError, match="indices must lie"):
        vqkern.segment_sum(idx + 10, Z, 5)
    with pytest.raises(ValueError, match="num_codes"):
        vqkern.segment_sum(idx, Z, 0)


def test_inputs_are_not_modified():
    z, codebook = Z.clone(), CB.clone()
    vqkern.quantize(z, codebook)
    assert torch.equal(z, Z) and torch.equal(codebook, CB)


@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("z,match", [
    (torch.randn(10, 5), "z's last dimension"),
    (torch.randint(3, (10, 4)), "z must have a floating dtype"),
    (torch.randn(10, 4, dtype=torch.complex64), "z must have a floating dtype"),
    (torch.tensor(1.0), "z must have shape"),
    (torch.randn(10, 4, device="meta"), "same device"),
    (torch.randn(2, 4, 3, 3), "channel_dim"),
])
def test_module_refuses_bad_input_and_keeps_its_state(z, match):
    channel_dim = 5 if z.dim() == 4 else -1
    layer = vqkern.VectorQuantizer(6, 4, ema=True, dead_code_threshold=1.0, channel_dim=channel_dim)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        layer(z)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("channel_dim,shape,codebook_dim", [(1, (2, 5, 3, 3), None), (-3, (2, 5, 3, 3), None),
                                                            (2, (2, 3, 5), None), (1, (2, 5, 3, 3), 3)])
def test_module_names_the_channel_dimension_it_was_given(channel_dim, shape, codebook_dim):
    # Not "z's last dimension": the user set channel_dim, and the message says so.
    layer = vqkern.VectorQuantizer(6, 4, channel_dim=channel_dim, codebook_dim=codebook_dim)
    with pytest.raises(ValueError, match=rf"z's channel dimension \(channel_dim={channel_dim}\) has size 5, "
                                         r"but it must equal embedding_dim \(4\)"):
        layer(torch.randn(*shape))
