"""A downstream model: meshgpt-pytorch's MeshAutoencoder (ResidualLFQ, quantize dropout, a
(B, N) mask, the softplus entropy loss) trains the same with vqkern's ResidualLFQ in place
of vector-quantize-pytorch's.

meshgpt-pytorch imports torchvision (through classifier-free-guidance-pytorch and
open_clip); torchvision's only PyPI builds link libtorch_cuda, so it cannot be imported
beside the CPU build of torch that requirements-cpu.txt pins, and the test suite's
environment does not install it. This test runs wherever meshgpt-pytorch imports (an
environment with a CUDA build of torch), on CPU tensors; it passed with meshgpt-pytorch
1.8.1, torch 2.14.1+cu130 and torchvision 0.29.1 (losses equal to 6 digits at every step).
"""
import copy

import pytest
import torch

try:
    from meshgpt_pytorch import MeshAutoencoder
except Exception as exc:  # ImportError, or torchvision's RuntimeError against a CPU torch
    pytest.skip(f"meshgpt_pytorch does not import here: {type(exc).__name__}: {exc}", allow_module_level=True)

import vqkern

STEPS = 4


def _model():
    torch.manual_seed(0)
    return MeshAutoencoder(
        num_discrete_coors=32, dim_coor_embed=8, dim_area_embed=4, dim_normal_embed=8, dim_angle_embed=4,
        encoder_dims_through_depth=(16, 32), decoder_dims_through_depth=(32, 16), dim_codebook=12,
        num_quantizers=2, codebook_size=2 ** 10, use_linear_attn=False, attn_encoder_depth=0,
        attn_decoder_depth=0, flash_attn=False)


def _swap_in_vqkern(model):
    """The same model with vqkern's ResidualLFQ, built with meshgpt's arguments and loaded
    from the original quantizer's state_dict."""
    ours = copy.deepcopy(model)
    old = model.quantizer
    layer = old.layers[0]
    ours.quantizer = vqkern.ResidualLFQ(
        dim=old.project_in.in_features if old.has_projections else layer.dim, num_quantizers=old.num_quantizers,
        codebook_size=layer.codebook_size, commitment_loss_weight=layer.commitment_loss_weight,
        quantize_dropout=old.quantize_dropout, quantize_dropout_cutoff_index=old.quantize_dropout_cutoff_index,
        quantize_dropout_multiple_of=old.quantize_dropout_multiple_of,
        frac_per_sample_entropy=layer.frac_per_sample_entropy, soft_clamp_input_value=layer.soft_clamp_input_value,
        experimental_softplus_entropy_loss=layer.experimental_softplus_entropy_loss)
    ours.quantizer.load_state_dict(old.state_dict())
    return ours


def _batch(step):
    g = torch.Generator().manual_seed(step)
    vertices = torch.rand(2, 12, 3, generator=g) * 2 - 1
    faces = torch.randint(0, 12, (2, 10, 3), generator=g)
    faces[1, 7:] = -1  # padding faces: meshgpt masks them out
    return vertices, faces


def _train(model):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(STEPS):
        vertices, faces = _batch(step)
        torch.manual_seed(100 + step)  # quantize dropout draws its depth from the global generator
        loss, (recon, commit) = model(vertices=vertices, faces=faces, return_loss_breakdown=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((loss.item(), recon.item(), commit.sum().item()))
    return losses


def test_mesh_autoencoder_trains_the_same_with_vqkern():
    model = _model()
    ours = _swap_in_vqkern(model)
    assert type(model.quantizer).__module__.startswith("vector_quantize_pytorch")
    assert isinstance(ours.quantizer, vqkern.ResidualLFQ)
    theirs_losses, our_losses = _train(model), _train(ours)
    for step, (a, b) in enumerate(zip(theirs_losses, our_losses)):
        for name, x, y in zip(("loss", "recon", "commit"), a, b):
            assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), f"step {step} {name}: {x} vs {y}"
    for (name, p), q in zip(model.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=name)
