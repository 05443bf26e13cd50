"""The fast path (packing.py) against the plain path: values and gradients."""
import random

import pytest
import torch

from common import UserError
from conftest import build_model, build_tokenizer, naive_logps, pair_example
from conftest import pair_batch as collate
from plumbing.logprobs import label_logps, sequence_logps
from plumbing.packing import pack_prefix_tree, segment_forward, use_segment_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_logps_equals_naive_log_softmax(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(37, 101) * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 101, (37,))
    g = torch.randn(37)
    ours = label_logps(logits, labels, chunk=8)  # chunk boundaries inside the batch
    (ours * g).sum().backward()
    grad_ours = logits.grad.clone()
    logits.grad = None
    naive = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    (naive * g).sum().backward()
    tol = {} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(ours, naive, **tol)
    torch.testing.assert_close(grad_ours.float(), logits.grad.float(), **tol)

def _examples(tok, n=3):
    rows = [{"prompt": "a cat sat" * (i + 1), "chosen": " on the mat" * (i + 1), "rejected": " up"} for i in range(n)]
    return [pair_example(tok, r, 64, 32)[0] | {"source": f"row{i}"} for i, r in enumerate(rows)]

def _contexts(ids, pos, segments):
    """For each packed position, the (position id, token) pairs it attends to under segment_attention's rule."""
    out = {}
    for q0, q1, spans in segments:
        kv = [j for a, b in spans for j in range(a, b)]
        for j in range(q1 - q0):
            out[q0 + j] = [(pos[k], ids[k]) for k in kv[:j + 1 + len(kv) - (q1 - q0)]]
    return out

def _check_packing(seqs, predict_from, tensors, segments):
    """Each needed logit's position sees exactly its own sequence's prefix, at the right position ids."""
    ids, pos = tensors["input_ids"][0].tolist(), tensors["position_ids"][0].tolist()
    assert [(a, b) for a, b, _ in segments] == list(zip([0] + [b for _, b, _ in segments[:-1]],
                                                        [b for _, b, _ in segments]))  # cover the row in order
    ctx = _contexts(ids, pos, segments)
    kept = tensors["keep"][0].nonzero().squeeze(1)[tensors["logit_index"]].tolist()
    needed = [(i, k) for i, s in enumerate(seqs) for k in range(predict_from[i], len(s))]
    assert len(kept) == len(needed)
    for at, (i, k) in zip(kept, needed):
        assert ctx[at] == list(enumerate(seqs[i][:k])), (i, k)
    return len(ids)

def test_pack_prefix_tree_contexts():
    rng = random.Random(0)
    for _ in range(30):
        stem = [rng.randrange(5) for _ in range(rng.randint(0, 6))]
        seqs = [stem + [rng.randrange(3) for _ in range(rng.randint(1, 7))] for _ in range(rng.randint(1, 7))]
        seqs += [seqs[0][:], seqs[-1][:max(1, len(seqs[-1]) - 2)]]  # a duplicate and a prefix of another
        predict_from = [rng.randint(1, len(s)) for s in seqs]
        tensors, segments = pack_prefix_tree(seqs, predict_from)
        n = _check_packing(seqs, predict_from, tensors, segments)
        assert n <= sum(map(len, seqs)) - len(stem) * (len(seqs) - 1)  # the shared stem is packed once

