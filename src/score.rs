//! Dataset scoring: JSONL records in, one JSONL result per record out, in input order.
//!
//! Input lines are `{"id": <string|number>, "text": "..."}` or `{"id": ..., "tokens": [int, ...]}`;
//! each result is `{"id", "scored_tokens": n-1, "logprob": sum_{i=1}^{n-1} ln p(t_i | t_<i),
//! "ppl": exp(-logprob / scored_tokens)}`. A `{"id", "context", "continuation"}` record is
//! lm-eval's `loglikelihood` request: the pair is split into tokens by [`encode_pair`], and the
//! result is `{"id", "logprob", "is_greedy", "scored_tokens"}` with `logprob` the sum over the
//! continuation's tokens and `is_greedy` whether each of them is the argmax at its position.
//! `"token_logprobs"` is added on request. A record that cannot be scored gets
//! `{"id", "error": reason}`, and the job goes on after it.
//! Records are scored in batches of about [`ScoreOptions::batch_tokens`] tokens (by default what
//! fills the scorer's blocks, [`Scorer::batch_tokens`]), longest first within a batch, and each
//! batch's results are written and flushed, in input order, before the next is read, so an
//! interrupted job keeps them.

use std::io::{BufRead, Write};
use std::ops::Range;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::arch::ModelConfig;
use crate::batch::TokenScores;
use crate::error::{Error, Result};
use crate::job::{per_second, JobLines, RecordId, Shard};
use crate::model::TextTokenizer;
pub use crate::scorer::Scorer;

/// Options of a scoring job: start from [`ScoreOptions::default`] and set the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ScoreOptions {
    /// Also write every token's logprob.
    pub per_token: bool,
    /// Tokens per batch (a record longer than this forms a batch of its own); `None`: the
    /// scorer's [`Scorer::batch_tokens`], at least 2,048.
    pub batch_tokens: Option<usize>,
    /// How often progress is reported.
    pub progress_every: Duration,
    /// Tokens per pass for records scored in rolling windows (`None`: the model's context).
    pub window: Option<usize>,
    /// Sliding windows that advance by this many tokens, each scoring only its last `stride`
    /// tokens (Hugging Face's strided perplexity); `None`: lm-eval's disjoint rolling windows.
    pub stride: Option<usize>,
    /// Records at the start of the input (of the shard's records, with a shard) already
    /// answered by an interrupted run of the same job ([`resume_point`](crate::job::resume_point)): skipped, not scored
    /// again.
    pub skip_records: usize,
    /// Score only this shard's records (`None`: all of them).
    pub shard: Option<Shard>,
    /// Asked between batches: a signal's number stops the job with [`Error::Interrupted`],
    /// the answers so far written (`None`: never stops).
    pub interrupt: Option<fn() -> Option<i32>>,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self {
            per_token: false,
            batch_tokens: None,
            progress_every: Duration::from_secs(2),
            window: None,
            stride: None,
            skip_records: 0,
            shard: None,
            interrupt: None,
        }
    }
}

impl ScoreOptions {
    /// The window length and stride for a model with `config`: `window` (at most the model's
    /// context) and `stride` (by default `window - 1`, lm-eval's disjoint windows), or an error
    /// naming the flag when they cannot work together.
    pub fn windows(&self, config: &ModelConfig) -> Result<(usize, usize)> {
        let max_len = self
            .window
            .unwrap_or(config.max_context())
            .min(config.max_context());
        if max_len < 2 {
            let (flag, why) = match self.window {
                Some(w) if w < config.max_context() => ("--window", format!("{w} token(s)")),
                _ => (
                    "model",
                    format!("the model's context of {} token(s)", config.max_context()),
                ),
            };
            return Err(Error::invalid(
                flag,
                format!("{why} cannot score anything: a window needs 2 tokens at least"),
            ));
        }
        let stride = self.stride.unwrap_or(max_len.saturating_sub(1));
        rolling_windows(0, max_len, stride)?;
        Ok((max_len, stride))
    }
}

