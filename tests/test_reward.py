"""Reward model: the Bradley-Terry loss against its closed form (margin, centring), last-token scoring with
pad == EOS, packed == padded, the export ppo.py reads, bad input."""
import json
import math

import pytest
import torch

from common import UserError
from conftest import capture_grads, read_metrics, script_args, tiny_flags, torchrun_grads_match
from reward import RewardTrainer, collate, reward_loss


def test_loss_closed_form_with_margin_and_centering():
    rc, rr = torch.tensor([1.5, -0.5], dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    plain = reward_loss(rc, rr)
    assert plain.tolist() == pytest.approx([-math.log(sig(1.0)), -math.log(sig(-0.75))], rel=1e-12)
    margin = torch.tensor([2.0, -1.0], dtype=torch.float64)
    assert reward_loss(rc, rr, margin).tolist() == pytest.approx([-math.log(sig(-1.0)), -math.log(sig(0.25))],
                                                                 rel=1e-12)
    # TRL: loss + coef * mean((r_c + r_r)^2)
    centred = reward_loss(rc, rr, margin, 0.01).mean().item()
    expected = (-math.log(sig(-1.0)) - math.log(sig(0.25))) / 2 + 0.01 * (2.0 ** 2 + (-0.25) ** 2) / 2
    assert centred == pytest.approx(expected, rel=1e-12)
    assert reward_loss(torch.zeros(3), torch.zeros(3)).tolist() == pytest.approx([math.log(2)] * 3)


def _trainer(tiny_model_dir, pairs_file, out, **kw):
    return RewardTrainer(script_args("reward", tiny_model_dir, pairs_file, out, **kw))


def test_last_token_scoring_with_pad_equal_eos_packed_and_padded(tiny_model_dir, pairs_file, tmp_path):
    """Each sequence's reward is the head on the hidden state of its last token (its EOS, which is also the pad id):
    alone and unpadded, inside a right-padded batch, and inside the packed row, values and gradients."""
    t = _trainer(tiny_model_dir, pairs_file, tmp_path / "a")
    clf, exs = t.model.classifier, t.train_data[:4]
    seqs = [e["prompt"] + e["completions"][k] for k in (0, 1) for e in exs]
    assert all(s[-1] == t.tokenizer.pad_token_id == t.tokenizer.eos_token_id for s in seqs)
    alone = torch.stack([clf.score(clf.base_model(torch.tensor([s])).last_hidden_state[0, -1])[0] for s in seqs])
    results = []
    for padding_free in (True, False):
        b = collate(exs, t.tokenizer.pad_token_id, padding_free)
        rewards = t.model(b.tensors, b.attention_segments)
        torch.testing.assert_close(rewards, alone.detach(), rtol=1e-5, atol=1e-5)
        t.model.zero_grad()
        reward_loss(*rewards.chunk(2), b["margin"]).mean().backward()
        results.append({n: p.grad.clone() for n, p in t.model.named_parameters()})
    for n, g in results[0].items():
        torch.testing.assert_close(g, results[1][n], rtol=1e-4, atol=1e-6, msg=n)
    # the trap avoided: HF's own pooling takes the last token that is not pad, i.e. the one before the EOS
    b = collate(exs, t.tokenizer.pad_token_id, False)
    hf = clf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 0]
    assert not torch.allclose(hf, alone, atol=1e-4)


