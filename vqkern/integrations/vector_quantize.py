"""vector-quantize-pytorch's ``VectorQuantize`` on vqkern's kernels, and with it every
``ResidualVQ`` and ``GroupedResidualVQ`` built from it (audiolm-pytorch's SoundStream,
meshgpt-pytorch, phenaki-pytorch, ...), without editing the model's source.

The original searches with ``cdist`` (an N x K matrix) and takes codes and EMA statistics
through an N x K one-hot (``update_indices`` builds another). ``vqkern.compat.VectorQuantize``
already reproduces the 1.32 layer on vqkern's ops with the same state; a patched layer runs
that code on its own tensors: each call hands a compat layer (built once on the meta device,
so it holds no memory and draws no random numbers) the patched layer's submodules,
parameters and buffers, the same objects, and its current options. ResidualVQ's and
GroupedResidualVQ's own code (quantize dropout and its seed, shared codebooks, beam search)
runs as it is, calling the patched layers.
"""
from __future__ import annotations

import functools
import sys
import weakref
from dataclasses import dataclass

import torch

from ..compat.vector_quantize import VectorQuantize as CompatVectorQuantize
from . import backend_of, patch_data, register, source_mismatch

_MODULE = "vector_quantize_pytorch.vector_quantize_pytorch"
# The whole module of vector-quantize-pytorch 1.32.0: the layer's forward runs through its
# Codebook and module-level helpers (k-means, sampling, dead-code draws).
_SOURCES = frozenset({"b6d587ba8cc67b5c93aa865aeea411b1024804d71ca478f2d425d86c61258bde"})

# The compat codebook serving each of the library's codebook modules, so that layers sharing
# one (ResidualVQ's shared_codebook) share its host-side state as well.
_CODEBOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Unsupported(Exception):
    """An option of the layer that vqkern does not serve (its message names it)."""


def _config(layer, backend: str) -> dict:
    """compat ``VectorQuantize`` arguments for the layer's current options; raises
    _Unsupported naming the first option vqkern does not serve."""
    cb = layer._codebook
    helpers = sys.modules[_MODULE]
    sample = cb.gumbel_sample
    if not (isinstance(sample, functools.partial) and sample.func is helpers.gumbel_sample and not sample.args):
        raise _Unsupported("a gumbel_sample other than the library's own: vqkern samples codes inside its search")
    if sample.keywords.get("straight_through"):
        raise _Unsupported("straight_through=True: the Gumbel straight-through backward needs the softmax over "
                           "all codes (an N x K matrix)")
    if cb.affine_param:
        raise _Unsupported("affine_param=True is not implemented by vqkern")
    if cb.vq_bridge is not None:
        raise _Unsupported("vq_bridge is not implemented by vqkern")
    if layer.in_place_codebook_optimizer is not None:
        raise _Unsupported("in_place_codebook_optimizer is not implemented by vqkern")
    if cb.reset_cluster_size != cb.threshold_ema_dead_code:
        raise _Unsupported(f"reset_cluster_size={cb.reset_cluster_size} (not threshold_ema_dead_code) is not "
                           "implemented by vqkern")
    return dict(
        dim=layer.dim, codebook_size=layer.codebook_size, codebook_dim=cb.embed.shape[-1], heads=layer.heads,
        separate_codebook_per_head=layer.separate_codebook_per_head, decay=cb.decay, eps=cb.eps,
        freeze_codebook=layer.freeze_codebook, kmeans_iters=cb.kmeans_iters,
        # Without use_ddp the library never syncs k-means; with it, sync_kmeans picks the sampler.
        sync_kmeans=not cb.use_ddp or cb.sample_fn is helpers.sample_vectors_distributed,
        use_cosine_sim=layer.use_cosine_sim, threshold_ema_dead_code=cb.threshold_ema_dead_code,
        channel_last=layer.channel_last, accept_image_fmap=layer.accept_image_fmap,
        accept_3d_fmap=layer.accept_3d_fmap, commitment_weight=layer.commitment_weight,
        commitment_use_cross_entropy_loss=layer.commitment_use_cross_entropy_loss,
        orthogonal_reg_weight=layer.orthogonal_reg_weight,
        orthogonal_reg_active_codes_only=layer.orthogonal_reg_active_codes_only,
        orthogonal_reg_max_codes=layer.orthogonal_reg_max_codes,
        codebook_diversity_loss_weight=layer.codebook_diversity_loss_weight,
        codebook_diversity_temperature=layer.codebook_diversity_temperature,
        stochastic_sample_codes=bool(sample.keywords.get("stochastic", False)),
        sample_codebook_temp=cb.sample_codebook_temp, rotation_trick=layer.rotation_trick,
        directional_reparam=layer.directional_reparam, directional_reparam_variance=layer.directional_reparam_variance,
        sync_codebook=cb.use_ddp, ema_update=cb.ema_update, manual_ema_update=cb.manual_ema_update,
        learnable_codebook=layer.learnable_codebook,
        manual_in_place_optimizer_update=layer.manual_in_place_optimizer_update, sync_update_v=layer.sync_update_v,
        return_zeros_for_masked_padding=layer.return_zeros_for_masked_padding,
        route_gradients_to_input=layer.route_gradients_to_input, backend=backend)


