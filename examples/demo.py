"""The main job in miniature: a causal GQA prefill, then decode steps against a paged KV cache."""

import torch

import flash_attn_interface as fa

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16
batch, prompt, heads, kv_heads, head_dim, page_size = 2, 48, 8, 2, 64, 16

q = torch.randn(batch, prompt, heads, head_dim, device=device, dtype=dtype)
k = torch.randn(batch, prompt, kv_heads, head_dim, device=device, dtype=dtype)
v = torch.randn(batch, prompt, kv_heads, head_dim, device=device, dtype=dtype)
out, lse = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
print(f"prefill: out {tuple(out.shape)}, lse {tuple(lse.shape)}")

# Paged cache: 8 pages per sequence, pages handed out in shuffled order.
pages_per_seq = 8
num_pages = batch * pages_per_seq
k_cache = torch.zeros(num_pages, page_size, kv_heads, head_dim, device=device, dtype=dtype)
v_cache = torch.zeros_like(k_cache)
page_table = torch.randperm(num_pages, device=device, dtype=torch.int32).view(batch, pages_per_seq)
cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, page_table=page_table, causal=True)
cache_seqlens += prompt

for step in range(4):
    q1 = torch.randn(batch, 1, heads, head_dim, device=device, dtype=dtype)
    k1 = torch.randn(batch, 1, kv_heads, head_dim, device=device, dtype=dtype)
    v1 = torch.randn(batch, 1, kv_heads, head_dim, device=device, dtype=dtype)
    out1 = fa.flash_attn_with_kvcache(q1, k_cache, v_cache, k1, v1, cache_seqlens=cache_seqlens,
                                      page_table=page_table, causal=True)
    cache_seqlens += 1
    print(f"decode step {step}: out {tuple(out1.shape)}, cache length {cache_seqlens.tolist()}")
print("demo done")
