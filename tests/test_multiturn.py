"""Multi-turn episodes with an environment: exact token in / token out (the log-probs the update computes are those
the tokens were sampled with; the loss covers exactly the sampled ids), the calculator against any text, one-line
environment errors, GAE over the policy's own tokens, and GRPO / PPO runs on the built-in tool task."""
import math
import random
import time

import pytest
import torch

import rollout
import tasks
from common import UserError
from conftest import read_metrics
from families import FAMILIES, build_tokenizer, chatty_model, save_family
from rollout import Env, completion_logps, continuation_ids, rollout_batch, sample_episodes


class Echo:
    """Answers every reply with one message until the policy has replied `turns` times; a fixed reward."""

    def __init__(self, row, role="tool", turns=3):
        self.role, self.left, self.tool_calls, self.tool_errors = role, turns, 0, 0

    def reset(self):
        return [{"role": "user", "content": "count with me"}]

    def step(self, reply):
        self.left -= 1
        self.tool_calls += 1
        return [{"role": self.role, "content": f"ok {len(reply)}"}] if self.left else None

    def reward(self):
        return 1.0


def _trainer(name, tmp_path, role, **kw):
    """A grpo.py trainer (fp32) on a family's layout, its tiny model favouring `a`, `b` and its turn end."""
    from grpo import Args, GRPOTrainer
    tok = build_tokenizer(name)
    end = FAMILIES[name].stops[0]
    path = save_family(name, tmp_path / "model", chatty_model(tok, {"a": 6.0, "b": 6.0, end: 6.5}))
    with open(tmp_path / "rows.jsonl", "w") as f:
        f.write("".join(f'{{"prompt": "p{i}", "k": {i}}}\n' for i in range(8)))
    tr = GRPOTrainer(Args(model=path, dataset=str(tmp_path / "rows.jsonl"), output_dir=str(tmp_path / "run"),
                          reward_fn=["families:record"], precision="fp32", batch_size=2, num_generations=4,
                          max_new_tokens=6, max_length=200, temperature=1.0, eval_size=2, seed=3, **kw))
    tr.env = Env("test:Echo", lambda row: Echo(row, role), max_turns=3)
    return tr, tok


@pytest.mark.parametrize("name,role", [("qwen3", "tool"), ("gemma", "user"), ("llama-3.1", "ipython")])
def test_episodes_are_exact_token_in_token_out(name, tmp_path, monkeypatch, role):
    """Qwen3's template rewrites earlier turns (drops their reasoning); Gemma's and Llama-3.1's turn end is not their
    tokenizer's EOS. Over every sampled token of every turn, the packed update's log-prob equals the one the token
    was sampled with (fp32, <= 1e-5); the tokens between turns are exactly the template's glue around the
    environment's message; the labels of the update are exactly the sampled ids, in order."""
    tr, tok = _trainer(name, tmp_path, role)
    replies = []
    generate = rollout.generate

    def recording(*args, **kw):  # every reply the policy sampled, as ids
        out = generate(*args, **kw)
        replies.extend(r[:int(n)].tolist() for r, n in zip(out[0], out[1].sum(1)))
        return out
    monkeypatch.setattr(rollout, "generate", recording)
    torch.manual_seed(0)
    ro = sample_episodes(tr, tr.next_examples(), tr.env, num_samples=4)
    assert (ro.stats["turns"] >= 2).sum() >= 4 and ro.has_eos.any()  # multi-turn, and some episodes ended by itself
    for padding_free in (True, False):
        tr.args.padding_free = padding_free
        gap = ((completion_logps(tr, tr.model, ro) - ro.stats["sampling_logps"]) * ro.mask).abs().max().item()
        assert gap <= 1e-5, (padding_free, gap)
    # each completion is reply, glue, reply, ...: the sampled ids untouched, the glue the template's own
    glue = lambda content: continuation_ids(tok, [{"role": role, "content": content}], tr.end_of_turn, "x")  # noqa
    assert glue("ok 1")[0] != tr.end_of_turn[0]  # the turn end that closes a reply is the one the policy sampled
    for i in range(len(ro)):
        ids, mask = ro.completions[i, :ro.lengths[i]].tolist(), ro.mask[i, :ro.lengths[i]].tolist()
        runs, k = [], 0
        while k < len(ids):  # maximal runs of equal mask
            j = next((j for j in range(k, len(ids)) if mask[j] != mask[k]), len(ids))
            runs.append((mask[k], ids[k:j]))
            k = j
        assert [m for m, _ in runs] == [1.0, 0.0] * (len(runs) // 2) + [1.0] * (len(runs) % 2)
        assert len([r for m, r in runs if m]) == ro.stats["turns"][i]
        for (_, reply), (_, between) in zip(runs[::2], runs[1::2]):
            assert reply in replies  # what the policy sampled, as it sampled it
            assert between == glue(f"ok {len(tok.decode(reply, skip_special_tokens=True))}")
    batch = rollout_batch(tr, ro, range(len(ro)))
    expected = [t for i in range(len(ro)) for t, m in zip(ro.completions[i].tolist(), ro.mask[i].tolist()) if m]
    assert batch["labels"].tolist() == expected  # the loss covers exactly the sampled ids
    assert int(batch["keep"].sum()) == len(expected) if tr.args.padding_free else True


def test_grpo_loss_counts_sampled_tokens_only(tmp_path):
    """One GRPO update on episodes: the loss and its token metrics are means over the sampled tokens alone (the
    environment's tokens carry no loss weight: moving their log-probs changes nothing)."""
    tr, _ = _trainer("qwen3", tmp_path, "tool", loss_type="dapo")
    torch.manual_seed(0)
    ro = sample_episodes(tr, tr.next_examples(), tr.env, num_samples=4)
    per_seq = {"advantages": torch.linspace(-1, 1, len(ro)), "loss_mask": ro.mask}
    batch = rollout_batch(tr, ro, range(len(ro)), per_seq)
    out = tr.compute_loss(tr.model, batch)
    assert out.loss.count == ro.mask.sum() < ro.lengths.sum()  # the env tokens are in the completions, not the count
    assert out.metrics["entropy"].count == ro.mask.sum()


def test_gae_runs_over_the_policys_own_tokens():
    """PPO on an episode: GAE over the sampled tokens with the environment's tokens taken out equals GAE on the
    sampled tokens laid end to end; the environment's positions get no advantage."""
    from ppo import back_in_place, gae, on_sampled
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.float)
    rewards, values = torch.randn(2, 8) * mask, torch.randn(2, 8) * mask
    m = on_sampled(mask, mask)
    adv, ret = gae(on_sampled(rewards, mask), on_sampled(values, mask), m, 0.9, 0.8)
    adv, ret = back_in_place(adv, mask), back_in_place(ret, mask)
    for row in range(2):  # the sampled tokens alone, end to end
        keep = mask[row].bool()
        a, r = gae(rewards[row][keep][None], values[row][keep][None], torch.ones(1, int(keep.sum())), 0.9, 0.8)
        torch.testing.assert_close(adv[row][keep], a[0])
        torch.testing.assert_close(ret[row][keep], r[0])
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    # on the padded layout itself GAE would bootstrap across the gap from the environment's zeros: it differs
    assert not torch.allclose(gae(rewards, values, mask, 0.9, 0.8)[0], adv)


