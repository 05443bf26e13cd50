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


def build_tokenizer(permuted: bool = False):
    """Byte-level BPE without merges: every byte is a token, any text encodes. pad == eos, as in SmolLM2.
    permuted: the same tokens and size, other ids (each byte's id reversed: the same text -> other ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet, reverse=permuted))}
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


def big_teacher_dir(d: Path) -> tuple[Path, int, int]:
    """A 39M-parameter Llama sharing the tiny model's tokenizer (a teacher far bigger than the tiny student) ->
    (its directory, its parameters, one decoder layer's parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=12,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1,
                      bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.model.layers[0].parameters())


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
    from plumbing.data import tokenize_completions
    return tokenize_completions(tok, row["prompt"], [row["chosen"], row["rejected"]], max_length, max_prompt_length)


def pair_batch(exs: list[dict], pad_id: int, padding_free: bool):
    """dpo.py's micro-batch layout: chosen then rejected sequences of every pair ([c_1..c_B, r_1..r_B])."""
    from common import Batch
    from plumbing.logprobs import collate_completions
    pairs = [(e["prompt"], e["completions"][k]) for k in (0, 1) for e in exs]
    tensors, segments = collate_completions(pairs, pad_id, padding_free)
    return Batch(tensors, len(exs), sum(len(p) + len(c) for p, c in pairs), attention_segments=segments)


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
    """Record the synced gradients of each optimizer update, scaled to the update's mean (BaseTrainer.clip_gradients
    runs once per update)."""
    grads, clip = [], trainer.clip_gradients

    def wrapped(scale=1.0):
        grads.append({n: g * scale for n, g in synced_grads(trainer).items()})
        return clip(scale)
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


def fixed_rollout(trainer, examples: list[dict], num_samples: int):
    """A deterministic rollout (no sampling) of each example's num_samples completions, seeded by the example's place
    in the training data: ragged, the first completion of each group never ends (truncated at --max-new-tokens). The
    same example gets the same completions on any rank."""
    from plumbing.generation import truncate_after_eos
    from rollout import Rollout
    L, eos, tok = trainer.args.max_new_tokens, trainer.tokenizer.eos_token_id, trainer.tokenizer
    comps = []
    for e in examples:
        gen = torch.Generator().manual_seed(100 + _index(trainer, e))
        for k in range(num_samples):
            n = int(torch.randint(1, L + 1, (1,), generator=gen))
            ids = torch.randint(0, eos, (L,), generator=gen)
            if k:
                ids[n - 1] = eos
            comps.append(ids)
    completions, mask, has_eos = truncate_after_eos(torch.stack(comps), eos, tok.pad_token_id)
    group = [e for e in examples for _ in range(num_samples)]
    return Rollout(group, [e["prompt_ids"] for e in group], completions, mask, mask.sum(1).long(), has_eos,
                   tok.batch_decode(completions, skip_special_tokens=True))


def _index(trainer, example) -> int:
    return next(i for i, e in enumerate(trainer.train_data) if e is example)


def fixed_rewards(trainer, ro, num_samples: int) -> torch.Tensor:
    """Each group's rewards fixed by its example's place in the training data (example 0's all equal)."""
    out = []
    for e in ro.examples[::num_samples]:
        i = _index(trainer, e)
        out += [0.5] * num_samples if i == 0 else torch.rand(num_samples, generator=torch.Generator().manual_seed(
            300 + i)).tolist()
    return torch.tensor(out)


