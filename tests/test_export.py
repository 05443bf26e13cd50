"""The streamed HF export (plumbing/export.py) against save_pretrained itself, in one process: the same files, byte for
byte (safetensors shards, their index, tied weights once), for a plain model, a sharded one, LoRA merged (and its
adapter), a LoRA sequence classifier (modules_to_save) and an MoE model whose experts transformers converts on save;
the generation config stops at the run's end-of-turn ids; leftovers of killed exports are cleared.
FSDP x2 against these files: tests/test_scaling.py; memory: tests/test_memory.py; signals: tests/test_safeguards.py."""
import copy
import os
from pathlib import Path

import pytest
import torch

from conftest import build_model, build_tokenizer, same_files, script_args, tensors, write_sft_rows
from plumbing.export import export_final


def export(model, tok, out: Path, **kw) -> Path:
    export_final(out, model, tok, True, say=lambda *a: None, **kw)
    return out / "final"


@pytest.fixture
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("max_shard_size", ["50GB", "12KB"])
def test_plain_model_equals_save_pretrained(tok, tmp_path, max_shard_size):
    """Tied embeddings: model.embed_tokens.weight alone (no lm_head.weight); 12KB: several shards and the index, split
    as save_pretrained splits a model loaded with from_pretrained (the one-process run's), also for one built here."""
    from transformers import AutoModelForCausalLM
    build_model(len(tok)).save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    loaded.save_pretrained(tmp_path / "ref", max_shard_size=max_shard_size)
    model = build_model(len(tok))  # the same weights (seeded), never saved or loaded
    for name, m in (("built", model), ("loaded", loaded)):
        final = export(m, tok, tmp_path / name, max_shard_size=max_shard_size)
        same_files(final, tmp_path / "ref")
    assert "lm_head.weight" not in tensors(final) and "model.embed_tokens.weight" in tensors(final)
    assert (final / "model.safetensors.index.json").exists() == (max_shard_size == "12KB")
    back = AutoModelForCausalLM.from_pretrained(final)
    for (n, p), (m, q) in zip(back.state_dict().items(), model.state_dict().items()):
        assert n == m and torch.equal(p, q), n


def _lora(model):
    from types import SimpleNamespace

    from plumbing.models import add_lora
    args = SimpleNamespace(lora_r=4, lora_alpha=None, lora_dropout=0.0, lora_target_modules=None)
    peft_model = add_lora(model, args, **({"task_type": "SEQ_CLS"} if "Sequence" in type(model).__name__ else {}))
    torch.manual_seed(1)
    with torch.no_grad():  # trained adapters: B is zero at init, which would merge nothing
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return peft_model


@pytest.mark.parametrize("kind", ["causal", "classifier"])
def test_lora_export_is_peft_merge_and_its_adapter(tok, tmp_path, kind):
    """final/ = peft's merge_and_unload() saved (Linear layers on every projection; a classifier's score head via
    modules_to_save), final/adapter = the peft model's own save_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForSequenceClassification
    base = build_model(len(tok))
    if kind == "classifier":
        torch.manual_seed(0)
        config = copy.deepcopy(base.config)
        config.num_labels = 1
        base = LlamaForSequenceClassification(config)
    base.save_pretrained(tmp_path / "base")
    peft_model = _lora(base)
    final = export(peft_model, tok, tmp_path / "run")
    peft_model.save_pretrained(tmp_path / "ref_adapter")
    same_files(final / "adapter", tmp_path / "ref_adapter", skip=("README.md",))
    copy.deepcopy(peft_model).merge_and_unload().save_pretrained(tmp_path / "ref")
    same_files(final, tmp_path / "ref")
    auto = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
    merged, fresh = auto.from_pretrained(final), auto.from_pretrained(tmp_path / "ref")
    adapted = PeftModel.from_pretrained(auto.from_pretrained(tmp_path / "base"), final / "adapter")
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, fresh(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)


def test_moe_weight_conversion_is_reverted_per_layer(tmp_path):
    """transformers fuses an MoE's experts on load and splits them again on save: the export does it one decoder
    layer at a time and writes what save_pretrained writes."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        tie_word_embeddings=False, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1))
    final = export(model, tok, tmp_path / "run", max_shard_size="40KB")
    model.save_pretrained(tmp_path / "model")
    Qwen3MoeForCausalLM.from_pretrained(tmp_path / "model").save_pretrained(tmp_path / "ref", max_shard_size="40KB")
    same_files(final, tmp_path / "ref")
    assert any(".experts.3." in k for k in tensors(final))  # one tensor per expert, as on the hub


def test_generation_config_stops_at_the_runs_end_of_turn(tmp_path):
    """A base-model tokenizer (EOS <|endoftext|>) with a chat template that ends turns with <|im_end|>: the exported
    generation config's eos_token_id is the run's end-of-turn ids, turn end first, so `generate` on final/ stops at
    <|im_end|> as training and sampling did."""
    import families
    from transformers import AutoModelForCausalLM, GenerationConfig

    import sft
    tok = families.build_tokenizer("qwen2.5-base")
    model_dir = families.save_family("qwen2.5-base", tmp_path / "model",
                                     families.biased_model(tok, {"<|im_end|>": 8.0, "a": 4.0}))
    rows = write_sft_rows(tmp_path / "rows.jsonl", 16)
    trainer = sft.main(script_args("sft", model_dir, rows, tmp_path / "run", total_steps=1, learning_rate=1e-6))
    ids = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert trainer.end_of_turn == ids
    assert GenerationConfig.from_pretrained(tmp_path / "run" / "final").eos_token_id == ids
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    prompt = tok("hi", return_tensors="pt").input_ids
    out = final.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out[0, prompt.shape[1]:].tolist() == [ids[0]]  # stopped at the turn end


def test_leftovers_of_killed_exports_are_cleared(tok, tmp_path):
    """final.tmp/ (a kill mid-export) and final.old*/ (a kill between the swap's two renames, also one named with this
    very pid: containers reuse pids) are gone after the next export; a final.old*/ left without final/ is the
    complete earlier export: it is final/ again until the new one replaces it."""
    model, run = build_model(len(tok)), tmp_path / "run"
    final = export(model, tok, run)
    (run / "final.tmp").mkdir()
    (run / "final.tmp" / "partial").write_text("x")
    stale = run / f"final.old{os.getpid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_text("an older export")
    export(model, tok, run)
    assert sorted(p.name for p in run.iterdir()) == ["final"] and (final / "model.safetensors").stat().st_size > 100

    os.replace(final, run / "final.old-123-abcd")  # killed between the renames: no final/
    from plumbing.export import clear_leftovers
    clear_leftovers(final)
    assert sorted(p.name for p in run.iterdir()) == ["final"] and (final / "config.json").exists()
