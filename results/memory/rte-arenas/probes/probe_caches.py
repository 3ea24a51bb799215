"""RSS after each new shape with other executables dropped (PROBE_MODE=drop) or JAX's caches cleared (clear): see README.md."""
import ctypes, sys, os, gc
libc = ctypes.CDLL("libc.so.6")
def rss():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])//1024
MODE = os.environ.get("PROBE_MODE", "drop")
import jax
import lora_jax.train_step as ts
orig = ts.PerShape.__call__
def call(self, *args):
    key = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args[-1]))
    new = key not in self.compiled
    out = orig(self, *args)
    if new:
        jax.block_until_ready(out)
        gc.collect(); libc.malloc_trim(0); b = rss()
        if MODE == "drop":
            for k in list(self.compiled):
                if k != key: del self.compiled[k]
        elif MODE == "clear":
            jax.clear_caches()
        gc.collect(); libc.malloc_trim(0); c = rss()
        print(f"PROBE {MODE} {key[1][0]}: trimmed {b} after-{MODE} {c} n={len(self.compiled)}", file=sys.stderr, flush=True)
    return out
ts.PerShape.__call__ = call
sys.argv = ["train.py"] + sys.argv[1:]
import runpy
runpy.run_path("scripts/train.py", run_name="__main__")
