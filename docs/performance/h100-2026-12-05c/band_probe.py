"""GPU probe: cuDNN's diagonal-band SDPA (frontend graph API) vs flash window vs dense, window 513."""
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name())
import cudnn  # noqa: E402

print("frontend", getattr(cudnn, "__version__", "?"), "backend", cudnn.backend_version())

handle = cudnn.create_handle()
BF16 = cudnn.data_type.BFLOAT16
F32 = cudnn.data_type.FLOAT
ALIGN = cudnn.diagonal_alignment.TOP_LEFT


def build_fwd(q, k, v, o, stats, left, right, scale):
    g = cudnn.pygraph(io_data_type=BF16, intermediate_data_type=F32, compute_data_type=F32, handle=handle)
    tq, tk, tv = g.tensor_like(q), g.tensor_like(k), g.tensor_like(v)
    to, ts = g.sdpa(name="fwd", q=tq, k=tk, v=tv, generate_stats=True, attn_scale=scale,
                    diagonal_alignment=ALIGN, diagonal_band_left_bound=left, diagonal_band_right_bound=right)
    to.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride()))
    ts.set_output(True).set_data_type(F32).set_dim(list(stats.shape)).set_stride(list(stats.stride()))
    g.validate(); g.build_operation_graph(); g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support(); g.build_plans()
    return g, (tq, tk, tv, to, ts)


def build_bwd(q, k, v, o, do, stats, dq, dk, dv, left, right, scale):
    g = cudnn.pygraph(io_data_type=BF16, intermediate_data_type=F32, compute_data_type=F32, handle=handle)
    tq, tk, tv, to, tdo = (g.tensor_like(t) for t in (q, k, v, o, do))
    ts = g.tensor_like(stats)
    tdq, tdk, tdv = g.sdpa_backward(name="bwd", q=tq, k=tk, v=tv, o=to, dO=tdo, stats=ts, attn_scale=scale,
                                    diagonal_alignment=ALIGN, diagonal_band_left_bound=left,
                                    diagonal_band_right_bound=right)
    for t, ref in ((tdq, dq), (tdk, dk), (tdv, dv)):
        t.set_output(True).set_dim(list(ref.shape)).set_stride(list(ref.stride()))
    g.validate(); g.build_operation_graph(); g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support(); g.build_plans()
    return g, (tq, tk, tv, to, tdo, ts, tdq, tdk, tdv)


class Band:
    def __init__(self, q, k, v, left, right):
        b, h, s, d = q.shape
        self.scale = 1 / math.sqrt(d)
        self.o = torch.empty_like(q)
        self.stats = torch.empty(b, h, s, 1, device=q.device, dtype=torch.float32)
        self.do = torch.empty_like(q)
        self.dq, self.dk, self.dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self.fwd, self.ft = build_fwd(q, k, v, self.o, self.stats, left, right, self.scale)
        self.bwd, self.bt = build_bwd(q, k, v, self.o, self.do, self.stats, self.dq, self.dk, self.dv, left, right,
                                      self.scale)
        self.ws = torch.empty(max(self.fwd.get_workspace_size(), self.bwd.get_workspace_size()), device=q.device,
                              dtype=torch.uint8)
        self.q, self.k, self.v = q, k, v

    def forward(self):
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        tq, tk, tv, to, ts = self.ft
        self.fwd.execute({tq: self.q, tk: self.k, tv: self.v, to: self.o, ts: self.stats}, self.ws, handle=handle)
        return self.o

    def backward(self, do):
        self.do.copy_(do)
        tq, tk, tv, to, tdo, ts, tdq, tdk, tdv = self.bt
        self.bwd.execute({tq: self.q, tk: self.k, tv: self.v, to: self.o, tdo: self.do, ts: self.stats,
                          tdq: self.dq, tdk: self.dk, tdv: self.dv}, self.ws, handle=handle)
        return self.dq, self.dk, self.dv


def reference(q, k, v, half, do):
    s = q.shape[-2]
    i = torch.arange(s, device=q.device)
    keep = (i[:, None] - i[None, :]).abs() <= half
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=keep)
    out.backward(do.float())
    return out, qf.grad, kf.grad, vf.grad


def check(s, half, left, right):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    band = Band(q, k, v, left, right)
    out = band.forward().float()
    dq, dk, dv = band.backward(do)
    ref = reference(q, k, v, half, do)
    errs = [(a.float() - b).abs().max().item() for a, b in zip((out, dq, dk, dv), ref)]
    print(f"check s={s} left={left} right={right}: max err out/dq/dk/dv", ["%.4f" % e for e in errs])
    return max(errs)


def time_it(fn, warm=5, reps=20):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


half = 256
for left, right in ((half, half), (half + 1, half)):
    try:
        check(1024, half, left, right)
    except Exception as err:  # noqa: BLE001
        print("check failed", left, right, repr(err)[:300])
LEFT = int(sys.argv[1]) if len(sys.argv) > 1 else half + 1

for s in (4096, 8192, 16384):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    useful = 4 * 16 * 128 * sum(min(s - 1, i + half) - max(0, i - half) + 1 for i in range(s)) * 3.5  # fwd+bwd
    dense_flops = 4 * 16 * 128 * s * s * 3.5

    def dense():
        out = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)

    def flash():
        out = torch.ops.aten._flash_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, s, s, 0.0, False, False,
            window_size_left=half, window_size_right=half)[0]
        torch.autograd.grad(out, (q, k, v), do.transpose(1, 2))

    qd, kd, vd = q.detach(), k.detach(), v.detach()
    band = Band(qd, kd, vd, LEFT, half)

    def cudnn_band():
        band.forward()
        band.backward(do)

    def cudnn_fwd():
        band.forward()

    res = {}
    for name, fn in (("dense", dense), ("flash_window", flash), ("cudnn_band", cudnn_band), ("cudnn_band_fwd", cudnn_fwd)):
        try:
            ms = time_it(fn)
        except Exception as err:  # noqa: BLE001
            print(name, "failed", repr(err)[:300]); continue
        flops = dense_flops if name == "dense" else (useful / 3.5 if name.endswith("fwd") else useful)
        res[name] = flops / ms / 1e9
        print(f"s={s} {name}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
    if "dense" in res and "cudnn_band" in res:
        print(f"s={s} cudnn_band / dense = {res['cudnn_band'] / res['dense']:.2f}, flash / dense = "
              f"{res.get('flash_window', 0) / res['dense']:.2f}")
