"""Distillation (GKD): the generalized JSD against hand computations at beta 0, 0.5, 1, the chunked loss == the
plain one (values and gradients), teacher == student gives loss 0, --lmbda 0 / 1 train on the data's / the student's
own completions, an in-process smoke run with a separate teacher, torchrun x2 (gloo) == one process (gradients and
metrics; on-policy rows picked alike), and bad flags as one line."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from common import UserError
from conftest import (build_model, build_tokenizer, capture_grads, read_metrics, run, tiny_flags,
                      torchrun_grads_match)
from distill import Args, DistillTrainer, generalized_jsd


def distill_args(model, data, out, **kw):
    base = dict(model=model, dataset=data, output_dir=str(out), precision="fp32", batch_size=4, total_steps=2,
                learning_rate=1e-3, warmup_steps=0, log_every=1, eval_every=0, save_every=0, max_length=64,
                max_prompt_length=32, seed=3, eval_size=4, max_new_tokens=6)
    return Args(**(base | kw))


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("distill") / "rows.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            prompt = f"add {i % 7} and {i % 5}:"
            if i % 2:
                row = {"prompt": [{"role": "user", "content": prompt}],
                       "completion": [{"role": "assistant", "content": str(i % 7 + i % 5)}]}
            else:
                row = {"prompt": prompt, "completion": f" {i % 7 + i % 5}"}
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """A teacher with the tiny model's tokenizer but other (seeded) weights."""
    d = tmp_path_factory.mktemp("teacher")
    tok = build_tokenizer()
    build_model(len(tok), seed=11).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory):
    """The tiny model with its weights scaled up: its replies depend on the context, so a few-shot teacher and the
    bare student differ from step 0 (the plain tiny model's nearly equal distributions leave gradients that are
    differences of almost equal numbers, whose rounding Adam's first steps amplify)."""
    d = tmp_path_factory.mktemp("sharp")
    tok = build_tokenizer()
    model = build_model(len(tok), seed=5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


# --- the loss ---------------------------------------------------------------------------------------------------------
def test_jsd_matches_hand_computation():
    p_s, p_t = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]
    s, t = torch.tensor([p_s]).log(), torch.tensor([p_t]).log()  # logits whose softmax is p (T = 1)
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))  # noqa: E731
    m = [0.5 * a + 0.5 * b for a, b in zip(p_t, p_s)]
    cases = {0.0: kl(p_t, p_s), 1.0: kl(p_s, p_t), 0.5: 0.5 * kl(p_t, m) + 0.5 * kl(p_s, m)}
    b = 0.3
    m3 = [b * a + (1 - b) * c for a, c in zip(p_t, p_s)]  # m = beta p_T + (1 - beta) p_S
    cases[b] = b * kl(p_t, m3) + (1 - b) * kl(p_s, m3)
    for beta, want in cases.items():
        torch.testing.assert_close(generalized_jsd(s, t, beta), torch.tensor([want]), msg=f"beta {beta}")
    # temperature divides both logits before the softmax
    torch.testing.assert_close(generalized_jsd(2 * s, 2 * t, 0.0, temperature=2.0), torch.tensor([cases[0.0]]))
    assert cases[0.0] != pytest.approx(cases[1.0])  # the two KL directions differ on these distributions


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_jsd_equals_plain(beta):
    torch.manual_seed(0)
    s = torch.randn(11, 37, dtype=torch.float64, requires_grad=True)
    t = torch.randn(11, 37, dtype=torch.float64)
    w = torch.rand(11, dtype=torch.float64)
    plain = generalized_jsd(s, t, beta, 0.7, chunk=None)
    (g_plain,) = torch.autograd.grad((plain * w).sum(), s)
    chunked = generalized_jsd(s, t, beta, 0.7, chunk=3)
    (g_chunked,) = torch.autograd.grad((chunked * w).sum(), s)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(g_chunked, g_plain)
    # and the plain path is the textbook definition written out with F.kl_div
    ls, lt = F.log_softmax(s / 0.7, -1), F.log_softmax(t / 0.7, -1)
    want = {0.0: (lt.exp() * (lt - ls)).sum(-1), 1.0: (ls.exp() * (ls - lt)).sum(-1)}.get(beta)
    if want is None:
        lm = (0.5 * lt.exp() + 0.5 * ls.exp()).log()
        want = 0.5 * (lt.exp() * (lt - lm)).sum(-1) + 0.5 * (ls.exp() * (ls - lm)).sum(-1)
    torch.testing.assert_close(plain, want)
    assert (plain >= 0).all()


# --- the trainer ------------------------------------------------------------------------------------------------------
def trained_texts(trainer) -> list[str]:
    """The completions of every micro-batch the trainer trains on, as text."""
    seen, make = [], trainer.make_batch

    def wrapped(examples):
        seen.extend(trainer.tokenizer.decode(e["completion"]) for e in examples)
        return make(examples)
    trainer.make_batch = wrapped
    return seen


