//! Broken model directories and bad inputs: each gets an error naming the file and the reason,
//! never a panic or an out-of-bounds read.

mod common;

use std::path::Path;

use common::{copy_fixture, edit_safetensors, fixture_dir};
use ferrogen::arch::ModelFiles;
use ferrogen::reference::ReferenceModel;
use ferrogen::Error;
use proptest::prelude::*;

fn open_and_load(dir: &Path) -> ferrogen::Result<ReferenceModel> {
    ReferenceModel::load(&ModelFiles::open(dir)?)
}

fn expect_format(dir: &Path, needle: &str) {
    match open_and_load(dir) {
        Err(e @ Error::Format { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("model.safetensors") && msg.contains(needle),
                "{msg}"
            );
        }
        Err(other) => panic!("expected a format error with {needle:?}, got {other}"),
        Ok(_) => panic!("expected a format error with {needle:?}, got a model"),
    }
}

const TENSOR: &str = "model.layers.1.mlp.up_proj.weight";

#[test]
fn truncated_and_lying_safetensors_are_named() {
    let dir = copy_fixture("llama-tied");
    let path = dir.path().join("model.safetensors");
    let good = std::fs::read(&path).unwrap();

    std::fs::write(&path, &good[..good.len() - 10]).unwrap();
    expect_format(dir.path(), "truncated");

    std::fs::write(&path, &good[..5]).unwrap();
    expect_format(dir.path(), "too short");

    let mut lie = good.clone();
    lie[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, &lie).unwrap();
    expect_format(dir.path(), "header");

    let mut garbage = good.clone();
    garbage[8..20].copy_from_slice(b"not json at ");
    std::fs::write(&path, &garbage).unwrap();
    expect_format(dir.path(), "header");

    std::fs::write(&path, &good).unwrap();
    edit_safetensors(dir.path(), |h, _| {
        h[TENSOR]["data_offsets"][1] = serde_json::json!(999_999_999);
    });
    expect_format(dir.path(), "header");
}

#[test]
fn unknown_and_unsupported_dtypes_are_named() {
    let dir = copy_fixture("llama-tied");
    edit_safetensors(dir.path(), |h, _| h[TENSOR]["dtype"] = "Q9".into());
    expect_format(dir.path(), "header");

    let dir = copy_fixture("llama-tied");
    // I32 has F32's size, so the header stays consistent; the type is what is wrong.
    edit_safetensors(dir.path(), |h, _| h[TENSOR]["dtype"] = "I32".into());
    match open_and_load(dir.path()) {
        Err(Error::UnsupportedDType { path, name, dtype }) => {
            assert!(path.ends_with("model.safetensors"), "{path:?}");
            assert_eq!((name.as_str(), dtype.as_str()), (TENSOR, "I32"));
        }
        other => panic!("{:?}", other.err()),
    }
}

/// A 16-bit integer tensor (same size as f16) is named with its type when the model opens,
/// not taken for a missing tensor; a layer count that disagrees with the layer tensors, or
/// that would size terabytes, is refused before anything is allocated.
#[test]
fn unreadable_types_and_lying_layer_counts_are_named() {
    let dir = copy_fixture("llama-gqa-untied");
    let tensor = "model.layers.1.mlp.up_proj.weight";
    edit_safetensors(dir.path(), |h, _| h[tensor]["dtype"] = "I16".into());
    let msg = ModelFiles::open(dir.path()).err().unwrap().to_string();
    assert!(
        msg.contains("I16 is not supported") && msg.contains(tensor),
        "{msg}"
    );

    for (layers, needles) in [
        (1u64, &["model.layers.1.", "1 layers"][..]),
        (3, &["layer 2 of 3 has no tensors"]),
        (1 << 40, &["num_hidden_layers", "more than any model"]),
    ] {
        let dir = copy_fixture("llama-gqa-untied");
        let config_path = dir.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        config["num_hidden_layers"] = layers.into();
        std::fs::write(&config_path, config.to_string()).unwrap();
        let msg = ModelFiles::open(dir.path()).err().unwrap().to_string();
        assert!(needles.iter().all(|n| msg.contains(n)), "{layers}: {msg}");
    }
}

#[test]
fn wrong_shapes_and_missing_tensors_are_named() {
    let dir = copy_fixture("llama-tied");
    edit_safetensors(dir.path(), |h, _| {
        let shape = h[TENSOR]["shape"].clone();
        h[TENSOR]["shape"] = serde_json::json!([shape[1], shape[0]]);
    });
    match open_and_load(dir.path()) {
        Err(Error::TensorShape {
            name,
            expected,
            found,
            ..
        }) => {
            assert_eq!(name, TENSOR);
            assert_eq!(expected, vec![found[1], found[0]]);
        }
        other => panic!("{:?}", other.err()),
    }

    // An untied config needs lm_head.weight, which the tied checkpoint lacks.
    let dir = copy_fixture("llama-tied");
    let config_path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace(
            "\"tie_word_embeddings\": true",
            "\"tie_word_embeddings\": false",
        ),
    )
    .unwrap();
    match open_and_load(dir.path()) {
        Err(e @ Error::MissingTensor { .. }) => assert!(e.to_string().contains("lm_head.weight")),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn bad_config_json_is_named() {
    let dir = copy_fixture("opt-post-ln");
    let config_path = dir.path().join("config.json");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let mut missing = config.clone();
    missing.as_object_mut().unwrap().remove("ffn_dim");
    std::fs::write(&config_path, missing.to_string()).unwrap();
    let err = open_and_load(dir.path()).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::Config { .. }), "{msg}");
    assert!(
        msg.contains("config.json") && msg.contains("ffn_dim"),
        "{msg}"
    );

    std::fs::write(&config_path, "{\"model_type\": \"opt\",").unwrap();
    let msg = open_and_load(dir.path()).err().unwrap().to_string();
    assert!(msg.contains("not valid JSON"), "{msg}");

    std::fs::remove_file(&config_path).unwrap();
    let msg = open_and_load(dir.path()).err().unwrap().to_string();
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn token_ids_out_of_range_and_overlong_sequences_are_errors() {
    let model = open_and_load(&fixture_dir("llama-tied")).unwrap();
    let vocab = model.config().vocab_size() as u32;
    match model.token_logprobs(&[&[1, 2, vocab]]) {
        Err(Error::TokenOutOfRange {
            token, position, ..
        }) => assert_eq!((token, position), (vocab, 2)),
        other => panic!("{other:?}"),
    }
    let too_long = vec![1u32; model.config().max_context() + 1];
    assert!(matches!(
        model.token_logprobs(&[&too_long]),
        Err(Error::SequenceTooLong { .. })
    ));
    assert!(matches!(
        model.token_logprobs(&[&[5]]),
        Err(Error::SequenceTooShort { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Random damage to a safetensors file never panics; truncation always fails.
    #[test]
    fn damaged_safetensors_never_panic(cut in any::<usize>(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let dir = copy_fixture("llama-tied");
        let path = dir.path().join("model.safetensors");
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, &good[..cut % good.len()]).unwrap();
        prop_assert!(open_and_load(dir.path()).is_err());
        let mut damaged = good.clone();
        for (at, byte) in flips {
            let at = at % damaged.len();
            damaged[at] = byte;
        }
        std::fs::write(&path, &damaged).unwrap();
        let _ = open_and_load(dir.path());
    }
}