def grpo_micro_batches(trainer, groups: list[int], old_policy_shift: float = 0.0, script=None) -> list:
    """The micro-batches of the first update of one real iteration (`training_step`) of grpo.py (or `script`, a module
    with the same rollout functions: online_dpo) on training examples `groups` (this rank's share), with fixed_rollout
    for the sampling and fixed_rewards for the scoring. The update itself is not run. old_policy_shift > 0 (with
    --num-iterations > 1) moves the old policy's log-probs by seeded noise of that size, so ratios differ from 1."""
    import grpo
    from common import StepOutput
    grpo = script or grpo
    G, recorded = getattr(trainer.args, "num_generations", 2), []
    saved = grpo.sample, grpo.Scorer.__call__, grpo.completion_logps

    def old_or_ref_logps(tr, model, ro, **kw):
        logps = saved[2](tr, model, ro, **kw)
        if old_policy_shift and model is tr.model:  # the old policy's
            noise = torch.cat([torch.randn(G, logps.shape[1], generator=torch.Generator().manual_seed(
                200 + _index(tr, e))) for e in ro.examples[::G]])
            logps = logps + old_policy_shift * noise * ro.mask
        return logps
    grpo.sample = lambda tr, examples, num_samples=1, **kw: fixed_rollout(tr, examples, num_samples)
    grpo.Scorer.__call__ = lambda self, ro: (fixed_rewards(trainer, ro, G), {})
    grpo.completion_logps = old_or_ref_logps
    trainer.next_examples = lambda: [trainer.train_data[i] for i in groups]
    trainer.update = lambda micro_batches: recorded.append(micro_batches) or StepOutput({}, 0)
    try:
        trainer.training_step()
    finally:
        grpo.sample, grpo.Scorer.__call__, grpo.completion_logps = saved
        del trainer.next_examples, trainer.update
    return recorded[0]


def grads_per_variant(trainer, micro_batches: list) -> dict:
    """"loss_type/level" -> the synced gradients of one update on `micro_batches`, for every GRPO --loss-type with
    token- and sequence-level (GSPO) importance sampling; the trainer's own flags are put back."""
    from grpo import ImportanceSamplingLevel, LossType
    a, grads = trainer.args, {}
    saved = a.loss_type, a.importance_sampling_level
    for level in ImportanceSamplingLevel:
        for lt in LossType:
            a.loss_type, a.importance_sampling_level = lt, level
            grads[f"{lt}/{level}"] = update_grads(trainer, micro_batches)
    a.loss_type, a.importance_sampling_level = saved
    return grads


def update_grads(trainer, micro_batches) -> dict:
    """The synced gradients of one optimizer update over micro_batches (scaled to the update's mean); the update
    itself is skipped."""
    grads, clip, step = [], trainer.clip_gradients, trainer.optimizer.step

    def record(scale=1.0):
        grads.append({n: g * scale for n, g in synced_grads(trainer).items()})
        return clip(scale)
    trainer.clip_gradients, trainer.optimizer.step = record, lambda *a, **k: None
    try:
        trainer.update(micro_batches)
    finally:
        trainer.optimizer.step, trainer.clip_gradients = step, clip
    return grads[0]


def same_files(ours: Path, theirs: Path, skip=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                                "chat_template.jinja")):
    """Every file save_pretrained wrote is in `ours` with the same bytes (JSON: the same content)."""
    names = sorted(p.name for p in theirs.iterdir() if p.is_file() and p.name not in skip)
    assert names and set(names) <= {p.name for p in ours.iterdir()}, (names, sorted(p.name for p in ours.iterdir()))
    weights = lambda d: sorted(p.name for p in d.iterdir() if ".safetensors" in p.name)  # noqa: E731
    assert weights(ours) == weights(theirs)  # no extra shard, no stray index
    for name in names:
        a, b = (ours / name).read_bytes(), (theirs / name).read_bytes()
        if name.endswith(".json"):
            a, b = json.loads(a), json.loads(b)
            for d in (a, b):  # peft keeps target_modules in a set: its order is the process's string hashing's
                if isinstance(d.get("target_modules"), list):
                    d["target_modules"] = sorted(d["target_modules"])
            assert a == b, name
        else:
            assert a == b, name


def tensors(d: Path) -> dict:
    from safetensors.torch import load_file
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
