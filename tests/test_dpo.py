"""DPO: the loss against its closed form, tokenization and collation, step-0 identities, smoke runs."""
import json
import math
import sys

import pytest
import torch

from conftest import (build_tokenizer, pair_batch, pair_example, checkpoint_weights, dpo_args, read_metrics, run,
                      tiny_flags)
from dpo import DPOTrainer, LossType, dpo_loss
from plumbing.data import encode_completion
from plumbing.logprobs import sequence_logps


PC, PR, RC, RR = [-4.0, -9.0], [-6.0, -5.0], [-5.0, -7.0], [-5.5, -6.5]

def _sig(x):
    return 1 / (1 + math.exp(-x))

def _hand(loss_type, beta, eps, i, gamma=0.5):
    h = (PC[i] - RC[i]) - (PR[i] - RR[i])
    if loss_type == "simpo":  # SimPO eq. 6 on the policy's (length-averaged) log-probs: the reference is ignored
        z = beta * (PC[i] - PR[i]) - gamma
        return -(1 - eps) * math.log(_sig(z)) - eps * math.log(_sig(-z))
    if loss_type == "orpo":  # ORPO eq. 6: NLL(y_w) + lambda * -log sigmoid(log odds ratio), odds = p / (1 - p)
        odds = lambda lp: math.exp(lp) / (1 - math.exp(lp))  # noqa: E731
        return -PC[i] - beta * math.log(_sig(math.log(odds(PC[i]) / odds(PR[i]))))
    if loss_type == "sigmoid":
        return -(1 - eps) * math.log(_sig(beta * h)) - eps * math.log(_sig(-beta * h))
    if loss_type == "robust":
        return (-(1 - eps) * math.log(_sig(beta * h)) + eps * math.log(_sig(-beta * h))) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2

@pytest.mark.parametrize("loss_type,beta,eps", [(lt, 0.1, 0.0) for lt in LossType] + [
    ("sigmoid", 0.5, 0.2), ("robust", 0.5, 0.2), ("simpo", 2.0, 0.2)])
def test_loss_types_match_hand_computation(loss_type, beta, eps):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    losses, cr, rr = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta, loss_type, eps)
    for i in range(2):
        assert losses[i].item() == pytest.approx(_hand(loss_type, beta, eps, i), rel=1e-12)
        assert cr[i].item() == pytest.approx(beta * (PC[i] - RC[i]))
        assert rr[i].item() == pytest.approx(beta * (PR[i] - RR[i]))
    if not LossType(loss_type).needs_reference:  # the loss is the policy's alone: another reference changes nothing
        torch.testing.assert_close(dpo_loss(t(PC), t(PR), t(RC) + 3, t(RR) - 1, beta, loss_type, eps)[0], losses)
    # accuracy is "chosen reward > rejected reward": pair 0 is right (0.1b > -0.05b), pair 1 wrong
    assert ((cr > rr).tolist()) == [True, False]

def test_pinned_values():
    """Literal values computed once outside the code under test, so a mistake shared by formula and test shows."""
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    args = t(PC[0]), t(PR[0]), t(RC[0]), t(RR[0])  # h = 1.5
    assert dpo_loss(*args, 0.1, "sigmoid")[0].item() == pytest.approx(0.620957047789532, rel=1e-12)
    assert dpo_loss(*args, 0.5, "robust", 0.2)[0].item() == pytest.approx(0.13687100611490002, rel=1e-12)
    assert dpo_loss(*args, 0.5, "hinge")[0].item() == pytest.approx(0.25, rel=1e-12)
    assert dpo_loss(*args, 0.5, "ipo")[0].item() == pytest.approx(0.25, rel=1e-12)  # (1.5 - 1)^2
    # SimPO, beta 2, gamma 0.5: z = 2 x (-4 + 6) - 0.5 = 3.5, -log sigmoid(3.5); with label smoothing 0.2
    assert dpo_loss(*args, 2.0, "simpo", 0.0, 0.5)[0].item() == pytest.approx(0.02975041827262056, rel=1e-12)
    assert dpo_loss(*args, 2.0, "simpo", 0.2, 0.5)[0].item() == pytest.approx(0.7297504182726206, rel=1e-12)
    # ORPO, lambda 0.1: 4 (the NLL) - 0.1 log sigmoid(log odds ratio 2.016003617456927)
    assert dpo_loss(*args, 0.1, "orpo")[0].item() == pytest.approx(4.012503372381736, rel=1e-12)


def test_loss_type_properties():
    assert [lt for lt in LossType if not lt.needs_reference] == ["simpo", "orpo"]
    assert [lt for lt in LossType if lt.length_averaged] == ["ipo", "simpo", "orpo"]
    assert [lt for lt in LossType if lt.smoothable] == ["sigmoid", "robust", "simpo"]


