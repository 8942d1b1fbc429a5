"""GPU probe: attention at the 11B vision encoder's shape (4 x 16 heads x 6404 x 80), fwd+bwd, per backend."""
import statistics
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

print(torch.__version__, torch.backends.cudnn.version(), torch.cuda.get_device_name())


def time_it(fn, warm=3, reps=10):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)


B, H, S, D = 4, 16, 6404, 80
flops = 4 * B * H * S * S * D * 3.5
x = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.bfloat16)
for layout in ("bshd", "bhsd"):
    if layout == "bshd":  # what a fused qkv projection gives after view + transpose
        q, k, v = (x[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3))
    else:
        q, k, v = (x[:, :, i].transpose(1, 2).contiguous().requires_grad_() for i in range(3))
    do = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def step():
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v)
            torch.autograd.grad(out, (q, k, v), do)

        def fwd():
            with torch.no_grad(), sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v)
        try:
            ms, msf = time_it(step), time_it(fwd)
            print(f"{layout} {name}: fwd+bwd {ms:.2f} ms {flops / ms / 1e9:.0f} TFLOP/s; fwd {msf:.2f} ms "
                  f"{flops / 3.5 / msf / 1e9:.0f} TFLOP/s")
        except Exception as err:
            print(layout, name, "failed", repr(err)[:200])
    # head dim padded to 128 (zeros): same scores with the scale of d=80, output sliced
    for name, backend in (("flash_pad128", SDPBackend.FLASH_ATTENTION), ("cudnn_pad128", SDPBackend.CUDNN_ATTENTION)):
        def step():
            qp, kp, vp = (F.pad(t, (0, 48)) for t in (q, k, v))
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(qp, kp, vp, scale=D ** -0.5)[..., :D]
            torch.autograd.grad(out, (q, k, v), do)
        try:
            ms = time_it(step)
            print(f"{layout} {name}: fwd+bwd {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s (d=80-equivalent)")
        except Exception as err:
            print(layout, name, "failed", repr(err)[:200])

# the per-layer linear work for scale: (4 * 6404) tokens x 1280 -> 3840 / 1280 / 5120 / 1280, fwd+bwd
T = B * S
w = [torch.randn(o, i, device="cuda", dtype=torch.bfloat16, requires_grad=True) for i, o in ((1280, 3840), (1280, 1280), (1280, 5120), (5120, 1280))]
xs = [torch.randn(T, i, device="cuda", dtype=torch.bfloat16, requires_grad=True) for i in (1280, 1280, 1280, 5120)]
def lin():
    for xi, wi in zip(xs, w):
        y = xi @ wi.t()
        torch.autograd.grad(y, (xi, wi), torch.ones_like(y))
lf = sum(2 * T * wi.numel() * 3 for wi in w)
ms = time_it(lin)
print(f"linears of one layer fwd+bwd: {ms:.2f} ms, {lf / ms / 1e9:.0f} TFLOP/s")
