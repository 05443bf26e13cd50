"""The newer methods against TRL's trainer for the same method, in one run: KTO (kto.py vs KTOTrainer), ORPO and SimPO
(dpo.py --loss-type orpo / simpo vs ORPOTrainer / CPOTrainer loss_type="simpo"), GKD (distill.py vs GKDTrainer,
off-policy lmbda 0 and on-policy lmbda 1) and GSPO (grpo.py --importance-sampling-level sequence vs GRPOTrainer
importance_sampling_level="sequence"). Same model, rows, batch, lengths and precision on both sides.

    python benchmarks/bench_family.py --trl-python /tmp/trl-venv/bin/python      # ~25 min on the 2-core CPU
    python benchmarks/bench_family.py --warmup-steps 1 --timed-steps 1 --configs kto   # one method, a quick check

Every configuration runs in its own fresh process (ours with this interpreter, TRL with --trl-python, where TRL is
installed; see benchmarks/requirements-trl.txt), one after the other. Each process trains warm-up + timed optimizer
steps (GSPO: iterations) on the same rows in the same order and reports the seconds of every step, the non-pad tokens
of every step and its peak RSS; the parent writes the table to benchmarks/results_family.md.

This file also runs as the worker (`--worker ours|trl --spec FILE`): it imports nothing at module level beyond the
standard library and harness.py, so the TRL venv needs neither tyro nor this repo's requirements. GSPO's workers are
harness.worker_ours_grpo and harness.worker_trl_grpo (bench_grpo.py's), with sequence-level importance sampling.
"""
from __future__ import annotations

import os
import statistics
import time

import harness
from harness import gb, memory_report, repo_on_path

TARGET = 1 / 3  # step time ours / TRL's, same method, model, rows and settings