def test_simpo_and_orpo_gradients():
    """SimPO: d/d pc of -log sigmoid(beta (pc - pr) - gamma) = -beta sigmoid(-z); ORPO: the NLL's -1 plus the odds
    ratio's -lambda sigmoid(-lor) / (1 - p_w) (d log odds / d log p = 1 / (1 - p))."""
    pc, pr = torch.tensor([-0.5], dtype=torch.float64, requires_grad=True), torch.tensor([-1.5], dtype=torch.float64)
    dpo_loss(pc, pr, torch.zeros(1), torch.zeros(1), 2.0, "simpo", simpo_gamma=0.5)[0].sum().backward()
    assert pc.grad.item() == pytest.approx(-2.0 * _sig(-(2.0 * 1.0 - 0.5)), rel=1e-12)
    pc.grad = None
    dpo_loss(pc, pr, torch.zeros(1), torch.zeros(1), 0.1, "orpo")[0].sum().backward()
    p_w, p_l = math.exp(-0.5), math.exp(-1.5)
    lor = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
    assert pc.grad.item() == pytest.approx(-1 - 0.1 * _sig(-lor) / (1 - p_w), rel=1e-12)

def test_policy_equals_reference_gives_ln2_and_zero_rewards():
    x = torch.randn(5, dtype=torch.float32)
    y = torch.randn(5, dtype=torch.float32)
    for eps in (0.0, 0.3):
        losses, cr, rr = dpo_loss(x, y, x.clone(), y.clone(), 0.1, "sigmoid", eps)
        torch.testing.assert_close(losses, torch.full((5,), math.log(2)), atol=1e-7, rtol=0)
        assert cr.abs().max() == 0 and rr.abs().max() == 0

def test_dpo_gradient_direction():
    pc, pr = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.zeros(3), torch.zeros(3), 0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected
    torch.testing.assert_close(pc.grad, torch.full((3,), -0.05))  # d/dx -logsig(beta x) at 0 = -beta/2

def _examples(tok, n=3):
    rows = [{"prompt": "a cat sat" * (i + 1), "chosen": " on the mat" * (i + 1), "rejected": " up"} for i in range(n)]
    return [pair_example(tok, r, 64, 32)[0] | {"source": f"row{i}"} for i, r in enumerate(rows)]

def test_encode_completion_appends_eos_once():
    tok = build_tokenizer()
    ids = encode_completion(tok, " hi")
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert encode_completion(tok, " hi<eos>") == ids  # already there: not appended again
    assert encode_completion(tok, [{"role": "assistant", "content": " hi"}]) == ids

def test_truncation_cuts_prompt_left_then_completion_right():
    tok = build_tokenizer()
    row = {"prompt": "0123456789", "chosen": "abcdefgh", "rejected": "xy"}
    ex, truncated = pair_example(tok, row, max_length=10, max_prompt_length=4)
    assert truncated
    assert tok.decode(ex["prompt"]) == "6789"
    assert tok.decode(ex["completions"][0]) == "abcdef"  # 10 - 4 = 6 tokens: EOS cut off with the tail
    assert tok.decode(ex["completions"][1]) == "xy<eos>"
    ex, truncated = pair_example(tok, row, max_length=4, max_prompt_length=4)
    assert ex is None and truncated  # the completion would vanish: dropped


@pytest.mark.parametrize("kw", [{}, {"precompute_ref_logps": True}, {"padding_free": False},
                                {"loss_type": "ipo"}, {"label_smoothing": 0.2}, {"lora_r": 4},
                                {"lora_r": 4, "precompute_ref_logps": True}])
def test_step0_eval_is_ln2_with_zero_rewards(tiny_model_dir, pairs_file, tmp_path, kw):
    trainer = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path, total_steps=0, **kw))
    m = trainer.evaluate()
    if kw.get("loss_type") == "ipo":
        assert m["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, abs=1e-5)
    else:
        assert abs(m["loss"] - math.log(2)) < 1e-6
    assert abs(m["rewards/chosen"]) < 1e-6 and abs(m["rewards/rejected"]) < 1e-6 and abs(m["rewards/margins"]) < 1e-6

def test_step0_bf16_rewards_are_exactly_zero(tiny_model_dir, pairs_file, tmp_path):
    """bf16: the reference stores its Linear weights in bf16 (what autocast computes with anyway), so at step 0 it
    computes exactly what the policy computes: margins 0, not merely close."""
    trainer = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path, total_steps=0, precision="bf16"))
    assert any(p.dtype == torch.bfloat16 for p in trainer.ref_model.parameters())
    m = trainer.evaluate()
    assert m["rewards/chosen"] == 0 and m["rewards/rejected"] == 0 and m["rewards/margins"] == 0