/// Counts of a job so far (also its final summary).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoreSummary {
    /// Records read (lines that are not blank).
    pub records: usize,
    /// Records scored.
    pub scored: usize,
    /// Records answered with an error.
    pub failed: usize,
    /// Records skipped as already answered ([`ScoreOptions::skip_records`]).
    pub skipped: usize,
    /// Tokens run through the model.
    pub tokens: usize,
    /// Tokens scored (`n - 1` per record).
    pub scored_tokens: usize,
    /// Sum of all scored records' logprobs.
    pub logprob: f64,
    /// Wall time so far.
    pub seconds: f64,
}

impl ScoreSummary {
    /// Tokens through the model per second.
    pub fn tokens_per_second(&self) -> f64 {
        per_second(self.tokens, self.seconds)
    }
    /// `exp(-sum logprob / sum scored tokens)` over all scored records.
    pub fn corpus_ppl(&self) -> f64 {
        (-self.logprob / self.scored_tokens.max(1) as f64).exp()
    }
}

/// A parsed input record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The record's id, echoed in its result.
    pub id: RecordId,
    /// What to score.
    pub input: RecordInput,
}

/// A record's content.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordInput {
    /// Text, to be tokenized.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A continuation scored after a context (lm-eval's `loglikelihood` request).
    Pair {
        /// The conditioning text (may be empty: then the model's BOS, or else EOS, stands in).
        context: String,
        /// The text whose tokens are scored.
        continuation: String,
    },
}

/// A record that cannot be scored: its id (null if unreadable) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordError {
    /// The id, or `null`.
    pub id: RecordId,
    /// The reason, shown to the user.
    pub reason: String,
}

/// Parses one input line.
pub fn parse_record(line: &str) -> std::result::Result<Record, RecordError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        // Read through `value.get("id")` above; declared so that deny_unknown_fields accepts it.
        #[serde(rename = "id")]
        _id: Option<Value>,
        text: Option<String>,
        tokens: Option<Vec<Value>>,
        context: Option<String>,
        continuation: Option<String>,
    }
    let fail = |id: &RecordId, reason: String| RecordError {
        id: id.clone(),
        reason,
    };
    let value: Value = serde_json::from_str(line)
        .map_err(|e| fail(&RecordId::null(), format!("malformed JSON: {e}")))?;
    let id = RecordId::of_line(line);
    let raw: Raw =
        serde_json::from_value(value).map_err(|e| fail(&id, format!("bad record: {e}")))?;
    if id.is_null() {
        return Err(fail(&id, "record has no `id`".into()));
    }
    if !id.is_valid() {
        return Err(fail(&id, "`id` must be a string or a number".into()));
    }
    if raw.context.is_some() || raw.continuation.is_some() {
        if raw.text.is_some() || raw.tokens.is_some() {
            return Err(fail(
                &id,
                "a `context`/`continuation` record takes no `text` or `tokens`".into(),
            ));
        }
        return match (raw.context, raw.continuation) {
            (Some(_), Some(c)) if c.is_empty() => Err(fail(&id, "empty continuation".into())),
            (Some(context), Some(continuation)) => Ok(Record {
                id,
                input: RecordInput::Pair {
                    context,
                    continuation,
                },
            }),
            _ => Err(fail(
                &id,
                "give both `context` and `continuation` (the context may be \"\")".into(),
            )),
        };
    }
    let input = match (raw.text, raw.tokens) {
        (Some(_), Some(_)) => return Err(fail(&id, "give `text` or `tokens`, not both".into())),
        (None, None) => {
            return Err(fail(
                &id,
                "record has none of `text`, `tokens`, `context` and `continuation`".into(),
            ))
        }
        (Some(text), None) if text.is_empty() => return Err(fail(&id, "empty text".into())),
        (Some(text), None) => RecordInput::Text(text),
        (None, Some(tokens)) => RecordInput::Tokens(
            tokens
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.as_u64()
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| {
                            fail(
                                &id,
                                format!("token {i} ({t}) is not a non-negative integer id"),
                            )
                        })
                })
                .collect::<std::result::Result<_, _>>()?,
        ),
    };
    Ok(Record { id, input })
}