def test_teacher_equal_to_student_gives_zero_loss(tiny_model_dir, rows_file, tmp_path):
    trainer = DistillTrainer(distill_args(tiny_model_dir, rows_file, tmp_path / "o", teacher=tiny_model_dir,
                                          total_steps=0, lmbda=1.0, beta=0.5))
    out = trainer.training_step()  # on-policy samples, teacher == student at step 0
    assert out.metrics["loss"].total == pytest.approx(0.0, abs=1e-6)
    assert float(out.metrics["teacher_logps"].total) == pytest.approx(float(out.metrics["student_logps"].total),
                                                                        abs=1e-5)
    trainer.release_output_dir()


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_lmbda_chooses_data_or_sampled_completions(tiny_model_dir, rows_file, tmp_path, lmbda):
    trainer = DistillTrainer(distill_args(tiny_model_dir, rows_file, tmp_path / "o", teacher=tiny_model_dir,
                                          lmbda=lmbda, learning_rate=1e-5))
    data = {trainer.tokenizer.decode(e["completion"]) for e in trainer.train_data}
    trainer.eval_data = []  # only training batches reach make_batch
    seen = trained_texts(trainer)
    trainer.train()
    train = [m for m in read_metrics(tmp_path / "o") if "train/loss" in m]
    assert [m["train/on_policy_fraction"] for m in train] == [lmbda, lmbda]
    assert len(seen) == 8
    on_data = sum(t in data for t in seen)
    # the random tiny model's samples are never one of the data's short answers + EOS
    assert on_data == (8 if lmbda == 0 else 0)


def test_on_policy_rows_are_seeded_per_stream_position(tiny_model_dir, rows_file, tmp_path):
    trainer = DistillTrainer(distill_args(tiny_model_dir, rows_file, tmp_path / "o", teacher=tiny_model_dir,
                                          lmbda=0.5, total_steps=0))
    picks = [trainer.on_policy(p) for p in range(400)]
    assert 150 < sum(picks) < 250 and picks == [trainer.on_policy(p) for p in range(400)]
    trainer.release_output_dir()


def test_smoke_with_another_teacher(tiny_model_dir, other_teacher, rows_file, tmp_path):
    trainer = DistillTrainer(distill_args(tiny_model_dir, rows_file, tmp_path / "o", teacher=other_teacher,
                                          total_steps=4, lmbda=0.5, gradient_accumulation_steps=2, eval_every=2))
    trainer.train()
    metrics = read_metrics(tmp_path / "o")
    train = [m for m in metrics if "train/loss" in m]
    assert len(train) == 4
    for m in train:
        assert m["train/loss"] > 0 and math.isfinite(m["train/grad_norm"])
        assert m["train/teacher_logps"] < 0 and m["train/student_logps"] < 0
        assert m["train/completions/mean_length"] >= 1 and 0 <= m["train/on_policy_fraction"] <= 1
    evals = [m for m in metrics if "eval/loss" in m]
    assert len(evals) == 3 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]  # the student moves toward the teacher
    assert (tmp_path / "o" / "final" / "config.json").exists()


def test_bad_flags_are_one_line(tiny_model_dir, other_teacher, rows_file, tmp_path, tmp_path_factory):
    for kw, match in [({"lmbda": 1.5}, r"--lmbda 1.5: must be in \[0, 1\]"),
                      ({"beta": -0.1}, r"--beta -0.1: must be in \[0, 1\]"),
                      ({"temperature": 0.0}, r"--temperature 0.0: must be > 0"),
                      ({}, r"--dataset .*rows.jsonl: pass --teacher")]:
        with pytest.raises(UserError, match=match):
            DistillTrainer(distill_args(tiny_model_dir, rows_file, tmp_path / "o", **kw))
    small = tmp_path_factory.mktemp("small_vocab")
    build_model(50).save_pretrained(small)
    build_tokenizer().save_pretrained(small)
    with pytest.raises(UserError, match=r"--teacher .*: 50 output rows \(the student: 257\) for a tokenizer of 257 "
                                        r"tokens"):
        DistillTrainer(distill_args(tiny_model_dir, rows_file, tmp_path / "o2", teacher=str(small)))


