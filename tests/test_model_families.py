"""Any model family (tests/families.py: ChatML instruct and base, Llama-3.1, Gemma, Phi-3, Mistral, DeepSeek-R1, Qwen3):
its stop set, the SFT loss mask token by token, BOS counts, the end token of every row format, a GRPO rollout that
stops at the turn end; reward models scored where they were trained; sampling flags the log-probs cannot follow."""
import json
import sys

import pytest
import torch

import families
from common import UserError
from plumbing.models import end_of_turn_ids
from families import FAMILIES, biased_model, build_tokenizer, save_family
from plumbing.data import encode_completion, encode_prompt
from sft import tokenize_conversation, tokenize_row

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6"}]
REASONING = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
             {"role": "user", "content": "and 3+3?"},
             {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"}]

# CONVERSATION rendered by each family's template, [the loss tokens] in brackets: each assistant turn's content and
# its end-of-turn token; headers, the system prompt wherever the template puts it, and glue are context
MASKED = {
    "qwen2.5": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
               "[4<|im_end|>]\n<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n[6<|im_end|>]\n",
    "llama-3.1": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                 "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\n2+2?"
                 "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[4<|eot_id|>]<|start_header_id|>user"
                 "<|end_header_id|>\n\nand 3+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                 "[6<|eot_id|>]",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\n2+2?<end_of_turn>\n<start_of_turn>model\n[4<end_of_turn>]\n"
             "<start_of_turn>user\nand 3+3?<end_of_turn>\n<start_of_turn>model\n[6<end_of_turn>]\n",
    "phi-3": "<|system|>\nBe brief.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n[4<|end|>]\n<|user|>\n"
             "and 3+3?<|end|>\n<|assistant|>\n[6<|end|>]\n<|endoftext|>",
    "mistral": "<s>[INST] 2+2?[/INST] [4</s>][INST] Be brief.\n\nand 3+3?[/INST] [6</s>]",
    "deepseek-r1": "<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜>[4<｜end▁of▁sentence｜>]"
                   "<｜User｜>and 3+3?<｜Assistant｜>[6<｜end▁of▁sentence｜>]",
    "qwen3": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
             "[4<|im_end|>]\n<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
             "[6<|im_end|>]\n",
}
MASKED["qwen2.5-base"] = MASKED["qwen2.5"]
# REASONING: an earlier turn's reasoning is not rendered (so not learnt); Qwen3's last turn keeps it, in the loss
MASKED_REASONING = {
    "deepseek-r1": "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>[\n\n4<｜end▁of▁sentence｜>]<｜User｜>and 3+3?"
                   "<｜Assistant｜>[\n\n6<｜end▁of▁sentence｜>]",
    "qwen3": "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[4<|im_end|>]\n<|im_start|>user\nand 3+3?"
             "<|im_end|>\n<|im_start|>assistant\n<think>\n[add again\n</think>\n\n6<|im_end|>]\n",
}


def bracketed(tok, ids: list[int], mask: list[bool]) -> str:
    """The decoded tokens, [runs in the loss] bracketed: a token-by-token picture of the mask."""
    out, inside = "", False
    for i, m in zip(ids, mask):
        if m != inside:
            out, inside = out + ("[" if m else "]"), m
        out += tok.decode([i])
    return out + ("]" if inside else "")


@pytest.mark.parametrize("name", FAMILIES)
def test_stop_set_is_template_turn_end_then_eos_then_generation_config(name, tmp_path):
    tok = build_tokenizer(name)
    ids = end_of_turn_ids(tok, save_family(name, tmp_path))
    assert tok.convert_ids_to_tokens(ids) == FAMILIES[name].stops
    assert end_of_turn_ids(tok)[0] == ids[0]  # the turn end needs no model directory


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_mask_is_each_assistant_content_and_its_turn_end(name):
    tok = build_tokenizer(name)
    ids, mask = tokenize_conversation(tok, CONVERSATION, "x")
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert bracketed(tok, ids, mask) == MASKED[name]
    if name in MASKED_REASONING:
        assert bracketed(tok, *tokenize_conversation(tok, REASONING, "x")) == MASKED_REASONING[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_bos_as_the_tokenizer_adds_it_never_doubled(name):
    f, tok = FAMILIES[name], build_tokenizer(name)
    count = lambda ids: ids.count(tok.bos_token_id) if tok.bos_token_id is not None else 0  # noqa: E731
    plain, chat = int(f.plain_bos), int(f.template_bos)
    assert count(encode_prompt(tok, "2+3=")) == plain
    assert encode_prompt(tok, "2+3=")[:plain] == [tok.bos_token_id] * plain  # in front
    if f.bos:
        assert count(encode_prompt(tok, f.bos + "2+3=")) == 1  # already there: not a second one
    assert count(encode_prompt(tok, CONVERSATION[1:2])) == chat
    assert encode_prompt(tok, "2+3=")[-1] != tok.eos_token_id
    row, _ = tokenize_row(tok, {"prompt": "2+3=", "completion": " 5"}, "x", 64, 32)
    assert count(row["ids"]) == plain and row["ids"][-1] == tok.eos_token_id  # plain text ends with EOS, as TRL
    row, _ = tokenize_row(tok, {"messages": CONVERSATION}, "x", 256, 128)
    assert count(row["ids"]) == chat


@pytest.mark.parametrize("name", FAMILIES)
def test_every_chat_row_format_ends_with_the_turn_end(name):
    """A conversational prompt/completion row, a messages row and a preference completion all teach one stop: the
    template's turn end (not necessarily EOS), once."""
    tok = build_tokenizer(name)
    end = tok.convert_tokens_to_ids(FAMILIES[name].stops[0])
    user, reply = CONVERSATION[1:2], [{"role": "assistant", "content": "4"}]
    pc, _ = tokenize_row(tok, {"prompt": user, "completion": reply}, "x", 256, 128)
    msgs, _ = tokenize_row(tok, {"messages": user + reply}, "x", 256, 128)
    assert pc["ids"][-1] == end and [i for i, m in zip(msgs["ids"], msgs["mask"]) if m][-1] == end
    assert [i for i, m in zip(pc["ids"], pc["mask"]) if m] == [i for i, m in zip(msgs["ids"], msgs["mask"]) if m]
    pc, _ = tokenize_row(tok, {"prompt": user, "completion": "4"}, "x", 256, 128)  # string completion, chat prompt
    assert pc["ids"][-1] == end
    assert encode_completion(tok, reply) == encode_completion(tok, [{"role": "assistant", "content": "4"}])
    ids = encode_completion(tok, reply)
    assert ids[-1] == end and ids.count(end) == 1
    assert encode_completion(tok, "4" + FAMILIES[name].stops[0], chat=True) == ids  # already there: kept once


@pytest.mark.parametrize("name", FAMILIES)
def test_grpo_rollout_stops_at_the_turn_end(name, tmp_path):
    """A tiny model that emits `a` or `b` or the template's turn end (p = 0.4 at every step) stops at the first turn
    end, which is the last valid token of its completion, and the reward function gets the text before it and nothing
    sampled after."""
    from grpo import Args, GRPOTrainer
    from rollout import sample
    tok = build_tokenizer(name)
    end = FAMILIES[name].stops[0]
    model = biased_model(tok, {"a": 2.0, "b": 2.0, end: 2.0 + float(torch.tensor(4 / 3).log())})
    path = save_family(name, tmp_path / "model", model)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"say {i}"}]}) + "\n")
    tr = GRPOTrainer(Args(model=path, dataset=str(tmp_path / "prompts.jsonl"), reward_fn=["families:record"],
                          output_dir=str(tmp_path / "run"), precision="fp32", batch_size=2, num_generations=8,
                          max_new_tokens=10, temperature=1.0, eval_size=2, save_every=0, seed=1))
    assert tok.convert_ids_to_tokens(tr.end_of_turn) == FAMILIES[name].stops
    families.RECORDED.clear()
    ro = sample(tr, tr.next_examples(), num_samples=8)
    tr.scorer(ro)
    texts, end_id, ended = list(families.RECORDED), tok.convert_tokens_to_ids(end), 0
    assert len(texts) == 16
    for ids, n, text in zip(ro.completions.tolist(), ro.mask.sum(1).int().tolist(), texts):
        stops = [k for k, i in enumerate(ids[:n]) if i in tr.end_of_turn]
        assert stops in ([], [n - 1]) and (not stops or ids[n - 1] == end_id)  # one turn end, the last token
        assert ids[n:] == [tok.pad_token_id] * (len(ids) - n)  # nothing after it
        ended += bool(stops)
        assert text == tok.decode(ids[:n - len(stops)]) and set(text) <= {"a", "b"}
    assert ended >= 12 and (~ro.has_eos).float().mean().item() == pytest.approx(1 - ended / 16)


