"""Kernel-time breakdown of the 11B vision encoder training step (eager and per-layer compiled), sdpa_backend=fa4."""
import statistics, sys, time, collections
import torch
from torch.profiler import profile, ProfilerActivity
from mmtrain.bench.vision_encoder import ELEVEN_B, _inputs
from mmtrain.models.llama3_2_vision._component_builders import llama3_2_vision_encoder
from mmtrain.modules.attention.sdpa_backend import sdpa_backend

torch.backends.cuda.matmul.allow_tf32 = True
dev = torch.device("cuda")

def category(name):
    n = name.lower()
    if "flash" in n or "fmha" in n or "kernel_cutlass" in n or "cute" in n and "gemm" not in n: return "attention"
    if "gemm" in n or "sm90_xmma" in n or "cutlass" in n or "nvjet" in n: return "gemm"
    if "adam" in n or "multi_tensor" in n: return "optimizer"
    if "layer_norm" in n or "layernorm" in n: return "layernorm"
    if "triton" in n: return "triton"
    if "reduce" in n: return "reduce"
    if "copy" in n or "memcpy" in n or "cat" in n or "pad" in n: return "copy"
    if "elementwise" in n or "vectorized" in n: return "elementwise"
    if "memset" in n or "fill" in n: return "fill"
    return "other"

def run(name, compiled, multiple, profiled):
    from mmtrain.modules.attention import fa4
    fa4.SM90_HEAD_DIM_MULTIPLE = multiple
    torch.manual_seed(0)
    model = llama3_2_vision_encoder(**ELEVEN_B).to(dev, torch.bfloat16).train()
    if "fqkv" in name:
        from mmtrain.modules.attention.multi_head import set_fused_qkv
        print(f"[{name}] fused_qkv in {set_fused_qkv(model, True)} attention modules")
    pixels, aspect = _inputs(ELEVEN_B, 1, 4, 4, dev, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    if compiled:
        for layer in model.layer_modules():
            layer.compile()
    def step():
        out = model(pixels, aspect)
        loss = out.float().square().mean()
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    t0 = time.time()
    for _ in range(3): step()
    torch.cuda.synchronize(); print(f"[{name}] warmup {time.time()-t0:.1f}s", flush=True)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(6):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); step(); b.record(); torch.cuda.synchronize(); times.append(a.elapsed_time(b))
    med = statistics.median(times)
    print(f"[{name}] step {med:.1f} ms ({16/med*1e3:.2f} tiles/s), peak {torch.cuda.max_memory_allocated()/2**30:.1f} GiB, times {[round(t,1) for t in times]}", flush=True)
    if not profiled:
        del model, opt; torch.cuda.empty_cache(); return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(); torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name]; k[0] += e.device_time; k[1] += 1
    total = sum(v[0] for v in kernels.values()) / 1e3
    cats = collections.defaultdict(float)
    for n, (t, c) in kernels.items(): cats[category(n)] += t / 1e3
    print(f"[{name}] kernel time {total:.1f} ms of step {med:.1f} ms (busy {total/med:.2f})")
    print("  " + ", ".join(f"{c} {t:.1f}" for c, t in sorted(cats.items(), key=lambda x: -x[1])))
    for n, (t, c) in sorted(kernels.items(), key=lambda x: -x[1][0])[:22]:
        print(f"  {t/1e3:8.2f} ms {c:5d}x {category(n):11s} {n[:150]}")
    del model, opt
    torch.cuda.empty_cache()

with sdpa_backend("fa4"):
    for v in sys.argv[1:]:
        run(v, compiled=v.startswith("compiled"), multiple=32 if v.endswith("pad32") else 16, profiled=v.endswith("prof"))
