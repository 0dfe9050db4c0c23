//! Greedy generation with the CPU reference.
//!
//! `cargo run --release --example generate -- --model PATH --prompt "The capital of France is"
//!  [--max-new-tokens 16]`

use std::path::PathBuf;

use ferrogen::cli::{required, Flags};
use ferrogen::cpu::ReferenceModel;
use ferrogen::model::ModelFiles;
use ferrogen::{Error, Result};

fn run() -> Result<()> {
    let (mut model, mut prompt, mut max_new) = (None, None, 16usize);
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(flags.value(&flag)?)),
            "--prompt" => prompt = Some(flags.value(&flag)?),
            "--max-new-tokens" => max_new = flags.parse(&flag)?,
            other => return Err(Error::invalid(other, "unknown flag (see the file's doc)")),
        }
    }
    let model = required(model, "--model")?;
    let prompt = required(prompt, "--prompt")?;
    let files = ModelFiles::open(&model)?;
    let tokenizer = files.tokenizer()?;
    let reference = ReferenceModel::load(&files)?;
    let ids = tokenizer.encode(&prompt)?;
    let out = reference.generate_greedy(&[&ids], max_new, files.config.eos_token_id())?;
    println!("{}{}", prompt, tokenizer.decode(&out[0])?);
    Ok(())
}

fn main() -> std::process::ExitCode {
    ferrogen::cli::exit_status(run())
}
