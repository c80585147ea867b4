"""Stage 2: fit a prior (gated PixelCNN or transformer) over the training set's code grids, then sample images.

A prior is conditional on the class name, as a text prompt, when the VQ-VAE's
data carries labels (Fashion-MNIST does), unconditional otherwise or when asked.
Files under OUT, for a prior named NAME = prior-<kind>[-uncond]:

- NAME.pt: the checkpoint (model, optimizer, step), saved every checkpoint_every steps;
- NAME.jsonl: the training loss at every step;
- prior_metrics.jsonl: one record appended per finished run: held-out NLL in
  nats per code and, for a conditional prior, prompt accuracy beside its ceiling;
- NAME-prompts.png: the first samples drawn for the prompt accuracy, one row per class;
- codes.pt (the encoded data set) and classifier.pt (the judge of prompt accuracy), shared by priors.

Reproducibility: the batch and the words shown for each class at a step come
from a generator seeded with (seed, step), and the models have no dropout, so
``resume`` on CPU repeats the uninterrupted run exactly.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import outputs
from .classifier import load_or_train, predict, reconstruction_accuracy
from .data import load_data
from .prior import GatedPixelCNN, TransformerPrior
from .stage1 import VQVAEConfig, load_vqvae, pick_device, to_input
from .text import Vocabulary

PRIORS = ("pixelcnn", "transformer")
# channels / layers per kind: about 1.1 M parameters each over K = 512 codes.
DEFAULT_SIZE = {"pixelcnn": (64, 8), "transformer": (128, 5)}


@dataclass
class PriorConfig:
    vqvae: str = "runs/vqvae/checkpoint.pt"
    prior: str = "pixelcnn"
    conditional: bool | None = None   # None: when the data has labels
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    channels: int | None = None      # pixelcnn: channels; transformer: d_model (None: DEFAULT_SIZE)
    layers: int | None = None
    heads: int = 4                   # transformer only
    checkpoint_every: int = 500
    eval_samples: int = 200          # per class, for prompt accuracy (0: skip it)
    classifier_steps: int = 1500
    device: str = "auto"
    seed: int = 0
    out: str = "runs/vqvae"


def prior_name(kind: str, conditional: bool) -> str:
    return f"prior-{kind}" + ("" if conditional else "-uncond")


def build_prior(kind: str, num_codes: int, grid: tuple[int, int], channels: int | None, layers: int | None,
                heads: int = 4, vocab: Vocabulary | None = None):
    """A fresh prior of the given kind; vocab None makes it unconditional."""
    if kind not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {kind!r}")
    c, n = channels or DEFAULT_SIZE[kind][0], layers or DEFAULT_SIZE[kind][1]
    words = len(vocab) if vocab is not None else 0
    if kind == "pixelcnn":
        return GatedPixelCNN(num_codes, c, n, vocab_size=words)
    return TransformerPrior(num_codes, grid[0] * grid[1], c, n, heads, vocab_size=words,
                            prompt_len=vocab.max_len if vocab is not None else 0)


def labeled_splits(vcfg: VQVAEConfig):
    """The VQ-VAE's train and test images, cut as stage 1 cut them, with their labels and class names."""
    s = load_data(vcfg.data, seed=vcfg.seed)
    n_train = vcfg.train_images if vcfg.train_images > 0 else len(s.train)
    n_test = vcfg.eval_images if vcfg.eval_images > 0 else len(s.test)

    def cut(a, n):
        return None if a is None else a[:n]

    return (s.train[:n_train], s.test[:n_test], cut(s.train_labels, n_train), cut(s.test_labels, n_test), s.classes)


