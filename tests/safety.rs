//! What a hostile (or hurried) user does to a job, each at its edge: outputs that are inputs,
//! two jobs on one output or one offload directory, damaged caches, resumes of other work,
//! broken models, records that fail only for themselves, ids and files as written, and
//! messages that say what is wrong.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{copy_fixture, edit_safetensors, example_binary, fixture_dir};
use serde_json::Value;

const FIXTURE: &str = "llama-gqa-untied";

/// Runs an example with `args`; its output.
fn run(example: &str, args: &[&str]) -> Output {
    Command::new(example_binary(example))
        .args(args)
        .output()
        .unwrap()
}

/// `--model MODEL --input INPUT --output OUTPUT`.
fn job_args<'a>(model: &'a Path, input: &'a Path, output: &'a Path) -> Vec<&'a str> {
    vec![
        "--model",
        s(model),
        "--input",
        s(input),
        "--output",
        s(output),
    ]
}

/// Runs `example --model MODEL --input INPUT --output OUTPUT` with `extra` flags.
fn run_job(example: &str, model: &Path, input: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = job_args(model, input, output);
    args.extend(extra);
    run(example, &args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A JSONL input of `n` token records in `dir`.
fn token_input(dir: &Path, name: &str, n: usize) -> PathBuf {
    let path = dir.join(name);
    let text: String = (0..n)
        .map(|i| {
            format!(
                "{{\"id\": {i}, \"tokens\": [{}, {}, {}, 7]}}\n",
                (i + 3) % 300,
                (2 * i + 5) % 300,
                i % 50 + 1
            )
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An output that is the input (the same path, a symlink, a hard link), the model, or (for
/// merge) a shard is refused with status 2 before anything is written: the file is intact.
#[test]
fn outputs_that_are_inputs_are_refused_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let input = token_input(dir.path(), "in.jsonl", 5);
    let before = std::fs::read(&input).unwrap();
    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    let hard = dir.path().join("hard.jsonl");
    std::fs::hard_link(&input, &hard).unwrap();
    let model = fixture_dir(FIXTURE);
    for out in [&input, &link, &hard] {
        for example in ["score", "generate"] {
            let o = run(
                example,
                &[
                    "--model",
                    s(&model),
                    "--input",
                    s(&input),
                    "--output",
                    s(out),
                ],
            );
            assert_eq!(o.status.code(), Some(2), "{example}: {}", stderr(&o));
            assert!(stderr(&o).contains("same file"), "{}", stderr(&o));
            assert_eq!(
                std::fs::read(&input).unwrap(),
                before,
                "{example} emptied its input"
            );
        }
    }
    // the model (a copy, a GGUF-like single file: the safetensors file of a directory)
    let copy = copy_fixture(FIXTURE);
    let weights = copy.path().join("model.safetensors");
    let model_bytes = std::fs::read(&weights).unwrap();
    let o = run_job("score", copy.path(), &input, &weights, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(std::fs::read(&weights).unwrap(), model_bytes);
    // merge into its input, or into a shard
    let shard = dir.path().join("shard.jsonl");
    std::fs::write(&shard, "{\"id\": 0}\n").unwrap();
    for out in [&input, &shard] {
        let o = run(
            "merge",
            &["--input", s(&input), "--output", s(out), s(&shard)],
        );
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    }
    assert_eq!(std::fs::read(&input).unwrap(), before);
    assert_eq!(std::fs::read_to_string(&shard).unwrap(), "{\"id\": 0}\n");
}

/// A second job on an output another job holds exits 2 naming the holder's process; a job
/// writes OUT.partial until it ends, and a run over an interrupted run's partial output must
/// say --resume.
#[test]
fn one_job_per_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = token_input(dir.path(), "in.jsonl", 5);
    let out = dir.path().join("out.jsonl");
    let lock = ferrogen::job::OutputLock::acquire(&out).unwrap();
    let model = fixture_dir(FIXTURE);
    let args = job_args(&model, &input, &out);
    for extra in [&[][..], &["--resume"]] {
        let mut a = args.to_vec();
        a.extend(extra);
        let o = run("score", &a);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("process {}", std::process::id())),
            "{}",
            stderr(&o)
        );
    }
    drop(lock);
    let o = run("score", &args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(lines(&out).len(), 5);
    assert!(!ferrogen::job::partial_path(&out).exists());
    assert!(!ferrogen::job::lock_path(&out).exists());
    // an interrupted run's answers are not overwritten by a fresh start
    std::fs::write(ferrogen::job::partial_path(&out), "{\"id\":0}\n").unwrap();
    let o = run("score", &args);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
}

/// `--resume` of an output made with other flags, another model or another input is refused
/// naming the difference; with the same ones it continues.
#[test]
fn resume_refuses_other_work() {
    let dir = tempfile::tempdir().unwrap();
    let input = token_input(dir.path(), "in.jsonl", 6);
    let out = dir.path().join("out.jsonl");
    let model = fixture_dir(FIXTURE);
    let args = job_args(&model, &input, &out);
    assert!(run("score", &args).status.success());
    let resume = |extra: &[&str], model: &Path, input: &Path| {
        let mut a = vec![
            "--model",
            s(model),
            "--input",
            s(input),
            "--output",
            s(&out),
            "--resume",
        ];
        a.extend(extra);
        run("score", &a)
    };
    let o = resume(&["--per-token"], &model, &input);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--per-token was false, now true"),
        "{}",
        stderr(&o)
    );
    let o = resume(&[], &fixture_dir("llama-tied"), &input);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("model"), "{}", stderr(&o));
    let other = token_input(dir.path(), "other.jsonl", 7);
    let o = resume(&[], &model, &other);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("input"), "{}", stderr(&o));
    let o = resume(&[], &model, &input);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(lines(&out).len(), 6, "nothing appended twice");
}

/// A policy that puts weights on disk, in `dir`.
fn disk_policy(dir: &Path, name: &str, w_gpu: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "gpu_batch_size = 2\nnum_gpu_batches = 2\nw_gpu_percent = {w_gpu}\nw_cpu_percent = 0\n\
             cache_gpu_percent = 100\ncache_cpu_percent = 0\nact_gpu_percent = 100\n\
             act_cpu_percent = 0\n"
        ),
    )
    .unwrap();
    path
}