def test_calculator_answers_any_text_without_raising():
    assert tasks.calculate("23*47") == "1081" and tasks.calculate("(2+3)*4-1") == "19"
    assert tasks.calculate("2^3^2") == "512" and tasks.calculate("7/2") == "3.5" and tasks.calculate("-3--3") == "0"
    for bad, why in (("1/0", "division by zero"), ("9**99", "exponent"), ("10**10*10**10", "too large"),
                     ("(" * 30 + "1", "nested"), ("1" * 20, "number too long"), ("2+", "incomplete"),
                     ("__import__('os')", "unexpected"), ("x" * 200, "longer than"), ("", "empty")):
        assert tasks.calculate(bad).startswith("error:") and why in tasks.calculate(bad), bad
    rng, alphabet = random.Random(0), "0123456789+-*/%^().  eE_xa'\"\\[]{}**//"
    start = time.perf_counter()
    for _ in range(3000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 120)))
        out = tasks.calculate(text)
        assert isinstance(out, str) and (out.startswith("error: ") or math.isfinite(float(out)))
        assert out.startswith("error: ") or abs(float(out)) <= tasks.MAX_MAGNITUDE
    assert time.perf_counter() - start < 30  # no input makes it crawl
    assert tasks.calculator_call("let me see: calc(12*(3+4)) now") == "12*(3+4)"
    assert tasks.calculator_call("12*34 is 408") is None


class Broken(Echo):
    def __init__(self, row, how="step"):
        super().__init__(row)
        self.how = how

    def reset(self):
        if self.how == "reset":
            raise ValueError("no question")
        if self.how == "type":
            return "a string, not messages"
        return super().reset()

    def step(self, reply):
        if self.how == "hang":
            time.sleep(5)
        if self.how == "step":
            return {}["missing"]
        return super().step(reply)

    def reward(self):
        return float("nan") if self.how == "reward" else 1.0


@pytest.mark.parametrize("how,match", [
    ("reset", r"--env test:Broken: reset\(\) raised ValueError: no question"),
    ("type", r"--env test:Broken: reset\(\) returned 'a string, not messages', expected a non-empty list"),
    ("step", r"--env test:Broken: step\(reply\) raised KeyError"),
    ("hang", r"--env test:Broken: step\(reply\) raised TimeoutError: took longer than 0.5 s \(--env-timeout\)"),
    ("reward", r"--env test:Broken: reward\(\) returned nan, expected a finite number or None"),
])
def test_environment_code_that_fails_is_one_line(tmp_path, how, match):
    tr, _ = _trainer("qwen3", tmp_path, "tool")
    tr.env = Env("test:Broken", lambda row: Broken(row, how), max_turns=3, timeout=0.5)
    with pytest.raises(UserError, match=match):
        sample_episodes(tr, tr.next_examples(), tr.env, num_samples=2)


def test_grpo_and_ppo_train_on_the_tool_task(tiny_model_dir, tmp_path):
    """--dataset multiply runs its calculator episodes by default; the multi-turn metrics are logged."""
    import grpo
    import ppo
    common = dict(model=tiny_model_dir, dataset="multiply", precision="fp32", total_steps=2, learning_rate=1e-3,
                  log_every=1, eval_every=0, save_every=0, max_length=160, max_new_tokens=12, temperature=1.0)
    g = grpo.main(grpo.Args(output_dir=str(tmp_path / "g"), batch_size=2, num_generations=4, **common))
    p = ppo.main(ppo.Args(output_dir=str(tmp_path / "p"), batch_size=4, **common))
    for t in (g, p):
        assert t.env.name == "tasks:CalculatorEnv"
        train = [m for m in read_metrics(t.output_dir) if "train/turns/mean" in m]
        assert len(train) == 2
        for key in ("turns/mean", "tool_calls/mean", "episodes/truncated_ratio", "env/called", "env/called_right"):
            assert all(math.isfinite(m[f"train/{key}"]) for m in train), key
        evals = [m for m in read_metrics(t.output_dir) if "eval/greedy_accuracy" in m]
        assert len(evals) == 2 and all("eval/turns/mean" in m for m in evals)
