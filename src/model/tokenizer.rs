//! Text tokenization through the `tokenizers` crate, from `tokenizer.json` or GGUF metadata.

use std::path::Path;
use std::str::FromStr;

use serde_json::json;

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

    /// Builds the tokenizer a GGUF file describes: byte-level BPE (`tokenizer.ggml.model =
    /// "gpt2"`) with the pre-tokenizer its `tokenizer.ggml.pre` names (`smollm`: digits split
    /// one by one, then GPT-2 byte-level pre-tokenization; `gpt2`/`default`: byte-level only).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let err = |reason: String| Error::Tokenizer {
            reason: format!("{}: {reason}", file.path().display()),
        };
        let model = file
            .get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| err("no `tokenizer.ggml.model` metadata".into()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`); \
                 give records as token ids instead"
            )));
        }
        let strings = |key: &str| -> Result<Vec<&str>> {
            file.get(key)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| err(format!("no `{key}` array")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| err(format!("`{key}` holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
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
        let pre = file
            .get("tokenizer.ggml.pre")
            .and_then(GgufValue::as_str)
            .unwrap_or("default");
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                                "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = match pre {
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]}),
            "gpt2" | "default" => byte_level.clone(),
            other => {
                return Err(err(format!(
                    "pre-tokenizer `{other}` is not supported (smollm, gpt2, default); \
                     give records as token ids instead"
                )))
            }
        };
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.to_string(), json!(id)))
            .collect();
        // Control (3) and user-defined (4) tokens match whole in text, as in tokenizer.json.
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &t))| t == 3 || t == 4)
            .map(|(id, (content, &t))| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": t == 3})
            })
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let inner = tokenizers::Tokenizer::from_str(&spec.to_string())
            .map_err(|e| err(format!("building the BPE tokenizer: {e}")))?;
        let add_bos = matches!(
            file.get("tokenizer.ggml.add_bos_token"),
            Some(GgufValue::Bool(true))
        );
        let bos = if add_bos {
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
