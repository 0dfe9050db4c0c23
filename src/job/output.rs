//! An output's files: never an input ([`refuse_overwriting_inputs`]), one writer
//! ([`OutputLock`]), answers in `OUT.partial` until the end ([`JobOutput`]), and the record of
//! what they depend on ([`JobMeta`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Whether `a` and `b` name the same file (same device and inode, through links). Paths that
/// do not exist name no file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => same_inode(&x, &y),
        _ => false,
    }
}

#[cfg(unix)]
fn same_inode(x: &std::fs::Metadata, y: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    x.dev() == y.dev() && x.ino() == y.ino()
}

#[cfg(not(unix))]
fn same_inode(x: &std::fs::Metadata, y: &std::fs::Metadata) -> bool {
    x.len() == y.len() && x.modified().ok() == y.modified().ok() && x.file_type() == y.file_type()
}

/// Refuses an `output` (named by `flag`) that is one of `inputs` (`(flag, path)`: a file, or
/// a model directory and every file in it), or a directory. Checked before anything is opened
/// for writing, so that a job never empties what it reads.
pub fn refuse_overwriting_inputs(
    flag: &str,
    output: &Path,
    inputs: &[(&str, &Path)],
) -> Result<()> {
    if output.is_dir() {
        return Err(Error::invalid(
            flag,
            format!("`{}` is a directory: name a file", output.display()),
        ));
    }
    // the partial answers and the lock must not be inputs either
    let sidecars = [
        output.to_path_buf(),
        partial_path(output),
        lock_path(output),
    ];
    for (what, input) in inputs {
        let mut files = vec![input.to_path_buf()];
        if input.is_dir() {
            if let Ok(entries) = std::fs::read_dir(input) {
                files.extend(entries.flatten().map(|e| e.path()));
            }
        }
        for file in &files {
            if let Some(out) = sidecars.iter().find(|o| same_file(o, file)) {
                return Err(Error::invalid(
                    flag,
                    format!(
                        "`{}` is the same file as {what} `{}`: writing it would destroy it; \
                         name another output",
                        out.display(),
                        file.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `OUT.partial`: where a job's answers go until it is done.
pub fn partial_path(output: &Path) -> PathBuf {
    with_suffix(output, ".partial")
}

/// `OUT.lock`: the lock of the job writing `OUT`.
pub fn lock_path(output: &Path) -> PathBuf {
    with_suffix(output, ".lock")
}

/// `OUT.meta.json`: what a job's answers depend on.
pub fn meta_path(output: &Path) -> PathBuf {
    with_suffix(output, ".meta.json")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The lock of the one job that writes an output: `OUT.lock`, `flock`ed and holding the
/// writer's process id; removed when dropped.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    _file: File,
}

impl OutputLock {
    /// Locks `output` for this process, or fails naming the process that holds it.
    pub fn acquire(output: &Path) -> Result<Self> {
        let path = lock_path(output);
        // a lock file removed by its holder between our open and our lock is retried
        for _ in 0..8 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            if !crate::storage::offload::try_lock(&file, true) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "?" } else { holder };
                return Err(Error::invalid(
                    "--output",
                    format!(
                        "`{}` is being written by another job (process {holder}, lock `{}`): \
                         wait for it, or give another output",
                        output.display(),
                        path.display()
                    ),
                ));
            }
            let still_there = std::fs::metadata(&path)
                .ok()
                .zip(file.metadata().ok())
                .is_some_and(|(a, b)| same_inode(&a, &b));
            if !still_there {
                continue;
            }
            file.set_len(0).map_err(|e| Error::io(&path, e))?;
            write!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
            return Ok(Self { path, _file: file });
        }
        Err(Error::invalid(
            "--output",
            format!("could not lock `{}`", path.display()),
        ))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a job's answers depend on: the kind of job, the input's and the model's
/// fingerprints, and the flags that change answers. Kept beside the output
/// ([`meta_path`]); `--resume` refuses to continue an output made with other ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMeta {
    /// `score` or `generate`.
    pub job: String,
    /// The input's fingerprint ([`fingerprint_file`]).
    pub input: String,
    /// The model's fingerprint ([`crate::model::fingerprint`]).
    pub model: String,
    /// Flags that change answers, by name, as given.
    pub flags: BTreeMap<String, String>,
}

impl JobMeta {
    /// Refuses to resume `output` when its meta file records other work; a missing meta file
    /// (an output of an older ferrogen) is accepted.
    pub fn check_resume(&self, output: &Path) -> Result<()> {
        let path = meta_path(output);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let Ok(old) = serde_json::from_str::<JobMeta>(&text) else {
            return Err(Error::invalid(
                "--resume",
                format!(
                    "`{}` is not a job's record: delete it to resume anyway",
                    path.display()
                ),
            ));
        };
        let mut diffs = Vec::new();
        if old.job != self.job {
            diffs.push(format!("it is a `{}` job's output", old.job));
        }
        if old.input != self.input {
            diffs.push("the input file has changed".to_string());
        }
        if old.model != self.model {
            diffs.push("the model is another (or has changed)".to_string());
        }
        let keys: std::collections::BTreeSet<&String> =
            old.flags.keys().chain(self.flags.keys()).collect();
        for k in keys {
            let (a, b) = (old.flags.get(k), self.flags.get(k));
            if a != b {
                let show = |v: Option<&String>| v.map_or("unset".to_string(), |v| v.clone());
                diffs.push(format!("{k} was {}, now {}", show(a), show(b)));
            }
        }
        if diffs.is_empty() {
            return Ok(());
        }
        Err(Error::invalid(
            "--resume",
            format!(
                "`{}` was made by other work: {}; resume with the same input, model and flags, \
                 or drop --resume to start over",
                output.display(),
                diffs.join("; ")
            ),
        ))
    }

    /// Writes the meta file beside `output` (whole or not at all: a new file renamed over).
    pub fn write(&self, output: &Path) -> Result<()> {
        let path = meta_path(output);
        let tmp = with_suffix(&path, &format!(".{}.tmp", std::process::id()));
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid("job meta", e.to_string()))?;
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(&path, e)
        })
    }
}

/// A fingerprint of a file's bytes (xxh3, 64 bits, in hex), read in pieces.
pub fn fingerprint_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:016x}", hasher.digest()))
}

