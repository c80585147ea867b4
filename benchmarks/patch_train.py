"""Training comparison on a real image model: diffusers' ``VQModel`` trained on Fashion-MNIST
as it is and patched by ``vqkern.patch``, from the same initial weights, on the same batches.

Each run trains in its own process (so each one's peak resident memory is its own), both at
once with one thread each (so the machine's load hits both alike); the parent writes the
curves (PNG), every step (JSON) and a summary with provenance (Markdown), and counts, step by
step, the rows whose code differs between the runs.

    python -m benchmarks.patch_train --steps 200 --batch-size 32 --out benchmarks/results/cpu/train
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# A VQModel for 28 x 28 images: two encoder blocks (one downsampling, so 14 x 14 latents), the
# diffusers default mid-block attention, and a 4096-code book of 8-dimensional codes.
MODEL = dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
             latent_channels=8, num_vq_embeddings=4096, vq_embed_dim=8, norm_num_groups=8, sample_size=28)


def build():
    import torch
    from diffusers import VQModel

    torch.manual_seed(0)
    return VQModel(**MODEL)


def worker(kind: str, steps: int, batch: int, threads: int, out: str) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import vqkern
    from vqkern.train.data import load_data

    torch.set_num_threads(threads)
    splits = load_data(None, seed=0)
    train = torch.from_numpy(splits.train.astype(np.float32) / 127.5 - 1.0)
    test = torch.from_numpy(splits.test[:2000].astype(np.float32) / 127.5 - 1.0)
    model = build()
    model.load_state_dict(torch.load(out + ".init.pt"))
    if kind == "patched":
        assert vqkern.patch(model) == {"quantize": "VectorQuantizer"}
    codes, clock = [], {}
    # The quantizer's own forward time (its backward runs inside the step's backward).
    def started(module, args):
        clock["start"] = time.perf_counter()

    def finished(module, args, output):
        clock["ms"] = 1e3 * (time.perf_counter() - clock["start"])
        if module.training:
            codes.append(output[2][2].to(torch.int16))

    model.quantize.register_forward_pre_hook(started)
    model.quantize.register_forward_hook(finished)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    records = []
    for step in range(steps):
        x = train[order[(step * batch) % len(train):][:batch]]
        start = time.perf_counter()
        result = model(x)
        mse = F.mse_loss(result.sample, x)
        loss = mse + result.commit_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        elapsed = time.perf_counter() - start
        records.append(dict(step=step, loss=loss.item(), recon=mse.item(), commit=result.commit_loss.item(),
                            ms=1e3 * elapsed, quantizer_forward_ms=clock["ms"]))
    np.save(out + f".{kind}.codes.npy", torch.stack(codes).numpy())
    codes.clear()
    model.eval()
    with torch.no_grad():
        # In chunks: the original's distance matrix for all 2000 images would be 6 GiB.
        latents = torch.cat([model.encode(chunk).latents for chunk in test.split(250)])
        indices = torch.cat([model.quantize(chunk)[2][2] for chunk in latents.split(250)])
        test_mse = float(F.mse_loss(torch.cat([model.decode(chunk).sample for chunk in latents.split(250)]), test))
        counts = torch.bincount(indices.reshape(-1), minlength=MODEL["num_vq_embeddings"]).double()
        p = counts / counts.sum()
        perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out + f".{kind}.json").write_text(json.dumps(dict(records=records, test_mse=test_mse, perplexity=perplexity,
                                                           codes_used=int((counts > 0).sum()), peak_rss_mib=peak_mib)))


def _first_step_codes(batch: int, codes: dict) -> dict:
    """Step 0 runs both models from the same weights on the same batch: of the rows where their
    codes differ, how many each run coded with the exact (fp64) nearest code."""
    import numpy as np
    import torch

    from vqkern.train.data import load_data

    splits = load_data(None, seed=0)
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))
    x = torch.from_numpy(splits.train[order[:batch].numpy()].astype(np.float32) / 127.5 - 1.0)
    model = build()
    with torch.no_grad():
        rows = model.encode(x).latents.permute(0, 2, 3, 1).reshape(-1, MODEL["vq_embed_dim"]).double()
        codebook = model.quantize.embedding.weight.double()
        exact = torch.cat([torch.cdist(chunk, codebook).argmin(1) for chunk in rows.split(1024)]).numpy()
    original, patched = codes["original"][0].reshape(-1), codes["patched"][0].reshape(-1)
    other = original != patched
    return dict(rows=int(other.size), rows_with_other_codes=int(other.sum()),
                original_exact=int((original[other] == exact[other]).sum()),
                patched_exact=int((patched[other] == exact[other]).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="per run (the two runs train at once)")
    parser.add_argument("--out", default="benchmarks/results/cpu/train")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.batch_size, args.threads, args.result)
        return
    import numpy as np
    import torch

    from . import measure
    from .patch import library_versions

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.date.today().isoformat()}-patch-vqmodel-fashion-mnist"
    tmp = str(stem) + ".tmp"
    torch.save(build().state_dict(), tmp + ".init.pt")
    # Both runs at once, one thread each: whatever else loads the machine loads both alike.
    runs = {kind: subprocess.Popen([sys.executable, "-m", "benchmarks.patch_train", "--worker", kind, "--steps",
                                    str(args.steps), "--batch-size", str(args.batch_size), "--threads",
                                    str(args.threads), "--result", tmp])
            for kind in ("original", "patched")}
    results, codes = {}, {}
    for kind, run in runs.items():
        if run.wait() != 0:
            raise SystemExit(f"the {kind} run failed (exit {run.returncode})")
        results[kind] = json.loads(Path(tmp + f".{kind}.json").read_text())
        codes[kind] = np.load(tmp + f".{kind}.codes.npy")
        os.remove(tmp + f".{kind}.json"), os.remove(tmp + f".{kind}.codes.npy")
    os.remove(tmp + ".init.pt")
    differing = (codes["original"] != codes["patched"]).reshape(args.steps, -1).sum(axis=1).tolist()
    step0 = _first_step_codes(args.batch_size, codes)
    prov = measure.provenance(torch.device("cpu"))
    prov.update(command="python -m benchmarks.patch_train " + " ".join(sys.argv[1:]), threads=args.threads,
                device=f"{measure.cpu_name()} ({args.threads} thread per run)", libraries=library_versions())
    summary = dict(provenance=prov, model=MODEL, steps=args.steps, batch_size=args.batch_size, step0=step0,
                   rows_per_step=int(codes["original"].shape[1]),
                   first_step_with_other_codes=next((i for i, d in enumerate(differing) if d), None))
    for kind, r in results.items():
        after = r["records"][5:] or r["records"]   # after warm-up
        summary[kind] = dict(ms_per_step_median=statistics.median(x["ms"] for x in after),
                             quantizer_forward_ms_median=statistics.median(x["quantizer_forward_ms"] for x in after),
                             peak_rss_mib=r["peak_rss_mib"],
                             test_mse=r["test_mse"], perplexity=r["perplexity"], codes_used=r["codes_used"],
                             loss_mean_last_20=statistics.mean(x["loss"] for x in r["records"][-20:]))
    stem.with_suffix(".json").write_text(json.dumps(dict(summary=summary, rows_with_other_codes=differing,
                                                         steps={k: v["records"] for k, v in results.items()}),
                                                    indent=1) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for kind, label in (("original", "diffusers VectorQuantizer"), ("patched", "patched by vqkern")):
        recs = results[kind]["records"]
        steps = [r["step"] for r in recs]
        axes[0].plot(steps, [r["recon"] for r in recs], label=label, alpha=0.8)
        axes[1].plot(steps, [r["commit"] for r in recs], label=label, alpha=0.8)
        axes[2].plot(steps, [r["ms"] for r in recs], label=label, alpha=0.8)
    axes[0].set_title("reconstruction MSE"), axes[1].set_title("commitment loss (VQModel's commit_loss)")
    axes[2].set_title("ms per training step")
    for ax in axes:
        ax.set_xlabel("step"), ax.legend()
    axes[0].set_yscale("log"), axes[1].set_yscale("log")
    fig.suptitle(f"Fashion-MNIST, diffusers VQModel (K = {MODEL['num_vq_embeddings']}, D = {MODEL['vq_embed_dim']}); "
                 f"{prov['device']}; commit {prov['git_commit'][:12]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)

    first = summary["first_step_with_other_codes"]
    lines = [f"# diffusers VQModel on Fashion-MNIST, original and patched by vqkern ({prov['date']})", "",
             f"Command: `{prov['command']}`", "",
             f"Machine: {prov['device']}, load average when both runs had ended {prov['load_average']}; "
             f"torch {prov['torch']}, "
             f"{', '.join(f'{k} {v}' for k, v in prov['libraries'].items())}; commit {prov['git_commit']}.", "",
             f"Model: `VQModel({', '.join(f'{k}={v}' for k, v in MODEL.items())})` (14 x 14 latents, "
             f"{summary['rows_per_step']} rows per step); loss = MSE(reconstruction, image) + `commit_loss`; Adam "
             f"1e-3, {args.steps} steps of {args.batch_size} images in [-1, 1], the same initial weights and batches. "
             f"Each run in its own process with {args.threads} thread, both at once (when the faster one ends "
             "the other has the machine to itself: its later steps are favoured); peak memory is that process's "
             "peak resident set; held-out figures on 2000 test images.", "",
             "Codes: " + (f"every one of the {args.steps} steps chose the same code for every row in both runs."
                          if first is None else
                          f"the runs' codes first differ at step {first}; in all "
                          f"{sum(differing)} of {args.steps * summary['rows_per_step']} row codes differ (after the "
                          "first difference the weights drift apart). At step 0 (the same weights and batch) "
                          f"{step0['rows_with_other_codes']} of {step0['rows']} rows got other codes; of those, the "
                          f"fp64 nearest code is the patched run's in {step0['patched_exact']} and the original's in "
                          f"{step0['original_exact']}: diffusers initializes every code within 1/K of the origin, "
                          "where codes differ in distance by less than the original's fp32 cdist resolves."), "",
             "| quantizer | median ms/step | of which quantizer forward | peak RSS MiB | held-out MSE | "
             "held-out perplexity | codes used | loss, mean of last 20 steps |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind in ("original", "patched"):
        s = summary[kind]
        lines.append(f"| {kind} | {s['ms_per_step_median']:.1f} | {s['quantizer_forward_ms_median']:.1f} | "
                     f"{s['peak_rss_mib']:.0f} | {s['test_mse']:.5f} | "
                     f"{s['perplexity']:.1f} | {s['codes_used']} | {s['loss_mean_last_20']:.5f} |")
    lines += ["", f"![curves]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
