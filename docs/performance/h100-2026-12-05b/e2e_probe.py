"""Where does the contrastive recipe's CLIP step lose time against `bench contrastive`'s regional variant?"""
import importlib.util, statistics, sys, torch
from torch.profiler import profile, ProfilerActivity
from mmtrain.config import load
spec = importlib.util.spec_from_file_location("r", "recipes/contrastive.py")
R = importlib.util.module_from_spec(spec); spec.loader.exec_module(R)
torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True

def timed(fn, n=8, warm=3):
    for _ in range(warm): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)

def top(fn, label):
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        for _ in range(2): fn()
        torch.cuda.synchronize()
    print(f"== {label}"); print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))

extra = sys.argv[1:]
cfg = load("contrastive", "clip_vit_b16", ["tokenizer=shapes", "tokenizer.max_length=77", "batch_size=256", "num_workers=4",
           "dataset.train_samples=1024", "dataset.validation_samples=64", "max_steps=5", "output_dir=/tmp/probe", "resume=none",
           "cuda_graph=false"] + extra)
rec = R.ContrastiveRecipe(cfg); rec.setup()
batch = rec._to_device(next(iter(rec.loader)))
inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
print("shapes", {k: (tuple(v.shape), v.dtype, v.stride()) for k, v in inputs.items()})
print("mask tokens per row", inputs["attention_mask"].sum(1)[:8].tolist())
params = [p for p in rec.task.parameters() if p.requires_grad]
step = rec._device_step(params, 1.0)
ms = timed(lambda: step(inputs)); print(f"recipe _device_step: {ms:.1f} ms -> {256 / ms * 1e3:.0f} samples/s")
# the same model and loss, the bench's step (no clip, plain fused AdamW step)
opt = rec.optimizer
def bench_step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _, _ = rec.task(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
ms = timed(bench_step); print(f"bench-style step on the recipe's model: {ms:.1f} ms -> {256 / ms * 1e3:.0f} samples/s")
# random ids/masks like bench contrastive
g = torch.Generator().manual_seed(0)
lengths = torch.randint(19, 78, (256,), generator=g)
mask = (torch.arange(77)[None] < lengths[:, None]).long().cuda()
inputs2 = dict(inputs, attention_mask=mask, input_ids=(torch.randint(1, 30000, (256, 77), generator=g).cuda() * mask))
ms = timed(lambda: step(inputs2)); print(f"recipe _device_step, bench's text batch: {ms:.1f} ms -> {256 / ms * 1e3:.0f} samples/s")
top(lambda: step(inputs), "recipe step")
