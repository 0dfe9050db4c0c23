//! The scoring job and the `score` example: results against the Hugging Face fixtures, error
//! records for bad lines, input order kept across batches, exit statuses.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::{example_binary, expected, fixture_dir};
use ferrogen::arch::ModelFiles;
use ferrogen::reference::ReferenceModel;
use ferrogen::score::{score_jsonl, ScoreOptions, ScoreSummary};
use serde_json::{json, Value};

const FIXTURE: &str = "opt-pre-ln-proj";

/// Per record in order: its id and `Some(expected token logprobs)`, or `None` for an error.
type Expectations = Vec<(Value, Option<Vec<f64>>)>;

/// A dataset mixing good records (every fixture sequence and text) with bad ones.
fn mixed_dataset() -> (String, Expectations) {
    let exp = expected(FIXTURE);
    let mut lines = Vec::new();
    let mut want = Vec::new();
    for (i, s) in exp.sequences.iter().enumerate() {
        lines.push(json!({"id": i, "tokens": s.tokens}).to_string());
        want.push((json!(i), Some(s.token_logprobs.clone())));
        // a bad record after each good one, so errors interleave with batches
        let (line, id) = match i {
            0 => ("{\"id\": 100, \"tokens\": [1, 2,".to_string(), Value::Null),
            1 => (
                json!({"id": "oov", "tokens": [1, 99999]}).to_string(),
                json!("oov"),
            ),
            2 => (
                json!({"id": "half", "context": "a"}).to_string(),
                json!("half"),
            ),
            _ => (
                json!({"id": "one", "tokens": [3]}).to_string(),
                json!("one"),
            ),
        };
        lines.push(line);
        want.push((id, None));
        lines.push(String::new()); // blank lines are not records
    }
    for (i, t) in exp.texts.iter().enumerate() {
        let id = json!(format!("text-{i}"));
        lines.push(json!({"id": id, "text": t.text}).to_string());
        want.push((id, Some(t.token_logprobs.clone())));
    }
    lines.push(json!({"id": "empty", "text": ""}).to_string());
    want.push((json!("empty"), None));
    (lines.join("\n") + "\n", want)
}

/// Runs a scoring job over `input` in memory: its output text and summary.
fn run_job(
    model: &ReferenceModel,
    files: &ModelFiles,
    input: &str,
    options: &ScoreOptions,
) -> (String, ScoreSummary) {
    let mut out = Vec::new();
    let summary = score_jsonl(
        model,
        files.tokenizer(),
        input.as_bytes(),
        &mut out,
        options,
        |_| {},
    )
    .unwrap();
    (String::from_utf8(out).unwrap(), summary)
}

