"""GRPO: loss aggregations and advantages against their formulas, DAPO's normalisation across accumulation and world
size, bad input, smoke runs (1 process with a reference model and several updates per generation; torchrun x2)."""
import math
import subprocess
import sys

import pytest
import torch

import grpo
from common import Mean, UserError
from conftest import ENV, ROOT, grads_per_variant, grpo_micro_batches, read_metrics, update_grads, write_prompt_task
from grpo import (AdvantageType, Args, GRPOTrainer, ImportanceSamplingLevel, LossType, ScaleRewards, aggregate_loss,
                  clipped_token_loss, group_advantages, k3_kl, main)
from rollout import token_logps


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_prompt_task(tmp_path_factory.mktemp("grpo"))


def _args(model, task_dir, out, **kw):
    base = dict(model=model, dataset=str(task_dir / "prompts.jsonl"), reward_fn=["my_rewards:count_a"],
                output_dir=str(out), precision="fp32", batch_size=4, num_generations=4, total_steps=2,
                learning_rate=1e-3, warmup_steps=0, log_every=1, eval_every=0, save_every=0, max_length=48,
                max_prompt_length=24, max_new_tokens=6, eval_size=4, seed=5)
    return Args(**(base | kw))


# --- pure functions ---------------------------------------------------------------------------------------------------
RAGGED = [5, 1, 3, 0, 4]  # valid tokens per sequence (one sequence fully masked: truncated and filtered)


def test_loss_aggregations_match_their_formulas_on_ragged_masks():
    torch.manual_seed(0)
    N, L = len(RAGGED), 5
    per_token = torch.randn(N, L)
    mask = torch.tensor([[1.0] * n + [0.0] * (L - n) for n in RAGGED])
    rows = [per_token[i, :n].tolist() for i, n in enumerate(RAGGED)]
    grpo = sum(sum(r) / len(r) for r in rows if r) / N  # an empty sequence contributes 0 but counts in N
    dr_grpo = sum(sum(r) for r in rows) / (N * 7)  # max_new_tokens = 7, not the longest sequence
    dapo = sum(sum(r) for r in rows) / sum(RAGGED)
    assert aggregate_loss(per_token, mask, LossType.grpo, 7).item() == pytest.approx(grpo, rel=1e-6)
    assert aggregate_loss(per_token, mask, LossType.dr_grpo, 7).item() == pytest.approx(dr_grpo, rel=1e-6)
    # dapo's is a Mean: its count is summed with the other micro-batches' and ranks' by the loop
    d = aggregate_loss(per_token, mask, LossType.dapo, 7)
    assert isinstance(d, Mean) and d.count.item() == sum(RAGGED)
    assert (d.total / d.count).item() == pytest.approx(dapo, rel=1e-6)
    # padding values never leak in
    value = lambda x: x.total / x.count if isinstance(x, Mean) else x  # noqa: E731
    noisy = per_token + (1 - mask) * 1e6
    for lt in LossType:
        torch.testing.assert_close(value(aggregate_loss(noisy, mask, lt, 7)),
                                   value(aggregate_loss(per_token, mask, lt, 7)))


def test_advantages_against_hand_computation():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.4, 0.6, 0.8], [3.0, 3.0, 3.0, 3.0]])
    adv, zero = group_advantages(r, ScaleRewards.none, AdvantageType.grpo)
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.3, -0.1, 0.1, 0.3], [0.0] * 4]))
    assert zero.tolist() == [False, False, True]
    adv, _ = group_advantages(r, ScaleRewards.group, AdvantageType.grpo)
    std0, std1 = torch.tensor([1.0, 0, 0, 1]).std().item(), torch.tensor([0.2, 0.4, 0.6, 0.8]).std().item()
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-4))
    torch.testing.assert_close(adv[1], torch.tensor([-0.3, -0.1, 0.1, 0.3]) / (std1 + 1e-4))
    adv, _ = group_advantages(r, ScaleRewards.batch, AdvantageType.grpo, batch_std=torch.tensor(2.0))
    torch.testing.assert_close(adv[1], torch.tensor([-0.3, -0.1, 0.1, 0.3]) / (2.0 + 1e-4))
    # RLOO: r_i - mean of the OTHER three
    adv, _ = group_advantages(r, ScaleRewards.none, AdvantageType.rloo)
    expected = [[ri - (sum(row) - ri) / 3 for ri in row] for row in r.tolist()]
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert adv[2].abs().max() == 0


