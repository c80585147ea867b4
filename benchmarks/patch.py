"""Before and after ``vqkern.patch``: each library's quantizer layer, forward + backward, at
the size its models run at, with the original's out-of-memory failures recorded.

    python -m benchmarks.patch                       # every case, results under benchmarks/results/<device>/
    python -m benchmarks.patch --cases diffusers-movq-256 --reps 3
    python -m benchmarks.patch --list

A case (``Case`` below) builds the library's own layer class (seeded random init) and the
batch of one training step; ``CASES`` holds the image and vector-quantize-pytorch cases (the
audio codecs have their own runner, ``python -m benchmarks.patch_audio``).

Each case runs in a fresh process, so its peak memory is its own: it builds the layer,
patches a deep copy, and times forward + backward of the two interleaved (wall clock on CPU,
median of ``--reps`` after a warm-up call each; CUDA events on a GPU), then the peak extra
memory of one call of each (``benchmarks.measure.peak_extra_bytes``). The original runs under
an address-space limit (``--memory-limit-gib``, lowered to 70% of the machine's available
memory when that is less), so a distance matrix that does not fit fails with an allocation
error, recorded as out of memory, rather than waking the kernel's OOM killer on a shared
machine. The floor of each case is the fused search's, ``max(2*N*K*D / matmul rate, bytes /
bandwidth)``, with both rates measured at the start of the run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import measure


@dataclass(frozen=True)
class Case:
    """One library layer at one size.

    build(): the layer (the library's class, seeded); inputs(device): the forward's
    positional arguments; rows, codes, dim: N, K, D of its search; size: the batch in the
    model's terms; train: forward + backward (False: the layer has no gradient, forward only).
    loss(out): the scalar to backpropagate from the forward's output (default: the squared
    mean of the first output, plus the second when it is a loss scalar).
    """
    library: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.device], tuple]
    rows: int
    codes: int
    dim: int
    size: str
    train: bool = True
    loss: Callable | None = None


def _default_loss(out):
    out = out if isinstance(out, tuple) else (out,)
    loss = out[0].float().square().mean()
    if len(out) > 1 and isinstance(out[1], torch.Tensor) and out[1].is_floating_point() and out[1].requires_grad:
        loss = loss + out[1].float().sum()
    return loss


def _randn(*shape, scale=1.0):
    def make(device):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(*shape, generator=g) * scale).to(device),
    return make


def _seeded(build):
    def make():
        torch.manual_seed(0)
        return build()
    return make


def _diffusers(k, d):
    from diffusers.models.autoencoders.vae import VectorQuantizer
    return VectorQuantizer(k, d, beta=0.25)


def _taming(cls, k, d):
    from taming.modules.vqvae import quantize
    return getattr(quantize, cls)(k, d, 0.25)


def _transformers(model, **config):
    import transformers
    from transformers.models.chameleon import modeling_chameleon
    from transformers.models.emu3 import modeling_emu3
    from transformers.models.glm_image import modeling_glm_image
    from transformers.models.janus import modeling_janus

    classes = {"chameleon": (transformers.ChameleonVQVAEConfig, modeling_chameleon, "ChameleonVQVAEVectorQuantizer"),
               "janus": (transformers.JanusVQVAEConfig, modeling_janus, "JanusVQVAEVectorQuantizer"),
               "glm_image": (modeling_glm_image.GlmImageVQVAEConfig, modeling_glm_image,
                             "GlmImageVQVAEVectorQuantizer"),
               "emu3": (transformers.Emu3VQVAEConfig, modeling_emu3, "Emu3VQVAEVectorQuantizer")}
    config_cls, module, name = classes[model]
    return getattr(module, name)(config_cls(**config))


def _vqp(cls, **kw):
    import vector_quantize_pytorch
    return getattr(vector_quantize_pytorch, cls)(**kw)


def _rvq_loss(out):
    return out[0].square().mean() + out[2].sum()


CASES: dict[str, Case] = {
    # Kandinsky 2.2's MoVQ quantizer (VQModel, num_vq_embeddings=16384, vq_embed_dim=4) on
    # 256 x 256 latents, a batch of 16: N = 1,048,576, N x K fp32 = 64 GiB.
    "diffusers-movq-256": Case("diffusers 0.42.1", _seeded(lambda: _diffusers(16384, 4)),
                               _randn(16, 4, 256, 256, scale=0.01), 16 * 256 * 256, 16384, 4,
                               "VQModel quantizer, 16 x 256 x 256 latents"),
    # One 128 x 128 latent grid, where the original's 1 GiB matrix fits beside other work.
    "diffusers-movq-128-b1": Case("diffusers 0.42.1", _seeded(lambda: _diffusers(16384, 4)),
                                  _randn(1, 4, 128, 128, scale=0.01), 128 * 128, 16384, 4,
                                  "VQModel quantizer, 1 x 128 x 128 latents"),
    # taming's VQGAN f16 (ImageNet, 16384 codes of 256) on 256 x 256 images: 16 x 16 latents.
    "taming-vqgan-f16-16384": Case("taming-transformers-rom1504 0.0.6",
                                   _seeded(lambda: _taming("VectorQuantizer2", 16384, 256)),
                                   _randn(16, 256, 16, 16, scale=0.01), 16 * 16 * 16, 16384, 256,
                                   "VectorQuantizer2, 16 x 16 x 16 latents"),
    # The first VQGAN (VectorQuantizer, 1024 codes of 256), whose one-hot is N x K too.
    "taming-vqgan-f16-1024-v1": Case("taming-transformers-rom1504 0.0.6",
                                     _seeded(lambda: _taming("VectorQuantizer", 1024, 256)),
                                     _randn(16, 256, 16, 16, scale=0.01), 16 * 16 * 16, 1024, 256,
                                     "VectorQuantizer (v1), 16 x 16 x 16 latents"),
    # Chameleon's VQGAN (8192 codes of 256, 512 x 512 images -> 32 x 32).
    "chameleon-512": Case("transformers 5.25.0",
                          _seeded(lambda: _transformers("chameleon", num_embeddings=8192, embed_dim=256)),
                          _randn(16, 256, 32, 32), 16 * 32 * 32, 8192, 256, "Chameleon VQ-VAE, 16 x 32 x 32 latents"),
    # Janus's (16384 codes of 8, 384 x 384 images -> 24 x 24).
    "janus-384": Case("transformers 5.25.0",
                      _seeded(lambda: _transformers("janus", num_embeddings=16384, embed_dim=8)),
                      _randn(16, 8, 24, 24), 16 * 24 * 24, 16384, 8, "Janus VQ-VAE, 16 x 24 x 24 latents"),
    # GLM-Image's (16384 codes of 2048, l2-normalized): one 32 x 32 grid (D = 2048 makes it the
    # heaviest search per row).
    "glm-image": Case("transformers 5.25.0",
                      _seeded(lambda: _transformers("glm_image", num_embeddings=16384, embed_dim=2048)),
                      _randn(1, 2048, 32, 32), 32 * 32, 16384, 2048, "GLM-Image VQ-VAE, 1 x 32 x 32 latents"),
    # Emu3's video tokenizer (32768 codes of 4): a clip of 4 latent frames of 64 x 64, indices only.
    "emu3-video": Case("transformers 5.25.0",
                       _seeded(lambda: _transformers("emu3", codebook_size=32768, embed_dim=4)),
                       _randn(1, 4, 4, 64, 64), 4 * 64 * 64, 32768, 4, "Emu3 VQ-VAE, 1 x 4 x 64 x 64 video latents",
                       train=False),
    # vector-quantize-pytorch: an EMA VectorQuantize of 8192 codes of 256 on 16 x 1024 tokens,
    # and a SoundStream-style ResidualVQ (8 x 1024 codes of 256) on 16 x 750 frames.
    "vqp-vectorquantize-8192": Case("vector-quantize-pytorch 1.32.0",
                                    _seeded(lambda: _vqp("VectorQuantize", dim=256, codebook_size=8192)),
                                    _randn(16, 1024, 256), 16 * 1024, 8192, 256,
                                    "VectorQuantize (EMA), 16 x 1024 tokens"),
    "vqp-residualvq-soundstream": Case("vector-quantize-pytorch 1.32.0",
                                       _seeded(lambda: _vqp("ResidualVQ", dim=256, num_quantizers=8,
                                                            codebook_size=1024, threshold_ema_dead_code=2)),
                                       _randn(16, 750, 256), 8 * 16 * 750, 1024, 256,
                                       "ResidualVQ (8 x 1024, EMA, dead codes), 16 x 750 frames", loss=_rvq_loss),
    # LFQ of 2^16 codes (MAGVIT-v2's tokenizer has 2^18) on 4 x 1024 tokens: the library's
    # entropy loss is an N x 2^16 softmax (1 GiB of fp32 per matrix), vqkern's is streamed.
    # Its N x K x D is that softmax's size; the floor is a search's of that size.
    "vqp-lfq-65536": Case("vector-quantize-pytorch 1.32.0",
                          _seeded(lambda: _vqp("LFQ", dim=16, codebook_size=2 ** 16, entropy_loss_weight=0.1)),
                          _randn(4, 1024, 16), 4 * 1024, 2 ** 16, 16, "LFQ (2^16 codes, entropy loss), 4 x 1024 tokens",
                          loss=_rvq_loss),
}


def library_versions() -> dict[str, str]:
    """The installed versions of the libraries vqkern.patch serves (provenance)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for lib in ("diffusers", "transformers", "taming-transformers-rom1504", "vector-quantize-pytorch"):
        try:
            found[lib] = version(lib)
        except PackageNotFoundError:
            found[lib] = "not installed"
    return found


