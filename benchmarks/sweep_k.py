"""Stage 1 of the VQ-VAE on Fashion-MNIST at growing codebook sizes K, vqkern against
vector-quantize-pytorch, same model, steps, batches and initial weights.

``python -m benchmarks.sweep_k`` runs every (library, K) in its own subprocess (one
thread, ``nice``-able, a memory and a time limit, so that a peer's out-of-memory or
timeout is recorded as such instead of taking the study down) and writes
``<out>/<tag>.json`` (every run with its provenance), ``<tag>.md`` (the table) and
``<tag>-quality.png`` / ``<tag>-cost.png`` (the plots).

The recipe for large codebooks, both libraries: the encoder's 64 channels are
projected to an 8-dimensional search space, l2-normalized (cosine metric), and
the codebook is SimVQ's reparameterization, a frozen random basis (K, 8) times a
learned 8 x 8 map. vqkern: ``VectorQuantizer(K, 64, simvq=True, codebook_dim=8,
metric="cosine")``. vector-quantize-pytorch: ``VectorQuantize(codebook_dim=8,
learnable_codebook=True, ema_update=False, rotation_trick=False,
vq_bridge=Linear(8, 8) then l2-normalization)`` (Euclidean search against unit codes:
the same code as the cosine search) with its codebook frozen to the same basis, and
the same initial projections, map, encoder and decoder.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LIBRARIES = ("vqkern", "vqpt")
CODEBOOK_DIM = 8


class L2Norm(nn.Module):
    """Rows (..., C) float divided by their l2 norm (same shape and dtype)."""

    def forward(self, x):
        return F.normalize(x, dim=-1)


class PeerQuantizer(nn.Module):
    """vector_quantize_pytorch.VectorQuantize at the configuration of vqkern's SimVQ layer,
    with VQVAE's quantizer interface: (B, D, H, W) -> (quantized like z, indices (B, H, W)
    int64, loss fp32 scalar, perplexity fp32 scalar)."""

    def __init__(self, twin, beta: float):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        k, d, c = twin.num_embeddings, twin.embedding_dim, twin.codebook_dim
        # vector-quantize-pytorch refuses a learnable codebook with use_cosine_sim
        # ("not compatible with learnable codebook yet", 1.32.0), so its Euclidean search
        # runs against unit-norm codes: argmin |z - e|^2 over |e| = 1 is argmax z.e, the
        # code of largest cosine, the same choice as vqkern's. What differs: its
        # commitment loss compares the unnormalized projected z with the unit code.
        bridge = nn.Sequential(nn.Linear(c, c, bias=False), L2Norm())
        self.vq = VectorQuantize(dim=d, codebook_size=k, codebook_dim=c, use_cosine_sim=False,
                                 learnable_codebook=True, ema_update=False, rotation_trick=False,
                                 vq_bridge=bridge, commitment_weight=beta, accept_image_fmap=True)
        with torch.no_grad():
            self.vq.project_in.load_state_dict(twin.project_in.state_dict())
            self.vq.project_out.load_state_dict(twin.project_out.state_dict())
            self.vq._codebook.embed.copy_(twin.basis.unsqueeze(0))
            bridge[0].weight.copy_(twin.codebook_map.weight)
        self.vq._codebook.embed.requires_grad_(False)  # SimVQ's frozen basis
        self.num_embeddings, self.embedding_dim = k, d

    def forward(self, z):
        from vqkern.modules import perplexity_from_counts

        quantized, indices, loss = self.vq(z)
        counts = torch.bincount(indices.reshape(-1), minlength=self.num_embeddings)
        return quantized, indices, loss, perplexity_from_counts(counts)


@torch.no_grad()
def kmeans_basis(model, train, cfg, batches: int, iters: int) -> None:
    """Basis := k-means centroids of the initial model's search-space rows (normalized
    projections of the encoder's output) over the first ``batches`` training batches;
    codebook map := identity. What ``init="kmeans"`` computes, done before training so
    that both libraries start from it."""
    from vqkern import kmeans
    from vqkern.train.stage1 import batch_indices, to_input

    q = model.quantizer
    rows = []
    for step in range(batches):
        x = to_input(train[batch_indices(step, len(train), cfg.batch_size, cfg.seed)], torch.device("cpu"))
        z = q.project_in(model.encoder(x).movedim(1, -1)).reshape(-1, q.codebook_dim)
        rows.append(F.normalize(z, dim=1))
    torch.manual_seed(cfg.seed)
    centroids, _ = kmeans(torch.cat(rows), q.num_embeddings, iters, metric="cosine")
    q.basis.copy_(centroids)
    q.codebook_map.weight.copy_(torch.eye(q.codebook_dim))


def build(library: str, cfg, train, kmeans_batches: int, kmeans_iters: int):
    """The VQVAE of ``cfg`` with vqkern's SimVQ quantizer, or the peer started from its weights."""
    from vqkern.train.model import VQVAE
    from vqkern.train.stage1 import build_model

    in_channels = train.shape[1]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, in_channels)
    if kmeans_batches > 0:
        kmeans_basis(model, train, cfg, kmeans_batches, kmeans_iters)
    if library == "vqkern":
        return model
    peer = PeerQuantizer(model.quantizer, cfg.beta)
    twin = VQVAE(peer, in_channels=in_channels, hidden=cfg.hidden, res_hidden=cfg.res_hidden,
                 num_res_blocks=cfg.res_blocks, embedding_dim=cfg.embedding_dim)
    twin.encoder.load_state_dict(model.encoder.state_dict())
    twin.decoder.load_state_dict(model.decoder.state_dict())
    return twin


