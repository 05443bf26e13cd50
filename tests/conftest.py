"""Tiny models and tokenizers built in code: no downloads anywhere in the suite."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def build_tokenizer():
    """Byte-level BPE without merges: every byte is a token, any text encodes. pad == eos, as in SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                      bos_token_id=None)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    tok = build_tokenizer()
    build_model(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def write_pairs(path: Path, n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "the a cat dog sat ran on mat up down red blue".split()
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(words, k=rng.randint(3, 12)))
            row = {"prompt": prompt, "chosen": " " + " ".join(rng.choices(words, k=rng.randint(1, 6))),
                   "rejected": " " + " ".join(rng.choices(words, k=rng.randint(1, 6)))}
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 48)


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]


def checkpoint_weights(ckpt_dir) -> dict:
    """The model state dict of a (DCP) checkpoint directory, as plain tensors."""
    import tempfile
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(Path(ckpt_dir) / "dcp", Path(d) / "ckpt.pt")
        return torch.load(Path(d) / "ckpt.pt", weights_only=True)["model"]


def pair_example(tok, row: dict, max_length: int, max_prompt_length: int):
    """A preference row as dpo.py tokenizes it: ({prompt, completions: [chosen, rejected]}, truncated?)."""
    from packing import tokenize_completions
    return tokenize_completions(tok, row["prompt"], [row["chosen"], row["rejected"]], max_length, max_prompt_length)


def pair_batch(exs: list[dict], pad_id: int, padding_free: bool):
    """dpo.py's micro-batch layout: chosen then rejected sequences of every pair ([c_1..c_B, r_1..r_B])."""
    from common import Batch
    from packing import collate_completions
    pairs = [(e["prompt"], e["completions"][k]) for k in (0, 1) for e in exs]
    tensors, segments = collate_completions(pairs, pad_id, padding_free)
    return Batch(tensors, len(exs), sum(len(p) + len(c) for p, c in pairs), segments=segments)


def naive_logps(model, tok, exs):
    """One sequence at a time, full log_softmax over the vocabulary: the plain reference implementation."""
    out = []
    for k in (0, 1):  # chosen, rejected
        for e in exs:
            ids = torch.tensor([e["prompt"] + e["completions"][k]])
            logp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1]
            tgt = ids[0, 1:]
            tok_lp = logp.gather(-1, tgt[:, None]).squeeze(-1)
            out.append(tok_lp[len(e["prompt"]) - 1:].sum())
    return torch.stack(out)


ENV = os.environ | {"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(cmd, **kw):
    """A script run as a user would run it (from the repo root)."""
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def tiny_flags(model, data, out, **kw):
    """dpo.py command-line flags for a few fast fp32 steps on the tiny model."""
    flags = dict(model=model, dataset=data, output_dir=str(out), precision="fp32", total_steps=4, learning_rate=1e-3,
                 log_every=1, eval_every=2, save_every=2, max_length=64, max_prompt_length=32, warmup_steps=0) | kw
    return [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}"
            for k, v in ((k.replace("_", "-"), v) for k, v in flags.items())]


def dpo_args(tiny_model_dir, pairs_file, out, **kw):
    """dpo.Args for in-process runs on the tiny model."""
    from dpo import Args
    base = dict(model=tiny_model_dir, dataset=pairs_file, output_dir=str(out), precision="fp32", batch_size=4,
                total_steps=3, learning_rate=1e-3, warmup_steps=0, log_every=1, eval_every=0, save_every=0,
                max_length=64, max_prompt_length=32, seed=3)
    return Args(**(base | kw))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP shards are DTensors (a collective)


def synced_grads(trainer) -> dict:
    """An optimizer update's gradients as synced over micro-batches and ranks, before clipping; whole under FSDP."""
    return {n: full(p.grad).detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def capture_grads(trainer):
    """Record synced_grads at each optimizer update (BaseTrainer.clip_gradients runs once per update)."""
    grads, clip = [], trainer.clip_gradients

    def wrapped():
        grads.append(synced_grads(trainer))
        return clip()
    trainer.clip_gradients = wrapped
    return grads


def torchrun_grads_match(script: str, flags: list[str], out_pt, port: int, expected: list[dict]) -> None:
    """tests/parity_worker.py under torchrun x2 (gloo): its gradients at every step equal `expected` (1 process)."""
    r = subprocess.run(["torchrun", "--nproc_per_node=2", f"--master_port={port}", "tests/parity_worker.py",
                        str(out_pt), script] + flags, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out_pt)["grads"]
    assert len(got) == len(expected) > 0
    for a, b in zip(expected, got):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=2e-4, atol=1e-6, msg=n)


