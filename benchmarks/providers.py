"""The implementations the benchmark compares: vqkern and what users pick instead.

A provider has a name, the passes it can run, ``availability(device, dtype)``
giving (ok, reason), ``extra_bytes(case)`` (a lower bound of the memory it
must allocate, used to record OOM on CPU before the host runs out), and
``build(case, data, pass_)`` returning ``fn(i)`` that runs one call on input set i.

Every search returns its codes, so that the runner can check them before it times
anything (a fast wrong kernel is not a result): ``fn(i)`` of the forward and train
passes returns a tuple whose first item is the (N,) int64 indices; a backward pass's
``fn`` carries the indices of the forward it was built on as ``fn.indices``.
Providers that search nothing (the bare GEMM, the backward kernel alone) say so
with ``searches=False``.

Passes:
- forward: nearest-code search + gather of the codes, no autograd.
- backward: the backward of a quantize (straight-through + loss) whose forward
  was built once, timed with ``retain_graph=True``.
- train: forward + backward of a quantizer layer in training mode; returns the
  input leaf z, whose ``.grad`` the step filled.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BETA = 0.25


@dataclass(frozen=True)
class Case:
    n: int
    k: int
    d: int
    dtype: torch.dtype
    device: torch.device
    # "randn": z and the codes standard normal; "one-code": every code but code 0 moved
    # 10 standard deviations away, so every row picks code 0 (a collapsed codebook: the
    # backward's longest segment, the atomics' worst contention).
    data: str = "randn"

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Provider:
    name: str
    passes: tuple[str, ...]
    build: Callable
    availability: Callable = lambda device, dtype: (True, "")
    extra_bytes: Callable = lambda case: 0
    note: str = ""
    searches: bool = True


# ---- plain PyTorch searches (what users write) -------------------------------------------

def _broadcast_idx(z, e):
    return ((z[:, None, :] - e[None]) ** 2).sum(-1).argmin(dim=1)


def _expansion_idx(z, e):
    d = (z * z).sum(1, keepdim=True) - 2 * z @ e.t() + (e * e).sum(1)
    return d.argmin(dim=1)


def _cdist_idx(z, e):
    return torch.cdist(z, e).argmin(dim=1)


def _plain_quantize(idx_fn, z, e, beta=BETA):
    """Straight-through VQ with codebook and commitment losses, as commonly written."""
    idx = idx_fn(z.detach(), e.detach())
    q = e[idx]
    loss = F.mse_loss(q, z.detach()) + beta * F.mse_loss(z, q.detach())
    return z + (q - z).detach(), loss, idx


def _inputs(data, case, i, grad: bool):
    z = data["zs"][i % len(data["zs"])]
    e = data["codebook"]
    if grad:
        z = z.detach().requires_grad_(True)
        e = e.detach().clone().requires_grad_(True)
    return z, e


def _plain_builder(idx_fn, compiled=False):
    def fwd(z, e):
        idx = idx_fn(z, e)
        return idx, e[idx]

    def build(case, data, pass_):
        fwd_fn = fwd
        if compiled:
            # Dynamo keys its cache on the code object, shared by every shape of a sweep:
            # past its recompile limit (8) later shapes would silently run eagerly.
            torch._dynamo.reset()
            fwd_fn = torch.compile(fwd, dynamic=False)
        if pass_ == "forward":
            def run(i):
                with torch.no_grad():
                    z, e = _inputs(data, case, i, grad=False)
                    return fwd_fn(z, e)
            return run
        if pass_ == "backward":
            z, e = _inputs(data, case, 0, grad=True)
            q, loss, idx = _plain_quantize(idx_fn, z, e)
            return _backward_runner([q, loss], [data["grad"], torch.ones_like(loss)], [z, e], idx)

        def train(i):
            z, e = _inputs(data, case, i, grad=True)
            q, loss, idx = _plain_quantize(idx_fn, z, e)
            torch.autograd.backward([q, loss], [data["grad"], torch.ones_like(loss)])
            return idx, z
        return train
    return build


def _backward_runner(outputs, grads, leaves, indices):
    def run(i):
        for leaf in leaves:
            leaf.grad = None
        torch.autograd.backward(outputs, grads, retain_graph=True)
    run.indices = indices  # the codes of the forward whose backward is timed
    return run


# ---- vqkern ------------------------------------------------------------------------------

def _with_env(fn, name, value):
    """fn with the environment variable ``name`` set to ``value`` around each call."""
    def run(i):
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(i)
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return run


def _deterministic(fn):
    """fn run under torch.use_deterministic_algorithms(True): vqkern's sorted segment sum."""
    def run(i):
        was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        # warn_only: torch's own ops without a deterministic variant must not stop the timing.
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return fn(i)
        finally:
            torch.use_deterministic_algorithms(was, warn_only=warn)
    return run


