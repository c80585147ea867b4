"""encodec's model trained on speech twice from the same weights and batches: its own quantizer,
then patched by vqkern.patch; curves overlaid, step time, peak memory, held-out error.

The speech is synthesized offline with espeak-ng (``make espeak-ng`` installs it): fixed
sentences in several voices and speeds, 22.05 kHz, cut into 1 s segments (the last tenth of
the clips held out). The model is encodec's own code: its SEANet encoder and decoder and its
``ResidualVectorQuantizer`` (EMA codebooks of 1024 codes, k-means init, dead-code expiry),
composed as ``EncodecModel`` composes them (its module imports torchaudio, which does not
load beside the CPU torch), scaled down to train on CPU. The two models draw from separate
copies of one random stream, so k-means seeds and expiry draws are the same for both.

    python -m benchmarks.patch_audio_train --steps 300
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import measure
from vqkern.integrations.imports import import_module

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "A journey of a thousand miles begins with a single step.",
    "She sells sea shells by the sea shore.", "Please call Stella and ask her to bring these things with her.",
    "The rain in Spain stays mainly in the plain.", "How much wood would a woodchuck chuck?",
    "Six thick thistle sticks were left on the table.", "We will meet at the old bridge before sunset.",
    "Numbers like forty two and nineteen eighty four are easy to say.", "Bright vixens jump; dozy fowl quack.",
    "The museum opens at nine and closes at half past five.", "Could you repeat that a little more slowly?",
    "Every morning the baker lights the oven before dawn.", "The storm knocked out power across the valley.",
    "Pack my box with five dozen liquor jugs.", "Whispering winds carried the scent of pine.",
    "Her violin sounded warm in the small wooden hall.", "The train to the coast leaves from platform three.",
    "Measure twice and cut once, said the carpenter.", "Quiet streets turn busy when the market opens.",
]
VOICES = ["en-us", "en-us+f3", "en+m3", "en-gb+f2", "en-us+m7"]
SPEEDS = [135, 170]
SAMPLE_RATE = 22050


def synthesize(folder: Path) -> list[Path]:
    """One WAV per sentence, voice and speed (espeak-ng, 22.05 kHz mono 16-bit)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(SENTENCES):
        for voice in VOICES:
            for speed in SPEEDS:
                path = folder / f"{i:02d}-{voice.replace('+', '_')}-{speed}.wav"
                if not path.exists():
                    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
                paths.append(path)
    return paths


def segments(paths: list[Path], length: int) -> torch.Tensor:
    """(S, 1, length) float32 in [-1, 1]: each clip cut into whole segments, silence trimmed."""
    out = []
    for path in paths:
        with wave.open(str(path)) as w:
            assert w.getframerate() == SAMPLE_RATE and w.getsampwidth() == 2
            audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
        voiced = np.nonzero(np.abs(audio) > 1e-3)[0]
        audio = audio[voiced[0]:voiced[-1]] if voiced.size else audio
        for start in range(0, audio.size - length + 1, length):
            out.append(torch.from_numpy(audio[start:start + length].copy()))
    return torch.stack(out).unsqueeze(1)


def build(seed: int):
    modules = import_module("encodec.modules", skip_init=("encodec",))
    quantization = import_module("encodec.quantization", skip_init=("encodec",))
    torch.manual_seed(seed)
    kw = dict(channels=1, dimension=64, n_filters=8, ratios=[8, 5, 4, 2], causal=True, lstm=1)
    return torch.nn.ModuleDict(dict(encoder=modules.SEANetEncoder(**kw), decoder=modules.SEANetDecoder(**kw),
                                    quantizer=quantization.ResidualVectorQuantizer(dimension=64, n_q=4, bins=1024)))


