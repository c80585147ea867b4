"""Drop-ins for ``vector_quantize_pytorch.ResidualVQ`` (Algorithm 1 of SoundStream,
https://arxiv.org/abs/2107.03312: each layer quantizes what the previous ones left)
and ``GroupedResidualVQ`` (one residual stack per slice of the features)."""
from __future__ import annotations

import random
from math import ceil

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ._args import reject_unsupported
from .rotation import directional_reparam
from .vector_quantize import VectorQuantize

UNSUPPORTED = dict()
UNSUPPORTED_FORWARD = dict(indices=None)


class DropoutSeed:
    """The seed of quantize dropout for each training step, the same on every rank.

    Outside a process group it is vector_quantize_pytorch's draw,
    ``torch.randint(0, 10_000, ())`` from the global generator (on the CPU, so a
    GPU model does not synchronize for ``.item()``), so seeded runs match it.
    Inside one, vector_quantize_pytorch all-reduces a fresh draw at every step,
    a collective that hangs as soon as one rank runs a forward the others do not
    (its issue #198: evaluation on one rank, ``no_grad`` passes). Here rank 0's
    draw is broadcast once, at the first training step, and each step's seed is
    derived from it and a step counter: no collective after the first step.
    Every rank must take the same number of training steps, as DDP requires anyway.
    """

    def __init__(self):
        self._base = None
        self._step = 0

    def __call__(self) -> int:
        if not distributed.is_distributed():
            return int(torch.randint(0, 10_000, ()))
        if self._base is None:
            base = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)
            # gloo and nccl both broadcast int64; nccl needs the tensor on the rank's GPU.
            device = torch.device("cuda", torch.cuda.current_device()) if (
                torch.distributed.get_backend() == "nccl") else torch.device("cpu")
            base = base.to(device)
            distributed.broadcast_(base)
            self._base = int(base.item())
        self._step += 1
        return random.Random(self._base * 1_000_003 + self._step).randrange(10_000)


class ImplicitCodebookMLP(nn.Module):
    """QINCo's codebook generator (Huijben et al. 2024, https://arxiv.org/abs/2401.14732):
    each code is remade for each row from the code and what the earlier layers have
    reconstructed there. Same parameters (names, shapes, creation order) as
    vector_quantize_pytorch's MLP.

    forward(codes (K, D) or (C, K, D) float, condition (B, N, D) or (B, D) float) ->
    codes (B, N, K, D) or (C, B, N, K, D): the (rows x K x D) tensor the method defines.
    """

    def __init__(self, dim, dim_hidden=None, depth=4, l2norm_output=False):
        super().__init__()
        dim_hidden = dim if dim_hidden is None else dim_hidden
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim))
                                     for _ in range(depth)])
        self.l2norm_output = l2norm_output

    def forward(self, codes: Tensor, *, condition: Tensor) -> Tensor:
        """codes (K, D) or (C, K, D) float, condition (B, N, D) or (B, D) float ->
        float codes (B, N, K, D) or (C, B, N, K, D)."""
        one_headed = codes.dim() == 2
        if condition.dim() == 2:
            condition = condition.unsqueeze(1)
        condition = condition.reshape(condition.shape[0], -1, condition.shape[-1])
        if one_headed:
            codes = codes.unsqueeze(0)
        h, k, d = codes.shape
        b, n = condition.shape[:2]
        x = torch.cat([condition[None, :, :, None].expand(h, b, n, k, d),
                       codes[:, None, None].expand(h, b, n, k, d)], dim=-1)
        x = self.proj_in(x)
        for layer in self.layers:
            x = layer(x) + x
        if self.l2norm_output:
            x = F.normalize(x, dim=-1)
        return x[0] if one_headed else x


def _round_up_multiple(num: int, mult: int) -> int:
    return ceil(num / mult) * mult