def _vqkern_builder(backend, env=None, deterministic=False):
    def build(case, data, pass_):
        def make(_):
            return _vqkern_build(backend, case, data, pass_)
        # The forward a backward pass is built on runs under the same settings as its calls.
        if env:
            make = _with_env(make, *env)
        if deterministic:
            make = _deterministic(make)
        fn = make(0)
        indices = getattr(fn, "indices", None)
        if env:
            fn = _with_env(fn, *env)
        if deterministic:
            fn = _deterministic(fn)
        if indices is not None:
            fn.indices = indices
        return fn
    return build


def _vqkern_build(backend, case, data, pass_):
    import vqkern

    if pass_ == "forward":
        def run(i):  # search + gather + exact distance: the op's forward, without autograd
            z, e = _inputs(data, case, i, grad=False)
            with torch.no_grad():
                out = vqkern.quantize(z, e, beta=BETA, backend=backend)
            return out.indices, out.quantized
        return run
    if pass_ == "backward":
        z, e = _inputs(data, case, 0, grad=True)
        out = vqkern.quantize(z, e, beta=BETA, backend=backend)
        return _backward_runner([out.quantized, out.loss], [data["grad"], torch.ones_like(out.loss)], [z, e],
                                out.indices)
    # The layer in the case's dtype (a model trained in bf16 holds a bf16 codebook): the
    # search and the backward then take that dtype's kernels. With an fp32 codebook and
    # bf16 z (autocast's mix) both would be widened to fp32.
    layer = vqkern.VectorQuantizer(case.k, case.d, BETA, backend=backend).to(case.device, case.dtype)
    with torch.no_grad():
        layer.codebook.copy_(data["codebook"])

    def train(i):
        z, _ = _inputs(data, case, i, grad=True)
        out = layer(z)
        torch.autograd.backward([out.quantized, out.loss], [data["grad"], torch.ones_like(out.loss)])
        return out.indices, z
    return train


def _vqkern_available(backend):
    def check(device, dtype):
        from vqkern import backends
        return backends.availability(backend, device)
    return check


# ---- vector-quantize-pytorch ---------------------------------------------------------------

def _vqpt_builder(training: bool, **kwargs):
    def build(case, data, pass_):
        from vector_quantize_pytorch import VectorQuantize

        layer = VectorQuantize(dim=case.d, codebook_size=case.k, **kwargs).to(case.device)
        embed = layer._codebook.embed
        if embed.shape[-2:] == (case.k, case.d):  # same codebook as every other provider
            with torch.no_grad():
                embed.copy_(data["codebook"].float().expand_as(embed))
        layer.train(training)
        if pass_ == "forward":
            def run(i):
                with torch.no_grad():
                    z, _ = _inputs(data, case, i, grad=False)
                    q, idx, _ = layer(z[None])
                    return idx[0], q
            return run
        if pass_ == "backward":
            z, _ = _inputs(data, case, 0, grad=True)
            q, idx, loss = layer(z[None])
            return _backward_runner([q, loss], [data["grad"][None], torch.ones_like(loss)], [z], idx[0])

        def train(i):
            z, _ = _inputs(data, case, i, grad=True)
            q, idx, loss = layer(z[None])
            torch.autograd.backward([q, loss], [data["grad"][None], torch.ones_like(loss)])
            return idx[0], z
        return train
    return build


def _module_available(module, extra=None):
    def check(device, dtype):
        if importlib.util.find_spec(module) is None:
            return False, f"{module} is not installed"
        return extra(device, dtype) if extra else (True, "")
    return check


# ---- FAISS ---------------------------------------------------------------------------------

def _faiss_available(device, dtype):
    if importlib.util.find_spec("faiss") is None:
        return False, "faiss is not installed (pip install faiss-cpu)"
    if dtype != torch.float32:
        return False, "IndexFlatL2 searches fp32 only"
    if device.type == "cuda":
        import faiss
        if not hasattr(faiss, "StandardGpuResources"):
            return False, "this faiss build has no GPU support (faiss-cpu)"
    return True, ""


