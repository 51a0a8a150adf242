"""The Triton int8 kernel against plain PyTorch: on the GPU when there is one, and everywhere through
Triton's CPU interpreter (in a subprocess, since the interpreter is chosen when triton is imported)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bminf.kernels import int8_linear, triton_attention, triton_int8
from bminf.quantization import quantize_weight

# (rows, out_features, in_features): decode and small batches, odd sizes that leave partial tiles
# (one row takes the GEMV kernel, more the split-K tensor-core one)
SHAPES = [(1, 96, 80), (2, 70, 600), (3, 33, 130), (4, 128, 1030), (5, 130, 200), (16, 64, 256), (40, 300, 130),
          (64, 128, 64)]

def run_check(check: str, device: str, **env):
    """Run a check script in a fresh Python (Triton's interpreter is chosen when triton is imported:
    ``TRITON_INTERPRET="1"`` for the CPU) and return the value it prints after ``worst``."""
    out = subprocess.run([sys.executable, "-c", check.format(shapes=SHAPES, device=device)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.split("worst")[1])  # a number or a dict literal


INTERPRETER = dict(TRITON_INTERPRET="1")


CHECK = """
import torch, torch.nn.functional as F
from bminf.kernels import triton_int8
from bminf.quantization import quantize_weight
torch.manual_seed(0)
worst = 0.0
for m, n, k in {shapes}:
    for bias in (False, True):
        q, s = quantize_weight(torch.randn(n, k))
        x = torch.randn(m, k).half()
        b = torch.randn(n).half() if bias else None
        y = triton_int8.int8_linear(x.to("{device}"), q.to("{device}"), s.to("{device}"), None if b is None else b.to("{device}"))
        ref = F.linear(x.double(), q.double() * s.double()[:, None], None if b is None else b.double())
        assert y.shape == (m, n) and y.dtype == torch.float16, (y.shape, y.dtype)
        worst = max(worst, float((y.cpu().double() - ref).abs().max() / ref.abs().max()))
print("worst", worst)
"""


@pytest.mark.skipif(not triton_int8.available(), reason="needs triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the compiled kernel instead")
def test_triton_kernel_in_the_interpreter():
    assert run_check(CHECK, "cpu", **INTERPRETER) < 1e-3  # fp16 output rounding, fp32 accumulation


@pytest.mark.gpu
@pytest.mark.parametrize("widen", ["cvt", "prmt"])
def test_triton_kernel_on_gpu(widen):
    if not triton_int8.available():
        pytest.skip("needs triton")
    assert run_check(CHECK, "cuda", BMINF_GEMV_WIDEN=widen) < 1e-3


@pytest.mark.gpu
def test_dispatch_picks_triton_for_decode_and_cublas_for_long_inputs(monkeypatch):
    calls = []
    real = triton_int8.int8_linear
    monkeypatch.setattr(triton_int8, "int8_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(triton_int8, "MIN_NUMEL", 0)
    q, s = quantize_weight(torch.randn(256, 512))
    q, s = q.cuda(), s.cuda()
    for rows, expect in [(1, 1), (triton_int8.MAX_ROWS, 1), (triton_int8.MAX_ROWS + 1, 0)]:
        calls.clear()
        x = torch.randn(rows, 512, device="cuda", dtype=torch.float16)
        y = int8_linear(x, q, s)
        ref = F.linear(x.double(), q.double() * s.double()[:, None])
        assert len(calls) == expect
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < 2e-3


@pytest.mark.gpu
def test_triton_path_gives_input_and_bias_gradients(monkeypatch):
    monkeypatch.setattr(triton_int8, "MIN_NUMEL", 0)
    q, s = quantize_weight(torch.randn(96, 128))
    q, s = q.cuda(), s.cuda()
    bias = torch.randn(96, device="cuda", dtype=torch.float16, requires_grad=True)
    x = torch.randn(3, 128, device="cuda", dtype=torch.float16, requires_grad=True)
    int8_linear(x, q, s, bias).float().square().sum().backward()
    x_ref = x.detach().double().requires_grad_()
    b_ref = bias.detach().double().requires_grad_()
    F.linear(x_ref, q.double() * s.double()[:, None], b_ref).square().sum().backward()
    assert torch.allclose(x.grad.double(), x_ref.grad, rtol=2e-2, atol=2e-2 * float(x_ref.grad.abs().max()))
    assert torch.allclose(bias.grad.double(), b_ref.grad, rtol=2e-2, atol=2e-2 * float(b_ref.grad.abs().max()))


def test_matmul_config_splits_k_into_enough_programs(monkeypatch):
    # the split-K matmul's tiles and splits on a 132-multiprocessor GPU (an H200): the splits measured
    # best on CPM-2's shapes (h200_run51_splitk.log, h200_run63.log), and the rule's bounds everywhere
    from bminf.kernels import triton_gemv
    monkeypatch.setattr(triton_gemv, "multiprocessors", lambda device: 132)
    gpu = torch.device("cuda")
    assert triton_int8.matmul_config(32, 10240, 4096, 1, gpu) == (32, 64, 128, 4)
    assert triton_int8.matmul_config(16, 4096, 4096, 1, gpu) == (16, 32, 256, 4)
    assert triton_int8.matmul_config(16, 10240, 4096, 1, gpu) == (16, 32, 256, 2)
    assert triton_int8.matmul_config(64, 4096, 4096, 3, gpu) == (32, 128, 128, 2)  # h200_run63.log
    assert triton_int8.matmul_config(64, 4096, 10240, 1, gpu) == (32, 128, 128, 8)
    for m in (3, 16, 17, 32, 33, 64):
        for n, k in [(4096, 4096), (10240, 4096), (4096, 10240), (2048, 2048), (96, 130)]:
            for group in (1, 2, 3):
                block_m, block_n, block_k, split = triton_int8.matmul_config(m, n, k, group, gpu)
                row_tiles = -(-m // block_m)
                assert row_tiles == (1 if m <= 32 else 2) and split in (1, 2, 4, 8, 16)
                programs = group * -(-n // block_n) * row_tiles
                if split > 1:  # split only while programs stay within five per multiprocessor,
                    assert programs * split <= 5 * 132  # each split at least four K tiles
                    assert k // split >= 4 * block_k


def test_tile_counts_are_kept_per_stream_and_never_freed_while_in_use(monkeypatch):
    # the split-K matmul's per-tile counts: one zeroed set per (device, stream), reused by every launch
    # there; an outgrown set stays referenced, since a captured CUDA graph may still use its address
    monkeypatch.setattr(triton_int8, "_TICKETS", {})
    monkeypatch.setattr(triton_int8, "_RETIRED", [])
    cpu = torch.device("cpu")
    first = triton_int8.tickets(cpu, 8)
    assert first.dtype == torch.int32 and first.numel() >= 8 and not first.any()
    assert triton_int8.tickets(cpu, first.numel()) is first
    bigger = triton_int8.tickets(cpu, first.numel() + 1)
    assert bigger.numel() > first.numel() and not bigger.any()
    assert triton_int8.tickets(cpu, 8) is bigger and triton_int8._RETIRED == [first]


def test_portable_path_is_used_off_gpu():
    q, s = quantize_weight(torch.randn(8, 16))
    x = torch.randn(2, 16)
    assert not triton_int8.supports(x, q)
    assert torch.allclose(int8_linear(x, q, s), F.linear(x, q.float() * s.float()[:, None]), atol=1e-6)


NORM_CHECK = """
import torch
from bminf.kernels import triton_norm
torch.manual_seed(0)
worst = 0.0
for d in (64, 100, 4096):
    w = torch.randn(d)
    x = (torch.randn(3, 5, d) * 3).half().to("{device}").requires_grad_()
    wd = w.to("{device}").requires_grad_()
    y = triton_norm.rms_norm(x, wd, 1e-6)
    ref = triton_norm.reference(x, wd, 1e-6)
    assert y.shape == ref.shape and y.dtype == torch.float16
    worst = max(worst, float((y.float() - ref.float()).abs().max() / ref.float().abs().max()))
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, wd), g)
    rx, rw = torch.autograd.grad(ref, (x, wd), g)
    assert torch.equal(gx, rx) and torch.equal(gw, rw)  # backward is the PyTorch formula's
