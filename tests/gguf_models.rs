//! GGUF files as people download them: K-quant mixes (Q4_K_M, Q5_K_M, Q6_K, Q2_K, IQ4_XS) of
//! tiny random Llama (SentencePiece vocabulary), Llama 3 (`llama-bpe`, RoPE scaling), Qwen2 and
//! Qwen3 checkpoints, converted and quantized by llama.cpp's own tools (tests/fixtures/gguf,
//! written by scripts/make_gguf_fixtures.py), against transformers loading the same files:
//! the token ids of texts in several scripts with code, digits, runs of whitespace and special
//! tokens; every token's logprob; the greedy tokens. The reference, then the engine on every
//! device with most weights on disk.

mod common;

use std::path::PathBuf;

use common::{devices, engine, max_abs_diff, policy, Expected};
use ferrogen::arch::ModelFiles;
use ferrogen::engine::{EngineOptions, Placement};
use ferrogen::model::ChatMessage;
use ferrogen::reference::ReferenceModel;

/// Per-token tolerance against transformers (float64 from the same dequantized weights).
const TOLERANCE: f64 = 2e-4;

/// Every fixture file with what transformers computed from it.
fn fixtures() -> Vec<(PathBuf, Expected)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let mut out = Vec::new();
    for model in std::fs::read_dir(&root).expect("tests/fixtures/gguf") {
        for entry in std::fs::read_dir(model.unwrap().path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "gguf") {
                let text = std::fs::read_to_string(path.with_extension("json")).unwrap();
                out.push((path, serde_json::from_str(&text).unwrap()));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 8, "fixtures lost: {out:?}", out = out.len());
    out
}

fn name(path: &std::path::Path) -> String {
    let parts: Vec<_> = path.iter().rev().take(2).collect();
    format!(
        "{}/{}",
        parts[1].to_string_lossy(),
        parts[0].to_string_lossy()
    )
}

#[test]
fn texts_tokenize_as_transformers_reads_the_file() {
    for (path, exp) in fixtures() {
        let files = ModelFiles::open(&path).unwrap();
        let tokenizer = files.tokenizer().unwrap();
        for t in &exp.texts {
            let ids = tokenizer.encode(&t.text).unwrap();
            assert_eq!(ids, t.tokens, "{}: {:?}", name(&path), t.text);
        }
    }
}

/// What transformers' `apply_chat_template` made of the file's template.
#[derive(serde::Deserialize)]
struct Chat {
    messages: Vec<ChatMessage>,
    text: String,
    tokens: Vec<u32>,
}

#[test]
fn chat_messages_render_and_tokenize_as_transformers() {
    for (path, _) in fixtures() {
        let text = std::fs::read_to_string(path.with_extension("json")).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let chat: Chat = serde_json::from_value(value["chat"].clone()).unwrap();
        let files = ModelFiles::open(&path).unwrap();
        let rendered = files
            .chat_template()
            .unwrap()
            .render(&chat.messages, true)
            .unwrap();
        assert_eq!(rendered, chat.text, "{}", name(&path));
        let ids = files
            .tokenizer()
            .unwrap()
            .encode_rendered(&rendered)
            .unwrap();
        assert_eq!(ids, chat.tokens, "{}", name(&path));
    }
}

#[test]
fn reference_scores_and_generates_as_transformers() {
    for (path, exp) in fixtures() {
        let files = ModelFiles::open(&path).unwrap();
        let reference = ReferenceModel::load(&files).unwrap();
        let scored = exp
            .sequences
            .iter()
            .map(|s| (&s.tokens, &s.token_logprobs))
            .chain(exp.texts.iter().map(|t| (&t.tokens, &t.token_logprobs)));
        for (tokens, want) in scored {
            let got = reference.token_logprobs(&[tokens]).unwrap();
            let d = max_abs_diff(&got[0], want);
            assert!(
                d < TOLERANCE,
                "{}: len {} off by {d}",
                name(&path),
                tokens.len()
            );
        }
        let g = &exp.greedy;
        let out = reference
            .generate_greedy(&[&g.prompt], g.new_tokens.len(), None)
            .unwrap();
        assert_eq!(out[0], g.new_tokens, "{}", name(&path));
    }
}

/// 90% of the weights on disk, the rest in RAM (and none on the GPU), two batches per block.
#[test]
fn engine_with_weights_on_disk_scores_and_generates_as_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for device in devices() {
        for (path, exp) in fixtures() {
            let p = policy(1, 2, (0.0, 10.0), (100.0, 0.0), (0.0, 0.0), true, true);
            let options =
                EngineOptions::new(Placement::Policy(p)).offload_dir(dir.path().to_path_buf());
            let engine = engine(device, ModelFiles::open(&path).unwrap(), options);
            let batch: Vec<&[u32]> = exp
                .sequences
                .iter()
                .map(|s| s.tokens.as_slice())
                .chain(exp.texts.iter().map(|t| t.tokens.as_slice()))
                .collect();
            let want = exp
                .sequences
                .iter()
                .map(|s| &s.token_logprobs)
                .chain(exp.texts.iter().map(|t| &t.token_logprobs));
            let got = engine.token_logprobs(&batch).unwrap();
            for (g, w) in got.iter().zip(want) {
                let d = max_abs_diff(g, w);
                assert!(d < TOLERANCE, "{device:?} {}: off by {d}", name(&path));
            }
            let g = &exp.greedy;
            let out = engine
                .generate(&[&g.prompt], g.new_tokens.len(), &[])
                .unwrap();
            assert_eq!(out[0].tokens, g.new_tokens, "{device:?} {}", name(&path));
        }
    }
}
