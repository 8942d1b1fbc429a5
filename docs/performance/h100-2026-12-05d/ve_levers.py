"""Two small levers on the compiled, FA4 vision-encoder step: FA4's SM90 backward with V held in registers, and
inductor's coordinate-descent tuning of its Triton kernels. One process, same inputs, CUDA events, median."""
import functools, statistics, sys, time
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
import flash_attn.cute.interface as fi
from mmtrain.bench.vision_encoder import ELEVEN_B, _inputs
from mmtrain.models.llama3_2_vision._component_builders import llama3_2_vision_encoder
from mmtrain.modules.attention.sdpa_backend import sdpa_backend

torch.backends.cuda.matmul.allow_tf32 = True
dev = torch.device("cuda")
plain_bwd = fi._flash_attn_bwd

def run(name, v_in_regs, coordinate_descent):
    torch._dynamo.reset()
    inductor_config.coordinate_descent_tuning = coordinate_descent
    wrapped = functools.partial(plain_bwd, V_in_regs=True)
    wrapped.compile_cache = plain_bwd.compile_cache  # FA4 finds its JIT cache through the module attribute
    fi._flash_attn_bwd = wrapped if v_in_regs else plain_bwd
    torch.manual_seed(0)
    model = llama3_2_vision_encoder(**ELEVEN_B).to(dev, torch.bfloat16).train()
    pixels, aspect = _inputs(ELEVEN_B, 1, 4, 4, dev, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for layer in model.layer_modules():
        layer.compile()
    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(pixels, aspect).float().square().mean()
        loss.backward(); opt.step()
        return loss.detach()
    t0 = time.time()
    losses = [float(step()) for _ in range(3)]
    torch.cuda.synchronize(); warm = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(8):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); step(); b.record(); torch.cuda.synchronize(); times.append(a.elapsed_time(b))
    med = statistics.median(times)
    print(f"{name:28s} {med:7.1f} ms  {16 / med * 1e3:6.2f} tiles/s  peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
          f"  warmup {warm:.0f}s  losses {[round(l, 5) for l in losses]}", flush=True)
    del model, opt
    torch.cuda.empty_cache()

variants = {"base": (False, False), "v_in_regs": (True, False), "coord_descent": (False, True), "both": (True, True)}
with sdpa_backend("fa4"):
    for name in sys.argv[1:]:
        run(name, *variants[name])
    run("base (again)", False, False)
