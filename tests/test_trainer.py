"""BaseTrainer behaviour, through dpo.py on a tiny model: accumulation, resume, bad input, non-finite steps."""
import importlib
import json
import shutil

import pytest
import torch

from common import LossOutput, Mean, StepOutput, UserError, sequence_logps
from conftest import capture_grads, checkpoint_weights, dpo_args, read_metrics, update_grads
from dpo import DPOTrainer, main
from plumbing.metrics import MetricWindow


@pytest.mark.parametrize("kw", [{}, {"rpo_alpha": 1.0, "loss_type": "ipo"}])
def test_gradient_accumulation_invariance(tiny_model_dir, pairs_file, tmp_path, kw):
    runs = []
    for bs, accum in ((4, 1), (2, 2)):
        trainer = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path / f"{bs}x{accum}", batch_size=bs,
                                   gradient_accumulation_steps=accum, **kw))
        grads = capture_grads(trainer)
        trainer.train()
        runs.append((grads, trainer.model.state_dict(), read_metrics(trainer.output_dir)))
    (g1, w1, m1), (g2, w2, m2) = runs
    assert len(g1) == len(g2) == 3
    for a, b in zip(g1, g2):
        for n in a:
            torch.testing.assert_close(a[n], b[n])
    for n in w1:
        torch.testing.assert_close(w1[n], w2[n])
    t1 = [m for m in m1 if "train/loss" in m]
    t2 = [m for m in m2 if "train/loss" in m]
    for a, b in zip(t1, t2):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-5)

def test_tied_embedding_gradient_is_the_dense_one(tiny_model_dir, pairs_file, tmp_path):
    """One process adds the tied embedding's looked-up rows into the LM head's gradient (a sparse embedding
    gradient): the optimizer sees the same dense gradient as with a dense embedding gradient."""
    runs = []
    for sparse in (True, False):
        trainer = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path / str(sparse), total_steps=2))
        emb = trainer.model.get_input_embeddings()
        assert emb.sparse and emb.weight is trainer.model.get_output_embeddings().weight  # the tiny model ties them
        emb.sparse = sparse
        grads = capture_grads(trainer)
        trainer.train()
        runs.append(grads)
    for a, b in zip(*runs):
        assert not a["model.embed_tokens.weight"].is_sparse
        for n in a:
            torch.testing.assert_close(a[n], b[n], msg=n)


def test_clipping_through_fused_adamw_equals_clip_grad_norm(tiny_model_dir, pairs_file, tmp_path):
    """common.clip_in_fused_adamw (the clip factor rides in fused AdamW's grad_scale) against the plain path,
    clip_grad_norm_ with an AdamW that is not fused: the same weights and gradient norms. --adam-eps 1 makes the
    update depend on the gradient's scale (AdamW is nearly blind to it otherwise), so clipping shows in the weights."""
    runs = []
    for name, clip in (("fused", 1e-3), ("plain", 1e-3), ("unclipped", 0.0)):
        trainer = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path / name, max_grad_norm=clip, adam_eps=1.0,
                                      learning_rate=1.0, log_every=1))
        if name == "plain":
            groups = [{k: v for k, v in g.items() if k != "fused"} for g in trainer.optimizer.param_groups]
            trainer.optimizer = torch.optim.AdamW(groups, foreach=False)
            trainer.scheduler = trainer.build_scheduler()
        trainer.train()
        norms = [m["train/grad_norm"] for m in read_metrics(trainer.output_dir) if "train/grad_norm" in m]
        runs.append((trainer.model.state_dict(), norms))
    (fused, n1), (plain, n2), (unclipped, _) = runs
    assert len(n1) == 3 and min(n1) > 1e-2  # clipping is active at every step
    assert n1 == pytest.approx(n2, rel=1e-5)
    for n in fused:
        torch.testing.assert_close(fused[n], plain[n], msg=n)
    assert any(not torch.allclose(fused[n], unclipped[n]) for n in fused)