# GPT's LayerNorm, alone and with the residual add before it
for d in (64, 100, 2560):
    x, h = ((torch.randn(3, 5, d) * 3).half().to("{device}").requires_grad_() for _ in range(2))
    w, b = (torch.randn(d).half().to("{device}").requires_grad_() for _ in range(2))
    y = triton_norm.layer_norm(x, w, b, 1e-5)
    ref = torch.nn.functional.layer_norm(x.float(), (d,), w.float(), b.float(), 1e-5)
    assert y.dtype == torch.float16
    worst = max(worst, float((y.float() - ref).abs().max() / ref.abs().max()))
    s, y = triton_norm.layer_norm(x, w, b, 1e-5, h)
    s_ref, y_ref = triton_norm.layer_norm_reference(x, h, w, b, 1e-5)
    assert torch.equal(s, s_ref), "the residual sum differs"
    worst = max(worst, float((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()))
    g = torch.randn_like(y)
    got = torch.autograd.grad((s, y), (x, h, w, b), (g, g))
    want = torch.autograd.grad((s_ref, y_ref), (x, h, w, b), (g, g))
    assert all(torch.equal(a, c) for a, c in zip(got, want))  # backward is F.layer_norm's
    # the kernels' autograd functions themselves (the public calls take them on CUDA only): without
    # the add, and T5's residual step with its norm and without; backward is the PyTorch formula's
    y = triton_norm._LayerNorm.apply(x, None, w, b, 1e-5)
    y_ref = triton_norm.layer_norm_reference(x, None, w, b, 1e-5)
    got, want = (torch.autograd.grad(t, (x, w, b), g) for t in (y, y_ref))
    assert all(torch.equal(a, c) for a, c in zip(got, want))
    wr = torch.rand(d).half().to("{device}").requires_grad_()
    for weight in (wr, None):
        out = triton_norm._Residual.apply(x, h, weight, 1e-6)
        s_ref, y_ref = triton_norm._residual_reference(x, h, weight, 1e-6)
        outs, refs = ((out,), (s_ref,)) if weight is None else (out, (s_ref, y_ref))
        inputs = (x, h) if weight is None else (x, h, weight)
        got = torch.autograd.grad(outs, inputs, [g] * len(outs))
        want = torch.autograd.grad(refs, inputs, [g] * len(refs))
        assert all(torch.equal(a, c) for a, c in zip(got, want))
print("worst", worst)
"""


@pytest.mark.skipif(not triton_int8.available(), reason="needs triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the compiled kernel instead")
def test_rms_norm_kernel_in_the_interpreter():
    assert run_check(NORM_CHECK, "cpu", **INTERPRETER) < 1e-3  # one fp16 rounding step at most


@pytest.mark.gpu
def test_rms_norm_kernel_on_gpu():
    assert run_check(NORM_CHECK, "cuda") < 1e-3


def test_w8a8_path_is_opt_in_and_close(monkeypatch):
    from bminf.kernels import w8a8
    q, s = quantize_weight(torch.randn(64, 256))
    x = torch.randn(40, 256)
    ref = F.linear(x.double(), q.double() * s.double()[:, None])
    assert not w8a8.supports(x, q)  # off by default
    monkeypatch.setenv("BMINF_PREFILL", "w8a8")
    assert w8a8.supports(x, q) and not w8a8.supports(x[:16], q)  # _int_mm needs 17+ rows
    bias = torch.randn(64)
    y = int8_linear(x, q, s, bias)
    assert y.shape == (40, 64) and y.dtype == x.dtype
    err = float((y.double() - ref - bias.double()).abs().max() / ref.abs().max())
    assert 0 < err < 0.02  # activations rounded to int8: visible but small
    monkeypatch.setenv("BMINF_PREFILL", "int4")
    with pytest.raises(ValueError, match="BMINF_PREFILL"):
        int8_linear(x, q, s)


@pytest.mark.gpu
def test_w8a8_on_gpu(monkeypatch):
    monkeypatch.setenv("BMINF_PREFILL", "w8a8")
    q, s = quantize_weight(torch.randn(256, 512))
    x = torch.randn(100, 512, dtype=torch.float16)
    ref = F.linear(x.double(), q.double() * s.double()[:, None])
    y = int8_linear(x.cuda(), q.cuda(), s.cuda())
    assert float((y.cpu().double() - ref).abs().max() / ref.abs().max()) < 0.02


# one launch for several linears (q/k/v; T5's two feed-forward inputs) and T5's residual
# step, against the PyTorch ops they replace
FUSED_CHECK = """
import torch, torch.nn.functional as F
from bminf.kernels import triton_gemv, triton_norm
from bminf.quantization import quantize_weight
torch.manual_seed(0)
dev = "{device}"
worst = dict(many=0.0, norm=0.0, gelu=0.0, gated=0.0, add=0.0)
def err(y, ref):  # a NaN anywhere counts as infinitely wrong (max() would pass over it)
    e = float((y.cpu().double() - ref.cpu().double()).abs().max() / ref.cpu().double().abs().max())
    return e if e == e else float("inf")
# the split-K matmul (2-64 rows) splits K as it would on a GPU of 132 multiprocessors: 2-3 splits here,
# some with a short last stretch of K (2100 = 1024 + 1024 + 52)
from bminf.kernels import triton_int8
triton_gemv.multiprocessors = lambda device: 132
for m, n, k in [(1, 96, 80), (2, 70, 600), (3, 33, 130), (4, 128, 1030), (5, 70, 2100), (17, 64, 1030), (40, 33, 1100)]:
    ws = [quantize_weight(torch.randn(n, k)) for _ in range(3)]
    x = torch.randn(m, k).half()
    bs = [torch.randn(n).half() for _ in range(3)]
    for bias in (bs, None):
        ys = triton_int8.int8_linear_many(x.to(dev), [q.to(dev) for q, _ in ws], [s.to(dev) for _, s in ws],
                                          None if bias is None else [b.to(dev) for b in bias])
        if m <= triton_int8.GEMV_ROWS:  # the GEMV's own entry point gives the same
            assert all(torch.equal(a, b) for a, b in zip(ys, triton_gemv.int8_gemv_many(
                x.to(dev), [q.to(dev) for q, _ in ws], [s.to(dev) for _, s in ws],
                None if bias is None else [b.to(dev) for b in bias])))
        for (q, s), b, y in zip(ws, bias or [None] * 3, ys):
            assert y.shape == (m, n) and y.dtype == torch.float16
            ref = F.linear(x.double(), q.double() * s.double()[:, None], None if b is None else b.double())
            worst["many"] = max(worst["many"], err(y, ref))
        # each tile's last program to finish adds its splits' sums: the counts are back at zero after a
        # launch, so the next one finishes every tile again, with the same numbers
        again = triton_int8.int8_linear_many(x.to(dev), [q.to(dev) for q, _ in ws], [s.to(dev) for _, s in ws],
                                             None if bias is None else [b.to(dev) for b in bias])
        assert all(torch.equal(a, b) for a, b in zip(ys, again)), "a second launch differs"
assert all(int(t.abs().sum()) == 0 for t in triton_int8._TICKETS.values()), "a tile's count was left set"
for d in (96, 1000, 4096):
    x = (torch.randn(5, d) * 100).half()
    h = (torch.randn(5, d) * 100).half()
    x[1, 3], h[1, 3] = 65000, 65000  # row 1 overflows fp16
    w = torch.rand(d).half() + 0.5
    s_ref = x + h
    s_ref[1] = s_ref[1].clamp(-triton_norm.FP16_CLAMP, triton_norm.FP16_CLAMP)  # only the row with an inf
    y_ref = triton_norm.reference(s_ref, w, 1e-6)
    s, y = triton_norm.residual(x.to(dev), h.to(dev), w.to(dev), 1e-6)
    assert torch.equal(s.cpu(), s_ref), "the clamped sum differs"
    assert float(s[1].abs().max()) == triton_norm.FP16_CLAMP and float(s[0].abs().max()) < 1000
    worst["norm"] = max(worst["norm"], err(y, y_ref))
    s2, none = triton_norm.residual(x.to(dev), h.to(dev))
    assert none is None and torch.equal(s2.cpu(), s_ref)
# the GEMV's epilogues (GPT's GELU, T5's gated GELU, a residual add) against the unfused ops in float64
for m, n, k in [(1, 96, 80), (3, 70, 600), (4, 33, 130), (1, 64, 1024), (6, 70, 2100), (33, 96, 1030)]:
    (qa, sa), (qg, sg) = quantize_weight(torch.randn(n, k) / 10), quantize_weight(torch.randn(n, k) / 10)
    x, b, r = torch.randn(m, k).half(), torch.randn(n).half(), torch.randn(m, n).half()
    def lin(q, s, b=None):
        return F.linear(x.double(), q.double() * s.double()[:, None], None if b is None else b.double())
    gemv = m <= triton_gemv.MAX_ROWS  # then the GEMV's own entry points, else the matmul's
    gelu, gated, add = ((triton_gemv.int8_gemv_gelu, triton_gemv.int8_gemv_gated, triton_gemv.int8_gemv_add) if gemv
                        else (triton_int8.int8_linear_gelu, triton_int8.int8_linear_gated, triton_int8.int8_linear_add))
    y = gelu(x.to(dev), qa.to(dev), sa.to(dev), b.to(dev))
    worst["gelu"] = max(worst["gelu"], err(y, F.gelu(lin(qa, sa, b), approximate="tanh")))
    y = gated(x.to(dev), qa.to(dev), sa.to(dev), qg.to(dev), sg.to(dev))
    worst["gated"] = max(worst["gated"], err(y, F.gelu(lin(qa, sa), approximate="tanh") * lin(qg, sg)))
    y = add(x.to(dev), qa.to(dev), sa.to(dev), b.to(dev), r.to(dev))
    assert y.shape == (m, n) and y.dtype == torch.float16
    worst["add"] = max(worst["add"], err(y, r.double() + lin(qa, sa, b)))
# the prefill path's dequantization: bit for bit torch's int8 * 16-bit product
for n, k in [(5, 700), (40, 1030)]:
    q, s = quantize_weight(torch.randn(n, k) * 100)
    w = triton_int8.dequantize(q.to(dev), s.to(dev), torch.float16)
    assert w.dtype == torch.float16 and torch.equal(w.cpu(), q * s.half()[:, None]), "dequantize differs"
print("worst", worst)
"""


def _fused_worst(worst):
    assert worst["many"] < 1e-3, worst  # fp16 output rounding
    assert max(worst["gelu"], worst["gated"], worst["add"]) < 2e-3, worst  # two or three fp16 roundings
    assert worst["norm"] < 1e-3, worst  # one fp16 rounding step at most


@pytest.mark.skipif(not triton_int8.available(), reason="needs triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the compiled kernels instead")
def test_fused_kernels_in_the_interpreter():
    _fused_worst(run_check(FUSED_CHECK, "cpu", **INTERPRETER))


@pytest.mark.gpu
@pytest.mark.parametrize("widen", ["cvt", "prmt"])
def test_fused_kernels_on_gpu(widen):
    _fused_worst(run_check(FUSED_CHECK, "cuda", BMINF_GEMV_WIDEN=widen))


def test_gemv_widen_setting_is_checked(monkeypatch):
    from bminf.kernels import triton_gemv
    triton_gemv.widen_by_permute.cache_clear()
    monkeypatch.setenv("BMINF_GEMV_WIDEN", "fast")
    with pytest.raises(ValueError, match="BMINF_GEMV_WIDEN must be 'cvt' or 'prmt', got 'fast'"):
        triton_gemv.widen_by_permute()
    monkeypatch.setenv("BMINF_GEMV_WIDEN", "prmt")
    triton_gemv.widen_by_permute.cache_clear()
    assert triton_gemv.widen_by_permute()
    triton_gemv.widen_by_permute.cache_clear()


def test_fused_entry_points_fall_back_off_gpu():
    from bminf.kernels import int8_gated_gelu, int8_linear_group
    from bminf.quantization import QuantizedLinear
    torch.manual_seed(0)
    lins = [QuantizedLinear(torch.nn.Linear(16, 8)) for _ in range(3)]
    x = torch.randn(2, 16)
    for y, lin in zip(int8_linear_group(x, lins), lins):
        assert torch.equal(y, lin(x))
    a, g = (QuantizedLinear(torch.nn.Linear(16, 8, bias=False)) for _ in range(2))
    assert torch.equal(int8_gated_gelu(x, a, g), F.gelu(a(x), approximate="tanh") * g(x))


@pytest.mark.gpu
def test_fused_epilogues_are_picked_for_decode_and_give_gradients(monkeypatch):
    from bminf.kernels import int8_gated_gelu, int8_linear_add, int8_linear_gelu
    monkeypatch.setattr(triton_int8, "MIN_NUMEL", 0)  # these weights are below the kernel's size floor
    from bminf.quantization import QuantizedLinear
    torch.manual_seed(0)
    a, g = (QuantizedLinear(torch.nn.Linear(256, 96, bias=False)).cuda().half() for _ in range(2))
    lin = QuantizedLinear(torch.nn.Linear(256, 96)).cuda().half()
    # one row: the GEMV, 2-64 the split-K matmul, more than 64 the modules and torch ops
    for rows, fused in [(1, True), (4, True), (5, True), (40, True), (triton_int8.MAX_ROWS + 1, False)]:
        x = torch.randn(rows, 256, device="cuda", dtype=torch.float16, requires_grad=True)
        r = torch.randn(rows, 96, device="cuda", dtype=torch.float16, requires_grad=True)
        for got, want in [(int8_gated_gelu(x, a, g), F.gelu(a(x), approximate="tanh") * g(x)),
                          (int8_linear_gelu(x, lin), F.gelu(lin(x), approximate="tanh")),
                          (int8_linear_add(x, lin, r), r + lin(x))]:
            # fused: the same fp16 roundings as the torch ops, the GELU's tanh within an ulp of theirs
            assert (got.grad_fn.name() == "_EpilogueBackward") == fused
            assert torch.allclose(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
            grads = torch.autograd.grad(got.float().square().sum(), (x, r), allow_unused=True)
            wants = torch.autograd.grad(want.float().square().sum(), (x, r), allow_unused=True)
            for gr, wa in zip(grads, wants):
                assert (gr is None) == (wa is None)
                if gr is not None:
                    assert torch.allclose(gr, wa, rtol=2e-2, atol=2e-2 * float(wa.abs().max()))


def test_fused_epilogue_gradients_come_from_the_formula_without_a_bias_too():
    # the autograd plumbing of the fused GEMVs, on the CPU: a stand-in "kernel" (the formula without
    # autograd) forward, gradients from the formula recomputed, a missing bias passed through as None
    from bminf import kernels
    torch.manual_seed(0)
    q, s = quantize_weight(torch.randn(6, 8))
    x = torch.randn(2, 8, requires_grad=True)
    r = torch.randn(2, 6, requires_grad=True)
    for formula, inputs in [(kernels._gelu_formula, (x, q, s, None)), (kernels._add_formula, (x, q, s, None, r))]:
        def kernel(*t, formula=formula):
            with torch.no_grad():
                return formula(*t)
        y = kernels._fused(kernel, formula, *inputs)
        assert y.grad_fn.name() == "_EpilogueBackward"
        got = torch.autograd.grad(y.square().sum(), [t for t in inputs if t is not None and t.requires_grad])
        want = torch.autograd.grad(formula(*inputs).square().sum(),
                                   [t for t in inputs if t is not None and t.requires_grad])
        assert all(torch.allclose(a, b) for a, b in zip(got, want))


def test_gemv_table_file_is_read_and_checked(monkeypatch, tmp_path):
    from bminf.kernels import triton_gemv
    cpu = torch.device("cpu")
    good = tmp_path / "table.json"
    good.write_text('{"96x80": [16, 64, 4], "4096x4096": [8, 256, 8, 3], "96x80x2": [4, 64, 2, 1]}')
    try:
        monkeypatch.setenv("BMINF_GEMV_TABLE", str(good))
        triton_gemv._table.cache_clear()
        assert triton_gemv.config(1, 96, 80, cpu) == (1, 16, 64, 4, 2)  # three numbers: two stages
        assert triton_gemv.config(1, 4096, 4096, cpu) == (1, 8, 256, 8, 3)
        assert triton_gemv.config(1, 96, 80, cpu, weights=2) == (1, 4, 64, 2, 1)  # the gated GELU's tiles
        for bad in (tmp_path / "missing.json", tmp_path / "bad.json"):
            if bad.name == "bad.json":
                bad.write_text('{"96x80": [16, 64]}')
            monkeypatch.setenv("BMINF_GEMV_TABLE", str(bad))
            triton_gemv._table.cache_clear()
            with pytest.raises(ValueError, match=r"BMINF_GEMV_TABLE=.*expected a JSON file"):
                triton_gemv.config(1, 96, 80, cpu)
    finally:
        triton_gemv._table.cache_clear()


@pytest.mark.skipif(not triton_int8.available(), reason="needs triton")
def test_gluon_gemv_is_picked_only_where_it_was_measured(monkeypatch):
    from bminf.kernels import gluon_gemv, triton_gemv
    cpu = torch.device("cpu")
    x = torch.randn(1, 10240, dtype=torch.float16)
    w = torch.zeros(4096, 10240, dtype=torch.int8)
    gluon_gemv.usable.cache_clear()
    try:
        assert not gluon_gemv.usable(cpu) and gluon_gemv.tiles(x, w) is None
        monkeypatch.setenv("BMINF_GEMV_GLUON", "yes")
        gluon_gemv.usable.cache_clear()
        with pytest.raises(ValueError, match="BMINF_GEMV_GLUON must be '0' or '1', got 'yes'"):
            gluon_gemv.usable(cpu)
    finally:
        gluon_gemv.usable.cache_clear()
    # where it can run: one row of a shape in its table, and in triton_gemv one weight, with or without a bias,
    # plain or with the GELU or residual-add epilogue
    monkeypatch.setattr(gluon_gemv, "usable", lambda device: True)
    assert gluon_gemv.tiles(x, w) == gluon_gemv.TABLE[(4096, 10240)]
    assert gluon_gemv.tiles(x.expand(2, -1), w) is None  # two rows
    assert gluon_gemv.tiles(x[:, :4096], w[:, :4096].contiguous()) is None  # a shape not in the table
    unaligned = torch.zeros(4096 * 10240 + 1, dtype=torch.int8)[1:].view(4096, 10240)
    assert gluon_gemv.tiles(x, unaligned) is None  # cp.async's 16 bytes: a weight off the 16-byte grid
    with pytest.raises(ValueError, match="16-byte boundary"):
        gluon_gemv.int8_gemv(x, unaligned, torch.ones(4096), torch.empty(1, 4096), gluon_gemv.TABLE[(4096, 10240)])
    calls = []
    monkeypatch.setattr(gluon_gemv, "int8_gemv", lambda x2, w, s, out, tile, bias, epilogue, residual: calls.append(
        ("gluon", tile, bias is not None, epilogue, residual is not None)))
    monkeypatch.setattr(triton_gemv, "launch", lambda kernel, grid, *a, **kw: calls.append(("triton",)))
    monkeypatch.setattr(triton_gemv, "widen_by_permute", lambda: True)
    s, b = torch.ones(4096, dtype=torch.float16), torch.zeros(4096, dtype=torch.float16)
    assert triton_gemv.int8_gemv(x, w, s).shape == (1, 4096)
    triton_gemv.int8_gemv(x, w, s, b)
    triton_gemv.int8_gemv_add(x, w, s, b, torch.zeros(1, 4096, dtype=torch.float16))
    triton_gemv.int8_gemv_gelu(x, w, s)
    triton_gemv.int8_gemv(x, w, s, tiles=(2, 2048, 2))  # tiles asked for: the Triton GEMV
    triton_gemv.int8_gemv_many(x, [w, w], [s, s])  # two weights in one launch: the Triton GEMV
    triton_gemv.int8_gemv_gated(x, w, s, w, s)  # two weights read by each program: the Triton GEMV
    tile = gluon_gemv.TABLE[(4096, 10240)]
    assert calls == [("gluon", tile, False, triton_gemv.PLAIN, False), ("gluon", tile, True, triton_gemv.PLAIN, False),
                     ("gluon", tile, True, triton_gemv.ADD, True), ("gluon", tile, False, triton_gemv.GELU, False)] + \
        [("triton",)] * 3


@pytest.mark.gpu
def test_gluon_gemv_on_gpu(monkeypatch):
    from bminf.kernels import dependent_launch, gluon_gemv, triton_gemv
    dev = torch.device("cuda")
    if not (gluon_gemv.usable(dev) and triton_gemv.widen_by_permute()):
        pytest.skip("the Gluon GEMV runs with Triton " + "/".join(gluon_gemv.TRITONS) + " on Hopper only")
    torch.manual_seed(0)
    launched, real = [], gluon_gemv.int8_gemv
    monkeypatch.setattr(gluon_gemv, "int8_gemv", lambda *a: launched.append(a[4]) or real(*a))
    for (n, k), tile in [((4096, 10240), None), ((256, 2048), (8, 256, 3, 4)), ((64, 512), (4, 512, 2, 2))]:
        q, s = (t.to(dev) for t in quantize_weight(torch.randn(n, k)))
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        want = F.linear(x.double(), q.double() * s.double()[:, None])
        if tile is None:  # the product's route: int8_linear takes it for this shape
            got = triton_int8.int8_linear(x, q, s)
            assert launched == [gluon_gemv.TABLE[(n, k)]]
        else:
            got = torch.empty(1, n, device=dev, dtype=torch.float16)
            gluon_gemv.int8_gemv(x, q, s, got, tile)
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-3
        # in a CUDA graph as a decode step launches it: right after a Triton kernel, under PDL; the same bits
        qx, sx = (t.to(dev) for t in quantize_weight(torch.randn(k, 256)))
        x0 = torch.randn(1, 256, device=dev, dtype=torch.float16)
        with dependent_launch.within_a_step():
            def step():
                out = torch.empty(1, n, device=dev, dtype=torch.float16)
                gluon_gemv.int8_gemv(triton_gemv.int8_gemv(x0, qx, sx), q, s, out, tile or gluon_gemv.TABLE[(n, k)])
                return out
            eager = step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = step()
            graph.replay()
        assert torch.equal(captured, eager)
    with pytest.raises(ValueError, match="do not divide"):
        gluon_gemv.int8_gemv(x, q, s, got, (5, 512, 2, 2))
    # the epilogues, each against the formula in float64 and the Triton GEMV's numbers; CPM-1's attention
    # output (bias and residual add) through the product's route
    launched.clear()
    for (n, k), tile, epilogue in [((2560, 2560), None, triton_gemv.ADD), ((512, 1024), (8, 512, 2, 4), triton_gemv.GELU),
                                   ((256, 2048), (4, 256, 3, 4), triton_gemv.PLAIN)]:
        q, s = (t.to(dev) for t in quantize_weight(torch.randn(n, k)))
        b = torch.randn(n, device=dev, dtype=torch.float16)
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        r = torch.randn(1, n, device=dev, dtype=torch.float16) if epilogue == triton_gemv.ADD else None
        want = F.linear(x.double(), q.double() * s.double()[:, None], b.double())
        want = F.gelu(want, approximate="tanh") if epilogue == triton_gemv.GELU else want if r is None else want + r.double()
        triton_tile = triton_gemv.config(1, n, k, dev)[1:]
        triton_out = triton_gemv._launch(x, [q], [s], [b], triton_tile, epilogue, r)[0]
        if tile is None:
            got = triton_int8.int8_linear_add(x, q, s, b, r)
            assert launched == [gluon_gemv.TABLE[(n, k)]]
        else:
            got = torch.empty(1, n, device=dev, dtype=torch.float16)
            gluon_gemv.int8_gemv(x, q, s, got, tile, b, epilogue, r)
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-3
        assert float((got.float() - triton_out.float()).abs().max() / triton_out.float().abs().max()) < 1e-3
    with pytest.raises(ValueError, match="epilogue 3 without a residual"):
        gluon_gemv.int8_gemv(x, q, s, got, (4, 256, 3, 4), None, triton_gemv.ADD)


# attention for one query row, and a graphed step's store-and-attend, against the formula in float64
ATTENTION_CHECK = """
import torch
from bminf.kernels import triton_attention
torch.manual_seed(0)
dev = "{device}"
worst = 0.0
def formula(q, k, v, bias, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale + bias.double()
    return s.softmax(-1) @ v.double()
def err(y, ref):  # a NaN anywhere counts as infinitely wrong (max() would pass over it)
    e = float((y.cpu().double() - ref.cpu().double()).abs().max() / ref.cpu().double().abs().max())
    return e if e == e else float("inf")
for b, h, d, t, scale in [(1, 4, 64, 64, 1.0), (2, 3, 80, 200, 80 ** -0.5), (3, 2, 16, 300, 0.25)]:
    q, k, v = (torch.randn(b, h, n, d).half() for n in (1, t, t))
    pos_bias = torch.randn(1, h, 1, t)
    allowed = torch.rand(b, 1, 1, t) > 0.3
    allowed[..., 0] = True
    for bias in (pos_bias + torch.where(allowed, 0.0, -30000.0), torch.where(allowed, 0.0, -30000.0)):
        bias = bias.half()
        # keys split across 1, 2 and 5 programs (and the choice by splits_for), partial splits included
        for splits in (None, 1, 2, 5):
            y = triton_attention.attend_one(q.to(dev), k.to(dev), v.to(dev), bias.to(dev), scale, splits=splits)
            assert y.shape == (b, h, 1, d) and y.dtype == torch.float16
            worst = max(worst, err(y, formula(q, k, v, bias, scale)))
    # the graphed step: store the new key/value at pos, attend over the first `length` positions, of
    # which those after pos are masked (with 5 splits the last holds no key up to pos)
    length, pos = t - 7, t - 9 - t // 4
    after = torch.arange(length) > pos
    step_bias = bias[..., :length].masked_fill(after, -30000.0)
    for splits, read_back in ((None, None), (1, False), (1, True), (5, False), (5, True)):
        kc, vc = k.clone(), v.clone()
        kc[:, :, pos + 1:], vc[:, :, pos + 1:] = float("nan"), float("nan")  # never read: NaN would show
        kc, vc = kc.to(dev), vc.to(dev)
        kn, vn = torch.randn(b, h, 1, d).half(), torch.randn(b, h, 1, d).half()
        y = triton_attention.attend_and_store(q.to(dev), kc, vc, step_bias.to(dev), scale, length,
                                              kn.to(dev), vn.to(dev), torch.tensor([pos], device=dev), splits=splits,
                                              read_back=read_back)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, pos], v2[:, :, pos] = kn[:, :, 0], vn[:, :, 0]
        assert torch.equal(kc[:, :, :pos + 1].cpu(), k2[:, :, :pos + 1]), "the cache was not written at pos alone"
        assert torch.equal(vc[:, :, :pos + 1].cpu(), v2[:, :, :pos + 1]), "the cache was not written at pos alone"
        assert kc[:, :, pos + 1:].isnan().all() and vc[:, :, pos + 1:].isnan().all(), "written after pos"
        worst = max(worst, err(y, formula(q, k2[:, :, :length], v2[:, :, :length], step_bias, scale)))
    # each row at its own position (a server's rows): row r stores at, and attends up to, pos - 3 r
    rows_pos = torch.tensor([pos - 3 * r for r in range(b)])
    row_bias = bias[..., :length].masked_fill((torch.arange(length) > rows_pos[:, None])[:, None, None, :], -30000.0)
    for splits, read_back in ((None, None), (5, False), (5, True)):
        kc, vc = k.clone(), v.clone()
        for r, p in enumerate(rows_pos.tolist()):
            kc[r, :, p + 1:], vc[r, :, p + 1:] = float("nan"), float("nan")
        kc, vc = kc.to(dev), vc.to(dev)
        kn, vn = torch.randn(b, h, 1, d).half(), torch.randn(b, h, 1, d).half()
        y = triton_attention.attend_and_store(q.to(dev), kc, vc, row_bias.to(dev), scale, length, kn.to(dev),
                                              vn.to(dev), rows_pos.to(dev), splits=splits, read_back=read_back)
        k2, v2 = k.clone(), v.clone()
        for r, p in enumerate(rows_pos.tolist()):
            k2[r, :, p], v2[r, :, p] = kn[r, :, 0], vn[r, :, 0]
            assert torch.equal(kc[r, :, :p + 1].cpu(), k2[r, :, :p + 1]), "a row was not written at its pos alone"
            assert torch.equal(vc[r, :, :p + 1].cpu(), v2[r, :, :p + 1]), "a row was not written at its pos alone"
            assert kc[r, :, p + 1:].isnan().all() and vc[r, :, p + 1:].isnan().all(), "written after a row's pos"
        worst = max(worst, err(y, formula(q, k2[:, :, :length], v2[:, :, :length], row_bias, scale)))
# gradients come from PyTorch's attention, recomputed
q, k, v = (torch.randn(2, 3, n, 32, dtype=torch.half, device=dev, requires_grad=True) for n in (1, 50, 50))
bias = torch.zeros(2, 1, 1, 50, dtype=torch.half, device=dev)
g = torch.randn(2, 3, 1, 32, dtype=torch.half, device=dev)
got = torch.autograd.grad(triton_attention.attend_one(q, k, v, bias, 0.5), (q, k, v), g)
want = torch.autograd.grad(triton_attention.reference(q, k, v, bias, 0.5), (q, k, v), g)
assert all(torch.equal(a, w) for a, w in zip(got, want))
print("worst", worst)
"""


@pytest.mark.skipif(not triton_int8.available(), reason="needs triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the compiled kernel instead")
def test_decode_attention_kernel_in_the_interpreter():
    assert run_check(ATTENTION_CHECK, "cpu", **INTERPRETER) < 2e-3  # fp16 inputs and output rounding


@pytest.mark.gpu
def test_decode_attention_kernel_on_gpu():
    assert run_check(ATTENTION_CHECK, "cuda") < 2e-3


STEP_BIAS_CHECK = """
import torch
from bminf.kernels import triton_attention
from bminf.layers import additive_mask
from bminf.layers.position_bias import RelativePositionBias, relative_position_bucket
torch.manual_seed(0)
dev = "{device}"
worst = 0
# (batch, heads (1: GPT's mask alone), cache length, keys attended, source length (0: none), a position per row)
for batch, heads, t, length, source, per_row in ((1, 6, 80, 70, 33, False), (3, 5, 300, 256, 130, True),
                                                 (2, 1, 64, 64, 0, False), (4, 3, 40, 17, 65, True)):
    bias = RelativePositionBias(heads, 32, 128, bidirectional=False)
    bias.weight.data = torch.randn(heads, 32)
    bias = bias.half().to(dev)
    key_mask = torch.rand(batch, t, device=dev) < 0.7
    pos = torch.randint(0, length, (batch if per_row else 1,), device=dev)
    enc = torch.rand(batch, source, device=dev) < 0.6 if source else None
    key_pos = torch.arange(t, device=dev)
    buckets = relative_position_bucket(key_pos, key_pos[:1], False, 32, 128)[:, 0].to(torch.int32)
    position = (bias.weight, buckets) if heads > 1 else None
    # the torch ops of GraphedDecoder's step without the kernel
    want_mask = key_mask.clone().scatter_(1, pos.expand(batch)[:, None], True)
    want = additive_mask(want_mask[:, :length] & (key_pos[:length] <= pos[:, None]), torch.half)[:, None, None, :]
    if position is not None:
        want = bias(pos[:, None], key_pos[:length]).half() + want
    got, cross = triton_attention.step_biases(key_mask, pos, length, torch.half, position, enc)
    assert got.shape == want.shape and torch.equal(got, want), (batch, heads, length)
    assert torch.equal(key_mask, want_mask), "the step's key is marked in the mask, nothing else changes"
    if source:
        assert torch.equal(cross, additive_mask(enc, torch.half)[:, None, None, :])
    else:
        assert cross is None
print("worst", worst)
"""


@pytest.mark.skipif(not triton_int8.available(), reason="needs triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the compiled kernel instead")
def test_step_biases_kernel_in_the_interpreter():
    assert run_check(STEP_BIAS_CHECK, "cpu", **INTERPRETER) == 0  # the same numbers, asserted in the check


@pytest.mark.gpu
def test_step_biases_kernel_on_gpu():
    assert run_check(STEP_BIAS_CHECK, "cuda") == 0


def test_attention_splits_keys_only_where_one_program_per_head_would_leave_the_gpu_idle(monkeypatch):
    from bminf.kernels import triton_gemv
    monkeypatch.setattr(triton_gemv, "multiprocessors", lambda device: 132)  # an H200
    gpu = torch.device("cuda")
    assert triton_attention.splits_for(64, 256, gpu) == 1     # CPM-2 at batch 1, up to 256 keys: one pass
    assert triton_attention.splits_for(64, 512, gpu) == 8     # beyond: 64 keys to a program
    assert triton_attention.splits_for(32, 300, gpu) == 5
    assert triton_attention.splits_for(1, 1 << 20, gpu) == triton_attention.MAX_SPLITS
    assert triton_attention.splits_for(2048, 512, gpu) == 1   # batch 32: the (row, head)s fill the GPU


def test_dependent_launch_is_checked_and_off_without_a_hopper_gpu(monkeypatch):
    from bminf.kernels import dependent_launch
    dependent_launch.enabled.cache_clear()
    monkeypatch.setenv("BMINF_PDL", "yes")
    with pytest.raises(ValueError, match="BMINF_PDL must be '0' or '1', got 'yes'"):
        dependent_launch.enabled(torch.device("cpu"))
    monkeypatch.setenv("BMINF_PDL", "1")
    dependent_launch.enabled.cache_clear()
    assert dependent_launch.options(torch.device("cpu")) == {"PDL": False}  # no launch_pdl for the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dependent_launch.enabled.cache_clear()
    assert not dependent_launch.enabled(torch.device("cuda"))  # checked before asking for the capability
    dependent_launch.enabled.cache_clear()


@pytest.mark.skipif(not triton_int8.available(), reason="needs triton")
def test_dependent_launch_needs_compute_capability_9_and_a_triton_that_has_it(monkeypatch):
    from bminf.kernels import dependent_launch, gdc
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("BMINF_PDL", "1")
    for capability, available, want in [((9, 0), True, True), ((9, 0), False, False), ((8, 0), True, False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(gdc, "AVAILABLE", available)  # False: a Triton before grid dependency control
        dependent_launch.enabled.cache_clear()
        assert dependent_launch.enabled(torch.device("cuda")) == want
        with dependent_launch.within_a_step():
            assert dependent_launch.options(torch.device("cuda")) == ({"PDL": True, "launch_pdl": True} if want
                                                                      else {"PDL": False})
        # outside a step the kernel before ours may be writing a weight that ours reads before its wait
        assert dependent_launch.options(torch.device("cuda")) == {"PDL": False}
    dependent_launch.enabled.cache_clear()


def test_compile_ahead_launches_outside_and_only_compiles_inside():
    from bminf.kernels import compile_ahead
    calls = []

    class Kernel:  # what compile_ahead.launch needs of a Triton kernel
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("run", grid, args, kwargs))

        def warmup(self, *args, grid, **kwargs):
            calls.append(("compile", grid, args, kwargs))

    compile_ahead.launch(Kernel(), (2,), "x", BLOCK=4)
    if compile_ahead.available():  # a Triton with AsyncCompileMode (the CPU build has it too)
        with compile_ahead.compiling_only(torch.device("cpu")):
            compile_ahead.launch(Kernel(), (3, 1), "y", BLOCK=8)
        compile_ahead.launch(Kernel(), (4,), "z")
        assert calls == [("run", (2,), ("x",), {"BLOCK": 4}), ("compile", (3, 1), ("y",), {"BLOCK": 8}),
                         ("run", (4,), ("z",), {})]
    else:
        assert calls == [("run", (2,), ("x",), {"BLOCK": 4})]


def test_compile_ahead_is_off_in_the_interpreter(monkeypatch):
    from bminf.kernels import compile_ahead
    compile_ahead.available.cache_clear()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not compile_ahead.available()


def test_set_up_in_background_runs_on_gpus_only_and_launches_wait_for_it(monkeypatch):
    import threading

    from bminf.kernels import compile_ahead
    monkeypatch.setattr(compile_ahead, "_SET_UP", None)
    compile_ahead.set_up_in_background(torch.device("cpu"))
    assert compile_ahead._SET_UP is None  # nothing to set up for the CPU
    # a setup still running when the first launch comes: the launch waits for it (Triton's driver
    # object may be half made until then)
    release, order = threading.Event(), []

    def slow_set_up():
        release.wait(5)
        order.append("set up")

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: order.append("run")

    monkeypatch.setattr(compile_ahead, "_SET_UP", threading.Thread(target=slow_set_up, daemon=True))
    compile_ahead._SET_UP.start()
    threading.Timer(0.2, release.set).start()
    compile_ahead.launch(Kernel(), (1,))
    assert order == ["set up", "run"]
    compile_ahead.set_up_in_background(torch.device("cuda"))  # started already: not a second thread
    assert not compile_ahead._SET_UP.is_alive()
    compile_ahead.available.cache_clear()


@pytest.mark.gpu
def test_compiling_only_compiles_on_threads_and_runs_nothing():
    from bminf.kernels import attention_kernels, compile_ahead
    if not compile_ahead.available():
        pytest.skip("this Triton has no AsyncCompileMode")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    # a head size no other test uses, so that the kernel variant is new to this process
    b, h, t, d = 1, 3, 40, 24
    q, new_k, new_v = (torch.randn(b, h, 1, d, device=dev, dtype=torch.float16) for _ in range(3))
    k, v = (torch.zeros(b, h, t, d, device=dev, dtype=torch.float16) for _ in range(2))
    bias = torch.zeros(b, h, 1, 8, device=dev, dtype=torch.float16)  # over the first 8 positions
    pos = torch.tensor([5], device=dev)
    compiled = lambda: sum(len(c[0]) for c in attention_kernels.decode_attention.device_caches.values())
    before = compiled()
    with compile_ahead.compiling_only(dev):
        triton_attention.attend_and_store(q, k, v, bias, 0.5, 8, new_k, new_v, pos)
    torch.cuda.synchronize()
    assert compiled() == before + 1
    assert not k.any() and not v.any()  # the kernel stores the new key and value: it did not run
    y = triton_attention.attend_and_store(q, k, v, bias, 0.5, 8, new_k, new_v, pos)
    assert compiled() == before + 1     # the launch found it compiled
    assert torch.equal(k[:, :, 5], new_k[:, :, 0]) and torch.equal(v[:, :, 5], new_v[:, :, 0])
    keys = torch.zeros(b, h, 6, d, device=dev, dtype=torch.float16)
    keys[:, :, 5] = new_k[:, :, 0]
    values = torch.zeros_like(keys)
    values[:, :, 5] = new_v[:, :, 0]
    want = triton_attention.reference(q, keys, values, bias[..., :6], 0.5)  # positions after pos: masked
    torch.testing.assert_close(y, want, atol=2e-3, rtol=2e-3)


SAMPLING_CHECK = """
import torch
from bminf.generation.sampling import SamplingParams, distribution, scores
from bminf.kernels import triton_sampling
dev = "{device}"
torch.manual_seed(0)


def expected(logits, params, counts, ban, q):
    # sampling.draw's definition, with top-n's ties to the lower index stated here (torch.topk does not say)
    z = scores(logits.float(), params, counts, ban)
    if params.greedy:
        return z.argmax(-1)
    nan = z.isnan().any(-1)  # torch.topk ranks NaN first: top-n keeps it, and the row has no distribution
    n = params.top_n
    if n is not None and n < z.shape[1]:
        level = z.sort(-1, descending=True).values[:, n - 1:n]
        at = z == level
        above = (z > level).sum(-1, keepdim=True)
        z = z.masked_fill(~((z > level) | (at & (at.cumsum(-1) <= n - above))), float("-inf"))
    probs = distribution(z, SamplingParams(temperature=1))
    ok = ((probs >= 0) & (probs < float("inf"))).all(-1) & (probs.sum(-1) > 0)
    return torch.where(ok & ~nan, (probs / q).argmax(-1), -1)


SETTINGS = [SamplingParams(temperature=0), SamplingParams(temperature=0, frequency_penalty=0.5),
            SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_n=1),
            SamplingParams(temperature=0.85, top_n=10), SamplingParams(temperature=1, top_n=64),
            SamplingParams(temperature=0.9, top_n=10, frequency_penalty=0.3, presence_penalty=0.2)]
