//! Text tokenization through the `tokenizers` crate, from `tokenizer.json` or GGUF metadata.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Value};

use super::gguf::{GgufFile, GgufValue};
use crate::error::{Error, Result};

/// Byte offsets where `text` may be cut into pieces of about `piece_bytes` (at least that
/// many, except the last): before a space that has a character other than whitespace on
/// either side. None for a text of one piece.
fn word_cuts(text: &str, piece_bytes: usize) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut cuts = Vec::new();
    let mut at = piece_bytes;
    while at + 1 < bytes.len() {
        let is_cut = |i: usize| {
            bytes[i] == b' '
                && !bytes[i - 1].is_ascii_whitespace()
                && !bytes[i + 1].is_ascii_whitespace()
        };
        match (at..bytes.len() - 1).find(|&i| is_cut(i)) {
            Some(cut) => {
                cuts.push(cut);
                at = cut + piece_bytes;
            }
            None => break,
        }
    }
    cuts
}

/// Llama 3's pre-tokenizer split (also Falcon 3, Pixtral, DBRX...): letters with one leading
/// non-letter, numbers of up to 3 digits, punctuation runs, newlines, spaces.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's (and Qwen2.5's, Qwen3's): Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken: words split at case changes, single digits.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer (tokenizer.json form) of a GGUF `tokenizer.ggml.pre` name, and whether a
/// word found whole in the vocabulary is one token without merging (`ignore_merges`, as
/// llama.cpp and Llama 3's own tokenizer.json do).
fn byte_level_pre_tokenizer(pre: &str) -> std::result::Result<(Value, bool), String> {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
             "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
             "use_regex": false}]})
    };
    Ok(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "dbrx"
        | "smaug-bpe" => (split(LLAMA3_SPLIT), true),
        "qwen2" | "deepseek-r1-qwen" => (split(QWEN2_SPLIT), false),
        "tekken" => (split(TEKKEN_SPLIT), true),
        "smollm" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]}),
            false,
        ),
        "gpt2" | "gpt-2" | "phi-2" | "default" => (byte_level, false),
        other => {
            return Err(format!(
                "pre-tokenizer `{other}` is not supported (llama-bpe, qwen2, tekken, smollm, \
                 gpt-2, default); give records as token ids instead"
            ))
        }
    })
}

/// Control (type 3) tokens, matched whole in text and special, and user-defined (4) ones,
/// matched whole, as added tokens of a tokenizer.json.
fn added_tokens(tokens: &[&str], types: &[i64]) -> Vec<Value> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &t))| t == 3 || t == 4)
        .map(|(id, (content, &t))| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": t == 3})
        })
        .collect()
}

/// A byte-level BPE tokenizer.json of GGUF tables.
fn byte_level_spec(
    tokens: &[&str],
    types: &[i64],
    merges: &[&str],
    pre: &str,
) -> std::result::Result<Value, String> {
    let (pre_tokenizer, ignore_merges) = byte_level_pre_tokenizer(pre)?;
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.to_string(), json!(id)))
        .collect();
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added_tokens(tokens, types),
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": merges},
    }))
}

/// The merges a SentencePiece vocabulary implies: every split `l + r` of a token into two
/// tokens, best first by the whole token's score, then by longer `l`, longer `r` (lengths in
/// characters), ties in vocabulary order of the token, `l`, `r` (as transformers derives them).
fn sentencepiece_merges(tokens: &[&str], scores: &[f64], ids: &HashMap<&str, usize>) -> Vec<Value> {
    let mut merges: Vec<(f64, usize, usize, usize, usize)> = Vec::new();
    for (t, &score) in tokens.iter().zip(scores) {
        let mut local = Vec::new();
        for (at, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(at);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                local.push((score, l.chars().count(), r.chars().count(), li, ri));
            }
        }
        local.sort_by_key(|m| (m.3, m.4));
        merges.extend(local);
    }
    // stable: equal keys keep the order above
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    merges
        .iter()
        .map(|m| json!([tokens[m.3], tokens[m.4]]))
        .collect()
}

/// Where a SentencePiece vocabulary's `▁` goes in front of the text.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SpacePrefix {
    /// Nowhere (`add_space_prefix` false).
    None,
    /// Before the first word, unless the text begins with a space (Llama's `Metaspace`).
    FirstWord,
    /// Before every piece of text between special tokens, whatever it begins with (Phi-3).
    EveryPiece,
}