/// Two jobs with other placements share one offload directory at once: each reads its own
/// file and both answer as a job alone does; a kept file that is damaged is found by its
/// checksums and written anew (the answers stay right), and nothing is left behind.
#[test]
fn offload_dirs_are_shared_safely_and_damage_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let input = token_input(dir.path(), "in.jsonl", 200);
    let model = fixture_dir(FIXTURE);
    let offload = dir.path().join("offload");
    let alone = dir.path().join("alone.jsonl");
    let o = run_job("score", &model, &input, &alone, &["--device", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = lines(&alone);
    let job = |out: &Path, policy: &Path, extra: &[&str]| {
        let mut c = Command::new(example_binary("score"));
        c.args([
            "--model",
            s(&model),
            "--input",
            s(&input),
            "--output",
            s(out),
        ]);
        c.args([
            "--device",
            "cpu",
            "--batch-tokens",
            "8",
            "--policy",
            s(policy),
        ]);
        c.args(["--offload-dir", s(&offload)]).args(extra);
        c
    };
    let p1 = disk_policy(dir.path(), "a.toml", 20);
    let p2 = disk_policy(dir.path(), "b.toml", 60);
    let (o1, o2) = (dir.path().join("o1.jsonl"), dir.path().join("o2.jsonl"));
    let mut a = job(&o1, &p1, &[]).spawn().unwrap();
    let mut b = job(&o2, &p2, &[]).spawn().unwrap();
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    for out in [&o1, &o2] {
        let got = lines(out);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            let (g, w) = (
                g["logprob"].as_f64().unwrap(),
                w["logprob"].as_f64().unwrap(),
            );
            assert!((g - w).abs() < 1e-3 * w.abs().max(1.0), "{g} vs {w}");
        }
    }
    assert_eq!(
        std::fs::read_dir(&offload).map_or(0, |d| d.count()),
        0,
        "files left"
    );

    // a kept file, damaged: rewritten, never used
    let kept = dir.path().join("kept.jsonl");
    let o = job(&kept, &p1, &["--keep-offload"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let bin = std::fs::read_dir(&offload)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "bin"))
        .expect("a kept offload file");
    let mut bytes = std::fs::read(&bin).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n / 3..n / 3 + 4096.min(n / 3)] {
        *b ^= 0x5a;
    }
    std::fs::write(&bin, bytes).unwrap();
    std::fs::remove_file(&kept).unwrap();
    let o = job(&kept, &p1, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("damaged"), "{}", stderr(&o));
    let got = lines(&kept);
    for (g, w) in got.iter().zip(&want) {
        let (g, w) = (
            g["logprob"].as_f64().unwrap(),
            w["logprob"].as_f64().unwrap(),
        );
        assert!((g - w).abs() < 1e-3 * w.abs().max(1.0), "{g} vs {w}");
    }
}

