"""The machinery no algorithm script needs to read: it is used through `common.py` and `rollout.py`.

    run.py         processes and ranks: torchrun, one-line errors (`UserError`, exit code 2), pre-emption signals
    models.py      model and tokenizer loading, end of turn, LoRA, frozen copies, the bundled default model
    sharding.py    DDP and FSDP2 wrapping, meta-device loading shard by shard, the memory plan, generation gathering
    data.py        reading rows (file:line in every error), the data order, tokenizing a prompt and its completions
    packing.py     the packed row: a prefix tree of sequences, attention within its segments (sdpa / FlexAttention)
    logprobs.py    the LM head on kept positions, chunked log-probs, collating (prompt, completion) sequences
    generation.py  sampling from softmax(logits / T) with one prefill per prompt, cut after the turn end
    checkpoint.py  the run directory (lock, run.json, metrics.jsonl), the checkpoint format
    export.py      the HF export (final/), streamed one tensor at a time: no process holds the whole model
    metrics.py     exact metric means across micro-batches and ranks, metrics.jsonl / wandb / the progress bar
    speed.py       tricks that change no number (each beside its plain path, tested equal)

Each module imports only the standard library, torch, transformers and the modules above it in this list.
"""