def test_new_head_init_and_export_is_what_ppo_reads(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForSequenceClassification
    from rollout import reward_model_scores
    from reward import main
    t = _trainer(tiny_model_dir, pairs_file, tmp_path / "init")
    w = t.model.classifier.score.weight
    assert w.shape == (1, 32) and 0.5 / math.sqrt(33) < w.std().item() < 2 / math.sqrt(33)
    t = main(script_args("reward", tiny_model_dir, pairs_file, tmp_path / "run", eval_every=2, total_steps=4,
                         learning_rate=3e-3))
    evals = [m for m in read_metrics(tmp_path / "run") if "eval/loss" in m]
    keys = {"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"}
    assert set(evals[0]) >= {f"eval/{k}" for k in keys} and len(evals) == 3
    train = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert set(train[0]) >= {f"train/{k}" for k in keys | {"grad_norm", "lr"}}
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final")
    assert rm.config.pad_token_id == t.tokenizer.eos_token_id and rm.config.num_labels == 1
    for n, p in t.model.classifier.named_parameters():
        torch.testing.assert_close(rm.state_dict()[n], p.detach(), msg=n)
    # ppo.py's scoring (left-padded, last non-pad by the attention mask) gives the trained model's rewards
    exs = t.eval_data[:2]
    b = collate(exs, t.tokenizer.pad_token_id, True)
    ours = t.model(b.tensors, b.attention_segments).detach()
    seqs = [e["prompt"] + e["completions"][k] for k in (0, 1) for e in exs]
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    torch.testing.assert_close(reward_model_scores(rm, ids, mask), ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("row,match", [
    ({"prompt": "a", "chosen": " b"}, r"bad.jsonl:2: missing key 'rejected'"),
    ({"prompt": "a", "chosen": " ", "rejected": " c"}, r"bad.jsonl:2: field 'chosen' is empty"),
    ({"prompt": "a", "chosen": " b", "rejected": " c", "margin": "big"}, r"bad.jsonl:2: field 'margin' must be a"),
    ({"prompt": "a", "chosen": " b", "rejected": " c", "margin": float("nan")}, r"bad.jsonl:2: field 'margin'"),
])
def test_bad_rows(tiny_model_dir, tmp_path, row, match):
    from reward import main
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=match):
        main(script_args("reward", tiny_model_dir, str(bad), tmp_path / "out", eval_size=0))
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="--center-rewards-coefficient -1.0: must be >= 0"):
        main(script_args("reward", tiny_model_dir, str(bad), tmp_path / "out", center_rewards_coefficient=-1.0))


def test_ppo_with_a_reward_model_reports_verifier_accuracy(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """On the built-in task, ppo.py --reward-model trains on the model's scores but eval/greedy_accuracy is the
    verifier's verdict on the greedy replies, not the mean reward-model score."""
    import tasks
    from ppo import Args, PPOTrainer
    from reward import main
    main(script_args("reward", tiny_model_dir, pairs_file, tmp_path / "rm", total_steps=1))
    t = PPOTrainer(Args(model=tiny_model_dir, dataset="arithmetic", reward_model=str(tmp_path / "rm" / "final"),
                        output_dir=str(tmp_path / "ppo"), precision="fp32", batch_size=16, total_steps=1,
                        max_length=64, max_new_tokens=4))
    verdicts = []
    monkeypatch.setattr(tasks, "reward", lambda p, c, answer: verdicts.append(len(c)) or [1.0] * len(c))
    metrics = t.evaluate()
    assert metrics["greedy_accuracy"] == 1.0 and metrics["scores"] != 1.0
    assert sum(verdicts) == len(tasks.questions("arithmetic", held_out=True))


def test_lora_trains_adapters_and_the_head_and_exports_a_classifier(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForSequenceClassification
    from rollout import reward_model_scores
    from reward import main
    t = main(script_args("reward", tiny_model_dir, pairs_file, tmp_path, lora_r=4, total_steps=3, learning_rate=3e-3))
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")  # the merged model
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").exists()
    exs = t.eval_data[:2]
    b = collate(exs, t.tokenizer.pad_token_id, True)
    with torch.no_grad():
        ours = t.model(b.tensors, b.attention_segments)
    seqs = [e["prompt"] + e["completions"][k] for k in (0, 1) for e in exs]
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    torch.testing.assert_close(reward_model_scores(rm, ids, mask), ours, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_gradients_equal_single_process(tiny_model_dir, pairs_file, tmp_path):
    """FSDP2 x2 (batch 2 each) == 1 process x batch 4, on the gradients each step. The scorer calls the decoder and
    the head directly, so the wrapper must be the FSDP root that gathers them (else: DTensor mixed with Tensor)."""
    single = _trainer(tiny_model_dir, pairs_file, tmp_path / "single", batch_size=4, max_grad_norm=0.0, total_steps=2)
    grads = capture_grads(single)
    single.train()
    flags = tiny_flags(tiny_model_dir, pairs_file, tmp_path / "fsdp", batch_size=2, max_grad_norm=0.0, total_steps=2,
                       eval_every=0, save_every=0, seed=3) + ["--strategy", "fsdp"]
    torchrun_grads_match("reward", flags, tmp_path / "fsdp.pt", 29557, grads)
