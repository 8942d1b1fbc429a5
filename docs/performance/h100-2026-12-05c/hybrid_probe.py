"""GPU probe: cuDNN band forward + FlashAttention-2 window backward (cuDNN stats as lse), window 513."""
import math, os, statistics, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # band_probe_chunked beside it
import torch
import torch.nn.functional as F
from band_probe_chunked import BandFwd, reference, time_it  # noqa: E402  (module body also runs its own probe: guarded below)

half = 256


def hybrid_factory(q, k, v):
    """q, k, v: (b, h, S, d) contiguous, detached."""
    b, h, S, d = q.shape
    o = torch.empty_like(q)
    stats = torch.empty(b, h, S, 1, device=q.device, dtype=torch.float32)
    fwd = BandFwd(q, k, v, o, stats, half + 1, half, 1 / math.sqrt(d))
    _, _, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, S, S, 0.0, False, False,
        window_size_left=half, window_size_right=half)

    def forward():
        fwd(q, k, v, o, stats)
        return o

    def backward(do):
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), o.transpose(1, 2),
            stats.view(b, h, S), None, None, S, S, 0.0, False, rng, unused,
            window_size_left=half, window_size_right=half)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    return forward, backward


torch.manual_seed(0)
q, k, v = (torch.randn(2, 3, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
do = torch.randn_like(q)
fwd, bwd = hybrid_factory(q, k, v)
out = fwd().float(); grads = bwd(do)
ref = reference(q, k, v, half, do)
print("hybrid check:", ["%.4f" % (a.float() - r).abs().max().item() for a, r in zip((out, *grads), ref)])

for s in (8192, 16384):
    q, k, v = (torch.randn(1, 16, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    useful = 4 * 16 * 128 * sum(min(s - 1, i + half) - max(0, i - half) + 1 for i in range(s))
    fwd, bwd = hybrid_factory(q, k, v)
    ms = time_it(lambda: (fwd(), bwd(do)))
    msb = time_it(lambda: bwd(do))
    print(f"s={s} hybrid fwd+bwd {ms:.3f} ms, {useful * 3.5 / ms / 1e9:.0f} TFLOP/s useful; flash bwd alone "
          f"{msb:.3f} ms")
