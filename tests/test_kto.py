"""KTO: the loss against its closed form, unpaired and preference rows, the KL reference point (mismatched pairs of
the micro-batch, detached, clamped, over all ranks), exact per-class metrics, step-0 identities, an in-process smoke
run, and torchrun x2 gradients and metrics == one process."""
import json
import math
import random
import sys

import pytest
import torch

from common import Mean, UserError
from plumbing.metrics import MetricWindow
from conftest import capture_grads, naive_logps, read_metrics, tiny_flags, torchrun_grads_match
from kto import Args, KTOTrainer, kto_loss, with_mismatched_completions


def write_feedback(path, n: int, seed: int = 0) -> str:
    """Unpaired rows {"prompt", "completion", "label"} (strings and chat messages), a few preference rows among them;
    desirable completions use other words than undesirable ones, so a few steps can tell them apart."""
    rng = random.Random(seed)
    say = lambda lo, hi, words="the a cat dog sat ran on mat up down red blue": " ".join(  # noqa: E731
        rng.choices(words.split(), k=rng.randint(lo, hi)))
    good, bad = (lambda: " " + say(1, 4, "cat sat on mat")), (lambda: " " + say(1, 4, "dog ran up down"))  # noqa: E731
    with open(path, "w") as f:
        for i in range(n):
            label = bool(i % 3)
            if i % 7 == 3:
                row = {"prompt": say(3, 10), "chosen": good(), "rejected": bad()}
            elif i % 2:
                row = {"prompt": [{"role": "user", "content": say(3, 8)}],
                       "completion": [{"role": "assistant", "content": (good() if label else bad())[1:]}],
                       "label": label}
            else:
                row = {"prompt": say(3, 10), "completion": good() if label else bad(), "label": label}
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def feedback_file(tmp_path_factory):
    return write_feedback(tmp_path_factory.mktemp("kto") / "feedback.jsonl", 60)


def kto_args(model, data, out, **kw):
    base = dict(model=model, dataset=data, output_dir=str(out), precision="fp32", batch_size=4, total_steps=3,
                learning_rate=1e-3, warmup_steps=0, log_every=1, eval_every=0, save_every=0, max_length=64,
                max_prompt_length=32, seed=3, eval_size=5)
    return Args(**(base | kw))


# --- pure functions ---------------------------------------------------------------------------------------------------
def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_loss_matches_hand_computation():
    r = [1.0, -0.5, -2.0]  # log pi / pi_ref of a desirable, an undesirable, a desirable row
    desirable = torch.tensor([True, False, True])
    pol = torch.tensor([-3.0, -4.5, -7.0], dtype=torch.float64)
    ref = pol - torch.tensor(r, dtype=torch.float64)
    losses, rewards = kto_loss(pol, ref, desirable, torch.tensor(0.3, dtype=torch.float64), 0.5, 1.0, 1.5)
    # eq. 7: lambda_y - v, v = lambda_D sigmoid(beta (r - z0)) or lambda_U sigmoid(beta (z0 - r))
    hand = [1 - _sig(0.5 * (1.0 - 0.3)), 1.5 * (1 - _sig(0.5 * (0.3 + 0.5))), 1 - _sig(0.5 * (-2.0 - 0.3))]
    assert losses.tolist() == pytest.approx(hand, rel=1e-12)
    # literal values computed once outside the code under test
    assert losses.tolist() == pytest.approx([0.41338242108266994, 0.601968509831322, 0.7595109169491111], rel=1e-12)
    assert rewards.tolist() == pytest.approx([0.5, -0.25, -1.0], rel=1e-12)


def test_kto_gradients():
    """d/dr of 1 - sigmoid(beta (r - z0)) = -beta s (1 - s); of lambda_U (1 - sigmoid(beta (z0 - r))) = +lambda_U beta
    s' (1 - s'): descent raises desirable log-probs and lowers undesirable ones; z0 gets no gradient."""
    pol = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    kl = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    losses, _ = kto_loss(pol, torch.zeros(2, dtype=torch.float64), torch.tensor([True, False]), kl.detach(), 0.1,
                         2.0, 3.0)
    losses.sum().backward()
    s, s2 = _sig(0.1 * (-1.0 - 0.4)), _sig(0.1 * (0.4 + 2.0))
    assert pol.grad.tolist() == pytest.approx([-2.0 * 0.1 * s * (1 - s), 3.0 * 0.1 * s2 * (1 - s2)], rel=1e-12)
    assert kl.grad is None


