//! Finds the placement policy with the best predicted throughput (see README.md, "Choosing a
//! policy").
//!
//! ```text
//! cargo run --release --example policy_search -- (--model PATH | --config NAME)
//!     --hardware FILE.toml --prompt-len S --gen-len N [--compress-weight] [--compress-cache]
//!     [--json] [--save POLICY.toml] [--evaluate POLICY.toml]
//! ```
//! `--config` takes a built-in shape (opt-1.3b ... opt-175b, llama-2-7b, llama-2-70b,
//! llama-3-8b). `--evaluate` predicts a given policy instead of searching.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::{required, Flags};
use ferrogen::model::builtin::{builtin_config, BUILTIN_NAMES};
use ferrogen::model::{ModelConfig, ModelFiles};
use ferrogen::policy::{search, CostModel, HardwareProfile, Policy, SearchOptions, Workload};
use ferrogen::{Error, Result};

fn run() -> Result<()> {
    let (mut model, mut config, mut hardware) = (None, None, None);
    let (mut prompt_len, mut gen_len) = (None, None);
    let (mut json, mut save, mut evaluate) = (false, None, None);
    let mut options = SearchOptions::default();
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(flags.value(&flag)?)),
            "--config" => config = Some(flags.value(&flag)?),
            "--hardware" => hardware = Some(PathBuf::from(flags.value(&flag)?)),
            "--prompt-len" => prompt_len = Some(flags.positive(&flag)?),
            "--gen-len" => gen_len = Some(flags.positive(&flag)?),
            "--compress-weight" => options.compress_weight = true,
            "--compress-cache" => options.compress_cache = true,
            "--json" => json = true,
            "--save" => save = Some(PathBuf::from(flags.value(&flag)?)),
            "--evaluate" => evaluate = Some(PathBuf::from(flags.value(&flag)?)),
            other => return Err(Error::invalid(other, "unknown flag (see the file's doc)")),
        }
    }
    let (config, model_name): (ModelConfig, String) = match (model, config) {
        (Some(path), None) => (ModelFiles::open(&path)?.config, path.display().to_string()),
        (None, Some(name)) => (
            builtin_config(&name).ok_or_else(|| {
                Error::invalid(
                    "--config",
                    format!("`{name}`: choose one of {}", BUILTIN_NAMES.join(", ")),
                )
            })?,
            name,
        ),
        _ => {
            return Err(Error::invalid(
                "--model/--config",
                "give exactly one of them",
            ))
        }
    };
    let hardware = HardwareProfile::from_toml_file(&required(hardware, "--hardware")?)?;
    let workload = Workload {
        prompt_len: required(prompt_len, "--prompt-len")?,
        gen_len: required(gen_len, "--gen-len")?,
    };
    let model = CostModel::new(&config, hardware, workload);
    let started = Instant::now();
    let (policy, prediction, lps) = match evaluate {
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
    if let Some(path) = save {
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
    if json {
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

fn main() -> std::process::ExitCode {
    common::exit_status(run())
}
