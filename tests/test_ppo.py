"""PPO: closed-form math against plain loops, masking, reward-model pooling, resume, bad input, smoke runs."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from common import UserError
from conftest import ROOT, checkpoint_weights, read_metrics, write_prompt_task
from plumbing import logprobs
from plumbing.generation import truncate_after_eos
from plumbing.logprobs import kept_logits
from ppo import (Args, KLEstimator, PPOTrainer, gae, kl_penalty, main, masked_whiten, policy_loss, shape_rewards,
                 value_loss)
from rollout import reward_model_scores, rollout_batch, sample


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_prompt_task(tmp_path_factory.mktemp("ppo"))


def _args(tiny_model_dir, prompt_file, out, **kw):
    base = dict(model=tiny_model_dir, dataset=str(prompt_file / "prompts.jsonl"), reward_fn="my_rewards:count_a",
                output_dir=str(out), precision="fp32", batch_size=4, total_steps=3, learning_rate=1e-3,
                warmup_steps=0, log_every=1, eval_every=0, save_every=0, max_length=48, max_prompt_length=24,
                max_new_tokens=6, eval_size=4, seed=5)
    return Args(**(base | kw))


def test_gae_matches_plain_python_loop():
    torch.manual_seed(0)
    B, L, gamma, lam = 3, 6, 0.9, 0.8
    rewards, values = torch.randn(B, L), torch.randn(B, L)
    lengths = [6, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (L - n) for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        last = 0.0
        expected = [0.0] * L
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            expected[t] = last
        torch.testing.assert_close(adv[b], torch.tensor(expected))
        torch.testing.assert_close(ret[b, :n], adv[b, :n] + values[b, :n])
        assert (ret[b, n:] == 0).all()


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    w = masked_whiten(x, mask)
    expected = (valid - valid.mean()) / valid.std()  # unbiased, as torch.std
    torch.testing.assert_close(w[mask.bool()], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False)[mask.bool()], expected + valid.mean(),
                               atol=1e-4, rtol=1e-4)


def test_policy_loss_clips_high_and_low_ratios():
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4)
    # ratios 1.5 and 0.5 with positive / negative advantages; eps = 0.2
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipfrac, approxkl, ratio = policy_loss(new, old, adv, mask, 0.2)
    # per token max(-A r, -A clip(r)): [-1.2, 1.5, -0.5, 0.8]
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert clipfrac.item() == pytest.approx(0.5)  # tokens 0 and 3 are clipped
    loss.backward()
    grad = new.grad[0]
    assert grad[0] == 0 and grad[3] == 0  # clipped: no gradient pushes further
    assert grad[1] != 0 and grad[2] != 0
    assert approxkl.item() == pytest.approx(0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)


def test_value_loss_clipping():
    mask = torch.ones(1, 3)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1, -1.0]])
    ret = torch.tensor([[2.0, 0.0, 1.0]])
    loss, clipfrac = value_loss(new, old, ret, mask, 0.2)
    # clipped preds [0.2, 0.1, -0.2]; errors max((v-R)^2, (vc-R)^2) = [max(1, 3.24), max(.01, .01), max(4, 1.44)]
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01 + 4.0) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_kl_estimators_are_unbiased_and_k3_nonnegative():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = (p * (p / q).log()).sum()
    for est in KLEstimator:
        per = kl_penalty(p.log(), q.log(), est)
        assert (p * per).sum().item() == pytest.approx(true_kl.item(), rel=1e-5)  # E_{x~p}[k] = KL(p||q)
    assert (kl_penalty(p.log(), q.log(), KLEstimator.k3) >= 0).all()
    assert (kl_penalty(p.log(), q.log(), KLEstimator.k1) < 0).any()


def test_truncate_after_eos_and_reward_at_last_valid_token():
    eos, pad = 9, 9
    resp = torch.tensor([[5, 6, 9, 7, 8], [1, 2, 3, 4, 5], [9, 3, 9, 3, 3]])
    out, mask, has_eos = truncate_after_eos(resp, eos, pad)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert out.tolist() == [[5, 6, 9, 9, 9], [1, 2, 3, 4, 5], [9, 9, 9, 9, 9]]
    assert has_eos.tolist() == [True, False, True]
    logps, ref = torch.full((3, 5), -1.0), torch.full((3, 5), -1.5)
    rewards, kl, non_score = shape_rewards(torch.tensor([1.0, 2.0, 3.0]), logps, ref, mask, 0.1, KLEstimator.k1)
    expected = -0.1 * 0.5 * mask
    expected[0, 2] += 1.0
    expected[1, 4] += 2.0
    expected[2, 0] += 3.0
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(kl, 0.5 * mask)


def test_reward_model_scores_last_non_pad_token_left_and_right_padding():
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                    num_labels=1, pad_token_id=7)).eval()
    seqs = [[3, 4, 7, 5], [8, 7, 2]]  # contain the pad id (= EOS for SmolLM2) inside: masks must come from lengths
    single = torch.stack([reward_model_scores(rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                          for s in seqs])
    left = torch.tensor([[3, 4, 7, 5], [7, 8, 7, 2]])
    left_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    right = torch.tensor([[3, 4, 7, 5], [8, 7, 2, 7]])
    right_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    torch.testing.assert_close(reward_model_scores(rm, left, left_mask), single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reward_model_scores(rm, right, right_mask), single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("critic", ["value_head", "separate"])
def test_resume_continues_exactly(tiny_model_dir, prompt_file, tmp_path, monkeypatch, critic):
    monkeypatch.syspath_prepend(str(prompt_file))
    kw = dict(total_steps=4, save_every=2, keep_checkpoints=5, critic=critic)
    full = main(_args(tiny_model_dir, prompt_file, tmp_path / "full", **kw))
    ref = {m["step"]: m for m in read_metrics(full.output_dir) if "train/loss/policy_avg" in m}
    part = tmp_path / "part"
    shutil.copytree(full.output_dir, part)
    shutil.rmtree(part / "checkpoints" / "step_00000004")
    shutil.rmtree(part / "final")
    resumed = main(_args(tiny_model_dir, prompt_file, part, resume=True, **kw))
    got = {m["step"]: m for m in read_metrics(part) if "train/loss/policy_avg" in m}
    for s in (3, 4):
        for k in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "grad_norm"):
            assert got[s][f"train/{k}"] == pytest.approx(ref[s][f"train/{k}"], rel=1e-5, abs=1e-7), (s, k)
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, full.model.state_dict()[k])


@pytest.mark.parametrize("kw,match", [
    ({"reward_fn": "my_rewards:nan"}, r"--reward-fn my_rewards:nan: returned a non-finite score for rows \["),
    ({"reward_fn": "my_rewards:short"}, r"--reward-fn my_rewards:short: returned shape \(1,\), expected a list of 2"),
    ({"reward_fn": "my_rewards:boom"}, r"--reward-fn my_rewards:boom: raised KeyError: 'nope'"),
    ({"reward_fn": "no_such_module:f"}, r"--reward-fn no_such_module:f: cannot import"),
    ({"reward_fn": None, "reward_model": "/nonexistent/rm"}, r"--reward-model /nonexistent/rm: no such directory"),
    ({"batch_size": 3, "num_minibatches": 2}, r"--batch-size 3 must be divisible"),
])
def test_bad_reward_and_flags(tiny_model_dir, prompt_file, tmp_path, monkeypatch, kw, match):
    monkeypatch.syspath_prepend(str(prompt_file))
    with pytest.raises(UserError, match=match):
        main(_args(tiny_model_dir, prompt_file, tmp_path, total_steps=1, **kw))


ENV = os.environ | {"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_smoke_run_and_torchrun(tiny_model_dir, prompt_file, tmp_path):
    """1 process with a separate critic, 2 gloo ranks with the value head under DDP and under FSDP2: weights move,
    metrics are written, the exported policy equals the checkpoint's."""
    env = ENV | {"PYTHONPATH": str(prompt_file)}
    flags = [f"--model={tiny_model_dir}", f"--dataset={prompt_file / 'prompts.jsonl'}",
             "--reward-fn=my_rewards:count_a", "--precision=fp32", "--batch-size=4", "--total-steps=3",
             "--learning-rate=1e-3", "--log-every=1", "--eval-every=0", "--save-every=1", "--keep-checkpoints=5",
             "--max-length=48", "--max-prompt-length=24", "--max-new-tokens=6", "--eval-size=4"]
    runs = {"single": [sys.executable, "ppo.py", "--critic=separate", "--track"],  # wandb offline
            "ddp": ["torchrun", "--nproc_per_node=2", "--master_port=29533", "ppo.py", "--critic=value_head"],
            "fsdp": ["torchrun", "--nproc_per_node=2", "--master_port=29535", "ppo.py", "--strategy=fsdp"]}
    for name, cmd in runs.items():
        out = tmp_path / name
        r = subprocess.run(cmd + flags + [f"--output-dir={out}"], cwd=ROOT, env=env | {"WANDB_MODE": "offline"},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        if "--track" in cmd:  # metrics and the samples table reached the (offline) wandb run
            (record,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
            assert b"objective/scores" in record.read_bytes() and b"samples_table" in record.read_bytes()
        metrics = read_metrics(out)
        train = [m for m in metrics if "train/objective/scores" in m]
        assert [m["step"] for m in train] == [1, 2, 3]
        for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                    "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                    "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "val/explained_variance", "time/generation",
                    "time/scoring", "time/logprobs_values", "time/update",
                    "response_length", "episodes_per_s", "tokens_per_s", "grad_norm", "lr"):
            assert all(math.isfinite(m[f"train/{key}"]) for m in train), key
        assert train[0]["train/objective/kl"] == 0  # policy == reference when the first rollout is sampled
        assert any("train/samples" in m for m in metrics)
        first = checkpoint_weights(out / "checkpoints" / "step_00000001")
        last = checkpoint_weights(out / "checkpoints" / "step_00000003")
        moved = lambda prefix: any(not torch.equal(first[k], last[k]) for k in first if k.startswith(prefix))  # noqa
        assert moved("policy.") and moved("value_head.")
        if name == "single":
            assert moved("critic_backbone.")
        from transformers import AutoModelForCausalLM
        exported = AutoModelForCausalLM.from_pretrained(out / "final")
        for k, v in exported.state_dict().items():
            torch.testing.assert_close(v, last[f"policy.{k}"])


def test_minibatches_cover_each_rollout_row_once_per_epoch():
    from ppo import minibatch_rows
    n = 12
    epochs = [minibatch_rows(n, num_minibatches=2, accumulation=3) for _ in range(2)]
    for updates in epochs:
        assert len(updates) == 2 and all(len(micro) == 3 and all(len(rows) == 2 for rows in micro) for micro in updates)
        assert sorted(r for micro in updates for rows in micro for r in rows) == list(range(n))
    assert epochs[0] != epochs[1]  # a fresh shuffle per epoch


def test_reward_model_run_with_critic_initialised_from_it(tiny_model_dir, prompt_file, tmp_path):
    """--reward-model + --critic separate: the critic starts as the reward model (N+), scores drive the run."""
    from transformers import AutoConfig, LlamaForSequenceClassification
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.num_labels = 1
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(cfg)
    rm.save_pretrained(tmp_path / "rm")
    t = PPOTrainer(_args(tiny_model_dir, prompt_file, tmp_path / "out", reward_fn=None,
                         reward_model=str(tmp_path / "rm"), critic="separate", total_steps=2))
    torch.testing.assert_close(t.model.value_head.weight, rm.score.weight)
    torch.testing.assert_close(t.model.critic_backbone.embed_tokens.weight, rm.model.embed_tokens.weight)
    t.train()
    train = [m for m in read_metrics(t.output_dir) if "train/objective/scores" in m]
    assert len(train) == 2 and all(math.isfinite(m["train/objective/scores"]) for m in train)
    assert not torch.equal(t.model.value_head.weight, rm.score.weight)  # the critic trained


@pytest.mark.parametrize("critic", ["value_head", "separate"])
def test_packed_forward_equals_padded(tiny_model_dir, prompt_file, tmp_path, monkeypatch, critic):
    """--padding-free (prompt prefixes the episodes share packed once) gives the left-padded batch's log-probs,
    values, reference log-probs and parameter gradients (fp32)."""
    monkeypatch.syspath_prepend(str(prompt_file))
    tr = PPOTrainer(_args(tiny_model_dir, prompt_file, tmp_path, critic=critic, batch_size=8))
    torch.nn.init.normal_(tr.model.value_head.weight)  # zero-initialised: make the values informative
    ro = sample(tr, [tr.train_data[i] for i in range(8)])
    assert ro.mask.sum() > 8 and len({len(p) for p in ro.prompt_ids}) > 1  # real responses, real padding
    out, sizes = {}, {}
    for padding_free, head_everywhere in ((False, False), (True, False), (True, True)):
        # head_everywhere: a model without a boolean logits_to_keep (LM head on all positions, selected afterwards)
        monkeypatch.setattr(logprobs, "supports_logits_to_keep", lambda m, h=head_everywhere: not h)
        tr.args.padding_free = padding_free
        tr.model.zero_grad()
        batch = rollout_batch(tr, ro, range(len(ro)))
        logps, values = tr.logps_and_values(tr.model, batch)
        (logps.sum() + values.sum()).backward()
        with torch.no_grad():
            ref = kept_logits(tr.ref_model, batch.tensors, batch.attention_segments)
        out[padding_free, head_everywhere] = (logps.detach(), values.detach(), ref, {
            n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
        sizes[padding_free] = batch["input_ids"].numel()
    assert sizes[True] < sum(map(len, ro.prompt_ids)) + ro.mask.sum()  # something was shared
    base = out[False, False]
    for key in ((True, False), (True, True)):
        assert out[key][3].keys() == base[3].keys()
        for a, b in zip(out[key][:3], base[:3]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for n, g in out[key][3].items():
            scale = base[3][n].abs().max().item()
            torch.testing.assert_close(g, base[3][n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{key} {n}: {m}")


def test_sampling_ignores_the_models_generation_config(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """A model whose generation_config carries top_k, min_p, a repetition_penalty and suppressed tokens: PPO still
    samples from exactly softmax(logits / T) over the whole vocabulary (only its own sampler runs), so its log-probs
    and ratios stay on-policy. Seen in 2,048 rollouts of one prompt: the first token's mass on the suppressed tokens,
    and on 8 buckets of tokens from least to most likely, is their probability up to sampling noise."""
    monkeypatch.syspath_prepend(str(prompt_file))
    tr = PPOTrainer(_args(tiny_model_dir, prompt_file, tmp_path, batch_size=4, max_new_tokens=1))
    policy = tr.model.policy
    ids = torch.tensor([tr.train_data[0]["prompt_ids"]])
    with torch.no_grad():
        p = torch.softmax(policy(input_ids=ids).logits[0, -1] / tr.args.temperature, -1)
    suppressed = p.topk(64).indices
    policy.generation_config.repetition_penalty, policy.generation_config.min_p = 1.3, 0.1
    policy.generation_config.top_k, policy.generation_config.suppress_tokens = 5, suppressed.tolist()
    torch.manual_seed(0)
    responses = sample(tr, [tr.train_data[0]] * 2048).completions
    freq = torch.bincount(responses[:, 0], minlength=len(p)).float() / len(responses)
    assert p[suppressed].sum() > 0.2 and abs(freq[suppressed].sum() - p[suppressed].sum()) < 0.04
    buckets = p.argsort().chunk(8)
    expected, seen = torch.stack([p[b].sum() for b in buckets]), torch.stack([freq[b].sum() for b in buckets])
    assert 0.5 * (seen - expected).abs().sum() < 0.05
    assert policy.generation_config.repetition_penalty == 1.3  # the model's own config is left as it was


def test_reward_head_of_several_outputs_is_refused(tiny_model_dir, prompt_file, tmp_path):
    from transformers import AutoConfig, LlamaForSequenceClassification
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.num_labels = 2
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    with pytest.raises(UserError, match=r"--reward-model: its `score` head has 2 outputs"):
        PPOTrainer(_args(tiny_model_dir, prompt_file, tmp_path / "out", reward_fn=None,
                         reward_model=str(tmp_path / "rm"), critic="separate"))


def test_lora_run_reference_is_the_base_and_value_head_trains(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(prompt_file))
    t = PPOTrainer(_args(tiny_model_dir, prompt_file, tmp_path, lora_r=4, total_steps=2))
    assert t.ref_model is None
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert "value_head.weight" in trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    t.train()
    first = [m for m in read_metrics(tmp_path) if "train/objective/kl" in m][0]
    assert first["train/objective/kl"] == pytest.approx(0.0, abs=1e-5)  # step 1's rollout: policy == base
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").exists()