/// Splits a context/continuation pair into tokens as lm-eval's `_encode_pair` does: trailing
/// whitespace of the context moves to the front of the continuation, the whole string is
/// encoded, the context's own tokens are encoded alone, and the continuation is what follows
/// as many tokens of the whole. An empty context becomes `[prefix]` (the model's BOS, or else
/// its EOS) and the continuation is encoded alone; so does one of whitespace only.
pub fn encode_pair<E>(
    encode: impl Fn(&str) -> std::result::Result<Vec<u32>, E>,
    context: &str,
    continuation: &str,
    prefix: u32,
) -> std::result::Result<(Vec<u32>, Vec<u32>), E> {
    if context.is_empty() {
        return Ok((vec![prefix], encode(continuation)?));
    }
    let kept = context.trim_end();
    let moved = &context[kept.len()..];
    let continuation = format!("{moved}{continuation}");
    let whole = encode(&format!("{kept}{continuation}"))?;
    let context_tokens = encode(kept)?;
    let continuation_tokens = whole
        .get(context_tokens.len()..)
        .unwrap_or_default()
        .to_vec();
    if context_tokens.is_empty() {
        // an all-whitespace context: lm-eval would score the first token with no context at
        // all; the prefix token gives it one, as for an empty context
        return Ok((vec![prefix], continuation_tokens));
    }
    Ok((context_tokens, continuation_tokens))
}

/// One pass of a record scored in windows: its tokens `range` of the record's, and the first of
/// the pass's `range.len() - 1` predictions that counts (the ones before it only give context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The record's tokens this pass runs.
    pub range: Range<usize>,
    /// Index of the first counted prediction (prediction `j` is of token `range.start + j + 1`).
    pub scored_from: usize,
}

/// The passes that score every token `1..n` of a record exactly once, each at most `max_len`
/// tokens long. The first pass is `0..min(n, max_len)`. Each later one predicts the next
/// `stride` tokens (fewer at the end) and is right-aligned on them: it ends after its last
/// predicted token and starts `max_len` tokens before, so the tokens before the new ones are
/// context. `stride = max_len - 1` gives lm-eval's `loglikelihood_rolling` windows
/// (`get_rolling_token_windows` with `context_len = 1`, the record's first token standing for
/// its prefix token): disjoint predictions, each window's first one conditioned on the previous
/// window's last token, and a last window that runs at full length.
pub fn rolling_windows(n: usize, max_len: usize, stride: usize) -> Result<Vec<Window>> {
    if max_len < 2 || stride == 0 || stride >= max_len {
        return Err(Error::invalid(
            "--stride",
            format!(
                "windows of {max_len} tokens need a stride from 1 to {}",
                max_len.max(2) - 1
            ),
        ));
    }
    let first = n.min(max_len);
    let mut windows = vec![Window {
        range: 0..first,
        scored_from: 0,
    }];
    // the next token to predict
    let mut done = first;
    while done < n {
        let end = (done + stride).min(n);
        let start = end - max_len;
        windows.push(Window {
            range: start..end,
            // prediction j of the window is of token start + j + 1
            scored_from: done - start - 1,
        });
        done = end;
    }
    Ok(windows)
}

#[derive(Serialize)]
struct ScoredLine<'a> {
    id: &'a RecordId,
    scored_tokens: usize,
    logprob: f64,
    ppl: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_logprobs: Option<&'a [f32]>,
}

#[derive(Serialize)]
struct PairLine<'a> {
    id: &'a RecordId,
    logprob: f64,
    is_greedy: bool,
    scored_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_logprobs: Option<&'a [f32]>,
}

