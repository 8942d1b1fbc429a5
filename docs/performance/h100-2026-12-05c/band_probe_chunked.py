"""GPU probe 2: cuDNN band forward + key-chunked cuDNN backward (dense-in-window) vs flash window; window 513."""
import math, statistics, sys
import torch
import torch.nn.functional as F
import cudnn

handle = cudnn.create_handle()
BF16, F32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
TL = cudnn.diagonal_alignment.TOP_LEFT
HEUR = [cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK]


def finish(g):
    g.validate(); g.build_operation_graph(); g.create_execution_plans(HEUR); g.check_support(); g.build_plans()
    return g


def spec(g, t):
    return g.tensor(dim=list(t.shape), stride=list(t.stride()), data_type=F32 if t.dtype == torch.float32 else BF16)


class BandFwd:
    def __init__(self, q, k, v, o, stats, left, right, scale):
        g = cudnn.pygraph(io_data_type=BF16, intermediate_data_type=F32, compute_data_type=F32, handle=handle)
        self.t = [spec(g, x) for x in (q, k, v)]
        o_t, s_t = g.sdpa(name="fwd", q=self.t[0], k=self.t[1], v=self.t[2], generate_stats=True, attn_scale=scale,
                          diagonal_alignment=TL, diagonal_band_left_bound=left, diagonal_band_right_bound=right)
        o_t.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride()))
        s_t.set_output(True).set_data_type(F32).set_dim(list(stats.shape)).set_stride(list(stats.stride()))
        self.t += [o_t, s_t]
        self.g = finish(g)
        self.ws = torch.empty(g.get_workspace_size(), device="cuda", dtype=torch.uint8)

    def __call__(self, *xs):
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        self.g.execute(dict(zip(self.t, xs)), self.ws, handle=handle)


class BandBwd:
    def __init__(self, q, k, v, o, do, stats, dq, dk, dv, left, right, scale):
        g = cudnn.pygraph(io_data_type=BF16, intermediate_data_type=F32, compute_data_type=F32, handle=handle)
        self.t = [spec(g, x) for x in (q, k, v, o, do, stats)]
        outs = g.sdpa_backward(name="bwd", q=self.t[0], k=self.t[1], v=self.t[2], o=self.t[3], dO=self.t[4],
                               stats=self.t[5], attn_scale=scale, diagonal_alignment=TL,
                               diagonal_band_left_bound=left, diagonal_band_right_bound=right)
        for t, ref in zip(outs, (dq, dk, dv)):
            t.set_output(True).set_dim(list(ref.shape)).set_stride(list(ref.stride()))
        self.t += list(outs)
        self.g = finish(g)
        self.ws = torch.empty(g.get_workspace_size(), device="cuda", dtype=torch.uint8)

    def __call__(self, *xs):
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        self.g.execute(dict(zip(self.t, xs)), self.ws, handle=handle)