@pytest.mark.parametrize("sibling_queries", [256, 3])
def test_packed_tries_equal_one_sequence_at_a_time(sibling_queries, monkeypatch):
    """Random tries (a shared stem, groups of siblings of different lengths that share first tokens, duplicates,
    a sequence that is a prefix of another) through segment_attention, siblings batched in sdpa calls (all of them,
    or a few queries per call): the per-token log-probs and parameter gradients equal each sequence's own forward."""
    from plumbing import packing
    from plumbing.logprobs import kept_logits
    monkeypatch.setattr(packing, "SIBLING_QUERIES", sibling_queries)
    model = build_model(8, seed=1).eval()
    use_segment_attention(model)
    rng = random.Random(1)
    for _ in range(6):
        stem = [rng.randrange(8) for _ in range(rng.randint(1, 5))]
        heads = [[rng.randrange(2) for _ in range(rng.randint(0, 2))] for _ in range(rng.randint(1, 3))]
        seqs = [stem + h + [rng.randrange(8) for _ in range(rng.randint(1, 6))] for h in heads for _ in range(3)]
        seqs += [seqs[0][:], seqs[-1][:max(1, len(seqs[-1]) - 2)]]
        predict_from = [rng.randint(1, len(s) - 1) if len(s) > 1 else 1 for s in seqs]
        seqs, predict_from = zip(*[(s, p) for s, p in zip(seqs, predict_from) if len(s) > p])
        tensors, segments = pack_prefix_tree(list(seqs), list(predict_from))
        labels = torch.tensor([t for s, p in zip(seqs, predict_from) for t in s[p:]])
        w = torch.randn(len(labels))

        def grads(logps):
            model.zero_grad()
            (logps * w).sum().backward()
            return [q.grad.clone() for q in model.parameters()]
        packed = label_logps(kept_logits(model, tensors, segments), labels)
        packed_grads = grads(packed)
        naive = torch.cat([torch.log_softmax(model(torch.tensor([s])).logits[0, p - 1:-1].float(), -1)
                           .gather(-1, torch.tensor(s[p:])[:, None]).squeeze(-1) for s, p in zip(seqs, predict_from)])
        torch.testing.assert_close(packed, naive.detach(), rtol=1e-5, atol=1e-5)
        for g, ref in zip(packed_grads, grads(naive)):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_collate_masks_prompt_tokens():
    tok = build_tokenizer()
    exs = _examples(tok)
    for padding_free in (True, False):
        b = collate(exs, tok.pad_token_id, padding_free)
        seqs = [e["prompt"] + e["completions"][k] for k in (0, 1) for e in exs]
        assert b["labels"].tolist() == sum([e["completions"][k] for k in (0, 1) for e in exs], [])
        assert b.num_tokens == sum(map(len, seqs))
        ids, keep = b["input_ids"], b["keep"]
        if padding_free:  # each prompt once; every completion token predicted from its own sequence's prefix
            n = _check_packing(seqs, [len(e["prompt"]) for e in exs] * 2, b.tensors, b.attention_segments)
            assert n <= sum(len(e["prompt"]) + len(e["completions"][0]) + len(e["completions"][1]) for e in exs)
        else:  # every kept position predicts a completion token; none predicts a prompt token or padding
            assert keep.shape == ids.shape and b["attention_mask"].sum().item() == sum(map(len, seqs))
            nxt = torch.cat([ids[:, 1:], ids[:, :1] * 0 - 1], 1)
            assert nxt[keep].tolist() == b["labels"].tolist()


def test_segment_forward_refuses_a_model_that_ignores_segments():
    with pytest.raises(UserError, match="--no-padding-free"):
        segment_forward(lambda **kw: None, [(0, 2, [(0, 2)])], input_ids=torch.zeros(1, 2, dtype=torch.long))

