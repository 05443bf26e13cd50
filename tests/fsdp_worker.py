"""One torchrun launch that checks several things under --strategy fsdp (for tests/test_safeguards.py):

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR CASES.json

CASES.json is a list of {"name", "script", "trainer", "kind", "args"}, run in order on every rank:
- "error": building the trainer must raise a UserError (any other exception escapes: a traceback, the test fails);
  its message is recorded, so the test can check that every rank agreed on the same one line.
- "plan": the memory plan the trainer printed (distill.py with a big --teacher).
- "meta": whether each model the script loads was loaded on the meta device (`patch` names the module whose
  load_model is watched), and rank 0 saves the whole trained model (OUT_DIR/<name>.pt) to compare with one process.
The last "error" case then runs once more through run_main, as a script does: one line, exit code 2.
Each rank writes OUT_DIR/rank<r>.json.
"""
import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from common import UserError, run_main  # noqa: E402


def build(case: dict):
    module = importlib.import_module(case["script"])
    return getattr(module, case["trainer"])(module.Args(**case["args"]))


def check(case: dict, out: Path, record: dict) -> None:
    if case["kind"] == "error":
        try:
            build(case)
        except UserError as e:
            record[case["name"]] = str(e)
            return
        record[case["name"]] = "no error"
        return
    if case["kind"] == "plan":
        record[case["name"]] = build(case).memory_plan
        return
    watched = importlib.import_module(case["patch"])
    load, calls = watched.load_model, []

    def watch(*a, **kw):
        calls.append([kw.get("flag", "--model"), bool(kw.get("meta"))])
        return load(*a, **kw)
    watched.load_model = watch
    try:
        trainer = build(case)
    finally:
        watched.load_model = load
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()  # a collective: every rank
            for n, p in trainer.model.named_parameters()}
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save(full, out / f"{case['name']}.pt")
    trainer.release_output_dir()
    record[case["name"]] = calls


def main() -> None:
    out, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    record = {}
    for case in cases:
        check(case, out, record)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record, indent=1))
    build([c for c in cases if c["kind"] == "error"][-1])  # as a script: run_main makes it one line, exit 2


if __name__ == "__main__":
    run_main(main)
