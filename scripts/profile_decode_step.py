"""Where the host time of one eager decode step goes (B=1, ctx 1k, GQA 32/8, D=128, append).

Eager decode at small batch is bound by host work, not by the GPU: this prints the wall time per
step and a cProfile of 300 steps, so the next change to the call path can be aimed.
"""

import cProfile
import io
import pstats
import time

import torch

import flash_attn_interface as fa


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, 1, 32, 128, device=dev, dtype=dt)
    k_cache = torch.randn(1, 4096, 8, 128, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    k_new, v_new = torch.randn(1, 1, 8, 128, device=dev, dtype=dt), torch.randn(1, 1, 8, 128, device=dev, dtype=dt)
    lens = torch.full((1,), 1024, dtype=torch.int32, device=dev)

    def step():
        return fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True)

    def attend_only():
        return fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True)

    for name, fn in (("append+attend", step), ("attend only", attend_only)):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(300):
            fn()
        torch.cuda.synchronize()
        print(f"{name}: {(time.perf_counter() - start) / 300 * 1e6:.1f} us per eager step")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(300):
        step()
    torch.cuda.synchronize()
    profile.disable()
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(key).print_stats(25)
        print(text.getvalue())


if __name__ == "__main__":
    main()