/// The SentencePiece tokenizer.json of an architecture's GGUF tables, read as transformers
/// reads that architecture's: Phi-3 prepends its space to every piece of text (a normalizer),
/// the others to the text's first word (when `prefix`); Gemma's files spell its tokens of
/// spaces with real spaces (read as `▁`s), and its merges follow the tokens' order, not their
/// scores.
fn sentencepiece_of(
    arch: Option<&str>,
    prefix: bool,
    tokens: &[&str],
    types: &[i64],
    scores: &[f64],
) -> Value {
    let style = match (prefix, arch) {
        (false, _) => SpacePrefix::None,
        (true, Some("phi3")) => SpacePrefix::EveryPiece,
        (true, _) => SpacePrefix::FirstWord,
    };
    if !arch.is_some_and(|a| a.starts_with("gemma")) {
        return sentencepiece_spec(tokens, types, scores, style);
    }
    let respelled: Vec<String> = tokens
        .iter()
        .map(|t| match t.contains(' ') && t.trim().is_empty() {
            true => "\u{2581}".repeat(t.chars().count()),
            false => t.to_string(),
        })
        .collect();
    let tokens: Vec<&str> = respelled.iter().map(String::as_str).collect();
    let order: Vec<f64> = (0..tokens.len()).map(|i| -(i as f64)).collect();
    sentencepiece_spec(&tokens, types, &order, style)
}

/// A SentencePiece-style BPE tokenizer.json of GGUF tables: spaces as `▁` (one prepended as
/// `prefix` says), unknown characters as their UTF-8 bytes (`<0xE6>`), merges from the scores.
fn sentencepiece_spec(
    tokens: &[&str],
    types: &[i64],
    scores: &[f64],
    prefix: SpacePrefix,
) -> Value {
    // one id per string: the last of equal strings, as a dict built in order keeps
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let vocab: serde_json::Map<String, Value> = ids
        .iter()
        .map(|(t, &i)| (t.to_string(), json!(i)))
        .collect();
    let unk = types
        .iter()
        .position(|&t| t == 2)
        .map(|i| tokens[i])
        .or_else(|| ids.contains_key("<unk>").then_some("<unk>"));
    let (normalizer, pre_tokenizer) = match prefix {
        SpacePrefix::EveryPiece => (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]}),
            Value::Null,
        ),
        SpacePrefix::FirstWord | SpacePrefix::None => (
            Value::Null,
            json!({"type": "Metaspace", "replacement": "\u{2581}", "split": false,
                   "prepend_scheme": if prefix == SpacePrefix::None { "never" } else { "first" }}),
        ),
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix != SpacePrefix::None {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added_tokens(tokens, types),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": sentencepiece_merges(tokens, scores, &ids)},
    })
}

/// A tokenizer for a model's text inputs.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepended by [`TextTokenizer::encode`] when the GGUF metadata asks for it
    /// (a `tokenizer.json` carries its own post-processor instead).
    bos: Option<u32>,
}

