"""SFT: which tokens are in the loss (multi-turn, bundled template), packed == padded == naive, token-mean invariance
across accumulation and world size, bad input, smoke run; the SFT -> reward model -> PPO / DPO pipeline."""
import json
import sys

import pytest
import torch

from common import UserError
from plumbing.models import load_tokenizer
from conftest import (build_model, build_tokenizer, capture_grads, read_metrics, run, script_args, tiny_flags,
                      torchrun_grads_match)
from plumbing.logprobs import kept_logits, label_logps
from plumbing.packing import use_segment_attention
from sft import SFTTrainer, collate, sft_loss, tokenize_conversation, tokenize_row

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6 it is"}]


def _split(tok, ids, mask):
    """-> (decoded loss tokens, decoded context text)."""
    return [tok.decode([i]) for i, m in zip(ids, mask) if m], tok.decode([i for i, m in zip(ids, mask) if not m])


@pytest.mark.slow
def test_multi_turn_mask_bundled_template():
    """SmolLM2's ChatML template: both assistant turns with their <|im_end|> are in the loss; the role headers, the
    newline after each <|im_end|>, system and user turns are not."""
    tok = load_tokenizer("smollm2-135m-instruct")
    ids, mask = tokenize_conversation(tok, CONVERSATION, "x")
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    loss, context = _split(tok, ids, mask)
    assert loss == ["4", "<|im_end|>", "6", " it", " is", "<|im_end|>"]
    assert context == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                       "<|im_start|>assistant\n\n<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n\n")
    # no system message: the template inserts its default one, still context
    ids, mask = tokenize_conversation(tok, CONVERSATION[1:3], "x")
    assert _split(tok, ids, mask)[0] == ["4", "<|im_end|>"] and "SmolLM" in tok.decode(ids[:20])


def test_multi_turn_mask_tiny_template():
    tok = build_tokenizer()
    ids, mask = tokenize_conversation(tok, CONVERSATION, "x")
    loss, context = _split(tok, ids, mask)
    assert loss == ["4", "<eos>", "6", " ", "i", "t", " ", "i", "s", "<eos>"]
    assert context == "<system>Be brief.<eos><user>2+2?<eos><assistant><user>and 3+3?<eos><assistant>"


def test_prompt_completion_row_and_truncation():
    tok = build_tokenizer()
    ex, cut = tokenize_row(tok, {"prompt": "abcdef", "completion": "xyz"}, "x", max_length=7, max_prompt_length=4)
    assert cut and ex["ids"] == tok("cdefxyz", add_special_tokens=False)["input_ids"]  # prompt cut left, EOS cut
    assert ex["mask"] == [False] * 4 + [True] * 3
    ex, cut = tokenize_row(tok, {"prompt": "ab", "completion": "xy"}, "x", 64, 32)
    assert not cut and sum(ex["mask"]) == 3 and ex["ids"][-1] == tok.eos_token_id  # EOS in the loss
    assert tokenize_row(tok, {"messages": [{"role": "user", "content": "a" * 40},
                                           {"role": "assistant", "content": "b"}]}, "x", 20, 10) == (None, True)


def _examples(tok):
    rows = [{"messages": CONVERSATION}, {"prompt": "the cat", "completion": " sat"},
            {"messages": CONVERSATION[:3]}, {"prompt": "the cat", "completion": " ran on"}]  # shared prefixes too
    return [tokenize_row(tok, r, f"r{i}", 128, 64)[0] | {"source": f"r{i}"} for i, r in enumerate(rows)]