def test_reward_model_exported_as_trl_does_is_scored_where_trl_trained_it(tmp_path):
    """A sequence classifier saved the way TRL's RewardTrainer leaves it (pad == EOS, no reward.py flag) is scored by
    ppo.py where transformers' pooling, and so TRL's training, reads it: the last token that is not pad, here the one
    BEFORE the EOS. (reward.py's own export, scored at the EOS it trains on: test_reward.py.)"""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification
    from conftest import build_tokenizer as smol_like  # pad == EOS == turn end, as SmolLM2
    from rollout import reward_model_scores
    from plumbing.generation import truncate_after_eos
    from rollout import left_pad
    tok = smol_like()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.eos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    eos = tok.eos_token_id
    prompts = [tok("the cat", add_special_tokens=False)["input_ids"], tok("a", add_special_tokens=False)["input_ids"]]
    raw = torch.tensor([tok(" sat", add_special_tokens=False)["input_ids"] + [eos, 70, 71],
                        tok(" ran on", add_special_tokens=False)["input_ids"]])  # the second never ends
    responses, mask, _ = truncate_after_eos(raw, eos, tok.pad_token_id)
    ids, attn = left_pad(prompts, tok.pad_token_id)
    ours = reward_model_scores(rm, torch.cat([ids, responses], 1), torch.cat([attn, mask.long()], 1))
    with torch.no_grad():
        trl = [rm(input_ids=torch.tensor([p + r[:int(m.sum())]])).logits[0, 0]
               for p, r, m in zip(prompts, responses.tolist(), mask)]
        at_eos = rm.score(rm.model(input_ids=torch.tensor([prompts[0] + responses[0, :5].tolist()])).last_hidden_state
                          [0, -1])[0]
    torch.testing.assert_close(ours, torch.stack(trl))
    assert abs(at_eos - ours[0]) > 1e-4  # the EOS itself scores differently: the test can tell