def test_resume_continues_exactly(tiny_model_dir, pairs_file, tmp_path):
    kw = dict(total_steps=6, save_every=3, keep_checkpoints=5)
    full = main(dpo_args(tiny_model_dir, pairs_file, tmp_path / "full", **kw))
    ref_w = {k: v.clone() for k, v in full.model.state_dict().items()}
    ref_losses = {m["step"]: m["train/loss"] for m in read_metrics(full.output_dir) if "train/loss" in m}

    # an interrupted run: the same run's directory as it was after step 3 (step-6 checkpoint and export gone)
    part = tmp_path / "part"
    shutil.copytree(full.output_dir, part)
    shutil.rmtree(part / "checkpoints" / "step_00000006")
    shutil.rmtree(part / "final")
    resumed = main(dpo_args(tiny_model_dir, pairs_file, part, resume=True, **kw))
    assert resumed.global_step == 6
    records = [m for m in read_metrics(part) if "train/loss" in m]
    losses = {m["step"]: m["train/loss"] for m in records}
    assert [m["step"] for m in records] == sorted(ref_losses)  # records after step 3 were rolled back, not doubled
    for s in (4, 5, 6):
        assert losses[s] == pytest.approx(ref_losses[s], rel=1e-6, abs=1e-7)
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, ref_w[k])

def test_resume_without_checkpoint_starts_fresh(tiny_model_dir, pairs_file, tmp_path, capsys):
    t = main(dpo_args(tiny_model_dir, pairs_file, tmp_path, total_steps=1, resume=True))
    assert t.global_step == 1
    assert "starting fresh" in capsys.readouterr().out

def test_existing_checkpoints_without_resume_is_an_error(tiny_model_dir, pairs_file, tmp_path):
    main(dpo_args(tiny_model_dir, pairs_file, tmp_path, total_steps=1))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(UserError, match="already holds a run"):
        main(dpo_args(tiny_model_dir, pairs_file, tmp_path, total_steps=1))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before

def _bad(tmp_path, lines: list[str], name="bad.jsonl") -> str:
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return str(p)

GOOD = json.dumps({"prompt": "a b", "chosen": " c", "rejected": " d"})

@pytest.mark.parametrize("lines,match", [
    ([GOOD, "{not json"], r"bad\.jsonl:2: malformed JSON"),
    ([GOOD, json.dumps({"prompt": "x", "chosen": " y"})], r"bad\.jsonl:2: missing key 'rejected'"),
    ([json.dumps({"prompt": "x", "chosen": "", "rejected": " y"}), GOOD], r"bad\.jsonl:1: field 'chosen' is empty"),
    ([GOOD, json.dumps({"prompt": 3, "chosen": " y", "rejected": " z"})], r"bad\.jsonl:2: field 'prompt' must be"),
    ([GOOD, json.dumps({"prompt": [{"content": "hi"}], "chosen": " y", "rejected": " z"})],
     r"bad\.jsonl:2: field 'prompt' message 0 needs"),
    ([GOOD, "[1, 2]"], r"bad\.jsonl:2: expected a JSON object"),
    ([], r"bad\.jsonl: dataset is empty"),
])
def test_bad_data_names_file_and_line(tiny_model_dir, tmp_path, lines, match):
    with pytest.raises(UserError, match=match):
        DPOTrainer(dpo_args(tiny_model_dir, _bad(tmp_path, lines), tmp_path / "out"))

def test_non_utf8_line_is_named(tiny_model_dir, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid UTF-8"):
        DPOTrainer(dpo_args(tiny_model_dir, str(p), tmp_path / "out"))

@pytest.mark.parametrize("kw,match", [
    ({"model": "/nonexistent/model"}, r"--model /nonexistent/model: no such directory"),
    ({"dataset": "/nonexistent/data.jsonl"}, r"/nonexistent/data.jsonl: no such file"),
    ({"max_prompt_length": 100, "max_length": 50}, r"--max-prompt-length 100"),
    ({"lr_scheduler": "nope"}, r"--lr-scheduler nope"),
    ({"log_every": 0}, r"--log-every 0: must be >= 1"),
    ({"batch_size": 0}, r"--batch-size 0: must be >= 1"),
    ({"beta": 0.0}, r"--beta 0.0: must be > 0"),
    ({"label_smoothing": 0.6}, r"--label-smoothing 0.6: must be in \[0, 0.5\)"),
    ({"label_smoothing": 0.1, "loss_type": "hinge"}, r"--label-smoothing applies to"),
    ({"resume": True, "output_dir": None}, r"--resume needs the --output-dir"),
])
def test_bad_flags_and_paths(tiny_model_dir, pairs_file, tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path / "out", **kw))

