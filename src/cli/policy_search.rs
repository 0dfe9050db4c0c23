//! Finds the placement policy with the best predicted throughput (see README.md, "Choosing a
//! policy").
//!
//! ```text
//! ferrogen policy-search (--model PATH | --config NAME)
//!     --hardware FILE.toml --prompt-len S --gen-len N [--compress-weight] [--compress-cache]
//!     [--json] [--save POLICY.toml] [--evaluate POLICY.toml]
//! ```
//! `--config` takes a built-in shape (opt-1.3b ... opt-175b, llama-2-7b, llama-2-70b,
//! llama-3-8b). `--evaluate` predicts a given policy instead of searching.

use std::path::PathBuf;
use std::time::Instant;

use super::common::positive;
use crate::arch::builtin::{builtin_config, BUILTIN_NAMES};
use crate::arch::{ModelConfig, ModelFiles};
use crate::policy::{search, CostModel, HardwareProfile, Policy, SearchOptions, Workload};
use crate::{Error, Result};
use clap::Parser;

/// Finds the placement policy with the best predicted throughput for a model, a machine and a
/// workload.
#[derive(Parser, Debug)]
#[command(name = "policy_search")]
#[command(group = clap::ArgGroup::new("shape").required(true).args(["model", "config"]))]
pub(crate) struct Args {
    /// The model: a GGUF file, or a safetensors directory with config.json.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// A built-in model shape instead of a file: opt-1.3b ... opt-175b, llama-2-7b,
    /// llama-2-70b, llama-3-8b.
    #[arg(long, value_name = "NAME")]
    config: Option<String>,
    /// The machine's hardware profile (as `calibrate` writes it).
    #[arg(long, value_name = "FILE.toml")]
    hardware: PathBuf,
    /// Prompt tokens per sequence.
    #[arg(long, value_name = "S", value_parser = positive)]
    prompt_len: usize,
    /// Tokens generated per sequence.
    #[arg(long, value_name = "N", value_parser = positive)]
    gen_len: usize,
    /// Consider FlexGen 4-bit weights.
    #[arg(long)]
    compress_weight: bool,
    /// Consider a FlexGen 4-bit KV cache.
    #[arg(long)]
    compress_cache: bool,
    /// Print one JSON object instead of the policy and a table.
    #[arg(long)]
    json: bool,
    /// Also write the policy to this TOML file.
    #[arg(long, value_name = "POLICY.toml")]
    save: Option<PathBuf>,
    /// Predict this policy instead of searching.
    #[arg(long, value_name = "POLICY.toml")]
    evaluate: Option<PathBuf>,
}

fn run(cli: Args) -> Result<()> {
    let options = SearchOptions {
        compress_weight: cli.compress_weight,
        compress_cache: cli.compress_cache,
        ..SearchOptions::default()
    };
    let (config, model_name): (ModelConfig, String) = match (cli.model, cli.config) {
        (Some(path), _) => (ModelFiles::open(&path)?.config, path.display().to_string()),
        (None, Some(name)) => (
            builtin_config(&name).ok_or_else(|| {
                Error::invalid(
                    "--config",
                    format!("`{name}`: choose one of {}", BUILTIN_NAMES.join(", ")),
                )
            })?,
            name,
        ),
        (None, None) => return Err(Error::invalid("--model/--config", "give one of them")),
    };
    let hardware = HardwareProfile::from_toml_file(&cli.hardware)?;
    let workload = Workload {
        prompt_len: cli.prompt_len,
        gen_len: cli.gen_len,
    };
    let model = CostModel::new(config.shape(), hardware, workload);
    let started = Instant::now();
    let (policy, prediction, lps) = match cli.evaluate {
        Some(path) => {
            let policy = Policy::from_toml_file(&path)?;
            let prediction = model.predict(&policy);
            (policy, prediction, 0)
        }
        None => {
            let found = search(&model, &options)?;
            (found.policy, found.prediction, found.lps_solved)
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    if let Some(path) = cli.save {
        let header = format!(
            "# {} policy for {} on \"{}\", prompt {} / generate {} tokens:\n\
             # predicted {:.3} tokens/s (prefill {:.1} s, decode {:.1} s)\n",
            if lps > 0 { "searched" } else { "evaluated" },
            model_name,
            model.hardware.name,
            workload.prompt_len,
            workload.gen_len,
            prediction.throughput_tok_s,
            prediction.prefill_s,
            prediction.decode_s,
        );
        std::fs::write(&path, header + &policy.to_toml()).map_err(|e| Error::io(&path, e))?;
    }
    if cli.json {
        let out = serde_json::json!({
            "policy": policy,
            "throughput_tok_s": prediction.throughput_tok_s,
            "prefill_s": prediction.prefill_s,
            "decode_s": prediction.decode_s,
            "gpu_peak_bytes": prediction.gpu_peak_bytes,
            "cpu_peak_bytes": prediction.cpu_peak_bytes,
            "disk_bytes": prediction.disk_bytes,
            "breakdown": {"prefill": prediction.prefill, "decode": prediction.decode},
            "search_seconds": seconds,
            "lps_solved": lps,
        });
        println!("{out}");
    } else {
        println!("{}", policy.to_toml());
        print!("{}", model.predict(&policy).table(&model.hardware));
        if lps > 0 {
            println!("searched {lps} LPs in {seconds:.2} s");
        }
    }
    Ok(())
}

pub(crate) fn main(args: Args) -> std::process::ExitCode {
    super::common::exit_status(run(args))
}
