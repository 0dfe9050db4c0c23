#!/usr/bin/env python3
"""lm-evaluation-harness with ferrogen as the model (registered as `ferrogen`).

Run it in place of the `lm-eval` command; it takes the same arguments:

    python scripts/lm_eval_ferrogen.py run --model ferrogen \
        --model_args model=model.gguf,cpu_mem=1GiB,offload_dir=/mnt/nvme/ferrogen \
        --tasks hellaswag,wikitext

Needs `pip install lm-eval==0.4.13` (the core package: no torch) and the `ferrogen` command
line (`cargo install --path .`, or `cargo build --release` for target/release/ferrogen).

How the requests are served: each call writes its requests as one JSONL file, runs one of
ferrogen's jobs on it once (`score`, or `generate` for generate_until), and reads the answers
back in input order.
  - loglikelihood(context, continuation) -> {"id", "context", "continuation"} records, answered
    with {"logprob", "is_greedy"}: lm-eval's encode-pair split, and left truncation of a
    context too long for the window.
  - loglikelihood_rolling(text) -> {"id", "context": "", "continuation": text}: the text after
    the model's BOS (else EOS) token, in lm-eval's rolling windows.
  - generate_until(context, {until, max_gen_toks, do_sample, temperature, top_p, top_k})
    -> {"id", "prompt", "stop", "max_tokens", "temperature", ...} records for the `generate`
    job, answered with its "text": the continuation cut before the first `until` string,
    without the end-of-sequence token (greedy unless do_sample), as the hf backend gives.

model_args (key=value, comma-separated):
  model         the model file or directory (required)
  max_length    tokens per window, as lm-eval's hf backend counts them: every pass predicts
                max_length tokens (ferrogen's --window is max_length + 1). Default: the model's
                context, less one.
  gpu_mem, cpu_mem, offload_dir, policy, hardware, prompt_len, batch_tokens
                passed to `score` as the flags of the same names (sizes like 512MiB, 2GiB);
                gpu_mem, cpu_mem, offload_dir, policy and prompt_len to `generate` too
                (and compress_weight, compress_cache, f16_cache below)
  device        auto | cpu | wgpu (lm-eval's own --device, a PyTorch device that defaults to
                cuda:0, is ignored)
  compress_weight, compress_cache, f16_cache, keep_offload
                true to pass the flag
  ferrogen      the `ferrogen` binary (default: target/release/ferrogen in this repo, else
                `ferrogen` on the PATH); its `score` and `generate` commands serve the requests
  score, generate
                a program to run instead of `ferrogen score` / `ferrogen generate` (the older
                per-command binaries, such as target/release/examples/score)
  max_gen_toks  new tokens when a request does not say (default 256, as lm-eval's)
  extra_args    more flags for `score`, space-separated
"""
import json
import pathlib
import shlex
import shutil
import subprocess
import tempfile

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval import utils

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_FERROGEN = REPO / "target" / "release" / "ferrogen"


def ferrogen_binary(given):
    """The `ferrogen` binary: `given`, else this repo's release build, else the one on PATH."""
    if given:
        return str(given)
    if DEFAULT_FERROGEN.is_file():
        return str(DEFAULT_FERROGEN)
    return shutil.which("ferrogen") or str(DEFAULT_FERROGEN)


# model_args passed through to `score` as `--flag value` (underscores become dashes)
VALUE_FLAGS = (
    "gpu_mem",
    "cpu_mem",
    "offload_dir",
    "policy",
    "hardware",
    "prompt_len",
    "batch_tokens",
)
SWITCH_FLAGS = ("compress_weight", "compress_cache", "f16_cache", "keep_offload")
# the ones `generate` takes too
GENERATE_FLAGS = ("gpu_mem", "cpu_mem", "offload_dir", "policy", "prompt_len")