#[derive(Serialize)]
struct ErrorLine<'a> {
    id: &'a RecordId,
    error: &'a str,
}

/// A record awaiting its answer, in input order: failed at once, or being scored window by
/// window (a long record's windows may span several batches).
struct Pending {
    id: RecordId,
    /// Why it failed, if it did (its later windows are then not scored).
    failure: Option<String>,
    /// A context/continuation pair answers with `is_greedy`.
    pair: bool,
    /// Its members in the current batch: (index, first counted prediction).
    parts: Vec<(usize, usize)>,
    /// The counted scores of its windows scored so far.
    scores: TokenScores,
    /// Whether all its windows are in a batch (so it is answered once they are scored).
    complete: bool,
}

impl Pending {
    fn failed(e: RecordError) -> Self {
        Self {
            id: e.id,
            failure: Some(e.reason),
            pair: false,
            parts: Vec::new(),
            scores: TokenScores::default(),
            complete: true,
        }
    }
}

/// A job's batch: token sequences (records or their windows) and their total length.
#[derive(Default)]
struct Batch {
    seqs: Vec<Vec<u32>>,
    tokens: usize,
}

/// Runs a scoring job from `input` to `output`; `progress` is called every
/// [`ScoreOptions::progress_every`] with the counts so far. Returns the final summary.
///
/// Only I/O errors on `input` or `output`, and a signal ([`ScoreOptions::interrupt`]), stop
/// the job: every record-level problem becomes an error line, a non-finite log-probability
/// included. A record longer than a batch is scored window by window over several batches,
/// so memory stays bounded whatever its length.
pub fn score_jsonl(
    scorer: &dyn Scorer,
    tokenizer: Result<&TextTokenizer>,
    input: impl BufRead,
    mut output: impl Write,
    options: &ScoreOptions,
    mut progress: impl FnMut(&ScoreSummary),
) -> Result<ScoreSummary> {
    let start = Instant::now();
    let mut last_report = start;
    let mut summary = ScoreSummary::default();
    let mut queue = Queue::default();
    let config = scorer.config().clone();
    let (max_len, stride) = options.windows(&config)?;
    let batch_tokens = options
        .batch_tokens
        .unwrap_or_else(|| scorer.batch_tokens().unwrap_or(0).max(2048));
    let mut lines = JobLines::new(input, options.shard, options.skip_records);
    let mut report = |summary: &mut ScoreSummary, force: bool| {
        summary.seconds = start.elapsed().as_secs_f64();
        if force || last_report.elapsed() >= options.progress_every {
            last_report = Instant::now();
            progress(summary);
        }
    };
    loop {
        if let Some(signal) = options.interrupt.and_then(|f| f()) {
            queue.flush(scorer, &mut output, options, &mut summary)?;
            return Err(Error::Interrupted { signal });
        }
        let next = lines.next_line()?;
        (summary.records, summary.skipped) = (lines.records, lines.skipped);
        let Some(line) = next else {
            queue.flush(scorer, &mut output, options, &mut summary)?;
            // the last report always comes: it shows every record answered
            report(&mut summary, true);
            return Ok(summary);
        };
        let p = match prepare(&line, &tokenizer, &config, max_len) {
            Ok(p) => p,
            Err(e) => {
                queue.pending.push(Pending::failed(e));
                continue;
            }
        };
        drop(line);
        // one pass, or windows when too long for one (prepare fits pairs with a context
        // into one)
        let windows = if p.tokens.len() <= max_len {
            vec![Window {
                range: 0..p.tokens.len(),
                scored_from: p.scored_from,
            }]
        } else {
            rolling_windows(p.tokens.len(), max_len, stride)?
        };
        queue.pending.push(Pending {
            id: p.id,
            failure: None,
            pair: p.pair,
            parts: Vec::new(),
            scores: TokenScores::default(),
            complete: false,
        });
        // the record is the last pending one: those before it may be answered and drained
        // when a batch fills mid-record, it cannot
        for w in windows {
            if queue.batch.tokens >= batch_tokens {
                queue.flush(scorer, &mut output, options, &mut summary)?;
                report(&mut summary, false);
                if let Some(signal) = options.interrupt.and_then(|f| f()) {
                    return Err(Error::Interrupted { signal });
                }
            }
            let Queue { batch, pending } = &mut queue;
            let Some(record) = pending.last_mut() else {
                break;
            };
            if record.failure.is_some() {
                break; // a window failed: the rest are not scored
            }
            batch.tokens += w.range.len();
            record.parts.push((batch.seqs.len(), w.scored_from));
            batch.seqs.push(p.tokens[w.range].to_vec());
        }
        if let Some(record) = queue.pending.last_mut() {
            record.complete = true;
        }
        if queue.batch.tokens >= batch_tokens {
            queue.flush(scorer, &mut output, options, &mut summary)?;
        }
        report(&mut summary, false);
    }
}

