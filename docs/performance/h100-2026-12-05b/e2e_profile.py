import importlib.util, sys, torch
from torch.profiler import profile, ProfilerActivity, schedule
from mmtrain.config import load
spec = importlib.util.spec_from_file_location("r", "recipes/contrastive.py")
R = importlib.util.module_from_spec(spec); spec.loader.exec_module(R)
prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=schedule(wait=24, warmup=2, active=4))
orig = R.D.maybe_inject_fault
R.D.maybe_inject_fault = lambda step: prof.step()
cfg = load("contrastive", "clip_vit_b16", ["tokenizer=shapes", "tokenizer.max_length=77", "batch_size=256", "num_workers=12",
           "dataset.train_samples=8192", "dataset.validation_samples=64", "max_steps=40", "log.every_n_steps=10",
           "eval.every_n_steps=0", "checkpoint.every_n_steps=0", "output_dir=/tmp/prof", "resume=none"] + sys.argv[1:])
prof.start()
R.main(cfg)
prof.stop()
ka = prof.key_averages()
print(ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
print(ka.table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