def test_kl_pairs_rotate_the_batch_completions():
    rows = [{"prompt": [i], "completion": [10 + i], "label": True} for i in range(4)]
    paired = with_mismatched_completions(rows)
    assert [e["completions"] for e in paired] == [[[10], [13]], [[11], [10]], [[12], [11]], [[13], [12]]]
    # the mismatched completions are the batch's own, each with another prompt
    assert sorted(e["completions"][1] for e in paired) == sorted(e["completion"] for e in rows)


# --- data -------------------------------------------------------------------------------------------------------------
def test_rows_unpaired_and_labels_checked(tiny_model_dir, feedback_file, tmp_path, capsys):
    t = KTOTrainer(kto_args(tiny_model_dir, feedback_file, tmp_path, eval_size=0, max_length=128,
                            max_prompt_length=64))
    rows = [json.loads(line) for line in open(feedback_file)]
    n_pref = sum("chosen" in r for r in rows)
    assert len(t.train_data) == len(rows) + n_pref  # a preference row gives a desirable and an undesirable row
    n_d = sum(r.get("label", False) for r in rows) + n_pref
    assert sum(e["label"] for e in t.train_data) == n_d
    assert f"train: {len(rows) + n_pref} rows, {n_d} desirable" in capsys.readouterr().out
    pref = next(i for i, r in enumerate(rows) if "chosen" in r)
    mine = [e for e in t.train_data if e["source"].endswith(f":{pref + 1}")]
    assert [e["label"] for e in mine] == [True, False]
    assert t.tokenizer.decode(mine[0]["completion"]) == rows[pref]["chosen"] + "<eos>"
    bad = tmp_path / "bad.jsonl"
    for row, match in (({"prompt": "a", "completion": " b"}, r"bad\.jsonl:2: field 'label' must be true or false, got "
                                                              r"None"),
                       ({"prompt": "a", "completion": " b", "label": 1}, r"field 'label' must be true or false, got 1"),
                       ({"prompt": "a", "label": True}, r"bad\.jsonl:2: missing key 'completion'")):
        bad.write_text(json.dumps({"prompt": "x", "completion": " y", "label": True}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(UserError, match=match):
            KTOTrainer(kto_args(tiny_model_dir, str(bad), tmp_path / "o", eval_size=0, batch_size=2))
    with pytest.raises(UserError, match=r"--batch-size 1: the KL estimate"):
        KTOTrainer(kto_args(tiny_model_dir, feedback_file, tmp_path / "o2", batch_size=1))
    with pytest.raises(UserError, match=r"--undesirable-weight -1.0: must be >= 0"):
        KTOTrainer(kto_args(tiny_model_dir, feedback_file, tmp_path / "o3", undesirable_weight=-1.0))


# --- the trainer ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"precompute_ref_logps": True}, {"padding_free": False}, {"lora_r": 4},
                                {"desirable_weight": 2.0}])
def test_step0_eval_identities(tiny_model_dir, feedback_file, tmp_path, kw):
    """pi = pi_ref: rewards and z0 are 0, every row's loss is lambda_y / 2."""
    t = KTOTrainer(kto_args(tiny_model_dir, feedback_file, tmp_path, total_steps=0, eval_size=6, **kw))
    assert (t.ref_model is None) == bool(kw.get("precompute_ref_logps") or kw.get("lora_r"))
    m = t.evaluate()
    n_d = sum(e["label"] for e in t.eval_data)
    w = kw.get("desirable_weight", 1.0)
    assert 0 < n_d < len(t.eval_data)
    assert m["loss"] == pytest.approx((w * n_d + len(t.eval_data) - n_d) / (2 * len(t.eval_data)), abs=1e-6)
    for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(m[k]) < 1e-6, k


