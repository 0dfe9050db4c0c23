//! The `generate` example's JSONL job on a fixture model: records' own parameters over the
//! flags' defaults, stop strings cut across token boundaries, finish reasons, bad records,
//! sampling that repeats whatever the batching, and jobs killed and resumed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{example_binary, expected, fixture_dir};
use ferrogen::arch::ModelFiles;
use serde_json::{json, Value};

const FIXTURE: &str = "llama-gqa-untied";

fn json_lines(output: &str) -> Vec<Value> {
    output
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `generate` on `input`, writing `output`, with more flags; its exit status.
fn generate(input: &Path, output: &Path, flags: &[&str]) -> Command {
    generate_on("cpu", input, output, flags)
}

fn generate_on(device: &str, input: &Path, output: &Path, flags: &[&str]) -> Command {
    let mut cmd = Command::new(example_binary("generate"));
    cmd.arg("--model").arg(fixture_dir(FIXTURE));
    cmd.arg("--input").arg(input).arg("--output").arg(output);
    cmd.args(["--device", device]).args(flags);
    cmd.stderr(std::process::Stdio::null());
    cmd
}

fn tokens(v: &Value) -> Vec<u32> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// Runs `generate ... --resume` on `input` into `output` `kills` times, each stopped by a
/// signal (`signals` in turn: SIGKILL, or one the job handles) soon after it answered more
/// records (0-10% of `full_run` later, the delays drawn from `seed`), then once more to the
/// end; returns how many signals left the job unfinished (each such resume had work to pick
/// up). A handled signal must end the run with status 128 + its number (or 0 when the run
/// had finished), its answers so far whole lines, and no file of its own left in `offload`.
fn kill_and_resume(
    (input, output): (&Path, &Path),
    flags: &[&str],
    (kills, seed): (usize, u64),
    full_run: std::time::Duration,
    total: usize,
    (signals, offload): (&[i32], Option<&Path>),
) -> usize {
    let partial = ferrogen::job::partial_path(output);
    let text = || {
        std::fs::read_to_string(&partial)
            .or_else(|_| std::fs::read_to_string(output))
            .unwrap_or_default()
    };
    let lines = || text().lines().count();
    let mut seed = seed;
    let mut mid_run = 0;
    for k in 0..kills {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let at = full_run.mul_f64(0.1 * (seed >> 11) as f64 / (1u64 << 53) as f64);
        let before = lines();
        let mut child = generate(input, output, flags)
            .arg("--resume")
            .spawn()
            .unwrap();
        // (past the run's start-up: once it has answered more records, or ended)
        while lines() == before && child.try_wait().unwrap().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(at);
        let signal = signals[k % signals.len()];
        // SAFETY: a signal to our own child process
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let status = child.wait().unwrap();
        if signal != libc::SIGKILL {
            assert!(
                matches!(status.code(), Some(0)) || status.code() == Some(128 + signal),
                "signal {signal}: {status:?}"
            );
            let t = text();
            assert!(
                t.is_empty() || t.ends_with('\n'),
                "whole lines after signal {signal}"
            );
            if let Some(dir) = offload {
                let left: Vec<_> = std::fs::read_dir(dir)
                    .map(|d| d.flatten().map(|e| e.file_name()).collect())
                    .unwrap_or_default();
                assert!(
                    left.is_empty(),
                    "left in the offload dir after signal {signal}: {left:?}"
                );
            }
        }
        if lines() < total {
            mid_run += 1;
        }
    }
    let status = generate(input, output, flags)
        .arg("--resume")
        .status()
        .unwrap();
    assert!(status.success());
    if let Some(dir) = offload {
        let left = std::fs::read_dir(dir).map_or(0, |d| d.count());
        assert_eq!(left, 0, "files left in the offload dir at the end");
    }
    mid_run
}

/// `count` prompts cut from the fixture's sequences (end to end, cycled): prompt `i` is the
/// `len` tokens from token `from`, `(from, len) = at(i)`.
fn fixture_prompts(count: usize, at: impl Fn(usize) -> (usize, usize)) -> Vec<Vec<u32>> {
    let exp = expected(FIXTURE);
    let source: Vec<u32> = exp
        .sequences
        .iter()
        .flat_map(|s| s.tokens.clone())
        .collect();
    (0..count)
        .map(|i| {
            let (from, len) = at(i);
            source
                .iter()
                .cycle()
                .skip(from)
                .take(len)
                .copied()
                .collect()
        })
        .collect()
}

fn write_input(dir: &Path, name: &str, records: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn records_follow_their_parameters_and_stop_strings() {
    let dir = tempfile::tempdir().unwrap();
    let exp = expected(FIXTURE);
    let files = ModelFiles::open(&fixture_dir(FIXTURE)).unwrap();
    let tokenizer = files.tokenizer().unwrap();
    // greedy runs first, from several prompts: the stop string spans two tokens' text (a
    // random model's tokens are often bytes of a character: the prompt is one whose
    // continuation has a clean boundary)
    let candidates: Vec<Vec<u32>> = exp
        .sequences
        .iter()
        .map(|s| s.tokens.clone())
        .chain(exp.texts.iter().map(|t| t.tokens.clone()))
        .flat_map(|t| (2..t.len().min(12)).map(move |n| t[..n].to_vec()))
        .collect();
    let first_records: Vec<Value> = candidates
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"id": i, "tokens": p, "max_tokens": 10}))
        .collect();
    let first = write_input(dir.path(), "first.jsonl", &first_records);
    let out = dir.path().join("first-out.jsonl");
    assert!(generate(&first, &out, &[]).status().unwrap().success());
    let clean = |t: &[u32]| {
        let text = tokenizer.decode(t).unwrap();
        (!text.contains('\u{fffd}')).then_some(text)
    };
    let (prompt, g, a, b) = json_lines(&std::fs::read_to_string(&out).unwrap())
        .iter()
        .zip(&candidates)
        .find_map(|(l, p)| {
            let g = tokens(l);
            (1..g.len().saturating_sub(1)).find_map(|k| {
                let (a, b) = (clean(&g[..k])?, clean(&g[..k + 1])?);
                let fits = !a.is_empty() && b.len() > a.len();
                fits.then(|| (p.clone(), g.clone(), a, b))
            })
        })
        .expect("a continuation with a clean token boundary");
    let full = tokenizer.decode(&g).unwrap();
    let stop: String = [
        a.chars().last().unwrap(),
        b[a.len()..].chars().next().unwrap(),
    ]
    .iter()
    .collect();
    let upto = (1..=g.len())
        .find(|&n| tokenizer.decode(&g[..n]).unwrap().contains(&stop))
        .unwrap();
    let cut = full.find(&stop).unwrap();

    let records = vec![
        json!({"id": 0, "tokens": prompt, "max_tokens": 5}),
        json!({"id": 1, "tokens": prompt, "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 7}),
        json!({"id": 2, "tokens": prompt, "max_tokens": 10, "stop": ["never there", stop]}),
        json!({"id": 3, "tokens": prompt, "temprature": 0.5}),
        json!({"id": 4, "prompt": exp.texts[0].text, "temperature": 1.2, "top_k": 20}),
        json!({"id": 5, "tokens": [999_999]}),
        json!({"id": 6, "tokens": prompt, "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 7}),
        json!({"id": 7, "tokens": prompt, "max_tokens": 0}),
    ];
    let input = write_input(dir.path(), "in.jsonl", &records);
    let mut runs = Vec::new();
    for batch in ["1", "16"] {
        let out = dir.path().join(format!("out-{batch}.jsonl"));
        let status = generate(
            &input,
            &out,
            &["--batch-records", batch, "--max-tokens", "6"],
        )
        .status()
        .unwrap();
        assert_eq!(status.code(), Some(3), "some records failed");
        runs.push(json_lines(&std::fs::read_to_string(&out).unwrap()));
    }
    let got = &runs[0];
    let ids: Vec<Value> = got.iter().map(|l| l["id"].clone()).collect();
    assert_eq!(
        ids,
        (0..8).map(Value::from).collect::<Vec<_>>(),
        "input order"
    );
    assert_eq!(
        tokens(&got[0]),
        g[..5.min(g.len())],
        "greedy, its own max_tokens"
    );
    assert_eq!(got[0]["finish_reason"], "length");
    assert_eq!(tokens(&got[1]).len(), 8);
    assert_eq!(
        got[1]["tokens"], got[6]["tokens"],
        "the same seed, the same draws"
    );
    assert_eq!(
        got[2]["finish_reason"], "stop",
        "{stop:?} {upto} {:?} {}",
        g, got[2]
    );
    assert_eq!(
        tokens(&got[2]),
        g[..upto],
        "ends at the token that completes the stop string"
    );
    assert_eq!(got[2]["text"], full[..cut], "cut before the stop string");
    assert!(got[3]["error"].as_str().unwrap().contains("temprature"));
    assert_eq!(tokens(&got[4]).len(), 6, "the flag's max_tokens");
    assert!(got[5]["error"].as_str().unwrap().contains("999999"));
    assert!(got[7]["error"].as_str().unwrap().contains("max_tokens"));
    for l in got.iter().filter(|l| l.get("tokens").is_some()) {
        let n = tokens(l).len();
        assert_eq!(l["token_logprobs"].as_array().unwrap().len(), n);
        assert!(l["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_f64().unwrap() <= 0.0));
    }
    // one record per batch, or all in one: the same answers
    for (a, b) in runs[0].iter().zip(&runs[1]) {
        assert_eq!(a["tokens"], b["tokens"]);
        assert_eq!(a["text"], b["text"]);
        assert_eq!(a["finish_reason"], b["finish_reason"]);
        assert_eq!(a["error"], b["error"]);
    }
}

/// A sampling job killed (SIGKILL) 10 times, each run soon after it answered its first records,
/// and resumed with `--resume` each time ends with every record answered once, in order, with
/// an uninterrupted run's tokens.
#[test]
fn killed_generation_jobs_resume_to_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<Value> = fixture_prompts(600, |i| (i * 3, 2 + i % 9))
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| {
            json!({"id": format!("r{i}"), "tokens": prompt, "max_tokens": 1 + i % 7, "seed": i})
        })
        .collect();
    let input = write_input(dir.path(), "in.jsonl", &records);
    let flags = [
        "--batch-records",
        "4",
        "--temperature",
        "0.8",
        "--top-k",
        "50",
    ];
    let whole = dir.path().join("whole.jsonl");
    let start = std::time::Instant::now();
    assert!(generate(&input, &whole, &flags).status().unwrap().success());
    let full_run = start.elapsed();
    let want = json_lines(&std::fs::read_to_string(&whole).unwrap());
    assert_eq!(want.len(), 600);
    let resumed = dir.path().join("resumed.jsonl");
    let mid_run = kill_and_resume(
        (&input, &resumed),
        &flags,
        (10, 0x2545_f491_4f6c_dd1d),
        full_run,
        600,
        (&[libc::SIGKILL], None),
    );
    assert!(mid_run >= 3, "only {mid_run} of 10 kills landed mid-run");
    let got = json_lines(&std::fs::read_to_string(&resumed).unwrap());
    assert_eq!(got.len(), 600, "every record answered exactly once");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["id"], w["id"], "in input order");
        assert_eq!(g["tokens"], w["tokens"], "{}", g["id"]);
        assert_eq!(g["finish_reason"], w["finish_reason"]);
    }
}

/// A greedy job with half the weights and all of the f16 cache on disk, stopped 8 times by
/// SIGKILL, SIGTERM, SIGINT and SIGHUP in turn, each run soon after it answered its first
/// records, and resumed each time: a handled signal leaves whole lines and nothing in the
/// offload directory; the files a killed run leaves behind are swept by the next run and do
/// not leak into the answers, which are an uninterrupted run's, every record once, in order.
#[test]
fn killed_jobs_with_weights_and_f16_cache_on_disk_resume_to_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<Value> = fixture_prompts(100, |i| (i * 5, 3 + i % 11))
        .into_iter()
        .enumerate()
        .map(
            |(i, prompt)| json!({"id": format!("r{i}"), "tokens": prompt, "max_tokens": 2 + i % 6}),
        )
        .collect();
    let input = write_input(dir.path(), "in.jsonl", &records);
    let policy = dir.path().join("disk.toml");
    std::fs::write(
        &policy,
        "gpu_batch_size = 4\nnum_gpu_batches = 2\nw_gpu_percent = 50\nw_cpu_percent = 0\n\
         cache_gpu_percent = 0\ncache_cpu_percent = 0\nact_gpu_percent = 100\n\
         act_cpu_percent = 0\n",
    )
    .unwrap();
    let offload = dir.path().join("offload");
    let flags = [
        "--batch-records",
        "8",
        "--f16-cache",
        "--policy",
        policy.to_str().unwrap(),
        "--offload-dir",
        offload.to_str().unwrap(),
    ];
    let whole = dir.path().join("whole.jsonl");
    let start = std::time::Instant::now();
    assert!(generate(&input, &whole, &flags).status().unwrap().success());
    let full_run = start.elapsed();
    let want = json_lines(&std::fs::read_to_string(&whole).unwrap());
    assert_eq!(want.len(), records.len());
    let resumed = dir.path().join("resumed.jsonl");
    let mid_run = kill_and_resume(
        (&input, &resumed),
        &flags,
        (8, 0x9e37_79b9_7f4a_7c15),
        full_run,
        records.len(),
        (
            &[libc::SIGKILL, libc::SIGTERM, libc::SIGINT, libc::SIGHUP],
            Some(&offload),
        ),
    );
    assert!(mid_run >= 3, "only {mid_run} of 8 kills landed mid-run");
    let got = json_lines(&std::fs::read_to_string(&resumed).unwrap());
    assert_eq!(
        got.len(),
        records.len(),
        "every record answered exactly once"
    );
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["id"], w["id"], "in input order");
        assert_eq!(g["tokens"], w["tokens"], "{}", g["id"]);
        assert_eq!(g["finish_reason"], w["finish_reason"]);
        let lps = |v: &Value| -> Vec<f64> {
            v["token_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        for (a, b) in lps(g).iter().zip(&lps(w)) {
            assert!((a - b).abs() < 1e-4, "{}: {a} vs {b}", g["id"]);
        }
    }
}

