//! The batch generation job: prompts from JSONL, completions to JSONL, in input order.
//!
//! A record is `{"id", "prompt": "..." | "tokens": [..] | "messages": [{"role", "content"}],
//! "max_tokens", "temperature", "top_p", "top_k", "seed", "stop": ["..."]}`, every field but
//! the id and the prompt optional (the job's [`GenDefaults`] fill them). Messages are
//! formatted by the model's chat template with the assistant's turn opened
//! ([`crate::model::ChatTemplate`]), as transformers' `apply_chat_template` and vLLM do. Its answer is `{"id", "text", "tokens",
//! "token_logprobs", "finish_reason": "stop" | "length" | "eos"}`, or `{"id", "error"}`.
//!
//! - Sampling draws token `t` of a record with the `t`-th number of its seed's stream
//!   ([`Sampling`]), so a record gives the same tokens whatever batch it lands in. Without a
//!   seed, the record's is derived from the job's and the record's id.
//! - Stop strings are matched on the decoded text, across token boundaries, after every new
//!   token; the text is cut before the first stop string (the tokens keep the one that
//!   completed it). The model's end-of-sequence token ends a record too (`eos`; its text is
//!   not in `text`).
//! - Records are read in batches; a batch's prompts run longest first (so blocks hold
//!   prompts of like length), and a record that stopped costs no more compute.
//! - Answers are written and flushed batch by batch, so an interrupted job keeps them, and
//!   [`GenOptions::skip_records`] resumes it ([`crate::job::resume_point`]).

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::arch::ModelFiles;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::job::RecordId;
use crate::job::{JobLines, Shard};
use crate::model::{ChatMessage, TextTokenizer};
use crate::sampling::{Decoding, FinishReason, Sampling};

/// What a record leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct GenDefaults {
    /// New tokens at most.
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f32,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub top_k: usize,
    /// Mixed with each record's id into the record's seed when it gives none.
    pub seed: u64,
    /// Stop strings.
    pub stop: Vec<String>,
}

impl Default for GenDefaults {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// Options of a generation job.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GenOptions {
    /// What records leave out.
    pub defaults: GenDefaults,
    /// Records per batch (each batch is one call to the engine).
    pub batch_records: usize,
    /// How often progress is reported.
    pub progress_every: Duration,
    /// Records at the start (of the shard's) already answered: skipped.
    pub skip_records: usize,
    /// Generate only this shard's records.
    pub shard: Option<Shard>,
    /// Asked between batches: a signal's number stops the job with [`Error::Interrupted`],
    /// the answers so far written (`None`: never stops).
    pub interrupt: Option<fn() -> Option<i32>>,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self {
            defaults: GenDefaults::default(),
            batch_records: 256,
            progress_every: Duration::from_secs(2),
            skip_records: 0,
            shard: None,
            interrupt: None,
        }
    }
}

/// Counts of a job so far (also its final summary).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenSummary {
    /// Records read (of the shard).
    pub records: usize,
    /// Records answered with a completion.
    pub generated: usize,
    /// Records answered with an error.
    pub failed: usize,
    /// Records skipped as already answered.
    pub skipped: usize,
    /// Prompt tokens run.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub new_tokens: usize,
    /// Wall time so far.
    pub seconds: f64,
}

impl GenSummary {
    /// Generated tokens per second of wall time.
    pub fn tokens_per_second(&self) -> f64 {
        crate::job::per_second(self.new_tokens, self.seconds)
    }
}

/// A record ready to run.
#[derive(Debug, Clone, PartialEq)]
struct Request {
    id: RecordId,
    prompt: Vec<u32>,
    decoding: Decoding,
    stop: Vec<String>,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a RecordId,
    text: &'a str,
    tokens: &'a [u32],
    token_logprobs: &'a [f32],
    finish_reason: &'a str,
}

#[derive(Serialize)]
struct Failure<'a> {
    id: &'a RecordId,
    error: &'a str,
}