# per method: ours' flags (the script's Args fields) and TRL's config kwargs that make the two the same algorithm
METHODS = {
    "kto": dict(label="KTO", ours={"beta": 0.1}, trl={"beta": 0.1, "loss_type": "kto"}),
    "orpo": dict(label="ORPO", ours={"loss_type": "orpo", "beta": 0.1}, trl={"beta": 0.1}),
    # SimPO in TRL is CPOTrainer's loss_type="simpo"; cpo_alpha=0 drops CPO's NLL term (plain SimPO, as ours)
    "simpo": dict(label="SimPO", ours={"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5},
                  trl={"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0}),
    # GKD: every step off-policy (lmbda 0: the data's completions) or on-policy (lmbda 1: the student samples), so
    # both sides do the same work per step (TRL draws on-policy per batch, ours per row: at 0 and 1 they agree)
    "gkd-off": dict(label="GKD lmbda 0 (off-policy)", ours={"lmbda": 0.0, "beta": 0.5, "temperature": 0.9},
                    trl={"lmbda": 0.0, "beta": 0.5, "temperature": 0.9}),
    "gkd-on": dict(label="GKD lmbda 1 (on-policy)", ours={"lmbda": 1.0, "beta": 0.5, "temperature": 0.9},
                   trl={"lmbda": 1.0, "beta": 0.5, "temperature": 0.9}),
    # GSPO: sequence-level ratios need an old policy, so 2 updates per generation; the GSPO paper's clip range
    "gspo": dict(label="GSPO (GRPO, sequence-level IS)",
                 ours={"importance_sampling_level": "sequence", "epsilon_low": 3e-4, "epsilon_high": 4e-4},
                 trl={"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4,
                      "loss_type": "dapo", "beta": 0.0}),
}
CONFIGS = {}
for _m, _d in METHODS.items():
    CONFIGS[f"{_m}-ours"] = dict(side="ours", method=_m, label=f"{_d['label']}: ours", trl_kwargs={})
    CONFIGS[f"{_m}-trl"] = dict(side="trl", method=_m, label=f"{_d['label']}: TRL defaults (gradient checkpointing)",
                                trl_kwargs={})
    CONFIGS[f"{_m}-trl-nogc"] = dict(side="trl", method=_m, label=f"{_d['label']}: TRL gradient_checkpointing=False",
                                     trl_kwargs={"gradient_checkpointing": False})
GROUPS = {m: [f"{m}-ours", f"{m}-trl", f"{m}-trl-nogc"] for m in METHODS}
# GKD at TRL's defaults is left out of the default run for time: with gradient checkpointing on, GKDTrainer also
# generates without a KV cache (`use_cache=False`); `--configs gkd-on` runs it
DEFAULT_ORDER = [c for m in METHODS for c in GROUPS[m] if not (m.startswith("gkd") and c == f"{m}-trl")]


# ----------------------------------------------------------------------------------------------------------------------
# Workers


def worker_ours(spec: dict) -> dict:
    if spec["method"] == "gspo":
        return harness.worker_ours_grpo(spec)
    repo_on_path()
    import torch

    method, n_steps = spec["method"], spec["warmup_steps"] + spec["timed_steps"]
    common = dict(model=spec["model"], dataset=spec["rows"], eval_dataset=spec["eval_rows"],
                  output_dir=spec["output_dir"], total_steps=n_steps, batch_size=spec["batch_size"],
                  max_length=spec["max_length"], max_prompt_length=spec["max_length"], precision="bf16",
                  learning_rate=1e-6, warmup_steps=0, seed=1, log_every=10 ** 9, eval_every=0)
    flags = METHODS[method]["ours"]
    if method == "kto":
        import kto
        cls, args = kto.KTOTrainer, kto.Args(**common | flags)
    elif method in ("orpo", "simpo"):
        import dpo
        cls, args = dpo.DPOTrainer, dpo.Args(**common | flags)
    else:  # GKD: the teacher is the same model directory, frozen
        import distill
        # the prompt may take max_length - max_new_tokens (ours' limit); the rows are chosen so that none is cut
        cls, args = distill.DistillTrainer, distill.Args(**common | flags | {
            "teacher": spec["model"], "max_new_tokens": spec["max_new_tokens"],
            "max_prompt_length": spec["max_length"] - spec["max_new_tokens"]})
    trainer, setup_s = harness.build_ours(cls, args, spec["num_rows"])
    trainer.sampler = harness.SequentialSampler(len(trainer.train_data), spec["batch_size"])
    computed, loss_tokens = [], []  # tokens through the student (packed: shared prompts once); GKD's loss tokens

    def record(b):
        computed.append(int(b["input_ids"].numel() if "attention_mask" not in b.tensors
                            else b["attention_mask"].sum()))
        loss_tokens.append(b.num_loss_tokens)
    harness.on_batch(trainer, record)
    non_pad = []  # GKD: ours' num_tokens is the packed row (a shared chat-template prefix once); count them all
    make_batch = trainer.make_batch

    def counting(examples):
        non_pad.append(sum(len(e["prompt"]) + len(e["completion"]) for e in examples))
        return make_batch(examples)
    gen_s = []  # GKD: seconds of each step's sampling (on-policy rows only)
    sample = getattr(trainer, "sample_completions", None)

    def timed_sample(rows):
        t = time.perf_counter()
        sample(rows)
        harness.sync(torch)
        gen_s.append(time.perf_counter() - t)
    if method.startswith("gkd"):
        trainer.make_batch, trainer.sample_completions = counting, timed_sample
    times, outs, reset_ok = harness.timed_steps(trainer, n_steps, torch)
    return memory_report(torch, reset_ok) | {
        "step_s": times, "tokens": non_pad or [o.num_tokens for o in outs], "computed_tokens": computed,
        "gen_s": gen_s if method == "gkd-on" else None,
        "loss_tokens": loss_tokens if method.startswith("gkd") else None, "setup_s": setup_s, "notes": []}


def worker_trl(spec: dict) -> dict:
    if spec["method"] == "gspo":
        return harness.worker_trl_grpo(spec)
    torch = harness.trl_setup()
    import datasets
    from transformers import AutoTokenizer

    method, n_steps = spec["method"], spec["warmup_steps"] + spec["timed_steps"]
    rows = harness.read_jsonl(spec["rows"])
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
    else:
        from trl.experimental.gkd import GKDConfig as Config
        from trl.experimental.gkd import GKDTrainer as Trainer
        kw |= {"max_new_tokens": spec["max_new_tokens"]}
        extra = {"teacher_model": spec["model"]}
    config = Config(**harness.trl_kwargs(spec, torch, **kw))
    state = {"tokens": [], "loss_tokens": []}

    class Timed(Trainer):
        def training_step(self, model, inputs, *a, **k):
            out = super().training_step(model, inputs, *a, **k)  # GKD swaps in the sampled sequences first
            state["tokens"].append(int(sum(v.sum() for name, v in inputs.items()
                                           if name.endswith("attention_mask") and not name.startswith("prompt"))))
            if "labels" in inputs:
                state["loss_tokens"].append(int((inputs["labels"][:, 1:] != -100).sum()))
            return out

    t0 = time.perf_counter()
    trainer = Timed(model=spec["model"], args=config, train_dataset=datasets.Dataset.from_list(rows),
                    processing_class=AutoTokenizer.from_pretrained(spec["model"]),
                    callbacks=[harness.trl_step_timer(state, torch)], **extra)
    setup_s = time.perf_counter() - t0
    if len(trainer.train_dataset) != spec["num_rows"]:
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {spec['num_rows']} rows")
    state["gen_s"] = []
    if method.startswith("gkd"):  # the student's sampling inside the step (a staticmethod, called through self)
        generate = trainer.generate_on_policy_outputs

        def timed_generate(*a, **k):
            t = time.perf_counter()
            out = generate(*a, **k)
            harness.sync(torch)
            state["gen_s"].append(time.perf_counter() - t)
            return out
        trainer.generate_on_policy_outputs = timed_generate
    trainer.train()
    if len(state["times"]) != n_steps:
        raise RuntimeError(f"TRL ran {len(state['times'])} steps, expected {n_steps}")
    notes = []
    if method.startswith("gkd"):
        teacher = trainer.teacher_model
        notes.append(f"teacher weights {next(teacher.parameters()).dtype}")
    return harness.trl_report(config, torch, state["reset_ok"], notes, step_s=state["times"], tokens=state["tokens"],
                              loss_tokens=state["loss_tokens"] or None, setup_s=setup_s,
                              gen_s=state["gen_s"] if method == "gkd-on" else None,
                              learning_rate=config.learning_rate)


# ----------------------------------------------------------------------------------------------------------------------
# Parent: rows, one process per configuration, the table


def select_rows(data, model_dir: str, k: int, max_length: int, max_new_tokens: int) -> tuple[list[dict], int]:
    """The first k pairs that no side truncates: prompt + chosen and prompt + rejected fit in max_length as raw
    strings (KTO, ORPO, SimPO: harness.select_rows with pairs_fit) and prompt + chosen fits as a chat in max_length -
    max_new_tokens (GKD's rows: the HH prompt as one user turn, chosen as the assistant's; ours' prompt limit)."""
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
    """-> (ours' rows, TRL's rows, ours' eval rows): the same examples in each side's format. KTO: the pairs unpaired
    as TRL's unpair_preference_dataset does within a batch (its bs/2 chosen, then their rejected), written unpaired so
    both sides read the same order; GKD: prompt + chosen as chat SFT rows."""
    if method == "kto":
        half = bs // 2
        rows = [{"prompt": p["prompt"], "completion": p[c], "label": c == "chosen"}
                for s in range(0, len(pairs), half) for c in ("chosen", "rejected") for p in pairs[s:s + half]]
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
    toks = res["tokens"][warmup:]
    return res | harness.timed_stats(res["step_s"][warmup:]) | {"tokens_mean": sum(toks) / len(toks)}


def render(results: dict, order: list[str], meta: dict) -> str:
    L = [f"# New methods vs TRL {meta.get('trl_version', '?')}: KTO, ORPO, SimPO, GKD, GSPO; same model, rows, "
         f"batch, lengths and precision\n", harness.machine_line(meta)]
    L.append(f"- model: {meta['model']} for every side and role (GKD's teacher is the same directory, frozen); fp32 "
             f"master weights, bf16 autocast on both sides (TRL `bf16=True`)")
    L.append(f"- rows: the first {meta['num_pairs']} pairs of `{meta['data']}` that no side truncates "
             f"({meta['skipped']} skipped before them): prompt + chosen and prompt + rejected within "
             f"{meta['max_length']} tokens, and prompt + chosen as a chat within "
             f"{meta['max_length'] - meta['max_new_tokens']} (GKD: so that ours' prompt limit, max_length - "
             f"max_new_tokens, cuts nothing); in file order on both sides (ours: a sequential sampler; TRL: "
             f"`train_sampling_strategy='sequential'`)")
    L.append(f"- KTO: {meta['batch_size']} unpaired rows per step (the chosen of {meta['batch_size'] // 2} pairs, then "
             f"their rejected, as TRL's unpair_preference_dataset orders a batch), each with its KL completion (the "
             f"previous row's, both sides); reference forward in the step, beta 0.1")
    L.append(f"- ORPO / SimPO: {meta['batch_size'] // 2} pairs per step (ORPO beta = lambda 0.1; SimPO beta 2.0, "
             f"gamma 0.5, TRL `CPOTrainer(loss_type='simpo', cpo_alpha=0)`); no reference model on either side. TRL's "
             f"ORPOTrainer and CPOTrainer prepend the tokenizer's BOS (`<|im_start|>` for SmolLM2) to every sequence: "
             f"{meta['batch_size']} tokens per step more than ours")
    L.append(f"- GKD: {meta['batch_size']} SFT rows per step (HH prompt as the user turn, chosen as the assistant's, "
             f"chat template), teacher = the same model directory (so the loss starts at 0; the work is the same); "
             f"generalized JSD beta 0.5, temperature 0.9; lmbda 0 (every step on the data's completions) and lmbda 1 "
             f"(every step on student samples of at most {meta['max_new_tokens']} new tokens, ours "
             f"`--max-new-tokens`, TRL `max_new_tokens`). Off-policy, TRL tokenizes the whole chat and keeps the "
             f"newline after the last `<|im_end|>`: one token per row more than ours, in the loss too")
    L.append(f"- GSPO: bench_grpo.py's setup (built-in arithmetic prompts, 4 prompts x 8 completions = 32 episodes, at "
             f"most 8 new tokens, temperature 0.7, `tasks.reward`, loss dapo, beta 0), sequence-level importance "
             f"sampling with clip 3e-4 / 4e-4 and {meta['gspo_iterations']} optimizer steps per generation (so the "
             f"old-policy log-probs are computed on both sides); time per iteration = one generation + its updates")
    L.append(f"- lr 1e-6, no warm-up, on both sides (it does not change the work); max_length {meta['max_length']}")
    L.append(f"- steps: {meta['warmup']} warm-up + {meta['timed']} timed optimizer steps (GSPO: iterations) per "
             f"configuration, each in a fresh process; s/step = median [min-max]. Ours: `trainer.training_step()`; "
             f"TRL: between consecutive on_step_end callbacks")
    L.append("- tokens/step: non-pad tokens of every sequence the step trains on (KTO: its KL sequences too; GKD: the "
             "student's, after on-policy sampling); ours' computed = tokens through the student (a shared prompt "
             "once)")
    threads = sorted({results[k]["threads"] for k in order if "error" not in results[k]})
    L.append(f"- torch threads per worker: {threads} (`--threads` sets OMP_NUM_THREADS for every worker)")
    L += harness.rss_and_load_lines(meta)
    L.append("| configuration | s/step (median [min-max]) | tokens/step | ours computed | GKD loss tokens/step "
             "| sampling s/step (GKD on-policy) | peak RSS train GB | peak RSS process GB | load before -> after |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in order:
        r, cfg = results[name], CONFIGS[name]
        if "error" in r:
            L.append(f"| {cfg['label']} | failed: {r['error']} | | | | | | | |")
            continue
        toks = "-" if r["tokens_mean"] is None else f"{r['tokens_mean']:.0f}"
        if r.get("gen_tokens_mean") is not None:
            toks = f"{r['gen_tokens_mean']:.0f} generated"
        comp = r.get("computed_tokens")
        comp = f"{statistics.mean(comp[meta['warmup']:]):.0f}" if comp else "-"
        lt = r.get("loss_tokens")
        lt = f"{statistics.mean(lt[meta['warmup']:]):.0f}" if lt else "-"
        gen = r.get("gen_s")
        gen = f"{statistics.median(gen[meta['warmup']:]):.2f}" if gen else "-"
        L.append(f"| {cfg['label']} | {r['median_s']:.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}] | {toks} | {comp} | "
                 f"{lt} | {gen} | {gb(r['train_peak_rss'])} | {gb(r['process_peak_rss'])} | {r['load_before']} -> "
                 f"{r['load_after']} |")
    notes = [f"{k}: {x}" for k in order if "error" not in results[k] for x in results[k].get("notes", [])]
    for k in order:
        r = results[k]
        if "error" not in r and CONFIGS[k]["side"] == "trl":
            notes.append(f"{k}: gradient_checkpointing={r['gradient_checkpointing']}, optim={r['optim']}")
    L.append("\nNotes: " + ("; ".join(notes) + "." if notes else "none."))
    L.append("\nPer-step token counts (all steps, warm-up first): " + "; ".join(
        f"{k}: {results[k]['tokens'] if 'tokens' in results[k] else results[k]['gen_tokens']}"
        for k in order if "error" not in results[k]) + ".")

    L.append(f"\n## Ratios ours / TRL (target: step time <= {TARGET:.3f} of TRL's, same method and settings)\n")
    L.append("ours / TRL = ratio of the median step times; 'all timed steps' = ratio of the summed timed steps (the "
             "same rows on both sides, so it weighs each step by its tokens).\n")
    L.append("| method | TRL configuration | ours s/step | TRL s/step | ours / TRL | all timed steps ours / TRL "
             "| <= 1/3 | peak RSS train ours/TRL | tokens/step equal |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in METHODS:
        o = f"{m}-ours"
        for t in (f"{m}-trl", f"{m}-trl-nogc"):
            if not harness.finished(results, o, t):
                continue
            ro, rt = results[o], results[t]
            ratio = ro["median_s"] / rt["median_s"]
            key = "iter_s" if m == "gspo" else "step_s"
            total = sum(ro[key][meta["warmup"]:]) / sum(rt[key][meta["warmup"]:])
            if m == "gspo":
                same = "prompts " + ("identical" if ro["prompts"] == rt["prompts"] else "DIFFER")
            elif m == "gkd-on":
                same = "sampled (lengths differ)"
            else:
                same = "yes" if ro["tokens"] == rt["tokens"] else f"no ({ro['tokens']} vs {rt['tokens']})"
            L.append(f"| {METHODS[m]['label']} | {CONFIGS[t]['label'].split(': ', 1)[1]} | {ro['median_s']:.2f} | "
                     f"{rt['median_s']:.2f} | {ratio:.3f} | {total:.3f} | {'met' if ratio <= TARGET else 'NOT met'} | "
                     f"{harness.ratio(ro['train_peak_rss'], rt['train_peak_rss'])} | {same} |")
    return "\n".join(L) + "\n"


def main() -> None:
    p = harness.bench_parser(__doc__, output="results_family.md", configs=CONFIGS, default_order=DEFAULT_ORDER,
                             warmup=1, timed=3, timeout=900, data=True)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step: KTO rows, 2 x ORPO/SimPO pairs, "
                   "GKD rows")
    p.add_argument("--max-length", type=int, default=256, help="prompt + completion tokens")
    p.add_argument("--max-new-tokens", type=int, default=16, help="GKD on-policy: sampled tokens per row, at most")
    p.add_argument("--gspo-iterations", type=int, default=2, help="GSPO: optimizer steps per generation")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every worker (0: torch's default); on "
                   "a machine other jobs load, 1 spares both sides OpenMP's waits for descheduled threads")
    a = p.parse_args()
    if harness.run_as_worker(a, worker_ours, worker_trl):
        return
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # the workers inherit it (harness.run_worker)
    if a.batch_size % 2 or a.batch_size < 2:
        raise SystemExit(f"--batch-size {a.batch_size}: must be even (ORPO/SimPO pairs, KTO's chosen + rejected)")
    order = harness.parse_runs(a, CONFIGS, GROUPS)
    model_dir = harness.default_model(a.model)
    work = harness.workdir(a.workdir, "bench_family_")
    n_steps = a.warmup_steps + a.timed_steps
    pairs, skipped = select_rows(harness.data_path(a.data), model_dir, a.batch_size * n_steps, a.max_length,
                                  a.max_new_tokens)
    meta = harness.machine_meta() | {
        "model": model_dir, "data": a.data, "num_pairs": len(pairs), "skipped": skipped, "batch_size": a.batch_size,
        "max_length": a.max_length, "max_new_tokens": a.max_new_tokens, "gspo_iterations": a.gspo_iterations,
        "warmup": a.warmup_steps, "timed": a.timed_steps}
    print(f"work dir {work}; {len(pairs)} pairs ({skipped} skipped); load {meta['load_start']}", flush=True)
    base = {"model": model_dir, "max_length": a.max_length, "max_new_tokens": a.max_new_tokens,
            "warmup_steps": a.warmup_steps, "timed_steps": a.timed_steps}
    files = {}
    for m in METHODS:
        if m == "gspo":
            continue
        # ORPO/SimPO: batch/2 pairs per step; KTO: batch unpaired rows (batch/2 pairs); GKD: batch rows
        n = (a.batch_size // 2) * n_steps if m != "gkd-off" and m != "gkd-on" else a.batch_size * n_steps
        ours, trl, ev = method_rows(m, pairs[:n], a.batch_size)
        files[m] = {"rows_ours": harness.write_jsonl(work / f"{m}.ours.jsonl", ours),
                    "rows_trl": harness.write_jsonl(work / f"{m}.trl.jsonl", trl),
                    "eval_rows": harness.write_jsonl(work / f"{m}.eval.jsonl", ev), "num_rows": len(ours),
                    "batch_size": a.batch_size // 2 if m in ("orpo", "simpo") else a.batch_size}
    # GSPO: bench_grpo.py's prompts, 4 per iteration, G = 8
    import tasks
    g, bs = 8, 32
    task_rows = [row for _, row in tasks.prompt_rows("arithmetic", False)]
    per_iter = bs // g
    gspo = {"prompts": harness.write_jsonl(work / "gspo.prompts.jsonl",
                                           [task_rows[k % len(task_rows)] for k in range(per_iter * n_steps)]),
            "num_task_prompts": len(task_rows), "batch_size": bs, "num_generations": g,
            "num_iterations": a.gspo_iterations, "max_new_tokens": 8, "temperature": 0.7,
            "ours_steps": [[(s * per_iter + j) % len(task_rows) for j in range(per_iter)] for s in range(n_steps)]}

    def spec_of(name: str, cfg: dict) -> dict:
        m = cfg["method"]
        if m == "gspo":
            trl = METHODS[m]["trl"] | cfg["trl_kwargs"] if cfg["side"] == "trl" else {}
            return base | gspo | {"method": m, "ours_kwargs": METHODS[m]["ours"], "trl_kwargs": trl}
        f = files[m]
        return base | {"method": m, "rows": f["rows_ours"] if cfg["side"] == "ours" else f["rows_trl"],
                       "eval_rows": f["eval_rows"], "num_rows": f["num_rows"], "batch_size": f["batch_size"],
                       "trl_kwargs": cfg["trl_kwargs"]}

    def describe(r: dict) -> str:
        if "iter_s" in r:
            return harness.describe_iterations(r)
        return f"steps {' '.join(f'{s:.2f}' for s in r['step_s'])} s; tokens {r['tokens']}"
    raw = harness.run_all(a, __file__, order, CONFIGS, work, meta, spec_of, describe)
    results = {name: summarize(raw[name], a.warmup_steps, bs) for name in order}
    harness.finish(a, work, meta, results, render(results, order, meta))


if __name__ == "__main__":
    main()