def stft_loss(y, x):
    """L1 of log magnitudes at two resolutions (a reduced form of encodec's spectral loss)."""
    total = 0.0
    for n_fft in (256, 1024):
        window = torch.hann_window(n_fft)
        mag = [torch.stft(a.squeeze(1), n_fft, n_fft // 4, window=window, return_complex=True).abs() for a in (y, x)]
        total = total + F.l1_loss(torch.log(mag[0] + 1e-5), torch.log(mag[1] + 1e-5))
    return total


def step(model, x):
    """Losses of one batch x (B, 1, T): waveform L1, spectral, commitment; codes (L, B, frames)."""
    emb = model["encoder"](x)
    q = model["quantizer"](emb, SAMPLE_RATE)
    y = model["decoder"](q.quantized)[..., :x.shape[-1]]
    return dict(l1=F.l1_loss(y, x), spectral=stft_loss(y, x), commitment=q.penalty), q.codes


def perplexity(codes: torch.Tensor, k: int = 1024) -> float:
    p = torch.bincount(codes.reshape(-1), minlength=k).float()
    p = p / p.sum()
    return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())


def train(args):
    data = segments(synthesize(Path(args.data)), SAMPLE_RATE)
    held = max(1, len(data) // 10)
    train_set, test_set = data[:-held], data[-held:]
    import vqkern
    models = {"encodec": build(0), "patched": build(0)}
    patched = vqkern.patch(models["patched"])
    opts = {k: torch.optim.Adam(m.parameters(), lr=args.lr) for k, m in models.items()}
    torch.manual_seed(1)
    rng = {k: torch.get_rng_state() for k in models}  # one stream, copied: the same draws for both
    order = torch.Generator().manual_seed(2)
    records = {k: [] for k in models}
    start_all = time.monotonic()
    for i in range(args.steps):
        if args.max_minutes and time.monotonic() - start_all > 60 * args.max_minutes:
            print(f"stopped after {i} steps: --max-minutes {args.max_minutes} reached", flush=True)
            break
        batch = train_set[torch.randint(0, len(train_set), (args.batch_size,), generator=order)]
        for name, model in models.items():
            torch.set_rng_state(rng[name])
            start = time.perf_counter()
            losses, codes = step(model, batch)
            loss = losses["l1"] + losses["spectral"] + losses["commitment"]
            loss.backward()
            opts[name].step()
            opts[name].zero_grad()
            ms = (time.perf_counter() - start) * 1e3
            rng[name] = torch.get_rng_state()
            records[name].append(dict(step=i, ms=ms, loss=loss.item(), perplexity=perplexity(codes[0]),
                                      **{k: v.item() for k, v in losses.items()}))
        if i % 10 == 0 or i == args.steps - 1:
            print(i, f"{time.monotonic() - start_all:.0f} s", {k: round(v[-1]["loss"], 4) for k, v in records.items()},
                  flush=True)
    summary = {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            losses, codes = step(model, test_set)
        model.train()
        batch = train_set[:args.batch_size]
        torch.set_rng_state(rng[name])
        peak = measure.peak_extra_bytes(lambda m=model: sum(step(m, batch)[0].values()).backward(), torch.device("cpu"))
        summary[name] = dict(test_l1=losses["l1"].item(), test_spectral=losses["spectral"].item(),
                             test_perplexity_layer0=perplexity(codes[0]),
                             median_step_ms=float(np.median([r["ms"] for r in records[name][5:]])),
                             peak_step_mib=peak / 2**20 if peak is not None else None)
    return dict(patched_layers=patched, steps_done=len(records["encodec"]), train_segments=len(train_set),
                test_segments=len(test_set), summary=summary, records=records)


def write(result, args):
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    prov = measure.provenance(torch.device("cpu"))
    prov["command"] = "python -m benchmarks.patch_audio_train " + " ".join(sys.argv[1:])
    result["provenance"] = prov
    result["config"] = dict(steps=args.steps, max_minutes=args.max_minutes, batch_size=args.batch_size, lr=args.lr,
                            segment_s=1.0, sample_rate=SAMPLE_RATE, voices=VOICES, speeds=SPEEDS,
                            sentences=len(SENTENCES))
    Path(f"{stem}.json").write_text(json.dumps(result))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["loss", "l1", "commitment", "perplexity"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        for name, style in (("encodec", "-"), ("patched", "--")):
            ax.plot([r[key] for r in result["records"][name]], style, label=name, lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=90)
    s, lines = result["summary"], []
    diff = {k: max(abs(a[k] - b[k]) for a, b in zip(result["records"]["encodec"], result["records"]["patched"]))
            for k in keys}
    lines += ["# encodec trained on synthesized speech: its quantizer and vqkern.patch's", "",
              f"`{prov['command']}` on {prov['device']} ({prov['cpu_isa']}), torch {prov['torch']}, commit "
              f"{prov['git_commit']}, {prov['date']}, load average {prov['load_average']}.", "",
              f"{result['train_segments']} training and {result['test_segments']} held-out 1 s segments of espeak-ng "
              f"speech ({len(SENTENCES)} sentences x {len(VOICES)} voices x {len(SPEEDS)} speeds, 22.05 kHz); "
              f"{result['steps_done']} steps (of {args.steps} asked) of batch {args.batch_size}, Adam {args.lr}; "
              "patched layers: "
              f"{len(result['patched_layers'])} EuclideanCodebook.", "",
              "| quantizer | held-out L1 | held-out spectral | held-out perplexity (layer 0) | median step ms "
              "| peak step MiB |", "| --- | --- | --- | --- | --- | --- |"]
    for name in ("encodec", "patched"):
        r = s[name]
        lines.append(f"| {name} | {r['test_l1']:.5f} | {r['test_spectral']:.4f} | {r['test_perplexity_layer0']:.1f} "
                     f"| {r['median_step_ms']:.0f} | {r['peak_step_mib']:.0f} |")
    lines += ["", "Largest per-step difference between the two runs: "
              + ", ".join(f"{k} {v:.3g}" for k, v in diff.items()) + ".", "",
              f"![curves]({stem.name}.png)", ""]
    Path(f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after the step that passes this much wall time (a loaded machine)")
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "vqkern-espeak-speech"))
    parser.add_argument("--out", default=f"benchmarks/results/cpu/train/{datetime.date.today().isoformat()}"
                                         "-patch-encodec-speech")
    args = parser.parse_args()
    write(train(args), args)


if __name__ == "__main__":
    main()