/// The JSON lines of a job's output.
fn json_lines(output: &str) -> Vec<Value> {
    output
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn check_output(output: &str, want: &[(Value, Option<Vec<f64>>)]) {
    let lines = json_lines(output);
    assert_eq!(lines.len(), want.len(), "one result per record");
    for (line, (id, lps)) in lines.iter().zip(want) {
        assert_eq!(&line["id"], id, "{line}");
        match lps {
            None => assert!(
                line["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{line}"
            ),
            Some(lps) => {
                let n = lps.len();
                assert_eq!(line["scored_tokens"], json!(n), "{line}");
                let got: Vec<f64> = line["token_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                for (g, w) in got.iter().zip(lps) {
                    assert!((g - w).abs() < 1e-4, "{id}: {g} vs {w}");
                }
                let logprob = line["logprob"].as_f64().unwrap();
                let sum: f64 = lps.iter().sum();
                assert!(
                    (logprob - sum).abs() < 1e-4 * n as f64,
                    "{logprob} vs {sum}"
                );
                let ppl = line["ppl"].as_f64().unwrap();
                assert!((ppl - (-logprob / n as f64).exp()).abs() < 1e-9 * ppl);
            }
        }
    }
}

#[test]
fn job_scores_in_order_across_batches_with_error_records() {
    let files = ModelFiles::open(&fixture_dir(FIXTURE)).unwrap();
    let model = ReferenceModel::load(&files).unwrap();
    let (input, want) = mixed_dataset();
    for batch_tokens in [1, 25, 10_000] {
        let mut options = ScoreOptions::default();
        options.per_token = true;
        options.batch_tokens = Some(batch_tokens);
        let (out, summary) = run_job(&model, &files, &input, &options);
        check_output(&out, &want);
        let good = want.iter().filter(|w| w.1.is_some()).count();
        assert_eq!(summary.records, want.len());
        assert_eq!((summary.scored, summary.failed), (good, want.len() - good));
    }
}

#[test]
fn text_records_without_a_tokenizer_fail_alone() {
    let files = ModelFiles::open(&fixture_dir("llama-tied")).unwrap();
    assert!(files.tokenizer.is_err(), "fixture has no tokenizer.json");
    let model = ReferenceModel::load(&files).unwrap();
    let input = "{\"id\": 1, \"text\": \"hello\"}\n{\"id\": 2, \"tokens\": [4, 5, 6]}\n";
    let (out, summary) = run_job(&model, &files, input, &ScoreOptions::default());
    let lines = json_lines(&out);
    assert!(lines[0]["error"]
        .as_str()
        .unwrap()
        .contains("tokenizer.json"));
    assert_eq!(lines[1]["scored_tokens"], json!(2));
    assert_eq!((summary.scored, summary.failed), (1, 1));
}

#[test]
fn score_example_follows_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let (input, want) = mixed_dataset();
    let in_path = dir.path().join("in.jsonl");
    std::fs::File::create(&in_path)
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out_path = dir.path().join("out.jsonl");
    let model = fixture_dir(FIXTURE);
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(example_binary("score"));
        cmd.arg("--model").arg(&model);
        cmd.arg("--input").arg(&in_path);
        cmd.arg("--output").arg(&out_path);
        cmd.args(extra);
        cmd.output().unwrap()
    };

    let out = run(&["--per-token", "--backend", "reference"]);
    assert_eq!(out.status.code(), Some(3), "some records fail");
    check_output(&std::fs::read_to_string(&out_path).unwrap(), &want);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tokens/s") && stderr.contains("perplexity"),
        "{stderr}"
    );
    // the engine on the native CPU device (with one RAM budget, placed by the search): the
    // same results
    for extra in [
        &["--device", "cpu"][..],
        &["--device", "cpu", "--cpu-mem", "8MiB"],
    ] {
        let out = run(&[&["--per-token"][..], extra].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{extra:?}: {stderr}");
        assert!(stderr.contains("device: cpu"), "{stderr}");
        check_output(&std::fs::read_to_string(&out_path).unwrap(), &want);
    }

    // Only the good records: exit 0, and no per-token list without --per-token.
    // (the good token records are the ones with numeric ids)
    let good: String = input
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["id"].is_number()))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&in_path, good).unwrap();
    let out = run(&[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&out_path)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(first.get("token_logprobs").is_none() && first.get("logprob").is_some());

    for (args, needle) in [
        (vec!["--bogus"], "--bogus"),
        (vec!["--backend", "cuda"], "--backend"),
        (
            vec!["--backend", "reference", "--gpu-mem", "1GiB"],
            "drop --backend reference",
        ),
        (vec!["--device", "tpu"], "--device"),
        (
            vec!["--device", "cpu", "--gpu-mem", "1GiB"],
            "budget all of its memory with --cpu-mem",
        ),
        (vec!["--gpu-mem", "lots"], "--gpu-mem"),
        (
            vec!["--policy", "/no/such/policy.toml"],
            "/no/such/policy.toml",
        ),
        // a stride must leave each window a token of context
        (
            vec!["--backend", "reference", "--window", "16", "--stride", "16"],
            "--stride",
        ),
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}"
        );
    }
    let out = Command::new(example_binary("score"))
        .args(["--model", "/no/such/model", "--input"])
        .arg(&in_path)
        .arg("--output")
        .arg(&out_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/model"));
}

