"""The newer methods against TRL's trainer for the same method: KTO (kto.py vs KTOTrainer), ORPO and SimPO (dpo.py
vs ORPOTrainer / CPOTrainer), GKD (distill.py vs GKDTrainer, lmbda 0 and 1), GSPO (grpo.py vs GRPOTrainer) and online
DPO (online_dpo.py vs OnlineDPOTrainer). Each configuration trains in a fresh process (this file with --worker; GSPO:
harness's GRPO workers). Commands, and what is held equal: benchmarks/README.md.
"""
from __future__ import annotations

import os
import statistics
import time

import harness
from harness import gb, repo_on_path

TARGET = 1 / 3  # step time ours / TRL's, same method, model, rows and settings
GKD = {"beta": 0.5, "temperature": 0.9}
# per method: ours' flags (the script's Args fields) and TRL's config kwargs that make the two the same algorithm
METHODS = {
    "kto": dict(label="KTO", ours={"beta": 0.1}, trl={"beta": 0.1, "loss_type": "kto"}),
    "orpo": dict(label="ORPO", ours={"loss_type": "orpo", "beta": 0.1}, trl={"beta": 0.1}),
    # SimPO in TRL is CPOTrainer's loss_type="simpo"; cpo_alpha=0 drops CPO's NLL term (plain SimPO, as ours)
    "simpo": dict(label="SimPO", ours={"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5},
                  trl={"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0}),
    # GKD every step off-policy (lmbda 0) or on-policy (lmbda 1): TRL draws per batch, ours per row, equal at 0 and 1
    "gkd-off": dict(label="GKD lmbda 0 (off-policy)", ours=GKD | {"lmbda": 0.0}, trl=GKD | {"lmbda": 0.0}),
    "gkd-on": dict(label="GKD lmbda 1 (on-policy)", ours=GKD | {"lmbda": 1.0}, trl=GKD | {"lmbda": 1.0}),
    # GSPO: sequence-level ratios need an old policy, so 2 updates per generation; the GSPO paper's clip range
    "gspo": dict(label="GSPO (GRPO, sequence-level IS)",
                 ours={"importance_sampling_level": "sequence", "epsilon_low": 3e-4, "epsilon_high": 4e-4},
                 trl={"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4,
                      "loss_type": "dapo", "beta": 0.0}),
    # online DPO: 2 samples of each built-in arithmetic prompt, judged by tasks.reward; a step is one iteration
    "odpo": dict(label="Online DPO", ours={"beta": 0.1, "loss_type": "sigmoid"},
                 trl={"beta": 0.1, "loss_type": "sigmoid"}),
}
CONFIGS = {f"{m}-{suffix}": dict(side=side, method=m, label=f"{d['label']}: {what}", trl_kwargs=kw)
           for m, d in METHODS.items() for suffix, side, what, kw in (
               ("ours", "ours", "ours", {}), ("trl", "trl", "TRL defaults (gradient checkpointing)", {}),
               ("trl-nogc", "trl", "TRL gradient_checkpointing=False", {"gradient_checkpointing": False}))}
GROUPS = {m: [f"{m}-ours", f"{m}-trl", f"{m}-trl-nogc"] for m in METHODS}
# GKD at TRL's defaults is left out for time (with checkpointing on it also generates with use_cache=False)
DEFAULT_ORDER = [c for m in METHODS for c in GROUPS[m] if not (m.startswith("gkd") and c == f"{m}-trl")]


def worker_ours(spec: dict) -> dict:
    if spec["method"] == "gspo":
        return harness.worker_ours_grpo(spec)
    repo_on_path()
    import torch

    import distill
    import dpo
    import kto
    import online_dpo
    method, n_steps = spec["method"], spec["warmup_steps"] + spec["timed_steps"]
    if method == "odpo":  # the sampler hands out indices into the built-in prompts, per step
        args = online_dpo.Args(
            model=spec["model"], dataset="arithmetic", output_dir=spec["output_dir"], total_steps=n_steps,
            batch_size=spec["batch_size"], max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"],
            precision="bf16", learning_rate=1e-6, warmup_steps=0, seed=1, log_every=10 ** 9, eval_every=0,
            **METHODS[method]["ours"])
        trainer, outs, report = harness.time_ours(online_dpo.OnlineDPOTrainer, args, spec["num_task_prompts"],
                                                  harness.ListSampler(spec["ours_steps"]), n_steps)
        return report | {"tokens": [o.num_tokens for o in outs], "gen_s": [o.metrics["time/generation"] for o in outs],
                         "prompts": [[trainer.train_data[j]["prompt"][-1]["content"] for j in step]
                                     for step in spec["ours_steps"]]}
    flags = dict(model=spec["model"], dataset=spec["rows"], eval_dataset=spec["eval_rows"],
                 output_dir=spec["output_dir"], total_steps=n_steps, batch_size=spec["batch_size"],
                 max_length=spec["max_length"], max_prompt_length=spec["max_length"], precision="bf16",
                 learning_rate=1e-6, warmup_steps=0, seed=1, log_every=10 ** 9, eval_every=0) | METHODS[method]["ours"]
    if method == "kto":
        cls, args = kto.KTOTrainer, kto.Args(**flags)
    elif method in ("orpo", "simpo"):
        cls, args = dpo.DPOTrainer, dpo.Args(**flags)
    else:  # GKD: the teacher is the same model directory, frozen; the rows are chosen so that no prompt is cut
        cls, args = distill.DistillTrainer, distill.Args(**flags | {
            "teacher": spec["model"], "max_new_tokens": spec["max_new_tokens"],
            "max_prompt_length": spec["max_length"] - spec["max_new_tokens"]})
    computed, loss_tokens, non_pad, gen_s = [], [], [], []  # non_pad, gen_s: GKD only

    def record(b):  # computed: tokens through the student (a shared prompt once); loss tokens (GKD)
        computed.append(harness.computed_tokens(b))
        loss_tokens.append(len(b["labels"]))

    def gkd(trainer):  # ours' num_tokens is the packed row (a shared template prefix once): count them all
        make_batch, sample = trainer.make_batch, trainer.sample_completions

        def counting(examples):
            non_pad.append(sum(len(e["prompt"]) + len(e["completion"]) for e in examples))
            return make_batch(examples)

        def timed_sample(rows):  # the step's sampling (on-policy rows only)
            t = time.perf_counter()
            sample(rows)
            harness.sync(torch)
            gen_s.append(time.perf_counter() - t)
        trainer.make_batch, trainer.sample_completions = counting, timed_sample
    _, outs, report = harness.time_ours(cls, args, spec["num_rows"], harness.sequential(
        spec["num_rows"], spec["batch_size"], n_steps), n_steps, record, gkd if method.startswith("gkd") else None)
    return report | {"tokens": non_pad or [o.num_tokens for o in outs], "computed_tokens": computed,
                     "gen_s": gen_s if method == "gkd-on" else None,
                     "loss_tokens": loss_tokens if method.startswith("gkd") else None}


def worker_trl(spec: dict) -> dict:
    if spec["method"] == "gspo":
        return harness.worker_trl_grpo(spec)
    import torch
    repo_on_path()

    method, n_steps = spec["method"], spec["warmup_steps"] + spec["timed_steps"]
    kw = dict(per_device_train_batch_size=spec["batch_size"], max_steps=n_steps, max_length=spec["max_length"],
              bf16=True, train_sampling_strategy="sequential", learning_rate=1e-6, lr_scheduler_type="linear",
              warmup_steps=0) | METHODS[method]["trl"]
    extra = {}
    if method == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    elif method == "simpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    elif method == "odpo":
        from trl.experimental.online_dpo import OnlineDPOConfig as Config
        from trl.experimental.online_dpo import OnlineDPOTrainer as Trainer

        from tasks import reward  # the function ours judges with; TRL passes chat completions

        def arithmetic(prompts, completions, answer, **_):
            return reward(prompts, [c[-1]["content"] for c in completions], answer)
        kw |= {"max_new_tokens": spec["max_new_tokens"], "temperature": spec["temperature"]}
        extra = {"reward_funcs": arithmetic}
    else:
        from trl.experimental.gkd import GKDConfig as Config
        from trl.experimental.gkd import GKDTrainer as Trainer
        kw, extra = kw | {"max_new_tokens": spec["max_new_tokens"]}, {"teacher_model": spec["model"]}
    state = {"tokens": [], "loss_tokens": [], "gen_s": [], "prompts": []}

    class Timed(Trainer):
        def _generate(self, model, prompts, *a):  # online DPO's sampling: B prompts -> 2B sequences [prompt, mask, ..]
            t = time.perf_counter()
            out = super()._generate(model, prompts, *a)
            harness.sync(torch)
            state["gen_s"].append(time.perf_counter() - t)
            state["tokens"].append(int(out[1].sum() + out[3].sum()))  # prompts and completions (EOS included)
            state["prompts"].append([p[-1]["content"] for p in prompts])
            return out

        def training_step(self, model, inputs, *a, **k):
            out = super().training_step(model, inputs, *a, **k)  # GKD swaps in the sampled sequences first
            if method == "odpo":
                return out
            state["tokens"].append(int(sum(v.sum() for name, v in inputs.items()
                                           if name.endswith("attention_mask") and not name.startswith("prompt"))))
            if "labels" in inputs:
                state["loss_tokens"].append(int((inputs["labels"][:, 1:] != -100).sum()))
            return out

    def timed_sampling(trainer):  # GKD: the student's sampling inside the step (a staticmethod, called through self)
        generate = trainer.generate_on_policy_outputs

        def timed_generate(*a, **k):
            t = time.perf_counter()
            out = generate(*a, **k)
            harness.sync(torch)
            state["gen_s"].append(time.perf_counter() - t)
            return out
        trainer.generate_on_policy_outputs = timed_generate
    config = Config(**harness.trl_kwargs(spec, **kw))
    trainer, report = harness.time_trl(Timed, spec, config, state, harness.read_jsonl(spec["rows"]),
                                       patch=timed_sampling if method.startswith("gkd") else None, **extra)
    if method.startswith("gkd"):
        report["notes"].append(f"teacher weights {next(trainer.teacher_model.parameters()).dtype}")
    return report | {"tokens": state["tokens"], "loss_tokens": state["loss_tokens"] or None,
                     "gen_s": state["gen_s"] if method in ("gkd-on", "odpo") else None, "prompts": state["prompts"],
                     "learning_rate": config.learning_rate}


# ----------------------------------------------------------------------------------------------------------------------
# Parent


def select_rows(data, model_dir: str, k: int, max_length: int, max_new_tokens: int) -> tuple[list[dict], int]:
    """The first k pairs no side truncates: harness.select_rows with pairs_fit, and prompt + chosen as a chat within
    max_length - max_new_tokens (GKD's rows; ours' prompt limit)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    fitting, skipped = harness.select_rows(data, model_dir, 3 * k, max_length, pairs_fit=True)
    rows = [r for r in fitting if len(tok.apply_chat_template(chat(r), tokenize=True, return_dict=True)["input_ids"])
            <= max_length - max_new_tokens]
    if len(rows) < k:
        raise SystemExit(f"{data}: only {len(rows)} rows fit in {max_length} tokens as pairs and as chats, need {k}")
    return rows[:k], skipped + fitting.index(rows[k - 1]) + 1 - k


def chat(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["prompt"].strip()}, {"role": "assistant", "content": row["chosen"].strip()}]


def method_rows(method: str, pairs: list[dict], bs: int) -> tuple[list[dict], list[dict], list[dict]]:
    """-> (ours' rows, TRL's rows, ours' eval rows), the same examples in each side's format. KTO: unpaired as TRL's
    unpair_preference_dataset orders a batch (its bs/2 chosen, then their rejected); GKD: chat SFT rows."""
    if method == "kto":
        rows = [{"prompt": p["prompt"], "completion": p[c], "label": c == "chosen"}
                for s in range(0, len(pairs), bs // 2) for c in ("chosen", "rejected") for p in pairs[s:s + bs // 2]]
        return rows, rows, rows[:2]
    if method.startswith("gkd"):
        ours = [{"prompt": chat(p)[:1], "completion": chat(p)[1:]} for p in pairs]
        return ours, [{"messages": chat(p)} for p in pairs], ours[:1]
    return pairs, pairs, pairs[:1]


def summarize(res: dict, warmup: int, batch_size: int) -> dict:
    if "error" in res:
        return res
    if "iter_s" in res:  # GSPO
        return harness.summarize_iterations(res, warmup, batch_size) | {"tokens_mean": None}
    return res | harness.timed_stats(res["step_s"][warmup:]) | {"tokens_mean": harness.mean(res["tokens"][warmup:])}


def render(results: dict, order: list[str], meta: dict) -> str:
    w, bs, ml, new = meta["warmup_steps"], meta["batch_size"], meta["max_length"], meta["max_new_tokens"]
    L = [f"# New methods vs TRL {meta.get('trl_version', '?')}: KTO, ORPO, SimPO, GKD, GSPO, online DPO; same model, "
         f"rows, batch, lengths and precision\n",
         f"- model {meta['model']} for every side and role, fp32 master weights, bf16 autocast, lr 1e-6; rows: the "
         f"first {meta['num_pairs']} pairs of `{meta['data']}` that no side truncates ({meta['skipped']} skipped), in "
         f"order; {bs} sequences per step (KTO rows, ORPO/SimPO {bs // 2} pairs, GKD rows), max length {ml}, GKD at "
         f"most {new} new tokens, GSPO {meta['gspo_iterations']} updates per generation; online DPO {bs} built-in "
         f"arithmetic prompts x 2 samples per step, at most 8 new tokens (what is held equal: benchmarks/README.md)",
         f"- torch threads per worker: {sorted({results[k]['threads'] for k in order if 'error' not in results[k]})} "
         f"(`--threads` sets OMP_NUM_THREADS)", *harness.header_lines(meta, "optimizer steps (GSPO: iterations)")]
    stat = lambda xs, f: f(xs[w:]) if xs else None
    fmt = lambda x, spec: "-" if x is None else f"{x:{spec}}"
    L += harness.table(
        ["configuration", "s/step (median [min-max])", "tokens/step", "ours computed", "GKD loss tokens/step",
         "sampling s/step (GKD on-policy, online DPO)", "peak RSS train GB", "peak RSS process GB",
         "load before -> after"],
        [harness.failed(r, CONFIGS[k]["label"]) if "error" in r else
         [CONFIGS[k]["label"], harness.med_range(r), f"{r['gen_tokens_mean']:.0f} generated" if "gen_tokens_mean" in r
          else fmt(r["tokens_mean"], ".0f"), fmt(stat(r.get("computed_tokens"), statistics.mean), ".0f"),
          fmt(stat(r.get("loss_tokens"), statistics.mean), ".0f"), fmt(stat(r.get("gen_s"), statistics.median), ".2f"),
          gb(r["train_peak_rss"]), gb(r["process_peak_rss"]), f"{r['load_before']} -> {r['load_after']}"]
         for k, r in ((k, results[k]) for k in order)])
    L.append(harness.notes_line(results, order, CONFIGS, lambda k, r: f"{k}: gradient_checkpointing="
                                f"{r['gradient_checkpointing']}, optim={r['optim']}"))
    L.append("\nPer-step token counts (all steps, warm-up first): " + "; ".join(
        f"{k}: {results[k].get('tokens', results[k].get('gen_tokens'))}" for k in order if "error" not in results[k])
        + ".")
    L.append(f"\n## Ratios ours / TRL (target: step time <= {TARGET:.3f} of TRL's, same method and settings)\n\n"
             "ours / TRL = ratio of the median step times; 'all timed steps' = ratio of the summed timed steps (the "
             "same rows on both sides, so it weighs each step by its tokens).\n")
    rows = []
    for m, t in ((x, f"{x}-{s}") for x in METHODS for s in ("trl", "trl-nogc")):
        if harness.finished(results, o := f"{m}-ours", t):
            ro, rt, key = results[o], results[t], "iter_s" if m == "gspo" else "step_s"
            r = ro["median_s"] / rt["median_s"]
            same = ("prompts " + ("identical" if ro["prompts"] == rt["prompts"] else "DIFFER") + (
                "; sampled" if m == "odpo" else "") if m in ("gspo", "odpo") else
                    "sampled (lengths differ)" if m == "gkd-on" else
                    "yes" if ro["tokens"] == rt["tokens"] else f"no ({ro['tokens']} vs {rt['tokens']})")
            rows.append([METHODS[m]["label"], CONFIGS[t]["label"].split(": ", 1)[1], f"{ro['median_s']:.2f}",
                         f"{rt['median_s']:.2f}", f"{r:.3f}", f"{sum(ro[key][w:]) / sum(rt[key][w:]):.3f}",
                         "met" if r <= TARGET else "NOT met",
                         harness.ratio(ro["train_peak_rss"], rt["train_peak_rss"]), same])
    L += harness.table(["method", "TRL configuration", "ours s/step", "TRL s/step", "ours / TRL",
                        "all timed steps ours / TRL", "<= 1/3", "peak RSS train ours/TRL", "tokens/step equal"], rows)
    return "\n".join(L) + "\n"


def main() -> None:
    p = harness.bench_parser(__doc__, output="results_family.md", configs=CONFIGS, default_order=DEFAULT_ORDER,
                             warmup=1, timed=3, timeout=900, data=True)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step: KTO rows, 2 x ORPO/SimPO pairs, "
                   "GKD rows; online DPO: prompts (pairs)")
    p.add_argument("--max-length", type=int, default=256, help="prompt + completion tokens")
    p.add_argument("--max-new-tokens", type=int, default=16, help="GKD on-policy: sampled tokens per row, at most")
    p.add_argument("--gspo-iterations", type=int, default=2, help="GSPO: optimizer steps per generation")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every worker (0: torch's default); on "
                   "a machine other jobs load, 1 spares both sides OpenMP's waits for descheduled threads")
    a = p.parse_args()
    if harness.run_as_worker(a, worker_ours, worker_trl):
        return
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # the workers inherit it
    if a.batch_size % 2 or a.batch_size < 2:
        raise SystemExit(f"--batch-size {a.batch_size}: must be even (ORPO/SimPO pairs, KTO's chosen + rejected)")
    order = harness.parse_runs(a, CONFIGS, GROUPS)
    model_dir, work, meta = harness.start(a, "bench_family_")
    n_steps = a.warmup_steps + a.timed_steps
    pairs, skipped = select_rows(harness.data_path(a.data), model_dir, a.batch_size * n_steps, a.max_length,
                                 a.max_new_tokens)
    meta |= {"num_pairs": len(pairs), "skipped": skipped}
    print(f"work dir {work}; {len(pairs)} pairs ({skipped} skipped); load {meta['load_start']}", flush=True)
    base = {k: meta[k] for k in ("model", "max_length", "max_new_tokens", "warmup_steps", "timed_steps")}
    files = {}
    for m in (m for m in METHODS if m not in ("gspo", "odpo")):  # ORPO/SimPO: bs/2 pairs; KTO: bs/2 unpaired; GKD: bs
        n = (a.batch_size if m.startswith("gkd") else a.batch_size // 2) * n_steps
        ours, trl, ev = method_rows(m, pairs[:n], a.batch_size)
        files[m] = {"ours": harness.write_jsonl(work / f"{m}.ours.jsonl", ours),
                    "trl": harness.write_jsonl(work / f"{m}.trl.jsonl", trl),
                    "eval_rows": harness.write_jsonl(work / f"{m}.eval.jsonl", ev), "num_rows": len(ours),
                    "batch_size": a.batch_size // 2 if m in ("orpo", "simpo") else a.batch_size}
    online = {"gspo": harness.grpo_prompts(work, n_steps, 32, 8)[0] | {"num_iterations": a.gspo_iterations},
              "odpo": harness.grpo_prompts(work, n_steps, a.batch_size, 1, name="odpo_prompts")[0]}

    def spec_of(name: str, cfg: dict) -> dict:
        m, side = cfg["method"], cfg["side"]
        if m in online:  # the arithmetic prompts, at most 8 new tokens at temperature 0.7 (as bench_grpo)
            trl = METHODS[m]["trl"] if m == "gspo" and side == "trl" else {}  # odpo: worker_trl adds them
            return base | online[m] | {"method": m, "max_new_tokens": 8, "temperature": 0.7,
                                       "rows": online[m]["prompts"], "num_rows": online[m]["num_prompts"],
                                       "ours_kwargs": METHODS[m]["ours"], "trl_kwargs": trl | cfg["trl_kwargs"]}
        f = files[m]
        return base | {"method": m, "rows": f[side], "eval_rows": f["eval_rows"], "num_rows": f["num_rows"],
                       "batch_size": f["batch_size"], "trl_kwargs": cfg["trl_kwargs"]}

    raw = harness.run_all(a, __file__, order, CONFIGS, work, meta, spec_of, lambda r: harness.describe_iterations(r)
                          if "iter_s" in r else f"steps {harness.seconds(r['step_s'])} s; tokens {r['tokens']}")
    results = {name: summarize(raw[name], a.warmup_steps, 32) for name in order}
    harness.finish(a, work, meta, results, render(results, order, meta))


if __name__ == "__main__":
    main()
