//! The `ferrogen` command line (the `cli` feature, on by default): `ferrogen score`,
//! `generate`, `merge`, `policy-search` and `calibrate`, each a thin program over the library.
//! `cargo install --path .` installs it; `ferrogen <command> --help` lists each one's flags.
//!
//! Exit statuses: 0 done, 2 an error before or outside the records (a bad flag, a file that
//! cannot be read), 3 a job whose records failed in part, 128 + N after signal N.

pub mod common;

mod calibrate;
mod generate;
mod merge;
mod policy_search;
mod score;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Throughput-oriented LLM inference with limited memory: weights, KV cache and activations
/// placed across GPU, CPU RAM and disk.
#[derive(Parser, Debug)]
#[command(name = "ferrogen", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Scores a JSONL dataset: per-record log-likelihoods (and per-token ones), resumable,
    /// sharded across a job array.
    Score(score::Args),
    /// Generates for prompts given as flags or for a JSONL file of records.
    Generate(generate::Args),
    /// Joins the outputs of a sharded job into one output in input order.
    Merge(merge::Args),
    /// Searches for the best placement policy for a model on a machine (the cost model and
    /// the LP search, no model weights needed).
    PolicySearch(policy_search::Args),
    /// Measures this machine into a hardware profile for the policy search.
    Calibrate(calibrate::Args),
}

/// Runs the command line on this process's arguments.
pub fn main() -> ExitCode {
    run(Cli::parse())
}

/// Runs the subcommand `name` as the program of that name that predates the `ferrogen`
/// binary (`examples/score.rs`, ...): its arguments are this process's, its usage line names
/// it. An unknown name is an error (status 2).
pub fn main_as(name: &str) -> ExitCode {
    match name {
        "score" => score::main(score::Args::parse()),
        "generate" => generate::main(generate::Args::parse()),
        "merge" => merge::main(merge::Args::parse()),
        "policy_search" => policy_search::main(policy_search::Args::parse()),
        "calibrate" => calibrate::main(calibrate::Args::parse()),
        _ => {
            eprintln!("error: no command `{name}`");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Score(args) => score::main(args),
        Command::Generate(args) => generate::main(args),
        Command::Merge(args) => merge::main(args),
        Command::PolicySearch(args) => policy_search::main(args),
        Command::Calibrate(args) => calibrate::main(args),
    }
}
