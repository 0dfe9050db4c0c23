#!/usr/bin/env python3
"""Checks the `score` example against Hugging Face transformers on checkpoints not in the repo.

For each seed, make_fixtures.py builds fresh random OPT and Llama checkpoints (other shapes,
dtypes, tying, pre/post-LN) with float64 reference logprobs; this script scores their token
sequences and texts with `cargo run --release -- score --per-token` and reports the
largest per-token difference. Exit status 1 if any exceeds --tolerance.

Usage: python3 scripts/check_against_hf.py [--seeds 1 2 3] [--tolerance 1e-4]
Needs: pip install torch transformers
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent


def check_dir(model_dir, tolerance):
    exp = json.loads((model_dir / "expected.json").read_text())
    records, want = [], []
    for i, s in enumerate(exp["sequences"]):
        records.append({"id": f"seq-{i}", "tokens": s["tokens"]})
        want.append(s["token_logprobs"])
    for i, t in enumerate(exp["texts"]):
        records.append({"id": f"text-{i}", "text": t["text"]})
        want.append(t["token_logprobs"])
    inp = model_dir / "in.jsonl"
    out = model_dir / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    subprocess.run(["cargo", "run", "--quiet", "--release", "--", "score",
                    "--model", str(model_dir), "--input", str(inp), "--output", str(out),
                    "--per-token", "--backend", "reference"], check=True, cwd=HERE.parent)
    worst = 0.0
    for line, w in zip(out.read_text().splitlines(), want):
        got = json.loads(line)
        if "error" in got:
            raise SystemExit(f"{model_dir.name}: {got}")
        worst = max([worst] + [abs(a - b) for a, b in zip(got["token_logprobs"], w)])
    config = json.loads((model_dir / "config.json").read_text())
    print(f"{model_dir.name}: {len(records)} records, worst per-token diff {worst:.2e} "
          f"({config['model_type']}, hidden {config['hidden_size']}, "
          f"layers {config['num_hidden_layers']}, dtype {config.get('dtype')})")
    return worst <= tolerance


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            subprocess.run([sys.executable, str(HERE / "make_fixtures.py"), "--out", tmp,
                            "--random-shapes", "--seed", str(seed)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for d in sorted(pathlib.Path(tmp).iterdir()):
            ok &= check_dir(d, args.tolerance)
    print("all within tolerance" if ok else "SOME DIFFER")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
