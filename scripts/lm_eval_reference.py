#!/usr/bin/env python3
"""The lm-eval check of ferrogen: the local tasks in tests/lm_eval/, scored by lm-eval's own
`hf` backend (transformers, float64) once, and by ferrogen through scripts/lm_eval_ferrogen.py
in every test run.

  reference [--out tests/lm_eval/hf_reference.json] [--tasks a,b]
      Runs `lm-eval run --model hf` on SmolLM2-135M-Instruct.Q4_1.gguf (transformers dequantizes
      it) and writes the condensed outputs (metrics, and every request's answers). With
      --tasks, runs only those and updates their entries in the file, keeping the others.
      Needs `pip install lm-eval==0.4.13 torch transformers gguf accelerate`.
  condense OUTPUT_DIR
      Prints the condensed form of an `lm-eval run --log_samples --output_path OUTPUT_DIR`.
  compare REFERENCE.json OUTPUT_DIR
      Checks a run against the reference: the same acc, acc_norm and exact_match, every
      loglikelihood (rolling ones, summed over thousands of tokens, included) within 1e-3 and
      the same is_greedy, the same generated text, the perplexities within 1e-4 relative.
      Exit status 1 when they differ.
"""
import argparse
import glob
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile

TASKS = ["fable_endings", "fable_cloze", "fable_perplexity", "fable_answers"]
GENERATION_TASKS = {"fable_answers"}  # generate_until: their answers are text
MAX_LENGTH = 128  # tokens per window: the long document spans several
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = pathlib.Path(__file__).resolve().parent.parent


def condense(output_dir, tasks=TASKS):
    """{task: {"metrics": {...}, "samples": [[[logprob, is_greedy?] or [text], ...] per doc]}}."""
    results = sorted(glob.glob(os.path.join(output_dir, "**", "results_*.json"), recursive=True))
    if not results:
        sys.exit(f"no results_*.json under {output_dir}")
    with open(results[-1]) as f:
        res = json.load(f)
    out = {}
    for task in tasks:
        metrics = {
            k.split(",")[0]: v
            for k, v in res["results"][task].items()
            if "," in k and "stderr" not in k
        }
        files = sorted(
            glob.glob(os.path.join(output_dir, "**", f"samples_{task}_*.jsonl"), recursive=True)
        )
        with open(files[-1]) as f:
            docs = sorted((json.loads(line) for line in f), key=lambda d: d["doc_id"])
        samples = []
        for d in docs:
            answers = []
            for r in d["resps"]:
                a = r[0]
                if task in GENERATION_TASKS:  # generate_until: the text
                    answers.append([a])
                elif isinstance(a, list):  # loglikelihood: [logprob, is_greedy]
                    answers.append([float(a[0]), a[1] in (True, "True")])
                else:  # loglikelihood_rolling: logprob
                    answers.append([float(a)])
            samples.append(answers)
        out[task] = {"metrics": metrics, "samples": samples}
    return out


def compare(ref, got):
    """The differences between two condensed runs, as sentences (none: they agree)."""
    problems = []
    worst = 0.0
    for task in TASKS:
        r, g = ref[task], got[task]
        for name in ("acc", "acc_norm", "exact_match"):
            if name in r["metrics"] and r["metrics"][name] != g["metrics"].get(name):
                problems.append(f"{task} {name}: {g['metrics'].get(name)} vs {r['metrics'][name]}")
        for name in ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
            if name in r["metrics"]:
                a, b = g["metrics"].get(name, math.nan), r["metrics"][name]
                if not abs(a - b) <= 1e-4 * abs(b):
                    problems.append(f"{task} {name}: {a} vs {b}")
        if len(r["samples"]) != len(g["samples"]):
            problems.append(f"{task}: {len(g['samples'])} docs vs {len(r['samples'])}")
            continue
        for doc, (rs, gs) in enumerate(zip(r["samples"], g["samples"])):
            for i, (ra, ga) in enumerate(zip(rs, gs)):
                if isinstance(ra[0], str):
                    if ra[0] != ga[0]:
                        problems.append(f"{task} doc {doc}: generated {ga[0]!r} vs {ra[0]!r}")
                    continue
                diff = abs(ra[0] - ga[0])
                worst = max(worst, diff)
                if diff > 1e-3:
                    problems.append(f"{task} doc {doc} request {i}: {ga[0]} vs {ra[0]}")
                if len(ra) > 1 and ra[1] != ga[1]:
                    problems.append(f"{task} doc {doc} request {i}: is_greedy {ga[1]} vs {ra[1]}")
    return problems, worst


def reference(out, tasks=TASKS):
    cache = pathlib.Path(os.environ.get("FERROGEN_CACHE", "~/.cache/ferrogen")).expanduser()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable, "-m", "lm_eval", "run", "--model", "hf",
                "--model_args",
                f"pretrained={cache},gguf_file={GGUF},dtype=float64,max_length={MAX_LENGTH}",
                "--tasks", ",".join(tasks), "--include_path", "tests/lm_eval/tasks",
                "--device", "cpu", "--batch_size", "1", "--log_samples", "--output_path", tmp,
            ],
            check=True,
            cwd=REPO,
        )
        condensed = condense(tmp, tasks)
    if tasks != TASKS and os.path.exists(out):
        with open(out) as f:
            kept = json.load(f)
        kept.update(condensed)
        condensed = kept
    condensed["about"] = (
        f"lm-eval 0.4.13, model hf, {GGUF} dequantized by transformers, float64, "
        f"max_length={MAX_LENGTH}; written by scripts/lm_eval_reference.py reference"
    )
    with open(out, "w") as f:
        json.dump(condensed, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("--out", default=str(REPO / "tests/lm_eval/hf_reference.json"))
    r.add_argument("--tasks", default=",".join(TASKS))
    c = sub.add_parser("condense")
    c.add_argument("output_dir")
    k = sub.add_parser("compare")
    k.add_argument("reference")
    k.add_argument("output_dir")
    args = ap.parse_args()
    if args.cmd == "reference":
        tasks = args.tasks.split(",")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            sys.exit(f"unknown tasks {unknown}; known: {TASKS}")
        reference(args.out, TASKS if set(tasks) == set(TASKS) else tasks)
    elif args.cmd == "condense":
        json.dump(condense(args.output_dir), sys.stdout, indent=1)
    else:
        with open(args.reference) as f:
            ref = json.load(f)
        got = condense(args.output_dir)
        problems, worst = compare(ref, got)
        for task in TASKS:
            print(task, json.dumps(got[task]["metrics"]))
        print(f"worst loglikelihood difference: {worst:.2e} (tolerance 1e-3)")
        for p in problems:
            print("DIFFERS:", p)
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
