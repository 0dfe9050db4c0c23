//! lm-evaluation-harness with ferrogen as its model, end to end: `lm-eval run --model
//! ferrogen` (scripts/lm_eval_ferrogen.py, lm-eval 0.4.13 from the venv scripts/setup.sh
//! makes) on SmolLM2 over four local tasks (tests/lm_eval/tasks: multiple choice, a cloze
//! task whose acc is `is_greedy`, rolling perplexity of documents up to 12 windows long, and
//! short answers generated until a newline or full stop), against lm-eval's own `hf` backend
//! on the same tasks (tests/lm_eval/hf_reference.json, made once by
//! `scripts/lm_eval_reference.py reference`): the same acc, acc_norm and exact_match, every
//! loglikelihood within 1e-3 and the same `is_greedy`, the same generated text, the same
//! perplexities.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{cache_dir, example_binary, present_or_skipped, smollm2_path};

/// The venv's python with lm-eval: `$FERROGEN_LM_EVAL_PYTHON`, else the one setup.sh makes in
/// the cache. `None` (said as a skip) when missing and `FERROGEN_OFFLINE=1`; else a missing
/// venv fails the test with how to make it.
fn lm_eval_python() -> Option<PathBuf> {
    let python = match std::env::var_os("FERROGEN_LM_EVAL_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => cache_dir().join("lm-eval-venv/bin/python"),
    };
    present_or_skipped(
        python,
        "`bash scripts/setup.sh` (it makes a venv with lm-eval==0.4.13)",
    )
}

/// Runs `python args...` in the repository, offline, with the datasets cache in `tmp`.
fn python(python: &Path, args: &[&str], tmp: &Path) -> Output {
    let out = Command::new(python)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_DATASETS_CACHE", tmp.join("datasets"))
        .env("HF_HOME", tmp.join("hf"))
        .output()
        .expect("python runs");
    eprintln!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// With a RAM budget of 48 MiB for a model of 122 MiB: most of the weights are read from disk
/// for every pass.
#[test]
fn lm_eval_with_ferrogen_on_disk_matches_its_hf_backend() {
    let (Some(py), Some(model)) = (lm_eval_python(), smollm2_path()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let model_args = format!(
        "model={},max_length=128,device=cpu,cpu_mem=48MiB,offload_dir={},ferrogen={}",
        model.display(),
        tmp.path().join("offload").display(),
        env!("CARGO_BIN_EXE_ferrogen"),
    );
    let run = python(
        &py,
        &[
            "scripts/lm_eval_ferrogen.py",
            "run",
            "--model",
            "ferrogen",
            "--model_args",
            &model_args,
            "--tasks",
            "fable_endings,fable_cloze,fable_perplexity,fable_answers",
            "--include_path",
            "tests/lm_eval/tasks",
            "--log_samples",
            "--output_path",
            results.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(run.status.success(), "lm-eval with ferrogen failed");
    let compared = python(
        &py,
        &[
            "scripts/lm_eval_reference.py",
            "compare",
            "tests/lm_eval/hf_reference.json",
            results.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let report = String::from_utf8_lossy(&compared.stdout);
    assert!(
        compared.status.success(),
        "ferrogen differs from lm-eval's hf backend:\n{report}"
    );
    assert!(
        report.contains("worst loglikelihood difference"),
        "{report}"
    );
    // the weights did not fit the budget: the policy put most of them on disk
    let log = String::from_utf8_lossy(&run.stderr);
    let disk_line = log
        .lines()
        .find(|l| l.starts_with("memory peaks:"))
        .expect("the score job reports its memory peaks");
    assert!(disk_line.contains("of 48.00 MiB"), "{disk_line}");
    assert!(!disk_line.contains("disk 0 B"), "{disk_line}");
}

/// Unknown model_args are refused by name, and lm-eval's PyTorch device is not taken for
/// ferrogen's.
#[test]
fn the_adapter_refuses_unknown_arguments() {
    let (Some(py), Some(model)) = (lm_eval_python(), smollm2_path()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let script = format!(
        r#"
import sys
sys.path.insert(0, "scripts")
from lm_eval_ferrogen import FerrogenLM
lm = FerrogenLM.create_from_arg_string("model={model},score={score}", {{"device": "cuda:0", "batch_size": 1}})
assert "--device" not in lm.args, lm.args  # lm-eval's PyTorch device is not ours
assert lm.generate_until([]) == []
try:
    FerrogenLM(model="{model}", score="{score}", gpu_memory="1GiB")
    sys.exit("an unknown argument was taken")
except ValueError as e:
    assert "gpu_memory" in str(e) and "gpu_mem" in str(e), e
    print("refused:", e)
"#,
        model = model.display(),
        score = example_binary("score").display()
    );
    let out = python(&py, &["-c", &script], tmp.path());
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("refused:")
            .count(),
        1
    );
}
