"""RSS around each new train-step shape's first step, then after malloc_trim(0): see README.md."""
import ctypes, sys, time, os, gc
libc = ctypes.CDLL("libc.so.6")
def rss():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])//1024
import lora_jax.train_step as ts
orig = ts.PerShape.__call__
def call(self, *args):
    key = tuple((x.shape, str(x.dtype)) for x in ts.jax.tree.leaves(args[-1]))
    new = key not in self.compiled
    if new:
        a = rss()
    out = orig(self, *args)
    if new:
        ts.jax.block_until_ready(out)
        b = rss()
        gc.collect(); libc.malloc_trim(0); c = rss()
        print(f"PROBE compile {key[0][0]}: before {a} after-run {b} after-trim {c}", file=sys.stderr, flush=True)
    return out
ts.PerShape.__call__ = call
sys.argv = ["train.py"] + sys.argv[1:]
import runpy
runpy.run_path("scripts/train.py", run_name="__main__")