/// A missing offload directory this run created is removed again when the run fails; a
/// file where the directory should be is named.
#[test]
fn offload_dirs_are_not_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let input = token_input(dir.path(), "in.jsonl", 3);
    let model = fixture_dir(FIXTURE);
    let offload = dir.path().join("new-dir");
    let out = dir.path().join("out.jsonl");
    // 10 kB of RAM cannot hold the model: an error after the directory was made
    let cpu = |mem: &'static str, offload: &Path| {
        run_job(
            "score",
            &model,
            &input,
            &out,
            &[
                "--device",
                "cpu",
                "--cpu-mem",
                mem,
                "--offload-dir",
                s(offload),
            ],
        )
    };
    let o = cpu("10kB", &offload);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!offload.exists(), "the offload directory was left behind");
    assert!(!out.exists() && !ferrogen::job::partial_path(&out).exists());
    // without --offload-dir the disk tier is the temp directory, as --help says (not 0 B)
    let tmp = dir.path().join("tmp");
    let o = Command::new(example_binary("score"))
        .args(job_args(&model, &input, &out))
        .args(["--device", "cpu", "--cpu-mem", "10kB"])
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("disk") && !stderr(&o).contains("disk 0 B"),
        "{}",
        stderr(&o)
    );
    assert!(!tmp.exists(), "the temp directory it made was left behind");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let o = cpu("64MiB", &file);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a directory"), "{}", stderr(&o));
}

