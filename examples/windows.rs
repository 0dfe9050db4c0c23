//! Cuts a text into token windows for `score`: JSONL records `{"id", "tokens"}` of `--window`
//! tokens each, taken back to back from the start of the tokenized text (after `--skip`
//! tokens), as llama.cpp's `llama-perplexity -c WINDOW --chunks COUNT` cuts its input, so that
//! both score the same tokens.
//!
//! ```text
//! cargo run --release --example windows -- --model PATH --text FILE --window 512 --count 8
//!     [--skip 0] > windows.jsonl
//! ```

use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use ferrogen::arch::ModelFiles;
use ferrogen::cli::common::{exit_status, positive};
use ferrogen::{Error, Result};

/// Cuts a text into token windows for `score`, as `llama-perplexity` cuts its input.
#[derive(Parser, Debug)]
#[command(name = "windows")]
struct Cli {
    /// The model whose tokenizer cuts the text.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// The text file.
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Tokens per window.
    #[arg(long, value_name = "N", default_value = "512", value_parser = positive)]
    window: usize,
    /// How many windows.
    #[arg(long, value_name = "N", default_value = "8", value_parser = positive)]
    count: usize,
    /// Tokens to skip at the start of the text.
    #[arg(long, value_name = "N", default_value_t = 0)]
    skip: usize,
}

fn run(cli: Cli) -> Result<()> {
    let Cli {
        model,
        text,
        window,
        count,
        skip,
    } = cli;
    let files = ModelFiles::open(&model)?;
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
    exit_status(run(Cli::parse()))
}
