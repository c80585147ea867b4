"""``python -m vqkern.train {vqvae,prior,sample}``: the command line of the training script."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import load_data
from .model import QUANTIZERS
from .stage1 import CODEBOOKS, DEAD_CODE_DEFAULT, VQVAEConfig
from .stage2 import PRIORS


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

    p = sub.add_parser("prior", help="stage 2: fit a prior (gated PixelCNN or transformer) over the code grids "
                       "of the training set, conditioned on the class name when the data has labels")
    p.add_argument("--prior", choices=PRIORS, default="pixelcnn", help="the model (default %(default)s)")
    p.add_argument("--vqvae", default=None, help="VQ-VAE checkpoint (default OUT/checkpoint.pt)")
    p.add_argument("--unconditional", action="store_true",
                   help="ignore the data's labels (default: conditional on the class name when there are labels)")
    p.add_argument("--steps", type=_positive(int), default=2000)
    p.add_argument("--batch-size", type=_positive(int), default=128)
    p.add_argument("--lr", type=_positive(float), default=1e-3, help="learning rate (after a 100-step warm-up)")
    p.add_argument("--channels", type=_positive(int), default=None,
                   help="pixelcnn: channels (default 64); transformer: d_model (default 128)")
    p.add_argument("--layers", type=_positive(int), default=None, help="default: 8 (pixelcnn), 5 (transformer)")
    p.add_argument("--heads", type=_positive(int), default=4, help="transformer attention heads")
    p.add_argument("--checkpoint-every", type=_positive(int), default=500)
    p.add_argument("--resume", action="store_true", help="continue OUT/prior-<kind>[-uncond].pt up to --steps")
    p.add_argument("--eval-samples", type=int, default=200,
                   help="images drawn per class name for the prompt accuracy (0: skip it)")
    p.add_argument("--classifier-steps", type=_positive(int), default=1500,
                   help="training steps of the prompt-accuracy classifier (cached in OUT/classifier.pt)")
    _common(p, "runs/vqvae")

    s = sub.add_parser("sample", help="draw code grids from the prior and decode them to a PNG")
    s.add_argument("--prior", default="pixelcnn", help="pixelcnn or transformer (OUT/prior-<kind>.pt) or a "
                   "prior checkpoint path (default %(default)s)")
    s.add_argument("--unconditional", action="store_true", help="the -uncond prior of that kind")
    s.add_argument("--prompt", default=None, help='a class name or some of its words ("sneaker", "boot"), or '
                   '"all": one row of --columns images per class (default: the classes in turn)')
    s.add_argument("--vqvae", default=None, help="VQ-VAE checkpoint (default: the one the prior was fit on)")
    s.add_argument("-n", "--num", type=_positive(int), default=64, help="images to draw (not with --prompt all)")
    s.add_argument("--columns", type=_positive(int), default=8)
    s.add_argument("--temperature", type=_positive(float), default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="draw among the k likeliest codes only (0: all)")
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


def _prior_summary(r: dict) -> str:
    kind = f"{r['prior']} ({'conditional' if r['conditional'] else 'unconditional'}, {r['parameters']:,} parameters)"
    line = (f"{kind}: held-out NLL {r['test_nll']:.4f} nats/code (train {r['train_nll']:.4f}), "
            f"{r['ms_per_step']:.1f} ms/step" if r["ms_per_step"] else
            f"{kind}: held-out NLL {r['test_nll']:.4f} nats/code (train {r['train_nll']:.4f})")
    if "prompt_accuracy" in r:
        per = ", ".join(f"{k} {v:.2f} ({r['ceiling_per_class'][k]:.2f})"
                        for k, v in r["prompt_accuracy_per_class"].items())
        line += (f"\nprompt accuracy {r['prompt_accuracy']:.3f} (ceiling {r['ceiling']:.3f}: the classifier on "
                 f"reconstructed test images; {r['prompt_accuracy_vs_ceiling']:.1%} of it); per class (ceiling): {per}")
    return line


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
                print("largest |difference| per step: "
                      + ", ".join(f"{k} {v:.3g}" for k, v in r["max_abs_diff"].items()))
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
            cfg = PriorConfig(vqvae=args.vqvae or str(Path(args.out) / "checkpoint.pt"), prior=args.prior,
                              conditional=False if args.unconditional else None, steps=args.steps,
                              batch_size=args.batch_size, lr=args.lr, channels=args.channels, layers=args.layers,
                              heads=args.heads, checkpoint_every=args.checkpoint_every,
                              eval_samples=args.eval_samples, classifier_steps=args.classifier_steps,
                              device=args.device, seed=args.seed, out=args.out)
            r = train_prior(cfg, resume=args.resume, progress=progress)
            print(_prior_summary(r))
            print(json.dumps(r))
        else:
            from .stage2 import resolve_prior, sample_images
            png = sample_images(resolve_prior(args.out, args.prior, args.unconditional),
                                args.png or Path(args.out) / "samples.png", n=args.num, columns=args.columns,
                                temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                device=args.device, vqvae=args.vqvae, prompt=args.prompt)
            print(f"samples: {png}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
