#!/usr/bin/env python3
"""lm-evaluation-harness with ferrogen as the model (registered as `ferrogen`).

Run it in place of the `lm-eval` command; it takes the same arguments:

    python scripts/lm_eval_ferrogen.py run --model ferrogen \
        --model_args model=model.gguf,cpu_mem=1GiB,offload_dir=/mnt/nvme/ferrogen \
        --tasks hellaswag,wikitext

Needs `pip install lm-eval==0.4.13` (the core package: no torch) and the `score` example built
(`cargo build --release --example score`).

How the requests are served: each call of `loglikelihood` or `loglikelihood_rolling` writes
its requests as one JSONL file, runs ferrogen's `score` job on it once, and reads the answers
back in input order.
  - loglikelihood(context, continuation) -> {"id", "context", "continuation"} records, answered
    with {"logprob", "is_greedy"}: lm-eval's encode-pair split, and left truncation of a
    context too long for the window.
  - loglikelihood_rolling(text) -> {"id", "context": "", "continuation": text}: the text after
    the model's BOS (else EOS) token, in lm-eval's rolling windows.
  - generate_until is not served yet (the `generate` example's JSONL job is not wired to it):
    it is refused.

model_args (key=value, comma-separated):
  model         the model file or directory (required)
  max_length    tokens per window, as lm-eval's hf backend counts them: every pass predicts
                max_length tokens (ferrogen's --window is max_length + 1). Default: the model's
                context, less one.
  gpu_mem, cpu_mem, offload_dir, policy, hardware, prompt_len, batch_tokens
                passed to `score` as the flags of the same names (sizes like 512MiB, 2GiB)
  device        auto | cpu | wgpu (lm-eval's own --device, a PyTorch device that defaults to
                cuda:0, is ignored)
  compress_weight, compress_cache, keep_offload
                true to pass the flag
  score         the `score` binary (default: target/release/examples/score in this repo)
  extra_args    more flags for `score`, space-separated
"""
import json
import pathlib
import shlex
import subprocess
import tempfile

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval import utils

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_SCORE = REPO / "target" / "release" / "examples" / "score"
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
SWITCH_FLAGS = ("compress_weight", "compress_cache", "keep_offload")


def _is_true(value):
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@register_model("ferrogen")
class FerrogenLM(LM):
    """lm-eval's model interface served by ferrogen's `score` job."""

    def __init__(
        self,
        model=None,
        max_length=None,
        device=None,
        score=None,
        extra_args="",
        batch_size=None,
        max_batch_size=None,
        **flags,
    ):
        super().__init__()
        if not model:
            raise ValueError("ferrogen: give the model file in --model_args model=PATH")
        self.model = str(model)
        self.score = pathlib.Path(score) if score else DEFAULT_SCORE
        if not self.score.is_file():
            raise FileNotFoundError(
                f"ferrogen: no score binary at {self.score}; build it with "
                "`cargo build --release --example score`, or pass score=PATH in --model_args"
            )
        self.args = ["--model", self.model]
        if max_length is not None:
            self.args += ["--window", str(int(max_length) + 1)]
        if device is not None:
            self.args += ["--device", str(device)]
        unknown = [k for k in flags if k not in VALUE_FLAGS + SWITCH_FLAGS]
        if unknown:
            raise ValueError(
                f"ferrogen: unknown model_args {', '.join(sorted(unknown))}; known: model, "
                f"max_length, device, score, extra_args, {', '.join(VALUE_FLAGS + SWITCH_FLAGS)}"
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
        if not records:
            return []
        with tempfile.TemporaryDirectory(prefix="ferrogen-lm-eval-") as tmp:
            inp = pathlib.Path(tmp) / "requests.jsonl"
            out = pathlib.Path(tmp) / "answers.jsonl"
            with open(inp, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            cmd = [str(self.score), *self.args, "--input", str(inp), "--output", str(out)]
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
        raise NotImplementedError(
            "ferrogen does not serve generate_until yet: this adapter does not run the generation "
            "job for it. Run loglikelihood and perplexity tasks (multiple choice, cloze, rolling "
            "perplexity) with ferrogen, and generation tasks with another model."
        )


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