def test_packed_equals_padded_equals_naive():
    """The packed row (shared prefixes laid out once) gives the padded batch's summed NLL and gradients, and both
    equal a plain per-sequence full-vocabulary log_softmax over the masked tokens."""
    tok = build_tokenizer()
    exs = _examples(tok)
    results = []
    for padding_free in (True, False, None):
        model = build_model(len(tok), seed=5)
        if padding_free:
            use_segment_attention(model)
        if padding_free is None:  # naive
            total = 0
            for e in exs:
                logp = torch.log_softmax(model(torch.tensor([e["ids"]])).logits[0, :-1].float(), -1)
                tok_lp = logp.gather(-1, torch.tensor(e["ids"][1:])[:, None])[:, 0]
                total = total - tok_lp[torch.tensor(e["mask"][1:])].sum()
        else:
            b = collate(exs, tok.pad_token_id, padding_free)
            n_loss = sum(sum(e["mask"]) for e in exs)
            loss = sft_loss(label_logps(kept_logits(model, b.tensors, b.attention_segments), b["labels"]))
            assert loss.count == n_loss == len(b["labels"])
            total = loss.total
            assert int(b["keep"].sum()) <= n_loss  # LM head on loss positions only
        total.backward()
        results.append((total.detach(), {n: p.grad for n, p in model.named_parameters()}))
    for value, grads in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-5, atol=1e-5)
        for n, g in grads.items():
            torch.testing.assert_close(g, results[0][1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_token_mean_is_invariant_to_accumulation(tiny_model_dir, sft_file, tmp_path):
    """Rows have different numbers of loss tokens: only a mean over the whole step's tokens makes 1 x batch 4 equal
    to 2 micro-batches of 2 (a mean per micro-batch would weigh the tokens differently)."""
    runs = []
    for name, bs, acc in (("one", 4, 1), ("acc", 2, 2)):
        t = SFTTrainer(script_args("sft", tiny_model_dir, sft_file, tmp_path / name, batch_size=bs,
                                   gradient_accumulation_steps=acc, max_grad_norm=0.0, total_steps=2))
        grads = capture_grads(t)
        t.train()
        runs.append((grads, read_metrics(tmp_path / name)))
    (g1, m1), (g2, m2) = runs
    for a, b in zip(g1, g2):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=2e-4, atol=1e-6, msg=n)
    n1 = [m["train/num_tokens"] for m in m1 if "train/num_tokens" in m]
    assert n1 == [m["train/num_tokens"] for m in m2 if "train/num_tokens" in m] and len(n1) == 2


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(tiny_model_dir, sft_file, tmp_path):
    """DDP x2 (batch 2 each) == 1 process x batch 4, on the gradients each step (torchrun, gloo, one launch)."""
    single = SFTTrainer(script_args("sft", tiny_model_dir, sft_file, tmp_path / "single", batch_size=4,
                                    max_grad_norm=0.0, total_steps=2))
    grads = capture_grads(single)
    single.train()
    flags = tiny_flags(tiny_model_dir, sft_file, tmp_path / "ddp", batch_size=2, max_grad_norm=0.0, total_steps=2,
                       eval_every=0, save_every=0, seed=3)
    torchrun_grads_match("sft", flags, tmp_path / "ddp.pt", 29551, grads)


def test_smoke_run_metrics_and_export(tiny_model_dir, sft_file, tmp_path):
    from transformers import AutoModelForCausalLM
    from sft import main
    main(script_args("sft", tiny_model_dir, sft_file, tmp_path, eval_every=2, total_steps=3))
    train = [m for m in read_metrics(tmp_path) if "train/loss" in m]
    assert set(train[0]) >= {"train/loss", "train/num_tokens", "train/tokens_per_s", "train/grad_norm", "train/lr"}
    assert all(m["train/num_tokens"] > 0 for m in train)
    evals = [m["eval/loss"] for m in read_metrics(tmp_path) if "eval/loss" in m]
    assert len(evals) == 3 and evals[-1] < evals[0]
    AutoModelForCausalLM.from_pretrained(tmp_path / "final")


@pytest.mark.parametrize("row,match", [
    ({"text": "hi"}, r"bad.jsonl:2: expected a 'messages' list or 'prompt' and 'completion' fields"),
    ({"prompt": "hi"}, r"bad.jsonl:2: missing key 'completion'"),
    ({"prompt": "hi", "completion": " "}, r"bad.jsonl:2: field 'completion' is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"bad.jsonl:2: field 'messages' has no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     r"bad.jsonl:2: field 'messages' message 1 \(assistant\) is empty"),
    ({"messages": [{"role": "user"}]}, r"bad.jsonl:2: field 'messages' message 0 needs string 'role' and 'content'"),
])
def test_bad_rows(tiny_model_dir, tmp_path, row, match):
    from sft import main
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=match):
        main(script_args("sft", tiny_model_dir, str(bad), tmp_path / "out", eval_size=0))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pipeline_sft_reward_ppo_dpo(tiny_model_dir, sft_file, pairs_file, tmp_path):
    """sft.py -> reward.py (from the SFT model) -> ppo.py --reward-model, and dpo.py from the SFT model, a few steps
    each, through the exported directories, as a user chains them; plus exit code 2 on bad input."""
    def go(script, *flags):
        r = run([sys.executable, script, *flags])
        assert r.returncode == 0, r.stderr[-3000:]
    go("sft.py", *tiny_flags(tiny_model_dir, sft_file, tmp_path / "sft", total_steps=2, save_every=0))
    sft_model = str(tmp_path / "sft" / "final")
    go("reward.py", *tiny_flags(sft_model, pairs_file, tmp_path / "rm", total_steps=2, save_every=0))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": json.loads(line)["prompt"]}) + "\n"
                               for line in open(pairs_file)))
    go("ppo.py", *tiny_flags(sft_model, prompts, tmp_path / "ppo", total_steps=2, save_every=0, batch_size=4,
                             reward_model=str(tmp_path / "rm" / "final"), max_new_tokens=8))
    scores = [m["train/objective/scores"] for m in read_metrics(tmp_path / "ppo") if "train/objective/scores" in m]
    assert len(scores) == 2 and len(set(scores)) == 2  # the learned reward model scored the rollouts
    go("dpo.py", *tiny_flags(sft_model, pairs_file, tmp_path / "dpo", total_steps=2, save_every=0))
    # bad input through the command line: one line, exit code 2, nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    for cmd, what in ((["sft.py", "--dataset", str(bad), "--model", tiny_model_dir, "--eval-size", "0"],
                       f"{bad}:1: field 'messages' has no assistant turn"),
                      (["ppo.py", "--model", tiny_model_dir, "--dataset", str(prompts), "--reward-model", sft_model],
                       "not a sequence classifier")):
        r = run([sys.executable, *cmd, "--output-dir", str(tmp_path / "bad_out")])
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and what in errors[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr and not (tmp_path / "bad_out").exists()


def test_lora_run_exports_merged_model_and_adapter(tiny_model_dir, sft_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from sft import main
    t = main(script_args("sft", tiny_model_dir, sft_file, tmp_path, lora_r=4, total_steps=2))
    assert all("lora_" in n for n, p in t.model.named_parameters() if p.requires_grad)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, tmp_path / "final" / "adapter")
    ids = torch.randint(0, 200, (2, 10))
    torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)