def test_sampling_flags_the_log_probs_cannot_follow_are_refused():
    import grpo
    import ppo
    for Args in (grpo.Args, ppo.Args):
        with pytest.raises(UserError, match=r"--top-p 0.9: must be 1: the log-probs, ratios and KL use the full"):
            Args(top_p=0.9).validate()
    a = grpo.Args(advantage="rloo")
    a.validate()
    assert a.scale_rewards == grpo.ScaleRewards.none  # RLOO is unscaled
    a = grpo.Args()
    a.validate()
    assert a.scale_rewards == grpo.ScaleRewards.group
    for scale in ("group", "batch"):
        with pytest.raises(UserError, match=rf"--advantage rloo with --scale-rewards {scale}: RLOO's advantage"):
            grpo.Args(advantage="rloo", scale_rewards=scale).validate()


@pytest.mark.slow
def test_sft_cli_on_a_gemma_layout_model(tmp_path):
    """sft.py as a user runs it on a model whose turn end is not its EOS: it says which tokens end a turn, and
    trains on exactly the loss tokens the masks above define (both row formats)."""
    from conftest import run, tiny_flags
    tok = build_tokenizer("gemma")
    path = save_family("gemma", tmp_path / "model", biased_model(tok, {"a": 1.0}))
    rows = [{"messages": CONVERSATION[1:]}, {"prompt": CONVERSATION[1:2], "completion": CONVERSATION[2:3]}] * 4
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = tiny_flags(path, str(tmp_path / "rows.jsonl"), tmp_path / "out", total_steps=1, max_length=128,
                       max_prompt_length=64)
    r = run([sys.executable, "sft.py", "--eval-size=0"] + flags)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "end of turn: ['<end_of_turn>', '<eos>']" in r.stdout
    n_loss = sum(sum(tokenize_row(tok, row, "x", 128, 64)[0]["mask"]) for row in rows)
    assert n_loss == 4 * (2 * 2 + 2)  # "4<end_of_turn>", "6<end_of_turn>"; the prompt/completion row "4<end_of_turn>"
    assert f"train: 8 sequences, {n_loss} loss tokens" in r.stdout
