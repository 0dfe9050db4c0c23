//! The lines of a JSONL job: its shard of the input ([`Shard`], [`JobLines`]), the records'
//! ids ([`read_ids`]), where an interrupted job resumes ([`resume_point`]), and the shards'
//! outputs joined in input order ([`merge_shards`]).

use std::io::{BufRead, Write};

use serde_json::Value;

use super::RecordId;
use crate::error::{Error, Result};

/// One of `count` disjoint shards of an input: the records at positions `index`, `index +
/// count`, `index + 2 count`, ... (0-based, counting records, not blank lines). The shards of a
/// count cover the input, and [`merge_shards`] joins their outputs in input order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which shard, `0..count`.
    pub index: usize,
    /// How many shards.
    pub count: usize,
}

impl Shard {
    /// Shard `index` of `count`, or an error naming `what` unless `index < count`.
    pub fn new(index: usize, count: usize, what: &str) -> Result<Self> {
        if index >= count {
            return Err(Error::invalid(
                what,
                format!("shard {index} of {count}: the index must be below the count"),
            ));
        }
        Ok(Self { index, count })
    }

    /// `K/N` (the `--shard` flag).
    pub fn parse(text: &str) -> Result<Self> {
        let number = |s: &str| s.trim().parse::<usize>().ok();
        match text.split_once('/').map(|(k, n)| (number(k), number(n))) {
            Some((Some(k), Some(n))) => Self::new(k, n, "--shard"),
            _ => Err(Error::invalid(
                "--shard",
                format!("`{text}`: expected K/N, shard K (from 0) of N"),
            )),
        }
    }

    /// The shard a scheduler gave this process, from its environment (`var` reads a
    /// variable): a Slurm job array (`SLURM_ARRAY_TASK_ID`, counted by
    /// `SLURM_ARRAY_TASK_COUNT` or by `SLURM_ARRAY_TASK_MIN`..`MAX`, the index taken from the
    /// minimum), or a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`, counted by `count`, the
    /// `--shards` flag, or by `FERROGEN_SHARDS`). `None` outside both.
    pub fn from_env(
        var: impl Fn(&str) -> Option<String>,
        count: Option<usize>,
    ) -> Result<Option<Self>> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::invalid(name, format!("`{v}` is not a non-negative integer"))
                    })
                })
                .transpose()
        };
        if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
            let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let count = match (
                number("SLURM_ARRAY_TASK_COUNT")?,
                number("SLURM_ARRAY_TASK_MAX")?,
            ) {
                (Some(n), _) => n,
                (None, Some(max)) if max >= min => max - min + 1,
                _ => {
                    return Err(Error::invalid(
                        "SLURM_ARRAY_TASK_ID",
                        "is set without SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MAX: give \
                         --shard K/N",
                    ))
                }
            };
            let index = id.checked_sub(min).ok_or_else(|| {
                Error::invalid(
                    "SLURM_ARRAY_TASK_ID",
                    format!("{id} is below SLURM_ARRAY_TASK_MIN {min}"),
                )
            })?;
            return Self::new(
                index,
                count,
                "SLURM_ARRAY_TASK_ID (use an array of 0-N or give --shard K/N)",
            )
            .map(Some);
        }
        if let Some(index) = number("JOB_COMPLETION_INDEX")? {
            let count = match count {
                Some(n) => n,
                None => number("FERROGEN_SHARDS")?.ok_or_else(|| {
                    Error::invalid(
                        "JOB_COMPLETION_INDEX",
                        "is set, but not how many shards there are: give --shards N (the \
                         Indexed Job's completions) or set FERROGEN_SHARDS",
                    )
                })?,
            };
            return Self::new(index, count, "JOB_COMPLETION_INDEX").map(Some);
        }
        Ok(None)
    }

    /// Whether the record at `position` is this shard's.
    pub fn takes(&self, position: usize) -> bool {
        position % self.count == self.index
    }
}