@pytest.mark.parametrize("lora", [False, True])
def test_sequence_logps_fast_paths_equal_naive(lora):
    """Packed and padded paths (LM head on completion positions only) vs one-sequence-at-a-time full log_softmax:
    values and parameter gradients; also through peft's LoRA wrapper (the adapters' gradients)."""
    tok = build_tokenizer()
    model = build_model(len(tok)).eval()
    if lora:
        from types import SimpleNamespace

        from plumbing.models import add_lora
        model = add_lora(model, SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None))
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero: make the adapters matter
                torch.nn.init.normal_(p, std=0.1)
    use_segment_attention(model)  # the packed path's attention; unpacked forwards fall through to sdpa
    exs = _examples(tok, 4)
    weights = torch.randn(8)

    def grads(logps):
        model.zero_grad()
        (logps * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    naive = naive_logps(model, tok, exs)
    naive_grads = grads(naive)
    assert all("lora_" in n for n in naive_grads) == lora and naive_grads
    for padding_free in (True, False):
        fast = sequence_logps(model, collate(exs, tok.pad_token_id, padding_free))
        torch.testing.assert_close(fast, naive.detach(), rtol=1e-5, atol=1e-5)
        fast_grads = grads(fast)
        assert fast_grads.keys() == naive_grads.keys()
        for n, g in fast_grads.items():  # atol: fp32 summation-order noise relative to the gradient's scale
            scale = naive_grads[n].abs().max().item()
            torch.testing.assert_close(g, naive_grads[n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")


def test_padding_free_refuses_a_sliding_window_it_would_ignore():
    """A sliding window shorter than a packed sequence changes the attention; segment_attention must not drop it."""
    from transformers import MistralConfig, MistralForCausalLM
    tok = build_tokenizer()
    exs = _examples(tok, 2)
    for window, refused in ((4, True), (512, False)):
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=window, pad_token_id=len(tok) - 1, eos_token_id=len(tok) - 1)).eval()
        use_segment_attention(model)
        batch = collate(exs, tok.pad_token_id, padding_free=True)
        with torch.no_grad():
            if refused:
                with pytest.raises(UserError, match="sliding_window=4.*--no-padding-free"):
                    sequence_logps(model, batch)
            else:  # longer than every sequence: packed equals plain
                torch.testing.assert_close(sequence_logps(model, batch), naive_logps(model, tok, exs))


@pytest.mark.slow
def test_bundled_model_fast_logps_equal_plain_path():
    """fp32, the offline default model: the packed prompt-sharing path and the padded path (LM head on completion
    positions only, chunked log-softmax) give the plain path's log-probs (one sequence at a time, full log_softmax)
    within 1e-5 relative."""
    import tasks
    from plumbing.models import BUNDLED_MODEL, load_model, load_tokenizer
    tok, model = load_tokenizer(BUNDLED_MODEL), load_model(BUNDLED_MODEL).eval()
    use_segment_attention(model)
    rows = [row for _, row in tasks.preference_rows("arithmetic", held_out=True)[::9][:4]]
    rows[0] = rows[0] | {"prompt": rows[0]["prompt"] * 3}  # a multi-turn-length prompt among short ones
    exs = [pair_example(tok, r, 256, 256)[0] | {"source": str(i)} for i, r in enumerate(rows)]
    with torch.no_grad():
        plain = naive_logps(model, tok, exs)
        for padding_free in (True, False):
            fast = sequence_logps(model, collate(exs, tok.pad_token_id, padding_free))
            torch.testing.assert_close(fast, plain, rtol=1e-5, atol=0)


def test_label_logps_divides_by_the_temperature_in_fp32():
    """bf16 logits / T would be rounded to bf16 before the log-softmax; label_logps divides inside its fp32 part.
    Values and gradients equal the fp32 log_softmax(logits / T)."""
    torch.manual_seed(0)
    logits = (torch.randn(12, 3000) * 4).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 3000, (12,))
    ours = label_logps(logits, labels, temperature=0.7, chunk=5)
    ref_in = logits.detach().float().requires_grad_()
    ref = torch.log_softmax(ref_in / 0.7, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    rounded = torch.log_softmax((logits.detach() / 0.7).float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    assert (rounded - ref).abs().max() > 10 * (ours - ref).detach().abs().max()  # the old way was visibly off
    w = torch.randn(12)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(logits.grad.float(), ref_in.grad, rtol=0, atol=1e-2 * ref_in.grad.abs().max().item())


def _random_tries(rng: random.Random, n: int):
    """Packed rows of random tries: a shared stem, sibling groups that share first tokens, a duplicate, a sequence
    that is a prefix of another. -> (row length, segments) per trie."""
    for _ in range(n):
        stem = [rng.randrange(8) for _ in range(rng.randint(1, 5))]
        heads = [[rng.randrange(2) for _ in range(rng.randint(0, 2))] for _ in range(rng.randint(1, 3))]
        seqs = [stem + h + [rng.randrange(8) for _ in range(rng.randint(1, 6))] for h in heads for _ in range(3)]
        seqs += [seqs[0][:], seqs[-1][:max(1, len(seqs[-1]) - 2)]]
        tensors, segments = pack_prefix_tree(seqs, [1] * len(seqs))
        yield tensors["input_ids"].shape[1], segments


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_mask_equals_segment_attention():
    """The CUDA path (one FlexAttention call per layer, block mask from the trie's segments) against today's CPU
    path (segment_attention's sdpa calls) on random tries, with grouped-query heads: FlexAttention's eager forward
    gives the same values; gradients (FlexAttention has no CPU backward) through sdpa with the dense mask of the
    same mask_mod equal today's path's."""
    from torch.nn.attention.flex_attention import create_mask

    from plumbing.packing import FLEX_BLOCK, flex_segment_attention, segment_attention, segment_mask_mod
    torch.manual_seed(0)
    for length, segments in _random_tries(random.Random(2), 8):
        assert len(segments) > 2
        q = torch.randn(1, 4, length, 8, requires_grad=True)
        k, v = (torch.randn(1, 2, length, 8, requires_grad=True) for _ in range(2))
        w = torch.randn(1, length, 4, 8)
        ours, _ = segment_attention(None, q, k, v, None, scaling=0.3, attn_segments=segments)
        flex = flex_segment_attention(q.detach(), k.detach(), v.detach(), segments, 0.3, compiled=False)
        torch.testing.assert_close(flex.transpose(1, 2), ours.detach(), rtol=1e-5, atol=1e-5)
        expected = torch.autograd.grad((ours * w).sum(), (q, k, v))
        padded = -(-length // FLEX_BLOCK) * FLEX_BLOCK
        mask = create_mask(segment_mask_mod(segments, padded, "cpu"), 1, 1, padded, padded, "cpu")
        dense = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[..., :length, :length], scale=0.3, enable_gqa=True)
        got = torch.autograd.grad((dense.transpose(1, 2) * w).sum(), (q, k, v))
        for name, g, e in zip("qkv", got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