/// A fingerprint of bytes held in memory, as [`fingerprint_file`] gives for a file of them.
pub fn fingerprint_bytes(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Where a job's answers go: `OUT.partial` under `OUT`'s lock until [`JobOutput::finish`]
/// renames it to `OUT`. A job never truncates a file it did not make.
#[derive(Debug)]
pub struct JobOutput {
    output: PathBuf,
    partial: PathBuf,
    _lock: OutputLock,
}

impl JobOutput {
    /// Locks `output` and finds where its answers go. Starting anew, an `OUT.partial` left by
    /// an interrupted run is refused (resume it or delete it). Resuming, the answers so far
    /// are in `OUT.partial`, or in a finished `OUT`, which is renamed back to `OUT.partial`.
    pub fn prepare(output: &Path, resume: bool) -> Result<Self> {
        let lock = OutputLock::acquire(output)?;
        let partial = partial_path(output);
        if resume {
            if !partial.exists() && output.exists() {
                std::fs::rename(output, &partial).map_err(|e| Error::io(output, e))?;
            }
        } else if partial.exists() {
            return Err(Error::invalid(
                "--output",
                format!(
                    "`{}` holds the answers of an interrupted run: continue it with --resume, \
                     or delete it to start over",
                    partial.display()
                ),
            ));
        }
        Ok(Self {
            output: output.to_path_buf(),
            partial,
            _lock: lock,
        })
    }

    /// The file the answers are written to (`OUT.partial`).
    pub fn partial(&self) -> &Path {
        &self.partial
    }

    /// Opens the partial file: created anew, or appended to when resuming.
    pub fn open(&self, resume: bool) -> Result<File> {
        let mut options = OpenOptions::new();
        if resume {
            options.create(true).append(true);
        } else {
            options.create_new(true).write(true);
        }
        options
            .open(&self.partial)
            .map_err(|e| Error::io(&self.partial, e))
    }

    /// The job is done: the answers are synced and renamed to the output.
    pub fn finish(self) -> Result<()> {
        if let Ok(f) = File::open(&self.partial) {
            f.sync_all().map_err(|e| Error::io(&self.partial, e))?;
        }
        std::fs::rename(&self.partial, &self.output).map_err(|e| Error::io(&self.output, e))
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_that_are_inputs_are_refused_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        std::fs::write(&input, "{\"id\":1,\"text\":\"a b\"}\n").unwrap();
        let link = dir.path().join("link.jsonl");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&input, &link).unwrap();
        let hard = dir.path().join("hard.jsonl");
        std::fs::hard_link(&input, &hard).unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let inputs = [
            ("the input", input.as_path()),
            ("the model", model.as_path()),
        ];
        for out in [&input, &hard, &model.join("config.json")] {
            let e = refuse_overwriting_inputs("--output", out, &inputs).unwrap_err();
            assert!(e.to_string().contains("same file"), "{e}");
        }
        #[cfg(unix)]
        assert!(refuse_overwriting_inputs("--output", &link, &inputs).is_err());
        // OUT.partial being the input is refused too
        let out = dir.path().join("in.jsonl.partial");
        std::fs::rename(&input, &out).unwrap();
        let e = refuse_overwriting_inputs(
            "--output",
            &dir.path().join("in.jsonl"),
            &[("the input", out.as_path())],
        );
        assert!(e.is_err());
        assert!(refuse_overwriting_inputs("--output", &model, &inputs).is_err());
        assert!(
            refuse_overwriting_inputs("--output", &dir.path().join("new.jsonl"), &inputs).is_ok()
        );
        assert_eq!(
            std::fs::read(&out).unwrap().len(),
            22,
            "nothing was written"
        );
    }

    #[test]
    fn one_job_per_output_and_the_holder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let first = JobOutput::prepare(&out, false).unwrap();
        let e = JobOutput::prepare(&out, true).unwrap_err().to_string();
        assert!(
            e.contains(&format!("process {}", std::process::id())),
            "{e}"
        );
        let mut f = first.open(false).unwrap();
        writeln!(f, "{{\"id\":1}}").unwrap();
        drop(f);
        assert!(!out.exists(), "answers stay in OUT.partial until the end");
        first.finish().unwrap();
        assert!(out.exists() && !partial_path(&out).exists() && !lock_path(&out).exists());
        // resuming a finished output continues it in OUT.partial
        let again = JobOutput::prepare(&out, true).unwrap();
        assert!(!out.exists() && again.partial().exists());
        drop(again);
        // starting anew over an interrupted run's answers is refused
        let e = JobOutput::prepare(&out, false).unwrap_err().to_string();
        assert!(e.contains("--resume"), "{e}");
    }

    #[test]
    fn resume_names_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let meta = JobMeta {
            job: "score".into(),
            input: "a".into(),
            model: "m".into(),
            flags: [("--per-token".to_string(), "false".to_string())].into(),
        };
        meta.check_resume(&out).unwrap();
        meta.write(&out).unwrap();
        meta.check_resume(&out).unwrap();
        let mut other = meta.clone();
        other.flags.insert("--per-token".into(), "true".into());
        other.model = "n".into();
        let e = other.check_resume(&out).unwrap_err().to_string();
        assert!(
            e.contains("--per-token was false, now true") && e.contains("model"),
            "{e}"
        );
    }
}
