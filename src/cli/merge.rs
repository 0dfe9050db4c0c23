//! Joins the outputs of a sharded `score` job (`--shard K/N`, or a Slurm or Kubernetes job
//! array) into one output in input order.
//!
//! ```text
//! ferrogen merge --input IN.jsonl --output OUT.jsonl SHARD0.jsonl SHARD1.jsonl ...
//! ```
//! The shard outputs are given in shard order (`K = 0..N`). A record missing from its shard's
//! output (a shard that has not finished), answered twice, or a shard output of another input
//! is an error naming the file and the record, and no output is written. Exit status: 0 merged,
//! 2 an error.

use std::io::BufReader;
use std::process::ExitCode;

use crate::job::{merge_shards, read_ids};
use crate::{Error, Result};
use clap::Parser;

/// Joins the outputs of a sharded job into one output in input order.
#[derive(Parser, Debug)]
#[command(name = "merge")]
pub(crate) struct Args {
    /// The job's input (the order and ids of its records).
    #[arg(long, value_name = "IN.jsonl")]
    input: String,
    /// Where the merged output goes (written only when every record is there once).
    #[arg(long, value_name = "OUT.jsonl")]
    output: String,
    /// The shards' outputs, in shard order (K = 0..N).
    #[arg(value_name = "SHARD.jsonl", required = true)]
    shards: Vec<String>,
}

fn run(cli: Args) -> Result<()> {
    let Args {
        input,
        output,
        shards,
    } = cli;
    // the merged output must not be what it is made of
    let mut inputs = vec![("the input", std::path::Path::new(&input))];
    inputs.extend(
        shards
            .iter()
            .map(|s| ("a shard output", std::path::Path::new(s))),
    );
    crate::job::refuse_overwriting_inputs("--output", output.as_ref(), &inputs)?;
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
    // whole or not at all: written beside the output under the output's lock, then renamed
    let out = crate::job::JobOutput::prepare(output.as_ref(), false)?;
    let mut file = out.open(false)?;
    std::io::Write::write_all(&mut file, &merged).map_err(|e| Error::io(out.partial(), e))?;
    drop(file);
    out.finish()?;
    eprintln!(
        "merged {} records from {} shards into {output}",
        ids.len(),
        shards.len()
    );
    Ok(())
}

pub(crate) fn main(args: Args) -> ExitCode {
    super::common::exit_status(run(args))
}