def _faiss_build(case, data, pass_):
    import faiss

    codebook = data["codebook"]
    if case.device.type == "cuda":
        import faiss.contrib.torch_utils  # lets GPU indexes take torch tensors
        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), case.d)
        index.add(codebook)
        zs = data["zs"]
    else:
        index = faiss.IndexFlatL2(case.d)
        index.add(codebook.numpy())
        zs = [z.numpy() for z in data["zs"]]

    def run(i):
        _, found = index.search(zs[i % len(zs)], 1)
        idx = torch.as_tensor(found[:, 0])
        return idx, codebook.index_select(0, idx.to(codebook.device))
    return run


# ---- flash-kmeans (GPU) ----------------------------------------------------------------------

def _flash_kmeans_available(device, dtype):
    if device.type != "cuda":
        return False, "flash_kmeans' assignment kernel is Triton on CUDA only"
    if importlib.util.find_spec("flash_kmeans") is None:
        return False, "flash_kmeans is not installed (pip install flash-kmeans)"
    return True, ""


def _flash_kmeans_build(case, data, pass_):
    from flash_kmeans.assign_euclid_triton import euclid_assign_triton

    codebook = data["codebook"]
    zs = [z[None] for z in data["zs"]]
    sq = [(z.float() ** 2).sum(-1) for z in zs]
    c_sq = (codebook.float() ** 2).sum(-1)[None]

    def run(i):
        j = i % len(zs)
        idx = euclid_assign_triton(zs[j], codebook[None], sq[j], c_sq=c_sq)[0].long()
        return idx, codebook.index_select(0, idx)
    return run


# ---- the number to beat ----------------------------------------------------------------------

def _gemm_build(case, data, pass_):
    e = data["codebook"]

    def run(i):
        return data["zs"][i % len(data["zs"])] @ e.t()
    return run


def _nkd(case):
    return case.n * case.k * case.d * case.itemsize


def _nk(case, copies=1):
    return copies * case.n * case.k * max(4, case.itemsize)


def _cpu_only(device, dtype):
    return (True, "") if device.type == "cpu" else (False, "the tiled path is the torch backend's CPU fallback")


def _cpu_isa_available(isa):
    def check(device, dtype):
        if device.type != "cpu":
            return False, "a CPU kernel path of vqkern._cpu"
        from vqkern.backends import torch_
        missing = torch_.cpu_isa_missing(isa)
        return (False, f"no {isa} path here: {missing}") if missing else (True, "")
    return check


def _cpu_backward_available(device, dtype):
    if device.type != "cpu":
        return False, "vqkern._cpu's backward kernel runs on CPU tensors"
    if dtype not in (torch.float32, torch.bfloat16):
        return False, "vqkern._cpu's backward takes fp32 or bf16 (fp16 is widened to fp32 first)"
    from vqkern.backends import torch_
    ok, reason = torch_.cpu_kernel()
    return ok, reason


def _cpu_backward_build(case, data, pass_):
    """The one-pass backward kernel alone (grad_z + per-code residual sums), as the
    torch backend's backward will call it: what the fused backward costs."""
    from vqkern.backends import torch_

    z, e, g = data["zs"][0], data["codebook"], data["grad"]
    idx = torch.randint(0, case.k, (case.n,), generator=torch.Generator().manual_seed(0))
    grad_z, sums = torch.empty_like(z), torch.zeros(case.k, case.d)
    scale = 2 * BETA / (case.n * case.d)

    def run(i):
        sums.zero_()
        if not torch_.cpu_backward(g, data["zs"][i % len(data["zs"])], e, idx, scale, grad_z, sums, False):
            raise RuntimeError("vqkern._cpu.backward_l2 refused the inputs")
    del z
    return run


def _fp32_only(check):
    def available(device, dtype):
        if dtype != torch.float32:
            return False, "a mode of the fp32 search (other dtypes search as vqkern-triton does)"
        return check(device, dtype)
    return available


PROVIDERS: dict[str, Provider] = {}
for _b in ("triton", "cuda", "torch"):
    PROVIDERS[f"vqkern-{_b}"] = Provider(f"vqkern-{_b}", ("forward", "backward", "train"),
                                         _vqkern_builder(_b), _vqkern_available(_b))
    PROVIDERS[f"vqkern-{_b}-det"] = Provider(
        f"vqkern-{_b}-det", ("backward", "train"), _vqkern_builder(_b, deterministic=True), _vqkern_available(_b),
        note="under torch.use_deterministic_algorithms(True): the sorted segment sum, bitwise reproducible")
