//! Helpers shared by the integration tests: fixture paths and expected-value files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod gguf_writer;

/// The committed fixture models, made by scripts/make_fixtures.py.
pub const FIXTURES: [&str; 4] = [
    "opt-pre-ln-proj",
    "opt-post-ln",
    "llama-gqa-untied",
    "llama-tied",
];

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[derive(Deserialize)]
pub struct Scored {
    pub tokens: Vec<u32>,
    pub token_logprobs: Vec<f64>,
}

#[derive(Deserialize)]
pub struct ScoredText {
    pub text: String,
    pub tokens: Vec<u32>,
    pub token_logprobs: Vec<f64>,
}

#[derive(Deserialize)]
pub struct Greedy {
    pub prompt: Vec<u32>,
    pub new_tokens: Vec<u32>,
}

/// A fixture's expected.json.
#[derive(Deserialize)]
pub struct Expected {
    pub sequences: Vec<Scored>,
    pub texts: Vec<ScoredText>,
    pub greedy: Greedy,
}

pub fn expected(name: &str) -> Expected {
    let path = fixture_dir(name).join("expected.json");
    let text = std::fs::read_to_string(&path).expect("fixture expected.json");
    serde_json::from_str(&text).expect("valid expected.json")
}

/// Largest absolute difference, asserting equal lengths.
pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - y).abs())
        .fold(0.0, f64::max)
}

/// A writable copy of a fixture directory.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// Splits a safetensors file into its header JSON and data section.
pub fn split_safetensors(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

pub fn join_safetensors(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let h = header.to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// Rewrites `model.safetensors` of `dir` through `edit(header, data)`.
pub fn edit_safetensors(dir: &Path, edit: impl FnOnce(&mut serde_json::Value, &mut Vec<u8>)) {
    let path = dir.join("model.safetensors");
    let (mut header, mut data) = split_safetensors(&std::fs::read(&path).unwrap());
    edit(&mut header, &mut data);
    std::fs::write(&path, join_safetensors(&header, &data)).unwrap();
}