/// The records awaiting answers and the batch their windows are in.
#[derive(Default)]
struct Queue {
    batch: Batch,
    pending: Vec<Pending>,
}

impl Queue {
    /// Scores the batch and writes every record it completes.
    fn flush(
        &mut self,
        scorer: &dyn Scorer,
        output: &mut impl Write,
        options: &ScoreOptions,
        summary: &mut ScoreSummary,
    ) -> Result<()> {
        score_pending(scorer, &mut self.batch, &mut self.pending, summary);
        write_answered(output, &mut self.pending, options, summary)
    }
}

/// Scores the batch, hands each record its windows' counted scores (or its failure), and
/// empties the batch.
fn score_pending(
    scorer: &dyn Scorer,
    batch: &mut Batch,
    pending: &mut [Pending],
    summary: &mut ScoreSummary,
) {
    let results = score_batch(scorer, &batch.seqs);
    for p in pending.iter_mut() {
        for (index, scored_from) in p.parts.drain(..) {
            if p.failure.is_some() {
                continue;
            }
            match &results[index] {
                Ok(s) => {
                    p.scores.logprobs.extend(&s.logprobs[scored_from..]);
                    p.scores.greedy.extend(&s.greedy[scored_from..]);
                    summary.tokens += batch.seqs[index].len();
                }
                Err(reason) => p.failure = Some(reason.clone()),
            }
        }
    }
    batch.seqs.clear();
    batch.tokens = 0;
}

/// Writes the answers of the records at the front of `pending` that are complete, in order,
/// and flushes them.
fn write_answered(
    output: &mut impl Write,
    pending: &mut Vec<Pending>,
    options: &ScoreOptions,
    summary: &mut ScoreSummary,
) -> Result<()> {
    let io_err = |e: std::io::Error| Error::io("<output>", e);
    let done = pending
        .iter()
        .position(|p| !p.complete || !p.parts.is_empty())
        .unwrap_or(pending.len());
    for p in pending.drain(..done) {
        write_result(output, p, options, summary).map_err(io_err)?;
    }
    output.flush().map_err(io_err)
}

/// A record ready to score: its id, its tokens, and from which of its `n - 1` scored positions
/// its result counts (0, or the first continuation token's for a pair).
struct Prepared {
    id: RecordId,
    tokens: Vec<u32>,
    scored_from: usize,
    pair: bool,
}

