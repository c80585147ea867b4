"""Stage 1: train the VQ-VAE, evaluate on held-out images, write metrics, pictures and a checkpoint.

Reproducibility: the data order of epoch e is a permutation drawn from a
generator seeded with (seed, e), so a step number alone fixes the batch; the
checkpoint holds the model, the optimizer, the global RNG state (used by
dead-code re-seeding) and the step, so ``--resume`` on CPU continues bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import outputs
from .data import load_data
from .model import VQVAE, make_quantizer

# The codebook recipes of ``--codebook``: "loss" is the paper's codebook trained by its
# loss term, "ema" the paper's EMA variant, "simvq" the reparameterized codebook of
# SimVQ. Each one's dead-code threshold when none is given.
CODEBOOKS = ("loss", "ema", "simvq")
DEAD_CODE_DEFAULT = {"loss": 0.0, "ema": 1.0, "simvq": 0.0}
# Chosen by measurement (benchmarks/results/cpu/train/2026-12-01-default-recipe.md): at
# K = 512 and 2000 steps it used all 512 codes on the test set (as did simvq; loss had
# collapsed to a batch perplexity of 51 by step 855), with held-out perplexity 402 against
# simvq's 92 and MSE 0.00454 against 0.00516.
DEFAULT_CODEBOOK = "ema"


@dataclass
class VQVAEConfig:
    data: str | None = None
    train_images: int = 0          # 0: all of them
    eval_images: int = 10000
    steps: int = 2000
    batch_size: int = 64
    num_embeddings: int = 512
    embedding_dim: int = 64
    hidden: int = 128
    res_hidden: int = 32
    res_blocks: int = 2
    lr: float = 1e-3
    beta: float = 0.25
    ema: bool = False              # legacy spelling of codebook="ema" (older checkpoints)
    decay: float = 0.99
    dead_code_threshold: float | None = None   # None: DEAD_CODE_DEFAULT[codebook]
    quantizer: str = "vqkern"
    backend: str = "auto"
    device: str = "auto"
    seed: int = 0
    out: str = "runs/vqvae"
    checkpoint_every: int = 500
    codebook: str = DEFAULT_CODEBOOK
    init: str = "random"
    kmeans_iters: int = 10
    kmeans_batches: int = 1
    codebook_dim: int = 0          # 0: search in D itself
    metric: str = "l2"

    def __post_init__(self):
        if self.ema:
            self.codebook = "ema"
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {CODEBOOKS}, got {self.codebook!r}")
        self.ema = self.codebook == "ema"
        if self.dead_code_threshold is None:
            self.dead_code_threshold = DEAD_CODE_DEFAULT[self.codebook]


def config_from_checkpoint(saved: dict, **override) -> VQVAEConfig:
    """The VQVAEConfig a checkpoint was trained with; checkpoints written before
    ``codebook`` existed trained by the codebook loss unless ``ema`` was set."""
    saved = dict(saved)
    if "codebook" not in saved:
        saved["codebook"] = "ema" if saved.get("ema") else "loss"
    return VQVAEConfig(**{**saved, **override})


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def build_model(cfg: VQVAEConfig, in_channels: int, quantizer: str | None = None) -> VQVAE:
    q = make_quantizer(quantizer or cfg.quantizer, cfg.num_embeddings, cfg.embedding_dim, beta=cfg.beta,
                       ema=cfg.ema, decay=cfg.decay, dead_code_threshold=cfg.dead_code_threshold,
                       backend=cfg.backend, simvq=cfg.codebook == "simvq", init=cfg.init,
                       kmeans_iters=cfg.kmeans_iters, kmeans_batches=cfg.kmeans_batches,
                       codebook_dim=cfg.codebook_dim or None, metric=cfg.metric)
    return VQVAE(q, in_channels=in_channels, hidden=cfg.hidden, res_hidden=cfg.res_hidden,
                 num_res_blocks=cfg.res_blocks, embedding_dim=cfg.embedding_dim)


def load_splits(cfg: VQVAEConfig):
    splits = load_data(cfg.data, seed=cfg.seed)
    train = splits.train[:cfg.train_images] if cfg.train_images > 0 else splits.train
    test = splits.test[:cfg.eval_images] if cfg.eval_images > 0 else splits.test
    h, w = train.shape[-2:]
    if h % 4 or w % 4:
        raise ValueError(f"image height and width must be multiples of 4 (two stride-2 layers), got {h} x {w}")
    return train, test, splits.source


def to_input(batch: np.ndarray, device: torch.device) -> Tensor:
    """uint8 (B, C, H, W) -> float32 on device with pixels in [-0.5, 0.5]."""
    return torch.from_numpy(batch).to(device).float().div_(255).sub_(0.5)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Rows of the training set used at ``step`` (0-based): a function of the step alone."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return perm[k * batch_size:(k + 1) * batch_size].numpy()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _save_codebook_by_copy(codebook: Tensor):
    """Autograd saves a copy of the codebook instead of the codebook itself.

    vqkern's quantize op saves the codebook for backward, and the EMA update (or
    dead-code re-seeding) then writes it in place in the same forward, which
    autograd rejects. The copy holds the values the forward used, as the
    reference's gathered codes do. (torch.autograd.graph.allow_mutation_on_saved_tensors
    does the same for every tensor but intercepts every op, which slowed the
    tiny test model's steps several times over.)
    """
    if codebook is None:
        return contextlib.nullcontext()

    def pack(t: Tensor) -> Tensor:
        return t.clone() if t.data_ptr() == codebook.data_ptr() and t.shape == codebook.shape else t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _stored_codebook(quantizer) -> Tensor | None:
    """The quantizer's codebook tensor when it stores one (a SimVQ codebook is computed)."""
    return quantizer._parameters.get("codebook", quantizer._buffers.get("codebook"))


