//! The examples' command lines: every example answers `--help` with its flags, a misspelled
//! flag gets a suggestion and status 2, and a job shows its progress as a bar on a terminal and
//! as plain lines otherwise, with the same answers either way.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{example_binary, expected, fixture_dir};
use serde_json::json;

/// Every example with the flags its `--help` must list (the command lines README.md and the
/// deploy scripts use).
const EXAMPLES: [(&str, &[&str]); 12] = [
    (
        "score",
        &[
            "--model",
            "--input",
            "--output",
            "--resume",
            "--shard",
            "--shards",
            "--progress-every",
            "--per-token",
            "--backend",
            "--device",
            "--batch-tokens",
            "--window",
            "--stride",
            "--gpu-mem",
            "--cpu-mem",
            "--offload-dir",
            "--keep-offload",
            "--policy",
            "--hardware",
            "--prompt-len",
            "--compress-weight",
            "--compress-cache",
            "--f16-cache",
            "--no-share-prefixes",
            "--trace",
            "--check-weights",
        ],
    ),
    (
        "generate",
        &[
            "--model",
            "--prompt",
            "--input",
            "--output",
            "--max-tokens",
            "--temperature",
            "--top-p",
            "--top-k",
            "--seed",
            "--stop",
            "--resume",
            "--shard",
            "--shards",
            "--progress-every",
            "--batch-records",
            "--prompt-len",
            "--backend",
            "--device",
            "--gpu-mem",
            "--cpu-mem",
            "--offload-dir",
            "--policy",
            "--check-weights",
        ],
    ),
    ("merge", &["--input", "--output", "<SHARD.jsonl>"]),
    (
        "policy_search",
        &[
            "--model",
            "--config",
            "--hardware",
            "--prompt-len",
            "--gen-len",
            "--compress-weight",
            "--compress-cache",
            "--json",
            "--save",
            "--evaluate",
        ],
    ),
    (
        "calibrate",
        &[
            "--offload-dir",
            "--output",
            "--base",
            "--gpu-mem",
            "--cpu-mem",
            "--disk",
            "--quick",
        ],
    ),
    (
        "windows",
        &["--model", "--text", "--window", "--count", "--skip"],
    ),
    (
        "bench_generate",
        &[
            "--model",
            "--text",
            "--prompts",
            "--prompt-len",
            "--new-tokens",
            "--device",
            "--gpu-mem",
            "--cpu-mem",
            "--offload-dir",
            "--keep-offload",
            "--policy",
        ],
    ),
    (
        "bench_offload",
        &[
            "--model",
            "--config",
            "--seed",
            "--gbs",
            "--nb",
            "--prompt-len",
            "--gen-len",
            "--compress-weight",
            "--offload-dir",
            "--hardware",
            "--runs",
            "--overlap",
            "--trace",
            "--gpu-mem",
            "--cpu-mem",
            "--no-sep-layer",
            "--device",
        ],
    ),
    (
        "bench_long",
        &[
            "--model",
            "--text",
            "--tokens",
            "--paths",
            "--gpu-mem",
            "--cpu-mem",
            "--offload-dir",
        ],
    ),
    (
        "bench_reference",
        &["--model", "--text", "--tokens", "--chunk", "--runs"],
    ),
    (
        "bench_kernels",
        &["--device", "--runs", "--sizes", "--rows"],
    ),
    (
        "bench_cpu_kernels",
        &["--runs", "--sizes", "--rows", "--threads"],
    ),
];