def _perturbed_trainer(tiny_model_dir, feedback_file, tmp_path, z0_sign: int):
    """pi != pi_ref (noise on one of them) such that the first 6 rows' mismatched pairs have mean log pi / pi_ref of
    the given sign, beyond 0.05."""
    t = KTOTrainer(kto_args(tiny_model_dir, feedback_file, tmp_path, desirable_weight=1.5, beta=0.5))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in t.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        exs = with_mismatched_completions(t.train_data[:6])
        z0 = (naive_logps(t.model, t.tokenizer, exs) - naive_logps(t.ref_model, t.tokenizer, exs)).chunk(2)[1].mean()
        if z0 * z0_sign < 0:  # swap the weights of policy and reference
            ref = {k: v.clone() for k, v in t.ref_model.state_dict().items()}
            t.ref_model.load_state_dict(t.model.state_dict())
            t.model.load_state_dict(ref)
    assert abs(z0) > 0.05
    return t


def test_compute_loss_against_naive_logps(tiny_model_dir, feedback_file, tmp_path):
    """Loss, z0 and metrics from one sequence at a time; the gradient equals that of the hand-built loss with z0 a
    constant (a z0 that carried gradient would differ: it is > 0 here)."""
    t = _perturbed_trainer(tiny_model_dir, feedback_file, tmp_path, +1)
    exs = with_mismatched_completions(t.train_data[:6])
    labels = torch.tensor([e["label"] for e in exs])
    assert 0 < labels.sum() < 6
    batch = t.make_batch(exs)
    out = t.compute_loss(t.model, batch)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in t.model.named_parameters()}
    t.model.zero_grad()
    pol = naive_logps(t.model, t.tokenizer, exs)
    with torch.no_grad():
        ref = naive_logps(t.ref_model, t.tokenizer, exs)
    r, r_kl = (pol - ref).chunk(2)
    z0 = r_kl.mean().detach()
    assert z0 > 0.05  # the clamp at 0 does not act: z0's (missing) gradient would show
    hand = torch.where(labels, 1.5 * (1 - torch.sigmoid(0.5 * (r - z0))), 1 - torch.sigmoid(0.5 * (z0 - r))).mean()
    torch.testing.assert_close(out.loss, hand)
    torch.testing.assert_close(out.metrics["kl"], z0)
    hand.backward()
    for n, p in t.model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    m = out.metrics["rewards/rejected"]
    assert m.count == 6 - labels.sum() and float(m.total) == pytest.approx(0.5 * r[~labels].sum().item(), abs=2e-5)
    m = out.metrics["logps/chosen"]
    assert m.count == labels.sum() and float(m.total) == pytest.approx(pol[:6][labels].sum().item(), rel=1e-6)


def test_kl_reference_point_is_clamped_at_zero(tiny_model_dir, feedback_file, tmp_path):
    t = _perturbed_trainer(tiny_model_dir, feedback_file, tmp_path, -1)
    exs = with_mismatched_completions(t.train_data[:6])
    with torch.no_grad():
        out = t.compute_loss(t.model, t.make_batch(exs))
        r_kl = (naive_logps(t.model, t.tokenizer, exs) - naive_logps(t.ref_model, t.tokenizer, exs)).chunk(2)[1]
    assert r_kl.mean() < -0.05 and out.metrics["kl"] == 0