def test_overlong_rows_are_truncated_or_dropped(tiny_model_dir, tmp_path, capsys):
    rows = [GOOD] * 8 + [json.dumps({"prompt": "p" * 200, "chosen": " c" * 100, "rejected": " r"})]
    t = DPOTrainer(dpo_args(tiny_model_dir, _bad(tmp_path, rows, "long.jsonl"), tmp_path / "out", eval_size=1,
                         max_length=40, max_prompt_length=40))
    out = capsys.readouterr().out
    assert "1 dropped" in out and len(t.train_data) + len(t.eval_data) == 8  # prompt fills max_length: row dropped
    t = DPOTrainer(dpo_args(tiny_model_dir, _bad(tmp_path, rows, "long.jsonl"), tmp_path / "out2", eval_size=1,
                         max_length=40, max_prompt_length=20))
    assert len(t.train_data) + len(t.eval_data) == 9
    assert max(len(e["prompt"]) + len(e["completions"][0]) for e in t.train_data + t.eval_data) == 40

def test_local_dataset_directory_loads_through_datasets(tiny_model_dir, pairs_file, tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    shutil.copy(pairs_file, d / "train.jsonl")
    t = DPOTrainer(dpo_args(tiny_model_dir, str(d), tmp_path / "out"))
    assert len(t.train_data) + len(t.eval_data) == 48 and t.train_data[0]["source"].startswith(str(d))

def _poison_step_3(t: DPOTrainer) -> None:
    """Make the loss NaN during the third optimizer step (NaN injection)."""
    compute = t.compute_loss

    def poisoned(model, batch):
        out = compute(model, batch)
        if t.global_step == 2:
            out.loss = out.loss * float("nan")
        return out
    t.compute_loss = poisoned

def test_nonfinite_loss_stops_before_the_update(tiny_model_dir, pairs_file, tmp_path):
    t = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path, total_steps=4, save_every=1))
    _poison_step_3(t)
    with pytest.raises(UserError, match=r"non-finite loss or gradient norm at step 3 \(rows \[.*pairs\.jsonl:\d+"):
        t.train()
    saved = checkpoint_weights(tmp_path / "checkpoints" / "step_00000002")
    for k, v in t.model.state_dict().items():  # not updated by the bad step
        torch.testing.assert_close(v, saved[k])

def test_skip_nonfinite_steps_tolerates_a_few(tiny_model_dir, pairs_file, tmp_path, capsys):
    t = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path, total_steps=4, skip_nonfinite_steps=1))
    _poison_step_3(t)
    t.train()
    assert t.global_step == 4 and t.nonfinite.skipped == 1
    assert "update skipped (1/1)" in capsys.readouterr().out
    steps = [m["step"] for m in read_metrics(tmp_path) if "train/loss" in m]
    assert steps == [1, 2, 4]  # the skipped step logs nothing (log_every 1, its window is empty)

def test_retention_ignores_and_clears_tmp_leftovers(tiny_model_dir, pairs_file, tmp_path):
    """A step_N.tmp left by a kill (even one holding COMPLETE, killed before the rename) never counts as a checkpoint
    and is cleared by the next save; --keep-checkpoints real checkpoints remain."""
    stale = tmp_path / "checkpoints" / "step_00000099.tmp"
    stale.mkdir(parents=True)
    (stale / "COMPLETE").write_text("99")
    main(dpo_args(tiny_model_dir, pairs_file, tmp_path, total_steps=3, save_every=1, keep_checkpoints=2, resume=True))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]