def test_teacher_tokenizer_is_compared_not_its_row_count(tiny_model_dir, other_teacher, rows_file, tmp_path):
    """A teacher with the student's tokenizer and an embedding padded to 320 rows (as Qwen2.5 7B's is beside 0.5B's)
    trains, with the loss of the same teacher unpadded (the extra rows are never used); a teacher of the same size
    whose tokenizer maps text to other ids is one line naming --teacher."""
    from transformers import AutoModelForCausalLM
    padded = tmp_path / "padded"
    model = AutoModelForCausalLM.from_pretrained(other_teacher)
    model.resize_token_embeddings(320, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[257:] = 5.0  # rows no token maps to: they would dominate the softmax
    model.save_pretrained(padded)
    build_tokenizer().save_pretrained(padded)
    losses = []
    for teacher in (other_teacher, str(padded)):
        trainer = DistillTrainer(distill_args(tiny_model_dir, rows_file, tmp_path / f"o{len(losses)}", teacher=teacher,
                                              lmbda=0.0, total_steps=2))
        losses.append(float(trainer.training_step().metrics["loss"].total))
        trainer.release_output_dir()
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    trainer = DistillTrainer(distill_args(tiny_model_dir, rows_file, tmp_path / "o2", teacher=str(padded),
                                          lmbda=0.5, total_steps=2))
    trainer.train()
    assert (tmp_path / "o2" / "final" / "config.json").exists()

    other = tmp_path / "other_ids"
    AutoModelForCausalLM.from_pretrained(other_teacher).save_pretrained(other)
    build_tokenizer(permuted=True).save_pretrained(other)
    with pytest.raises(UserError, match=r"^--teacher .*other_ids: its tokenizer is not the student's \('.' is id \d+, "
                                        r"not \d+\); the teacher must share the student's tokenizer$"):
        DistillTrainer(distill_args(tiny_model_dir, rows_file, tmp_path / "o3", teacher=str(other)))
    assert not (tmp_path / "o3").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_plan_counts_the_teacher_at_its_own_size(tiny_model_dir, rows_file, tmp_path, precision):
    """A 39M teacher beside the tiny student: the plan's frozen models are the teacher's bytes (fp32, or under bf16
    its Linear weights in bf16 and its embedding in fp32), not another copy of the student's. FSDP (sharded bytes,
    the teacher's largest unit gathered): tests/test_safeguards.py's torchrun launch."""
    from conftest import big_teacher_dir
    teacher, n, _ = big_teacher_dir(tmp_path / "teacher")
    trainer = DistillTrainer(distill_args(tiny_model_dir, rows_file, tmp_path / "o", teacher=str(teacher),
                                          precision=precision, total_steps=0))
    embedding = trainer.teacher_model.get_input_embeddings().weight.numel()
    want = 4 * n if precision == "fp32" else 4 * embedding + 2 * (n - embedding)
    assert trainer.memory_plan["reference"] == pytest.approx(want)
    assert trainer.memory_plan["gathered"] == 0
    student = sum(p.numel() for p in trainer.model.parameters())
    assert trainer.memory_plan["parameters"] == pytest.approx(4 * student)
    trainer.release_output_dir()


def test_torchrun_gradients_and_metrics_equal_one_process(sharp_model_dir, tmp_path):
    """1 process, batch 4 == DDP x2 (gloo), batch 2 each, with accumulation 2, on the default path (context
    distillation on the built-in task, the teacher's few-shot prompts packed apart from the student's): the loss is a
    mean over the step's completion tokens on all ranks, and the ranks' rows hold different numbers of them ("7" and
    "12"), so every step's gradients match only if the token count is summed over ranks; so do the logged metrics
    and the eval (the held-out loss and greedy accuracy, questions split over ranks). --lmbda 0: sampled
    completions come from each rank's own RNG, so they cannot match a single process's."""
    common = dict(gradient_accumulation_steps=2, max_grad_norm=0.0, lmbda=0.0, total_steps=3,
                  eval_every=3, save_every=0, num_shots=2, max_length=96, max_prompt_length=80)
    single = DistillTrainer(distill_args(sharp_model_dir, "arithmetic", tmp_path / "single", batch_size=4, **common))
    grads = capture_grads(single)
    single.train()
    flags = tiny_flags(sharp_model_dir, "arithmetic", tmp_path / "ddp", batch_size=2, seed=3, max_new_tokens=6,
                       **common)
    torchrun_grads_match("distill", flags, tmp_path / "ddp.pt", 29581, grads)
    m1, m2 = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [m["step"] for m in m1] == [m["step"] for m in m2]
    keys = ("loss", "student_logps", "teacher_logps", "on_policy_fraction", "completions/mean_length", "grad_norm",
            "greedy_accuracy")
    compared = 0
    for a, b in zip(m1, m2):
        for k in a:
            if k.split("/", 1)[-1] in keys:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
                compared += 1
    assert compared >= 3 * 6 + 2 and any(m.get("train/loss", 0) > 0 for m in m1)


def test_torchrun_picks_the_same_on_policy_rows(tiny_model_dir, other_teacher, rows_file, tmp_path):
    """--lmbda 0.5 under torchrun x2: which rows are sampled is decided per place in the data stream, so each step's
    on-policy fraction equals one process's (the samples themselves come from each rank's RNG and differ)."""
    common = dict(teacher=other_teacher, lmbda=0.5, total_steps=4, eval_every=0, save_every=0, max_length=64,
                  max_prompt_length=32)
    single = DistillTrainer(distill_args(tiny_model_dir, rows_file, tmp_path / "single", batch_size=4, **common))
    single.train()
    flags = tiny_flags(tiny_model_dir, rows_file, tmp_path / "ddp", batch_size=2, seed=3, max_new_tokens=6,
                       eval_size=4, **common)
    r = run(["torchrun", "--nproc_per_node=2", "--master_port=29583", "distill.py"] + flags)
    assert r.returncode == 0, r.stderr[-3000:]
    fractions = [[m["train/on_policy_fraction"] for m in read_metrics(tmp_path / d) if "train/loss" in m]
                 for d in ("single", "ddp")]
    assert len(fractions[0]) == 4 and 0 < sum(fractions[0]) < 4  # some rows of each kind
    assert fractions[0] == fractions[1]