class ChunkedBand:
    """q, k, v: (b, h, S, d) contiguous; |i - j| <= half. Backward on query chunks of C against key windows of
    W = C + 2 half (zero-padded K/V; padded keys add nothing to dQ), dK/dV overlap-added."""

    def __init__(self, q, k, v, half, C):
        b, h, S, d = q.shape
        self.S, self.half, self.C, self.n = S, half, C, S // C
        self.W = C + 2 * half
        self.bh = b * h
        scale = 1 / math.sqrt(d)
        Sp = S + 2 * half
        self.k_pad = torch.zeros(b, h, Sp, d, device=q.device, dtype=q.dtype)
        self.v_pad = torch.zeros_like(self.k_pad)
        self.k_in, self.v_in = self.k_pad[:, :, half:half + S], self.v_pad[:, :, half:half + S]
        self.o = torch.empty_like(q)
        self.stats = torch.empty(b, h, S, 1, device=q.device, dtype=torch.float32)
        self.fwd = BandFwd(q, self.k_in, self.v_in, self.o, self.stats, half + 1, half, scale)
        n, W = self.n, self.W
        win = lambda t: t.as_strided((self.bh, n, W, d), (Sp * d, C * d, d, 1))
        chunk = lambda t, dd: t.as_strided((self.bh, n, C, dd), (S * dd, C * dd, dd, 1))
        self.kw, self.vw = win(self.k_pad), win(self.v_pad)
        self.dkw = torch.empty(self.bh, n, W, d, device=q.device, dtype=q.dtype)
        self.dvw = torch.empty_like(self.dkw)
        self.dq = torch.empty_like(q)
        self.do = torch.empty_like(q)
        self.qc, self.oc, self.doc, self.dqc = chunk(q, d), chunk(self.o, d), chunk(self.do, d), chunk(self.dq, d)
        self.sc = chunk(self.stats, 1)
        self.bwd = BandBwd(self.qc, self.kw, self.vw, self.oc, self.doc, self.sc, self.dqc, self.dkw, self.dvw,
                           1, 2 * half, scale)
        self.q = q
        self.shape = (b, h, S, d)

    def forward(self, k, v):
        self.k_in.copy_(k); self.v_in.copy_(v)
        self.fwd(self.q, self.k_in, self.v_in, self.o, self.stats)
        return self.o

    def bwd_kernel(self):
        self.bwd(self.qc, self.kw, self.vw, self.oc, self.doc, self.sc, self.dqc, self.dkw, self.dvw)

    def backward(self, do):
        self.do.copy_(do)
        self.bwd_kernel()
        g = math.gcd(self.C, self.half)
        step, parts = self.C // g, self.W // g
        total = (self.S + 2 * self.half) // g
        out = []
        for w in (self.dkw, self.dvw):
            wg = w.view(self.bh, self.n, parts, g, -1)
            acc = torch.zeros(self.bh, total, g, wg.shape[-1], device=do.device, dtype=torch.float32)
            for r in range(parts):
                acc[:, r:r + self.n * step:step] += wg[:, :, r]
            lo = self.half // g
            out.append(acc[:, lo:lo + self.S // g].to(do.dtype).reshape(self.shape))
        return self.dq, out[0], out[1]


def reference(q, k, v, half, do):
    s = q.shape[-2]
    i = torch.arange(s, device=q.device)
    keep = (i[:, None] - i[None, :]).abs() <= half
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=keep)
    out.backward(do.float())
    return out, qf.grad, kf.grad, vf.grad


def time_it(fn, warm=5, reps=20):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)


if __name__ == "__main__":
    half = 256
    for C in (256, 512, 1024):
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 3, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        do = torch.randn_like(q)
        try:
            cb = ChunkedBand(q, k, v, half, C)
            out = cb.forward(k, v).float(); grads = cb.backward(do)
            ref = reference(q, k, v, half, do)
            print(f"check C={C}:", ["%.4f" % (a.float() - r).abs().max().item() for a, r in zip((out, *grads), ref)])
        except Exception as err:
            print("check failed C", C, repr(err)[:400])

    for s in (8192, 16384):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 16, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        useful = 4 * 16 * 128 * sum(min(s - 1, i + half) - max(0, i - half) + 1 for i in range(s))
        dense_flops = 4 * 16 * 128 * s * s

        def dense():
            out = F.scaled_dot_product_attention(q, k, v)
            torch.autograd.grad(out, (q, k, v), do)

        def flash():
            out = torch.ops.aten._flash_attention_forward(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, s, s, 0.0, False, False,
                window_size_left=half, window_size_right=half)[0]
            torch.autograd.grad(out, (q, k, v), do.transpose(1, 2))

        def flash_fwd():
            with torch.no_grad():
                torch.ops.aten._flash_attention_forward(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, s, s, 0.0, False, False,
                    window_size_left=half, window_size_right=half)

        rows = [("dense", dense, dense_flops * 3.5), ("flash_window", flash, useful * 3.5), ("flash_fwd", flash_fwd, useful)]
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        for C in (256, 512, 1024):
            try:
                cb = ChunkedBand(qd, kd, vd, half, C)
            except Exception as err:
                print("build failed", C, repr(err)[:300]); continue
            rows.append((f"chunked_C{C}", lambda cb=cb: (cb.forward(kd, vd), cb.backward(do)), useful * 3.5))
            rows.append((f"chunked_C{C}_fwd", lambda cb=cb: cb.forward(kd, vd), useful))
            rows.append((f"chunked_C{C}_bwd_kernel", lambda cb=cb: cb.bwd_kernel(), useful * 2.5))
            rows.append((f"chunked_C{C}_bwd_all", lambda cb=cb: cb.backward(do), useful * 2.5))
        res = {}
        for name, fn, flops in rows:
            try:
                ms = time_it(fn)
            except Exception as err:
                print(name, "failed", repr(err)[:300]); continue
            res[name] = flops / ms / 1e9
            print(f"s={s} {name}: {ms:.3f} ms, {res[name]:.0f} TFLOP/s useful")
        for name in res:
            if name.startswith("chunked") and name.count("_") == 1 or name == "flash_window":
                print(f"s={s} {name} / dense = {res[name] / res['dense']:.2f}")