fn run(example: &str, args: &[&str]) -> Output {
    Command::new(example_binary(example))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn every_example_answers_help_and_suggests_for_a_misspelled_flag() {
    for (example, flags) in EXAMPLES {
        let help = run(example, &["--help"]);
        let text = String::from_utf8_lossy(&help.stdout);
        assert_eq!(help.status.code(), Some(0), "{example} --help: {text}");
        assert!(
            text.contains(&format!("Usage: {example}")),
            "{example}: {text}"
        );
        for flag in flags {
            assert!(text.contains(flag), "{example} --help lacks {flag}: {text}");
        }

        // the first flag, misspelled by one letter: status 2, the flag named, a suggestion
        let wrong = format!("{}x", flags[0]);
        let out = run(example, &[&wrong, "1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{example} {wrong}: {err}");
        if flags[0].starts_with("--") {
            assert!(
                err.contains(&wrong)
                    && err.contains(&format!("similar argument exists: '{}'", flags[0])),
                "{example} {wrong}: {err}"
            );
        }
    }
}

/// The installable `ferrogen` binary: its subcommands are the user-facing examples, with the
/// same flags, and the old example names run the same code.
#[test]
fn the_ferrogen_binary_has_a_subcommand_per_command_line() {
    let ferrogen = env!("CARGO_BIN_EXE_ferrogen");
    let run = |args: &[&str]| Command::new(ferrogen).args(args).output().unwrap();
    let help = run(&["--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert_eq!(help.status.code(), Some(0), "{text}");
    let commands = ["score", "generate", "merge", "policy-search", "calibrate"];
    for command in commands {
        assert!(
            text.contains(command),
            "ferrogen --help lacks {command}: {text}"
        );
    }
    for (example, flags) in EXAMPLES {
        let command = example.replace('_', "-");
        if !commands.contains(&command.as_str()) {
            continue;
        }
        let help = run(&[&command, "--help"]);
        let text = String::from_utf8_lossy(&help.stdout);
        assert_eq!(
            help.status.code(),
            Some(0),
            "ferrogen {command} --help: {text}"
        );
        assert!(
            text.contains(&format!("Usage: ferrogen {command}")),
            "{text}"
        );
        for flag in flags {
            assert!(
                text.contains(flag),
                "ferrogen {command} --help lacks {flag}"
            );
        }
        let wrong = format!("{}x", flags[0]);
        let out = run(&[&command, &wrong, "1"]);
        assert_eq!(out.status.code(), Some(2), "ferrogen {command} {wrong}");
    }
    // no subcommand, or an unknown one: status 2 with the list
    for args in [&[][..], &["scor"][..]] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "ferrogen {args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("score"));
    }
}

#[test]
fn bad_values_and_conflicts_name_their_flags_with_status_2() {
    // a score command line with its required flags, then `extra`
    let score = |extra: &[&'static str]| {
        let mut args = vec!["--model", "m", "--input", "i", "--output", "o"];
        args.extend(extra);
        args
    };
    let search = ["--hardware", "h", "--prompt-len", "1", "--gen-len", "1"];
    let cases: [(&str, Vec<&str>, &[&str]); 15] = [
        (
            "score",
            score(&["--cpu-mem", "lots"]),
            &["--cpu-mem", "`lots`"],
        ),
        ("score", score(&["--shard", "3/3"]), &["--shard"]),
        (
            "score",
            score(&["--compress-cache", "--f16-cache"]),
            &["--compress-cache", "--f16-cache"],
        ),
        (
            "score",
            score(&["--policy", "p", "--hardware", "h"]),
            &["--hardware", "--policy"],
        ),
        (
            "generate",
            vec![
                "--model",
                "m",
                "--prompt",
                "x",
                "--backend",
                "reference",
                "--compress-cache",
            ],
            &["--compress-cache", "drop --backend reference"],
        ),
        (
            "score",
            vec!["--model", "m", "--input", "i"],
            &["--output", "required"],
        ),
        (
            "generate",
            vec![
                "--model", "m", "--prompt", "x", "--input", "i", "--output", "o",
            ],
            &["--prompt", "--input"],
        ),
        (
            "generate",
            vec!["--model", "m", "--input", "i"],
            &["--output"],
        ),
        ("generate", vec!["--model", "m"], &["--prompt", "--input"]),
        (
            "generate",
            vec!["--model", "m", "--prompt", "x", "--max-tokens", "0"],
            &["--max-tokens", "at least 1"],
        ),
        (
            "merge",
            vec!["--input", "i", "--output", "o"],
            &["<SHARD.jsonl>"],
        ),
        (
            "policy_search",
            [&["--config", "opt-1.3b", "--model", "m"][..], &search].concat(),
            &["--model", "--config"],
        ),
        (
            "bench_offload",
            vec!["--config", "opt-1.3b", "--overlap", "sometimes"],
            &["--overlap", "both"],
        ),
        (
            "bench_long",
            vec!["--model", "m", "--text", "t", "--paths", "gpu"],
            &["--paths", "engine-cpu"],
        ),
        (
            "bench_cpu_kernels",
            vec!["--rows", "1,x"],
            &["--rows", "`x`"],
        ),
    ];
    for (example, args, needles) in cases {
        let out = run(example, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{example} {args:?}: {err}");
        assert!(
            needles.iter().all(|n| err.contains(n)),
            "{example} {args:?}: {err}"
        );
    }
    // the old spelling of --max-tokens still works
    let help = run("generate", &["--max-new-tokens", "0"]);
    assert!(String::from_utf8_lossy(&help.stderr).contains("at least 1"));
}

#[test]
fn the_library_names_options_and_the_command_line_names_flags() {
    // the engine refuses a GPU budget on the CPU device naming `EngineOptions::gpu_budget`;
    // the command line tells its user the flags they typed
    let dir = tempfile::tempdir().unwrap();
    let input = write_records(dir.path(), 1);
    let model = fixture_dir("opt-pre-ln-proj").display().to_string();
    let output = dir.path().join("out.jsonl").display().to_string();
    let args = [
        "--model",
        &model,
        "--input",
        &input,
        "--output",
        &output,
        "--device",
        "cpu",
        "--gpu-mem",
        "1GiB",
    ];
    let out = run("score", &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("invalid --gpu-mem") && err.contains("--cpu-mem"),
        "{err}"
    );
    assert!(!err.contains("EngineOptions"), "{err}");
}

/// A scoring job over `records` token records of the fixture, in batches of one record.
fn write_records(dir: &Path, records: usize) -> String {
    let exp = expected("opt-pre-ln-proj");
    let lines: Vec<String> = (0..records)
        .map(|i| {
            let s = &exp.sequences[i % exp.sequences.len()];
            json!({"id": i, "tokens": s.tokens}).to_string()
        })
        .collect();
    let path = dir.join("in.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path.display().to_string()
}

#[test]
fn progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_records(dir.path(), 24);
    let model = fixture_dir("opt-pre-ln-proj").display().to_string();
    let score = example_binary("score").display().to_string();
    let job = |output: &str| {
        [
            score.clone(),
            "--model".into(),
            model.clone(),
            "--input".into(),
            input.clone(),
            "--output".into(),
            output.to_string(),
            "--device".into(),
            "cpu".into(),
            "--batch-tokens".into(),
            "1".into(),
        ]
    };

    // not a terminal: a plain line per report (every batch with --progress-every 0)
    let plain_out = dir.path().join("plain.jsonl").display().to_string();
    let mut args = job(&plain_out).to_vec();
    args.extend(["--progress-every".into(), "0.001".into()]);
    let out = Command::new(&args[0]).args(&args[1..]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "escape codes without a terminal: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("scored ")).collect();
    assert!(lines.len() >= 12, "{err}");
    for l in &lines {
        assert!(
            l.contains(" of 24 records (0 failed), ") && l.contains("tokens/s, ETA "),
            "{l}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("scored 24 of 24 records")),
        "{err}"
    );

    // a terminal (util-linux `script` gives the job a pseudo-terminal): a bar, no plain lines
    let Ok(_) = Command::new("script").arg("--version").output() else {
        panic!("`script` (util-linux) is needed for the terminal test: apt-get install bsdutils");
    };
    let bar_out = dir.path().join("bar.jsonl").display().to_string();
    let quoted: Vec<String> = job(&bar_out).iter().map(|a| format!("'{a}'")).collect();
    let out = Command::new("script")
        .args(["-qec", &quoted.join(" "), "/dev/null"])
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{screen}");
    assert!(
        screen.contains("24/24 records, ") && screen.contains("tokens/s, ETA"),
        "{screen}"
    );
    assert!(!screen.contains("scored 24 of 24"), "{screen}");
    assert!(screen.contains("done: 24 records"), "{screen}");

    // the same answers either way
    assert_eq!(
        std::fs::read_to_string(&plain_out).unwrap(),
        std::fs::read_to_string(&bar_out).unwrap()
    );
}