/// Parses, tokenizes and checks one line against the model's limits.
fn prepare(
    line: &str,
    tokenizer: &Result<&TextTokenizer>,
    config: &ModelConfig,
    max_len: usize,
) -> std::result::Result<Prepared, RecordError> {
    let record = parse_record(line)?;
    let fail = |reason: String| RecordError {
        id: record.id.clone(),
        reason,
    };
    let encode = |text: &str| match tokenizer {
        Ok(tok) => tok.encode(text).map_err(|e| fail(e.to_string())),
        Err(why) => Err(fail(format!("cannot tokenize text: {why}"))),
    };
    let (tokens, scored_from, pair) = match &record.input {
        RecordInput::Tokens(t) => (t.clone(), 0, false),
        RecordInput::Text(text) => (encode(text)?, 0, false),
        RecordInput::Pair {
            context,
            continuation,
        } => {
            let prefix = config.bos_token_id().or(config.eos_token_id()).unwrap_or(0);
            let (mut ctx, cont) = encode_pair(encode, context, continuation, prefix)?;
            if cont.is_empty() {
                return Err(fail("the continuation encodes to no tokens".into()));
            }
            if context.trim().is_empty() {
                // lm-eval's loglikelihood_rolling: the whole text after the prefix token, in
                // rolling windows when it is too long for one pass
                (ctx.into_iter().chain(cont).collect(), 0, true)
            } else {
                // too long for the window: drop context tokens from the left, as lm-eval
                // does; the continuation needs one token of context at least
                let room = max_len.saturating_sub(cont.len());
                if room == 0 {
                    return Err(fail(format!(
                        "a continuation of {} tokens leaves no room for context in windows \
                         of {max_len} tokens",
                        cont.len(),
                    )));
                }
                ctx.drain(..ctx.len().saturating_sub(room));
                let scored_from = ctx.len() - 1;
                (ctx.into_iter().chain(cont).collect(), scored_from, true)
            }
        }
    };
    if tokens.len() < 2 {
        return Err(fail(format!(
            "{} token(s): at least 2 are needed to score",
            tokens.len()
        )));
    }
    if let Some((position, &token)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= config.vocab_size())
    {
        return Err(fail(
            Error::TokenOutOfRange {
                token,
                position,
                vocab_size: config.vocab_size(),
            }
            .to_string(),
        ));
    }
    Ok(Prepared {
        id: record.id,
        tokens,
        scored_from,
        pair,
    })
}

/// Scores a batch, longest sequences first (as lm-eval orders its requests: a batch that does
/// not fit fails at once, and sequences of like lengths share blocks), returning the results in
/// the batch's order; if the batch as a whole fails, each record is retried alone so that the
/// error lands on the record that caused it.
fn score_batch(
    scorer: &dyn Scorer,
    batch: &[Vec<u32>],
) -> Vec<std::result::Result<TokenScores, String>> {
    if batch.is_empty() {
        return Vec::new();
    }
    let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(batch[i].len()));
    let sorted: Vec<&[u32]> = order.iter().map(|&i| refs[i]).collect();
    match scorer.token_scores(&sorted) {
        Ok(all) => {
            let mut out: Vec<_> = (0..batch.len()).map(|_| Err(String::new())).collect();
            for (i, scores) in order.into_iter().zip(all) {
                out[i] = Ok(scores);
            }
            out
        }
        Err(_) => refs
            .iter()
            .map(|seq| {
                scorer
                    .token_scores(&[seq])
                    .map(|mut v| v.remove(0))
                    .map_err(|e| e.to_string())
            })
            .collect(),
    }
}

/// The position (among the scored tokens) of the first log-probability that is NaN or
/// infinite: a model that computes one is broken (a NaN weight, an overflow), and its sum is
/// no answer.
fn first_non_finite(logprobs: &[f32]) -> Option<usize> {
    logprobs.iter().position(|v| !v.is_finite())
}