/// A NaN in one norm weight: every device and the reference answer with error records
/// (status 3), never finite numbers; `--check-weights` names the tensor before any work.
#[test]
fn non_finite_numbers_are_errors() {
    let copy = copy_fixture(FIXTURE);
    let tensor = "model.layers.0.input_layernorm.weight";
    edit_safetensors(copy.path(), |h, data| {
        let at = h[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
        // bf16 NaN, little-endian, in element 3
        assert_eq!(h[tensor]["dtype"], "BF16");
        data[at + 6..at + 8].copy_from_slice(&[0xc0, 0x7f]);
    });
    let dir = tempfile::tempdir().unwrap();
    let input = token_input(dir.path(), "in.jsonl", 4);
    for (i, backend) in [
        &["--backend", "reference"][..],
        &["--device", "cpu"],
        &["--device", "wgpu"],
    ]
    .iter()
    .enumerate()
    {
        let out = dir.path().join(format!("out{i}.jsonl"));
        let mut a = vec![
            "--model",
            s(copy.path()),
            "--input",
            s(&input),
            "--output",
            s(&out),
        ];
        a.extend(*backend);
        let o = run("score", &a);
        if backend.contains(&"wgpu") && stderr(&o).contains("no WebGPU") {
            continue;
        }
        assert_eq!(o.status.code(), Some(3), "{backend:?}: {}", stderr(&o));
        for l in lines(&out) {
            assert!(
                l["error"]
                    .as_str()
                    .unwrap()
                    .contains("non-finite log-probability"),
                "{backend:?}: {l}"
            );
        }
    }
    let out = dir.path().join("checked.jsonl");
    let o = run_job("score", copy.path(), &input, &out, &["--check-weights"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains(tensor) && stderr(&o).contains("NaN"),
        "{}",
        stderr(&o)
    );
    // generation: an error record, not end-of-text tokens
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": \"a\", \"tokens\": [5, 6, 7], \"max_tokens\": 4}\n",
    )
    .unwrap();
    let out = dir.path().join("gen.jsonl");
    let o = run_job(
        "generate",
        copy.path(),
        &prompts,
        &out,
        &["--device", "cpu"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(lines(&out)[0]["error"]
        .as_str()
        .unwrap()
        .contains("non-finite"));
}

/// On a model with a context of 64, records (3 tokens, max 5), (40, max 2) and (2, max 30)
/// each fit and all are answered; one that does not fit fails alone, naming the context.
#[test]
fn a_generation_record_fails_only_for_itself() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let record = |id: &str, len: usize, max: usize| {
        let tokens: Vec<String> = (0..len).map(|i| (i % 200 + 3).to_string()).collect();
        format!(
            "{{\"id\": \"{id}\", \"tokens\": [{}], \"max_tokens\": {max}}}\n",
            tokens.join(",")
        )
    };
    let text = [
        record("a", 3, 5),
        record("b", 40, 2),
        record("c", 2, 30),
        record("big", 60, 10),
    ];
    std::fs::write(&prompts, text.concat()).unwrap();
    let out = dir.path().join("out.jsonl");
    let o = run_job(
        "generate",
        &fixture_dir(FIXTURE),
        &prompts,
        &out,
        &["--device", "cpu"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let got = lines(&out);
    for (g, (id, max)) in got.iter().zip([("a", 5), ("b", 2), ("c", 30)]) {
        assert_eq!(g["id"], id);
        assert!(g.get("error").is_none(), "{g}");
        assert!(g["tokens"].as_array().unwrap().len() <= max);
    }
    let big = got[3]["error"].as_str().unwrap();
    assert!(big.contains("context of 64"), "{big}");
    // the flag's default too large for the context: named before any work
    let o = run_job(
        "generate",
        &fixture_dir(FIXTURE),
        &prompts,
        &dir.path().join("o2.jsonl"),
        &["--max-tokens", "1000000000", "--cpu-mem", "64MiB"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--max-tokens") && stderr(&o).contains("context of 64"),
        "{}",
        stderr(&o)
    );
}

/// A byte order mark does not spoil the first record; numeric ids are echoed exactly as
/// written (past 2^64, `-0`, `1.50`) and stay distinct from those they would round to.
#[test]
fn bom_and_ids_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let ids = [
        "18446744073709551617",
        "18446744073709551616",
        "-0",
        "0",
        "1.50",
        "1.5",
    ];
    let mut text = String::from("\u{feff}");
    for id in ids {
        text.push_str(&format!("{{\"id\": {id}, \"tokens\": [5, 6, 7]}}\n"));
    }
    std::fs::write(&input, text).unwrap();
    let out = dir.path().join("out.jsonl");
    let o = run_job("score", &fixture_dir(FIXTURE), &input, &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let written = std::fs::read_to_string(&out).unwrap();
    for (line, id) in written.lines().zip(ids) {
        assert!(
            line.starts_with(&format!("{{\"id\":{id},")),
            "{line} for {id}"
        );
        assert!(!line.contains("error"), "{line}");
    }
    // and they resume and merge as written
    let o = run_job("score", &fixture_dir(FIXTURE), &input, &out, &["--resume"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), written);
}

/// Flags with wrong values say what is wrong with them.
#[test]
fn bad_flags_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let input = token_input(dir.path(), "in.jsonl", 2);
    let out = dir.path().join("out.jsonl");
    let model = fixture_dir(FIXTURE);
    let base = job_args(&model, &input, &out);
    for (extra, needle) in [
        (&["--cpu-mem", "-5MiB"][..], "negative"),
        (&["--progress-every", "0"], "more than 0"),
    ] {
        let mut a = base.to_vec();
        a.extend(extra);
        let o = run("score", &a);
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains(needle), "{extra:?}: {}", stderr(&o));
    }
    let started = std::time::Instant::now();
    let o = run("calibrate", &["--output", s(dir.path()), "--quick"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is a directory"), "{}", stderr(&o));
    assert!(started.elapsed().as_secs() < 5, "refused before measuring");
}

/// A write that fails for a full disk (here: a file-size limit, `ulimit -f`, with SIGXFSZ
/// ignored so that the write fails instead of killing the process) leaves no partial offload
/// file behind, and the job says what failed.
#[test]
fn a_full_disk_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = token_input(dir.path(), "in.jsonl", 3);
    let offload = dir.path().join("offload");
    std::fs::create_dir(&offload).unwrap();
    let out = dir.path().join("out.jsonl");
    let policy = disk_policy(dir.path(), "disk.toml", 0);
    let script = format!(
        "trap '' XFSZ; ulimit -f 64; exec {} --model {} --input {} --output {} --device cpu \
         --policy {} --offload-dir {}",
        s(&example_binary("score")),
        s(&fixture_dir(FIXTURE)),
        s(&input),
        s(&out),
        s(&policy),
        s(&offload)
    );
    let o = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("ferrogen-weights"), "{}", stderr(&o));
    let left: Vec<_> = std::fs::read_dir(&offload)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!out.exists() && !ferrogen::job::partial_path(&out).exists());
}