impl TextTokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            reason: format!("{}: {e}", path.display()),
        })?;
        Ok(Self { inner, bos: None })
    }

    /// Builds the tokenizer a GGUF file describes, as transformers and llama.cpp read it:
    /// byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the pre-tokenizer its
    /// `tokenizer.ggml.pre` names ([`byte_level_pre_tokenizer`]), or SentencePiece-style BPE
    /// (`"llama"`: merges derived from the tokens' scores, byte fallback, the `▁` space prefix).
    /// BOS is prepended when `tokenizer.ggml.add_bos_token` says so (SentencePiece: unless it
    /// says not to).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let err = |reason: String| Error::Tokenizer {
            reason: format!("{}: {reason}", file.path().display()),
        };
        let model = file
            .get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| err("no `tokenizer.ggml.model` metadata".into()))?;
        let array = |key: &str| {
            file.get(key)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| err(format!("no `{key}` array")))
        };
        let strings = |key: &str| -> Result<Vec<&str>> {
            array(key)?
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| err(format!("`{key}` holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match file
            .get("tokenizer.ggml.token_type")
            .and_then(GgufValue::as_array)
        {
            Some(a) => a
                .iter()
                .map(|v| match v {
                    GgufValue::Int(i) => Ok(*i),
                    _ => Err(err("`tokenizer.ggml.token_type` holds a non-integer".into())),
                })
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let flag = |key: &str| match file.get(key) {
            Some(GgufValue::Bool(b)) => Some(*b),
            _ => None,
        };
        let (spec, bos_by_default) = match model {
            "gpt2" => {
                let pre = file
                    .get("tokenizer.ggml.pre")
                    .and_then(GgufValue::as_str)
                    .unwrap_or("default");
                let merges = strings("tokenizer.ggml.merges")?;
                (
                    byte_level_spec(&tokens, &types, &merges, pre).map_err(err)?,
                    false,
                )
            }
            "llama" => {
                let scores = array("tokenizer.ggml.scores")?
                    .iter()
                    .map(|v| {
                        v.as_f64()
                            .ok_or_else(|| err("`tokenizer.ggml.scores` holds a non-number".into()))
                    })
                    .collect::<Result<Vec<f64>>>()?;
                if scores.len() != tokens.len() {
                    return Err(err(format!(
                        "{} scores for {} tokens",
                        scores.len(),
                        tokens.len()
                    )));
                }
                let prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let arch = file.get("general.architecture").and_then(GgufValue::as_str);
                (
                    sentencepiece_of(arch, prefix, &tokens, &types, &scores),
                    true,
                )
            }
            other => {
                return Err(err(format!(
                    "tokenizer model `{other}` is not supported (byte-level BPE `gpt2`, \
                     SentencePiece `llama`); give records as token ids instead"
                )))
            }
        };
        let inner = tokenizers::Tokenizer::from_str(&spec.to_string())
            .map_err(|e| err(format!("building the {model} tokenizer: {e}")))?;
        let bos = if flag("tokenizer.ggml.add_bos_token").unwrap_or(bos_by_default) {
            let id = file
                .get("tokenizer.ggml.bos_token_id")
                .and_then(GgufValue::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| err("add_bos_token is set but bos_token_id is missing".into()))?;
            Some(id)
        } else {
            None
        };
        Ok(Self { inner, bos })
    }

    /// Token ids of `text`, with the model's special tokens added as its tokenizer says. A
    /// text of more than 256 KiB is encoded a piece at a time ([`TextTokenizer::encode_in_pieces`]),
    /// so that memory stays bounded whatever its length.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_in_pieces(text, 256 << 10)
    }

    /// Token ids of `text` as [`TextTokenizer::encode`] gives them, the text cut into pieces
    /// of about `piece_bytes` bytes at word boundaries (before a single space between two
    /// other characters, where byte-level pre-tokenizers always split), each piece encoded on
    /// its own and the ids joined. Done only where this tokenizer gives the same ids on a cut
    /// sample and adds special tokens only in front; otherwise the whole text is encoded at
    /// once.
    pub fn encode_in_pieces(&self, text: &str, piece_bytes: usize) -> Result<Vec<u32>> {
        let cuts = word_cuts(text, piece_bytes.max(1));
        if cuts.is_empty() || !self.pieces_agree()? {
            return self.encode_whole(text, true);
        }
        // the pieces: [0, cut_0), [cut_0, cut_1), ..., [cut_last, len), encoded on all cores
        // (a few at a time: rayon's threads) and joined in order
        use rayon::prelude::*;
        let bounds: Vec<usize> = std::iter::once(0).chain(cuts).chain([text.len()]).collect();
        let pieces: Vec<Vec<u32>> = bounds
            .par_windows(2)
            .enumerate()
            .map(|(i, w)| self.encode_whole(&text[w[0]..w[1]], i == 0))
            .collect::<Result<_>>()?;
        Ok(pieces.concat())
    }

    /// Whether encoding in pieces gives what encoding whole does, on a sample.
    fn pieces_agree(&self) -> Result<bool> {
        const SAMPLE: &str = "The year 1911, a book. It is: here (and there)!";
        let whole = self.encode_whole(SAMPLE, true)?;
        let cut = SAMPLE.find(" book").unwrap_or(0);
        let mut pieces = self.encode_whole(&SAMPLE[..cut], true)?;
        pieces.extend(self.encode_whole(&SAMPLE[cut..], false)?);
        Ok(pieces == whole)
    }

    /// Ids of `text` in one call, special tokens (and the GGUF's BOS) added when `specials`.
    fn encode_whole(&self, text: &str, specials: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, specials)
            .map_err(|e| Error::Tokenizer {
                reason: format!("encoding: {e}"),
            })?;
        let bos = if specials { self.bos } else { None };
        Ok(bos
            .into_iter()
            .chain(encoding.get_ids().iter().copied())
            .collect())
    }

    /// Token ids of a text that carries its own special tokens (a rendered chat template),
    /// nothing added: as transformers' `apply_chat_template` tokenizes.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_whole(text, false)
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer {
            reason: format!("decoding: {e}"),
        })
    }

    /// The id of a token given as its vocabulary string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cuts fall before a single space between two other characters, at least a piece apart.
    #[test]
    fn cuts_are_word_boundaries() {
        let text = "aa bb  cc dd\nee ff";
        let cuts = word_cuts(text, 2);
        for &c in &cuts {
            assert_eq!(&text[c..c + 1], " ");
            assert!(!text[c - 1..c].trim().is_empty() && !text[c + 1..c + 2].trim().is_empty());
        }
        assert_eq!(cuts, vec![2, 9, 15]);
        assert!(word_cuts("short", 100).is_empty());
        assert!(word_cuts("nospacesatall", 2).is_empty());
    }
}