@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "orpo"])
def test_compute_loss_feeds_summed_or_length_averaged_logps(tiny_model_dir, pairs_file, tmp_path, loss_type):
    """IPO, SimPO and ORPO get log-probs divided by completion length, the others sums; checked with a reference
    that differs (SimPO and ORPO build none: their rewards are beta x the policy's averaged log-probs)."""
    rpo = 0.0 if loss_type == "orpo" else 0.5
    t = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path, loss_type=loss_type, rpo_alpha=rpo, beta=0.1))
    exs = t.train_data[:4]
    assert len({len(c) for e in exs for c in e["completions"]}) > 1
    batch = pair_batch(exs, t.tokenizer.pad_token_id, False)
    with torch.no_grad():
        if LossType(loss_type).needs_reference:
            for p in t.ref_model.parameters():
                p.add_(0.01 * torch.randn_like(p))
            ref = sequence_logps(t.ref_model, batch)
        else:
            assert t.ref_model is None
            ref = torch.zeros(8)
        out = t.compute_loss(t.model, batch)
        pol = sequence_logps(t.model, batch)
    lengths = batch["lengths"].float()
    norm = lengths if loss_type in ("ipo", "simpo", "orpo") else torch.ones_like(lengths)
    (pc, pr), (rc, rr) = (pol / norm).chunk(2), (ref / norm).chunk(2)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, 0.1, loss_type)
    nll = (-pol.chunk(2)[0] / lengths.chunk(2)[0]).mean()
    torch.testing.assert_close(out.loss, losses.mean() + rpo * nll)
    torch.testing.assert_close(out.metrics["nll_loss"], nll)
    if loss_type == "orpo":  # its NLL term is the per-pair mean token NLL of the chosen completion
        torch.testing.assert_close(losses.mean() - nll, -0.1 * torch.nn.functional.logsigmoid(
            (pc - (-pc.exp()).log1p()) - (pr - (-pr.exp()).log1p())).mean())
    torch.testing.assert_close(out.metrics["rewards/margins"], (cr - rj).mean())
    torch.testing.assert_close(out.metrics["logps/chosen"], pc.mean())


@pytest.mark.parametrize("loss_type,beta", [("simpo", 2.0), ("orpo", 0.1)])
def test_simpo_orpo_smoke_run_without_reference(tiny_model_dir, pairs_file, tmp_path, loss_type, beta):
    """A few steps in process on the tiny model, eval on the training rows: no reference model anywhere (also not
    with --precompute-ref-logps), finite metrics, and the margin of averaged log-probs grows."""
    t = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path, loss_type=loss_type, beta=beta, total_steps=4,
                            eval_dataset=pairs_file, precompute_ref_logps=True, learning_rate=3e-3))
    assert t.ref_model is None and "ref_logps" not in t.train_data[0]
    before = t.evaluate()
    t.train()
    after = t.evaluate()
    assert all(math.isfinite(v) for v in after.values())
    assert after["loss"] < before["loss"] and after["rewards/margins"] > before["rewards/margins"]
    if loss_type == "orpo":
        assert after["nll_loss"] < before["nll_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,beta,port", [("simpo", 2.0, 29571), ("orpo", 0.1, 29573)])
def test_simpo_orpo_torchrun_equals_one_process(tiny_model_dir, pairs_file, tmp_path, loss_type, beta, port):
    """torchrun x2 (gloo, DDP, batch 2 per rank) sees the gradients, logged losses and margins of 1 process x batch 4 at
    every step: the length-averaged log-probs and ORPO's NLL term are per pair, so each rank's mean is its share."""
    from test_scaling import assert_same, launch
    common = dict(model=tiny_model_dir, data=pairs_file, loss_type=loss_type, beta=beta, max_grad_norm=0.0,
                  learning_rate=1e-4)
    single = launch(tmp_path / "single.pt", tmp_path / "single", batch_size=4, **common)
    ddp = launch(tmp_path / "ddp.pt", tmp_path / "ddp", nproc=2, port=port, batch_size=2, strategy="ddp", **common)
    assert len(single["grads"]) == len(ddp["grads"]) == 4
    for step, (g1, g2) in enumerate(zip(single["grads"], ddp["grads"]), 1):
        assert_same(g1, g2, f"{loss_type} grads step {step}")
    m1, m2 = ([m for m in read_metrics(tmp_path / name) if "train/loss" in m] for name in ("single", "ddp"))
    assert len(m1) == len(m2) == 4
    for x, y in zip(m1, m2):
        for k in ("train/loss", "train/rewards/margins", "train/grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k


@pytest.mark.slow
def test_smoke_run_metrics_and_hf_export(tiny_model_dir, pairs_file, tmp_path):
    r = run([sys.executable, "dpo.py", *tiny_flags(tiny_model_dir, pairs_file, tmp_path, batch_size=4,
                                                   eval_dataset=pairs_file)])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    train = [m for m in metrics if "train/loss" in m]
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4] and [m["step"] for m in evals] == [0, 2, 4]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_s"):
        assert all(math.isfinite(m[f"train/{key}"]) for m in train), key
    assert abs(evals[0]["eval/loss"] - math.log(2)) < 1e-6
    # eval on the training rows (--eval-dataset): after 4 steps at lr 1e-3 the policy prefers what it was taught
    assert evals[-1]["eval/rewards/margins"] > 0 and evals[-1]["eval/loss"] < math.log(2)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000004"]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    AutoTokenizer.from_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").exists()
    saved = checkpoint_weights(tmp_path / "checkpoints" / "step_00000004")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k])