class ResidualVQ(nn.Module):
    """``num_quantizers`` VectorQuantize layers on successive residuals.

    Keyword arguments as vector_quantize_pytorch.ResidualVQ: ``dim``,
    ``num_quantizers``, ``codebook_size`` (an int, or a tuple of one size per
    layer), ``codebook_dim`` (with project_in/project_out around the stack),
    ``shared_codebook`` (one codebook for every layer, its EMA applied once per step),
    ``heads`` (must be 1), ``quantize_dropout`` (in training, the layers after a random
    depth in [quantize_dropout_cutoff_index, num_quantizers) are skipped, the depth
    rounded up to a multiple of ``quantize_dropout_multiple_of``), ``accept_image_fmap``,
    ``quant_grad_frac`` (the fraction of each layer's gradient that reaches the earlier
    layers through the residual), ``return_zeros_for_masked_padding``, and any
    supported :class:`VectorQuantize` option (passed to every layer).

    forward(x (B, N, dim)) returns ``(quantized, indices, losses)``: quantized like
    x, indices int64 (B, N, num_quantizers) (-1 for dropped layers and masked rows),
    losses float32 (num_quantizers,) (each layer's loss, 0 for dropped layers).
    ``return_all_codes=True`` adds the codes (num_quantizers, B, N, D).
    """

    def __init__(self, *, dim, num_quantizers=None, codebook_size, codebook_dim=None, shared_codebook=False,
                 diveq=False, heads=1, quantize_dropout=False, quantize_dropout_cutoff_index=0,
                 quantize_dropout_multiple_of=1, accept_image_fmap=False, implicit_neural_codebook=False,
                 mlp_kwargs=None, beam_size=None, eval_beam_size=None, beam_score_quantizer_weights=None,
                 quant_grad_frac=0.0, return_zeros_for_masked_padding=True, **vq_kwargs):
        super().__init__()
        given = dict(locals())
        given["mlp_kwargs"] = {} if mlp_kwargs is None else mlp_kwargs
        reject_unsupported("ResidualVQ", given, UNSUPPORTED)
        if heads != 1:
            raise ValueError(f"heads must be 1: residual VQ is not compatible with multi-headed codes, got {heads}")
        if num_quantizers is None and not isinstance(codebook_size, tuple):
            raise ValueError("num_quantizers is required unless codebook_size is a tuple of per-layer sizes")
        if not isinstance(quantize_dropout_cutoff_index, int) or quantize_dropout_cutoff_index < 0:
            raise ValueError("quantize_dropout_cutoff_index must be an int >= 0, "
                             f"got {quantize_dropout_cutoff_index!r}")
        if not isinstance(quantize_dropout_multiple_of, int) or quantize_dropout_multiple_of < 1:
            raise ValueError(f"quantize_dropout_multiple_of must be an int >= 1, got {quantize_dropout_multiple_of!r}")
        if not 0.0 <= float(quant_grad_frac) <= 1.0:
            raise ValueError(f"quant_grad_frac must lie in [0, 1], got {quant_grad_frac}")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim = codebook_dim
        requires_projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if requires_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if requires_projection else nn.Identity()
        self.has_projections = requires_projection
        self.accept_image_fmap = accept_image_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        vq_kwargs.update(return_zeros_for_masked_padding=return_zeros_for_masked_padding)
        if shared_codebook:
            vq_kwargs.update(manual_ema_update=True, manual_in_place_optimizer_update=True)
        self.implicit_neural_codebook = bool(implicit_neural_codebook)
        if self.implicit_neural_codebook:
            vq_kwargs.update(learnable_codebook=True, ema_update=False)
        self.diveq = bool(diveq)
        if self.diveq:
            # DiVeQ learns the codebook by gradient through the directional
            # reparameterization of the summed output, in place of the commitment loss.
            vq_kwargs.update(ema_update=False, learnable_codebook=True, route_gradients_to_input=False,
                             commitment_weight=0.0)

        sizes = codebook_size if isinstance(codebook_size, tuple) else (codebook_size,) * num_quantizers
        num_quantizers = len(sizes) if num_quantizers is None else num_quantizers
        if len(sizes) != num_quantizers:
            raise ValueError(f"codebook_size has {len(sizes)} entries for num_quantizers={num_quantizers}")
        self.num_quantizers, self.codebook_sizes = num_quantizers, sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        if shared_codebook and not self.uniform_codebook_size:
            raise ValueError(f"shared_codebook=True needs one codebook size for every layer, got {sizes}")
        self.layers = nn.ModuleList([
            VectorQuantize(dim=codebook_dim, codebook_size=size, codebook_dim=codebook_dim,
                           accept_image_fmap=accept_image_fmap, **vq_kwargs)
            for size in sizes
        ])
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.vq_is_ema_updating = self.layers[0].ema_update
        self.quant_grad_frac = 1.0 if self.diveq else float(quant_grad_frac)
        if eval_beam_size is not None and beam_size is None:
            raise ValueError("eval_beam_size needs beam_size")
        self.beam_size = beam_size
        self.eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        weights = [1.0] * num_quantizers if beam_score_quantizer_weights is None else list(beam_score_quantizer_weights)
        if len(weights) != num_quantizers:
            raise ValueError(f"beam_score_quantizer_weights needs {num_quantizers} weights, got {len(weights)}")
        self.register_buffer("beam_score_weights", torch.tensor(weights), persistent=False)
        # Created after the layers, as vector_quantize_pytorch, so one seed gives both the same weights.
        self.mlps = nn.ModuleList([
            ImplicitCodebookMLP(dim=codebook_dim, l2norm_output=self.layers[0].use_cosine_sim, **(mlp_kwargs or {}))
            for _ in range(num_quantizers - 1)]) if self.implicit_neural_codebook else None
        self._dropout_seed = DropoutSeed()
        self.shared_codebook = bool(shared_codebook)
        if shared_codebook:
            # One module under every layer's name: state_dict keys stay per layer,
            # as vector_quantize_pytorch's, with the same tensors behind them.
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0]._codebook

    @property
    def codebook_size(self) -> int:
        """The first layer's number of codes K."""
        return self.layers[0].codebook_size

    @property
    def codebooks(self):
        """(num_quantizers, K, D) when the sizes agree, else a tuple of (K_q, D)."""
        codebooks = tuple(layer._codebook.embed[0] for layer in self.layers)
        return torch.stack(codebooks) if self.uniform_codebook_size else codebooks

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """(B, ..., Q) int64 -> codes (num_quantizers, B, ..., D); Q < num_quantizers (coarse
        codes, with quantize dropout) pads with -1, and -1 (a dropped layer) gives a zero code."""
        q = indices.shape[-1]
        if q > self.num_quantizers or (q < self.num_quantizers and not self.quantize_dropout):
            raise ValueError(f"indices must end with num_quantizers = {self.num_quantizers} (fewer only with "
                             f"quantize_dropout), got {tuple(indices.shape)}")
        if q < self.num_quantizers:
            pad = indices.new_full((*indices.shape[:-1], self.num_quantizers - q), -1)
            indices = torch.cat([indices, pad], dim=-1)
        dropped = indices == -1
        safe = indices.masked_fill(dropped, 0)
        if not self.implicit_neural_codebook:
            codes = torch.stack([layer._codebook.embed[0][safe[..., i]] for i, layer in enumerate(self.layers)])
        else:
            # Layer by layer: each layer's codes are remade from what the earlier ones reconstructed.
            flat = safe.reshape(safe.shape[0], -1, safe.shape[-1])
            out, codes = 0.0, []
            for i, layer in enumerate(self.layers):
                table = layer._codebook.embed[0]
                if i == 0:
                    picked = table[flat[..., 0]]
                else:
                    remade = self.mlps[i - 1](table, condition=out)
                    picked = remade.gather(2, flat[..., i, None, None].expand(*flat.shape[:2], 1, table.shape[-1]))
                    picked = picked.squeeze(2)
                codes.append(picked)
                out = out + picked
            codes = torch.stack(codes).reshape(len(self.layers), *safe.shape[:-1], -1)
        return codes.masked_fill(dropped.movedim(-1, 0).unsqueeze(-1), 0.0)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """(B, ..., Q) int64 -> the sum of the layers' codes through project_out, (B, ..., dim) float32."""
        return self.project_out(self.get_codes_from_indices(indices).sum(dim=0))

    def _dropout_depth(self, seed) -> int:
        if seed is None:
            seed = self._dropout_seed()
        depth = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        if self.quantize_dropout_multiple_of != 1:
            depth = _round_up_multiple(depth + 1, self.quantize_dropout_multiple_of) - 1
        return depth

    def forward(self, x: Tensor, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
                freeze_codebook=False, beam_size=None, rand_quantize_dropout_fixed_seed=None):
        """x: float (B, N, dim) (or (B, dim, H, W) with accept_image_fmap).

        Args:
            mask: optional (B, N) bool, True for real rows (see VectorQuantize.forward).
            sample_codebook_temp: each layer's sampling temperature for this call.
            freeze_codebook: leave every codebook as it is for this call.
            rand_quantize_dropout_fixed_seed: the seed of this step's dropout depth (default:
                drawn, the same on every rank; see :class:`DropoutSeed`).
        Returns (quantized like x, indices int64 (B, N, num_quantizers), losses float32
        (num_quantizers,)), plus all codes (num_quantizers, B, N, D) with ``return_all_codes``.
        """
        reject_unsupported("ResidualVQ.forward", dict(indices=indices), UNSUPPORTED_FORWARD)
        orig_input = x
        x = self.project_in(x)
        quantized_out = torch.zeros_like(x)
        residual = x
        dropout = self.training and self.quantize_dropout
        depth = self._dropout_depth(rand_quantize_dropout_fixed_seed) if dropout else self.num_quantizers - 1
        if beam_size is None:
            beam_size = self.beam_size if self.training else self.eval_beam_size
        if beam_size is not None and beam_size > 1:
            if self.implicit_neural_codebook:
                raise ValueError("beam search is not supported with implicit_neural_codebook")
            quantized_out, all_indices, all_losses, all_residuals = self._beam_search(
                x, mask, int(beam_size), depth, sample_codebook_temp, freeze_codebook)
            return self._finish(x, orig_input, quantized_out, all_indices, all_losses, all_residuals, mask,
                                return_all_codes)
        all_indices, all_losses, all_residuals = [], [], []
        for q, layer in enumerate(self.layers):
            if q > depth:
                all_indices.append(torch.full_like(all_indices[0], -1))
                all_losses.append(torch.zeros_like(all_losses[0]))
                continue
            if self.shared_codebook:
                all_residuals.append(residual)
            transform = None
            if self.implicit_neural_codebook and q > 0:
                mlp, condition = self.mlps[q - 1], quantized_out

                def transform(codes, mlp=mlp, condition=condition):
                    return mlp(codes, condition=condition)
            quantized, embed_indices, loss = layer(residual, mask=mask, sample_codebook_temp=sample_codebook_temp,
                                                   freeze_codebook=freeze_codebook, codebook_transform_fn=transform)
            residual = residual - self._frac_gradient(quantized)
            quantized_out = quantized_out + quantized
            all_indices.append(embed_indices)
            all_losses.append(loss.reshape(1).float())
        all_indices = torch.stack(all_indices, dim=-1)
        all_losses = torch.cat(all_losses)
        return self._finish(x, orig_input, quantized_out, all_indices, all_losses, all_residuals, mask,
                            return_all_codes)

    def _finish(self, x, orig_input, quantized_out, all_indices, all_losses, all_residuals, mask, return_all_codes):
        """Shared-codebook EMA and re-seeding, DiVeQ, project_out and padding of forward."""
        if self.training and self.shared_codebook:
            shared = self.layers[0]
            if self.vq_is_ema_updating:
                shared._codebook.update_ema()
            # Every used layer's input, as one set of rows (position-major, each position's
            # layers in order, as vector_quantize_pytorch), re-seeds the shared dead codes.
            stacked = torch.stack(all_residuals, dim=-2)
            shared.expire_codes_(stacked.reshape(stacked.shape[0], -1, stacked.shape[-1]))

        if self.diveq:
            # In evaluation too, as vector_quantize_pytorch.
            quantized_out = directional_reparam(x, quantized_out)
        quantized_out = self.project_out(quantized_out)
        if mask is not None:
            padding = torch.zeros_like(quantized_out) if self.return_zeros_for_masked_padding else orig_input
            quantized_out = torch.where(mask.unsqueeze(-1), quantized_out, padding)
        if not return_all_codes:
            return quantized_out, all_indices, all_losses
        return quantized_out, all_indices, all_losses, self.get_codes_from_indices(all_indices)

    def _beam_search(self, x, mask, beam, depth, sample_codebook_temp, freeze_codebook):
        """Residual quantization keeping the ``beam`` best code paths per row, scored by
        the (weighted) sum of the layers' per-row commitment losses, as
        vector_quantize_pytorch; each layer searches its top ``beam`` codes for every
        path (a running top-k over code tiles). The codebooks are updated at the end, from
        the best path's codes. Returns (quantized (B, N, D), indices (B, N, Q), losses (Q,),
        residuals of each used layer (B, N, D) list)."""
        b, n, d = x.shape
        scores = x.new_zeros(b, n, 1)
        residual, quantized_out = x.unsqueeze(2), torch.zeros_like(x).unsqueeze(2)   # (B, N, paths, D)
        indices = torch.empty(b, n, 1, 0, dtype=torch.int64, device=x.device)
        losses = x.new_zeros(b, n, 1, 0)
        residuals = x.new_zeros(b, n, 1, 0, d)

        def select(t, picked):   # t (B, N, paths, ...) at picked (B, N, kept) -> (B, N, kept, ...)
            index = picked.reshape(*picked.shape, *([1] * (t.dim() - 3))).expand(*picked.shape, *t.shape[3:])
            return t.gather(2, index)

        for q, layer in enumerate(self.layers):
            if q > depth:
                indices = F.pad(indices, (0, 1), value=-1)
                losses = F.pad(losses, (0, 1), value=0.0)
                continue
            paths = residual.shape[2]
            residuals = torch.cat([residuals, residual.unsqueeze(3)], dim=3)
            path_mask = None if mask is None else mask.unsqueeze(-1).expand(b, n, paths).reshape(b, n * paths)
            quantized, codes, loss = layer(residual.reshape(b, n * paths, d), mask=path_mask, topk=beam,
                                           sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook)
            k = codes.shape[-1]
            quantized = quantized.reshape(b, n, paths, k, d)
            codes, loss = codes.reshape(b, n, paths, k), loss.reshape(b, n, paths, k)
            scores = (scores.unsqueeze(-1) - loss * self.beam_score_weights[q]).reshape(b, n, paths * k)
            residual = (residual.unsqueeze(3) - self._frac_gradient(quantized)).reshape(b, n, paths * k, d)
            quantized_out = (quantized_out.unsqueeze(3) + quantized).reshape(b, n, paths * k, d)
            residuals = residuals.unsqueeze(3).expand(b, n, paths, k, *residuals.shape[3:]).reshape(
                b, n, paths * k, *residuals.shape[3:])
            indices = torch.cat([indices.unsqueeze(3).expand(b, n, paths, k, indices.shape[-1]),
                                 codes.unsqueeze(-1)], dim=-1).reshape(b, n, paths * k, -1)
            losses = torch.cat([losses.unsqueeze(3).expand(b, n, paths, k, losses.shape[-1]),
                                loss.unsqueeze(-1)], dim=-1).reshape(b, n, paths * k, -1)
            kept = 1 if q == (depth if self.training and self.quantize_dropout else self.num_quantizers - 1) else beam
            if scores.shape[-1] > kept:
                scores, picked = scores.topk(kept, dim=-1)
                residual, quantized_out = select(residual, picked), select(quantized_out, picked)
                indices, losses, residuals = select(indices, picked), select(losses, picked), select(residuals, picked)

        quantized_out, indices, losses, residuals = (t[:, :, 0] for t in (quantized_out, indices, losses, residuals))
        if mask is not None:
            losses = torch.where(mask.unsqueeze(-1), losses, torch.zeros_like(losses))
            losses = losses.sum(dim=(0, 1)) / mask.sum().clamp_min(1e-4)
        else:
            losses = losses.mean(dim=(0, 1))
        if self.training:
            for layer, layer_input, codes in zip(self.layers, residuals.unbind(dim=-2), indices.unbind(dim=-1)):
                layer.update_indices(layer_input, codes, mask=mask)
        return quantized_out, indices, losses, list(residuals.unbind(dim=-2))

    def _frac_gradient(self, t: Tensor) -> Tensor:
        if self.quant_grad_frac <= 0:
            return t.detach()
        return self.quant_grad_frac * t + (1.0 - self.quant_grad_frac) * t.detach()