@pytest.mark.parametrize("scale", list(ScaleRewards))
@pytest.mark.parametrize("estimator", list(AdvantageType))
def test_all_equal_group_has_exactly_zero_advantage(scale, estimator):
    r = torch.tensor([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [0.0, 1.0, 0.0]])  # 0.1 * 3 / 3 != 0.1 in floating point
    adv, zero = group_advantages(r, scale, estimator, batch_std=torch.tensor(0.0))
    assert torch.isfinite(adv).all() and (adv[:2] == 0).all() and (adv[2] != 0).all()
    assert zero.tolist() == [True, True, False]


def test_clip_higher_is_asymmetric_and_counted():
    # one sequence, token ratios 1.5, 0.5, 1.25, 0.75; eps_low 0.2, eps_high 0.3
    new = torch.log(torch.tensor([[1.5, 0.5, 1.25, 0.75]])).requires_grad_(True)
    adv = torch.tensor([1.0])
    loss, low, high = clipped_token_loss(new, torch.zeros(1, 4), adv, 0.2, 0.3)  # sequence advantage: all +1
    torch.testing.assert_close(loss, -torch.tensor([[1.3, 0.5, 1.25, 0.75]]))  # min(r A, clip(r) A)
    assert high.tolist() == [[1.0, 0.0, 0.0, 0.0]] and low.sum() == 0  # r < 0.8 with A > 0 is not a clip
    loss, low, high = clipped_token_loss(new, torch.zeros(1, 4), -adv, 0.2, 0.3)
    torch.testing.assert_close(loss, torch.tensor([[1.5, 0.8, 1.25, 0.8]]))
    assert low.tolist() == [[0.0, 1.0, 0.0, 1.0]] and high.sum() == 0
    loss.sum().backward()
    assert new.grad[0, 1] == 0 and new.grad[0, 3] == 0 and new.grad[0, 0] != 0  # clipped: no gradient


