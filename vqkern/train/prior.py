"""Stage-2 priors over grids of code indices, optionally conditioned on a text prompt.

GatedPixelCNN (van den Oord et al. 2016, "Conditional Image Generation with
PixelCNN Decoders"): two stacks remove the blind spot of the original PixelCNN:
a vertical stack that sees every row above, and a horizontal stack that sees the
pixels to the left in the current row plus the vertical stack's view. Causality
comes from kernel shapes, cropping and a one-row shift; only the first layer's
horizontal kernel is masked, to drop the current pixel. The condition h (the mean
embedding of the prompt's words) enters every gated layer as the paper's
tanh(W * x + V h) * sigmoid(W' * x + V' h), in both stacks.

TransformerPrior: a causal transformer (PyTorch's nn.TransformerEncoderLayer,
pre-norm, whose attention is scaled_dot_product_attention) over the prompt's word
tokens, a start token and the code grid flattened in raster order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .text import PAD


def _gate(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def draw(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0,
         generator: torch.Generator | None = None) -> Tensor:
    """One code per row from logits (B, K): softmax(logits / temperature), restricted to the top_k (0: all)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[1]:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)


def _check_sample_args(temperature: float, top_k: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: no limit), got {top_k}")


class GatedLayer(nn.Module):
    """One gated layer: (v, h) (B, C, H, W) each, cond (B, 4C) or None -> (v, h) of the same shape."""

    def __init__(self, channels: int, kernel: int, first: bool):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {kernel}")
        half = kernel // 2
        self.first = first
        # Vertical: output row i sees padded rows i..i+half = input rows i-half..i.
        self.vertical = nn.Conv2d(channels, 2 * channels, (half + 1, kernel), padding=(half, half))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        # Horizontal: output column j sees input columns j-half..j of the same row.
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, half + 1), padding=(0, half))
        self.h_out = nn.Conv2d(channels, channels, 1)
        if first:
            # The first layer must not see the pixel it predicts: no current column.
            mask = torch.ones(half + 1)
            mask[-1] = 0.0
            self.register_buffer("h_mask", mask, persistent=False)

    def forward(self, v: Tensor, h: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        height, width = v.shape[-2:]
        v_pre = self.vertical(v)[:, :, :height]
        wh = self.horizontal.weight * self.h_mask if self.first else self.horizontal.weight
        h_pre = F.conv2d(h, wh, self.horizontal.bias, padding=self.horizontal.padding)[..., :width]
        # Row i of v_pre saw row i itself (pixels at and right of the current one);
        # shifted down one row, the horizontal stack only gets the rows above.
        v_shifted = F.pad(v_pre, (0, 0, 1, 0))[:, :, :height]
        h_pre = h_pre + self.v_to_h(v_shifted)
        if cond is not None:
            # The same condition at every position: it cannot leak a later code.
            cv, ch = cond[:, :, None, None].chunk(2, dim=1)
            v_pre, h_pre = v_pre + cv, h_pre + ch
        h_new = self.h_out(_gate(h_pre))
        # No residual in the first layer: its input h holds the current pixel.
        return _gate(v_pre), h_new if self.first else h + h_new


class GatedPixelCNN(nn.Module):
    """Autoregressive prior over (B, H, W) int64 grids of K code indices, raster order.

    forward(indices, tokens) -> logits (B, K, H, W) float, where position (i, j)
    depends only on positions before it in raster order and on the prompt.
    vocab_size: word ids of the prompts (padding included; 0: unconditional, tokens
    must then be None); tokens: (B, L) int64 word ids padded with 0.
    """

    kind = "pixelcnn"

    def __init__(self, num_codes: int, channels: int = 64, layers: int = 8, kernel: int = 3,
                 vocab_size: int = 0):
        super().__init__()
        self.num_codes, self.vocab_size = num_codes, vocab_size
        self.embed = nn.Embedding(num_codes, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, kernel if i else 7, first=i == 0) for i in range(layers))
        self.head = nn.Sequential(nn.Conv2d(channels, 4 * channels, 1), nn.ReLU(),
                                  nn.Conv2d(4 * channels, num_codes, 1))
        if vocab_size:
            # Mean of the prompt's word embeddings (padding left out), then one V h per layer and stack.
            self.words = nn.EmbeddingBag(vocab_size, channels, mode="mean", padding_idx=PAD)
            self.cond = nn.ModuleList(nn.Linear(channels, 4 * channels) for _ in range(layers))

    def forward(self, indices: Tensor, tokens: Tensor | None = None) -> Tensor:
        """indices (B, H, W) int64, tokens (B, L) int64 or None -> logits (B, K, H, W) float."""
        if indices.dtype != torch.int64 or indices.dim() != 3:
            raise ValueError(f"indices must be an int64 tensor (B, H, W), got {indices.dtype} {tuple(indices.shape)}")
        conditional = _prompt_check(self, indices, tokens)
        word = self.words(tokens) if conditional else None
        x = self.embed(indices).permute(0, 3, 1, 2)
        v = h = x
        for i, layer in enumerate(self.layers):
            v, h = layer(v, h, self.cond[i](word) if conditional else None)
        return self.head(h)

    @torch.no_grad()
    def sample(self, n: int, height: int, width: int, *, tokens: Tensor | None = None, temperature: float = 1.0,
               top_k: int = 0, generator: torch.Generator | None = None) -> Tensor:
        """n new grids (n, height, width) int64, one position at a time in raster order.

        tokens: (n, L) word ids of the prompts for a conditional prior.
        """
        _check_sample_args(temperature, top_k)
        device = self.embed.weight.device
        grid = torch.zeros(n, height, width, dtype=torch.int64, device=device)
        for i in range(height):
            for j in range(width):
                # Rows below i cannot reach row i (causal), so they are left out of the forward.
                logits = self(grid[:, :i + 1], tokens)[:, :, i, j]
                grid[:, i, j] = draw(logits, temperature=temperature, top_k=top_k, generator=generator)
        return grid


