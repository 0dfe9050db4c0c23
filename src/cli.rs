//! Command-line flags for the example binaries: `--name value` pairs and bare switches, with
//! errors that name the flag.

use std::collections::VecDeque;
use std::str::FromStr;

use crate::error::{Error, Result};

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
    }
}