/// `--compress-cache`, `--f16-cache` and `--compress-weight` reach the placement, all resident or searched
/// under a budget: the 4-bit cache (or weights) moves the logprobs a little off the
/// reference's, and the same way under a budget as all resident.
#[test]
fn score_example_compresses_the_cache_or_weights_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let exp = expected(FIXTURE);
    let input: String = exp
        .sequences
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"id": i, "tokens": s.tokens}).to_string() + "\n")
        .collect();
    let in_path = dir.path().join("in.jsonl");
    std::fs::write(&in_path, input).unwrap();
    let model = fixture_dir(FIXTURE);
    let out_path = dir.path().join("out.jsonl");
    let score = |device: &str, extra: &[&str]| {
        Command::new(example_binary("score"))
            .arg("--model")
            .arg(&model)
            .arg("--input")
            .arg(&in_path)
            .arg("--output")
            .arg(&out_path)
            .args(["--per-token", "--device", device])
            .args(extra)
            .output()
            .unwrap()
    };
    let run_on = |device: &str, extra: &[&str]| -> Vec<f64> {
        let out = score(device, extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {stderr}");
        json_lines(&std::fs::read_to_string(&out_path).unwrap())
            .iter()
            .flat_map(|l| l["token_logprobs"].as_array().unwrap().clone())
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let run = |extra: &[&str]| run_on("cpu", extra);
    let worst = |a: &[f64], b: &[f64]| {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    let reference: Vec<f64> = exp
        .sequences
        .iter()
        .flat_map(|s| s.token_logprobs.clone())
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(worst(&run(&[]), &reference) < 1e-4);
    for flag in ["--compress-cache", "--compress-weight"] {
        let resident = run(&[flag]);
        // the fixture's logprobs are about -20 a token: 4-bit codes move single tokens by
        // up to a few nats (measured: cache 0.73, weights 4.5) and the corpus log-perplexity
        // by under 1% (0.05%, 0.8%)
        let off = worst(&resident, &reference);
        assert!(off > 1e-4, "{flag} changed nothing");
        let drift = (mean(&resident) - mean(&reference)).abs() / mean(&reference).abs();
        assert!(
            drift < 0.02,
            "{flag}: log-perplexity {drift} off the reference"
        );
        let budgeted = run(&[flag, "--cpu-mem", "8MiB"]);
        let apart = worst(&budgeted, &resident);
        assert!(apart < 5e-3, "{flag}: {apart} from all resident");
    }
    // f16 rounds keys and values to 11 significant bits: the tokens move, but by far less
    // than 4-bit codes move them
    let half = run(&["--f16-cache"]);
    let off = worst(&half, &reference);
    let drift = (mean(&half) - mean(&reference)).abs() / mean(&reference).abs();
    eprintln!("--f16-cache: worst token {off}, log-perplexity drift {drift}");
    assert!(off > 1e-6, "--f16-cache changed nothing");
    assert!(off < 0.05 && drift < 1e-3, "--f16-cache: {off}, {drift}");
    // (tests/generate_job.rs reads an f16 cache back from disk for every decode step)
    let budgeted = run(&["--f16-cache", "--cpu-mem", "8MiB"]);
    let apart = worst(&budgeted, &half);
    assert!(
        apart < 2e-3,
        "f16 cache under the search: {apart} from all resident"
    );
    // the WebGPU device stores the same halves (its kernels round as the CPU does), so it
    // scores as the CPU device does, up to the devices' f32 arithmetic
    if std::env::var("FERROGEN_SKIP_GPU").as_deref() != Ok("1") {
        let on_gpu = run_on("wgpu", &["--f16-cache"]);
        let apart = worst(&on_gpu, &half);
        assert!(
            apart < 2e-3,
            "f16 cache on WebGPU: {apart} from the CPU device"
        );
        let plain = run_on("wgpu", &[]);
        assert!(
            worst(&on_gpu, &plain) > 1e-6,
            "--f16-cache changed nothing on WebGPU"
        );
    }
}

/// The example on the engine with a policy that offloads weights, cache and activations:
/// the same results as the reference, a Chrome trace, and no offload files left behind.
#[test]
fn score_example_offloads_with_a_policy_and_writes_a_trace() {
    if std::env::var("FERROGEN_SKIP_GPU").as_deref() == Ok("1") {
        common::skipped("FERROGEN_SKIP_GPU=1");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (input, want) = mixed_dataset();
    let good: String = input
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["id"].is_number()))
        .map(|l| format!("{l}\n"))
        .collect();
    let in_path = dir.path().join("in.jsonl");
    std::fs::write(&in_path, good).unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "gpu_batch_size = 2\nnum_gpu_batches = 2\nw_gpu_percent = 10\nw_cpu_percent = 20\n\
         cache_gpu_percent = 50\ncache_cpu_percent = 0\nact_gpu_percent = 0\nact_cpu_percent = 50\n",
    )
    .unwrap();
    let offload = dir.path().join("offload");
    let (out_path, trace) = (dir.path().join("out.jsonl"), dir.path().join("trace.json"));
    let out = Command::new(example_binary("score"))
        .arg("--model")
        .arg(fixture_dir(FIXTURE))
        .arg("--input")
        .arg(&in_path)
        .arg("--output")
        .arg(&out_path)
        .args(["--per-token", "--cpu-mem", "64MiB", "--policy"])
        .arg(&policy)
        .arg("--offload-dir")
        .arg(&offload)
        .arg("--trace")
        .arg(&trace)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("memory peaks"), "{stderr}");
    let want: Vec<_> = want.into_iter().filter(|(id, _)| id.is_number()).collect();
    check_output(&std::fs::read_to_string(&out_path).unwrap(), &want);
    let trace: Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    for cat in [
        "compute",
        "load weight",
        "load activation",
        "store activation",
    ] {
        assert!(
            events.iter().any(|e| e["ph"] == "X" && e["cat"] == cat),
            "no {cat} span"
        );
    }
    // (the directory this run created goes too, once empty)
    assert_eq!(
        std::fs::read_dir(&offload).map_or(0, |d| d.count()),
        0,
        "offload files left"
    );
}