/// A seed from the job's and a record's id (FNV-1a over the id's JSON, then the job's seed).
fn derived_seed(job: u64, id: &RecordId) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in id.to_string().bytes().chain(job.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The tokens of a chat: the model's template rendered with the assistant's turn opened, then
/// tokenized as it stands (the template writes the special tokens).
fn chat_prompt(
    files: &ModelFiles,
    tokenizer: &TextTokenizer,
    messages: &[ChatMessage],
) -> std::result::Result<Vec<u32>, String> {
    if messages.is_empty() {
        return Err("\"messages\" is empty".into());
    }
    let template = files.chat_template().map_err(|e| e.to_string())?;
    let text = template.render(messages, true).map_err(|e| e.to_string())?;
    tokenizer.encode_rendered(&text).map_err(|e| e.to_string())
}

/// Parses one record against the defaults; an error names the field.
fn parse_request(
    line: &str,
    defaults: &GenDefaults,
    tokenizer: &TextTokenizer,
    files: &ModelFiles,
) -> std::result::Result<Request, (RecordId, String)> {
    let config = &files.config;
    let (vocab, eos, context) = (
        config.vocab_size(),
        config.eos_token_id(),
        config.max_context(),
    );
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        // read through RecordId::of_line, as written; declared for deny_unknown_fields
        #[serde(rename = "id")]
        _id: Option<serde::de::IgnoredAny>,
        prompt: Option<String>,
        tokens: Option<Vec<u32>>,
        messages: Option<Vec<ChatMessage>>,
        max_tokens: Option<usize>,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<usize>,
        seed: Option<u64>,
        stop: Option<Vec<String>>,
    }
    let id = RecordId::of_line(line);
    let raw: Raw =
        serde_json::from_str(line).map_err(|e| (id.clone(), format!("bad record: {e}")))?;
    if id.is_null() {
        return Err((id, "the record has no \"id\"".to_string()));
    }
    if !id.is_valid() {
        return Err((id, "`id` must be a string or a number".to_string()));
    }
    let fail = |reason: String| (id.clone(), reason);
    let prompt = match (raw.prompt, raw.tokens, raw.messages) {
        (Some(p), None, None) => tokenizer.encode(&p).map_err(|e| fail(e.to_string()))?,
        (None, Some(t), None) => t,
        (None, None, Some(m)) => chat_prompt(files, tokenizer, &m).map_err(fail)?,
        _ => {
            return Err(fail(
                "give one of \"prompt\" (text), \"tokens\" (ids) or \"messages\" (a chat)".into(),
            ))
        }
    };
    if prompt.is_empty() {
        return Err(fail("the prompt is empty".into()));
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(fail(format!(
            "token {bad} is not in the vocabulary of {vocab}"
        )));
    }
    let sampling = Sampling {
        temperature: raw.temperature.unwrap_or(defaults.temperature),
        top_p: raw.top_p.unwrap_or(defaults.top_p),
        top_k: raw.top_k.unwrap_or(defaults.top_k),
        seed: raw.seed.unwrap_or_else(|| derived_seed(defaults.seed, &id)),
    };
    sampling.validate().map_err(|e| fail(e.to_string()))?;
    let max_tokens = raw.max_tokens.unwrap_or(defaults.max_tokens);
    if max_tokens == 0 {
        return Err(fail("max_tokens must be at least 1".into()));
    }
    // the last new token is predicted from prompt + max_tokens - 1 positions
    if prompt.len() + max_tokens - 1 > context {
        return Err(fail(format!(
            "a prompt of {} tokens and max_tokens {max_tokens} need {} positions, more than \
             the model's context of {context}: shorten the prompt or lower max_tokens",
            prompt.len(),
            prompt.len() + max_tokens - 1
        )));
    }
    let stop = raw.stop.unwrap_or_else(|| defaults.stop.clone());
    if stop.iter().any(String::is_empty) {
        return Err(fail("a stop string is empty".into()));
    }
    Ok(Request {
        id,
        prompt,
        decoding: Decoding {
            max_tokens,
            sampling,
            stop_tokens: eos.into_iter().collect(),
        },
        stop,
    })
}

