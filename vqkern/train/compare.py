"""``--compare``: the same VQ-VAE trained twice, reference quantizer then vqkern.

Both runs start from one set of initial weights, see the same batches in the
same order and start from the same RNG state; only the quantizer differs.
"""
from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import torch

from . import outputs
from .stage1 import VQVAEConfig, build_model, evaluate, load_splits, pick_device, train_steps

KEYS = ("loss", "recon", "vq_loss", "perplexity")


def compare_quantizers(cfg: VQVAEConfig, *, progress: bool = True) -> dict:
    """Train with each quantizer; write compare.jsonl, compare.png and compare.json under cfg.out.

    Returns, per quantizer, its curve summary, held-out metrics and median ms/step, plus
    ``max_abs_diff[key]`` over all steps for loss, recon, vq_loss and perplexity.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    train, test, source = load_splits(cfg)
    torch.manual_seed(cfg.seed)
    initial = copy.deepcopy(build_model(cfg, train.shape[1], "reference").state_dict())
    curves, summary = {}, {"data": source, "device": str(device), "steps": cfg.steps}
    for kind in ("reference", "vqkern"):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, train.shape[1], kind).to(device)
        model.load_state_dict(initial)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        records: list[dict] = []
        times = train_steps(model, optimizer, train, cfg, device, 0, cfg.steps, records.append, progress, desc=kind)
        metrics, _, _ = evaluate(model, test, device)
        curves[kind] = records
        summary[kind] = {**metrics, "final_loss": records[-1]["loss"],
                         "ms_per_step": 1e3 * statistics.median(times[1:] or times)}
    ref, vqk = curves["reference"], curves["vqkern"]
    summary["max_abs_diff"] = {k: max(abs(a[k] - b[k]) for a, b in zip(ref, vqk)) for k in KEYS}
    summary["speedup"] = summary["reference"]["ms_per_step"] / summary["vqkern"]["ms_per_step"]
    with open(out / "compare.jsonl", "w") as f:
        for kind, records in curves.items():
            for r in records:
                f.write(json.dumps({"quantizer": kind, **r}) + "\n")
    summary["curves_png"] = str(outputs.plot_curves(curves, out / "compare.png",
                                                    title="reference quantizer vs vqkern, same weights and data"))
    (out / "compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["curves"] = curves
    return summary
