"""``python -m vqkern.train {vqvae,prior,sample}``: the command line of the training script."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import load_data
from .model import QUANTIZERS
from .stage1 import CODEBOOKS, DEAD_CODE_DEFAULT, VQVAEConfig


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help="output folder (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--threads", type=_positive(int), default=None,
                   help="CPU threads for PyTorch (default: PyTorch's choice; 1 is faster on a busy machine)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vqkern.train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = VQVAEConfig()

    v = sub.add_parser("vqvae", help="stage 1: train the VQ-VAE (or --compare both quantizers)")
    v.add_argument("--data", default=None, help="IDX folder, .npy array or image folder "
                   "(default: Fashion-MNIST from the Debian package dataset-fashion-mnist)")
    length = v.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive(int), default=d.steps)
    length.add_argument("--epochs", type=_positive(float), help="instead of --steps: passes over the training set")
    v.add_argument("--batch-size", type=_positive(int), default=d.batch_size)
    v.add_argument("--num-embeddings", "-K", type=_positive(int), default=d.num_embeddings, help="codebook size K")
    v.add_argument("--embedding-dim", "-D", type=_positive(int), default=d.embedding_dim, help="code size D")
    v.add_argument("--hidden", type=_positive(int), default=d.hidden, help="convolution channels")
    v.add_argument("--res-hidden", type=_positive(int), default=d.res_hidden)
    v.add_argument("--res-blocks", type=int, default=d.res_blocks)
    v.add_argument("--lr", type=_positive(float), default=d.lr)
    v.add_argument("--beta", type=float, default=d.beta, help="commitment cost")
    v.add_argument("--codebook", choices=CODEBOOKS, default=d.codebook,
                   help="how the codebook learns: loss (the paper's codebook loss), ema (the paper's EMA "
                   "updates), simvq (a frozen random basis times a learned linear map); default %(default)s")
    v.add_argument("--ema", action="store_true", help="the same as --codebook ema")
    v.add_argument("--decay", type=float, default=d.decay, help="EMA decay")
    v.add_argument("--dead-code-threshold", type=float, default=None,
                   help="re-seed codes whose EMA usage falls below this (0: never; default: "
                   + ", ".join(f"{v:g} with {k}" for k, v in DEAD_CODE_DEFAULT.items()) + ")")
    v.add_argument("--init", choices=("random", "kmeans"), default=d.init,
                   help="codebook initialization: random, or k-means on the first training batches")
    v.add_argument("--kmeans-iters", type=_positive(int), default=d.kmeans_iters)
    v.add_argument("--kmeans-batches", type=_positive(int), default=d.kmeans_batches,
                   help="training batches whose rows --init kmeans clusters")
    v.add_argument("--codebook-dim", type=int, default=d.codebook_dim,
                   help="search in a space of this size (a learned projection of z and back; 0: in D itself)")
    v.add_argument("--metric", choices=("l2", "cosine"), default=d.metric,
                   help="cosine: z and codes l2-normalized before the search")
    v.add_argument("--quantizer", choices=QUANTIZERS, default=d.quantizer)
    v.add_argument("--backend", default=d.backend, help="vqkern backend: auto, triton, cuda, torch, reference")
    v.add_argument("--train-images", type=int, default=0, help="use only the first N training images (0: all)")
    v.add_argument("--eval-images", type=int, default=d.eval_images, help="held-out images to evaluate (0: all)")
    v.add_argument("--checkpoint-every", type=_positive(int), default=d.checkpoint_every)
    v.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt up to --steps")
    v.add_argument("--compare", action="store_true",
                   help="train twice from the same weights and data, reference quantizer then vqkern")
    _common(v, "runs/vqvae")

    p = sub.add_parser("prior", help="stage 2: fit a gated PixelCNN over the code grids of the training set")
    p.add_argument("--vqvae", default=None, help="VQ-VAE checkpoint (default OUT/checkpoint.pt)")
    p.add_argument("--steps", type=_positive(int), default=2000)
    p.add_argument("--batch-size", type=_positive(int), default=128)
    p.add_argument("--lr", type=_positive(float), default=1e-3)
    p.add_argument("--channels", type=_positive(int), default=64)
    p.add_argument("--layers", type=_positive(int), default=8)
    _common(p, "runs/vqvae")

    s = sub.add_parser("sample", help="draw code grids from the prior and decode them to a PNG")
    s.add_argument("--prior", default=None, help="prior checkpoint (default OUT/prior.pt)")
    s.add_argument("--vqvae", default=None, help="VQ-VAE checkpoint (default: the one the prior was fit on)")
    s.add_argument("-n", "--num", type=_positive(int), default=64, help="images to draw")
    s.add_argument("--columns", type=_positive(int), default=8)
    s.add_argument("--temperature", type=_positive(float), default=1.0)
    s.add_argument("--png", default=None, help="output PNG (default OUT/samples.png)")
    _common(s, "runs/vqvae")
    return parser


def _vqvae_config(args) -> VQVAEConfig:
    steps = args.steps
    if args.epochs is not None:
        n = len(load_data(args.data, seed=args.seed).train)
        n = min(n, args.train_images) if args.train_images > 0 else n
        steps = max(1, round(args.epochs * max(1, n // args.batch_size)))
    return VQVAEConfig(
        data=args.data, train_images=args.train_images, eval_images=args.eval_images, steps=steps,
        batch_size=args.batch_size, num_embeddings=args.num_embeddings, embedding_dim=args.embedding_dim,
        hidden=args.hidden, res_hidden=args.res_hidden, res_blocks=args.res_blocks, lr=args.lr, beta=args.beta,
        codebook="ema" if args.ema else args.codebook, decay=args.decay,
        dead_code_threshold=args.dead_code_threshold, quantizer=args.quantizer,
        backend=args.backend, device=args.device, seed=args.seed, out=args.out,
        checkpoint_every=args.checkpoint_every, init=args.init, kmeans_iters=args.kmeans_iters,
        kmeans_batches=args.kmeans_batches, codebook_dim=args.codebook_dim, metric=args.metric)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        if args.command == "vqvae":
            cfg = _vqvae_config(args)
            if args.compare:
                from .compare import compare_quantizers
                r = compare_quantizers(cfg, progress=progress)
                for kind in ("reference", "vqkern"):
                    m = r[kind]
                    print(f"{kind:>9}: final loss {m['final_loss']:.5f}, held-out recon MSE {m['test_recon']:.5f}, "
                          f"perplexity {m['test_perplexity']:.1f}, {m['ms_per_step']:.1f} ms/step")
                print("largest |difference| per step: " + ", ".join(f"{k} {v:.3g}" for k, v in r["max_abs_diff"].items()))
                print(f"vqkern speed-up per step: {r['speedup']:.2f}x; curves: {r['curves_png']}")
                return 0
            from .stage1 import train_vqvae
            r = train_vqvae(cfg, resume=args.resume, progress=progress)
            print(f"held-out reconstruction MSE {r['test_recon']:.5f} (pixels in [0, 1], {cfg.eval_images or 'all'} "
                  f"test images); perplexity {r['test_perplexity']:.1f} of K={cfg.num_embeddings} "
                  f"({r['codes_used']} codes used); {r['ms_per_step']:.1f} ms/step on {r['device']}")
            for key in ("reconstructions_png", "curves_png", "usage_png"):
                print(f"{key[:-4]}: {r[key]}")
            print(f"checkpoint: {Path(cfg.out) / 'checkpoint.pt'}; metrics: {Path(cfg.out) / 'metrics.jsonl'}")
        elif args.command == "prior":
            from .stage2 import PriorConfig, train_prior
            cfg = PriorConfig(vqvae=args.vqvae or str(Path(args.out) / "checkpoint.pt"), steps=args.steps,
                              batch_size=args.batch_size, lr=args.lr, channels=args.channels, layers=args.layers,
                              device=args.device, seed=args.seed, out=args.out)
            r = train_prior(cfg, progress=progress)
            print(json.dumps(r))
        else:
            from .stage2 import sample_images
            png = sample_images(args.prior or Path(args.out) / "prior.pt", args.png or Path(args.out) / "samples.png",
                                n=args.num, columns=args.columns, temperature=args.temperature, seed=args.seed,
                                device=args.device, vqvae=args.vqvae)
            print(f"samples: {png}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