def write_sft_rows(path: Path, n: int, seed: int = 0) -> str:
    """SFT rows of both forms: prompt/completion strings and multi-turn conversations of varying length."""
    rng = random.Random(seed)
    words = "the a cat dog sat ran on mat up down red blue".split()
    say = lambda lo, hi: " ".join(rng.choices(words, k=rng.randint(lo, hi)))  # noqa: E731
    with open(path, "w") as f:
        for i in range(n):
            if i % 2:
                msgs = [{"role": "system", "content": "be terse"}] if i % 3 else []
                for _ in range(rng.randint(1, 3)):
                    msgs += [{"role": "user", "content": say(2, 8)}, {"role": "assistant", "content": say(1, 6)}]
                row = {"messages": msgs}
            else:
                row = {"prompt": say(3, 10), "completion": " " + say(1, 8)}
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory):
    return write_sft_rows(tmp_path_factory.mktemp("data") / "sft.jsonl", 48)


def script_args(script: str, model, data, out, **kw):
    """Args of sft.py / reward.py for in-process runs on the tiny model."""
    import importlib
    base = dict(model=model, dataset=data, output_dir=str(out), precision="fp32", batch_size=4, total_steps=3,
                learning_rate=1e-3, warmup_steps=0, log_every=1, eval_every=0, save_every=0, max_length=64,
                max_prompt_length=32, seed=3)
    return importlib.import_module(script).Args(**(base | kw))


GRPO_REWARDS = '''
def count_a(prompts, completions, **fields):
    return [c.count("a") / 4 + 0.1 * len(fields["topic"][i]) for i, c in enumerate(completions)]
def length(prompts, completions, **fields):
    return [len(c) / 8 for c in completions]
def nan(prompts, completions, **fields):
    return [float("nan")] * len(completions)
def short(prompts, completions, **fields):
    return [1.0]
def boom(prompts, completions, **fields):
    return {}["nope"]
'''


def write_prompt_task(d: Path, n: int = 24) -> Path:
    """prompts.jsonl (string and chat prompts, a `topic` field for the reward) and my_rewards.py in d."""
    (d / "my_rewards.py").write_text(GRPO_REWARDS)
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(n):
            prompt = f"say a {i}" if i % 2 else [{"role": "user", "content": f"say b {i}"}]
            f.write(json.dumps({"prompt": prompt, "topic": "x" * (i % 3)}) + "\n")
    return d


def fixed_grpo_rollout(trainer, groups: list[int], old_policy_shift: float = 0.0) -> dict:
    """A deterministic GRPO rollout (no sampling) of train prompts `groups`: ragged completions, some without EOS,
    each group's rewards fixed by its index (group 0: all equal). The same global group gets the same rollout on any
    rank, so a rank's share of a global batch is exactly its groups' rollouts. old_policy_shift > 0 (with
    --num-iterations > 1) moves the old policy's log-probs by seeded noise of that size, so ratios differ from 1."""
    from rollout import truncate_after_eos
    G, L, eos = trainer.args.num_generations, trainer.args.max_new_tokens, trainer.tokenizer.eos_token_id
    examples, comps, rewards = [], [], []
    for g in groups:
        gen = torch.Generator().manual_seed(100 + g)
        for k in range(G):
            n = int(torch.randint(1, L + 1, (1,), generator=gen))
            ids = torch.randint(0, eos, (L,), generator=gen)
            if k:  # the first completion of each group never ends: truncated at max_new_tokens
                ids[n - 1] = eos
            comps.append(ids)
            examples.append(trainer.train_data[g])
        rewards += [0.5] * G if g == 0 else torch.rand(G, generator=gen).tolist()
    completions, mask, has_eos = truncate_after_eos(torch.stack(comps), eos, trainer.tokenizer.pad_token_id)
    t = trainer.build_rollout(examples, trainer.make_batch(examples), completions, mask, has_eos,
                              torch.tensor(rewards))
    t.pop("zero_std")
    if old_policy_shift:
        noise = [torch.randn(G, L, generator=torch.Generator().manual_seed(200 + g)) for g in groups]
        t["old_logps"] = t["old_logps"] + old_policy_shift * torch.cat(noise)[:, :t["old_logps"].shape[1]]
    return t


def grads_per_variant(trainer, rollout: dict) -> dict:
    """"loss_type/level" -> the synced gradients of one update on `rollout`, for every GRPO --loss-type with token-
    and sequence-level (GSPO) importance sampling; the trainer's own flags are put back."""
    from grpo import ImportanceSamplingLevel, LossType
    a, grads = trainer.args, {}
    saved = a.loss_type, a.importance_sampling_level
    for level in ImportanceSamplingLevel:
        for lt in LossType:
            a.loss_type, a.importance_sampling_level = lt, level
            grads[f"{lt}/{level}"] = update_grads(trainer, trainer.micro_batches(rollout))
    a.loss_type, a.importance_sampling_level = saved
    return grads


def update_grads(trainer, micro_batches) -> dict:
    """The synced gradients of one optimizer update over micro_batches; the update itself is skipped."""
    grads, clip, step = [], trainer.clip_gradients, trainer.optimizer.step
    trainer.clip_gradients = lambda: grads.append(synced_grads(trainer)) or clip()
    trainer.optimizer.step = lambda *a, **k: None
    try:
        trainer.optimizer_update(micro_batches)
    finally:
        trainer.optimizer.step, trainer.clip_gradients = step, clip
    return grads[0]