def test_gspo_sequence_ratio_closed_form():
    """GSPO: one ratio per sequence, the geometric mean of its token ratios over the loss mask, clipped per sequence
    and broadcast to its tokens; masked tokens change nothing."""
    ratios = torch.tensor([[1.5, 0.5, 2.0, 7.0], [1.1, 1.2, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    new = ratios.log().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, low, high = clipped_token_loss(new, torch.zeros_like(new), adv, 0.2, 0.1, mask, "sequence")
    s0, s1 = (1.5 * 0.5 * 2.0) ** (1 / 3), (1.1 * 1.2) ** 0.5  # 1.1447, 1.1489
    assert s0 == pytest.approx(1.1447142425533319) and s1 == pytest.approx(1.1489125293076057)
    # sequence 0, A = +1: s0 > 1 + 0.1, clipped to 1.1; sequence 1, A = -1: -min(-s1, -1.1) = s1, not clipped
    torch.testing.assert_close(loss, torch.tensor([[-1.1] * 4, [s1] * 4], dtype=torch.float64))
    assert high.tolist() == [[1.0] * 4, [0.0] * 4] and low.sum() == 0
    (loss * mask).sum().backward()
    # d s1 / d log r_t = s1 / |o_1| on its 2 loss tokens; a clipped sequence and masked tokens get none
    torch.testing.assert_close(new.grad, torch.tensor([[0.0] * 4, [s1 / 2 * 2, s1 / 2 * 2, 0.0, 0.0]],
                                                      dtype=torch.float64))
    # the token level on the same numbers differs (each token its own ratio)
    tok, _, _ = clipped_token_loss(new, torch.zeros_like(new), adv, 0.2, 0.1, mask, "token")
    assert not torch.allclose(tok * mask, loss * mask)


def test_gspo_in_the_trainer_against_its_formula(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    """compute_loss with --importance-sampling-level sequence on a fixed rollout whose old log-probs differ from the
    policy's: the loss is 1/N sum_i -min(s_i A_i, clip(s_i) A_i) (loss type grpo), s_i from the loss tokens only."""
    monkeypatch.syspath_prepend(str(task_dir))
    tr = GRPOTrainer(_args(tiny_model_dir, task_dir, tmp_path, num_iterations=2, mask_truncated_completions=True,
                           importance_sampling_level="sequence", loss_type="grpo"))
    (mb,) = grpo_micro_batches(tr, [1, 2], old_policy_shift=0.3)
    with torch.no_grad():
        out = tr.compute_loss(tr.model, mb)
        logps = token_logps(tr.model, mb, tr.args.temperature)
    mask, old = mb["loss_mask"], mb["old_logps"]
    assert (mask.sum(1) == 0).any() and (mask != mb["mask"]).any()  # truncated ones: no loss tokens
    s = (((logps - old) * mask).sum(1) / mask.sum(1).clamp(min=1)).exp()
    adv = mb["advantages"]
    per_seq = -torch.min(s * adv, s.clamp(0.8, 1.2) * adv) * (mask.sum(1) > 0)
    assert ((s < 0.8) | (s > 1.2)).any() and ((s > 0.8) & (s < 1.2) & (mask.sum(1) > 0)).any()
    torch.testing.assert_close(out.loss, per_seq.mean())
    tr.args.importance_sampling_level = ImportanceSamplingLevel.token
    with torch.no_grad():
        assert not torch.allclose(tr.compute_loss(tr.model, mb).loss, out.loss)


def test_gspo_smoke_run_in_process(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(task_dir))
    main(_args(tiny_model_dir, task_dir, tmp_path, importance_sampling_level="sequence", num_iterations=2,
               epsilon_low=3e-4, epsilon_high=4e-4))
    train = [m for m in read_metrics(tmp_path) if "train/reward" in m]
    assert len(train) == 2
    for key in ("reward", "grad_norm", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean"):
        assert all(math.isfinite(m[f"train/{key}"]) for m in train), key
    # GSPO's tiny clip range: the second update of each rollout clips whole sequences
    assert any(m["train/clip_ratio/low_mean"] + m["train/clip_ratio/high_mean"] > 0 for m in train)


def test_k3_kl_is_unbiased_and_nonnegative():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    per = k3_kl(p.log(), q.log())
    assert (per >= 0).all()
    assert (p * per).sum().item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-5)


# --- the trainer ------------------------------------------------------------------------------------------------------
def test_dapo_normalisation_invariant_to_accumulation(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    """One update on a fixed rollout of 4 groups: batch 4 in one micro-batch == 2 micro-batches of 2 groups, for
    every loss type (DAPO needs the update's token count; grpo/dr_grpo are means over sequences); a per-micro-batch
    token mean would differ (the check can fail)."""
    monkeypatch.syspath_prepend(str(task_dir))
    tr = GRPOTrainer(_args(tiny_model_dir, task_dir, tmp_path, max_grad_norm=0.0, beta=0.1, num_iterations=2,
                           mask_truncated_completions=True, scale_rewards="batch"))
    tr.args.gradient_accumulation_steps = 1
    whole = grpo_micro_batches(tr, [0, 1, 2, 3])
    assert {"old_logps", "ref_logps"} <= whole[0].tensors.keys() and (whole[0]["loss_mask"].sum(1) == 0).any()
    tr.args.gradient_accumulation_steps = 2
    halves = grpo_micro_batches(tr, [0, 1, 2, 3])
    assert len(halves) == 2 and halves[0]["loss_mask"].sum() != halves[1]["loss_mask"].sum()  # ragged: can tell
    for lt in LossType:
        tr.args.loss_type = lt
        one, two = update_grads(tr, whole), update_grads(tr, halves)
        assert one.keys() == two.keys() and one
        for n in one:
            torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-7, msg=lambda m: f"{lt} {n}: {m}")
    per_micro_batch = lambda per_token, mask, *a: (per_token * mask).sum() / mask.sum()  # a token mean per micro-batch
    monkeypatch.setattr(grpo, "aggregate_loss", per_micro_batch)
    naive = update_grads(tr, halves)
    assert any(not torch.allclose(naive[n], one[n], rtol=1e-3) for n in one)


def test_token_metrics_are_means_over_the_steps_tokens(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    """kl, entropy and the clip fractions as logged (summed over micro-batches, as the loop and ranks sum them) are
    the same for one micro-batch of 4 groups and two ragged ones of 2: means over the step's tokens, as TRL logs
    them; each micro-batch's own token mean, weighed by its sequences, differs (the check can fail)."""
    from plumbing.metrics import MetricWindow
    monkeypatch.syspath_prepend(str(task_dir))
    tr = GRPOTrainer(_args(tiny_model_dir, task_dir, tmp_path, beta=0.1, num_iterations=2))

    def logged(micro_batches, per_micro_batch=False):
        window = MetricWindow()
        for mb in micro_batches:
            with torch.no_grad():
                metrics = tr.compute_loss(tr.model, mb).metrics
            if per_micro_batch:
                metrics = {k: m.total / m.count for k, m in metrics.items()}
            window.add(metrics, mb.num_samples)
        return window.reduce(tr.device, rates=False)
    tr.args.gradient_accumulation_steps = 1
    whole = logged(grpo_micro_batches(tr, [0, 1, 2, 3], old_policy_shift=0.5))
    tr.args.gradient_accumulation_steps = 2
    halves = grpo_micro_batches(tr, [0, 1, 2, 3], old_policy_shift=0.5)
    assert halves[0]["loss_mask"].sum() != halves[1]["loss_mask"].sum()
    split = logged(halves)
    keys = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean")
    for k in keys:
        assert split[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-7), k
    naive = logged(halves, per_micro_batch=True)
    assert any(naive[k] != pytest.approx(whole[k], rel=1e-3) for k in keys)


def test_groups_stay_whole_and_share_their_prompt(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(task_dir))
    tr = GRPOTrainer(_args(tiny_model_dir, task_dir, tmp_path, gradient_accumulation_steps=2))
    packed = grpo_micro_batches(tr, [0, 1, 2, 3])
    prompt_length = {e["source"]: len(e["prompt_ids"]) for e in tr.train_data}
    for b in packed:
        prompts = {s: prompt_length[s] for s in b.sources}
        assert b.num_samples == len(b.sources) == 8 and len(prompts) == 2  # two whole groups of 4
        # each group's prompt appears once in the packed row, not once per completion
        assert b["input_ids"].numel() <= b["mask"].sum() + sum(prompts.values())
    # packed forward == left-padded forward
    tr.args.padding_free = False
    padded = grpo_micro_batches(tr, [0, 1, 2, 3])
    with torch.no_grad():
        for p, q in zip(packed, padded):
            torch.testing.assert_close(token_logps(tr.model, q, 0.7), token_logps(tr.model, p, 0.7), rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_sampler_draws_from_softmax_over_temperature_and_the_nucleus(top_p):
    """CategoricalSampler's frequencies match softmax(logits / T) renormalised over transformers' top-p set; tokens
    outside it (or at -inf) never appear."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from plumbing.generation import CategoricalSampler
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -math.inf], [0.3, 0.2, 0.1, 0.0, -0.1, -0.2]])
    target = torch.softmax(logits / 0.7, -1)
    if top_p < 1:
        kept = TopPLogitsWarper(top_p)(None, logits / 0.7) > -math.inf
        target = torch.where(kept, target, 0.0) / torch.where(kept, target, 0.0).sum(-1, keepdim=True)
    n = 20000
    out = CategoricalSampler(0.7, top_p)(None, logits.repeat_interleave(n, 0))
    assert ((out == 0).sum(-1) == 1).all() and (out.argmax(-1) == (out == 0).float().argmax(-1)).all()
    freq = torch.stack([torch.bincount(r.argmax(-1), minlength=6) / n for r in out.split(n)])
    assert (freq[target == 0] == 0).all()
    torch.testing.assert_close(freq, target, atol=0.015, rtol=0)  # ~4 binomial standard errors


def test_one_prefill_per_prompt_samples_as_repeated_prompts(tiny_model_dir):
    """generate(num_samples=G) == generate on the prompts repeated G times (greedy, and sampled under one seed), while
    the prompt goes through the model once per prompt, not once per sample."""
    from transformers import AutoModelForCausalLM

    from plumbing.generation import generate
    from plumbing.models import load_tokenizer
    from rollout import left_pad
    tok, model = load_tokenizer(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids, mask = left_pad([tok("the cat sat")["input_ids"], tok("a dog ran up the mat")["input_ids"]], tok.pad_token_id)
    rep = [t.repeat_interleave(3, 0) for t in (ids, mask)]
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad():
        for temperature in (0.0, 1.0):
            torch.manual_seed(0)
            plain = generate(model, tok, *rep, 6, temperature)
            seen.clear()
            torch.manual_seed(0)
            shared = generate(model, tok, ids, mask, 6, temperature, num_samples=3)
            for a, b in zip(plain, shared):
                assert torch.equal(a, b)
    assert seen[:2] == [(2, ids.shape[1] - 1), (6, 1)]  # the prefill once per prompt, then one token per sample


@pytest.mark.parametrize("kw,match", [
    ({"num_generations": 1}, r"--num-generations 1: must be >= 2"),
    ({"batch_size": 3, "gradient_accumulation_steps": 2}, r"--batch-size 3 prompts cannot be split into"),
    ({"reward_weights": [1.0, 2.0]}, r"--reward-weights: 2 weights for 1 reward function"),
    ({"reward_weights": [float("nan")]}, r"--reward-weights nan: must be finite"),
    ({"epsilon_low": -0.1}, r"--epsilon-low -0.1: must be in \[0, 1\)"),
    ({"beta": -1.0}, r"--beta -1.0: must be >= 0"),
    ({"num_iterations": 0}, r"--num-iterations 0: must be >= 1"),
    ({"temperature": 0.0}, r"--temperature 0.0: must be > 0"),
    ({"reward_fn": []}, r"pass --reward-fn module:function"),
    ({"reward_fn": ["my_rewards:nan"]}, r"--reward-fn my_rewards:nan: returned a non-finite score for rows \["),
    ({"reward_fn": ["my_rewards:short"]}, r"--reward-fn my_rewards:short: returned shape \(1,\), expected a list"),
    ({"reward_fn": ["my_rewards:count_a", "my_rewards:boom"]}, r"--reward-fn my_rewards:boom: raised KeyError"),
    ({"reward_fn": ["no_such_module:f"]}, r"--reward-fn no_such_module:f: cannot import"),
])
def test_bad_input_is_one_line(tiny_model_dir, task_dir, tmp_path, monkeypatch, kw, match):
    monkeypatch.syspath_prepend(str(task_dir))
    with pytest.raises(UserError, match=match):
        main(_args(tiny_model_dir, task_dir, tmp_path / "out", total_steps=1, **kw))
    # flags fail before anything is written; a failing reward function at the step-0 eval, before it is logged
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "checkpoints").exists()


# --- runs -------------------------------------------------------------------------------------------------------------
TRAIN_KEYS = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
              "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "episodes_per_s", "tokens_per_s", "grad_norm",
              "lr", "time/generation", "time/scoring", "time/logprobs", "time/update")


# an update's metrics: absent from a log window whose steps made no update (every completion truncated and masked:
# nothing to average the loss over)
UPDATE_KEYS = ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "grad_norm", "kl")


def finite_keys(records: list[dict], keys) -> bool:
    """Each key finite wherever logged; a rollout key in every record, an update key in one at least."""
    return all(math.isfinite(m[f"train/{k}"]) for m in records for k in keys if f"train/{k}" in m) and all(
        all(f"train/{k}" in m for m in records) if k not in UPDATE_KEYS else any(f"train/{k}" in m for m in records)
        for k in keys)


def _flags(model, task_dir, out, **kw):
    flags = dict(model=model, dataset=task_dir / "prompts.jsonl", output_dir=out, precision="fp32", batch_size=2,
                 num_generations=4, total_steps=2, learning_rate=1e-3, log_every=1, eval_every=0, save_every=0,
                 max_length=48, max_prompt_length=24, max_new_tokens=6, eval_size=4) | kw
    return [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}"
            for k, v in ((k.replace("_", "-"), v) for k, v in flags.items())]


@pytest.mark.slow
def test_smoke_run_with_reference_and_several_updates(tiny_model_dir, task_dir, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "grpo.py", "--reward-fn", "my_rewards:count_a", "--reward-fn",
                        "my_rewards:length", "--reward-weights", "1.0", "0.5", "--beta=0.1", "--num-iterations=2",
                        "--epsilon-high=0.28", "--mask-truncated-completions", "--loss-type=dr_grpo",
                        "--advantage=rloo"] + _flags(tiny_model_dir, task_dir, out, total_steps=3),
                       cwd=ROOT, env=ENV | {"PYTHONPATH": str(task_dir)}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    train = [m for m in read_metrics(out) if "train/reward" in m]
    assert [m["step"] for m in train] == [1, 2, 3]
    for key in TRAIN_KEYS + ("kl", "rewards/my_rewards:count_a/mean", "rewards/my_rewards:length/mean"):
        assert finite_keys(train, [key]), key
    for m in train:  # the weighted sum of the functions' means
        assert m["train/reward"] == pytest.approx(m["train/rewards/my_rewards:count_a/mean"]
                                                  + 0.5 * m["train/rewards/my_rewards:length/mean"], rel=1e-5)
    assert any("train/samples" in m for m in read_metrics(out))
    assert (out / "final" / "config.json").exists()


@pytest.mark.slow
def test_torchrun_parity_smoke_and_bad_reward(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    """DDP x2 (two groups per rank) gives the 1-process gradients of a 4-group update for every loss type, with
    token- and sequence-level (GSPO) ratios away from 1; the same launch then trains (smoke); a reward function that
    fails stops both ranks with one line."""
    monkeypatch.syspath_prepend(str(task_dir))
    common = dict(max_grad_norm=0.0, beta=0.1, num_iterations=2, mask_truncated_completions=True,
                  scale_rewards="batch")
    tr = GRPOTrainer(_args(tiny_model_dir, task_dir, tmp_path / "single", **common))
    single = grads_per_variant(tr, grpo_micro_batches(tr, [0, 1, 2, 3], old_policy_shift=0.1))
    assert len(single) == 2 * len(LossType)
    for lt in LossType:  # ratios away from 1: the sequence-level gradient is not the token-level one
        g_tok, g_seq = single[f"{lt}/token"], single[f"{lt}/sequence"]
        assert any(not torch.allclose(g_tok[n], g_seq[n], rtol=1e-3, atol=1e-7) for n in g_tok), lt
    env = ENV | {"PYTHONPATH": str(task_dir)}
    flags = _flags(tiny_model_dir, task_dir, tmp_path / "ddp", seed=5, **common) + ["--reward-fn=my_rewards:count_a"]
    r = subprocess.run(["torchrun", "--nproc_per_node=2", "--master_port=29561", "tests/grpo_parity_worker.py",
                        str(tmp_path / "ddp.pt")] + flags, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt")["grads"]
    for lt, grads in single.items():
        assert grads.keys() == ddp[lt].keys()
        for n in grads:
            torch.testing.assert_close(ddp[lt][n], grads[n], rtol=2e-4, atol=1e-6, msg=lambda m: f"{lt} {n}: {m}")
    train = [m for m in read_metrics(tmp_path / "ddp") if "train/reward" in m]
    assert len(train) == 2 and finite_keys(train, TRAIN_KEYS)
    bad = _flags(tiny_model_dir, task_dir, tmp_path / "bad") + ["--reward-fn=my_rewards:nan"]
    r = subprocess.run(["torchrun", "--nproc_per_node=2", "--master_port=29563", "grpo.py"] + bad, cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [errors[0]] and "--reward-fn my_rewards:nan: returned a non-finite score" in errors[0]
    # both ranks exit 2 without a traceback of their own (torchrun adds its report of the failed children)
    assert "exitcode: 2" in r.stderr and "exitcode: -" not in r.stderr and "[rank" not in r.stderr


def test_lora_reference_is_the_base_with_adapters_off(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(task_dir))
    t = main(_args(tiny_model_dir, task_dir, tmp_path, lora_r=4, beta=0.1, total_steps=2,
                   reward_fn=["my_rewards:length"]))
    assert t.ref_model is None
    kl = [m["train/kl"] for m in read_metrics(tmp_path) if "train/kl" in m]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 0  # step 1: the policy is still the base
    assert (tmp_path / "final" / "adapter").exists()


def test_gspo_defaults_to_the_papers_aggregation_and_refuses_length_weighting(tiny_model_dir, task_dir, tmp_path):
    """Sequence-level ratios average sequences (GSPO eq. 5): the default loss type is grpo there (dapo at token
    level), and an explicitly length-weighted one is one line. Two sequences of 1 and 4 tokens, A = 1, eps 0.2, ratio
    1.5 (clipped): grpo's loss is the paper's -1.2, dapo's weighs the 4-token one 4x."""
    seq = _args(tiny_model_dir, task_dir, tmp_path, importance_sampling_level="sequence")
    seq.validate()
    assert seq.loss_type == LossType.grpo
    tok = _args(tiny_model_dir, task_dir, tmp_path)
    tok.validate()
    assert tok.loss_type == LossType.dapo
    for lt in ("dapo", "dr_grpo"):
        with pytest.raises(UserError, match=rf"--loss-type {lt} with --importance-sampling-level sequence: weighs "
                                            r"each sequence's clipped term by its length.*use --loss-type grpo"):
            _args(tiny_model_dir, task_dir, tmp_path, importance_sampling_level="sequence", loss_type=lt).validate()
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]])
    logps = torch.log(torch.full((2, 4), 1.5)) * mask
    per_token, _, _ = clipped_token_loss(logps, torch.zeros(2, 4), torch.ones(2), 0.2, 0.2, mask, "sequence")
    assert aggregate_loss(per_token, mask, LossType.grpo, 4).item() == pytest.approx(-1.2)
    dapo = aggregate_loss(per_token, mask, LossType.dapo, 4)
    assert (dapo.total / dapo.count).item() == pytest.approx(-1.2) and dapo.count == 5  # each token counted


def test_gspo_clip_metrics_count_sequences(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    """With sequence-level ratios one clip decision is made per sequence: sequences of 1 and 4 loss tokens with only
    the first clipped log 0.5 (as TRL), not the token share 0.2."""
    monkeypatch.syspath_prepend(str(task_dir))
    tr = GRPOTrainer(_args(tiny_model_dir, task_dir, tmp_path, importance_sampling_level="sequence",
                           num_iterations=2))
    (mb,) = grpo_micro_batches(tr, [1])
    t = mb.tensors
    n = len(mb.sources)
    lengths = [1, 4] + [0] * (n - 2)  # loss tokens per sequence; the rest masked out
    t["loss_mask"] = torch.zeros_like(t["loss_mask"])
    for i, k in enumerate(lengths):
        t["loss_mask"][i, :min(k, int(t["mask"][i].sum()))] = 1
    assert t["loss_mask"][1].sum() > 1
    with torch.no_grad():
        logps = token_logps(tr.model, mb, tr.args.temperature)
    t["old_logps"] = logps - torch.tensor([[1.0], [0.0]] + [[0.0]] * (n - 2)) * t["mask"]  # seq 0: ratio e > 1.2
    t["advantages"] = torch.ones(n)
    with torch.no_grad():
        out = tr.compute_loss(tr.model, mb)
    high = out.metrics["clip_ratio/high_mean"]
    assert (high.total / high.count).item() == pytest.approx(0.5)