def _is_true(value):
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@register_model("ferrogen")
class FerrogenLM(LM):
    """lm-eval's model interface served by ferrogen's `score` and `generate` jobs."""

    def __init__(
        self,
        model=None,
        max_length=None,
        device=None,
        ferrogen=None,
        score=None,
        generate=None,
        max_gen_toks=256,
        extra_args="",
        batch_size=None,
        max_batch_size=None,
        **flags,
    ):
        super().__init__()
        if not model:
            raise ValueError("ferrogen: give the model file in --model_args model=PATH")
        self.model = str(model)
        binary = ferrogen_binary(ferrogen)
        # a command line per job: `ferrogen score`, or a program given for it
        self.score = [str(score)] if score else [binary, "score"]
        self.generate = [str(generate)] if generate else [binary, "generate"]
        if not pathlib.Path(self.score[0]).is_file():
            raise FileNotFoundError(
                f"ferrogen: no binary at {self.score[0]}; build it with `cargo build --release` "
                "(or `cargo install --path .`), or pass ferrogen=PATH in --model_args"
            )
        self.max_gen_toks = int(max_gen_toks)
        self.args = ["--model", self.model]
        if device is not None:
            self.args += ["--device", str(device)]
        self.gen_args = list(self.args)
        for key in GENERATE_FLAGS:
            if flags.get(key) is not None:
                self.gen_args += ["--" + key.replace("_", "-"), str(flags[key])]
        for key in ("compress_weight", "compress_cache", "f16_cache"):
            if _is_true(flags.get(key, False)):
                self.gen_args.append("--" + key.replace("_", "-"))
        if max_length is not None:
            self.args += ["--window", str(int(max_length) + 1)]
        unknown = [k for k in flags if k not in VALUE_FLAGS + SWITCH_FLAGS]
        if unknown:
            raise ValueError(
                f"ferrogen: unknown model_args {', '.join(sorted(unknown))}; known: model, "
                "max_length, device, score, generate, max_gen_toks, extra_args, "
                f"{', '.join(VALUE_FLAGS + SWITCH_FLAGS)}"
            )
        for key in VALUE_FLAGS:
            if flags.get(key) is not None:
                self.args += ["--" + key.replace("_", "-"), str(flags[key])]
        for key in SWITCH_FLAGS:
            if _is_true(flags.get(key, False)):
                self.args.append("--" + key.replace("_", "-"))
        self.args += shlex.split(str(extra_args or ""))
        # (batch_size and max_batch_size are lm-eval's; ferrogen batches by tokens and budgets)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        extra = additional_config or {}
        args = {k: v for k, v in extra.items() if v is not None and k != "device"}
        args.update(arg_dict)
        return cls(**args)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        # lm-eval's --device names a PyTorch device (cuda:0 unless told): the device is
        # ferrogen's, from model_args
        extra = additional_config or {}
        args = {k: v for k, v in extra.items() if v is not None and k != "device"}
        args.update(utils.simple_parse_args_string(arg_string))
        return cls(**args)

    def _score(self, records):
        """Runs one `score` job over `records`; returns the answers in input order."""
        return self._run(self.score, self.args, records)

    def _run(self, command, args, records):
        """Runs one job of `command` (a program and its subcommand) over `records`; returns the
        answers in input order."""
        if not records:
            return []
        if not pathlib.Path(command[0]).is_file():
            raise FileNotFoundError(
                f"ferrogen: no binary at {command[0]}; build it with `cargo build --release`, "
                "or pass its path in --model_args"
            )
        with tempfile.TemporaryDirectory(prefix="ferrogen-lm-eval-") as tmp:
            inp = pathlib.Path(tmp) / "requests.jsonl"
            out = pathlib.Path(tmp) / "answers.jsonl"
            with open(inp, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            cmd = [*command, *args, "--input", str(inp), "--output", str(out)]
            # the job's progress goes to stderr, shown as it runs
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
            answers = []
            if out.exists():
                with open(out, encoding="utf-8") as f:
                    answers = [json.loads(line) for line in f if line.strip()]
        failed = [a for a in answers if "error" in a]
        if failed:
            first = failed[0]
            raise RuntimeError(
                f"ferrogen: {len(failed)} of {len(records)} requests failed; request "
                f"{first['id']}: {first['error']}"
            )
        if proc.returncode != 0 or len(answers) != len(records):
            raise RuntimeError(
                f"ferrogen: `{shlex.join(cmd)}` exited with status {proc.returncode} after "
                f"{len(answers)} of {len(records)} answers"
            )
        for i, a in enumerate(answers):
            if a.get("id") != i:
                raise RuntimeError(f"ferrogen: answer {i} has id {a.get('id')!r}")
        return answers

    def loglikelihood(self, requests, disable_tqdm=False):
        records = [
            {"id": i, "context": ctx, "continuation": cont}
            for i, (ctx, cont) in enumerate(r.args for r in requests)
        ]
        answers = self._score(records)
        results = [(a["logprob"], bool(a["is_greedy"])) for a in answers]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        records = [
            {"id": i, "context": "", "continuation": r.args[0]} for i, r in enumerate(requests)
        ]
        answers = self._score(records)
        results = [a["logprob"] for a in answers]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests, disable_tqdm=False):
        records = []
        for i, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            record = {
                "id": i,
                "prompt": context,
                "max_tokens": int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                "stop": [u for u in until if u],
                # greedy unless asked to sample, as the hf backend
                "temperature": float(kwargs.get("temperature", 1.0))
                if _is_true(kwargs.get("do_sample", False))
                else 0.0,
            }
            for key in ("top_p", "top_k", "seed"):
                if kwargs.get(key) is not None:
                    record[key] = kwargs[key]
            records.append(record)
        answers = self._run(self.generate, self.gen_args, records)
        results = [a["text"] for a in answers]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("generate_until", request.args, result)
        return results


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