/// The text of `tokens` cut before the first stop string (and without a final end-of-sequence
/// token), and whether a stop string was found.
fn completion_text(
    tokenizer: &TextTokenizer,
    tokens: &[u32],
    finish: Option<FinishReason>,
    stop: &[String],
) -> Result<(String, bool)> {
    let shown = match finish {
        Some(FinishReason::Eos) => &tokens[..tokens.len().saturating_sub(1)],
        _ => tokens,
    };
    let text = tokenizer.decode(shown)?;
    match stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(at) => Ok((text[..at].to_string(), true)),
        None => Ok((text, false)),
    }
}

/// Runs the job: reads records from `input`, writes one answer per record to `output` in
/// input order, and calls `progress` now and then.
pub fn generate_jsonl(
    engine: &Engine,
    tokenizer: &TextTokenizer,
    input: impl BufRead,
    mut output: impl Write,
    options: &GenOptions,
    mut progress: impl FnMut(&GenSummary),
) -> Result<GenSummary> {
    let start = Instant::now();
    let mut last_report = start;
    let mut summary = GenSummary::default();
    let io_err = |e: std::io::Error| Error::io("<output>", e);
    let mut pending: Vec<std::result::Result<Request, (RecordId, String)>> = Vec::new();
    let mut lines = JobLines::new(input, options.shard, options.skip_records);
    loop {
        if let Some(signal) = options.interrupt.and_then(|f| f()) {
            return Err(Error::Interrupted { signal });
        }
        let next = lines.next_line()?;
        (summary.records, summary.skipped) = (lines.records, lines.skipped);
        let at_end = next.is_none();
        if let Some(line) = next {
            pending.push(parse_request(
                &line,
                &options.defaults,
                tokenizer,
                engine.files(),
            ));
        }
        if pending.len() >= options.batch_records.max(1) || (at_end && !pending.is_empty()) {
            run_batch(engine, tokenizer, &mut pending, &mut output, &mut summary)?;
            output.flush().map_err(io_err)?;
        }
        summary.seconds = start.elapsed().as_secs_f64();
        // (the last report always comes: it shows every record answered)
        if at_end || last_report.elapsed() >= options.progress_every {
            last_report = Instant::now();
            progress(&summary);
        }
        if at_end {
            return Ok(summary);
        }
    }
}