def test_class_means_are_exact_over_uneven_micro_batches(tiny_model_dir, feedback_file, tmp_path):
    """Two micro-batches, one without undesirable rows: the logged rewards/rejected is the mean over the undesirable
    rows (Mean(total, count)), not a mean of per-batch means."""
    t = _perturbed_trainer(tiny_model_dir, feedback_file, tmp_path, +1)
    des = [e for e in t.train_data if e["label"]][:4]
    und = [e for e in t.train_data if not e["label"]][:3]
    window, rewards = MetricWindow(), {True: [], False: []}
    with torch.no_grad():
        for exs in (with_mismatched_completions(des[:3]), with_mismatched_completions(des[3:] + und)):
            b = t.make_batch(exs)
            out = t.compute_loss(t.model, b)
            window.add(out.metrics, b.num_samples)
            r = t.args.beta * (naive_logps(t.model, t.tokenizer, exs) - naive_logps(t.ref_model, t.tokenizer, exs))
            for e, v in zip(exs, r[:len(exs)].tolist()):
                rewards[e["label"]].append(v)
    m = window.reduce(torch.device("cpu"))
    assert m["rewards/chosen"] == pytest.approx(sum(rewards[True]) / 4, abs=2e-5)
    assert m["rewards/rejected"] == pytest.approx(sum(rewards[False]) / 3, abs=2e-5)
    assert abs(sum(rewards[True]) / 4 - (sum(rewards[True][:3]) / 3 + rewards[True][3]) / 2) > 1e-3  # it can tell
    only = MetricWindow()
    only.add(out.metrics | {"rewards/rejected": Mean(0.0, 0.0)}, 1)
    assert "rewards/rejected" not in only.reduce(torch.device("cpu"))  # no row of a class: no value, not 0


@pytest.mark.parametrize("kw", [{}, {"precompute_ref_logps": True}])
def test_smoke_run_in_process(tiny_model_dir, feedback_file, tmp_path, kw):
    """A few steps on the tiny model, eval on the training rows: the rewards separate, metrics.jsonl has TRL's keys,
    the model is exported."""
    t = KTOTrainer(kto_args(tiny_model_dir, feedback_file, tmp_path, total_steps=4, eval_dataset=feedback_file,
                            learning_rate=3e-3, **kw))
    t.train()
    metrics = read_metrics(tmp_path)
    train = [m for m in metrics if "train/loss" in m]
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4] and [m["step"] for m in evals] == [0, 4]
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                "logps/rejected", "grad_norm", "lr"):
        assert all(math.isfinite(m[f"train/{key}"]) for m in train), key
    assert evals[0]["eval/loss"] == pytest.approx(0.5, abs=1e-6)
    assert evals[-1]["eval/rewards/margins"] > 0.05 and evals[-1]["eval/loss"] < 0.5
    assert (tmp_path / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_torchrun_gradients_and_metrics_equal_one_process(tiny_model_dir, feedback_file, tmp_path):
    """1 process, batch 4 == DDP x2 (gloo), batch 2 each, with accumulation 2: the KL pairs are drawn from the global
    micro-batch and z0 is all-reduced, so every step's gradients match; so do the logged z0 and per-class means, and
    the eval metrics, where 5 eval rows leave rank 1 a filler batch (counted 0 in z0)."""
    # beta 2 and lr 1e-3: z0 and the rewards move enough that a z0 off by 1e-3 shows in the gradients
    common = dict(gradient_accumulation_steps=2, max_grad_norm=0.0, learning_rate=1e-3, beta=2.0, total_steps=3,
                  eval_every=3, save_every=0, eval_size=5, max_length=64, max_prompt_length=32)
    single = KTOTrainer(kto_args(tiny_model_dir, feedback_file, tmp_path / "single", batch_size=4, **common))
    grads = capture_grads(single)
    single.train()
    assert len(single.eval_data) == 5
    flags = tiny_flags(tiny_model_dir, feedback_file, tmp_path / "ddp", batch_size=2, seed=3, **common)
    torchrun_grads_match("kto", flags, tmp_path / "ddp.pt", 29571, grads)
    m1, m2 = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [m["step"] for m in m1] == [m["step"] for m in m2]
    for a, b in zip(m1, m2):
        for k in a:
            if k.split("/", 1)[-1] in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                       "logps/chosen", "logps/rejected", "grad_norm"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert any(m.get("train/kl", 0) > 0 for m in m1)  # z0 took part


@pytest.mark.slow
def test_script_entry_point_is_one_line_error(tmp_path, tiny_model_dir):
    from conftest import run
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": " b", "label": "yes"}) + "\n")
    r = run([sys.executable, "kto.py", "--model", tiny_model_dir, "--dataset", str(bad), "--eval-size", "0",
             "--output-dir", str(tmp_path / "out")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: {bad}:1: field 'label' must be true or false, got 'yes'"]
