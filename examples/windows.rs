//! Cuts a text into token windows for `score`: JSONL records `{"id", "tokens"}` of `--window`
//! tokens each, taken back to back from the start of the tokenized text (after `--skip`
//! tokens), as llama.cpp's `llama-perplexity -c WINDOW --chunks COUNT` cuts its input, so that
//! both score the same tokens.
//!
//! ```text
//! cargo run --release --example windows -- --model PATH --text FILE --window 512 --count 8
//!     [--skip 0] > windows.jsonl
//! ```

mod common;

use std::io::Write;
use std::path::PathBuf;

use common::{exit_status, required, Flags};
use ferrogen::model::ModelFiles;
use ferrogen::{Error, Result};

fn run() -> Result<()> {
    let (mut model, mut text) = (None, None);
    let (mut window, mut count, mut skip) = (512usize, 8usize, 0usize);
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(flags.value(&flag)?)),
            "--text" => text = Some(PathBuf::from(flags.value(&flag)?)),
            "--window" => window = flags.positive(&flag)?,
            "--count" => count = flags.positive(&flag)?,
            "--skip" => skip = flags.parse(&flag)?,
            other => return Err(Error::invalid(other, "unknown flag")),
        }
    }
    let files = ModelFiles::open(&required(model, "--model")?)?;
    let text = required(text, "--text")?;
    let content = std::fs::read_to_string(&text).map_err(|e| Error::io(&text, e))?;
    let ids = files.tokenizer()?.encode(&content)?;
    let need = skip + window * count;
    if ids.len() < need {
        return Err(Error::invalid(
            "--count",
            format!(
                "{} has {} tokens; {count} windows of {window} after {skip} need {need}",
                text.display(),
                ids.len()
            ),
        ));
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (i, w) in ids[skip..need].chunks(window).enumerate() {
        let line = serde_json::json!({ "id": format!("window-{i}"), "tokens": w });
        writeln!(out, "{line}").map_err(|e| Error::io("stdout", e))?;
    }
    out.flush().map_err(|e| Error::io("stdout", e))
}

fn main() -> std::process::ExitCode {
    exit_status(run())
}
