"""Markdown tables and matplotlib plots from the sweep's records."""
from __future__ import annotations

from collections import defaultdict

VQKERN_DEFAULT = {"cpu": "vqkern-torch", "cuda": "vqkern-triton"}


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _groups(records):
    out = defaultdict(list)
    for r in records:
        # Runs before the data kinds existed hold no "data": standard normal.
        out[(r["pass"], r["dtype"], r["n"], r["k"], r["d"], r.get("data", "randn"))].append(r)
    return out


def floor_method(rates: dict) -> str:
    """How the floor's matmul rate was reached: the fastest way and its square size."""
    # Runs before the fastest-way floor timed torch.mm(a, b, out=c) alone.
    method = rates.get("matmul_method", "torch.mm(a, b, out=c)")
    return f"{method}, {rates['matmul_shape'][0]}^3"


def markdown(meta: dict, records: list[dict]) -> str:
    lines = [
        f"# vqkern benchmark: {meta['device']}",
        "",
        f"- date {meta['date']}, commit `{meta['git_commit']}`, torch {meta['torch']}, triton {meta['triton']}, "
        f"CUDA {meta['cuda']}, threads {meta['threads']}, load average at start {meta['load_average']}",
        f"- command: `{meta['command']}`",
        f"- peak memory: {meta['mem_method']}",
    ]
    for dt, rates in meta["floor_rates"].items():
        lines.append(f"- floor rates ({dt}, {rates.get('source', 'measured in this run')}): "
                     f"matmul {rates['matmul_flops'] / 1e9:.1f} GFLOP/s ({floor_method(rates)}), "
                     f"copy {rates['bandwidth_bytes'] / 1e9:.1f} GB/s")
    lines += ["", "Columns: median ms (min-max over the timed calls); `x vqkern` = this provider's median / "
              "vqkern's default backend's median (> 1: vqkern is faster); peak extra MiB allocated by one call; "
              "`% floor` = floor / median, floor = max(2NKD / matmul rate, bytes / bandwidth).", ""]
    default = VQKERN_DEFAULT.get(meta.get("device_type", "cpu"), "vqkern-torch")
    for (pass_, dtype, n, k, d, data), group in _groups(records).items():
        ref = next((r for r in group if r["provider"] == default and r["status"] == "ok"), None)
        floor = group[0].get("floor_ms")
        kind = "" if data == "randn" else f", {data} data"
        lines += [f"## {pass_}, N={n} K={k} D={d}, {dtype}{kind} (floor {'-' if floor is None else _fmt_ms(floor)} ms)",
                  "",
                  "| provider | median ms | min-max ms | x vqkern | peak MiB | % floor |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in group:
            if r["status"] == "n/a":
                continue
            if r["status"] != "ok":
                lines.append(f"| {r['provider']} | {r['status'].upper()} | {r['reason'][:90]} | | | |")
                continue
            ratio = f"{r['median_ms'] / ref['median_ms']:.2f}" if ref else "-"
            lines.append(f"| {r['provider']} | {_fmt_ms(r['median_ms'])} | {_fmt_ms(r['min_ms'])}-"
                         f"{_fmt_ms(r['max_ms'])} | {ratio} | {_mib(r.get('peak_mem_bytes'))} | "
                         f"{100 * r['floor_fraction']:.0f}% |")
        lines.append("")
    lines += target_summary(records, default)
    return "\n".join(lines) + "\n"


def target_summary(records, default: str) -> list[str]:
    """The CPU target of issue 4: vqkern forward <= 1.2x faiss, >= 3x faster than vqpt eval."""
    rows = []
    for (pass_, dtype, n, k, d, _), group in _groups(records).items():
        if pass_ != "forward":
            continue
        by = {r["provider"]: r for r in group if r["status"] == "ok"}
        if default not in by:
            continue
        v = by[default]
        faiss = by.get("faiss")
        vqpt = by.get("vqpt-eval")
        f_ratio = f"{v['median_ms'] / faiss['median_ms']:.2f}" if faiss else "-"
        q_ratio = f"{vqpt['median_ms'] / v['median_ms']:.2f}" if vqpt else "-"
        ok = (faiss is None or v["median_ms"] <= 1.2 * faiss["median_ms"]) and \
             (vqpt is None or vqpt["median_ms"] >= 3 * v["median_ms"])
        rows.append(f"| {n}x{k}x{d} {dtype} | {_fmt_ms(v['median_ms'])} | {f_ratio} | {q_ratio} | "
                    f"{_mib(v.get('peak_mem_bytes'))} | {'met' if ok else 'NOT met'} |")
    if not rows:
        return []
    return [f"## Target: {default} forward vs faiss (<= 1.2x) and vector-quantize-pytorch eval (>= 3x faster)", "",
            "| shape | vqkern ms | vqkern / faiss | vqpt-eval / vqkern | vqkern peak MiB | target |",
            "|---|---:|---:|---:|---:|---|", *rows, ""]


def plots(records: list[dict], stem: str) -> list[str]:
    """time vs K and peak memory vs K at fixed (N, D), and fraction of floor per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Plotted against K: the standard normal data only (a collapsed codebook is another curve).
    ok = [r for r in records if r["status"] == "ok" and r.get("data", "randn") == "randn"]
    series = defaultdict(lambda: defaultdict(list))  # (pass, dtype, n, d) -> provider -> [(k, rec)]
    for r in ok:
        series[(r["pass"], r["dtype"], r["n"], r["d"])][r["provider"]].append((r["k"], r))
    sweeps = {key: provs for key, provs in series.items() if len({k for p in provs.values() for k, _ in p}) >= 2}
    paths = []
    for metric, label, fname in (("median_ms", "median time (ms)", "time"),
                                 ("peak_mem_bytes", "peak extra memory (MiB)", "memory")):
        if not sweeps:
            break
        fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.5), squeeze=False)
        for ax, ((pass_, dtype, n, d), provs) in zip(axes[0], sorted(sweeps.items())):
            for name, pts in sorted(provs.items()):
                pts = sorted((k, r[metric]) for k, r in pts if r.get(metric) is not None)
                if not pts:
                    continue
                ys = [y / 2**20 if metric == "peak_mem_bytes" else y for _, y in pts]
                ax.plot([k for k, _ in pts], ys, marker="o", label=name,
                        linewidth=2.5 if name.startswith("vqkern") else 1.2)
            ax.set(xscale="log", yscale="log", xlabel="K (codes)", ylabel=label,
                   title=f"{pass_}, N={n}, D={d}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(f"{stem}-{fname}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fwd = [r for r in ok if r["pass"] == "forward" and r.get("floor_fraction")]
    if fwd:
        cases = sorted({(r["dtype"], r["n"], r["k"], r["d"]) for r in fwd})
        names = sorted({r["provider"] for r in fwd})
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) + 2), 4.5))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            vals = {(r["dtype"], r["n"], r["k"], r["d"]): r["floor_fraction"] for r in fwd if r["provider"] == name}
            ax.bar([i + j * width for i in range(len(cases))], [vals.get(c, 0) for c in cases], width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{n}x{k}x{d}\n{dt}" for dt, n, k, d in cases], fontsize=8)
        ax.set(ylabel="fraction of floor reached", title="forward: floor / median time (1 = at the hardware floor)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(f"{stem}-floor.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def summary(meta: dict, records: list[dict]) -> str:
    """Compact tables for the README: one row per shape, vqkern's median and % of floor,
    then each peer's median as a multiple of vqkern's (> 1: vqkern is faster)."""
    default = VQKERN_DEFAULT.get(meta.get("device_type", "cpu"), "vqkern-torch")
    lines = []
    for pass_ in meta.get("passes", ("forward", "backward", "train")):
        groups = {key: g for key, g in _groups(records).items() if key[0] == pass_}
        peers = [p for p in meta["providers"] if p != default
                 and any(r["provider"] == p and r["status"] != "n/a" for g in groups.values() for r in g)
                 and not all(r["status"] == "skipped" for g in groups.values() for r in g if r["provider"] == p)]
        if not groups:
            continue
        lines += [f"**{pass_}** ({default}: median ms and % of the floor; peers: their median / vqkern's)", "",
                  "| N x K x D | dtype | " + default + " | " + " | ".join(peers) + " |",
                  "|---|---|---:|" + "---:|" * len(peers)]
        for (_, dtype, n, k, d, data), group in groups.items():
            by = {r["provider"]: r for r in group}
            v = by.get(default)
            if v is None or v["status"] != "ok":
                cells = [v["status"].upper() if v else "-"]
            else:
                cells = [f"{_fmt_ms(v['median_ms'])} ({100 * v['floor_fraction']:.0f}%)"]
            for p in peers:
                r = by.get(p)
                if r is None or r["status"] in ("n/a", "skipped"):
                    cells.append("-")
                elif r["status"] != "ok":
                    cells.append(r["status"].upper())
                elif v is not None and v["status"] == "ok":
                    cells.append(f"{r['median_ms'] / v['median_ms']:.2f}x")
                else:
                    cells.append(_fmt_ms(r["median_ms"]) + " ms")
            kind = "" if data == "randn" else f" ({data})"
            lines.append(f"| {n} x {k} x {d}{kind} | {dtype} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m benchmarks.report RESULTS.json   (prints the README summary tables)")
    with open(sys.argv[1]) as f:
        data = json.load(f)
    print(summary(data["meta"], data["records"]))
