"""Online DPO: the loss of sampled pairs against dpo.py's formula, ties weighing nothing with exact means, every
dpo.py loss type, torchrun x2 equal to one process, bad input, a reward model as the judge, a smoke run."""
import math
import subprocess

import pytest
import torch

import online_dpo
from common import UserError
from conftest import ENV, ROOT, grpo_micro_batches, read_metrics, update_grads, write_prompt_task
from dpo import LossType, dpo_loss
from online_dpo import Args, OnlineDPOTrainer, main
from rollout import token_logps


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_prompt_task(tmp_path_factory.mktemp("odpo"))


def _args(model, task_dir, out, **kw):
    base = dict(model=model, dataset=str(task_dir / "prompts.jsonl"), reward_fn=["my_rewards:count_a"],
                output_dir=str(out), precision="fp32", batch_size=4, total_steps=2, learning_rate=1e-3,
                warmup_steps=0, log_every=1, eval_every=0, save_every=0, max_length=48, max_prompt_length=24,
                max_new_tokens=6, eval_size=4, seed=5)
    return Args(**(base | kw))


@pytest.mark.parametrize("loss_type", list(LossType))
def test_loss_is_dpo_on_the_untied_pairs(tiny_model_dir, task_dir, tmp_path, monkeypatch, loss_type):
    """On a fixed rollout of 4 prompts (the first pair tied): compute_loss is dpo.py's loss of the untied pairs, the
    better completion chosen, log-probs summed (length-averaged for IPO / SimPO / ORPO) at temperature 1; the tied
    pair carries no weight in the loss or any metric."""
    monkeypatch.syspath_prepend(str(task_dir))
    tr = OnlineDPOTrainer(_args(tiny_model_dir, task_dir, tmp_path, loss_type=loss_type))
    (mb,) = grpo_micro_batches(tr, [0, 1, 2, 3], script=online_dpo)
    with torch.no_grad():
        out = tr.compute_loss(tr.model, mb)
        logps = token_logps(tr.model, mb, 1.0).sum(1)
    ref = mb["ref_logps"] if loss_type.needs_reference else torch.zeros_like(logps)
    if loss_type.length_averaged:
        logps, ref = logps / mb["mask"].sum(1), ref / mb["mask"].sum(1)
    chosen = mb["chosen"]
    assert chosen.view(-1, 2).sum(1).tolist() == [1] * 4 and mb["untied"].tolist() == [0, 0] + [1] * 6
    losses, cr, rr = dpo_loss(logps[chosen], logps[~chosen], ref[chosen], ref[~chosen], tr.args.beta, loss_type)
    torch.testing.assert_close(out.loss.total / out.loss.count, losses[1:].mean())
    assert out.loss.count == 3
    torch.testing.assert_close(out.metrics["rewards/margins"].total / 3, (cr - rr)[1:].mean())
    if loss_type == LossType.sigmoid:  # the policy is its reference at step 0
        assert (out.loss.total / 3).item() == pytest.approx(math.log(2), abs=1e-6)


def test_ties_weigh_nothing_across_micro_batches(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    """The mean over untied pairs is exact whatever the micro-batches: 2 micro-batches (one with the tied pair) give
    the gradient of 1; a plain per-micro-batch mean would not. An update whose every pair tied changes nothing."""
    monkeypatch.syspath_prepend(str(task_dir))
    tr = OnlineDPOTrainer(_args(tiny_model_dir, task_dir, tmp_path, max_grad_norm=0.0))
    one = update_grads(tr, grpo_micro_batches(tr, [0, 1, 2, 3], script=online_dpo))
    tr.args.gradient_accumulation_steps = 2
    halves = grpo_micro_batches(tr, [0, 1, 2, 3], script=online_dpo)
    two = update_grads(tr, halves)
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-7, msg=n)
    compute = tr.compute_loss

    def per_micro_batch(model, batch):  # each micro-batch its own mean over both pairs: the tied one dilutes
        out = compute(model, batch)
        out.loss = out.loss.total / 2
        return out
    monkeypatch.setattr(tr, "compute_loss", per_micro_batch)
    naive = update_grads(tr, halves)
    assert any(not torch.allclose(naive[n], one[n], rtol=1e-3) for n in one)
    monkeypatch.setattr(tr, "compute_loss", compute)
    tied = grpo_micro_batches(tr, [0, 0], script=online_dpo)  # example 0's pair is tied
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    assert tr.update(tied).metrics == {}
    assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters())


@pytest.mark.slow
def test_torchrun_equals_one_process_and_smoke(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    """DDP x2 (two pairs per rank, the tied one on rank 0) gives one process's gradient of a 4-pair update; the same
    launch then trains (smoke) and logs TRL's names."""
    monkeypatch.syspath_prepend(str(task_dir))
    tr = OnlineDPOTrainer(_args(tiny_model_dir, task_dir, tmp_path / "single", max_grad_norm=0.0))
    single = update_grads(tr, grpo_micro_batches(tr, [0, 1, 2, 3], script=online_dpo))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in dict(
        model=tiny_model_dir, dataset=task_dir / "prompts.jsonl", reward_fn="my_rewards:count_a",
        output_dir=tmp_path / "ddp", precision="fp32", batch_size=2, total_steps=2, learning_rate=1e-3,
        log_every=1, eval_every=0, save_every=0, max_length=48, max_prompt_length=24, max_new_tokens=6, eval_size=4,
        seed=5, max_grad_norm=0.0).items()]
    r = subprocess.run(["torchrun", "--nproc_per_node=2", "--master_port=29571", "tests/grpo_parity_worker.py",
                        str(tmp_path / "ddp.pt"), "online_dpo"] + flags, cwd=ROOT, env=ENV | {"PYTHONPATH":
                        str(task_dir)}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt")["grads"]["update"]
    for n in single:
        torch.testing.assert_close(ddp[n], single[n], rtol=2e-4, atol=1e-6, msg=n)
    train = [m for m in read_metrics(tmp_path / "ddp") if "train/objective/scores" in m]
    assert len(train) == 2 and all("train/frac_ties" in m and "train/val/contain_eos_token" in m for m in train)


@pytest.mark.parametrize("kw,match", [
    ({"beta": 0.0}, r"--beta 0.0: must be > 0"),
    ({"loss_type": "nope"}, r"nope"),
    ({"reward_model": "/no/such/rm"}, r"pass either --reward-fn or --reward-model"),
    ({"reward_fn": [], "reward_model": "/no/such/rm"}, r"--reward-model /no/such/rm: no such directory"),
    ({"batch_size": 3, "gradient_accumulation_steps": 2}, r"whole pairs"),
])
def test_bad_input_is_one_line(tiny_model_dir, task_dir, tmp_path, monkeypatch, kw, match):
    monkeypatch.syspath_prepend(str(task_dir))
    with pytest.raises((UserError, ValueError), match=match):
        main(_args(tiny_model_dir, task_dir, tmp_path / "out", **kw))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_reward_model_judges(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    from transformers import AutoConfig, LlamaForSequenceClassification
    monkeypatch.syspath_prepend(str(task_dir))
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.num_labels = 1
    torch.manual_seed(1)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    t = main(_args(tiny_model_dir, task_dir, tmp_path / "out", reward_fn=[], reward_model=str(tmp_path / "rm")))
    train = [m for m in read_metrics(t.output_dir) if "train/objective/scores" in m]
    assert len(train) == 2 and all(m["train/frac_ties"] == 0 for m in train)  # real-valued scores rarely tie
    assert all(math.isfinite(m["train/loss"]) for m in train)
