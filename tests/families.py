"""Tokenizers of eight model families built in code (no downloads): every byte is a token, plus each family's special
tokens, its BOS behaviour on plain text, its generation config's eos_token_id and a chat template written as small as
it can be while keeping the family's quirks (the token layout of the real one):

- qwen2.5 / qwen2.5-base: ChatML with a default system prompt; the instruct tokenizer's EOS is <|im_end|>, the base
  one's <|endoftext|> (ChatML on a base tokenizer); no BOS anywhere.
- llama-3.1: BOS in the template and on plain text; a system header with the knowledge date; contents trimmed; turns end
  with <|eot_id|> while this tokenizer's EOS is <|end_of_text|>; generation config [end_of_text, eom, eot].
- gemma: BOS; the system prompt folded into the first user turn; roles must alternate; the assistant is `model`;
  turns end with <end_of_turn> and a newline of glue.
- phi-3: no BOS in the template, <s> on plain text; turns end with <|end|>; a closing EOS after the last turn, so a
  conversation's prefixes do not render as its beginning.
- mistral: v0.3's layout: BOS, [INST] ... [/INST], the system prompt moved into the LAST user turn, " " + trimmed
  content + </s>, no generation prompt.
- deepseek-r1: BOS + system text, <｜User｜>/<｜Assistant｜>, the reasoning before </think> dropped from assistant
  turns, a generation prompt `<｜Assistant｜><think>\n` that is not how a rendered turn begins.
- qwen3: ChatML without a default system prompt; the last turn after the last user message gets a think block
  (empty unless its content has one), earlier turns lose theirs; <think> and </think> are plain added tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN25 = ("{% if messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}" + CHATML)
LLAMA31 = ("{{ bos_token }}{% set system = '' %}{% if messages[0]['role'] == 'system' %}"
           "{% set system = messages[0]['content'] | trim %}{% set messages = messages[1:] %}{% endif %}"
           "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n"
           "Today Date: 26 Jul 2024\\n\\n' + system + '<|eot_id|>' }}"
           "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
           " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% set first = '' %}{% if messages[0]['role'] == 'system' %}"
         "{% set first = messages[0]['content'] + '\\n\\n' %}{% set messages = messages[1:] %}{% endif %}"
         "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n'"
         " + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
MISTRAL = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
           "{% set messages = messages[1:] %}{% endif %}"
           "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
           "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
           "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
           "{% if loop.index0 == ns.last_user and system is defined %}"
           "{{ '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}"
           "{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
           "{% else %}{{ ' ' + m['content'] | trim + eos_token }}{% endif %}{% endfor %}")
DEEPSEEK_R1 = ("{% set system = '' %}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
               "{% set messages = messages[1:] %}{% endif %}{{ bos_token + system }}"
               "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
               "{% else %}{{ '<｜Assistant｜>' + m['content'].split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
QWEN3 = ("{% set ns = namespace(last_query=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
         "{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
         "{% for m in messages %}{% if m['role'] != 'assistant' %}"
         "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
         "{% else %}{% set content = m['content'] %}{% set reasoning = '' %}{% if '</think>' in content %}"
         "{% set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
         "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
         "{% if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
         "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n'"
         " + content.lstrip('\\n') + '<|im_end|>\\n' }}"
         "{% else %}{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{% endif %}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@dataclass
class Family:
    specials: list[str]
    eos: str
    template: str
    generation_eos: list[str]
    """generation_config.json's eos_token_id"""
    stops: list[str]
    """the end-of-turn tokens expected, the one a completion ends with first"""
    bos: str | None = None
    plain_bos: bool = False
    """the tokenizer adds BOS to plain text"""
    template_bos: bool = False
    """the chat template writes BOS"""
    pad: str | None = None
    plain_added: list[str] = field(default_factory=list)
    """added tokens that are not special (decoded like text)"""