# The compat codebook's arguments, a key for sharing one between layers.
_CODEBOOK_KEYS = ("codebook_dim", "codebook_size", "heads", "separate_codebook_per_head", "decay", "eps",
                  "kmeans_iters", "sync_kmeans", "use_cosine_sim", "threshold_ema_dead_code", "sync_codebook",
                  "ema_update", "manual_ema_update", "learnable_codebook", "orthogonal_reg_weight", "backend")


@dataclass
class _Link:
    """A patched layer's compat twin and the options it was built for."""
    vq: CompatVectorQuantize
    config: dict


def _build(layer, config: dict, *, share: bool = True) -> _Link:
    try:
        # On the meta device the twin allocates nothing and draws no random numbers; every
        # tensor it uses is the patched layer's own, handed over by _synced at each call.
        with torch.device("meta"):
            vq = CompatVectorQuantize(**config)
    except (ValueError, NotImplementedError) as exc:
        raise _Unsupported(str(exc)) from None
    # The twin keeps ``initted`` on the host (no device read per step), as the compat layer
    # does; _refresh_initted reads it again after a state dict is loaded.
    vq._codebook._initted_host = bool(layer._codebook._buffers["initted"])
    link = _Link(vq, config)
    if not share:
        return link
    key = tuple(config[k] for k in _CODEBOOK_KEYS)
    shared = _CODEBOOKS.get(layer._codebook)
    if shared is not None and shared[0] == key:
        vq._modules["_codebook"] = shared[1]
    else:
        _CODEBOOKS[layer._codebook] = (key, vq._codebook)
    return link


def _synced(layer) -> CompatVectorQuantize:
    """The layer's compat twin, rebuilt if the layer's options changed since, holding the
    layer's current submodules and tensors (a ``.to()`` replaces buffers) and training flags."""
    link = patch_data(layer)
    try:
        config = _config(layer, backend_of(layer))
        if config != link.config:
            fresh = _build(layer, config)
            link.vq, link.config = fresh.vq, fresh.config
    except _Unsupported as exc:
        raise NotImplementedError(f"vqkern.patch: {type(layer).__name__} now has {exc}; "
                                  f"vqkern.unpatch the model to run it with this option") from None
    vq, cb = link.vq, layer._codebook
    vq.training, vq._codebook.training = layer.training, cb.training
    for name in ("project_in", "project_out"):
        vq._modules[name] = layer._modules[name]
    vq._buffers["zero"] = layer._buffers["zero"]
    twin = vq._codebook
    for name in ("initted", "cluster_size", "embed_avg"):
        twin._buffers[name] = cb._buffers[name]
    if "embed" in cb._parameters:
        twin._parameters["embed"] = cb._parameters["embed"]
    else:
        twin._buffers["embed"] = cb._buffers["embed"]
    return vq