fn write_result(
    out: &mut impl Write,
    p: Pending,
    options: &ScoreOptions,
    summary: &mut ScoreSummary,
) -> std::io::Result<()> {
    let lps = p.scores.logprobs.as_slice();
    let failure = p.failure.or_else(|| {
        first_non_finite(lps).map(|i| format!("non-finite log-probability at token {}", i + 1))
    });
    let line = if let Some(reason) = failure {
        summary.failed += 1;
        serde_json::to_string(&ErrorLine {
            id: &p.id,
            error: &reason,
        })
    } else {
        let logprob: f64 = lps.iter().map(|&v| f64::from(v)).sum();
        summary.scored += 1;
        summary.scored_tokens += lps.len();
        summary.logprob += logprob;
        let token_logprobs = options.per_token.then_some(lps);
        if p.pair {
            serde_json::to_string(&PairLine {
                id: &p.id,
                logprob,
                is_greedy: p.scores.greedy.iter().all(|&g| g),
                scored_tokens: lps.len(),
                token_logprobs,
            })
        } else {
            serde_json::to_string(&ScoredLine {
                id: &p.id,
                scored_tokens: lps.len(),
                logprob,
                ppl: (-logprob / lps.len() as f64).exp(),
                token_logprobs,
            })
        }
    }
    .map_err(std::io::Error::other)?;
    writeln!(out, "{line}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_parse_or_explain() {
        let r = parse_record(r#"{"id": 7, "tokens": [1, 2, 3]}"#).unwrap();
        assert_eq!(r.id, json!(7));
        assert_eq!(r.input, RecordInput::Tokens(vec![1, 2, 3]));
        let r = parse_record(r#"{"id": "a", "text": "hi"}"#).unwrap();
        assert_eq!(r.input, RecordInput::Text("hi".into()));

        let cases = [
            (r#"{"id": 1, "text": "x""#, Value::Null, "malformed JSON"),
            (r#"{"text": "x"}"#, Value::Null, "no `id`"),
            (r#"{"id": 1}"#, json!(1), "none of"),
            (
                r#"{"id": 1, "text": "a", "tokens": [1]}"#,
                json!(1),
                "not both",
            ),
            (r#"{"id": 1, "text": ""}"#, json!(1), "empty"),
            (r#"{"id": 1, "tokens": [1, -2]}"#, json!(1), "token 1"),
            (r#"{"id": 1, "tokens": [1, 2.5]}"#, json!(1), "token 1"),
            (
                r#"{"id": [1], "text": "x"}"#,
                json!([1]),
                "string or a number",
            ),
            (r#"{"id": 1, "txt": "x"}"#, json!(1), "unknown field"),
            (r#"[1, 2]"#, Value::Null, "bad record"),
        ];
        for (line, id, reason) in cases {
            let e = parse_record(line).unwrap_err();
            assert_eq!(e.id, id, "{line}");
            assert!(e.reason.contains(reason), "{line}: {}", e.reason);
        }
    }
    /// A GPT-2-like word tokenizer: each token is a run of spaces and the word after it, so
    /// where a space goes changes the tokens (ids: 1 + the piece's length + 10 x its first
    /// non-space letter's position in the alphabet, enough to tell the pieces here apart).
    fn words(text: &str) -> Result<Vec<u32>> {
        let mut pieces: Vec<String> = Vec::new();
        for c in text.chars() {
            match pieces.last_mut() {
                Some(p) if !c.is_whitespace() || p.trim().is_empty() => p.push(c),
                _ => pieces.push(c.to_string()),
            }
        }
        Ok(pieces
            .iter()
            .map(|p| {
                let letter = p.trim_start().bytes().next().unwrap_or(b'a');
                1 + p.len() as u32 + 10 * u32::from(letter.to_ascii_lowercase() - b'a')
            })
            .collect())
    }

    #[test]
    fn encode_pair_moves_trailing_space_to_the_continuation() {
        let (ctx, cont) = encode_pair(words, "The cat ", "sat", 0).unwrap();
        assert_eq!(ctx, words("The cat").unwrap());
        assert_eq!(cont, words(" sat").unwrap());
        // the same tokens as the pair written the usual way
        assert_eq!(
            encode_pair(words, "The cat", " sat", 0).unwrap(),
            (ctx, cont)
        );
        // without the move the context would end in a lone space token
        assert_eq!(words("The cat ").unwrap().len(), 3);
        // two trailing spaces move together
        let (ctx, cont) = encode_pair(words, "The cat  ", "sat", 0).unwrap();
        assert_eq!((ctx.len(), cont), (2, words("  sat").unwrap()));
    }

    #[test]
    fn encode_pair_gives_an_empty_context_the_prefix_token() {
        assert_eq!(
            encode_pair(words, "", "The cat", 7).unwrap(),
            (vec![7], words("The cat").unwrap())
        );
        assert_eq!(
            encode_pair(words, "  ", "cat", 7).unwrap(),
            (vec![7], words("  cat").unwrap())
        );
    }

    #[test]
    fn pair_records_parse_or_explain() {
        let r = parse_record(r#"{"id": 1, "context": "", "continuation": " a"}"#).unwrap();
        assert_eq!(
            r.input,
            RecordInput::Pair {
                context: String::new(),
                continuation: " a".into()
            }
        );
        let cases = [
            (r#"{"id": 1, "context": "a"}"#, "give both"),
            (r#"{"id": 1, "continuation": "a"}"#, "give both"),
            (
                r#"{"id": 1, "context": "a", "continuation": ""}"#,
                "empty continuation",
            ),
            (
                r#"{"id": 1, "context": "a", "continuation": "b", "text": "c"}"#,
                "no `text` or `tokens`",
            ),
        ];
        for (line, reason) in cases {
            let e = parse_record(line).unwrap_err();
            assert_eq!(e.id, json!(1), "{line}");
            assert!(e.reason.contains(reason), "{line}: {}", e.reason);
        }
    }
    proptest::proptest! {
        /// The windows score every token after the first exactly once, none is longer than
        /// `max_len`, each later one is right-aligned (full length), and with the default
        /// stride each later window's first counted token has exactly one token before it
        /// (or, in the last window, all the context that fits).
        #[test]
        fn rolling_windows_cover_every_token_once(n in 1usize..400, max_len in 2usize..70, stride_pick in 0usize..100) {
            let stride = 1 + stride_pick % (max_len - 1);
            for (s, lm_eval) in [(stride, false), (max_len - 1, true)] {
                let windows = rolling_windows(n, max_len, s).unwrap();
                let mut counted = Vec::new();
                for (k, w) in windows.iter().enumerate() {
                    proptest::prop_assert!(w.range.len() <= max_len && w.range.end <= n);
                    proptest::prop_assert!(w.scored_from < w.range.len().max(1));
                    if k > 0 {
                        proptest::prop_assert_eq!(w.range.len(), max_len);
                        let new = w.range.len() - 1 - w.scored_from;
                        proptest::prop_assert!(new >= 1 && new <= s);
                        if lm_eval && k + 1 < windows.len() {
                            proptest::prop_assert_eq!(w.scored_from, 0);
                        }
                    }
                    counted.extend(w.range.start + 1 + w.scored_from..w.range.end);
                }
                proptest::prop_assert_eq!(counted, (1..n).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn bad_strides_are_refused() {
        assert!(rolling_windows(10, 8, 8).is_err());
        assert!(rolling_windows(10, 8, 0).is_err());
        assert!(rolling_windows(10, 1, 1).is_err());
        assert_eq!(rolling_windows(0, 8, 7).unwrap().len(), 1);
    }

    /// A model with a context of 1 cannot score: the error names the context, not a flag the
    /// user did not give; a `--window` of 1 names `--window`.
    #[test]
    fn a_context_of_one_names_the_context() {
        let text = r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 1}"#;
        let config = ModelConfig::from_json_str(text, "c.json".as_ref()).unwrap();
        let err = ScoreOptions::default()
            .windows(&config)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("context of 1") && !err.contains("--stride"),
            "{err}"
        );
        let text = text.replace(
            "\"max_position_embeddings\": 1",
            "\"max_position_embeddings\": 64",
        );
        let config = ModelConfig::from_json_str(&text, "c.json".as_ref()).unwrap();
        let options = ScoreOptions {
            window: Some(1),
            ..ScoreOptions::default()
        };
        let err = options.windows(&config).unwrap_err().to_string();
        assert!(err.contains("--window"), "{err}");
    }
}