def all_cases() -> dict[str, Case]:
    # benchmarks/patch_audio.py's CASES are a list of its own Case type, run by its own
    # runner (python -m benchmarks.patch_audio); merging them here failed with a TypeError.
    return dict(CASES)


# ---- one case, in its own process ---------------------------------------------------------------

def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


@contextlib.contextmanager
def _address_space(limit_bytes: int):
    """Cap this process's address space at ``limit_bytes`` above what it maps now (CPU: the
    allocation that would not fit raises instead of paging the machine to its OOM killer)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "alloc" in text or "out of memory" in text


def run_case(name: str, device: torch.device, reps: int, limit_bytes: int) -> list[dict]:
    import vqkern

    case = all_cases()[name]
    original = case.build().to(device)
    original.train(case.train)
    patched = copy.deepcopy(original)
    report = vqkern.patch(patched)
    inputs = case.inputs(device)
    loss_of = case.loss or _default_loss

    def step(module):
        args = [t.detach().requires_grad_(case.train) if t.is_floating_point() else t for t in inputs]
        with torch.set_grad_enabled(case.train):
            out = module(*args)
            if case.train:
                loss_of(out).backward()
        measure.synchronize(device)

    def guard(provider):
        """The original's calls under the address-space limit (CPU)."""
        if provider == "original" and device.type == "cpu":
            return _address_space(limit_bytes)
        return contextlib.nullcontext()

    status = {"original": "ok", "patched": "ok"}
    samples = {"original": [], "patched": []}
    modules = {"original": original, "patched": patched}
    for provider, module in modules.items():      # warm-up, and the original's OOM if it has one
        try:
            with guard(provider):
                step(module)
        except Exception as exc:  # recorded, never swallowed: the status says what failed
            status[provider] = f"out of memory: {str(exc).splitlines()[0][:200]}" if _is_oom(exc) else (
                f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        module.zero_grad(set_to_none=True)
    for _ in range(reps):                          # interleaved, so load drift hits both alike
        for provider, module in modules.items():
            if status[provider] == "ok":
                with guard(provider):
                    samples[provider].append(measure.time_once_cpu(lambda: step(module)) if device.type == "cpu"
                                             else statistics.median(measure.time_cuda(lambda: step(module))))
                module.zero_grad(set_to_none=True)
    records = []
    for provider, module in modules.items():
        record = dict(case=name, library=case.library, layer=type(original).__name__, size=case.size,
                      rows=case.rows, codes=case.codes, dim=case.dim, dtype="float32",
                      pass_="forward+backward" if case.train else "forward", provider=provider,
                      status=status[provider], patched_layers=len(report) if provider == "patched" else 0)
        if status[provider] == "ok":
            record.update(measure.summarize(samples[provider]))
            with guard(provider):
                record["peak_extra_bytes"] = measure.peak_extra_bytes(lambda: step(module), device)
        records.append(record)
    return records


# ---- the run: every case, results with provenance -----------------------------------------------

def _write(stem: Path, records: list[dict], prov: dict, rates: dict, limit_bytes: int) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(provenance=prov, floor_rates=rates,
                                                         original_address_space_limit_bytes=limit_bytes,
                                                         records=records), indent=1) + "\n")
    by_case: dict[str, dict] = {}
    for r in records:
        by_case.setdefault(r["case"], {})[r["provider"]] = r

    def cell_time(r):
        return f"{r['median_ms']:.0f}" if r["status"] == "ok" else r["status"].split(":")[0]

    def cell_mem(r):
        return f"{r['peak_extra_bytes'] / 2**20:.0f}" if r["status"] == "ok" and r.get("peak_extra_bytes") is not None \
            else "-"

    lines = [f"# vqkern.patch: each library's quantizer, forward + backward, before and after ({prov['date']})", "",
             f"Command: `{prov['command']}`", "",
             f"Machine: {prov['device']}; load average at the start {prov['load_average']}; CPU search path "
             f"{prov['cpu_isa']}; torch {prov['torch']}, commit {prov['git_commit']}. The original runs under an "
             f"address-space limit of {limit_bytes / 2**30:.1f} GiB above what its process maps (out of memory "
             "below means its allocation failed under it). Times: median of the interleaved repetitions; memory: "
             "peak extra resident memory of one call. Floor: the fused search's "
             f"max(2NKD / {rates['matmul_flops'] / 1e9:.0f} GFLOP/s, "
             f"bytes / {rates['bandwidth_bytes'] / 1e9:.1f} GB/s).",
             "", "| case | library | N x K x D | original ms | patched ms | speed-up | original MiB | patched MiB | "
                 "floor ms | patched / floor |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, pair in by_case.items():
        o, p = pair["original"], pair["patched"]
        speed = f"{o['median_ms'] / p['median_ms']:.1f}x" if o["status"] == p["status"] == "ok" else "-"
        frac = f"{p['floor_ms'] / p['median_ms']:.2f}" if p["status"] == "ok" else "-"
        lines.append(f"| {name} ({p['size']}; {p['pass_']}) | {p['library']} | {p['rows']} x {p['codes']} x {p['dim']} "
                     f"| {cell_time(o)} | {cell_time(p)} | {speed} | {cell_mem(o)} | {cell_mem(p)} | "
                     f"{p['floor_ms']:.1f} | {frac} |")
    errors = [f"- {r['case']} {r['provider']}: {r['status']}" for r in records if r["status"] != "ok"]
    lines += ["", *(["Failures:", "", *errors, ""] if errors else []), f"![time and memory]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(by_case)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 2), sharey=True)
    for ax, key, scale, label in ((axes[0], "median_ms", 1.0, "forward + backward, ms"),
                                  (axes[1], "peak_extra_bytes", 2**-20, "peak extra memory, MiB")):
        missing = []
        for offset, provider in ((-0.2, "original"), (0.2, "patched")):
            values = [by_case[n][provider].get(key) for n in names]
            ok = [(i, v * scale) for i, v in enumerate(values) if v]
            ax.barh([i + offset for i, _ in ok], [v for _, v in ok], height=0.4, label=provider)
            missing += [(i + offset, by_case[names[i]][provider]["status"].split(":")[0])
                        for i, v in enumerate(values) if not v]
        ax.set_xscale("log"), ax.set_xlabel(label), ax.legend(fontsize=8)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for y, text in missing:   # an out-of-memory original has no bar: say so where it would be
            ax.text(ax.get_xlim()[0] * 1.1, y, text, va="center", fontsize=8, color="tab:red")
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    fig.suptitle(f"vqkern.patch before / after; {prov['device']}; commit {prov['git_commit'][:12]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-limit-gib", type=float, default=12.0)
    parser.add_argument("--out", help="results folder (default benchmarks/results/<device>)")
    parser.add_argument("--name", default="patch", help="file stem after the date")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--replot", help="write the .md and .png again from this results .json (no measurement)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--limit-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.worker:
        records = run_case(args.worker, device, args.reps, args.limit_bytes)
        Path(args.result).write_text(json.dumps(records))
        return
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        _write(Path(args.replot).with_suffix(""), saved["records"], saved["provenance"], saved["floor_rates"],
               saved["original_address_space_limit_bytes"])
        return
    cases = all_cases()
    if args.list:
        for name, case in cases.items():
            print(f"{name}: {case.library}, {case.size}, N x K x D = {case.rows} x {case.codes} x {case.dim}")
        return
    names = args.cases.split(",") if args.cases else list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        parser.error(f"unknown cases {unknown}; --list shows them")
    limit = int(args.memory_limit_gib * 2**30)
    if device.type == "cpu":
        limit = min(limit, int(0.7 * _available_bytes()))
    rates = measure.measure_floor_rates(device, torch.float32)
    prov = measure.provenance(device)
    prov["command"] = "python -m benchmarks.patch " + " ".join(sys.argv[1:] if argv is None else argv)
    prov["libraries"] = library_versions()
    records = []
    for name in names:
        result = Path(f"/tmp/vqkern-patch-bench-{os.getpid()}-{name}.json")
        cmd = [sys.executable, "-m", "benchmarks.patch", "--worker", name, "--device", args.device, "--reps",
               str(args.reps), "--result", str(result), "--limit-bytes", str(limit)]
        print(f"[{datetime.datetime.now():%H:%M:%S}] {name}", flush=True)
        run = subprocess.run(cmd)
        if run.returncode != 0 or not result.exists():
            case = cases[name]
            status = f"error: the case's process exited with {run.returncode}"
            records += [dict(case=name, library=case.library, layer="?", size=case.size, rows=case.rows,
                             codes=case.codes, dim=case.dim, dtype="float32", provider=p, status=status,
                             pass_="forward+backward" if case.train else "forward")
                        for p in ("original", "patched")]
        else:
            records += json.loads(result.read_text())
            result.unlink()
    for r in records:
        nbytes = 4 * (r["rows"] * r["dim"] * 3 + r["codes"] * r["dim"])
        r["floor_ms"] = measure.floor_ms(2 * r["rows"] * r["codes"] * r["dim"], nbytes, rates)
    out = Path(args.out or f"benchmarks/results/{measure.device_slug(device)}")
    _write(out / f"{datetime.date.today().isoformat()}-{args.name}", records, prov, rates, limit)


if __name__ == "__main__":
    main()