PROVIDERS["vqkern-triton-tf32x3"] = Provider(
    "vqkern-triton-tf32x3", ("forward",),
    _vqkern_builder("triton", ("VQKERN_TRITON_FP32_PRECISION", "tf32x3")), _fp32_only(_vqkern_available("triton")),
    note="fp32 searched on tensor cores (three tf32 products), rows within the error bound re-searched exactly "
         "(VQKERN_TRITON_FP32_PRECISION=tf32x3): the ieee search's codes")
PROVIDERS["vqkern-torch-tiled"] = Provider(
    "vqkern-torch-tiled", ("forward",), _vqkern_builder("torch", ("VQKERN_CPU_KERNEL", "0")), _cpu_only,
    note="the torch backend's tiled PyTorch CPU path (VQKERN_CPU_KERNEL=0), what runs without vqkern._cpu")
PROVIDERS["vqkern-torch-avx2"] = Provider(
    "vqkern-torch-avx2", ("forward",), _vqkern_builder("torch", ("VQKERN_CPU_ISA", "avx2")), _cpu_isa_available("avx2"),
    note="the torch backend with vqkern._cpu forced to its AVX2 path (VQKERN_CPU_ISA=avx2), bf16 widened to fp32")
PROVIDERS["vqkern-torch-avx512"] = Provider(
    "vqkern-torch-avx512", ("forward",), _vqkern_builder("torch", ("VQKERN_CPU_ISA", "avx512")),
    _cpu_isa_available("avx512"),
    note="the torch backend with vqkern._cpu forced to its AVX-512 path: bf16 inputs widened to fp32 (as before)")
PROVIDERS["vqkern-cpu-backward"] = Provider(
    "vqkern-cpu-backward", ("backward",), _cpu_backward_build, _cpu_backward_available,
    note="vqkern._cpu.backward_l2 (bf16: backward_l2_bf16) alone (grad_z + per-code residual sums, one pass; "
         "sums fp32, zeroed per call)", searches=False)
for _p in (
    Provider("reference", ("forward", "backward", "train"), _plain_builder(_broadcast_idx),
             extra_bytes=_nkd, note="plain broadcast ((z[:,None]-E[None])**2).sum(-1).argmin()"),
    Provider("expansion", ("forward", "backward", "train"), _plain_builder(_expansion_idx),
             extra_bytes=lambda c: _nk(c, 2), note="|z|^2 - 2 z E^T + |E|^2, argmin, eager"),
    Provider("expansion-compile", ("forward",), _plain_builder(_expansion_idx, compiled=True),
             extra_bytes=lambda c: _nk(c, 1), note="the expansion under torch.compile (forward only: compile time)"),
    Provider("cdist", ("forward", "backward", "train"), _plain_builder(_cdist_idx),
             extra_bytes=lambda c: _nk(c, 1), note="torch.cdist + argmin"),
    Provider("vqpt-eval", ("forward",), _vqpt_builder(False),
             _module_available("vector_quantize_pytorch"), lambda c: _nk(c, 1),
             note="vector_quantize_pytorch.VectorQuantize, eval mode, defaults"),
    Provider("vqpt-train", ("backward", "train"), _vqpt_builder(True),
             _module_available("vector_quantize_pytorch"), lambda c: _nk(c, 2),
             note="VectorQuantize, train mode, defaults (EMA, commitment_weight=1)"),
    Provider("vqpt-train-beta", ("backward", "train"), _vqpt_builder(True, commitment_weight=BETA),
             _module_available("vector_quantize_pytorch"), lambda c: _nk(c, 2),
             note=f"VectorQuantize, train mode, commitment_weight={BETA}"),
    Provider("faiss", ("forward",), _faiss_build, _faiss_available,
             note="faiss IndexFlatL2 (GpuIndexFlatL2 on CUDA), k=1, + gather"),
    Provider("flash-kmeans", ("forward",), _flash_kmeans_build, _flash_kmeans_available,
             note="flash_kmeans euclid_assign_triton + gather"),
    Provider("gemm", ("forward",), _gemm_build, extra_bytes=lambda c: c.n * c.k * c.itemsize,
             note="bare z @ E.T writing N x K: the number to beat", searches=False),
):
    PROVIDERS[_p.name] = _p
