//! Greedy generation with the CPU reference.
//!
//! `cargo run --release --example generate -- --model PATH --prompt "The capital of France is"
//!  [--max-new-tokens 16]`

use std::path::PathBuf;
use std::process::ExitCode;

use ferrogen::cpu::ReferenceModel;
use ferrogen::model::ModelFiles;
use ferrogen::{Error, Result};

fn run() -> Result<()> {
    let mut model = None;
    let mut prompt = None;
    let mut max_new = 16usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| Error::invalid(&flag, "expects a value"))
        };
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--prompt" => prompt = Some(value()?),
            "--max-new-tokens" => {
                max_new = value()?
                    .parse()
                    .map_err(|_| Error::invalid("--max-new-tokens", "expects a whole number"))?
            }
            other => return Err(Error::invalid(other, "unknown flag (see the file's doc)")),
        }
    }
    let model = model.ok_or_else(|| Error::invalid("--model", "is required"))?;
    let prompt = prompt.ok_or_else(|| Error::invalid("--prompt", "is required"))?;
    let files = ModelFiles::open(&model)?;
    let tokenizer = files.tokenizer()?;
    let reference = ReferenceModel::load(&files)?;
    let ids = tokenizer.encode(&prompt)?;
    let out = reference.generate_greedy(&[&ids], max_new, files.config.eos_token_id())?;
    println!("{}{}", prompt, tokenizer.decode(&out[0])?);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
