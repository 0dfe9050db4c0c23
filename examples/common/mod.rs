//! Command-line flags for the example binaries: `--name value` pairs and bare switches, with
//! errors that name the flag. Each example compiles its own copy and uses part of it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::str::FromStr;

use ferrogen::{Error, Result};

/// The remaining command-line arguments.
pub struct Flags {
    args: VecDeque<String>,
}

impl Flags {
    /// The process's arguments after the program name.
    pub fn from_env() -> Self {
        Self::new(std::env::args().skip(1))
    }

    /// Flags from any list of arguments.
    pub fn new(args: impl IntoIterator<Item = String>) -> Self {
        Self {
            args: args.into_iter().collect(),
        }
    }

    /// The next flag, or `None` at the end.
    pub fn next_flag(&mut self) -> Option<String> {
        self.args.pop_front()
    }

    /// The value that follows `flag`.
    pub fn value(&mut self, flag: &str) -> Result<String> {
        self.args
            .pop_front()
            .ok_or_else(|| Error::invalid(flag, "expects a value"))
    }

    /// The value that follows `flag`, parsed (e.g. as a number).
    pub fn parse<T: FromStr>(&mut self, flag: &str) -> Result<T> {
        let text = self.value(flag)?;
        text.parse().map_err(|_| {
            Error::invalid(
                flag,
                format!("`{text}` is not a valid {}", std::any::type_name::<T>()),
            )
        })
    }

    /// Like [`Flags::parse`] for a count that must be at least 1.
    pub fn positive(&mut self, flag: &str) -> Result<usize> {
        match self.parse::<usize>(flag)? {
            0 => Err(Error::invalid(flag, "must be at least 1")),
            n => Ok(n),
        }
    }
}

/// The exit status of an example's `run()`: 0, or the error on stderr and status 2.
pub fn exit_status(result: Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The value of a required flag, or an error naming it.
pub fn required<T>(value: Option<T>, flag: &str) -> Result<T> {
    value.ok_or_else(|| Error::invalid(flag, "is required"))
}

/// The median of `v` (NaN when empty): benchmarks quote medians of several runs.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A comma-separated list of numbers, e.g. `--sizes 2048,4096`.
pub fn numbers(text: &str, flag: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| Error::invalid(flag, format!("`{s}` is not a number")))
        })
        .collect()
}

/// The weight formats the kernel benchmarks time: name, bits per code (32 = plain f32), codes
/// per scale group (Q4_0 and Q4_1 share one kernel).
pub const WEIGHT_FORMATS: [(&str, u32, usize); 5] = [
    ("f32", 32, 0),
    ("f16", 16, 64),
    ("Q8_0", 8, 32),
    ("Q4_0/Q4_1", 4, 32),
    ("FlexGen 4-bit", 4, 64),
];

/// A JSONL job's input, opened for its run: the records this process answers (its shard's,
/// past those an interrupted run's output already answers when resuming).
pub struct JobInput {
    /// The input, from its start (read twice: stdin is held in memory).
    pub reader: Box<dyn std::io::Read>,
    /// This process's shard (the flag, else the scheduler's environment).
    pub shard: Option<ferrogen::score::Shard>,
    /// Records of the shard already answered in the output (0 unless resuming).
    pub answered: usize,
}

