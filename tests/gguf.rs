//! GGUF reading end to end: a fixture converted to GGUF the way llama.cpp does it (Q/K rows
//! permuted, tokenizer in metadata) must give Hugging Face's numbers; quantized tensors must
//! decode exactly; broken files must fail with a clear error, never a panic.

mod common;

use common::gguf_writer::{permute_rows, write_gguf, write_gguf_pointing, Encoding, Meta, Tensor};
use common::{devices, engine, expected, fixture_dir, max_abs_diff, policy, worst_diff};
use ferrogen::arch::{ModelConfig, ModelFiles};
use ferrogen::reference::ReferenceModel;
use ferrogen::Error;
use ferrogen::{EngineOptions, Placement};
use proptest::prelude::*;

const FIXTURE: &str = "llama-gqa-untied";

/// The fixture's tokenizer.json vocabulary (by id) and merges.
fn fixture_vocab() -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(fixture_dir(FIXTURE).join("tokenizer.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (tok, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = tok.clone();
    }
    let merges = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(pair) => format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ),
            other => panic!("merge {other}"),
        })
        .collect();
    (tokens, merges)
}

/// The fixture as GGUF tensors and metadata, 2-D weights in `encoding`.
fn fixture_as_gguf(encoding: Encoding) -> (Vec<(&'static str, Meta)>, Vec<Tensor>) {
    let files = ModelFiles::open(&fixture_dir(FIXTURE)).unwrap();
    let ModelConfig::Llama(c) = &files.config else {
        panic!()
    };
    let w = files.weights.as_ref();
    let read = |name: &str| {
        let info = w.info(name).unwrap();
        (w.load_f32(name, &info.shape).unwrap(), info.shape)
    };
    let mut tensors = Vec::new();
    let mut push = |gguf: String, hf: &str, permute_heads: Option<usize>| {
        let (mut data, shape) = read(hf);
        if let Some(heads) = permute_heads {
            data = permute_rows(&data, shape[0], shape[1], heads);
        }
        let enc = if shape.len() == 1 {
            Encoding::F32
        } else {
            encoding
        };
        tensors.push(Tensor {
            name: gguf,
            shape,
            ggml_type: enc.ggml_type(),
            data: enc.encode(&data),
        });
    };
    push(
        "token_embd.weight".into(),
        "model.embed_tokens.weight",
        None,
    );
    push("output_norm.weight".into(), "model.norm.weight", None);
    push("output.weight".into(), "lm_head.weight", None);
    for l in 0..c.num_hidden_layers {
        let hf = |s: &str| format!("model.layers.{l}.{s}.weight");
        let g = |s: &str| format!("blk.{l}.{s}.weight");
        push(g("attn_norm"), &hf("input_layernorm"), None);
        push(
            g("attn_q"),
            &hf("self_attn.q_proj"),
            Some(c.num_attention_heads),
        );
        push(g("attn_k"), &hf("self_attn.k_proj"), Some(c.kv_heads()));
        push(g("attn_v"), &hf("self_attn.v_proj"), None);
        push(g("attn_output"), &hf("self_attn.o_proj"), None);
        push(g("ffn_norm"), &hf("post_attention_layernorm"), None);
        push(g("ffn_gate"), &hf("mlp.gate_proj"), None);
        push(g("ffn_up"), &hf("mlp.up_proj"), None);
        push(g("ffn_down"), &hf("mlp.down_proj"), None);
    }
    let (tokens, merges) = fixture_vocab();
    let types = vec![1; tokens.len()];
    let meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        (
            "llama.context_length",
            Meta::U32(c.max_position_embeddings as u32),
        ),
        ("llama.embedding_length", Meta::U32(c.hidden_size as u32)),
        (
            "llama.feed_forward_length",
            Meta::U32(c.intermediate_size as u32),
        ),
        ("llama.block_count", Meta::U32(c.num_hidden_layers as u32)),
        (
            "llama.attention.head_count",
            Meta::U32(c.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv",
            Meta::U32(c.kv_heads() as u32),
        ),
        ("llama.attention.key_length", Meta::U32(c.head_dim() as u32)),
        ("llama.rope.dimension_count", Meta::U32(c.head_dim() as u32)),
        ("llama.rope.freq_base", Meta::F32(c.rope_theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Meta::F32(c.rms_norm_eps as f32),
        ),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", Meta::StrArray(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32Array(types)),
        ("tokenizer.ggml.merges", Meta::StrArray(merges)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(false)),
    ];
    (meta, tensors)
}

fn write_temp(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
    f
}

fn fixture_gguf_bytes(encoding: Encoding) -> Vec<u8> {
    let (meta, tensors) = fixture_as_gguf(encoding);
    write_gguf(&meta, &tensors)
}

#[test]
fn gguf_conversion_of_fixture_matches_transformers() {
    let file = write_temp(&fixture_gguf_bytes(Encoding::F32));
    let files = ModelFiles::open(file.path()).unwrap();
    let model = ReferenceModel::load(&files).unwrap();
    let exp = expected(FIXTURE);
    for seq in &exp.sequences {
        let got = model.token_logprobs(&[&seq.tokens]).unwrap();
        let diff = max_abs_diff(&got[0], &seq.token_logprobs);
        assert!(diff < 1e-4, "GGUF logprobs off by {diff}");
    }
    let tok = files.tokenizer().unwrap();
    for t in &exp.texts {
        assert_eq!(tok.encode(&t.text).unwrap(), t.tokens, "{:?}", t.text);
    }
}

#[test]
fn quantized_gguf_tensors_decode_exactly() {
    let reference = ModelFiles::open(&fixture_dir(FIXTURE)).unwrap();
    for encoding in [
        Encoding::F16,
        Encoding::Q8_0,
        Encoding::Q4_0,
        Encoding::Q4_1,
        Encoding::Q5_0,
    ] {
        let file = write_temp(&fixture_gguf_bytes(encoding));
        let gguf = ModelFiles::open(file.path()).unwrap();
        for name in reference.weights.names() {
            let shape = reference.weights.info(&name).unwrap().shape;
            let want = reference.weights.load_f32(&name, &shape).unwrap();
            let want = if shape.len() == 1 {
                want
            } else {
                encoding.round_trip(&want)
            };
            assert_eq!(
                gguf.weights.load_f32(&name, &shape).unwrap(),
                want,
                "{encoding:?} {name}"
            );
        }
    }
}

/// A GGUF whose linear weights are Q5_0 blocks (kept as blocks at run time, as the K-quants
/// are) scores as the reference decodes it on every device: resident, and with weights
/// streamed from RAM and disk under a binding budget.
#[test]
fn block_weights_run_on_every_device_under_budgets() {
    let file = write_temp(&fixture_gguf_bytes(Encoding::Q5_0));
    let exp = expected(FIXTURE);
    let batch: Vec<&[u32]> = exp.sequences.iter().map(|s| s.tokens.as_slice()).collect();
    let reference = ReferenceModel::load(&ModelFiles::open(file.path()).unwrap()).unwrap();
    let want = reference.token_logprobs(&batch).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for device in devices() {
        let p = policy(1, 2, (0.0, 20.0), (100.0, 0.0), (0.0, 0.0), true, true);
        let options =
            EngineOptions::new(Placement::Policy(p)).offload_dir(dir.path().to_path_buf());
        let engine = engine(device, ModelFiles::open(file.path()).unwrap(), options);
        let got = engine.token_logprobs(&batch).unwrap();
        let d = worst_diff(&got, &want);
        assert!(d < 1e-4, "{device:?}: {d}");
    }
}

/// Random blocks of every block format, decoded bit for bit as the `gguf` Python package's
/// `dequantize` does (tests/fixtures/blocks, written by scripts/make_block_fixtures.py).
#[test]
fn every_block_format_decodes_as_ggml_does() {
    use ferrogen::internals::ggml::BlockFormat;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blocks");
    let ids = [2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 23];
    for id in ids {
        let format = BlockFormat::from_ggml_type(id).unwrap();
        let path = dir.join(format!("{}.bin", format.name()));
        let bytes = std::fs::read(&path).unwrap();
        let n = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        let (blocks, values) = bytes[4..].split_at(n * format.block_bytes());
        let want: Vec<f32> = values
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(want.len(), n * format.block_len(), "{path:?}");
        let mut got = vec![f32::NAN; want.len()];
        format.decode(blocks, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{} value {i}: {g} vs {w}",
                format.name()
            );
        }
    }
}

fn open_and_load(bytes: &[u8]) -> ferrogen::Result<()> {
    let file = write_temp(bytes);
    let files = ModelFiles::open(file.path())?;
    ReferenceModel::load(&files).map(|_| ())
}

fn assert_format_error(bytes: &[u8], needle: &str) {
    match open_and_load(bytes) {
        Err(e @ Error::Format { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(".gguf") && msg.contains(needle), "{msg}");
        }
        other => panic!("expected a format error with {needle:?}, got {other:?}"),
    }
}

#[test]
fn broken_headers_are_named() {
    let good = fixture_gguf_bytes(Encoding::F32);
    let mut magic = good.clone();
    magic[..4].copy_from_slice(b"GGUX");
    assert_format_error(&magic, "bad magic");

    let mut version = good.clone();
    version[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert_format_error(&version, "version 9");

    // First metadata key length (after magic, version and the two counts) claims 2^40 bytes.
    let mut key = good.clone();
    key[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_format_error(&key, "bytes left");

    let mut count = good.clone();
    count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_format_error(&count, "tensor count");

    assert_format_error(&good[..good.len() - 40], "runs past the end");
    assert_format_error(&good[..100], "truncated");
    assert_format_error(&good[..10], "too short");
}

#[test]
fn unsupported_tensor_type_and_missing_metadata_are_named() {
    let (meta, mut tensors) = fixture_as_gguf(Encoding::F32);
    let victim = tensors
        .iter_mut()
        .find(|t| t.name == "blk.1.ffn_up.weight")
        .unwrap();
    victim.ggml_type = 16; // IQ2_XXS
    match open_and_load(&write_gguf(&meta, &tensors)) {
        Err(Error::UnsupportedDType { name, dtype, .. }) => {
            assert_eq!(
                (name.as_str(), dtype.as_str()),
                ("blk.1.ffn_up.weight", "IQ2_XXS")
            );
        }
        other => panic!("{other:?}"),
    }
    // a K-quant whose rows (64 values) are not whole super-blocks of 256
    let (meta, mut tensors) = fixture_as_gguf(Encoding::F32);
    let victim = tensors
        .iter_mut()
        .find(|t| t.name == "blk.1.ffn_up.weight")
        .unwrap();
    victim.ggml_type = 12; // Q4_K
    let err = open_and_load(&write_gguf(&meta, &tensors)).unwrap_err();
    assert!(
        err.to_string().contains(
            "`blk.1.ffn_up.weight`: rows of 64 elements are not whole Q4_K blocks of 256"
        ),
        "{err}"
    );

    let (meta, tensors) = fixture_as_gguf(Encoding::F32);
    let meta: Vec<_> = meta
        .into_iter()
        .filter(|(k, _)| *k != "llama.block_count")
        .collect();
    let err = open_and_load(&write_gguf(&meta, &tensors)).unwrap_err();
    assert!(
        matches!(err, Error::Config { .. }) && err.to_string().contains("llama.block_count"),
        "{err}"
    );
}

/// A file must describe itself consistently: a layer count that disagrees with the layer
/// tensors, a count that would size terabytes, a tokenizer with more tokens than the embedding
/// has rows, a head count of 0 or one that does not divide the width, a tensor whose type was
/// changed so that its bytes run into the next, one whose offset points at another, and a
/// dimension of 2^63 are each refused before any allocation with a message that says what is
/// wrong.
#[test]
fn files_that_lie_about_themselves_are_refused() {
    let with_meta = |key: &str, value: Meta| {
        let (meta, tensors) = fixture_as_gguf(Encoding::F32);
        let mut meta: Vec<_> = meta.into_iter().filter(|(k, _)| *k != key).collect();
        let key: &'static str = Box::leak(key.to_string().into_boxed_str());
        meta.push((key, value));
        write_gguf(&meta, &tensors)
    };
    let expect = |bytes: &[u8], needles: &[&str]| {
        let err = open_and_load(bytes).unwrap_err().to_string();
        assert!(needles.iter().all(|n| err.contains(n)), "{err}");
    };
    // the fixture has 2 layers
    expect(
        &with_meta("llama.block_count", Meta::U32(1)),
        &["blk.1.", "layer 1", "1 layers"],
    );
    expect(
        &with_meta("llama.block_count", Meta::U32(3)),
        &["layer 2 of 3 has no tensors"],
    );
    expect(
        &with_meta("llama.block_count", Meta::U32(1 << 31)),
        &["num_hidden_layers", "more than any model"],
    );
    expect(
        &with_meta("llama.attention.head_count", Meta::U32(0)),
        &["head_count` is 0"],
    );
    expect(
        &with_meta("llama.attention.head_count", Meta::U32(7)),
        &["7 is not a multiple of"],
    );
    let (tokens, _) = fixture_vocab();
    let more: Vec<String> = (0..400)
        .map(|i| tokens.get(i).cloned().unwrap_or(format!("x{i}")))
        .collect();
    expect(
        &with_meta("tokenizer.ggml.tokens", Meta::StrArray(more)),
        &["320 rows", "400 tokens"],
    );

    // a type changed so that the bytes run into the next tensor
    let (meta, mut tensors) = fixture_as_gguf(Encoding::F16);
    tensors[0].ggml_type = 0;
    expect(&write_gguf(&meta, &tensors), &["overlap", &tensors[0].name]);
    // an offset that points at another tensor
    let (meta, tensors) = fixture_as_gguf(Encoding::F32);
    let same = tensors
        .iter()
        .position(|t| t.data.len() == tensors[1].data.len() && t.name != tensors[1].name)
        .unwrap();
    expect(
        &write_gguf_pointing(&meta, &tensors, Some((same, 1))),
        &["overlap"],
    );
    // a dimension of 2^63
    let (meta, mut tensors) = fixture_as_gguf(Encoding::F32);
    let last = tensors.len() - 1;
    tensors[last].shape = vec![1 << 63];
    expect(
        &write_gguf(&meta, &tensors),
        &["more bytes than any file holds"],
    );
    // a type ferrogen cannot read names the type and the tensor
    let (meta, mut tensors) = fixture_as_gguf(Encoding::F32);
    tensors[2].ggml_type = 99;
    expect(
        &write_gguf(&meta, &tensors),
        &["ggml type 99 is not supported", &tensors[2].name],
    );
}

/// A tensor whose blocks hold a scale that cannot be represented once scaled (what a tensor
/// relabelled with another block type reads as) fails with the tensor and its type named.
#[test]
fn a_relabelled_quantized_tensor_is_named() {
    let (meta, mut tensors) = fixture_as_gguf(Encoding::Q4_0);
    let victim = tensors
        .iter()
        .position(|t| t.ggml_type == 2 && t.name.contains("ffn_up"))
        .unwrap();
    let blocks = tensors[victim].shape.iter().product::<usize>() / 32;
    // each Q4_0 block: an f16 scale, then 16 bytes of codes; the scale times -8 overflows f16
    tensors[victim].data = (0..blocks)
        .flat_map(|_| {
            let mut b = vec![0x11u8; 18];
            b[..2].copy_from_slice(&half::f16::MAX.to_bits().to_le_bytes());
            b
        })
        .collect();
    let name = tensors[victim].name.clone();
    let file = write_temp(&write_gguf(&meta, &tensors));
    let files = ModelFiles::open(file.path()).unwrap();
    let options =
        ferrogen::EngineOptions::new(ferrogen::Placement::Policy(ferrogen::Policy::all_on_gpu(1)))
            .device(ferrogen::DeviceKind::Wgpu);
    // (WebGPU rows take the scale times -8; without a WebGPU adapter there is nothing to check)
    let err = match ferrogen::Engine::open_with(files, options) {
        Err(ferrogen::Error::NoAdapter { .. }) => return,
        Err(e) => e,
        Ok(_) => panic!("a scale that overflows was accepted"),
    };
    let text = err.to_string();
    // (named by its Hugging Face name: `blk.0.attn_q.weight` is `model.layers.0.self_attn...`)
    assert!(
        text.contains("Q4_0") && text.contains("tensor `") && text.contains("overflows"),
        "{text} ({name})"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any truncation fails cleanly; random byte damage never panics or reads out of bounds.
    #[test]
    fn damaged_gguf_never_panics(cut in 0usize..100_000, flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let good = fixture_gguf_bytes(Encoding::F32);
        let cut = cut % good.len();
        prop_assert!(open_and_load(&good[..cut]).is_err());
        let mut damaged = good.clone();
        for (at, byte) in flips {
            let at = at % damaged.len();
            damaged[at] = byte;
        }
        let _ = open_and_load(&damaged);
    }
}