@pytest.mark.slow
def test_bad_input_is_one_line_error(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n{oops\n")
    r = run([sys.executable, "dpo.py", "--model", tiny_model_dir, "--dataset", str(bad), "--output-dir",
             str(tmp_path / "out")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}:2: malformed JSON (Expecting property name enclosed in double quotes)"]
    r = run([sys.executable, "dpo.py", "--no-such-flag", "1"])
    assert r.returncode != 0 and "--no-such-flag" in r.stderr

@pytest.mark.slow
def test_bundled_model_step0_is_ln2(tmp_path):
    """The offline default model: converted once (cached), step-0 eval gives exactly ln 2 in fp32."""
    r = run([sys.executable, "dpo.py", "--total-steps", "0", "--precision", "fp32", "--output-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    (ev,) = read_metrics(tmp_path)
    assert abs(ev["eval/loss"] - math.log(2)) < 1e-6 and ev["eval/rewards/margins"] == 0
    correct = ev["eval/greedy_accuracy"] * 24  # a count of the 24 held-out questions; the bundled model gets few
    assert correct == pytest.approx(round(correct)) and correct < 8


def test_lora_reference_is_the_base_with_adapters_off(tiny_model_dir, pairs_file, tmp_path):
    """Under LoRA no frozen copy is made; after training, the reference log-probs are still the base model's."""
    from transformers import AutoModelForCausalLM

    from plumbing.packing import use_segment_attention
    t = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path, lora_r=4, total_steps=3))
    assert t.ref_model is None
    assert all("lora_" in n for n, p in t.model.named_parameters() if p.requires_grad)
    t.train()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    use_segment_attention(base)
    batch = t.make_batch(t.eval_data[:2])
    with torch.no_grad():
        with t.reference() as ref_model:
            ref = sequence_logps(ref_model, batch)
        plain, policy = sequence_logps(base, batch), sequence_logps(t.model, batch)
    torch.testing.assert_close(ref, plain)
    assert not torch.allclose(ref, policy)  # the adapters trained


@pytest.mark.parametrize("kw,match", [
    ({"loss_type": "orpo", "rpo_alpha": 1.0}, r"--rpo-alpha: --loss-type orpo has its own NLL term"),
    ({"loss_type": "orpo", "label_smoothing": 0.1}, r"--label-smoothing applies to .* not orpo"),
    ({"loss_type": "simpo", "simpo_gamma": float("nan")}, r"--simpo-gamma nan: must be finite"),
])
def test_simpo_orpo_bad_flags(tiny_model_dir, pairs_file, tmp_path, kw, match):
    from common import UserError
    with pytest.raises(UserError, match=match):
        DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path / "out", **kw))


def test_orpo_at_a_certain_completion_keeps_finite_gradients():
    """A chosen completion whose mean log-prob is exactly 0.0 in fp32 (the model is certain of it): log(1 - P) is
    -inf there unclamped; the loss and its gradient stay finite."""
    pc = torch.tensor([0.0, -0.5], requires_grad=True)
    pr = torch.tensor([-1.0, -2.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.zeros(2), torch.zeros(2), 0.1, "orpo")
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    # away from 0 the clamp changes nothing: the closed form of eqs. 4-7
    odds = lambda lp: lp - math.log(1 - math.exp(lp))  # noqa: E731
    want = 0.5 - 0.1 * math.log(1 / (1 + math.exp(-(odds(-0.5) - odds(-2.0)))))
    assert losses[1].item() == pytest.approx(want, rel=1e-5)


def test_logged_loss_is_the_optimized_loss_with_rpo(tiny_model_dir, pairs_file, tmp_path):
    """With --rpo-alpha the logged loss includes the NLL term (what is optimized); the term is also nll_loss."""
    t = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path, rpo_alpha=0.5))
    batch = t.make_batch(t.train_data[:4])
    with torch.no_grad():
        out = t.compute_loss(t.model, batch)
    assert out.metrics["loss"].item() == pytest.approx(out.loss.item())
    assert out.metrics["loss"].item() == pytest.approx(math.log(2) + 0.5 * out.metrics["nll_loss"].item(), rel=1e-5)