/// Opens `input` (`-`: stdin), checks its ids are unique (an error before any work), finds
/// this process's shard (`shard`, else Slurm's or Kubernetes' environment, `shards` giving an
/// Indexed Job's count) and, with `resume`, how many of its records `output` answers already
/// (cutting a torn last line).
pub fn open_job_input(
    input: &str,
    output: &str,
    shard: Option<ferrogen::score::Shard>,
    shards: Option<usize>,
    resume: bool,
) -> Result<JobInput> {
    use ferrogen::score::{read_ids, resume_point, Shard};
    use std::io::Read;
    let (ids, reader): (_, Box<dyn Read>) = if input == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io("<stdin>", e))?;
        let ids = read_ids(bytes.as_slice(), "<stdin>")?;
        (ids, Box::new(std::io::Cursor::new(bytes)))
    } else {
        let open = || std::fs::File::open(input).map_err(|e| Error::io(input, e));
        (
            read_ids(std::io::BufReader::new(open()?), input)?,
            Box::new(open()?),
        )
    };
    let shard = match shard {
        Some(s) => Some(s),
        None => Shard::from_env(|v| std::env::var(v).ok(), shards)?,
    };
    let ids: Vec<_> = match shard {
        Some(s) => {
            eprintln!(
                "shard {} of {}: every {}th record from record {}",
                s.index, s.count, s.count, s.index
            );
            ids.into_iter()
                .enumerate()
                .filter(|(i, _)| s.takes(*i))
                .map(|(_, id)| id)
                .collect()
        }
        None => ids,
    };
    let answered = if resume {
        if output == "-" {
            return Err(Error::invalid("--resume", "needs --output to be a file"));
        }
        let answered = resume_point(output.as_ref(), &ids)?;
        eprintln!(
            "resume: {answered} of {} records already answered in {output}",
            ids.len()
        );
        answered
    } else {
        0
    };
    Ok(JobInput {
        reader,
        shard,
        answered,
    })
}

/// A job's output: stdout for `-`, else the file, created anew, or appended to when resuming.
pub fn open_output(path: &str, resume: bool) -> Result<Box<dyn std::io::Write>> {
    Ok(if path == "-" {
        Box::new(std::io::stdout())
    } else if resume {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        Box::new(file.map_err(|e| Error::io(path, e))?)
    } else {
        Box::new(std::fs::File::create(path).map_err(|e| Error::io(path, e))?)
    })
}

/// Prints the engine's device and where the policy put the weights, cache and activations
/// (on the CPU device, whose one memory is RAM, as RAM and disk).
pub fn print_placement(engine: &ferrogen::Engine) {
    use ferrogen::format_size;
    let w = engine.weight_bytes();
    eprintln!("device: {}", engine.device());
    let p = engine.policy();
    let reused = if engine.reused_offload() {
        " (offload file reused)"
    } else {
        ""
    };
    let overlap = if p.overlap { "" } else { ", overlap off" };
    if engine.on_host() {
        eprintln!(
            "policy: gbs {} x nb {}, weights {}/{} RAM/disk{reused}, cache {:.0}% RAM, \
             activations {:.0}% RAM{overlap}",
            p.gpu_batch_size,
            p.num_gpu_batches,
            format_size(w[0] + w[1]),
            format_size(w[2]),
            p.cache_gpu_percent + p.cache_cpu_percent,
            p.act_gpu_percent + p.act_cpu_percent,
        );
    } else {
        eprintln!(
            "policy: gbs {} x nb {}, weights {}/{}/{} GPU/CPU/disk{reused}, cache \
             {:.0}%/{:.0}% GPU/CPU, activations {:.0}%/{:.0}% GPU/CPU{overlap}",
            p.gpu_batch_size,
            p.num_gpu_batches,
            format_size(w[0]),
            format_size(w[1]),
            format_size(w[2]),
            p.cache_gpu_percent,
            p.cache_cpu_percent,
            p.act_gpu_percent,
            p.act_cpu_percent,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_name_themselves() {
        let mut f = Flags::new(["--n", "3", "--m", "x", "--k"].map(String::from));
        assert_eq!(f.next_flag().as_deref(), Some("--n"));
        assert_eq!(f.positive("--n").unwrap(), 3);
        f.next_flag();
        let e = f.parse::<usize>("--m").unwrap_err().to_string();
        assert!(e.contains("--m") && e.contains("`x`"), "{e}");
        f.next_flag();
        assert!(f
            .value("--k")
            .unwrap_err()
            .to_string()
            .contains("expects a value"));
        assert!(required::<u8>(None, "--model").is_err());
        assert_eq!(numbers("1, 8,64", "--rows").unwrap(), [1, 8, 64]);
        assert!(numbers("1,x", "--rows")
            .unwrap_err()
            .to_string()
            .contains("--rows"));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!(median(Vec::new()).is_nan());
    }
}
