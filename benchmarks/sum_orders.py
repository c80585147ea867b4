"""Error of one code's codebook-gradient sum under several summation orders, on CPU.

    python -m benchmarks.sum_orders

The sum of the residuals ``e - z`` of M rows of one code (D = 64), fp32, in: a running sum
(one row after the other); pieces of P rows summed in row order, the pieces added pairwise
(the C++ CPU kernel, P = 16); blocks of 64 rows summed pairwise, the blocks added by a
running sum (the GPU atomic paths' shape). Against PyTorch autograd of
``mean((z - e)^2)``, which scales each term by 2 / (M D) before its sum. Errors in fp32
ulps of ``sum |e - z|`` (the worst of the D elements), two seeds per case. Prints a table
(benchmarks/NOTES.md has the figures of 2026-12-03).
"""
from __future__ import annotations

import torch

D = 64
CASES = [  # rows, z dtype, z near its code (noise 1) or not (0), the code's offset
    (600, torch.float16, 0.0, 0.0),
    (100_000, torch.float16, 1.0, 0.0),
    (100_000, torch.float16, 0.0, 0.0),
    (100_000, torch.bfloat16, 0.0, 3.0),
]


def running(t):
    return torch.zeros(1, t.shape[1]).index_add_(0, torch.zeros(t.shape[0], dtype=torch.long), t)[0]


def pairwise(t):
    while t.shape[0] > 1:
        if t.shape[0] % 2:
            t = torch.cat([t, torch.zeros(1, t.shape[1])])
        t = t[0::2] + t[1::2]
    return t[0]


def pieces(t, p):
    return running(t) if t.shape[0] <= p else pairwise(torch.stack([running(t[i:i + p])
                                                                    for i in range(0, t.shape[0], p)]))


def blocks(t, b):
    return running(torch.stack([pairwise(t[i:i + b]) for i in range(0, t.shape[0], b)]))


def main() -> None:
    torch.manual_seed(0)
    for m, dtype, near, offset in CASES:
        for _ in range(2):
            e = torch.randn(1, D) + offset
            z = ((e + near * torch.randn(m, D)) if near else torch.randn(m, D)).to(dtype)
            t = e - z.float()
            s = 2.0 / (m * D)
            exact = (e.double() - z.double()).sum(0) * s
            size = t.abs().sum(0).double() * s
            autograd = torch.zeros(1, D).index_put_((torch.zeros(m, dtype=torch.long),),
                                                    -2.0 * (z.float() - e) / (m * D), accumulate=True)[0]

            def ulps(x):
                return ((x.double() - exact).abs() / size).max().item() / 2**-24
            row = {"autograd": ulps(autograd), "running": ulps(running(t) * s)}
            row.update({f"pieces{p}": ulps(pieces(t, p) * s) for p in (4, 8, 16, 32)})
            row["blocks64"] = ulps(blocks(t, 64) * s)
            print(m, str(dtype).replace("torch.", ""), "near" if near else "far", offset,
                  " ".join(f"{k}={v:.1f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