/// `--f16-cache`: greedy generation with the cache in f16 all in RAM, and on disk only (the
/// policy keeps none of it in memory, so every decode step reads it back), gives the same
/// tokens and logprobs, on the CPU device and on WebGPU (which stores the same halves);
/// against the f32 cache the logprobs move, but by little.
#[test]
fn f16_cache_on_disk_generates_as_in_ram() {
    let dir = tempfile::tempdir().unwrap();
    let exp = expected(FIXTURE);
    let records: Vec<Value> = exp
        .sequences
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"id": i, "tokens": s.tokens[..s.tokens.len().min(5)], "max_tokens": 12}))
        .collect();
    let input = write_input(dir.path(), "in.jsonl", &records);
    let policy = dir.path().join("disk-cache.toml");
    std::fs::write(
        &policy,
        "gpu_batch_size = 2\nnum_gpu_batches = 2\nw_gpu_percent = 100\nw_cpu_percent = 0\n\
         cache_gpu_percent = 0\ncache_cpu_percent = 0\nact_gpu_percent = 100\n\
         act_cpu_percent = 0\n",
    )
    .unwrap();
    let offload = dir.path().join("offload");
    let run_on = |device: &str, name: &str, flags: &[&str]| -> Vec<(Vec<u32>, Vec<f64>)> {
        let output = dir.path().join(name);
        let status = generate_on(device, &input, &output, flags)
            .status()
            .unwrap();
        assert!(status.success(), "{flags:?}");
        json_lines(&std::fs::read_to_string(&output).unwrap())
            .iter()
            .map(|v| {
                let lps = v["token_logprobs"].as_array().unwrap();
                (tokens(v), lps.iter().map(|x| x.as_f64().unwrap()).collect())
            })
            .collect()
    };
    let run = |name: &str, flags: &[&str]| run_on("cpu", name, flags);
    let f32_cache = run("f32.jsonl", &[]);
    let in_ram = run("ram.jsonl", &["--f16-cache"]);
    let disk_flags = [
        "--f16-cache",
        "--policy",
        policy.to_str().unwrap(),
        "--offload-dir",
        offload.to_str().unwrap(),
    ];
    let on_disk = run("disk.jsonl", &disk_flags);
    let worst = |a: &[(Vec<u32>, Vec<f64>)], b: &[(Vec<u32>, Vec<f64>)]| {
        a.iter()
            .zip(b)
            .flat_map(|(x, y)| x.1.iter().zip(&y.1).map(|(p, q)| (p - q).abs()))
            .fold(0.0, f64::max)
    };
    assert_eq!(in_ram.len(), records.len());
    for (i, ((ram, disk), full)) in in_ram.iter().zip(&on_disk).zip(&f32_cache).enumerate() {
        assert_eq!(ram.0, disk.0, "record {i}: tokens on disk");
        assert_eq!(ram.0, full.0, "record {i}: tokens against the f32 cache");
    }
    let (apart, moved) = (worst(&in_ram, &on_disk), worst(&in_ram, &f32_cache));
    assert!(apart < 2e-3, "f16 cache on disk: {apart} from in RAM");
    assert!(moved > 0.0 && moved < 0.05, "f16 against f32: {moved}");
    if std::env::var("FERROGEN_SKIP_GPU").as_deref() != Ok("1") {
        let gpu = run_on("wgpu", "disk-wgpu.jsonl", &disk_flags);
        for (i, (cpu, gpu)) in in_ram.iter().zip(&gpu).enumerate() {
            assert_eq!(cpu.0, gpu.0, "record {i}: tokens on WebGPU");
        }
        let apart = worst(&in_ram, &gpu);
        assert!(
            apart < 2e-3,
            "f16 cache on disk, WebGPU: {apart} from the CPU device"
        );
    }
}