def progress_bar(cfg: VQVAEConfig, start: int, progress: bool = True, desc: str = "vqvae"):
    """One tqdm bar for a whole run (steps ``start`` to cfg.steps): its elapsed time and
    rate cover the run, not the stretch since the last checkpoint."""
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True)


def train_steps(model: VQVAE, optimizer, train: np.ndarray, cfg: VQVAEConfig, device: torch.device,
                start: int, stop: int, log, progress: bool = True, desc: str = "vqvae", bar=None) -> list[float]:
    """Run steps [start, stop); call ``log(record)`` after each. Returns seconds per step.

    ``bar``: a :func:`progress_bar` shared by the stretches of one run (left open);
    without one, a bar for this call alone is made and closed.
    """
    model.train()
    times = []
    own_bar = bar is None
    if own_bar:
        bar = progress_bar(cfg, start, progress, desc)
    stored = _stored_codebook(model.quantizer)
    for step in range(start, stop):
        x = to_input(train[batch_indices(step, len(train), cfg.batch_size, cfg.seed)], device)
        _sync(device)
        t0 = time.perf_counter()
        with _save_codebook_by_copy(stored):
            recon, _, vq_loss, perplexity = model(x)
        recon_loss = torch.mean((recon - x) ** 2)
        loss = recon_loss + vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        record = {"step": step + 1, "epoch": step // max(1, len(train) // cfg.batch_size),
                  "loss": loss.item(), "recon": recon_loss.item(), "vq_loss": vq_loss.item(),
                  "perplexity": perplexity.item(), "images_per_s": x.shape[0] / dt, "step_s": dt}
        log(record)
        bar.update(1)
        if step % 10 == 0 or step + 1 == stop:
            bar.set_postfix(loss=f"{record['loss']:.4f}", recon=f"{record['recon']:.4f}",
                            ppl=f"{record['perplexity']:.1f}", img_s=f"{record['images_per_s']:.0f}")
    if own_bar:
        bar.close()
    return times


@torch.no_grad()
def evaluate(model: VQVAE, test: np.ndarray, device: torch.device, batch_size: int = 500):
    """Held-out reconstruction MSE, code histogram (K,) and the reconstructions of the first 32 images."""
    model.eval()
    k = model.quantizer.num_embeddings
    counts = torch.zeros(k, dtype=torch.float64)
    sq_err, first = 0.0, None
    for start in range(0, len(test), batch_size):
        x = to_input(test[start:start + batch_size], device)
        recon, idx, _, _ = model(x)
        sq_err += torch.sum((recon - x).double() ** 2).item()
        counts += torch.bincount(idx.reshape(-1).cpu(), minlength=k).double()
        if first is None:
            first = recon[:32]
    model.train()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-torch.special.xlogy(p, p).sum()))
    return {"test_recon": sq_err / test.size, "test_perplexity": perplexity,
            "codes_used": int((counts > 0).sum())}, counts.numpy(), first


