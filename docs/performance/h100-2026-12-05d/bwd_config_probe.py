"""FA4 b40 SM90 backward at the 11B encoder's attention shape (4 x 6404 x 16 heads x 80), bf16: the default config
against alternatives FA4's validator accepts; dq/dk/dv compared with the default's."""
import dataclasses, statistics, time
import torch
import flash_attn.cute.interface as fi
from flash_attn.cute import config as fc
from mmtrain.modules.attention.fa4 import _sm90_dq_accumulator_rounding

torch.manual_seed(0)
b, s, h, d = 4, 6404, 16, 80
q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
out, lse = fi._flash_attn_fwd(q, k, v, softmax_scale=d ** -0.5, return_lse=True)[:2]
inputs = fc.BwdHeuristicInputs(device_arch=90, head_dim=d, head_dim_v=d, num_heads=h,
                               num_heads_kv=h, dtype=str(torch.bfloat16), batch_size=b, max_seqlen_q=s,
                               max_seqlen_k=s, total_q=b * s, total_k=b * s)
default = fc.select_bwd_config(inputs)
print("default", default)
R = fc.Sm90BwdRegisters
both = dict(dQ_single_wg=False, registers=R(mma=240, mma_no_dq=240, producer=24))
candidates = {
    "default": {},
    "dq_both_wg": dict(both),
    "dq_both_wg_MdQ2": dict(both, AtomLayoutMdQ=2),
    "m128_pds1": dict(both, tile_m=128, num_stages_PdS=1, AtomLayoutMdQ=2),
    "m128_stages1": dict(both, tile_m=128, num_stages_Q=1, num_stages_dO=1, num_stages_PdS=1, AtomLayoutMdQ=2),
    "m128_single_pds1": dict(tile_m=128, num_stages_PdS=1),
    "n96": dict(tile_n=96),
    "m64_n128_pds1": dict(num_stages_PdS=1),
    "Vregs": dict(V_in_regs=True),
    "m80_dqswap": dict(both, tile_m=80, dQ_swapAB=True),
}

def bwd(cfg):
    with _sm90_dq_accumulator_rounding(fi):
        return fi._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=d ** -0.5, causal=False, config=cfg)[:3]

ref = None
for name, change in candidates.items():
    try:
        cfg = dataclasses.replace(default, **change)
        fc.validate_bwd_config(cfg, inputs)
    except Exception as err:
        print(f"{name:18s} rejected: {str(err)[:150]}"); continue
    try:
        t0 = time.time(); grads = bwd(cfg); torch.cuda.synchronize(); jit = time.time() - t0
        times = []
        for _ in range(8):
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); bwd(cfg); e.record(); torch.cuda.synchronize(); times.append(a.elapsed_time(e))
        if ref is None:
            ref = grads
        diff = max(float((g.float() - r.float()).abs().max()) for g, r in zip(grads, ref))
        print(f"{name:18s} {statistics.median(times):7.3f} ms  (jit {jit:.0f}s)  max |diff| vs default {diff:.4f}", flush=True)
    except Exception as err:
        print(f"{name:18s} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