# --- every numeric flag is checked up front, naming the flag ----------------------------------------------------------
NAN = float("nan")
FLAG_TABLE = [
    ("dpo", {"learning_rate": -1.0}, r"--learning-rate -1.0: must be finite and > 0"),
    ("dpo", {"learning_rate": NAN}, r"--learning-rate nan: must be finite and > 0"),
    ("dpo", {"adam_betas": (1.5, 0.999)}, r"--adam-betas 1.5 0.999: must be in \[0, 1\)"),
    ("dpo", {"adam_eps": 0.0}, r"--adam-eps 0.0: must be finite and > 0"),
    ("dpo", {"weight_decay": -1.0}, r"--weight-decay -1.0: must be finite and >= 0"),
    ("dpo", {"max_grad_norm": NAN}, r"--max-grad-norm nan: must be finite"),
    ("dpo", {"max_grad_norm": -1.0}, r"--max-grad-norm -1.0: must be finite and >= 0"),
    ("dpo", {"batch_size": 0}, r"--batch-size 0: must be >= 1"),
    ("dpo", {"gradient_accumulation_steps": 0}, r"--gradient-accumulation-steps 0: must be >= 1"),
    ("dpo", {"max_length": 0}, r"--max-length 0: must be >= 1"),
    ("dpo", {"max_prompt_length": 0}, r"--max-prompt-length 0: must be in \[1, --max-length = 512\]"),
    ("dpo", {"max_prompt_length": 600}, r"--max-prompt-length 600: must be in \[1, --max-length = 512\]"),
    ("dpo", {"eval_size": -1}, r"--eval-size -1: must be >= 0"),
    ("dpo", {"total_steps": -1}, r"--total-steps -1: must be >= 0"),
    ("dpo", {"warmup_steps": -2}, r"--warmup-steps -2: must be >= 0"),
    ("dpo", {"keep_checkpoints": 0}, r"--keep-checkpoints 0: must be >= 1"),
    ("dpo", {"skip_nonfinite_steps": -1}, r"--skip-nonfinite-steps -1: must be >= 0"),
    ("dpo", {"beta": 0.0}, r"--beta 0.0: must be > 0"),
    ("dpo", {"beta": NAN}, r"--beta nan: must be > 0"),
    ("dpo", {"label_smoothing": 0.6}, r"--label-smoothing 0.6: must be in \[0, 0.5\)"),
    ("dpo", {"rpo_alpha": -0.1}, r"--rpo-alpha -0.1: must be >= 0"),
    ("dpo", {"resume": True}, r"--resume needs the --output-dir"),
    ("dpo", {"lora_r": -4}, r"--lora-r -4: must be >= 0"),
    ("dpo", {"lora_dropout": 1.0}, r"--lora-dropout 1.0: must be in \[0, 1\)"),
    ("dpo", {"lora_alpha": 0.0}, r"--lora-alpha 0.0: must be > 0"),
    ("ppo", {"lora_r": 8, "critic": "separate"}, r"--critic separate with --lora-r: not supported"),
    ("ppo", {"temperature": 0.0}, r"--temperature 0.0: must be > 0"),
    ("ppo", {"top_p": 1.5}, r"--top-p 1.5: must be in \(0, 1\]"),
    ("ppo", {"kl_coef": -0.1}, r"--kl-coef -0.1: must be >= 0"),
    ("ppo", {"cliprange": NAN}, r"--cliprange nan: must be >= 0"),
    ("ppo", {"gamma": 1.5}, r"--gamma 1.5: must be in \[0, 1\]"),
    ("ppo", {"lam": -0.5}, r"--lam -0.5: must be in \[0, 1\]"),
    ("ppo", {"ppo_epochs": 0}, r"--ppo-epochs 0: must be >= 1"),
    ("ppo", {"max_new_tokens": 0}, r"--max-new-tokens 0: must be >= 1"),
    ("ppo", {"missing_eos_penalty": NAN}, r"--missing-eos-penalty nan: must be finite"),
    ("ppo", {"max_prompt_length": 250}, r"--max-prompt-length 250: must be in \[1, --max-length - --max-new-tokens"),
    ("ppo", {"batch_size": 3, "num_minibatches": 2}, r"--batch-size 3 must be divisible"),
]


@pytest.mark.parametrize("script,kw,match", FLAG_TABLE)
def test_every_flag_is_validated_with_one_line(script, kw, match):
    Args = importlib.import_module(script).Args
    with pytest.raises(UserError, match=match):
        Args(**kw).validate()


def test_defaults_follow_the_flags_the_user_set():
    from dpo import Args
    from ppo import Args as PPOArgs
    a = Args(max_length=96)
    a.validate()  # --max-length alone always runs: the prompt limit follows it
    assert a.max_prompt_length == 48
    p = PPOArgs(max_length=64, max_new_tokens=16)
    p.validate()
    assert p.max_prompt_length == 48


def test_nothing_is_written_before_the_inputs_are_validated(tiny_model_dir, tmp_path):
    for kw in ({"dataset": str(tmp_path / "missing.jsonl")}, {"model": str(tmp_path / "no_model")}):
        with pytest.raises(UserError):
            DPOTrainer(dpo_args(tiny_model_dir, str(tmp_path / "missing.jsonl"), tmp_path / "out", **kw))
        assert not (tmp_path / "out").exists()


def test_eval_size_zero_means_no_held_out_rows(tiny_model_dir, pairs_file, tmp_path):
    t = main(dpo_args(tiny_model_dir, pairs_file, tmp_path, eval_size=0, total_steps=1))
    assert len(t.train_data) == 48 and t.eval_data == []


def test_lora_target_that_matches_nothing_is_one_line(tiny_model_dir, pairs_file, tmp_path):
    with pytest.raises(UserError, match=r"--lora-r 4 --lora-target-modules no_such_proj: peft cannot wrap"):
        DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path / "out", lora_r=4,
                            lora_target_modules=["no_such_proj"]))
    assert not (tmp_path / "out").exists()


