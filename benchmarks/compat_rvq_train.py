"""Training comparison: a small residual-VQ autoencoder on Fashion-MNIST with
``vector_quantize_pytorch.ResidualVQ`` and with ``vqkern.ResidualVQ`` (quantize dropout
and stochastic code sampling on), from the same initial weights, on the same batches.

Each quantizer trains in its own process (so each one's peak resident memory is its
own); the parent writes the curves (PNG), every step (JSON) and a summary with
provenance (Markdown).

    python -m benchmarks.compat_rvq_train --steps 300 --out benchmarks/results/cpu/train
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RVQ = dict(dim=64, num_quantizers=4, codebook_size=256, quantize_dropout=True, quantize_dropout_cutoff_index=1,
           stochastic_sample_codes=True, sample_codebook_temp=0.1, threshold_ema_dead_code=2, decay=0.9)


def build(kind: str):
    import torch
    from torch import nn

    if kind == "vqpt":
        from vector_quantize_pytorch import ResidualVQ
    else:
        from vqkern import ResidualVQ
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                            nn.Conv2d(64, 64, 3, 1, 1))
    decoder = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
                            nn.ConvTranspose2d(32, 1, 4, 2, 1))
    rvq = ResidualVQ(**RVQ)
    return encoder, rvq, decoder


def worker(kind: str, steps: int, batch: int, out: str) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from vqkern.train.data import load_data

    torch.set_num_threads(1)
    splits = load_data(None, seed=0)
    train = torch.from_numpy(splits.train.astype(np.float32) / 255.0 - 0.5)
    test = torch.from_numpy(splits.test[:2000].astype(np.float32) / 255.0 - 0.5)
    encoder, rvq, decoder = build(kind)
    # One set of initial weights for both: the upstream model's, loaded into either.
    state = torch.load(out + ".init.pt")
    for module, key in ((encoder, "encoder"), (rvq, "rvq"), (decoder, "decoder")):
        module.load_state_dict(state[key])
    params = [*encoder.parameters(), *rvq.parameters(), *decoder.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    records = []
    for step in range(steps):
        idx = order[(step * batch) % len(train):][:batch]
        x = train[idx]
        torch.manual_seed(1000 + step)  # the same dropout depth and draws in both runs
        start = time.perf_counter()
        z = encoder(x)
        b, d, h, w = z.shape
        q, indices, losses = rvq(z.flatten(2).transpose(1, 2))
        recon = decoder(q.transpose(1, 2).reshape(b, d, h, w))
        mse = F.mse_loss(recon, x)
        loss = mse + losses.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        elapsed = time.perf_counter() - start
        layers = int((indices[0, 0] >= 0).sum())
        records.append(dict(step=step, loss=float(loss), recon=float(mse), layers=layers, ms=1e3 * elapsed))
    encoder.eval(), rvq.eval(), decoder.eval()
    with torch.no_grad():
        z = encoder(test)
        b, d, h, w = z.shape
        q, indices, _ = rvq(z.flatten(2).transpose(1, 2))
        test_mse = float(F.mse_loss(decoder(q.transpose(1, 2).reshape(b, d, h, w)), test))
        used = [int(torch.unique(indices[..., i]).numel()) for i in range(indices.shape[-1])]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(dict(records=records, test_mse=test_mse, codes_used=used, peak_rss_mib=peak_mib)))


def provenance(command: str) -> dict:
    from importlib.metadata import version

    import torch
    import vector_quantize_pytorch  # noqa: F401

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    return dict(cpu=model, threads=1, machine=platform.machine(), torch=torch.__version__,
                vector_quantize_pytorch=version("vector-quantize-pytorch"), commit=commit + ("+dirty" if dirty else ""),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), command=command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/cpu/train")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.batch_size, args.result)
        return
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.date.today().isoformat()}-compat-rvq-fashion-mnist"
    encoder, rvq, decoder = build("vqpt")
    init = str(stem) + ".tmp"
    torch.save(dict(encoder=encoder.state_dict(), rvq=rvq.state_dict(), decoder=decoder.state_dict()),
               init + ".init.pt")
    results = {}
    for kind in ("vqpt", "vqkern"):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "benchmarks.compat_rvq_train", "--worker", kind, "--steps",
                        str(args.steps), "--batch-size", str(args.batch_size), "--result", init], check=True, env=env)
        results[kind] = json.loads(Path(init).read_text())
    os.remove(init), os.remove(init + ".init.pt")
    command = "python -m benchmarks.compat_rvq_train " + " ".join(sys.argv[1:])
    summary = dict(provenance=provenance(command), config=dict(RVQ, steps=args.steps, batch_size=args.batch_size))
    for kind, r in results.items():
        ms = [rec["ms"] for rec in r["records"][min(5, len(r["records"]) - 1):]]  # after warm-up
        summary[kind] = dict(ms_per_step_median=statistics.median(ms), peak_rss_mib=r["peak_rss_mib"],
                             test_mse=r["test_mse"], codes_used=r["codes_used"],
                             final_loss_mean_last_20=statistics.mean(x["loss"] for x in r["records"][-20:]))
    summary["same_dropout_depths"] = all(a["layers"] == b["layers"] for a, b in
                                         zip(results["vqpt"]["records"], results["vqkern"]["records"]))
    steps = {k: v["records"] for k, v in results.items()}
    Path(str(stem) + ".json").write_text(json.dumps(dict(summary=summary, steps=steps), indent=1) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind, label in (("vqpt", "vector_quantize_pytorch.ResidualVQ"), ("vqkern", "vqkern.ResidualVQ")):
        recs = results[kind]["records"]
        axes[0].plot([r["step"] for r in recs], [r["loss"] for r in recs], label=label, alpha=0.8)
        axes[1].plot([r["step"] for r in recs], [r["recon"] for r in recs], label=label, alpha=0.8)
    axes[0].set_title("training loss (reconstruction + commitment)")
    axes[1].set_title("reconstruction MSE")
    for ax in axes:
        ax.set_xlabel("step"), ax.set_yscale("log"), ax.legend()
    p = summary["provenance"]
    fig.suptitle(f"Fashion-MNIST, residual VQ (4 x 256, quantize dropout, stochastic codes); {p['cpu']}, "
                 f"1 thread, commit {p['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(stem) + ".png", dpi=110)

    lines = [f"# Residual-VQ training comparison on Fashion-MNIST ({p['date']})", "",
             f"Command: `{command}`", "",
             f"Machine: {p['cpu']}, {p['threads']} thread; torch {p['torch']}, vector-quantize-pytorch "
             f"{p['vector_quantize_pytorch']}; commit {p['commit']}.", "",
             "Model: conv encoder (28 x 28 -> 7 x 7 x 64), "
             f"`ResidualVQ({', '.join(f'{k}={v}' for k, v in RVQ.items())})`, "
             f"conv decoder; Adam 1e-3, {args.steps} steps of {args.batch_size} images, the same initial weights "
             "and batches, `torch.manual_seed(1000 + step)` before each step (the same quantize-dropout depth in "
             f"both runs: {summary['same_dropout_depths']}). The stochastic codes are drawn differently "
             "(upstream: Gumbel noise on the full N x K matrix; vqkern: tile by tile), so the curves agree in "
             "distribution, not step by step. Each run in its own process; peak memory is that process's peak "
             "resident set.", "",
             "| quantizer | median ms/step | peak RSS MiB | held-out MSE (2000 images) | codes used per layer "
             "| loss, mean of last 20 steps |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    for kind in ("vqpt", "vqkern"):
        s = summary[kind]
        lines.append(f"| {kind} | {s['ms_per_step_median']:.1f} | {s['peak_rss_mib']:.0f} | {s['test_mse']:.5f} | "
                     f"{s['codes_used']} | {s['final_loss_mean_last_20']:.4f} |")
    lines += ["", f"![curves]({stem.name}.png)", ""]
    Path(str(stem) + ".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
