//! The CPU reference against Hugging Face transformers (float64) on tiny random checkpoints of
//! both families: per-token logprobs, tokenization, greedy generation, and KV-cache decoding.

mod common;

use common::{expected, fixture_dir, max_abs_diff, FIXTURES};
use ferrogen::arch::ModelFiles;
use ferrogen::reference::ReferenceModel;

/// Per-token tolerance required by the foundation issue.
const TOLERANCE: f64 = 1e-4;

fn load(name: &str) -> (ModelFiles, ReferenceModel) {
    let files = ModelFiles::open(&fixture_dir(name)).expect("open fixture");
    let model = ReferenceModel::load(&files).expect("load fixture");
    (files, model)
}

#[test]
fn ragged_batch_logprobs_match_transformers() {
    for name in FIXTURES {
        let (_, model) = load(name);
        let exp = expected(name);
        let batch: Vec<&[u32]> = exp.sequences.iter().map(|s| s.tokens.as_slice()).collect();
        let got = model.token_logprobs(&batch).unwrap();
        for (g, e) in got.iter().zip(&exp.sequences) {
            let diff = max_abs_diff(g, &e.token_logprobs);
            assert!(
                diff < TOLERANCE,
                "{name}: len {} off by {diff}",
                e.tokens.len()
            );
        }
    }
}

#[test]
fn text_is_tokenized_and_scored_like_transformers() {
    let mut checked = 0;
    for name in FIXTURES {
        let (files, model) = load(name);
        for t in expected(name).texts {
            let ids = files.tokenizer().unwrap().encode(&t.text).unwrap();
            assert_eq!(ids, t.tokens, "{name}: tokens of {:?}", t.text);
            let got = model.token_logprobs(&[&ids]).unwrap();
            let diff = max_abs_diff(&got[0], &t.token_logprobs);
            assert!(diff < TOLERANCE, "{name}: {:?} off by {diff}", t.text);
            checked += 1;
        }
    }
    assert!(checked >= 4, "fixtures lost their texts");
}

#[test]
fn greedy_generation_matches_transformers() {
    for name in FIXTURES {
        let (_, model) = load(name);
        let g = expected(name).greedy;
        let out = model
            .generate_greedy(&[&g.prompt], g.new_tokens.len(), None)
            .unwrap();
        assert_eq!(out[0], g.new_tokens, "{name}");
    }
}

#[test]
fn kv_cache_decode_equals_full_recompute() {
    for name in FIXTURES {
        let (_, model) = load(name);
        let exp = expected(name);
        let seqs: Vec<&[u32]> = exp.sequences.iter().map(|s| s.tokens.as_slice()).collect();
        let full = model.token_logprobs(&seqs).unwrap();
        // Decode every sequence in uneven chunks (a prefix, then 1 or 3 tokens per step), all
        // sequences in one ragged batch per step, and score each new token from the logits.
        let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache()).collect();
        let mut got: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
        let mut done = vec![0usize; seqs.len()];
        let mut step = 0;
        while done.iter().zip(&seqs).any(|(d, s)| d < &s.len()) {
            let chunk = if step == 0 { 2 } else { 1 + 2 * (step % 2) };
            let live: Vec<usize> = (0..seqs.len())
                .filter(|&i| done[i] < seqs[i].len())
                .collect();
            let batch: Vec<&[u32]> = live
                .iter()
                .map(|&i| &seqs[i][done[i]..(done[i] + chunk).min(seqs[i].len())])
                .collect();
            let mut step_caches: Vec<_> = live.iter().map(|&i| caches[i].clone()).collect();
            let hidden = model.forward(&batch, &mut step_caches).unwrap();
            let logits = model.logits(hidden.view());
            let mut row = 0;
            for ((&i, part), cache) in live.iter().zip(&batch).zip(step_caches) {
                for j in 0..part.len() {
                    let pos = done[i] + j;
                    if pos + 1 < seqs[i].len() {
                        let target = seqs[i][pos + 1] as usize;
                        let lp = ferrogen::internals::log_softmax_at(logits.row(row), target);
                        got[i].push(lp);
                    }
                    row += 1;
                }
                done[i] += part.len();
                caches[i] = cache;
            }
            step += 1;
        }
        for (i, (g, f)) in got.iter().zip(&full).enumerate() {
            assert_eq!(g.len(), f.len());
            for (a, b) in g.iter().zip(f) {
                // Same math, different f32 summation order: equal to ~1e-6 relative.
                let tol = 1e-5 * b.abs().max(1.0);
                assert!((a - b).abs() < tol, "{name} seq {i}: {a} vs {b}");
            }
            assert_eq!(caches[i].len(), seqs[i].len());
        }
    }
}

#[test]
fn opt_checkpoint_without_model_prefix_loads() {
    // Some OPT checkpoints name tensors `decoder.*` rather than transformers' `model.decoder.*`.
    let name = "opt-post-ln";
    let dir = common::copy_fixture(name);
    common::edit_safetensors(dir.path(), |header, _| {
        let renamed: serde_json::Map<String, serde_json::Value> = header
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.strip_prefix("model.").unwrap_or(k).to_string(), v.clone()))
            .collect();
        *header = serde_json::Value::Object(renamed);
    });
    let files = ModelFiles::open(dir.path()).unwrap();
    assert_eq!(files.parts().embedding.name, "decoder.embed_tokens.weight");
    let model = ReferenceModel::load(&files).unwrap();
    let seq = &expected(name).sequences[3];
    let got = model.token_logprobs(&[&seq.tokens]).unwrap();
    assert!(max_abs_diff(&got[0], &seq.token_logprobs) < TOLERANCE);
}
