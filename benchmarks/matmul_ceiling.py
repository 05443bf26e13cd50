"""The highest HFU a training step could reach if it ran nothing but its own matmuls, on this machine.

    python benchmarks/matmul_ceiling.py                     # SmolLM2-135M, bench_dpo's 534 computed tokens per step
    python benchmarks/matmul_ceiling.py --tokens 2048 --repeats 7
    python benchmarks/matmul_ceiling.py --attention          # also: sdpa forward + backward, fp32 vs bf16

HFU divides the formula's FLOPs (6 N T) by the step time and by the peak of a square `torch.mm` loop (harness's
`matmul_peak`: the best of 1024^2 and 2048^2). A step's matmuls are not square: every Linear of the model is a
[T, in] x [in, out] product in the forward, and two more in the backward (input gradient [T, out] x [out, in], weight
gradient [out, T] x [T, in]). This times exactly those products in bf16 (fp32 too with --fp32), as autocast runs them,
and reports their FLOP-weighted rate against the square peak measured in the same run: the ceiling that no removal
of non-matmul work can lift. Attention's own products (per segment, tiny) are left out, which only helps the ceiling.

--attention also times one sdpa forward + backward per segment shape, in fp32 and in bf16: packing.segment_attention
runs CPU attention in fp32 under autocast, a choice this re-measures on the machine at hand.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import harness


def linear_shapes(config: dict) -> dict[str, tuple[int, int, int]]:
    """name -> (in_features, out_features, count per step) of every Linear in a Llama-style model + the LM head."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])
    return {"q_proj, o_proj": (h, h, 2 * layers), "k_proj, v_proj": (h, kv, 2 * layers),
            "gate_proj, up_proj": (h, inter, 2 * layers), "down_proj": (inter, h, layers),
            "lm_head": (h, config["vocab_size"], 1)}


def best_seconds(fn, repeats: int, min_time: float = 0.05) -> float:
    fn()
    n, t = 1, 0.0
    while t < min_time:  # enough calls per sample that the timer's resolution does not matter
        start = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - start
        n *= 2
    n //= 2
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n)
    return min(samples)


def attention_dtypes(repeats: int) -> None:
    """sdpa forward + backward (GQA 9 query / 3 kv heads of 64, as SmolLM2), fp32 vs bf16, at packed-segment shapes."""
    import torch
    import torch.nn.functional as F
    print("\n| queries x keys | fp32 ms | bf16 ms |\n| --- | --- | --- |")
    for lq, lk in ((180, 180), (256, 260), (600, 600), (8, 52), (64, 108)):
        row = []
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(1, 9, lq, 64, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(1, 3, lk, 64, dtype=dtype, requires_grad=True) for _ in range(2))
            mask = None if lq == lk else torch.ones(lq, lk, dtype=torch.bool).tril_(lk - lq)
            grad = torch.randn(1, 9, lq, 64, dtype=dtype)
            row.append(1e3 * best_seconds(lambda: F.scaled_dot_product_attention(  # noqa: B023
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True).backward(grad), repeats))
        print(f"| {lq} x {lk} | {row[0]:.2f} | {row[1]:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", type=int, default=534, help="tokens computed per step (bench_dpo: 534)")
    p.add_argument("--repeats", type=int, default=5, help="samples per product; the best is kept")
    p.add_argument("--fp32", action="store_true", help="also the fp32 products against the fp32 peak")
    p.add_argument("--attention", action="store_true", help="also sdpa forward + backward, fp32 vs bf16")
    a = p.parse_args()
    import torch
    a.model = harness.default_model(a.model)
    shapes = linear_shapes(json.loads((Path(a.model) / "config.json").read_text()))
    peaks = harness.matmul_peak()
    print(f"square torch.mm peak: bf16 {peaks['bf16']:.0f}, fp32 {peaks['fp32']:.0f} GFLOP/s; T = {a.tokens} tokens")
    T = a.tokens
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))[: 2 if a.fp32 else 1]:
        total_flops = total_s = 0.0
        print(f"\n| {name} product (T = {T}) | shape | GFLOP/s | share of the square peak |\n| --- | --- | --- | --- |")
        for layer, (k, n, count) in shapes.items():
            x, w, dy = (torch.randn(T, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(T, n, dtype=dtype))
            for kind, fn, shape in (("forward", lambda: x @ w.t(), f"[{T},{k}]x[{k},{n}]"),
                                    ("input grad", lambda: dy @ w, f"[{T},{n}]x[{n},{k}]"),
                                    ("weight grad", lambda: dy.t() @ x, f"[{n},{T}]x[{T},{k}]")):
                s = best_seconds(fn, a.repeats)
                flops = 2 * T * k * n
                total_flops += flops * count
                total_s += s * count
                gflops = flops / s / 1e9
                print(f"| {layer} {kind} | {shape} | {gflops:.0f} | {100 * gflops / peaks[name]:.0f}% |")
        rate = total_flops / total_s / 1e9
        print(f"\n{name}: all Linear products of one step (forward + backward, {total_flops / 1e12:.3f} TFLOP) take "
              f"{total_s:.3f} s = {rate:.0f} GFLOP/s = {100 * rate / peaks[name]:.0f}% of the square peak: the HFU "
              f"of a step that ran nothing else")
    if a.attention:
        attention_dtypes(a.repeats)


if __name__ == "__main__":
    main()