@torch.no_grad()
def encode_all(model, images: np.ndarray, device, batch_size: int = 500) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> code grids (N, H/4, W/4) int64 on CPU."""
    model.eval()
    return torch.cat([model.encode(to_input(images[i:i + batch_size], device)).cpu()
                      for i in range(0, len(images), batch_size)])


def _encoded(out: Path, vqvae_path: str, vqvae, vckpt: dict, train, test, device):
    """Code grids of the training and test sets, cached in OUT/codes.pt for this VQ-VAE checkpoint.

    Encoding the 70,000 Fashion-MNIST images took about a minute on one thread; every prior reuses it.
    """
    key = {"vqvae": vqvae_path, "step": vckpt.get("step"), "config": vckpt["config"]}
    path = out / "codes.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=False)
        if cached["key"] == key:
            return cached["train"], cached["test"]
    train_grids, test_grids = encode_all(vqvae, train, device), encode_all(vqvae, test, device)
    tmp = path.with_name(f"codes.{id(key)}.tmp")
    torch.save({"key": key, "train": train_grids, "test": test_grids}, tmp)
    tmp.replace(path)
    return train_grids, test_grids


def learning_rate(cfg: PriorConfig, step: int) -> float:
    """Linear warm-up over the first 100 steps, then constant.

    Nothing depends on cfg.steps, so ``resume`` with a larger --steps extends a run
    exactly as if it had been asked for the longer run at the start.
    """
    return cfg.lr * min(1.0, (step + 1) / 100)


@torch.no_grad()
def heldout_nll(prior, grids: torch.Tensor, tokens: torch.Tensor | None, device, batch_size: int = 500) -> float:
    """Mean negative log-likelihood in nats per code of grids (N, H, W) under the prior (tokens (N, L) or None)."""
    prior.eval()
    total = 0.0
    for i in range(0, len(grids), batch_size):
        g = grids[i:i + batch_size].to(device)
        t = None if tokens is None else tokens[i:i + batch_size].to(device)
        total += F.cross_entropy(prior(g, t), g, reduction="sum").item()
    prior.train()
    return total / grids.numel()


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_prior(cfg: PriorConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Encode the VQ-VAE's training and test sets, fit the prior, evaluate it; files as in the module docstring.

    resume: continue OUT/NAME.pt up to cfg.steps (the model and data come from the
    checkpoint), or only evaluate it again when it already has cfg.steps.
    Returns the summary record also appended to prior_metrics.jsonl.
    """
    from tqdm import tqdm

    if cfg.prior not in PRIORS:
        raise ValueError(f"--prior must be one of {PRIORS}, got {cfg.prior!r}")
    if cfg.eval_samples < 0:
        raise ValueError(f"--eval-samples must be >= 0 (0: no prompt accuracy), got {cfg.eval_samples}")
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    cfg.vqvae = str(Path(cfg.vqvae).resolve())  # sample() may run from another folder
    vqvae, vckpt = load_vqvae(cfg.vqvae, device)
    vcfg = VQVAEConfig(**vckpt["config"])
    train, test, train_labels, test_labels, classes = labeled_splits(vcfg)
    if cfg.conditional and train_labels is None:
        raise ValueError(f"a conditional prior needs labels, and {vcfg.data or 'the data'} has none (IDX label "
                         "files train-labels-idx1-ubyte and t10k-labels-idx1-ubyte, or one sub-folder per class)")
    conditional = train_labels is not None if cfg.conditional is None else cfg.conditional
    name = prior_name(cfg.prior, conditional)
    ckpt_path, log_path = out / f"{name}.pt", out / f"{name}.jsonl"
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no prior checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        keep = {"steps", "out", "device", "checkpoint_every", "eval_samples", "classifier_steps"}
        cfg = PriorConfig(**{**ckpt["config"], **{k: getattr(cfg, k) for k in keep}})
    cfg.conditional = conditional
    out.mkdir(parents=True, exist_ok=True)
    train_grids, test_grids = _encoded(out, cfg.vqvae, vqvae, vckpt, train, test, device)
    grid = tuple(train_grids.shape[1:])
    vocab = Vocabulary(classes) if conditional else None
    torch.manual_seed(cfg.seed)
    prior = build_prior(cfg.prior, vcfg.num_embeddings, grid, cfg.channels, cfg.layers, cfg.heads, vocab).to(device)
    optimizer = torch.optim.Adam(prior.parameters(), lr=cfg.lr)
    start = 0
    if ckpt is not None:
        prior.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        kept = [r for r in outputs.read_jsonl(log_path) if r["step"] <= start] if log_path.exists() else []
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    elif log_path.exists():
        log_path.unlink()
    labels = torch.from_numpy(train_labels) if conditional else None

    def state(step):
        return {"config": asdict(cfg), "model": prior.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "grid": grid, "num_codes": vcfg.num_embeddings, "kind": cfg.prior,
                "classes": vocab.classes if vocab else None}

    times = []
    bar = tqdm(total=cfg.steps, initial=start, desc=name, disable=not progress, dynamic_ncols=True)
    prior.train()
    with open(log_path, "a") as log:
        for step in range(start, cfg.steps):
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            rows = torch.randint(len(train_grids), (cfg.batch_size,), generator=gen)
            grids = train_grids[rows].to(device)
            tokens = vocab.training_tokens(labels[rows], gen).to(device) if vocab else None
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            t0 = time.perf_counter()
            loss = F.cross_entropy(prior(grids, tokens), grids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
            optimizer.step()
            times.append(time.perf_counter() - t0)
            log.write(json.dumps({"step": step + 1, "nll": loss.item(), "lr": learning_rate(cfg, step),
                                  "step_s": times[-1]}) + "\n")
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(nll=f"{loss.item():.3f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                log.flush()
                _save(ckpt_path, state(step + 1))
    bar.close()
    if start >= cfg.steps:
        _save(ckpt_path, state(start))
    records = outputs.read_jsonl(log_path)
    test_tokens = vocab.class_tokens()[torch.from_numpy(test_labels)] if vocab else None
    train_tokens = vocab.class_tokens()[labels[:2000]] if vocab else None
    result = {"prior": cfg.prior, "conditional": conditional, "name": name, "step": max(start, cfg.steps),
              "parameters": sum(p.numel() for p in prior.parameters()),
              "channels": cfg.channels or DEFAULT_SIZE[cfg.prior][0],
              "layers": cfg.layers or DEFAULT_SIZE[cfg.prior][1],
              "batch_size": cfg.batch_size, "lr": cfg.lr, "grid": list(grid), "num_codes": vcfg.num_embeddings,
              "first_nll": records[0]["nll"] if records else None,
              "train_nll": heldout_nll(prior, train_grids[:2000], train_tokens, device),
              "test_nll": heldout_nll(prior, test_grids, test_tokens, device),
              "ms_per_step": 1e3 * statistics.median(r["step_s"] for r in records) if records else None,
              "train_s": sum(r["step_s"] for r in records), "device": str(device)}
    if conditional and cfg.eval_samples > 0:
        result.update(prompt_accuracy(prior, vqvae, vocab, grid, train, train_labels, test, test_labels, cfg,
                                      out, device, png=out / f"{name}-prompts.png"))
    with open(out / "prior_metrics.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    ckpt_state = state(result["step"])
    _save(ckpt_path, {**ckpt_state, "result": result})
    result["prior_checkpoint"] = str(ckpt_path)
    return result


def prompt_accuracy(prior, vqvae, vocab: Vocabulary, grid, train, train_labels, test, test_labels,
                    cfg: PriorConfig, out: Path, device, *, png: Path | None = None, columns: int = 10,
                    batch_size: int = 1000) -> dict:
    """Draw cfg.eval_samples images per class name (temperature 1, no top-k), classify them.

    Returns prompt_accuracy (mean over classes), prompt_accuracy_per_class, the
    ceiling (classifier accuracy on reconstructions of the real test images: all of
    them, and per class) and the classifier's accuracy on the real test images.
    """
    classifier, info = load_or_train(out / "classifier.pt", train, train_labels, test, test_labels, vocab.classes,
                                     device, steps=cfg.classifier_steps, seed=cfg.seed)
    ceiling, ceiling_per_class = reconstruction_accuracy(classifier, vqvae, test, test_labels, len(vocab.classes),
                                                         device)
    n = cfg.eval_samples
    targets = torch.arange(len(vocab.classes)).repeat_interleave(n)
    tokens = vocab.class_tokens()[targets]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    prior.eval()
    t0 = time.perf_counter()
    grids = torch.cat([prior.sample(len(t), *grid, tokens=t.to(device), generator=gen)
                       for t in tokens.split(batch_size)])
    sample_s = time.perf_counter() - t0
    images = torch.cat([vqvae.decode_indices(g).clamp(-0.5, 0.5) for g in grids.split(batch_size)])
    hits = (predict(classifier, images) == targets).double().view(len(vocab.classes), n).mean(1)
    if png is not None:
        first = images.view(len(vocab.classes), n, *images.shape[1:])[:, :min(columns, n)]
        outputs.save_grid(outputs.to_uint8(first.reshape(-1, *images.shape[1:])), png, columns=min(columns, n))
    overall = float(hits.mean())
    return {"prompt_accuracy": overall, "prompt_accuracy_per_class": dict(zip(vocab.classes, hits.tolist())),
            "ceiling": ceiling, "ceiling_per_class": dict(zip(vocab.classes, ceiling_per_class)),
            "prompt_accuracy_vs_ceiling": overall / ceiling if ceiling else None,
            "classifier_test_accuracy": info["test_accuracy"], "eval_samples_per_class": n,
            "eval_sample_s": sample_s}


def resolve_prior(out: str | Path, prior: str, unconditional: bool = False) -> Path:
    """--prior as a kind (pixelcnn, transformer: OUT/prior-<kind>[-uncond].pt) or a checkpoint path."""
    if prior not in PRIORS:
        return Path(prior)
    out = Path(out)
    cond, uncond = out / f"{prior_name(prior, True)}.pt", out / f"{prior_name(prior, False)}.pt"
    if unconditional or (not cond.is_file() and uncond.is_file()):
        return uncond
    return cond


def load_prior(path: str | Path, device: torch.device):
    """A trained prior (eval mode) from its checkpoint: (model, checkpoint dict, Vocabulary or None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prior checkpoint at {path} (train one with `python -m vqkern.train prior`)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    pcfg = PriorConfig(**ckpt["config"])
    vocab = Vocabulary(ckpt["classes"]) if ckpt.get("classes") else None
    prior = build_prior(ckpt["kind"], ckpt["num_codes"], ckpt["grid"], pcfg.channels, pcfg.layers, pcfg.heads, vocab)
    prior.load_state_dict(ckpt["model"])
    return prior.to(device).eval(), ckpt, vocab


def sample_images(prior_path: str | Path, out_png: str | Path, *, n: int = 64, columns: int = 8,
                  temperature: float = 1.0, top_k: int = 0, seed: int = 0, device: str = "auto",
                  vqvae: str | Path | None = None, prompt: str | None = None) -> Path:
    """Draw code grids from a trained prior, decode them with its VQ-VAE, write one PNG grid.

    prompt: None (an unconditional prior, or every class in turn for a conditional
    one), a text of known words (n images of it), or "all" (one row of ``columns``
    images per class; n is then ignored). temperature divides the logits; top_k
    keeps only the k likeliest codes at each draw (0: all). The same seed draws
    the same picture. vqvae: the VQ-VAE checkpoint, when not where the prior was trained from.
    """
    if n < 1 or columns < 1:
        raise ValueError(f"n and columns must be positive, got n={n}, columns={columns}")
    if not temperature > 0 or top_k < 0:
        raise ValueError(f"temperature must be positive and top_k >= 0, got {temperature}, {top_k}")
    dev = pick_device(device)
    prior, ckpt, vocab = load_prior(prior_path, dev)
    if vocab is None and prompt is not None:
        raise ValueError(f"--prompt {prompt!r}: {prior_path} is an unconditional prior (its data had no labels, "
                         "or it was trained with --unconditional)")
    tokens = None
    if vocab is not None:
        if prompt is None:
            tokens = vocab.class_tokens()[torch.arange(n) % len(vocab.classes)]
        elif prompt.strip().lower() == "all":
            tokens = vocab.class_tokens().repeat_interleave(columns, 0)
        else:
            tokens = vocab.encode([prompt]).expand(n, -1)
        tokens = tokens.to(dev)
        n = len(tokens)
    vqvae_model, _ = load_vqvae(vqvae or PriorConfig(**ckpt["config"]).vqvae, dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    grids = prior.sample(n, *ckpt["grid"], tokens=tokens, temperature=temperature, top_k=top_k, generator=gen)
    images = outputs.to_uint8(vqvae_model.decode_indices(grids))
    return outputs.save_grid(images, out_png, columns=columns)