/// A record longer than the window is scored in rolling windows: every token after the first
/// exactly once, each with the context the rules give it (checked token by token against the
/// reference scoring exactly that context), for lm-eval's disjoint windows and for strides;
/// a window as long as the record gives the one-pass numbers.
#[test]
fn long_records_are_scored_in_rolling_windows() {
    let files = ModelFiles::open(&fixture_dir(FIXTURE)).unwrap();
    let model = ReferenceModel::load(&files).unwrap();
    let vocab = files.config.vocab_size() as u32;
    let record: Vec<u32> = (0..150u32).map(|i| (i * 37 + 11) % vocab).collect();
    let whole = model.token_logprobs(&[&record[..64]]).unwrap().remove(0);
    for (window, stride) in [(16, None), (16, Some(5)), (10, Some(1)), (64, None)] {
        let input = json!({"id": "doc", "tokens": record}).to_string()
            + "\n"
            + &json!({"id": "short", "tokens": record[..64]}).to_string();
        let mut options = ScoreOptions::default();
        options.per_token = true;
        options.window = Some(window);
        options.stride = stride;
        options.batch_tokens = Some(40);
        let lines = json_lines(&run_job(&model, &files, &input, &options).0);
        let got: Vec<f64> = lines[0]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), record.len() - 1, "{window} {stride:?}");
        assert_eq!(lines[0]["scored_tokens"], json!(record.len() - 1));
        let step = stride.unwrap_or(window - 1);
        for (i, &lp) in got.iter().enumerate() {
            // token t = i + 1; its window ends at the end of its group of `step` tokens after
            // the first window, and starts `window` tokens before
            let t = i + 1;
            let start = if t < window {
                0
            } else {
                let end = (window + (t - window) / step * step + step).min(record.len());
                end - window
            };
            let want = model.token_logprobs(&[&record[start..=t]]).unwrap()[0][t - start - 1];
            assert!(
                (lp - f64::from(want)).abs() < 1e-5,
                "window {window} stride {stride:?}: token {t} from {start}: {lp} vs {want}"
            );
        }
        // a record that fits one window of 64 is one pass
        if window == 64 {
            let short = &lines[1]["token_logprobs"];
            for (g, w) in short.as_array().unwrap().iter().zip(&whole) {
                assert!((g.as_f64().unwrap() - f64::from(*w)).abs() < 1e-6);
            }
        }
    }
}

/// A job killed (SIGKILL) at 20 random points and resumed with `--resume` each time ends with
/// every record answered exactly once, in input order, with the numbers of an uninterrupted
/// run.
#[test]
fn killed_jobs_resume_to_the_same_answers() {
    let exp = expected(FIXTURE);
    let dir = tempfile::tempdir().unwrap();
    // 600 records of 8-40 tokens, written a few at a time (--batch-tokens 64)
    let source: Vec<u32> = exp
        .sequences
        .iter()
        .flat_map(|s| s.tokens.clone())
        .collect();
    let mut input = String::new();
    for i in 0..600usize {
        let n = 8 + i * 7 % 33;
        let tokens: Vec<u32> = source.iter().cycle().skip(i * 5).take(n).copied().collect();
        input += &format!("{}\n", json!({"id": format!("r{i}"), "tokens": tokens}));
    }
    let in_path = dir.path().join("in.jsonl");
    std::fs::write(&in_path, &input).unwrap();
    let model = fixture_dir(FIXTURE);
    let command = |out: &Path| {
        let mut cmd = Command::new(example_binary("score"));
        cmd.arg("--model").arg(&model).arg("--input").arg(&in_path);
        cmd.arg("--output")
            .arg(out)
            .args(["--batch-tokens", "64", "--device", "cpu"]);
        cmd.stderr(std::process::Stdio::null());
        cmd
    };
    let whole = dir.path().join("whole.jsonl");
    let start = std::time::Instant::now();
    assert!(command(&whole).status().unwrap().success());
    let full_run = start.elapsed();
    let want = json_lines(&std::fs::read_to_string(&whole).unwrap());
    assert_eq!(want.len(), 600);

    // kills at pseudo-random points within the first tenth of a whole run's time (each run
    // resumes where the last was killed)
    let resumed = dir.path().join("resumed.jsonl");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut torn = 0;
    for _ in 0..20 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let at = full_run.mul_f64((seed >> 11) as f64 / (1u64 << 53) as f64 / 10.0);
        let mut child = command(&resumed).arg("--resume").spawn().unwrap();
        std::thread::sleep(at);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let text = std::fs::read_to_string(&resumed).unwrap_or_default();
        torn += usize::from(!text.is_empty() && !text.ends_with('\n'));
    }
    // and a line torn by a kill in the middle of a write (the writes above were seldom cut)
    let before = json_lines(&std::fs::read_to_string(&resumed).unwrap_or_default()).len();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&resumed)
        .unwrap();
    write!(file, "{{\"id\":\"r{before}\",\"scored_tok").unwrap();
    drop(file);
    let status = command(&resumed).arg("--resume").status().unwrap();
    assert!(status.success());
    let got = json_lines(&std::fs::read_to_string(&resumed).unwrap());
    assert_eq!(got.len(), 600, "every record answered exactly once");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["id"], w["id"], "in input order");
        assert_eq!(g["scored_tokens"], w["scored_tokens"]);
        // (resumed batches hold other records, which moves the last bits of a sum)
        let (a, b) = (
            g["logprob"].as_f64().unwrap(),
            w["logprob"].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-4 * b.abs().max(1.0),
            "{}: {a} vs {b}",
            g["id"]
        );
    }
    eprintln!("20 kills in a {full_run:?} job, {torn} of them tore a line; {before} answered then");
}

