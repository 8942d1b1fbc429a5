"""Norm/elementwise kernels of the compiled 11B-shaped vision encoder layers under inductor reduction settings.

Full-size tensors (4 images x 4 tiles x 1601 tokens x 1280), fewer layers (4 CLIP + 2 projection) so compiles are
short; attention through torch's flash SDPA (the norm kernels do not depend on the attention kernel).
usage: python3 ln_probe.py VARIANT... ; variants: default, multikernel, persist2048
"""
import collections, glob, os, shutil, statistics, sys, time
import torch
from torch.profiler import profile, ProfilerActivity
from mmtrain.bench.vision_encoder import ELEVEN_B, _inputs
from mmtrain.models.llama3_2_vision._component_builders import llama3_2_vision_encoder
from mmtrain.modules.attention.sdpa_backend import sdpa_backend

torch.backends.cuda.matmul.allow_tf32 = True
dev = torch.device("cuda")
OUT = os.environ.get("OUT", "/tmp/out")
CFG = dict(ELEVEN_B, clip_num_layers=4, clip_hidden_states=[1, 3], num_layers_projection=2)


def category(name):
    n = name.lower()
    if "flash" in n or "fmha" in n: return "attention"
    if "gemm" in n or "nvjet" in n or "cutlass" in n or "xmma" in n: return "gemm"
    if "adam" in n or "multi_tensor" in n: return "optimizer"
    return "other"


from torch._inductor.choices import InductorChoices as _IC
ORIGINAL = _IC.should_use_persistent_reduction
SPY = []
import torch._inductor.config
torch._inductor.config.force_disable_caches = True


def set_variant(v):
    import torch._inductor.config as ic
    from torch._inductor.virtualized import V
    from torch._inductor.choices import InductorChoices
    torch._dynamo.reset()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"/tmp/ic_{v}"
    ic.triton.multi_kernel = 1 if v == "multikernel" else 0
    ic.max_autotune_pointwise = v == "autotune"
    if v == "persist2048":
        from torch._inductor.runtime.hints import ReductionHint

        class Persist(InductorChoices):
            @staticmethod
            def should_use_persistent_reduction(features, cooperative_reduction):
                numel = features.reduction_numel
                hint = features.get_reduction_hint()
                take = (str(hint).endswith("INNER") and not cooperative_reduction
                        and V.graph.sizevars.statically_known_leq(numel, 2048))
                result = True if take else ORIGINAL(features, cooperative_reduction)
                SPY.append((str(numel), str(hint), cooperative_reduction, result))
                return result
        InductorChoices.should_use_persistent_reduction = staticmethod(Persist.should_use_persistent_reduction)
    else:
        InductorChoices.should_use_persistent_reduction = staticmethod(ORIGINAL)


def run(v):
    set_variant(v)
    torch.manual_seed(0)
    model = llama3_2_vision_encoder(**CFG).to(dev, torch.bfloat16).train()
    pixels, aspect = _inputs(CFG, 1, 4, 4, dev, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for layer in model.layer_modules():
        layer.compile()

    def step():
        out = model(pixels, aspect)
        loss = out.float().square().mean()
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    t0 = time.time()
    for _ in range(3): step()
    torch.cuda.synchronize(); print(f"[{v}] warmup {time.time()-t0:.1f}s", flush=True)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); step(); b.record(); torch.cuda.synchronize(); times.append(a.elapsed_time(b))
    med = statistics.median(times)
    print(f"[{v}] step {med:.2f} ms, times {[round(t, 1) for t in times]}", flush=True)
    if SPY:
        print(f"[{v}] persistent-reduction decisions: {sorted(set(SPY))}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(); torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name]; k[0] += e.device_time; k[1] += 1
    cats = collections.defaultdict(float)
    for n, (t, c) in kernels.items(): cats[category(n)] += t / 1e3
    print(f"[{v}] " + ", ".join(f"{c} {t:.2f}" for c, t in sorted(cats.items(), key=lambda x: -x[1])))
    for n, (t, c) in sorted(kernels.items(), key=lambda x: -x[1][0]):
        if category(n) == "other":
            print(f"  {t/1e3:8.3f} ms {c:4d}x {t/c:8.1f} us  {n[:140]}")
    dest = os.path.join(OUT, "kernels", v)
    os.makedirs(dest, exist_ok=True)
    for path in glob.glob(f"/tmp/ic_{v}/**/*.py", recursive=True):
        text = open(path).read()
        if "fused_native_layer_norm_0" in text and "def triton_" in text:
            shutil.copy(path, dest)
    del model, opt
    torch.cuda.empty_cache()


with sdpa_backend("flash"):
    for v in sys.argv[1:]:
        run(v)
