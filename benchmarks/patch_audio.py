"""vqkern.patch on the audio codecs' quantizers: forward + backward time and peak memory before
and after patch, at the codecs' real codebook sizes and a minute of audio per batch item.

Each case builds the library's real class (seeded) twice, patches one, and times the two
interleaved in one process (median of ``--reps`` wall-clock runs after a warm-up, ratios
beside the times: machine drift hits both alike); peak memory is the resident-set growth of
one call (benchmarks/measure.py). ``CASES`` is the registry ``python -m benchmarks.patch``
runs; ``python -m benchmarks.patch_audio`` runs these alone and writes
benchmarks/results/cpu/<date>-patch-audio.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmarks import measure
from vqkern.integrations.imports import import_module


@dataclass
class Case:
    """One quantizer at one size. build() -> the module (seeded, in the mode benchmarked);
    inputs() -> the call's arguments; step(module, inputs) runs the forward (and the
    backward where ``backward``); shape: rows N, codes K, dim D, layers L (for the record)."""
    name: str
    library: str
    cls: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    step: Callable[[nn.Module, tuple], None]
    shape: dict = field(default_factory=dict)
    backward: bool = True


def _minute(batch: int, frame_rate: float, channels: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, round(60 * frame_rate), generator=g)


def _train(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return module.train()


def _backward(out: torch.Tensor, x: torch.Tensor) -> None:
    out.backward()
    x.grad = None


# encodec 24 kHz (6 kbps: 8 of its 32 layers): D = 128, K = 1024, 75 frames/s; 4 minutes.
def _encodec():
    core_vq = import_module("encodec.quantization.core_vq", skip_init=("encodec",))
    model = core_vq.ResidualVectorQuantization(num_quantizers=8, dim=128, codebook_size=1024, kmeans_init=False)
    return _train(model)


def _encodec_step(model, inputs):
    (x,) = inputs
    quantized, _, losses = model(x)
    _backward((quantized * quantized).mean() + losses.sum(), x)


# moshi's Mimi quantizer: 1 semantic + 7 acoustic layers, D = 256, K = 2048, 12.5 frames/s,
# 512-channel input; 16 minutes.
def _moshi():
    import moshi.quantization.vq as vq
    torch.manual_seed(0)
    model = vq.SplitResidualVectorQuantizer(n_q=8, n_q_semantic=1, dimension=256, input_dimension=512,
                                            output_dimension=512, bins=2048)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # initialized codebooks, as a checkpoint (or the first steps) leaves them
        if hasattr(m, "embedding_sum"):
            m.embedding_sum.copy_(torch.randn(m.embedding_sum.shape, generator=g))
            m._initialized.fill_(1)
    return model


def _moshi_step(model, inputs):
    (x,) = inputs
    out = model(x, 12)
    _backward((out.x * out.x).mean() + out.penalty, x)


# descript DAC 44 kHz: 9 layers, 1024 -> 8 dims, K = 1024, 86.1 frames/s; 4 minutes.
def _dac():
    quantize = import_module("dac.nn.quantize", skip_init=("dac", "dac.nn"))
    torch.manual_seed(0)
    return _train(quantize.ResidualVectorQuantize(input_dim=1024, n_codebooks=9, codebook_size=1024, codebook_dim=8,
                                                  quantizer_dropout=0.5))


def _dac_step(model, inputs):
    (x,) = inputs
    z_q, _, _, commitment, codebook = model(x)
    _backward((z_q * z_q).mean() + commitment * 0.25 + codebook, x)


# transformers' Mimi (kyutai/mimi's config: 32 layers of K = 2048, D = 256): encode 16 minutes,
# 8 layers (the 1.1 kbps setting), with random codebooks loaded as a checkpoint would.
def _transformers_mimi():
    from transformers import MimiConfig
    from transformers.models.mimi.modeling_mimi import MimiSplitResidualVectorQuantizer
    torch.manual_seed(0)
    model = MimiSplitResidualVectorQuantizer(MimiConfig(num_quantizers=8)).eval()
    for m in model.modules():
        if hasattr(m, "embed_sum"):
            m.embed_sum.normal_()
    return model


def _encode_step(model, inputs):
    with torch.no_grad():
        model.encode(*inputs)


CASES = [
    Case("encodec 24 kHz RVQ, 8 layers, train", "encodec 0.1.1", "encodec.quantization.core_vq.EuclideanCodebook",
         _encodec, lambda: (_minute(4, 75, 128).requires_grad_(),), _encodec_step,
         dict(rows=4 * 4500, codes=1024, dim=128, layers=8, audio="4 x 60 s")),
    Case("moshi Mimi split RVQ, 8 layers, train", "moshi 0.2.13", "moshi.quantization.core_vq.EuclideanCodebook",
         _moshi, lambda: (_minute(16, 12.5, 512).requires_grad_(),), _moshi_step,
         dict(rows=16 * 750, codes=2048, dim=256, layers=8, audio="16 x 60 s")),
    Case("DAC 44 kHz RVQ, 9 layers, train", "descript-audio-codec 1.0.0", "dac.nn.quantize.VectorQuantize",
         _dac, lambda: (_minute(4, 44100 / 512, 1024).requires_grad_(),), _dac_step,
         dict(rows=4 * 5168, codes=1024, dim=8, layers=9, audio="4 x 60 s")),
    Case("transformers Mimi RVQ encode, 8 layers", "transformers 5.25.0",
         "transformers.models.mimi.modeling_mimi.MimiEuclideanCodebook",
         _transformers_mimi, lambda: (_minute(16, 12.5, 512),), _encode_step,
         dict(rows=16 * 750, codes=2048, dim=256, layers=8, audio="16 x 60 s"), backward=False),
]


def run_case(case: Case, reps: int) -> dict:
    """Time and memory of case.step before and after vqkern.patch, interleaved."""
    import vqkern

    device = torch.device("cpu")
    before, after = case.build(), case.build()
    patched = vqkern.patch(after)
    inputs = case.inputs()
    calls = {"before": lambda: case.step(before, inputs), "after": lambda: case.step(after, inputs)}
    memory = {k: measure.peak_extra_bytes(fn, device) for k, fn in calls.items()}  # also the warm-up
    times = {k: [] for k in calls}
    for _ in range(reps):
        for k, fn in calls.items():
            times[k].append(measure.time_once_cpu(fn))
    out = dict(name=case.name, library=case.library, cls=case.cls, shape=case.shape, backward=case.backward,
               patched_layers=len(patched))
    for k in calls:
        out[k] = dict(measure.summarize(times[k]), peak_extra_mib=None if memory[k] is None else memory[k] / 2**20)
    out["speedup"] = out["before"]["median_ms"] / out["after"]["median_ms"]
    return out


def report_md(results: list[dict], prov: dict) -> str:
    lines = ["# vqkern.patch on audio codecs' quantizers: before and after", "",
             f"`{prov['command']}` on {prov['device']}, kernel path {prov['cpu_isa']}, torch {prov['torch']}, "
             f"commit {prov['git_commit']}, {prov['date']}, load average {prov['load_average']}.", "",
             "Median wall-clock ms of the quantizer's forward (+ backward where trained) and the resident-set "
             "growth of one call, the original and the patched copy timed interleaved in one process.", "",
             "| case | rows x codes x dim, layers | original ms | patched ms | speed-up | original MiB | patched MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s = r["shape"]
        lines.append(f"| {r['name']} ({r['library']}) | {s['rows']} x {s['codes']} x {s['dim']}, {s['layers']} "
                     f"| {r['before']['median_ms']:.0f} | {r['after']['median_ms']:.0f} | {r['speedup']:.2f}x "
                     f"| {r['before']['peak_extra_mib']:.0f} | {r['after']['peak_extra_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", default=None, help="comma-separated substrings of case names")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/cpu/<date>-patch-audio)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in CASES if args.cases is None or any(s in c.name for s in args.cases.split(","))]
    results = []
    for case in cases:
        results.append(run_case(case, args.reps))
        print(json.dumps({k: results[-1][k] for k in ("name", "speedup")}), flush=True)
    prov = measure.provenance(torch.device("cpu"))
    prov["command"] = "python -m benchmarks.patch_audio " + " ".join(sys.argv[1:] if argv is None else argv)
    prov["median_of"] = f"{args.reps} runs after one warm-up (the memory run)"
    stem = Path(args.out or f"benchmarks/results/cpu/{datetime.date.today().isoformat()}-patch-audio")
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(dict(provenance=prov, results=results), indent=1))
    Path(f"{stem}.md").write_text(report_md(results, prov))
    print(report_md(results, prov))


if __name__ == "__main__":
    main()