/// Generates for a batch's requests, longest prompt first, and writes every answer (errors
/// too) in input order. Requests run in engine calls whose longest prompt and largest
/// max_tokens fit the model's context together (each request fits on its own), so that no
/// request fails because of another.
fn run_batch(
    engine: &Engine,
    tokenizer: &TextTokenizer,
    pending: &mut Vec<std::result::Result<Request, (RecordId, String)>>,
    output: &mut impl Write,
    summary: &mut GenSummary,
) -> Result<()> {
    let io_err = |e: std::io::Error| Error::io("<output>", e);
    let context = engine.files().config.max_context();
    let mut order: Vec<usize> = (0..pending.len()).filter(|&i| pending[i].is_ok()).collect();
    let request = |i: usize| pending[i].as_ref().ok();
    order.sort_by_key(|&i| std::cmp::Reverse(request(i).map_or(0, |r| r.prompt.len())));
    // calls: runs of the order whose first (longest) prompt and largest max_tokens fit
    let mut calls: Vec<Vec<usize>> = Vec::new();
    let mut call_need = (0, 0); // (longest prompt, largest max_tokens) of the last call
    for &i in &order {
        let Some(r) = request(i) else { continue };
        let (p, m) = (
            call_need.0.max(r.prompt.len()),
            call_need.1.max(r.decoding.max_tokens),
        );
        match calls.last_mut() {
            Some(call) if p + m - 1 <= context => {
                call.push(i);
                call_need = (p, m);
            }
            _ => {
                calls.push(vec![i]);
                call_need = (r.prompt.len(), r.decoding.max_tokens);
            }
        }
    }
    let mut answer: Vec<Option<std::result::Result<_, String>>> = vec![None; pending.len()];
    for call in calls {
        for (i, a) in generate_call(engine, tokenizer, pending, &call) {
            answer[i] = Some(a);
        }
    }
    for (p, a) in pending.drain(..).zip(answer) {
        let line = match (p, a) {
            (Err((id, reason)), _) => {
                summary.failed += 1;
                serde_json::to_string(&Failure {
                    id: &id,
                    error: &reason,
                })
            }
            (Ok(req), Some(Ok(r))) => {
                let (text, stopped) = completion_text(tokenizer, &r.tokens, r.finish, &req.stop)?;
                let finish = if stopped {
                    FinishReason::Stop
                } else {
                    r.finish.unwrap_or(FinishReason::Length)
                };
                summary.generated += 1;
                summary.prompt_tokens += req.prompt.len();
                summary.new_tokens += r.tokens.len();
                serde_json::to_string(&Completion {
                    id: &req.id,
                    text: &text,
                    tokens: &r.tokens,
                    token_logprobs: &r.logprobs,
                    finish_reason: finish.as_str(),
                })
            }
            (Ok(req), a) => {
                summary.failed += 1;
                let reason = match a {
                    Some(Err(e)) => e,
                    _ => "no result".to_string(),
                };
                serde_json::to_string(&Failure {
                    id: &req.id,
                    error: &reason,
                })
            }
        }
        .map_err(|e| Error::invalid("output", e.to_string()))?;
        writeln!(output, "{line}").map_err(io_err)?;
    }
    Ok(())
}

/// One engine call for the requests `call` (indices into `pending`): each one's result or
/// the call's error.
fn generate_call(
    engine: &Engine,
    tokenizer: &TextTokenizer,
    pending: &[std::result::Result<Request, (RecordId, String)>],
    call: &[usize],
) -> Vec<(usize, std::result::Result<crate::exec::SeqResult, String>)> {
    let requests: Vec<&Request> = call
        .iter()
        .filter_map(|&i| pending[i].as_ref().ok())
        .collect();
    let prompts: Vec<&[u32]> = requests.iter().map(|r| r.prompt.as_slice()).collect();
    let decoding: Vec<Decoding> = requests.iter().map(|r| r.decoding.clone()).collect();
    let stops: Vec<&[String]> = requests.iter().map(|r| r.stop.as_slice()).collect();
    // a stop string anywhere in the text so far (decoding fails: not yet)
    let stop = |k: usize, tokens: &[u32]| -> bool {
        !stops[k].is_empty()
            && tokenizer
                .decode(tokens)
                .is_ok_and(|text| stops[k].iter().any(|s| text.contains(s.as_str())))
    };
    let mut results = vec![None; prompts.len()];
    let outcome = engine.generate_with_each(&prompts, &decoding, &stop, |first, block| {
        for (k, r) in block.into_iter().enumerate() {
            results[first + k] = Some(r);
        }
        ControlFlow::Continue(())
    });
    call.iter()
        .zip(results)
        .map(|(&i, r)| {
            let a = match (&outcome, r) {
                (_, Some(r)) => match r.logprobs.iter().position(|v| !v.is_finite()) {
                    Some(t) => Err(format!("non-finite log-probability at token {}", t + 1)),
                    None => Ok(r),
                },
                (Err(e), None) => Err(e.to_string()),
                (Ok(()), None) => Err("no result".to_string()),
            };
            (i, a)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn derived_seeds_differ_by_id_and_job() {
        let id = |v: &str| RecordId::from_value(&Value::from(v));
        let a = derived_seed(0, &id("a"));
        assert_eq!(a, derived_seed(0, &id("a")));
        assert_ne!(a, derived_seed(0, &id("b")));
        assert_ne!(a, derived_seed(1, &id("a")));
    }
}