worst = 0
cases = 0
# the row held in registers (every vocabulary here), then read in passes of 4096 ids: one partial pass,
# two and a partial, three
for resident_max, block in ((triton_sampling.RESIDENT_MAX, triton_sampling.BLOCK), (0, 4096)):
    triton_sampling.RESIDENT_MAX, triton_sampling.BLOCK = resident_max, block
    for vocab in (30, 4097, 9000):
        for dtype in (torch.float16, torch.float32):
            for k, params in enumerate(SETTINGS):
                batch = 7
                logits = (torch.randn(batch, vocab) * 3).to(dtype)
                # ties: row 1's largest twice, in two passes of the kernel where the vocabulary has them;
                # row 2 holds 40 equal scores at the top, so top-n's threshold falls inside a tie
                logits[1, vocab - 1] = logits[1, 3] = 20
                logits[2, torch.randperm(vocab)[:min(40, vocab)]] = 9
                logits[3, 5] = float("nan")                     # -1 sampled; greedy: the NaN's index, as torch.argmax
                logits[4, vocab // 2] = float("inf")             # -1 sampled; greedy: the inf's index
                ban = torch.zeros(batch, vocab, dtype=torch.bool)
                ban[5] = True                                   # nothing left: -1 sampled, 0 greedy
                ban[:, torch.randperm(vocab)[:vocab // 10]] = True
                ban[:, 3] = False
                counts = torch.randint(0, 3, (batch, vocab), dtype=torch.int32)
                filtered = (None, ban, ban[6])[k % 3]  # none, a mask a row, one mask for every row
                q = torch.empty(batch, vocab).exponential_()
                q[1] = 1  # row 1's two largest scores tie in p / q too: the lower index wins
                want = expected(logits, params, counts, filtered, q)
                got = triton_sampling.draw(logits.to(dev), params.temperature, params.top_n, params.frequency_penalty,
                                           params.presence_penalty, counts.to(dev),
                                           None if filtered is None else filtered.to(dev), q.to(dev)).cpu()
                assert got.dtype == torch.long and got.shape == (batch,)
                if not torch.equal(got, want):
                    print("mismatch", resident_max, vocab, dtype, params, k % 3, got.tolist(), want.tolist())
                    worst += int((got != want).sum())
                cases += 1
assert cases == 2 * 3 * 2 * 7
print("worst", worst)
"""


@pytest.mark.skipif(not triton_int8.available(), reason="needs triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the compiled kernel instead")
def test_sampling_kernel_in_the_interpreter():
    assert run_check(SAMPLING_CHECK, "cpu", **INTERPRETER) == 0  # every token as sampling.draw defines it


@pytest.mark.gpu
def test_sampling_kernel_on_gpu():
    assert run_check(SAMPLING_CHECK, "cuda") == 0
