"""GPU probe: FlashAttention-4 (CuTe DSL, SM90 path) for the local window and the vision encoder's d=80 shape."""
import statistics, time, traceback
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

t0 = time.time()
from flash_attn.cute import flash_attn_func  # noqa: E402
print("fa4 import", round(time.time() - t0, 1), "s")


def fa4(q, k, v, **kw):  # q, k, v: (b, s, h, d)
    res = flash_attn_func(q, k, v, **kw)
    return res[0] if isinstance(res, tuple) else res


def time_it(fn, warm=3, reps=10):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)


half = 256
# correctness, band
torch.manual_seed(0)
q, k, v = (torch.randn(2, 2048, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn_like(q)
try:
    t0 = time.time()
    out = fa4(q, k, v, window_size=(half, half))
    grads = torch.autograd.grad(out, (q, k, v), do)
    torch.cuda.synchronize()
    print("fa4 band first call (compile)", round(time.time() - t0, 1), "s")
    i = torch.arange(2048, device="cuda")
    keep = (i[:, None] - i[None, :]).abs() <= half
    qf, kf, vf = (t.detach().float().transpose(1, 2).requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=keep)
    rg = torch.autograd.grad(ref, (qf, kf, vf), do.float().transpose(1, 2))
    errs = [(a.float().transpose(1, 2) - b).abs().max().item() for a, b in zip((out, *grads), (ref, *rg))]
    print("fa4 band check max err", ["%.4f" % e for e in errs])
except Exception:
    traceback.print_exc()

for s in (8192, 16384):
    q, k, v = (torch.randn(1, s, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    useful = 4 * 16 * 128 * sum(min(s - 1, i + half) - max(0, i - half) + 1 for i in range(s))
    dense_flops = 4 * 16 * 128 * s * s
    qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, do))
    rows = {}

    def dense():
        out = F.scaled_dot_product_attention(qt, kt, vt)
        torch.autograd.grad(out, (q, k, v), dot)

    def fa4_dense():
        out = fa4(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)

    def fa4_band():
        out = fa4(q, k, v, window_size=(half, half))
        torch.autograd.grad(out, (q, k, v), do)

    def fa4_band_fwd():
        with torch.no_grad():
            fa4(q, k, v, window_size=(half, half))

    def flash2_band():
        out = torch.ops.aten._flash_attention_forward(q, k, v, None, None, s, s, 0.0, False, False,
                                                      window_size_left=half, window_size_right=half)[0]
        torch.autograd.grad(out, (q, k, v), do)

    for name, fn, fl in (("sdpa_dense", dense, dense_flops * 3.5), ("fa4_dense", fa4_dense, dense_flops * 3.5),
                         ("fa4_band", fa4_band, useful * 3.5), ("fa4_band_fwd", fa4_band_fwd, useful),
                         ("flash2_band", flash2_band, useful * 3.5)):
        try:
            ms = time_it(fn)
            rows[name] = fl / ms / 1e9
            print(f"s={s} {name}: {ms:.3f} ms, {rows[name]:.0f} TFLOP/s useful")
        except Exception:
            traceback.print_exc()
    if "fa4_band" in rows:
        print(f"s={s} fa4_band / sdpa_dense = {rows['fa4_band'] / rows['sdpa_dense']:.2f}")

# the 11B vision encoder's attention: 4 x 6404 tokens, 16 heads of 80
B, H, S, D = 4, 16, 6404, 80
flops = 4 * B * H * S * S * D * 3.5
x = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.bfloat16)
q, k, v = (x[:, :, i].detach().requires_grad_() for i in range(3))  # (b, s, h, d) views of a fused projection
do = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)


def cudnn_step():
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.autograd.grad(out, (q, k, v), do.transpose(1, 2))


def fa4_step():
    out = fa4(q, k, v)
    torch.autograd.grad(out, (q, k, v), do)


for name, fn in (("cudnn_d80", cudnn_step), ("fa4_d80", fa4_step)):
    try:
        ms = time_it(fn)
        print(f"vision shape {name}: {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
    except Exception:
        traceback.print_exc()
try:
    out = fa4(q, k, v)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    print("d80 fa4 vs cudnn max diff", (out.float() - ref.float()).abs().max().item())
except Exception:
    traceback.print_exc()
