"""Stage 2: fit a gated PixelCNN prior over the training set's code grids, then sample images."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import outputs
from .prior import GatedPixelCNN
from .stage1 import VQVAEConfig, load_splits, load_vqvae, pick_device, to_input


@dataclass
class PriorConfig:
    vqvae: str = "runs/vqvae/checkpoint.pt"
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    channels: int = 64
    layers: int = 8
    device: str = "auto"
    seed: int = 0
    out: str = "runs/vqvae"


@torch.no_grad()
def encode_all(model, images: np.ndarray, device, batch_size: int = 500) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> code grids (N, H/4, W/4) int64 on CPU."""
    model.eval()
    return torch.cat([model.encode(to_input(images[i:i + batch_size], device)).cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def _nll(prior, grids: torch.Tensor, device, batch_size: int = 500) -> float:
    prior.eval()
    total = sum(F.cross_entropy(prior(g.to(device)), g.to(device), reduction="sum").item()
                for g in grids.split(batch_size))
    prior.train()
    return total / grids.numel()


def train_prior(cfg: PriorConfig, *, progress: bool = True) -> dict:
    """Encode the VQ-VAE's training and test sets, fit the prior, write prior.pt and prior_metrics.jsonl.

    Returns the final training and held-out negative log-likelihood in nats per code.
    """
    from tqdm import tqdm

    device = pick_device(cfg.device)
    cfg.vqvae = str(Path(cfg.vqvae).resolve())  # sample() may run from another folder
    vqvae, ckpt = load_vqvae(cfg.vqvae, device)
    vcfg = VQVAEConfig(**ckpt["config"])
    train, test, _ = load_splits(vcfg)
    train_grids, test_grids = encode_all(vqvae, train, device), encode_all(vqvae, test, device)
    torch.manual_seed(cfg.seed)
    prior = GatedPixelCNN(vcfg.num_embeddings, cfg.channels, cfg.layers).to(device)
    optimizer = torch.optim.Adam(prior.parameters(), lr=cfg.lr)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.steps), desc="prior", disable=not progress, dynamic_ncols=True)
    with open(out / "prior_metrics.jsonl", "w") as log:
        for step in bar:
            grids = train_grids[torch.randint(len(train_grids), (cfg.batch_size,), generator=gen)].to(device)
            t0 = time.perf_counter()
            loss = F.cross_entropy(prior(grids), grids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            record = {"step": step + 1, "nll": loss.item(), "bits_per_code": loss.item() / math.log(2),
                      "step_s": time.perf_counter() - t0}
            log.write(json.dumps(record) + "\n")
            if step % 10 == 0:
                bar.set_postfix(nll=f"{record['nll']:.3f}")
    result = {"train_nll": _nll(prior, train_grids[:5000], device), "test_nll": _nll(prior, test_grids, device),
              "first_nll": outputs.read_jsonl(out / "prior_metrics.jsonl")[0]["nll"] if cfg.steps else None,
              "grid": list(train_grids.shape[1:])}
    torch.save({"config": asdict(cfg), "model": prior.state_dict(), "grid": tuple(train_grids.shape[1:]),
                "num_codes": vcfg.num_embeddings, "result": result}, out / "prior.pt")
    result["prior_checkpoint"] = str(out / "prior.pt")
    return result


def sample_images(prior_path: str | Path, out_png: str | Path, *, n: int = 64, columns: int = 8,
                  temperature: float = 1.0, seed: int = 0, device: str = "auto",
                  vqvae: str | Path | None = None) -> Path:
    """Draw n code grids from a trained prior, decode them with its VQ-VAE, write one PNG grid.

    vqvae: the VQ-VAE checkpoint, when not where the prior was trained from.
    """
    prior_path = Path(prior_path)
    if not prior_path.is_file():
        raise FileNotFoundError(f"no prior checkpoint at {prior_path} (train one with `python -m vqkern.train prior`)")
    if n < 1 or columns < 1:
        raise ValueError(f"n and columns must be positive, got n={n}, columns={columns}")
    dev = pick_device(device)
    ckpt = torch.load(prior_path, map_location="cpu", weights_only=False)
    pcfg = PriorConfig(**ckpt["config"])
    prior = GatedPixelCNN(ckpt["num_codes"], pcfg.channels, pcfg.layers)
    prior.load_state_dict(ckpt["model"])
    prior.to(dev).eval()
    vqvae_model, _ = load_vqvae(vqvae or pcfg.vqvae, dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    grids = prior.sample(n, *ckpt["grid"], temperature=temperature, generator=gen)
    images = outputs.to_uint8(vqvae_model.decode_indices(grids))
    return outputs.save_grid(images, out_png, columns=columns)