class GroupedResidualVQ(nn.Module):
    """``groups`` ResidualVQ stacks, each on its slice of dim // groups features.

    Keyword arguments: ``dim``, ``groups``, ``accept_image_fmap`` and any
    :class:`ResidualVQ` argument (passed to every group).

    forward(x (B, N, dim)) returns ``(quantized, indices, losses)``: quantized like x,
    indices int64 (groups, B, N, num_quantizers), losses float32 (groups, num_quantizers);
    ``return_all_codes=True`` adds a tuple of each group's codes. In training every
    group drops the same layers (one dropout seed per step).
    """

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__()
        if not isinstance(groups, int) or groups < 1 or dim % groups:
            raise ValueError(f"groups must be a positive int dividing dim = {dim}, got {groups!r}")
        self.dim, self.groups = dim, groups
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList([ResidualVQ(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs)
                                   for _ in range(groups)])
        self._dropout_seed = DropoutSeed()

    @property
    def codebooks(self) -> Tensor:
        """(groups, num_quantizers, K, D)."""
        return torch.stack(tuple(rvq.codebooks for rvq in self.rvqs))

    @property
    def split_dim(self) -> int:
        """The feature axis: 1 for image feature maps, else -1."""
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices) -> Tensor:
        """indices int64 of shape (groups, B, N, Q) -> float codes of shape (groups, num_quantizers, B, N, D)."""
        return torch.stack(tuple(rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)))

    def get_output_from_indices(self, indices) -> Tensor:
        """indices int64 of shape (groups, B, N, Q) -> the output, float32 of shape (B, N, dim)."""
        return torch.cat(tuple(rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)),
                         dim=self.split_dim)

    def forward(self, x: Tensor, indices=None, return_all_codes=False, sample_codebook_temp=None,
                freeze_codebook=False, mask=None):
        """x: float (B, N, dim); see the class for the outputs."""
        reject_unsupported("GroupedResidualVQ.forward", dict(indices=indices), dict(indices=None))
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have dim = {self.dim} features on axis {self.split_dim}, got {tuple(x.shape)}")
        seed = self._dropout_seed() if self.training else None
        out = [rvq(chunk, return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp,
                   freeze_codebook=freeze_codebook, mask=mask, rand_quantize_dropout_fixed_seed=seed)
               for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim))]
        quantized, all_indices, losses, *codes = zip(*out)
        return (torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices), torch.stack(losses), *codes)