/// Chat records (`messages`) through the job on a GGUF file with a chat template: each answers
/// as the record of its rendered tokens does (the template's text tokenized as transformers
/// does, tests/fixtures/gguf); a chat the template refuses (Llama 2's role check) and a model
/// without a template answer with an error naming why, and the job goes on.
#[test]
fn chat_records_follow_the_models_template() {
    let dir = tempfile::tempdir().unwrap();
    let gguf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    for model in ["qwen2-bpe", "llama-spm"] {
        let file = gguf_dir.join(model).join("Q4_K_M.gguf");
        let exp: Value =
            serde_json::from_str(&std::fs::read_to_string(file.with_extension("json")).unwrap())
                .unwrap();
        let chat = &exp["chat"];
        let records = [
            json!({"id": "chat", "messages": chat["messages"], "max_tokens": 6}),
            json!({"id": "tokens", "tokens": chat["tokens"], "max_tokens": 6}),
            json!({"id": "lone-assistant", "messages": [{"role": "assistant", "content": "x"}],
                   "max_tokens": 2}),
            json!({"id": "empty", "messages": [], "max_tokens": 2}),
        ];
        let input = write_input(dir.path(), &format!("{model}.jsonl"), &records);
        let out = dir.path().join(format!("{model}-out.jsonl"));
        let mut cmd = Command::new(example_binary("generate"));
        cmd.arg("--model").arg(&file).arg("--input").arg(&input);
        cmd.arg("--output").arg(&out).args(["--device", "cpu"]);
        // 3: finished, some records failed
        assert_eq!(cmd.status().unwrap().code(), Some(3), "{model}");
        let lines = json_lines(&std::fs::read_to_string(&out).unwrap());
        assert_eq!(tokens(&lines[0]), tokens(&lines[1]), "{model}: {lines:?}");
        assert_eq!(lines[0]["text"], lines[1]["text"], "{model}");
        let refused = lines[2].get("error").and_then(Value::as_str);
        if model == "llama-spm" {
            assert!(
                refused.is_some_and(|e| e.contains("roles must alternate")),
                "{lines:?}"
            );
        } else {
            assert!(refused.is_none(), "{model}: {lines:?}");
        }
        assert!(
            lines[3]["error"].as_str().unwrap().contains("empty"),
            "{lines:?}"
        );
    }
    // a model without a chat template
    let records = [json!({"id": 1, "messages": [{"role": "user", "content": "hi"}]})];
    let input = write_input(dir.path(), "plain.jsonl", &records);
    let out = dir.path().join("plain-out.jsonl");
    assert_eq!(
        generate(&input, &out, &[]).status().unwrap().code(),
        Some(3)
    );
    let lines = json_lines(&std::fs::read_to_string(&out).unwrap());
    let error = lines[0]["error"].as_str().unwrap();
    assert!(error.contains("no chat template"), "{error}");
}