/// Four shards of a job, named by `--shard`, by a Slurm job array's environment and by a
/// Kubernetes Indexed Job's, merged by the `merge` example: the single-process job's output,
/// line for line. A shard that has not finished makes `merge` fail, naming its file.
#[test]
fn shards_merge_into_the_single_process_output() {
    let (input, _) = mixed_dataset();
    let dir = tempfile::tempdir().unwrap();
    let in_path = dir.path().join("in.jsonl");
    std::fs::write(&in_path, &input).unwrap();
    let model = fixture_dir(FIXTURE);
    let score = |out: &Path, extra: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(example_binary("score"));
        cmd.arg("--model").arg(&model).arg("--input").arg(&in_path);
        cmd.arg("--output")
            .arg(out)
            .args(["--device", "cpu"])
            .args(extra);
        for var in [
            "SLURM_ARRAY_TASK_ID",
            "SLURM_ARRAY_TASK_COUNT",
            "JOB_COMPLETION_INDEX",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        let status = cmd.status().unwrap();
        assert!(
            matches!(status.code(), Some(0 | 3)),
            "{extra:?} {env:?}: {status}"
        );
    };
    let whole = dir.path().join("whole.jsonl");
    score(&whole, &[], &[]);
    let shard = |k: usize| dir.path().join(format!("shard{k}.jsonl"));
    score(&shard(0), &["--shard", "0/4"], &[]);
    score(&shard(1), &["--shard", "1/4"], &[]);
    let slurm = [
        ("SLURM_ARRAY_TASK_ID", "2"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
    ];
    score(&shard(2), &[], &slurm);
    score(
        &shard(3),
        &["--shards", "4"],
        &[("JOB_COMPLETION_INDEX", "3")],
    );
    let merge = |out: &Path| {
        let mut cmd = Command::new(example_binary("merge"));
        cmd.arg("--input").arg(&in_path).arg("--output").arg(out);
        cmd.args((0..4).map(shard));
        cmd.output().unwrap()
    };
    let merged = dir.path().join("merged.jsonl");
    let run = merge(&merged);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (got, want) = (
        std::fs::read_to_string(&merged).unwrap(),
        std::fs::read_to_string(&whole).unwrap(),
    );
    let (got, want) = (json_lines(&got), json_lines(&want));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["id"], w["id"]);
        assert_eq!(g["error"], w["error"]);
        let (a, b) = (g["logprob"].as_f64(), w["logprob"].as_f64());
        assert!(
            a.zip(b)
                .is_none_or(|(a, b)| (a - b).abs() < 1e-4 * b.abs().max(1.0)),
            "{g} vs {w}"
        );
    }

    // a shard that stopped early: merge fails naming it, and writes nothing
    let text = std::fs::read_to_string(shard(2)).unwrap();
    let kept: Vec<&str> = text.lines().collect();
    std::fs::write(shard(2), kept[..kept.len() - 1].join("\n") + "\n").unwrap();
    let incomplete = dir.path().join("incomplete.jsonl");
    let run = merge(&incomplete);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(
        err.contains("shard2.jsonl") && err.contains("is missing"),
        "{err}"
    );
    assert!(!incomplete.exists());
}