def _prompt_check(model: nn.Module, indices: Tensor, tokens: Tensor | None) -> bool:
    """Validate tokens against the model: True when the model is conditional (and tokens given)."""
    if not model.vocab_size:
        if tokens is not None:
            raise ValueError("this prior is unconditional: it takes no prompt tokens")
        return False
    if tokens is None:
        raise ValueError("this prior is conditional: pass the prompt's word ids as tokens (B, L)")
    if tokens.dtype != torch.int64 or tokens.dim() != 2 or tokens.shape[0] != indices.shape[0]:
        raise ValueError(f"tokens must be int64 (B, L) with B = {indices.shape[0]}, got {tokens.dtype} "
                         f"{tuple(tokens.shape)}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= model.vocab_size):
        raise ValueError(f"tokens must lie in [0, {model.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    return True


class TransformerPrior(nn.Module):
    """Causal transformer prior over (B, H, W) int64 grids of K code indices, raster order.

    The sequence is the prompt's prompt_len word tokens (padding included: a
    conditional prior always has this prefix), a start token, then codes 0..HW-2;
    the output at the start token and every code predicts the next code.
    forward(indices, tokens) -> logits (B, K, H, W) float, as GatedPixelCNN's.

    positions: H * W of the grids it models; d_model, layers, heads: the encoder's
    size (feed-forward 4 * d_model); vocab_size, prompt_len: the prompt's word ids
    and their count (0: unconditional).
    """

    kind = "transformer"

    def __init__(self, num_codes: int, positions: int, d_model: int = 128, layers: int = 5, heads: int = 4,
                 vocab_size: int = 0, prompt_len: int = 0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        if bool(vocab_size) != bool(prompt_len):
            raise ValueError(f"vocab_size ({vocab_size}) and prompt_len ({prompt_len}) are both 0 or both positive")
        self.num_codes, self.positions, self.vocab_size, self.prompt_len = num_codes, positions, vocab_size, prompt_len
        self.start = num_codes          # token ids: codes, start, then words
        self.embed = nn.Embedding(num_codes + 1 + vocab_size, d_model)
        self.pos = nn.Parameter(torch.zeros(prompt_len + positions, d_model))
        nn.init.normal_(self.pos, std=0.02)
        # No dropout: these priors underfit in the budgets they train for, and without
        # it a resumed run repeats the uninterrupted one exactly.
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_codes)

    def _sequence(self, codes: Tensor, tokens: Tensor | None) -> Tensor:
        """codes (B, T) int64 already in raster order -> token ids (B, prompt_len + 1 + T)."""
        start = torch.full((codes.shape[0], 1), self.start, dtype=torch.int64, device=codes.device)
        parts = [start, codes]
        if self.vocab_size:
            parts.insert(0, tokens + self.num_codes + 1)
        return torch.cat(parts, 1)

    def _logits(self, seq: Tensor) -> Tensor:
        """token ids (B, S) -> next-code logits (B, S - prompt_len, K) from the start token on."""
        s = seq.shape[1]
        x = self.embed(seq) + self.pos[:s]
        mask = nn.Transformer.generate_square_subsequent_mask(s, device=seq.device, dtype=x.dtype)
        x = self.encoder(x, mask=mask, is_causal=True)
        return self.head(self.norm(x[:, self.prompt_len:]))

    def forward(self, indices: Tensor, tokens: Tensor | None = None) -> Tensor:
        """indices (B, H, W) int64 (H * W = positions), tokens (B, prompt_len) int64 or None -> (B, K, H, W) float."""
        if indices.dtype != torch.int64 or indices.dim() != 3:
            raise ValueError(f"indices must be an int64 tensor (B, H, W), got {indices.dtype} {tuple(indices.shape)}")
        b, hgt, wid = indices.shape
        if hgt * wid != self.positions:
            raise ValueError(f"this prior models grids of {self.positions} codes, got {hgt} x {wid}")
        if _prompt_check(self, indices, tokens) and tokens.shape[1] != self.prompt_len:
            raise ValueError(f"tokens must have {self.prompt_len} word ids per prompt, got {tokens.shape[1]}")
        logits = self._logits(self._sequence(indices.reshape(b, -1)[:, :-1], tokens))
        return logits.transpose(1, 2).reshape(b, self.num_codes, hgt, wid)

    @torch.no_grad()
    def sample(self, n: int, height: int, width: int, *, tokens: Tensor | None = None, temperature: float = 1.0,
               top_k: int = 0, generator: torch.Generator | None = None) -> Tensor:
        """n new grids (n, height, width) int64, one code at a time in raster order; tokens as in forward."""
        _check_sample_args(temperature, top_k)
        if height * width != self.positions:
            raise ValueError(f"this prior models grids of {self.positions} codes, got {height} x {width}")
        device = self.embed.weight.device
        probe = torch.zeros(n, 1, 1, dtype=torch.int64, device=device)
        _prompt_check(self, probe, tokens)
        codes = torch.zeros(n, 0, dtype=torch.int64, device=device)
        for _ in range(self.positions):
            # Causal: the codes not drawn yet cannot change these logits, so they are not fed.
            logits = self._logits(self._sequence(codes, tokens))[:, -1]
            code = draw(logits, temperature=temperature, top_k=top_k, generator=generator)
            codes = torch.cat([codes, code[:, None]], 1)
        return codes.reshape(n, height, width)
