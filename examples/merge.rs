//! Joins the outputs of a sharded `score` job (`--shard K/N`, or a Slurm or Kubernetes job
//! array) into one output in input order.
//!
//! ```text
//! cargo run --release --example merge -- --input IN.jsonl --output OUT.jsonl SHARD0.jsonl SHARD1.jsonl ...
//! ```
//! The shard outputs are given in shard order (`K = 0..N`). A record missing from its shard's
//! output (a shard that has not finished), answered twice, or a shard output of another input
//! is an error naming the file and the record, and no output is written. Exit status: 0 merged,
//! 2 an error.

mod common;

use std::io::BufReader;
use std::process::ExitCode;

use common::{required, Flags};
use ferrogen::score::{merge_shards, read_ids};
use ferrogen::{Error, Result};

fn run() -> Result<()> {
    let (mut input, mut output, mut shards) = (None, None, Vec::new());
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--input" => input = Some(flags.value(&flag)?),
            "--output" => output = Some(flags.value(&flag)?),
            "-h" | "--help" => return Err(Error::invalid(
                "--help",
                "usage: merge --input IN.jsonl --output OUT.jsonl SHARD0.jsonl SHARD1.jsonl ...",
            )),
            other if other.starts_with("--") => {
                return Err(Error::invalid(other, "unknown flag (try --help)"))
            }
            path => shards.push(path.to_string()),
        }
    }
    let input: String = required(input, "--input")?;
    let output: String = required(output, "--output")?;
    let file = std::fs::File::open(&input).map_err(|e| Error::io(&input, e))?;
    let ids = read_ids(BufReader::new(file), &input)?;
    let texts = shards
        .iter()
        .map(|p| {
            Ok((
                p.clone(),
                std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut merged = Vec::new();
    merge_shards(&ids, &texts, &mut merged)?;
    std::fs::write(&output, merged).map_err(|e| Error::io(&output, e))?;
    eprintln!(
        "merged {} records from {} shards into {output}",
        ids.len(),
        shards.len()
    );
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