/// `count / seconds` (0 before any time has passed): a job's rate.
pub(crate) fn per_second(count: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// The lines of a job's input that it answers: records (lines that are not blank) of its
/// shard, past the first `skip` of them (answered by an interrupted run).
pub(crate) struct JobLines<R> {
    lines: std::iter::Enumerate<std::io::Lines<R>>,
    shard: Option<Shard>,
    skip: usize,
    /// Records of the input so far.
    position: usize,
    /// Records of the shard so far.
    pub(crate) records: usize,
    /// Of those, skipped.
    pub(crate) skipped: usize,
}

impl<R: BufRead> JobLines<R> {
    pub(crate) fn new(input: R, shard: Option<Shard>, skip: usize) -> Self {
        Self {
            lines: input.lines().enumerate(),
            shard,
            skip,
            position: 0,
            records: 0,
            skipped: 0,
        }
    }

    /// The next line to answer, `None` at the end of the input.
    pub(crate) fn next_line(&mut self) -> Result<Option<String>> {
        for (n, line) in self.lines.by_ref() {
            let mut line = line.map_err(|e| Error::io(format!("<input line {}>", n + 1), e))?;
            if n == 0 {
                line = strip_bom(&line, n).to_string();
            }
            if line.trim().is_empty() {
                continue;
            }
            self.position += 1;
            if self.shard.is_some_and(|s| !s.takes(self.position - 1)) {
                continue;
            }
            self.records += 1;
            if self.skipped < self.skip {
                self.skipped += 1;
                continue;
            }
            return Ok(Some(line));
        }
        Ok(None)
    }
}

/// `line` without the UTF-8 byte order mark that some editors put at the start of a file
/// (`n`: the line's index; only the first can carry one).
pub(crate) fn strip_bom(line: &str, n: usize) -> &str {
    match n {
        0 => line.strip_prefix('\u{feff}').unwrap_or(line),
        _ => line,
    }
}

/// The ids of a JSONL input's records (its non-blank lines), in order, after checking that no
/// id appears twice: a job's answers are matched to its records by id, so a duplicate is an
/// error naming both lines. Records without a readable id (answered with an error) may
/// repeat theirs. `name` names the input in errors.
pub fn read_ids(input: impl BufRead, name: &str) -> Result<Vec<RecordId>> {
    let mut ids = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| Error::io(format!("{name} line {}", n + 1), e))?;
        if line.trim().is_empty() {
            continue;
        }
        let id = RecordId::of_line(strip_bom(&line, n));
        if id.is_valid() {
            if let Some(first) = seen.insert(id.clone(), n + 1) {
                return Err(Error::invalid(
                    name,
                    format!(
                        "id {id} is on line {first} and again on line {}: ids must be unique \
                         (answers are matched to records by id)",
                        n + 1
                    ),
                ));
            }
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Where an interrupted job resumes: the number of records its output at `path` already
/// answers. Answers are written in input order, a line at a time, so they answer the first
/// records of the input, whose `ids` ([`read_ids`]) they must match. A torn last line (cut
/// short by a kill: no newline, or not a JSON object) is removed from the file, so that its
/// record is scored again. A missing file answers nothing; a file that does not match the
/// input is an error naming the line, and is left as it is.
pub fn resume_point(path: &std::path::Path, ids: &[RecordId]) -> Result<usize> {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = 0; // bytes of whole, matching lines
    let mut answered = 0;
    let mut rest = text.as_slice();
    while !rest.is_empty() {
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            break; // torn: no newline
        };
        let line = String::from_utf8_lossy(&rest[..end]);
        let value = serde_json::from_str::<Value>(&line)
            .ok()
            .filter(Value::is_object);
        if value.is_none() {
            if end + 1 == rest.len() {
                break; // torn: the last line, and not a whole answer
            }
            return Err(Error::invalid(
                path.display().to_string(),
                format!(
                    "line {} is not a JSON answer: this output is not from this job \
                     (drop --resume to start over)",
                    answered + 1
                ),
            ));
        };
        let id = RecordId::of_line(&line);
        let want = ids.get(answered);
        if want != Some(&id) {
            return Err(Error::invalid(
                path.display().to_string(),
                format!(
                    "line {} answers id {id}, but record {} of the input has id {}: this \
                     output is not from this input (drop --resume to start over)",
                    answered + 1,
                    answered + 1,
                    want.map_or(
                        "none (the input is shorter)".to_string(),
                        RecordId::to_string
                    ),
                ),
            ));
        }
        answered += 1;
        kept += end + 1;
        rest = &rest[end + 1..];
    }
    if kept < text.len() {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        file.set_len(kept as u64).map_err(|e| Error::io(path, e))?;
        file.sync_all().map_err(|e| Error::io(path, e))?;
    }
    Ok(answered)
}

/// Joins the outputs of the `shards.len()` shards of an input whose records have `ids`
/// ([`read_ids`]) into one output in input order. `shards[k]` is shard `k`'s output (a name
/// for errors, and its text): its `j`-th line answers record `k + j * N`, and must carry that
/// record's id. A missing answer (a shard that stopped early), an answer given twice, or a line
/// that answers another record is an error naming the shard file and the record; nothing is
/// written then.
pub fn merge_shards(
    ids: &[RecordId],
    shards: &[(String, String)],
    mut out: impl Write,
) -> Result<()> {
    let count = shards.len();
    if count == 0 {
        return Err(Error::invalid("merge", "no shard outputs to merge"));
    }
    let mut lines: Vec<std::str::Lines<'_>> = shards.iter().map(|(_, text)| text.lines()).collect();
    let mut merged = Vec::with_capacity(ids.len());
    for (position, id) in ids.iter().enumerate() {
        let k = position % count;
        let (name, _) = &shards[k];
        let line = lines[k].next().ok_or_else(|| {
            Error::invalid(
                name,
                format!(
                    "record {} (id {id}) is missing: shard {k} of {count} stopped after {} \
                     answers (resume it with --resume)",
                    position + 1,
                    position / count
                ),
            )
        })?;
        let got = serde_json::from_str::<Value>(line)
            .ok()
            .filter(Value::is_object)
            .map(|_| RecordId::of_line(line))
            .ok_or_else(|| {
                Error::invalid(
                    name,
                    format!("line {} is not a JSON answer", position / count + 1),
                )
            })?;
        if &got != id {
            let again = ids[..position].iter().any(|earlier| earlier == &got);
            return Err(Error::invalid(
                name,
                format!(
                    "line {} answers id {got}{}, where record {} (id {id}) belongs: is this \
                     shard {k} of {count} of this input?",
                    position / count + 1,
                    if again { ", answered before" } else { "" },
                    position + 1
                ),
            ));
        }
        merged.push(line);
    }
    for (k, rest) in lines.iter_mut().enumerate() {
        if let Some(extra) = rest.find(|l| !l.trim().is_empty()) {
            return Err(Error::invalid(
                &shards[k].0,
                format!("has answers past the input's records (`{extra}`): a record answered twice, or another input"),
            ));
        }
    }
    for line in merged {
        writeln!(out, "{line}").map_err(|e| Error::io("<merged output>", e))?;
    }
    out.flush().map_err(|e| Error::io("<merged output>", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn duplicate_ids_are_refused_naming_both_lines() {
        let input = "{\"id\": 1, \"text\": \"a\"}\n\n{\"id\": \"1\", \"text\": \"b\"}\nnot json\n\
                     not json either\n{\"id\": 1, \"text\": \"c\"}\n";
        let err = read_ids(input.as_bytes(), "in.jsonl")
            .unwrap_err()
            .to_string();
        // (1 and "1" are different ids; unreadable lines may repeat their null id)
        assert!(err.contains("in.jsonl") && err.contains("id 1 is on line 1 and again on line 6"));
        let ids = read_ids(&input.as_bytes()[..input.len() - 28], "in.jsonl").unwrap();
        assert_eq!(ids, vec![json!(1), json!("1"), Value::Null, Value::Null]);
    }

    #[test]
    fn resuming_cuts_a_torn_line_and_checks_the_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let ids: Vec<RecordId> = [json!("a"), Value::Null, json!(7), json!("b")]
            .iter()
            .map(RecordId::from_value)
            .collect();
        assert_eq!(resume_point(&path, &ids).unwrap(), 0); // no output yet
        let whole = "{\"id\":\"a\",\"logprob\":-1.5}\n{\"id\":null,\"error\":\"bad\"}\n";
        // a line cut short by a kill, with or without being valid JSON, loses its record only
        for torn in ["{\"id\":7,\"logpr", "{\"id\":7}", "", "\n"] {
            std::fs::write(&path, format!("{whole}{torn}")).unwrap();
            let answered = resume_point(&path, &ids).unwrap();
            assert_eq!(answered, 2, "{torn:?}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), whole, "{torn:?}");
        }
        // an output of another input is refused, and left as it is
        let other = "{\"id\":\"a\"}\n{\"id\":\"z\"}\n";
        std::fs::write(&path, other).unwrap();
        let err = resume_point(&path, &ids).unwrap_err().to_string();
        assert!(
            err.contains("line 2 answers id \"z\"") && err.contains("--resume"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), other);
        // as is an answer in the middle that is not JSON
        std::fs::write(&path, "{\"id\":\"a\"}\ngarbage\n{\"id\":7}\n").unwrap();
        let err = resume_point(&path, &ids).unwrap_err().to_string();
        assert!(err.contains("line 2 is not a JSON answer"), "{err}");
    }

    #[test]
    fn shards_come_from_the_flag_or_the_scheduler() {
        assert_eq!(Shard::parse("2/4").unwrap(), Shard { index: 2, count: 4 });
        for bad in ["4/4", "1", "a/2", "1/0", "-1/3"] {
            assert!(
                Shard::parse(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("--shard"),
                "{bad}"
            );
        }
        fn env<'a>(vars: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<String> + 'a {
            move |name| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        }
        let shard = |index, count| Some(Shard { index, count });
        assert_eq!(Shard::from_env(env(&[]), None).unwrap(), None);
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
        ];
        assert_eq!(Shard::from_env(env(&slurm), None).unwrap(), shard(3, 8));
        // an array of 1-4: the index counts from its minimum
        let one_based = [
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "4"),
        ];
        assert_eq!(Shard::from_env(env(&one_based), None).unwrap(), shard(0, 4));
        let no_count = [("SLURM_ARRAY_TASK_ID", "1")];
        assert!(Shard::from_env(env(&no_count), None).is_err());
        let indexed = [("JOB_COMPLETION_INDEX", "5")];
        assert_eq!(
            Shard::from_env(env(&indexed), Some(6)).unwrap(),
            shard(5, 6)
        );
        let err = Shard::from_env(env(&indexed), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--shards") && err.contains("FERROGEN_SHARDS"),
            "{err}"
        );
        let counted = [("JOB_COMPLETION_INDEX", "5"), ("FERROGEN_SHARDS", "6")];
        assert_eq!(Shard::from_env(env(&counted), None).unwrap(), shard(5, 6));
        assert!(Shard::from_env(env(&indexed), Some(5)).is_err());
        let shards = Shard { index: 1, count: 3 };
        let taken: Vec<usize> = (0..10).filter(|&i| shards.takes(i)).collect();
        assert_eq!(taken, [1, 4, 7]);
    }

    #[test]
    fn merging_shards_restores_input_order_or_names_what_is_wrong() {
        let ids: Vec<RecordId> = [json!("a"), json!("b"), Value::Null, json!("d"), json!("e")]
            .iter()
            .map(RecordId::from_value)
            .collect();
        let answer = |id: &RecordId| format!("{{\"id\":{id},\"logprob\":-1}}");
        let shard = |k: usize, n: usize| -> (String, String) {
            let lines: Vec<String> = ids.iter().skip(k).step_by(n).map(answer).collect();
            (format!("out.{k}"), lines.join("\n") + "\n")
        };
        let mut out = Vec::new();
        merge_shards(&ids, &[shard(0, 2), shard(1, 2)], &mut out).unwrap();
        let want: Vec<String> = ids.iter().map(answer).collect();
        assert_eq!(String::from_utf8(out).unwrap(), want.join("\n") + "\n");
        let fails = |shards: &[(String, String)]| {
            let mut out = Vec::new();
            let err = merge_shards(&ids, shards, &mut out)
                .unwrap_err()
                .to_string();
            assert!(out.is_empty(), "nothing is written on an error");
            err
        };
        // a shard that stopped early
        let (name, text) = shard(1, 2);
        let short = (name, text.lines().next().unwrap().to_string() + "\n");
        let err = fails(&[shard(0, 2), short]);
        assert!(
            err.contains("out.1") && err.contains("id \"d\") is missing"),
            "{err}"
        );
        // a record answered twice
        let (name, text) = shard(0, 2);
        let twice = (name, format!("{}\n{text}", answer(&ids[0])));
        let err = fails(&[twice, shard(1, 2)]);
        assert!(
            err.contains("out.0") && err.contains("answered before"),
            "{err}"
        );
        let (name, text) = shard(1, 2);
        let extra = (name, format!("{text}{}\n", answer(&ids[3])));
        assert!(fails(&[shard(0, 2), extra]).contains("past the input's records"));
        // shards in the wrong order
        assert!(fails(&[shard(1, 2), shard(0, 2)]).contains("is this shard 0 of 2"));
    }
}