FAMILIES = {
    "qwen2.5": Family(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", QWEN25,
                      ["<|im_end|>", "<|endoftext|>"], ["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>"),
    "qwen2.5-base": Family(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", QWEN25,
                           ["<|endoftext|>"], ["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>"),
    "llama-3.1": Family(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eom_id|>", "<|eot_id|>"], "<|end_of_text|>", LLAMA31,
                        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
                        ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"],
                        bos="<|begin_of_text|>", plain_bos=True, template_bos=True),
    "gemma": Family(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<eos>", GEMMA,
                    ["<eos>", "<end_of_turn>"], ["<end_of_turn>", "<eos>"], bos="<bos>", plain_bos=True,
                    template_bos=True, pad="<pad>"),
    "phi-3": Family(["<s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"], "<|endoftext|>",
                    PHI3, ["<|endoftext|>", "<|assistant|>", "<|end|>"], ["<|end|>", "<|endoftext|>", "<|assistant|>"],
                    bos="<s>", plain_bos=True, pad="<|endoftext|>"),
    "mistral": Family(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "</s>", MISTRAL, ["</s>"], ["</s>"], bos="<s>",
                      plain_bos=True, template_bos=True),
    "deepseek-r1": Family(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
                          "<｜end▁of▁sentence｜>", DEEPSEEK_R1, ["<｜end▁of▁sentence｜>"], ["<｜end▁of▁sentence｜>"],
                          bos="<｜begin▁of▁sentence｜>", plain_bos=True, template_bos=True,
                          pad="<｜end▁of▁sentence｜>", plain_added=["<think>", "</think>"]),
    "qwen3": Family(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", QWEN3,
                    ["<|im_end|>", "<|endoftext|>"], ["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>",
                    plain_added=["<think>", "</think>"]),
}


def build_tokenizer(name: str):
    """The family's tokenizer (pad = EOS where the family has no pad token, as common.load_tokenizer sets it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    f = FAMILIES[name]
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in f.specials])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in f.plain_added])
    if f.plain_bos:  # as Llama's tokenizer.json: BOS before every plain text
        tk.post_processor = processors.TemplateProcessing(single=f"{f.bos} $A", pair=f"{f.bos} $A {f.bos} $B",
                                                          special_tokens=[(f.bos, tk.token_to_id(f.bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=f.bos, eos_token=f.eos, pad_token=f.pad or f.eos)
    tok.chat_template = f.template
    return tok


def save_family(name: str, path: Path, model=None) -> str:
    """A model directory: the tokenizer, the model (if given) and the family's generation_config.json."""
    tok = build_tokenizer(name)
    path.mkdir(parents=True, exist_ok=True)
    if model is not None:
        model.save_pretrained(path)
    tok.save_pretrained(path)
    eos = tok.convert_tokens_to_ids(FAMILIES[name].generation_eos)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos if len(eos) > 1 else eos[0]}))
    return str(path)


def biased_model(tok, favoured: dict[str, float]):
    """A tiny Llama whose next-token distribution is the same at every position: softmax of `favoured` (token ->
    logit), every other token at -20. All embeddings are one vector and the layers add nothing to the residual, so
    the final hidden state is constant and the LM head alone sets the logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        v = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(0))
        model.model.embed_tokens.weight.copy_(v.expand_as(model.model.embed_tokens.weight))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        h = v * torch.rsqrt(v.pow(2).mean() + cfg.rms_norm_eps)  # the final RMSNorm of v (weight 1)
        unit = h / h.pow(2).sum()  # unit . h = 1
        model.lm_head.weight.copy_(-20 * unit.expand_as(model.lm_head.weight))
        for t, logit in favoured.items():
            model.lm_head.weight[tok.convert_tokens_to_ids(t)] = logit * unit
    return model


RECORDED: list[str] = []


def record(prompts, completions, **fields):
    """A reward function that keeps the texts it is handed (grpo.py --reward-fn families:record)."""
    RECORDED.extend(completions)
    return [float(len(c)) for c in completions]


def chatty_model(tok, favoured: dict[str, float], seed: int = 0):
    """A tiny random Llama whose replies favour a few tokens (token -> extra logit: its turn end, so turns do end)
    while every logit still depends on the whole context (attention and MLPs are random, not switched off)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # the mean final hidden state over random inputs: favoured rows point along it
        h = model.model(torch.randint(0, len(tok), (8, 32))).last_hidden_state.mean((0, 1))
        for t, logit in favoured.items():
            model.lm_head.weight[tok.convert_tokens_to_ids(t)] += logit * h / h.pow(2).sum()
    return model
