"""Host-side cost of one FA4 fwd+bwd: mmtrain's custom ops vs FA4's own autograd Function vs the raw calls."""
import cProfile, pstats, time, io
import torch
from mmtrain.modules.attention import fa4 as m
from flash_attn.cute import flash_attn_func
mod = m.fa4_module()
dev = "cuda"
S, H, D = 1024, 16, 128
q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
win = (256, 256)

def ours():
    out = m.fa4_attention(q, k, v, window=win)
    out.sum().backward()

def theirs():
    qb, kb, vb = (x.transpose(1, 2) for x in (q, k, v))
    out = flash_attn_func(qb, kb, vb, window_size=win)
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()

qb, kb, vb = (x.detach().transpose(1, 2) for x in (q, k, v))
def raw():
    out, lse = mod._flash_attn_fwd(qb, kb, vb, softmax_scale=D ** -0.5, window_size_left=256, window_size_right=256, return_lse=True)[:2]
    dout = torch.ones_like(out)
    mod._flash_attn_bwd(qb, kb, vb, out, dout, lse, softmax_scale=D ** -0.5, window_size_left=256, window_size_right=256)

def ops_only():
    out, lse = torch.ops.mmtrain.fa4_forward(qb, kb, vb, D ** -0.5, False, 256, 256)
    dout = torch.ones_like(out)
    torch.ops.mmtrain.fa4_backward(dout, qb, kb, vb, out, lse, D ** -0.5, False, 256, 256)

def sum_bwd_only():
    x = q.sum(); x.backward()

for name, fn in [("mmtrain fa4_attention", ours), ("flash_attn_func", theirs), ("raw _flash_attn_fwd/_bwd", raw),
                 ("custom ops called directly", ops_only), ("baseline q.sum().backward()", sum_bwd_only)]:
    try:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {str(e)[:200]}")
        continue
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / 50 * 1e3)
    times.sort()
    print(f"{name:32s} host+device per fwd+bwd: median {times[2]:.3f} ms (min {times[0]:.3f})")

for name, fn in [("ours", ours), ("raw", raw)]:
    pr = cProfile.Profile(); pr.enable()
    for _ in range(50):
        fn()
    torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22); print(f"== profile {name}"); print(s.getvalue()[:6000])