def _refresh_initted(layer, incompatible_keys) -> None:
    """After a state dict is loaded: whether the loaded codebook was k-means initialized."""
    patch_data(layer).vq._codebook._initted_host = bool(layer._codebook._buffers["initted"])


def _forward(self, x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
             freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
             ema_update_weight=None, accum_ema_update=False, ema_update=None):
    """The library's ``VectorQuantize.forward`` (same arguments and outputs) on vqkern's kernels."""
    vq = _synced(self)
    kwargs = dict(indices=indices, mask=mask, lens=lens, topk=topk, sample_codebook_temp=sample_codebook_temp,
                  freeze_codebook=freeze_codebook, return_loss_breakdown=return_loss_breakdown,
                  codebook_transform_fn=codebook_transform_fn, ema_update_weight=ema_update_weight,
                  accum_ema_update=accum_ema_update, ema_update=ema_update)
    beams = topk is not None and isinstance(x, torch.Tensor) and x.dim() == 4 and self.channel_last and not (
        self.accept_image_fmap or self.accept_3d_fmap)
    if not beams:
        return vq(x, **kwargs)
    # ResidualVQ's beam search hands each layer its paths as (B, N, paths, D) rows (the
    # library's codebook then reads B as a head axis); each row's top-k is its own, so
    # they are searched as (B, N * paths, D) rows and the outputs laid out again.
    b, n, p, d = x.shape
    if mask is not None:
        kwargs["mask"] = mask.unsqueeze(-1).expand(b, n, p).reshape(b, n * p)
    out = vq(x.reshape(b, n * p, d), **kwargs)

    def paths(t):
        return t.reshape(b, n, p, *t.shape[2:]) if t.dim() >= 2 and t.shape[:2] == (b, n * p) else t

    quantized, codes, loss = (paths(t) for t in out[:3])
    if not return_loss_breakdown:
        return quantized, codes, loss
    return quantized, codes, loss, out[3]._replace(commitment=paths(out[3].commitment))


def _update_indices(self, x, indices, mask=None):
    """The library's ``update_indices`` (EMA update for codes chosen elsewhere, as
    ResidualVQ's beam search uses it) from vqkern's segment sum, without a one-hot."""
    return _synced(self).update_indices(x, indices, mask=mask)


def _check(layer):
    reason = source_mismatch(sys.modules[type(layer).__module__], _SOURCES, "vector-quantize-pytorch 1.32.0")
    if reason is not None:
        return reason
    try:
        _build(layer, _config(layer, "auto"), share=False)
    except _Unsupported as exc:
        return str(exc)
    return None


def _setup(layer, backend: str) -> _Link:
    return _build(layer, _config(layer, backend))


def _caveat(layer):
    cb = layer._codebook
    notes = []
    if cb.gumbel_sample.keywords.get("stochastic"):
        notes.append("stochastic_sample_codes=True draws codes from the same distribution (Gumbel-max inside "
                     "vqkern's search) with vqkern's own random numbers, so a seeded run does not draw the "
                     "library's codes")
    if cb.use_ddp and cb.sample_fn is sys.modules[_MODULE].sample_vectors_distributed and (
            cb.threshold_ema_dead_code > 0 or not bool(cb.initted)):
        notes.append("inside a process group, k-means seeds and dead-code replacements are drawn from every "
                     "rank's rows (the same on every rank, as in the library) with vqkern's own draws")
    if layer.commitment_use_cross_entropy_loss and cb.ema_update and not layer.learnable_codebook:
        notes.append("the gradient of the cross-entropy commitment loss is taken with the codebook its logits "
                     "were computed from (the library's backward reads the codebook its EMA step has already "
                     "rewritten in place)")
    return "; ".join(notes) or None


register(f"{_MODULE}.VectorQuantize",
         methods={"forward": _forward, "update_indices": _update_indices, "update_ema_indices": _update_indices},
         check=_check, setup=_setup, caveat=_caveat, on_load=_refresh_initted)