_T0 = time.time()


def _stamp(what: str) -> None:
    print(f"[{time.time() - _T0:7.1f} s] {what}", file=sys.stderr, flush=True)


PROBE_STEPS = 20


def run_one(library: str, k: int, steps: int, eval_images: int, seed: int, kmeans_rows: int,
            kmeans_iters: int, budget_s: float = 0.0) -> dict:
    """Train, evaluate and measure one (library, K); returns its record.

    With ``budget_s`` > 0 the first PROBE_STEPS steps are timed first; when their median
    step times ``steps`` exceeds the budget, the run stops there with status "over time"
    and records only what those steps measured (time per step, and the quantizer's
    time and peak memory on one batch), not the training's outcome."""
    from benchmarks.measure import peak_extra_bytes
    from vqkern.train.stage1 import VQVAEConfig, batch_indices, evaluate, load_splits, to_input, train_steps

    torch.set_num_threads(1)
    device = torch.device("cpu")
    _stamp("imported")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = VQVAEConfig(steps=steps, num_embeddings=k, codebook="simvq", codebook_dim=CODEBOOK_DIM,
                          metric="cosine", eval_images=eval_images, seed=seed, out=tmp, device="cpu")
    train, test, source = load_splits(cfg)
    _stamp("data loaded")
    rows_per_image = (train.shape[2] // 4) * (train.shape[3] // 4)
    # enough batches for K rows, at most kmeans_rows rows
    per_batch = cfg.batch_size * rows_per_image
    kb = 0 if kmeans_rows <= 0 else min(-(-k // per_batch), max(1, kmeans_rows // per_batch))
    model = build(library, cfg, train, kb, kmeans_iters)
    _stamp(f"built, k-means basis from {kb} batches")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    records: list[dict] = []
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    probe = min(steps, PROBE_STEPS)
    times = train_steps(model, optimizer, train, cfg, device, 0, probe, records.append, progress=False)
    projected = statistics.median(times[1:] or times) * steps
    over = budget_s > 0 and projected > budget_s
    if not over:
        times += train_steps(model, optimizer, train, cfg, device, probe, steps, records.append, progress=False)
    train_s = time.perf_counter() - t0
    _stamp(f"trained {len(times)} steps" + (f", stopped: {steps} would take ~{projected:.0f} s" if over else ""))
    # Evaluation batches sized so that a peer's (rows, K) distance matrix stays near 256 MB.
    eval_batch = max(1, min(500, (64 << 20) // (rows_per_image * k)))
    metrics, eval_s = None, 0.0
    if not over:
        t1 = time.perf_counter()
        metrics, _, _ = evaluate(model, test, device, batch_size=eval_batch)
        eval_s = time.perf_counter() - t1
        _stamp("evaluated")

    # The quantizer alone, forward + backward in training mode on one batch of encoder
    # output, on a copy (its training step changes the state): peak extra memory once,
    # then the median time of 5.
    x = to_input(train[batch_indices(0, len(train), cfg.batch_size, cfg.seed)], device)
    with torch.no_grad():
        z = model.encoder(x)
    quantizer = copy.deepcopy(model.quantizer).train()

    def step():
        zz = z.clone().requires_grad_()
        out = quantizer(zz)
        (out[2] + out[0].square().mean()).backward()

    step()
    peak = peak_extra_bytes(step, device)
    qtimes = []
    for _ in range(5):
        s = time.perf_counter()
        step()
        qtimes.append(time.perf_counter() - s)
    record = {"library": library, "K": k, "steps": steps, "status": "ok", "data": source,
              "steps_run": len(times), "ms_per_step": 1e3 * statistics.median(times[1:] or times),
              "ms_per_step_min": 1e3 * min(times), "ms_per_step_max": 1e3 * max(times),
              "quantizer_ms": 1e3 * statistics.median(qtimes), "quantizer_peak_bytes": peak,
              "final_train_recon": records[-1]["recon"], "eval_images": len(test), "eval_batch": eval_batch,
              "train_s": train_s, "eval_s": eval_s, "kmeans_batches": kb, "kmeans_iters": kmeans_iters}
    if over:
        return {**record, "status": f"over time ({steps} steps ~{projected:.0f} s > budget {budget_s:.0f} s)",
                "projected_train_s": projected}
    return {**record, "codes_used": metrics["codes_used"], "codes_used_pct": 100.0 * metrics["codes_used"] / k,
            "test_perplexity": metrics["test_perplexity"], "test_recon": metrics["test_recon"]}


def _limit(mem_bytes: int, niceness: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
        os.nice(niceness)
    return apply


def launch(library: str, k: int, steps: int, eval_images: int, args, log_dir: Path) -> dict:
    """One run in a subprocess under the memory and time limits; OOM and timeout are results."""
    result = log_dir / f"{library}-{k}.json"
    cmd = [sys.executable, "-m", "benchmarks.sweep_k", "--one", library, str(k), str(steps),
           "--eval-images", str(eval_images), "--seed", str(args.seed), "--result", str(result),
           "--kmeans-rows", str(args.kmeans_rows), "--kmeans-iters", str(args.kmeans_iters),
           "--budget-s", str(args.budget_fraction * args.timeout_s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()
    with open(log_dir / f"{library}-{k}.log", "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.timeout_s,
                                  preexec_fn=_limit(int(args.mem_limit_gb * 2**30), args.nice))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    base = {"library": library, "K": k, "steps": steps, "eval_images": eval_images, "wall_s": time.time() - start}
    if rc == 0 and result.exists():
        return {**json.loads(result.read_text()), "wall_s": base["wall_s"]}
    text = (log_dir / f"{library}-{k}.log").read_text()[-4000:]
    if rc is None:
        status = f"timeout (> {args.timeout_s} s)"
    elif "MemoryError" in text or "DefaultCPUAllocator: can't allocate memory" in text or "std::bad_alloc" in text:
        status = f"OOM (> {args.mem_limit_gb:g} GiB address space)"
    else:
        status = f"error (exit {rc})"
    return {**base, "status": status, "log_tail": text[-800:]}


def write_report(records: list[dict], out: Path, tag: str, prov: dict, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps({"provenance": prov, "runs": records}, indent=1) + "\n")
    lines = ["| library | K | steps | ms/step | quantizer fwd+bwd ms | quantizer peak MiB | codes used | % of K "
             "| test perplexity | held-out MSE | test images |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(records, key=lambda r: (r["K"], r["library"])):
        if "ms_per_step" not in r:  # out of memory, out of time, or failed: nothing measured
            lines.append(f"| {r['library']} | {r['K']} | {r['steps']} | {r['status']} | | | | | | | |")
            continue
        peak = "n/a" if r["quantizer_peak_bytes"] is None else f"{r['quantizer_peak_bytes'] / 2**20:.0f}"
        cost = (f"| {r['library']} | {r['K']} | {r['steps']} | {r['ms_per_step']:.0f} | {r['quantizer_ms']:.0f} "
                f"| {peak} ")
        if r["status"] != "ok":  # stopped after its first steps: their cost, no outcome
            lines.append(cost + f"| {r['status']}, ms/step from its first {r['steps_run']} steps | | | | |")
            continue
        lines.append(cost + f"| {r['codes_used']} | {r['codes_used_pct']:.1f} | {r['test_perplexity']:.0f} "
                     f"| {r['test_recon']:.5f} | {r['eval_images']} |")
    keys = ("device", "threads_per_run", "jobs", "nice", "torch", "triton", "python", "git_commit", "started",
            "finished", "command", "load_average")
    head = ["# Stage 1 on Fashion-MNIST against codebook size K: vqkern and vector-quantize-pytorch", "",
            "Written by `python -m benchmarks.sweep_k` (the recipe and the peer's configuration: the module "
            "docstring of benchmarks/sweep_k.py). Every run: one thread, its own process.", ""]
    head += [f"- {k}: `{prov.get(k)}`" for k in keys if k in prov] + [""]
    (out / f"{tag}.md").write_text("\n".join(head + lines) + "\n")
    plot(records, out, tag)


def plot(records: list[dict], out: Path, tag: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    # With the runs stopped for time: their cost. Copies: the records stay as measured.
    measured = [{**r, "quantizer_peak_mib": (r["quantizer_peak_bytes"] or 0) / 2**20}
                for r in records if "ms_per_step" in r]
    measured_runs = {(r["library"], r["K"]) for r in measured}
    panels = [("quality", (("test_recon", "held-out reconstruction MSE"),
                           ("codes_used_pct", "codes used on the test set (% of K)"))),
              ("cost", (("ms_per_step", "training step (ms)"),
                        ("quantizer_peak_mib", "quantizer peak extra memory (MiB)")))]
    main_steps = max((r["steps"] for r in records), default=0)  # the study's length; shorter runs apart
    for name, keys in panels:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, (key, label) in zip(axes, keys):
            for lib, color in zip(LIBRARIES, ("C0", "C1")):
                name_ = "vqkern" if lib == "vqkern" else "vector-quantize-pytorch"
                runs = [r for r in (ok if name == "quality" else measured) if r["library"] == lib]
                if name == "cost":  # per step, whatever the run's length (20-step probes included)
                    pts = sorted((r["K"], r[key]) for r in runs)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", color=color, label=name_)
                    continue
                pts = sorted((r["K"], r[key]) for r in runs if r["steps"] == main_steps)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=color, label=f"{name_} ({main_steps} steps)")
                # Shorter runs (the largest K) apart, hollow: not comparable on quality.
                for steps in sorted({r["steps"] for r in runs} - {main_steps}):
                    short = sorted((r["K"], r[key]) for r in runs if r["steps"] == steps)
                    ax.plot(*zip(*short), marker="o", linestyle="none", markerfacecolor="none", color=color,
                            label=f"{name_} ({steps} steps)")
            for r in records:
                if r["status"] != "ok" and (name == "quality" or (r["library"], r["K"]) not in measured_runs):
                    ax.axvline(r["K"], color="grey", linestyle=":", linewidth=0.8)
                    ax.annotate(f"{r['library']}: {r['status'].split(' (')[0]}", (r["K"], 0.5),
                                xycoords=("data", "axes fraction"), rotation=90, fontsize=7, color="grey")
            ax.set_xscale("log", base=2)
            if key in ("ms_per_step", "quantizer_peak_mib"):
                ax.set_yscale("log")
            ax.set_xlabel("codebook size K")
            ax.set_title(label)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{tag}-{name}.png", dpi=110)
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep_k", description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", default="512,4096,16384,65536")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--short-ks", default="262144", help="codebook sizes run for --short-steps only")
    p.add_argument("--short-steps", type=int, default=30)
    p.add_argument("--libraries", default=",".join(LIBRARIES))
    p.add_argument("--eval-images", type=int, default=10000)
    p.add_argument("--short-eval-images", type=int, default=2000)
    p.add_argument("--kmeans-rows", type=int, default=262144,
                   help="at most this many rows (whole batches, never more than K needs) for the k-means basis; "
                        "0: a random basis. Below K rows, codes repeat rows and stay unused (the committed "
                        "2000-step study ran with 65536: 48,562 distinct codes at K = 65536)")
    p.add_argument("--kmeans-iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each one thread)")
    p.add_argument("--mem-limit-gb", type=float, default=10.0)
    p.add_argument("--timeout-s", type=int, default=1800)
    p.add_argument("--budget-fraction", type=float, default=0.8,
                   help=f"a run whose first {PROBE_STEPS} steps project its training past this fraction of "
                        "--timeout-s stops there and is recorded as over time, with its measured step time "
                        "(0: never stop early)")
    p.add_argument("--budget-s", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/cpu/train")
    p.add_argument("--tag", default=time.strftime("%Y-%m-%d") + "-sweep-k")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite <tag>.md and the plots from <out>/<tag>.json, running nothing")
    p.add_argument("--one", nargs=3, metavar=("LIBRARY", "K", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        library, k, steps = args.one[0], int(args.one[1]), int(args.one[2])
        record = run_one(library, k, steps, args.eval_images, args.seed, args.kmeans_rows, args.kmeans_iters,
                         args.budget_s)
        Path(args.result).write_text(json.dumps(record) + "\n")
        return 0

    if args.report_only:
        saved = json.loads((Path(args.out) / f"{args.tag}.json").read_text())
        write_report(saved["runs"], Path(args.out), args.tag, saved["provenance"], args)
        return 0

    from benchmarks.measure import provenance

    libraries = args.libraries.split(",")
    runs = [(lib, int(k), args.steps, args.eval_images) for k in args.ks.split(",") if k for lib in libraries]
    runs += [(lib, int(k), args.short_steps, args.short_eval_images) for k in args.short_ks.split(",") if k
             for lib in libraries]
    # The longest runs first, so that they are not the ones left at the end.
    runs.sort(key=lambda r: (-r[1] * r[2], r[0] != "vqpt"))
    out = Path(args.out)
    log_dir = out / f"{args.tag}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    prov = {**provenance(torch.device("cpu"), sys.argv[1:]), "command": "python -m benchmarks.sweep_k "
            + " ".join(sys.argv[1:]), "threads_per_run": 1, "jobs": args.jobs, "nice": args.nice,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if os.environ.get("SWEEP_GIT_COMMIT"):  # run from an exported copy of that commit
        prov["git_commit"] = os.environ["SWEEP_GIT_COMMIT"]
    records: list[dict] = []
    report_lock = threading.Lock()  # the runs finish in worker threads; one report at a time

    def go(run):
        r = launch(*run, args, log_dir)
        with report_lock:
            records.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
            write_report(records, out, args.tag, prov, args)
        return r

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(go, runs))
    prov["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_report(records, out, args.tag, prov, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