def _save_checkpoint(path: Path, model, optimizer, cfg: VQVAEConfig, step: int, in_channels: int,
                     grid: tuple[int, int]) -> None:
    state = {"config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "step": step, "in_channels": in_channels, "grid": grid, "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # an interruption mid-write never leaves a torn checkpoint


def load_vqvae(path: str | Path, device: torch.device | str = "cpu") -> tuple[VQVAE, dict]:
    """Rebuild a trained VQVAE (eval mode) from a checkpoint; returns (model, checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no VQ-VAE checkpoint at {path} (train one with `python -m vqkern.train vqvae`)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = config_from_checkpoint(ckpt["config"])
    model = build_model(cfg, ckpt["in_channels"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def _summary_line(name: str, metrics: dict, times: list[float]) -> str:
    median = statistics.median(times[1:] or times) if times else float("nan")
    return (f"{name}: held-out recon MSE {metrics['test_recon']:.5f}, held-out perplexity "
            f"{metrics['test_perplexity']:.1f} ({metrics['codes_used']} codes used), "
            f"{median * 1e3:.1f} ms/step")


def train_vqvae(cfg: VQVAEConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train (or continue) one VQ-VAE and write its outputs under cfg.out; returns the final metrics."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    device = pick_device(cfg.device)
    start, ckpt = 0, None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        # The architecture and the data come from the checkpoint; only the length may change.
        keep = {"steps", "out", "device", "checkpoint_every"}
        cfg = config_from_checkpoint(ckpt["config"], **{k: getattr(cfg, k) for k in keep})
        start = ckpt["step"]
    train, test, source = load_splits(cfg)
    in_channels = train.shape[1]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, in_channels).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        # Drop records written after the checkpoint by an interrupted run.
        kept = [r for r in outputs.read_jsonl(metrics_path) if r["step"] <= start] if metrics_path.exists() else []
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    elif metrics_path.exists():
        metrics_path.unlink()
    grid = (train.shape[2] // 4, train.shape[3] // 4)
    times: list[float] = []
    with open(metrics_path, "a") as log_file:
        def log(record):
            log_file.write(json.dumps(record) + "\n")

        step = start
        bar = progress_bar(cfg, start, progress)
        while step < cfg.steps:
            stop = min(cfg.steps, (step // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
            times += train_steps(model, optimizer, train, cfg, device, step, stop, log, progress, bar=bar)
            step = stop
            log_file.flush()
            _save_checkpoint(ckpt_path, model, optimizer, cfg, step, in_channels, grid)
        bar.close()
    if start >= cfg.steps:
        _save_checkpoint(ckpt_path, model, optimizer, cfg, start, in_channels, grid)
    metrics, counts, recon = evaluate(model, test, device)
    records = outputs.read_jsonl(metrics_path)
    final = {"step": max(cfg.steps, start), **metrics,
             "final_loss": records[-1]["loss"] if records else float("nan"),
             "ms_per_step": 1e3 * statistics.median(times[1:] or times) if times else float("nan"),
             "data": source, "device": str(device), "quantizer": cfg.quantizer}
    paths = write_pictures(out, test, recon, counts, records, metrics, cfg)
    final.update({k: str(v) for k, v in paths.items()})
    (out / "final.json").write_text(json.dumps(final, indent=1) + "\n")
    return final


def write_pictures(out: Path, test, recon, counts, records, metrics, cfg) -> dict:
    columns = 8
    n = min(32, len(test))
    pairs = outputs.interleave_rows(test[:n], outputs.to_uint8(recon[:n]), columns)
    return {
        "reconstructions_png": outputs.save_grid(pairs, out / "reconstructions.png", columns=columns),
        "curves_png": outputs.plot_curves({cfg.quantizer: records}, out / "curves.png",
                                          title=f"VQ-VAE K={cfg.num_embeddings} D={cfg.embedding_dim}"),
        "usage_png": outputs.plot_usage(
            counts, out / "codebook_usage.png",
            f"held-out code usage: perplexity {metrics['test_perplexity']:.1f}, "
            f"{metrics['codes_used']}/{cfg.num_embeddings} codes used"),
    }
