"""The fused norm ops against a float64 reference and HF's eager modules, plus gradcheck, opcheck,
determinism and argument checks. CUDA variants are marked `cuda`."""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from torchgc import ops

ops.load_library()  # these tests call torch.ops.torchgc directly

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MANTISSA = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}
EPS = 1e-6


def make_inputs(rows, hidden, x_dtype, w_dtype, device="cpu", seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen) * 2 + 0.5).to(device, x_dtype)
    w = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(device, w_dtype)
    g = torch.randn(rows, hidden, generator=gen).to(device, x_dtype)
    b = (0.3 * torch.randn(hidden, generator=gen)).to(device, w_dtype) if bias else None
    return x, w, g, b


def half_ulp_bound(ref, dtype):
    """The error of the exact result rounded to `dtype`: unavoidable for any kernel."""
    return ref.abs().max().item() * 2.0 ** -MANTISSA[dtype]


def errors(fn, x, w, g, b=None):
    """Max abs errors of y, dx, dweight (and dbias) of fn against float64 autograd of `ref`."""
    params = [t for t in (x, w, b) if t is not None]
    leaves = [t.detach().clone().requires_grad_(True) for t in params]
    y = fn(*leaves)
    y.backward(g.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def max_err(got, ref):
    return (got.double() - ref).abs().max().item()


def rms_ref(x, w, offset):
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return x * r * (offset + w)


def layer_ref(x, w, b=None):
    return nn.functional.layer_norm(x, x.shape[-1:], w, b, EPS)


def noise_floors(x, w, g, kind, offset=0.0, eps=EPS):
    """fp32 rounding noise of y, dx, dweight (and dbias): 16 float32 ulps of the largest term each
    sums. Results that cancel to near zero (dx at hidden 1) are only known to that precision."""
    x, w, g = x.double(), w.double(), g.double()
    xc = x - x.mean(-1, keepdim=True) if kind == "layer" else x
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = (xc * rstd).abs()
    w_eff = (w + offset).abs()
    n = x.shape[-1]
    scales = [(xhat * w_eff).max(), (g.abs() * w_eff * rstd).sum(-1).max() * 2 / n + (g.abs() * w_eff * rstd).max(),
              (g.abs() * xhat).reshape(-1, n).sum(0).max(), g.abs().reshape(-1, n).sum(0).max()]
    return [16 * 2.0 ** -24 * s.item() for s in scales]


def check_no_worse(ours, hf, ref, dtypes, names, floors):
    for o, h, r, dtype, name, floor in zip(ours, hf, ref, dtypes, names, floors):
        e_ours, e_hf = max_err(o, r), max_err(h, r)
        # Never worse than HF eager, except within the rounding of the result to its dtype,
        # which no kernel can avoid (HF keeps some results in fp32 where ours are rounded), and
        # fp32 noise where the result cancels to almost nothing.
        bound = max(e_hf, half_ulp_bound(r, dtype), floor) * 1.01
        assert e_ours <= bound, f"{name}: error {e_ours:.3g} vs HF eager {e_hf:.3g} (bound {bound:.3g})"


def float64_grads(fn, x, w, g, b=None):
    return errors(fn, x.double(), w.double(), g.double(), None if b is None else b.double())


SIZES = [(1, 1), (3, 7), (1, 64), (5, 1000), (4, 4096), (1, 8192), (3, 8192), (100_000, 1), (100_000, 7), (100_000, 64)]


def norm_cases(variants, keep_large):
    """(rows, hidden, x_name, w_kind, variant) cases. fp32 x with an "x"-dtype weight is the fp32
    weight case again, so it is left out; 100,000 rows run only where keep_large(x_name, variant),
    which covers the long reductions without paying for every combination."""
    return [
        (rows, hidden, x_name, w_kind, variant)
        for (rows, hidden), x_name, w_kind, variant in itertools.product(SIZES, ["bf16", "fp16", "fp32"], ["fp32", "x"], variants)
        if not (x_name == "fp32" and w_kind == "x") and (rows < 100_000 or keep_large(x_name, variant))
    ]


@pytest.mark.parametrize("rows,hidden,x_name,w_kind,offset", norm_cases([0.0, 1.0], lambda x_name, offset: x_name != "fp16" and offset == 0.0))
def test_rms_norm_error_no_worse_than_hf_eager(rows, hidden, x_name, w_kind, offset):
    x_dtype = DTYPES[x_name]
    w_dtype = torch.float32 if w_kind == "fp32" else x_dtype
    x, w, g, _ = make_inputs(rows, hidden, x_dtype, w_dtype)
    if offset:
        w = (w - 1).to(w_dtype)  # Gemma stores the weight as w - 1
    hf_module = GemmaRMSNorm(hidden, eps=EPS) if offset else LlamaRMSNorm(hidden, eps=EPS)

    def hf(x_, w_):
        return torch.func.functional_call(hf_module, {"weight": w_}, (x_,))

    ref = float64_grads(lambda x_, w_: rms_ref(x_, w_, offset), x, w, g)
    floors = noise_floors(x, w, g, "rms", offset)
    hf_out = errors(hf, x, w, g)
    # llama casting is compared with HF Llama (offset 0); Gemma's offset form casts as "fp32".
    for casting in ("fp32", "llama") if offset == 0 else ("fp32",):
        ours = errors(lambda x_, w_: ops.rms_norm(x_, w_, EPS, offset, casting), x, w, g)
        assert ours[0].dtype == x_dtype and ours[1].dtype == x_dtype and ours[2].dtype == w_dtype
        if casting == "llama" and x_dtype != torch.float32:
            # Llama's rounding of x * rstd is an extra error; HF Llama eager has it too.
            ref_y_bound = max_err(hf_out[0], ref[0]) + half_ulp_bound(ref[0], x_dtype)
            assert max_err(ours[0], ref[0]) <= ref_y_bound * 1.01
            check_no_worse(ours[1:], hf_out[1:], ref[1:], [x_dtype, w_dtype], ["dx", "dweight"], floors[1:])
        else:
            check_no_worse(ours, hf_out, ref, [x_dtype, x_dtype, w_dtype], ["y", "dx", "dweight"], floors)


@pytest.mark.parametrize("rows,hidden,x_name,w_kind,bias", norm_cases([True, False], lambda x_name, bias: x_name != "fp16" and bias))
def test_layer_norm_error_no_worse_than_torch_eager(rows, hidden, x_name, w_kind, bias):
    x_dtype = DTYPES[x_name]
    w_dtype = torch.float32 if w_kind == "fp32" else x_dtype
    x, w, g, b = make_inputs(rows, hidden, x_dtype, w_dtype, bias=bias)

    def eager(x_, w_, b_=None):
        # nn.LayerNorm with an fp32 weight and half x: F.layer_norm's mixed-dtype path (CPU).
        return nn.functional.layer_norm(x_, (hidden,), w_, b_, EPS)

    ref = float64_grads(layer_ref, x, w, g, b)
    theirs = errors(eager, x, w, g, b)
    ours = errors(lambda x_, w_, b_=None: ops.layer_norm(x_, w_, b_, EPS), x, w, g, b)
    names = ["y", "dx", "dweight", "dbias"][: len(ours)]
    dtypes = [x_dtype, x_dtype, w_dtype, w_dtype][: len(ours)]
    assert [t.dtype for t in ours] == dtypes
    check_no_worse(ours, theirs, ref, dtypes, names, noise_floors(x, w, g, "layer"))


@settings(max_examples=300)
@given(kind=st.sampled_from(["rms", "layer"]), leading=st.lists(st.integers(0, 4), max_size=2),
       hidden=st.sampled_from([1, 2, 3, 7, 16, 17, 64, 255, 1000, 4097]), x_name=st.sampled_from(["bf16", "fp16", "fp32"]),
       w_in_x_dtype=st.booleans(), strided=st.booleans(), eps=st.sampled_from([1e-12, 1e-6, 1e-5, 0.1]),
       offset=st.sampled_from([0.0, 1.0]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes_dtypes_strides_and_eps_agree_with_float64(kind, leading, hidden, x_name, w_in_x_dtype, strided, eps,
                                                                 offset, bias, seed):
    x_dtype = DTYPES[x_name]
    w_dtype = x_dtype if w_in_x_dtype else torch.float32
    gen = torch.Generator().manual_seed(seed)
    shape = (*leading, hidden)
    # strided: rows of x are not contiguous in memory (a slice of wider rows).
    wide = (torch.randn(*leading, hidden + 3, generator=gen) * 2 + 0.5).to(x_dtype)
    x = wide[..., :hidden] if strided else wide[..., :hidden].contiguous()
    w = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(w_dtype)
    b = (0.3 * torch.randn(hidden, generator=gen)).to(w_dtype) if bias and kind == "layer" else None
    g = torch.randn(shape, generator=gen).to(x_dtype)

    def fused(x_, w_, b_=None):
        return ops.rms_norm(x_, w_, eps, offset) if kind == "rms" else ops.layer_norm(x_, w_, b_, eps)

    def reference(x_, w_, b_=None):
        if kind == "rms":
            return x_ * torch.rsqrt(x_.pow(2).mean(-1, keepdim=True) + eps) * (offset + w_)
        return nn.functional.layer_norm(x_, x_.shape[-1:], w_, b_, eps)

    leaves = [t.requires_grad_(True) if t is x else t.detach().clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    y = fused(*leaves)
    y.backward(g)
    got = [y.detach()] + [t.grad for t in leaves]
    assert got[0].dtype == x_dtype and got[1].dtype == x_dtype and got[2].dtype == w_dtype
    ref = float64_grads(reference, x.detach(), w, g, b)
    if x.numel() == 0:  # no rows: empty outputs, zero parameter gradients
        assert got[0].shape == shape and got[1].shape == shape
        assert all(torch.equal(p, torch.zeros_like(p)) for p in got[2:])
        return
    floors = noise_floors(x.detach(), w, g, kind, offset if kind == "rms" else 0.0, eps)
    dtypes = [x_dtype, x_dtype, w_dtype, w_dtype]
    for name, o, r, dtype, floor in zip(["y", "dx", "dweight", "dbias"], got, ref, dtypes, floors):
        # 1e-12: the float64 reference's own rounding (its LayerNorm of a one-element row is ~1e-13, not 0).
        bound = max(half_ulp_bound(r, dtype), floor) * 1.01 + 1e-12
        assert max_err(o, r) <= bound, f"{name}: error {max_err(o, r):.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [7, 64, 4096])
def test_llama_casting_reproduces_hf_llama_rounding(w_dtype, hidden):
    x, w, _, _ = make_inputs(64, hidden, torch.bfloat16, w_dtype)
    module = LlamaRMSNorm(hidden, eps=EPS)
    module.weight = nn.Parameter(w)
    with torch.no_grad():
        expected = module(x)  # fp32 with an fp32 weight, bf16 with a bf16 one
        got = ops.rms_norm(x, w, EPS, casting="llama", fp32_output=expected.dtype == torch.float32)
        plain = ops.rms_norm(x, w, EPS, casting="fp32", fp32_output=expected.dtype == torch.float32)
    assert got.dtype == expected.dtype
    # Same rounding steps; only a last-bit difference in rstd (summation order) can flip a
    # rounding, which is rare.
    same = (got == expected).float().mean().item()
    assert same >= 0.999, same
    assert not torch.equal(plain, expected)  # the default mode rounds differently: the test can tell
    ulp = expected.abs().double() * 2.0 ** -7
    assert ((got.double() - expected.double()).abs() <= ulp + 1e-30).all()


@pytest.mark.parametrize("x_name", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("w_kind", ["fp32", "x"])
@pytest.mark.parametrize("hidden", [2048, 4096, 5120, 8192])
def test_llama_casting_against_hf_llama_at_model_sizes(x_name, w_kind, hidden):
    # What the README states: HF adds the row's squares in another order, so where the fp32 sum
    # lands one ulp away, the normalized value can round to the other neighbour in x's dtype.
    # Measured on 512K elements per size: at most 0.018% of bf16/fp16 elements differ, by at most
    # 2 ulps of x's dtype; fp32 input has no rounding step to hide it (20-37% differ, <= 6 ulps).
    x_dtype = DTYPES[x_name]
    w_dtype = torch.float32 if w_kind == "fp32" else x_dtype
    x, w, _, _ = make_inputs(128, hidden, x_dtype, w_dtype, seed=hidden)
    module = LlamaRMSNorm(hidden, eps=EPS)
    module.weight = nn.Parameter(w)
    with torch.no_grad():
        expected = module(x)
        got = ops.rms_norm(x, w, EPS, casting="llama", fp32_output=expected.dtype == torch.float32)
    assert got.dtype == expected.dtype
    relative = (got.double() - expected.double()).abs() / expected.double().abs().clamp_min(1e-30)
    if x_dtype == torch.float32:
        assert relative.max().item() <= 8 * torch.finfo(torch.float32).eps
    else:
        assert (got != expected).double().mean().item() <= 5e-4
        assert relative.max().item() <= 2 * torch.finfo(x_dtype).eps


def test_llama_casting_keeps_x_dtype_with_fp32_weight():
    x, w, _, _ = make_inputs(4, 64, torch.bfloat16, torch.float32)
    assert ops.rms_norm(x, w, EPS, casting="llama").dtype == torch.bfloat16
    assert ops.rms_norm(x, w, EPS, casting="llama", fp32_output=True).dtype == torch.float32
    assert ops.layer_norm(x, w, None, EPS, fp32_output=True).dtype == torch.float32


@pytest.mark.parametrize("fp32_output", [False, True])
def test_fp32_output_is_the_unrounded_result(fp32_output):
    x, w, _, _ = make_inputs(8, 1000, torch.bfloat16, torch.float32)
    y = ops.rms_norm(x, w, EPS, fp32_output=fp32_output)
    ref = rms_ref(x.double(), w.double(), 0.0)
    tol = 2.0 ** -8 if not fp32_output else 1e-5
    assert ((y.double() - ref).abs() <= tol * ref.abs() + 1e-6).all()


@pytest.mark.parametrize("op", ["rms", "layer"])
def test_non_contiguous_x_and_any_leading_shape(op):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(6, 20, 2, 40, generator=gen, dtype=torch.bfloat16)
    x = base.transpose(1, 2)[:, :, ::2, :33]  # [6, 2, 10, 33], strided everywhere
    assert not x.is_contiguous()
    w = torch.rand(33, generator=gen) + 0.5
    b = torch.randn(33, generator=gen)

    def run(x_):
        return ops.rms_norm(x_, w, EPS) if op == "rms" else ops.layer_norm(x_, w, b, EPS)

    y = run(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, run(x.contiguous()))
    assert torch.equal(run(x[0, 0, 0]), y[0, 0, 0])  # 1-D x is one row


def test_weight_gradient_is_deterministic_and_thread_independent():
    x, w, g, b = make_inputs(20_000, 96, torch.bfloat16, torch.float32, bias=True)

    def grads():
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        ops.layer_norm(xs, ws, bs, EPS).backward(g)
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ops.rms_norm(xr, wr, EPS, 1.0, "llama").backward(g)
        return [xs.grad, ws.grad, bs.grad, xr.grad, wr.grad]

    threads = torch.get_num_threads()
    first = grads()
    again = grads()
    try:
        torch.set_num_threads(1)
        single = grads()
    finally:
        torch.set_num_threads(threads)
    for a, b_, c in zip(first, again, single):
        assert torch.equal(a, b_) and torch.equal(a, c)


def test_baseline_cpu_kernels_agree_with_float64_reference():
    # The kernels built without AVX2 run when ATen reports a CPU without it; force them.
    code = (
        "import torch, torchgc.ops as ops\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(33, 1000, generator=g).bfloat16(); w = torch.rand(1000, generator=g) + .5\n"
        "xr = x.clone().requires_grad_(); wr = w.clone().requires_grad_()\n"
        "y = ops.rms_norm(xr, wr, 1e-6, 0.0); y.float().sum().backward()\n"
        "xd = x.double().requires_grad_(); wd = w.double().requires_grad_()\n"
        "yd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd; yd.sum().backward()\n"
        "assert (y.double() - yd).abs().max() <= 2 ** -8 * yd.abs().max(), 'y'\n"
        "assert (wr.grad.double() - wd.grad).abs().max() <= 1e-5 * wd.grad.abs().max(), 'dweight'\n"
        "assert (xr.grad.double() - xd.grad).abs().max() <= 2 ** -8 * xd.grad.abs().max(), 'dx'\n"
        "print(torch.backends.cpu.get_cpu_capability())\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "DEFAULT"


# First derivatives, and second ones (create_graph=True: the backward is differentiated again).
DERIVATIVE_CHECKS = {"first": torch.autograd.gradcheck, "second": torch.autograd.gradgradcheck}


@pytest.mark.parametrize("order", sorted(DERIVATIVE_CHECKS))
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("casting", ["fp32", "llama"])
def test_rms_norm_derivatives_float64(order, offset, casting):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, generator=gen, dtype=torch.float64, requires_grad=True)
    assert DERIVATIVE_CHECKS[order](lambda x_, w_: ops.rms_norm(x_, w_, 1e-5, offset, casting), (x, w))


@pytest.mark.parametrize("order", sorted(DERIVATIVE_CHECKS))
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_derivatives_float64(order, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 17, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(17, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)
    assert DERIVATIVE_CHECKS[order](lambda x_, w_, b_=None: ops.layer_norm(x_, w_, b_, 1e-5), inputs)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_a_gradient_penalty_through_the_norm_matches_eager(kind):
    # The penalty's gradient with respect to the weight is a second derivative: zero if the norm's
    # backward were not differentiable.
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 32, generator=gen, dtype=torch.float64)
    w0 = 1 + 0.3 * torch.randn(32, generator=gen, dtype=torch.float64)
    eager = (lambda x, w: rms_ref(x, w, 0.0)) if kind == "rms" else (lambda x, w: layer_ref(x, w))
    fused = (lambda x, w: ops.rms_norm(x, w, EPS)) if kind == "rms" else (lambda x, w: ops.layer_norm(x, w, None, EPS))

    def penalty_grads(fn):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        (dx,) = torch.autograd.grad(fn(x, w).sin().sum(), x, create_graph=True)
        dx.square().sum().backward()
        return x.grad, w.grad

    expected, got = penalty_grads(eager), penalty_grads(fused)
    assert expected[1].abs().max() > 1e-3
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def opcheck_samples(device):
    gen = torch.Generator().manual_seed(0)
    for x_dtype, w_dtype, shape in [
        (torch.bfloat16, torch.float32, (3, 64)),
        (torch.float16, torch.float16, (2, 3, 7)),
        (torch.float32, torch.float32, (5, 33)),
        (torch.float64, torch.float64, (4, 8)),
    ]:
        x = torch.randn(shape, generator=gen).to(device, x_dtype)
        w = torch.rand(shape[-1], generator=gen).to(device, w_dtype) + 0.5
        b = torch.randn(shape[-1], generator=gen).to(device, w_dtype)
        yield x, w, b


def output_masks(n):
    """Every output mask of a backward op with n outputs, all-true first."""
    return [list(m) for m in itertools.product((True, False), repeat=n)]


def run_opcheck(device):
    for x, w, b in opcheck_samples(device):
        for fp32_output in (False, True):
            for req in (False, True):
                xr, wr, br = (t.clone().requires_grad_(req) for t in (x, w, b))
                torch.library.opcheck(torch.ops.torchgc.rms_norm.default, (xr, wr, 1e-6, 1.0, True, fp32_output))
                torch.library.opcheck(torch.ops.torchgc.layer_norm.default, (xr, wr, br, 1e-6, fp32_output))
                torch.library.opcheck(torch.ops.torchgc.layer_norm.default, (xr, wr, None, 1e-6, fp32_output))
            y, rstd = torch.ops.torchgc.rms_norm.default(x, w, 1e-6, 0.0, False, fp32_output)
            g = torch.randn_like(y)
            for mask in output_masks(2):
                torch.library.opcheck(torch.ops.torchgc.rms_norm_backward.default, (g, x, w, rstd, 0.0, False, mask))
            _, mean, rstd = torch.ops.torchgc.layer_norm.default(x, w, b, 1e-6, fp32_output)
            for mask in output_masks(3):
                torch.library.opcheck(torch.ops.torchgc.layer_norm_backward.default, (g, x, w, mean, rstd, mask))


def test_opcheck_every_norm_op():
    run_opcheck("cpu")


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen-weights"])
def test_compiled_training_step_matches_eager(frozen):
    x, w, g, b = make_inputs(6, 48, torch.bfloat16, torch.float32, bias=True)

    def step(x_, w_, b_):
        h = ops.layer_norm(x_, w_, b_, EPS)
        return ops.rms_norm(h, w_, EPS, 1.0, "llama")

    def grads(fn):
        leaves = [t.clone().requires_grad_(t is x or not frozen) for t in (x, w, b)]
        y = fn(*leaves)
        y.backward(g)
        return [y] + [t.grad for t in leaves]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager, traced = grads(step), grads(compiled)
    if frozen:
        assert eager[2:] == [None, None] and traced[2:] == [None, None]
        eager, traced = eager[:2], traced[:2]
    for a, c in zip(eager, traced):
        assert torch.equal(a, c)


NORMS = {
    "rms": lambda x_, w_: ops.rms_norm(x_, w_, EPS),
    "rms-gemma-llama": lambda x_, w_: ops.rms_norm(x_, w_, EPS, 1.0, "llama"),
    "layer": lambda x_, w_, b_: ops.layer_norm(x_, w_, b_, EPS),
    "layer-no-bias": lambda x_, w_: ops.layer_norm(x_, w_, None, EPS),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("x_dtype,hidden", [(torch.bfloat16, 96), (torch.bfloat16, 37), (torch.float64, 20)])
@pytest.mark.parametrize("norm", NORMS)
def test_frozen_inputs_get_no_gradient_and_the_others_keep_their_bits(norm, x_dtype, hidden, device):
    # Under LoRA the norm weights are frozen: the backward skips their gradient, and dx must be
    # bitwise the dx of a run with trainable weights (and dweight that of one with x trainable).
    w_dtype = torch.float64 if x_dtype == torch.float64 else torch.float32
    x, w, g, b = make_inputs(300, hidden, x_dtype, w_dtype, device=device, bias=True)
    inputs = (x, w, b) if norm == "layer" else (x, w)

    def grads(trainable):
        leaves = [t.clone().requires_grad_(r) for t, r in zip(inputs, trainable)]
        NORMS[norm](*leaves).backward(g)
        return [t.grad for t in leaves]

    every = grads([True] * len(inputs))
    for trainable in output_masks(len(inputs))[1:-1]:
        for got, wanted, full in zip(grads(trainable), trainable, every):
            assert torch.equal(got, full) if wanted else got is None, (trainable, wanted)


@pytest.mark.parametrize("device", ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_backward_ops_return_only_the_outputs_the_mask_asks_for(device):
    x, w, g, b = make_inputs(300, 96, torch.bfloat16, torch.float32, bias=True)
    x, w, g, b = (t.to(device) for t in (x, w, g, b))
    _, rstd = torch.ops.torchgc.rms_norm.default(x, w, EPS, 1.0, True, False)
    _, mean, lrstd = torch.ops.torchgc.layer_norm.default(x, w, b, EPS, False)
    cases = [
        (2, lambda mask: torch.ops.torchgc.rms_norm_backward.default(g, x, w, rstd, 1.0, True, mask), [x, w]),
        (3, lambda mask: torch.ops.torchgc.layer_norm_backward.default(g, x, w, mean, lrstd, mask), [x, w, b]),
    ]
    for n, backward, likes in cases:
        full = backward([True] * n)
        for mask in output_masks(n):
            for got, wanted, ref, like in zip(backward(mask), mask, full, likes):
                if not wanted:
                    assert got is None, mask
                    continue
                assert got.shape == like.shape and got.dtype == like.dtype and got.device == like.device
                if device != "meta":
                    assert torch.equal(got, ref), mask


def expect_error(match, fn):
    with pytest.raises(RuntimeError, match=match):
        fn()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_inputs_raise_errors_naming_op_and_problem(device):
    # "meta" runs the fake kernels, which check the same things.
    x = torch.randn(4, 8, device=device, dtype=torch.bfloat16)
    w = torch.ones(8, device=device)
    rms = torch.ops.torchgc.rms_norm.default
    layer = torch.ops.torchgc.layer_norm.default
    expect_error(r"torchgc::rms_norm: expected argument 'weight' to have shape \[8\] .*got \[7\]",
                 lambda: rms(x, torch.ones(7, device=device), 1e-6, 0.0, False, False))
    expect_error(r"torchgc::rms_norm: expected argument 'weight' to have shape \[8\] .*got \[2, 4\]",
                 lambda: rms(x, torch.ones(2, 4, device=device), 1e-6, 0.0, False, False))
    expect_error(r"torchgc::rms_norm: expected argument 'x' to have dtype .*got (Long|torch.int64)",
                 lambda: rms(torch.ones(4, 8, dtype=torch.long, device=device), w, 1e-6, 0.0, False, False))
    expect_error(r"torchgc::layer_norm: expected argument 'x' to have at least one dimension and a last dimension of size >= 1, got shape \[8, 0\]",
                 lambda: layer(torch.ones(8, 0, dtype=torch.bfloat16, device=device), torch.ones(0, device=device), None, 1e-6, False))
    expect_error(r"torchgc::rms_norm: expected argument 'x' to have at least one dimension .*got shape \[\]",
                 lambda: rms(torch.ones((), dtype=torch.bfloat16, device=device), torch.ones(1, device=device),
                             1e-6, 0.0, False, False))
    expect_error(r"torchgc::rms_norm: expected argument 'eps' to be finite and >= 0, got -1",
                 lambda: rms(x, w, -1.0, 0.0, False, False))
    expect_error(r"torchgc::rms_norm: expected argument 'offset' to be finite, got nan",
                 lambda: rms(x, w, 1e-6, float("nan"), False, False))
    expect_error(r"torchgc::layer_norm: expected argument 'bias' to have shape \[8\] .*got \[9\]",
                 lambda: layer(x, w, torch.zeros(9, device=device), 1e-6, False))
    expect_error(r"torchgc::layer_norm: expected argument 'bias' to have weight's dtype",
                 lambda: layer(x, w, torch.zeros(8, device=device, dtype=torch.bfloat16), 1e-6, False))
    expect_error(r"torchgc::rms_norm: expected argument 'weight' to have dtype (Float|float32) or x's dtype .*got (Half|torch.float16)",
                 lambda: rms(x, w.half(), 1e-6, 0.0, False, False))
    expect_error(r"torchgc::rms_norm: expected argument 'weight' to have dtype .*got (Long|torch.int64)",
                 lambda: rms(x, w.long(), 1e-6, 0.0, False, False))
    y, rstd = rms(x, w, 1e-6, 0.0, False, False)
    expect_error(r"torchgc::rms_norm_backward: expected argument 'grad_y' to have x's shape",
                 lambda: torch.ops.torchgc.rms_norm_backward.default(y[:2], x, w, rstd, 0.0, False, [True, True]))
    expect_error(r"torchgc::rms_norm_backward: expected argument 'rstd' to have shape \[4\]",
                 lambda: torch.ops.torchgc.rms_norm_backward.default(y, x, w, rstd[:2], 0.0, False, [True, True]))
    expect_error(r"torchgc::rms_norm_backward: expected argument 'rstd' to have shape \[4\] and dtype",
                 lambda: torch.ops.torchgc.rms_norm_backward.default(y, x, w, rstd.double(), 0.0, False, [True, True]))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, w: ops.rms_norm(x, w, 1e-6, fp32_output="no"), "torchgc.ops.rms_norm: argument 'fp32_output' must be True or False; got 'no'"),
        (lambda x, w: ops.rms_norm(x, w, "1e-6"), "torchgc.ops.rms_norm: argument 'eps' must be a real number; got '1e-6'"),
        (lambda x, w: ops.rms_norm(x, w, 1e-6, offset=None), "torchgc.ops.rms_norm: argument 'offset' must be a real number; got None"),
        (lambda x, w: ops.rms_norm(x, w, 1e-6, offset=float("nan")), "torchgc::rms_norm: expected argument 'offset' to be finite, got nan"),
        (lambda x, w: ops.layer_norm(x, w, None, True), "torchgc.ops.layer_norm: argument 'eps' must be a real number; got True"),
        (lambda x, w: ops.layer_norm(x, w, None, 1e-5, fp32_output=1), "torchgc.ops.layer_norm: argument 'fp32_output' must be True or False; got 1"),
    ],
)
def test_bad_scalar_arguments_name_the_function_and_the_argument(call, message):
    with pytest.raises((ValueError, RuntimeError)) as error:
        call(torch.randn(2, 8), torch.ones(8))
    assert message in str(error.value)


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_sparse_tensors_are_rejected_naming_the_op_and_the_argument(layout):
    def sparse(t):
        return t.to_sparse() if layout == "sparse_coo" else t.to_sparse_csr()

    x, w = torch.randn(4, 8), torch.ones(8)
    y, rstd = torch.ops.torchgc.rms_norm.default(x, w, 1e-6, 0.0, False, False)
    for call, argument in [
        (lambda: ops.rms_norm(sparse(x), w, 1e-6), "x"),
        (lambda: ops.layer_norm(x, sparse(w.expand(2, 8))[0] if layout == "sparse_csr" else sparse(w), None, 1e-6), "weight"),
        (lambda: torch.ops.torchgc.rms_norm_backward.default(sparse(y), x, w, rstd, 0.0, False, [True, True]), "grad_y"),
    ]:
        with pytest.raises(RuntimeError, match=rf"torchgc::\w+: expected argument '{argument}' to be a dense \(strided\) tensor, got layout Sparse"):
            call()


def test_mismatched_devices_raise_a_clear_error():
    # CPU x with a meta weight dispatches to the fake kernel; the C++ check is covered by ctest.
    x = torch.randn(4, 8)
    expect_error(r"torchgc::rms_norm: expected argument 'weight' to be on x's device cpu, got one on meta",
                 lambda: torch.ops.torchgc.rms_norm.default(x, torch.ones(8, device="meta"), 1e-6, 0.0, False, False))


def test_unknown_casting_is_rejected():
    with pytest.raises(ValueError, match="casting"):
        ops.rms_norm(torch.randn(2, 4), torch.ones(4), EPS, casting="gemma")


# ----------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("rows,hidden", [(1, 1), (3, 7), (64, 64), (5, 1000), (33, 4096), (9, 8192), (100_000, 64)])
@pytest.mark.parametrize("x_name", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("w_kind", ["fp32", "x"])
def test_cuda_kernels_match_float64_reference(rows, hidden, x_name, w_kind):
    x_dtype = DTYPES[x_name]
    w_dtype = torch.float32 if w_kind == "fp32" else x_dtype
    x, w, g, b = make_inputs(rows, hidden, x_dtype, w_dtype, device="cuda", bias=True)
    for offset in (0.0, 1.0):
        ref = float64_grads(lambda x_, w_: rms_ref(x_, w_, offset), x, w, g)
        hf_module = (GemmaRMSNorm if offset else LlamaRMSNorm)(hidden, eps=EPS).cuda()
        hf = errors(lambda x_, w_: torch.func.functional_call(hf_module, {"weight": w_}, (x_,)), x, w, g)
        ours = errors(lambda x_, w_: ops.rms_norm(x_, w_, EPS, offset), x, w, g)
        check_no_worse(ours, hf, ref, [x_dtype, x_dtype, w_dtype], ["y", "dx", "dweight"],
                       noise_floors(x, w, g, "rms", offset))
        assert_cuda_matches_cpu(lambda x_, w_: ops.rms_norm(x_, w_, EPS, offset), (x, w), g, noise_floors(x, w, g, "rms", offset))
    ref = float64_grads(layer_ref, x, w, g, b)
    theirs = errors(lambda x_, w_, b_: nn.functional.layer_norm(x_, (hidden,), w_, b_, EPS), x, w, g, b)
    ours = errors(lambda x_, w_, b_: ops.layer_norm(x_, w_, b_, EPS), x, w, g, b)
    check_no_worse(ours, theirs, ref, [x_dtype, x_dtype, w_dtype, w_dtype], ["y", "dx", "dweight", "dbias"],
                   noise_floors(x, w, g, "layer"))
    assert_cuda_matches_cpu(lambda x_, w_, b_: ops.layer_norm(x_, w_, b_, EPS), (x, w, b), g, noise_floors(x, w, g, "layer"))


def assert_cuda_matches_cpu(fn, cuda_inputs, g, floors):
    """y, dx, dweight (and dbias) of fn on CUDA against the CPU kernel: each rounds once, and their
    fp32 sums differ only in order (different row parts), so each result may differ by the result
    dtype's rounding or the fp32 noise floor, on each side."""
    cuda = errors(fn, *cuda_inputs[:2], g, *cuda_inputs[2:])
    cpu_inputs = [t.cpu() for t in cuda_inputs]
    cpu = errors(fn, *cpu_inputs[:2], g.cpu(), *cpu_inputs[2:])
    for name, a, c, floor in zip(["y", "dx", "dweight", "dbias"], cuda, cpu, floors):
        bound = 2 * max(half_ulp_bound(c.double(), a.dtype), floor)
        assert max_err(a.cpu(), c.double()) <= bound, f"{name}: CUDA and CPU differ by {max_err(a.cpu(), c.double()):.3g} > {bound:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("hidden", [100, 1001, 1024, 4097])
def test_cuda_unaligned_inputs_take_the_scalar_path_correctly(hidden):
    # A contiguous view 2 bytes past a 16-byte boundary, or an odd width, rules out 16-byte packs:
    # the scalar path runs, a warp per row (hidden 100) or a block per row (the others).
    rows = 64
    base = torch.randn(rows * hidden + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(rows, hidden)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    w = torch.rand(hidden, device="cuda") + 0.5
    b = torch.randn(hidden, device="cuda")
    g = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    assert_cuda_matches_cpu(lambda x_, w_: ops.rms_norm(x_, w_, EPS), (x, w), g, noise_floors(x, w, g, "rms"))
    assert_cuda_matches_cpu(lambda x_, w_, b_: ops.layer_norm(x_, w_, b_, EPS), (x, w, b), g, noise_floors(x, w, g, "layer"))


@pytest.mark.cuda
def test_cuda_weight_gradient_bits_do_not_depend_on_alignment():
    # Aligned, the rows take the packed path; 2 bytes off, the scalar one. The row parts of the
    # weight-gradient reduction depend on the row count only, so dweight's bits are the same.
    rows, hidden = 20_000, 1024
    x, w, g, b = make_inputs(rows, hidden, torch.bfloat16, torch.float32, device="cuda", bias=True)
    shifted = torch.empty(rows * hidden + 1, device="cuda", dtype=torch.bfloat16)[1:].view(rows, hidden).copy_(x)
    for fn in (lambda x_, w_: ops.rms_norm(x_, w_, EPS), lambda x_, w_: ops.layer_norm(x_, w_, b, EPS)):
        assert torch.equal(errors(fn, x, w, g)[2], errors(fn, shifted, w, g)[2])


@pytest.mark.cuda
@pytest.mark.parametrize("x_name", ["fp32", "fp64"])
def test_cuda_wide_rows_launch_the_largest_blocks(x_name):
    # fp32 rows of 16384 (4096 packs) and unpackable fp64 rows of 8191 get 1024-thread blocks,
    # which the backward kernels must fit in their registers.
    hidden = 16384 if x_name == "fp32" else 8191
    dtype = {"fp32": torch.float32, "fp64": torch.float64}[x_name]
    x, w, g, b = make_inputs(8, hidden, dtype, dtype, device="cuda", bias=True)
    assert_cuda_matches_cpu(lambda x_, w_: ops.rms_norm(x_, w_, EPS), (x, w), g, noise_floors(x, w, g, "rms"))
    assert_cuda_matches_cpu(lambda x_, w_, b_: ops.layer_norm(x_, w_, b_, EPS), (x, w, b), g, noise_floors(x, w, g, "layer"))


@pytest.mark.cuda
def test_cuda_weight_gradient_is_deterministic():
    x, w, g, b = make_inputs(50_000, 512, torch.bfloat16, torch.float32, device="cuda", bias=True)
    runs = []
    for _ in range(3):
        ws, bs = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        ops.layer_norm(x, ws, bs, EPS).backward(g)
        wr = w.clone().requires_grad_(True)
        ops.rms_norm(x, wr, EPS).backward(g)
        runs.append((ws.grad, bs.grad, wr.grad))
    for run in runs[1:]:
        for a, c in zip(runs[0], run):
            assert torch.equal(a, c)


@pytest.mark.cuda
def test_cuda_opcheck_every_norm_op():
    run_opcheck("cuda")


@pytest.mark.cuda
def test_cuda_gradcheck_float64():
    x = torch.randn(3, 40, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, device="cuda", dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, w_: ops.rms_norm(x_, w_, 1e-5, 1.0), (x, w))
    assert torch.autograd.gradcheck(lambda x_, w_, b_: ops.layer_norm(x_, w_, b_, 1e-5), (x, w, b))