def test_mean_metrics_aggregate_exactly_over_micro_batches():
    """A plain metric is a per-sample mean weighted by the batch's samples; a Mean(total, count) is summed, then
    divided: a micro-batch without a row of a class (count 0) does not pull that class's mean toward 0."""
    w = MetricWindow()
    w.add({"acc": 1.0, "rewards/chosen": Mean(3.0, 1)}, weight=2)
    w.add({"acc": 0.0, "rewards/chosen": Mean(0.0, 0)}, weight=2)
    w.add({"acc": 0.5, "rewards/chosen": Mean(torch.tensor(5.0), torch.tensor(3))}, weight=4)
    out = w.reduce("cpu", rates=False)
    assert out["acc"] == pytest.approx((2 * 1.0 + 2 * 0.0 + 4 * 0.5) / 8)
    assert out["rewards/chosen"] == pytest.approx(8 / 4)
    w = MetricWindow()
    w.add({"rewards/chosen": Mean(0.0, 0)}, weight=1)
    assert "rewards/chosen" not in w.reduce("cpu", rates=False)  # no row of the class in the window: not logged


def test_a_step_whose_plain_metrics_would_weigh_nothing_is_an_error():
    with pytest.raises(ValueError, match="num_samples is 0"):
        StepOutput({"reward": 0.5}, 0)
    StepOutput({"reward": Mean(1.0, 2)}, 0)  # exact means carry their own weight
    merged = StepOutput.of([StepOutput({"loss": Mean(1.0, 2), "grad_norm": Mean(3.0, 1)}, 2, 10),
                            StepOutput({"loss": Mean(2.0, 2), "grad_norm": Mean(5.0, 1)}, 2, 10)],
                           {"reward": 0.25}, num_samples=8, num_tokens=40)
    assert merged.metrics["loss"] == Mean(3.0, 4) and merged.metrics["grad_norm"] == Mean(8.0, 2)
    assert (merged.num_samples, merged.num_tokens, merged.metrics["reward"]) == (8, 40, 0.25)


class _DroppingDPO(DPOTrainer):
    """The recipe for dropping samples: a dropped pair stays in its micro-batch with weight 0 and the loss is
    Mean(sum over the kept, number kept)."""
    keep_rows: set = set()

    def compute_loss(self, model, batch):
        from dpo import dpo_loss
        logps = sequence_logps(model, batch)
        with torch.no_grad(), self.reference() as ref:
            ref_logps = sequence_logps(ref, batch)
        losses, _, _ = dpo_loss(*logps.chunk(2), *ref_logps.chunk(2), self.args.beta)
        keep = torch.tensor([float(s in self.keep_rows) for s in batch.sources])
        return LossOutput(Mean((losses * keep).sum(), keep.sum()), {"loss": Mean((losses * keep).sum(), keep.sum())})


def test_dropped_samples_weigh_nothing_and_an_update_that_kept_none_is_no_update(tiny_model_dir, pairs_file, tmp_path):
    """Two micro-batches of 4 pairs, 3 of them dropped (unevenly: 2 and 1): the update's gradient is the one-process
    mean over the 5 kept pairs alone (a micro-batch of just them, plain mean); a plain mean that left the dropped pairs
    in would differ. An update in which every pair was dropped changes no weight and logs no loss."""
    t = _DroppingDPO(dpo_args(tiny_model_dir, pairs_file, tmp_path / "a", max_grad_norm=0.0))
    rows = t.train_data[:8]
    kept = [r for i, r in enumerate(rows) if i not in (1, 2, 5)]
    t.keep_rows = {r["source"] for r in kept}
    dropping = update_grads(t, [t.make_batch(rows[:4]), t.make_batch(rows[4:])])
    plain = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path / "b", max_grad_norm=0.0))
    alone = update_grads(plain, [plain.make_batch(kept)])
    for n in alone:
        torch.testing.assert_close(dropping[n], alone[n], rtol=1e-4, atol=1e-7, msg=n)
    diluted = update_grads(plain, [plain.make_batch(rows[:4]), plain.make_batch(rows[4:])])
    assert any(not torch.allclose(diluted[n], alone[n], rtol=1e-3) for n in alone)
    t.keep_rows = set()
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    out = t.update([t.make_batch(rows[:4]), t.make_batch(rows[4:])])
    assert out.metrics == {} and all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())
