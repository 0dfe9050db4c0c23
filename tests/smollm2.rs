//! The real test model, SmolLM2-135M-Instruct (Q4_1 GGUF), against Hugging Face transformers.
//!
//! The model is fetched by `scripts/fetch-model.sh` into `~/.cache/ferrogen/` (or
//! `$FERROGEN_CACHE`). Without it these tests fail and say how to fetch it, unless
//! `FERROGEN_OFFLINE=1` is set, in which case they are skipped.

mod common;

use std::sync::OnceLock;

use common::{budgets, devices, engine, gpu_context, policy, resident, worst_diff};
use ferrogen::arch::ModelFiles;
use ferrogen::device::DeviceKind;
use ferrogen::reference::ReferenceModel;
use serde::Deserialize;

struct Loaded {
    files: ModelFiles,
    model: ReferenceModel,
}

/// The model, loaded once for all tests; `None` when offline mode skips them.
fn smollm2() -> Option<&'static Loaded> {
    static MODEL: OnceLock<Loaded> = OnceLock::new();
    let path = common::smollm2_path()?;
    Some(MODEL.get_or_init(|| {
        let files = ModelFiles::open(&path).expect("open SmolLM2");
        let model = ReferenceModel::load(&files).expect("load SmolLM2");
        Loaded { files, model }
    }))
}

#[derive(Deserialize)]
struct Reference {
    britannica: Britannica,
    greedy: Greedy,
    tokenizer: Vec<TokenizedString>,
    chat: Chat,
}
#[derive(Deserialize)]
struct Chat {
    messages: Vec<ferrogen::model::ChatMessage>,
    text: String,
    tokens: Vec<u32>,
    new_tokens: Vec<u32>,
}
#[derive(Deserialize)]
struct Britannica {
    tokens: Vec<u32>,
    token_logprobs: Vec<f64>,
    ppl: f64,
}
#[derive(Deserialize)]
struct Greedy {
    prompt: String,
    new_tokens: Vec<u32>,
}
#[derive(Deserialize)]
struct TokenizedString {
    text: String,
    tokens: Vec<u32>,
}

fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2/reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn config_comes_from_gguf_metadata() {
    let Some(m) = smollm2() else { return };
    let ferrogen::arch::ModelConfig::Llama(c) = &m.files.config else {
        panic!("SmolLM2 is a Llama")
    };
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.kv_heads()
        ),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (c.vocab_size, c.intermediate_size, c.head_dim()),
        (49152, 1536, 64)
    );
    assert!(c.tie_word_embeddings);
}

#[test]
fn reference_greedy_continuation_matches_transformers() {
    let Some(m) = smollm2() else { return };
    let r = reference().greedy;
    let tok = m.files.tokenizer().unwrap();
    let prompt = tok.encode(&r.prompt).unwrap();
    let out = m.model.generate_greedy(&[&prompt], 3, None).unwrap();
    assert_eq!(tok.decode(&out[0]).unwrap(), " Paris.\n");
    assert_eq!(out[0], r.new_tokens[..3]);
}

/// The file's own chat template renders and tokenizes the messages as transformers'
/// `apply_chat_template` does, and the engine (the default device, weights streamed from disk)
/// answers with transformers' greedy tokens ("The capital of France is Paris.").
#[test]
fn chat_messages_answer_as_transformers() {
    use ferrogen::engine::{EngineOptions, Placement};
    let Some(m) = smollm2() else { return };
    let chat = reference().chat;
    let text = m
        .files
        .chat_template()
        .unwrap()
        .render(&chat.messages, true)
        .unwrap();
    assert_eq!(text, chat.text);
    let tok = m.files.tokenizer().unwrap();
    let ids = tok.encode_rendered(&text).unwrap();
    assert_eq!(ids, chat.tokens);
    let dir = tempfile::tempdir().unwrap();
    let p = policy(1, 1, (0.0, 20.0), (100.0, 0.0), (0.0, 0.0), true, false);
    let options = EngineOptions::new(Placement::Policy(p)).offload_dir(dir.path().to_path_buf());
    let files = ModelFiles::open(m.files.path.as_path()).unwrap();
    let engine = engine(DeviceKind::Cpu, files, options);
    let out = engine
        .generate(&[&ids], chat.new_tokens.len(), &[])
        .unwrap();
    assert_eq!(out[0].tokens, chat.new_tokens);
    let answer = tok.decode(&out[0].tokens).unwrap();
    assert!(
        answer.starts_with("The capital of France is Paris."),
        "{answer}"
    );
}

#[test]
fn tokenizer_matches_transformers() {
    let Some(m) = smollm2() else { return };
    let tok = m.files.tokenizer().unwrap();
    for s in reference().tokenizer {
        assert_eq!(tok.encode(&s.text).unwrap(), s.tokens, "{:?}", s.text);
    }
}

/// A long text encoded in pieces (as every text over 256 KiB is, so that memory stays
/// bounded) gives the ids of encoding it whole, whatever the piece size.
#[test]
fn long_texts_encode_in_pieces_as_whole() {
    let Some(m) = smollm2() else { return };
    let text = std::fs::read_to_string(common::cache_dir().join("britannica-11th.txt"))
        .expect("britannica-11th.txt (fetched by scripts/fetch-model.sh)");
    let tok = m.files.tokenizer().unwrap();
    let whole = tok.encode_in_pieces(&text, usize::MAX).unwrap();
    assert!(whole.len() > 50_000);
    for piece in [1_000, 4_096, 65_536] {
        assert!(
            tok.encode_in_pieces(&text, piece).unwrap() == whole,
            "pieces of {piece}"
        );
    }
    assert!(tok.encode(&text).unwrap() == whole);
}

#[test]
fn britannica_perplexity_matches_transformers() {
    let Some(m) = smollm2() else { return };
    let r = reference().britannica;
    let text = std::fs::read_to_string(common::cache_dir().join("britannica-11th.txt"))
        .expect("britannica-11th.txt (fetched by scripts/fetch-model.sh)");
    let ids = m.files.tokenizer().unwrap().encode(&text).unwrap();
    assert_eq!(
        ids[..512],
        r.tokens[..],
        "tokenization of britannica-11th.txt"
    );
    let lp = &m.model.token_logprobs(&[&ids[..512]]).unwrap()[0];
    let ppl = (-lp.iter().map(|&v| f64::from(v)).sum::<f64>() / lp.len() as f64).exp();
    assert!(
        (r.ppl - 17.83).abs() / 17.83 < 0.005,
        "HF reference moved: {}",
        r.ppl
    );
    assert!(
        (ppl - 17.83).abs() / 17.83 < 0.005,
        "perplexity {ppl} is not within 0.5% of 17.83"
    );
    let worst = lp
        .iter()
        .zip(&r.token_logprobs)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "britannica: ppl {ppl:.4} (HF {:.4}), worst per-token diff {worst:.2e}",
        r.ppl
    );
    assert!(
        worst < 1e-3,
        "per-token logprobs differ from HF by up to {worst}"
    );
}

#[test]
fn resident_models_match_reference_on_britannica() {
    let Some(m) = smollm2() else { return };
    let ids = &reference().britannica.tokens[..256];
    let want = m.model.token_logprobs(&[ids]).unwrap();
    let tok = m.files.tokenizer().unwrap();
    let prompt = tok.encode("The capital of France is").unwrap();
    for device in devices() {
        let model = resident(device, &m.files, Default::default());
        let got = model.token_logprobs(&[ids]);
        let worst = worst_diff(&got, &want);
        eprintln!(
            "{device:?} vs reference, 256 britannica tokens: worst per-token diff {worst:.2e}"
        );
        assert!(worst < 1e-3, "{device:?}: {worst}");
        let out = model.generate_greedy(&[&prompt], 3);
        assert_eq!(tok.decode(&out[0]).unwrap(), " Paris.\n", "{device:?}");
    }
}

/// 90% of the weights on disk, the cache and activations split over CPU and disk, budgets far
/// below the model's size: the same numbers as the all-resident model on the same device,
/// within the budgets (on the CPU device, one RAM budget of both).
#[test]
fn engine_with_weights_on_disk_matches_resident() {
    use ferrogen::engine::{EngineOptions, Placement};
    use ferrogen::policy::Policy;
    use ferrogen::Tier;
    let Some(m) = smollm2() else { return };
    let policy = Policy {
        gpu_batch_size: 2,
        num_gpu_batches: 2,
        w_gpu_percent: 0.0,
        w_cpu_percent: 10.0,
        cache_gpu_percent: 0.0,
        cache_cpu_percent: 50.0,
        act_gpu_percent: 0.0,
        act_cpu_percent: 50.0,
        ..Policy::all_on_gpu(2)
    };
    let tokens = &reference().britannica.tokens;
    let seqs: Vec<&[u32]> = (0..4).map(|i| &tokens[i * 64..(i + 1) * 64]).collect();
    let tok = m.files.tokenizer().unwrap();
    let prompt = tok.encode("The capital of France is").unwrap();
    for device in devices() {
        let resident = resident(device, &m.files, Default::default());
        let dir = tempfile::tempdir().unwrap();
        let (gpu_budget, cpu_budget) = budgets(device, 48 << 20, 96 << 20);
        let options = EngineOptions::new(Placement::Policy(policy.clone()))
            .gpu_budget(gpu_budget)
            .cpu_budget(cpu_budget)
            .offload_dir(dir.path().to_path_buf());
        let path = common::smollm2_path().unwrap();
        let engine = engine(device, ModelFiles::open(&path).unwrap(), options);
        let w = engine.weight_bytes();
        let total: u64 = w.iter().sum();
        assert!(w[2] as f64 >= 0.89 * total as f64, "{device:?} {w:?}");

        let got = engine.token_logprobs(&seqs).unwrap();
        let want = resident.token_logprobs(&seqs);
        let worst = worst_diff(&got, &want);
        eprintln!(
            "{device:?} engine (90% of weights on disk) vs resident: worst per-token diff {worst:.2e}"
        );
        assert!(worst < 1e-4, "{device:?}: {worst}");

        let out = engine.generate(&[&prompt, &tokens[..7]], 3, &[]).unwrap();
        assert_eq!(
            tok.decode(&out[0].tokens).unwrap(),
            " Paris.\n",
            "{device:?}"
        );
        let peaks = engine.peaks();
        assert!(
            peaks[Tier::Gpu.index()] <= gpu_budget && peaks[Tier::Cpu.index()] <= cpu_budget,
            "{device:?}: {peaks:?}"
        );
        eprintln!("{device:?} peaks: {peaks:?}");
    }
}

/// The smallest budgets the issue names: GPU 24 MiB and CPU 40 MiB on WebGPU (one RAM budget
/// of 64 MiB on the CPU device), with the placement the policy search picks. Every weight byte
/// is under the policy (the output projection streams in panels, the embedding table is read
/// from RAM or disk a row at a time), so the model scores there with the resident numbers and
/// the ledger's peaks within the budgets.
#[test]
fn smallest_budgets_score_with_the_resident_numbers() {
    use ferrogen::engine::EngineOptions;
    let Some(m) = smollm2() else { return };
    let tokens = &reference().britannica.tokens;
    let seqs: Vec<&[u32]> = (0..2).map(|i| &tokens[i * 96..(i + 1) * 96]).collect();
    for device in devices() {
        let resident = resident(device, &m.files, Default::default());
        let want = resident.token_logprobs(&seqs);
        let dir = tempfile::tempdir().unwrap();
        let (gpu_budget, cpu_budget) = budgets(device, 24 << 20, 40 << 20);
        let options = EngineOptions::new(common::searched(96))
            .gpu_budget(gpu_budget)
            .cpu_budget(cpu_budget)
            .offload_dir(dir.path().to_path_buf());
        let path = common::smollm2_path().unwrap();
        let engine = engine(device, ModelFiles::open(&path).unwrap(), options);
        let got = engine.token_logprobs(&seqs).unwrap();
        let worst = worst_diff(&got, &want);
        let peaks = engine.peaks();
        eprintln!("{device:?} at 24/40 MiB: worst diff {worst:.2e}, peaks {peaks:?}");
        assert!(worst < 1e-4, "{device:?}: {worst}");
        if device == DeviceKind::Cpu {
            assert!(peaks[0] <= cpu_budget, "{peaks:?}");
        } else {
            assert!(
                peaks[0] <= gpu_budget && peaks[1] <= cpu_budget,
                "{peaks:?}"
            );
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4))]

    /// Random placements of SmolLM2 (weights, cache and activations over the three tiers,
    /// batching, overlap, sep_layer, CPU attention) on either device: the resident model's
    /// numbers on that device.
    #[test]
    fn engine_policies_on_smollm2_match_resident(
        on_cpu: bool,
        w in (0u32..=10, 0u32..=10),
        c in (0u32..=10, 0u32..=10),
        h in (0u32..=10, 0u32..=10),
        gbs in 1usize..3,
        nb in 1usize..3,
        overlap: bool,
        sep_layer: bool,
        cpu_cache_compute: bool,
    ) {
        use ferrogen::engine::{EngineOptions, Placement};
        use ferrogen::policy::Policy;
        let Some(m) = smollm2() else { return Ok(()) };
        let device = if on_cpu || gpu_context().is_none() { DeviceKind::Cpu } else { DeviceKind::Wgpu };
        let pct = |(g, c): (u32, u32)| (f64::from(g * 10), f64::from(c.min(10 - g) * 10));
        let (w, c, h) = (pct(w), pct(c), pct(h));
        let policy = Policy {
            cpu_cache_compute: cpu_cache_compute && c.0 < 100.0,
            ..policy(gbs, nb, w, c, h, overlap, sep_layer)
        };
        let resident = resident(device, &m.files, Default::default());
        let dir = tempfile::tempdir().unwrap();
        let options = EngineOptions::new(Placement::Policy(policy.clone())).offload_dir(dir.path().to_path_buf());
        let engine = engine(device, ModelFiles::open(&common::smollm2_path().unwrap()).unwrap(), options);
        let tokens = &reference().britannica.tokens;
        let seqs: Vec<&[u32]> = vec![&tokens[..24], &tokens[100..117], &tokens[300..320]];
        let got = engine.token_logprobs(&seqs).unwrap();
        let want = resident.token_logprobs(&seqs);
        let worst = worst_diff(&got, &want);
        proptest::prop_assert!(worst < 1e-4, "{:?} {:?}: {}", device, policy, worst);
        let prompts: Vec<&[u32]> = seqs.iter().map(|s| &s[..6]).collect();
        let gen = engine.generate(&prompts, 3, &[]).unwrap();
        let greedy = resident.generate_greedy(&prompts, 3);
        for (g, want) in gen.iter().zip(&greedy) {
            proptest::prop_assert_eq!(&g.tokens, want, "{:?} {:?}", device, policy);
        }
    }
}

/// SmolLM2's tensors with every layer's linear weight replaced by its FlexGen 4-bit round trip
/// (groups of 64 along the input dimension, as `--compress-weight` stores them), given as f32:
/// an independent CPU computation of what the compressed wgpu model must produce.
struct Group4RoundTrip(Box<dyn ferrogen::model::WeightSource>);

impl Group4RoundTrip {
    fn is_layer_linear(name: &str) -> bool {
        name.contains("layers.") && name.ends_with("_proj.weight")
    }
}

impl ferrogen::model::WeightSource for Group4RoundTrip {
    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
    fn names(&self) -> Vec<String> {
        self.0.names()
    }
    fn info(&self, name: &str) -> Option<ferrogen::model::TensorInfo> {
        let mut info = self.0.info(name)?;
        if Self::is_layer_linear(name) {
            info.dtype = ferrogen::model::DType::F32;
        }
        Some(info)
    }
    fn bytes(&self, name: &str) -> ferrogen::Result<std::borrow::Cow<'_, [u8]>> {
        let inner = self.0.info(name);
        match inner {
            Some(info) if Self::is_layer_linear(name) => {
                let values = ferrogen::internals::decode_to_f32(
                    info.dtype,
                    &self.0.bytes(name)?,
                    info.numel(),
                )
                .expect("whole tensor");
                let q = ferrogen::internals::group4::Group4::quantize(&values, &info.shape, 1, 64)?;
                Ok(std::borrow::Cow::Owned(
                    bytemuck::cast_slice(&q.dequantize()).to_vec(),
                ))
            }
            _ => self.0.bytes(name),
        }
    }
}

/// FlexGen 4-bit weights and cache on SmolLM2 (256 britannica tokens). The issue asks for a
/// perplexity within 3% of the unquantized run; that cannot hold here, because the unquantized
/// run is already 4-bit (Q4_1 blocks of 32) and groups of 64 requantize it (see BENCHMARKS.md:
/// +43% on 512 tokens, and the same requantization by the CPU reference). What is checked: the
/// compressed-weight model gives the CPU reference's numbers on the round-tripped weights
/// (within 1e-3 per token) on every device, the 4-bit cache costs a bounded, recorded
/// amount, and the f16 cache (on the CPU device) next to nothing: under 0.2% of perplexity.
#[test]
fn quantized_weights_and_caches_cost_bounded_accuracy() {
    use ferrogen::{RunOptions as GpuOptions, WeightFormat};
    let Some(m) = smollm2() else { return };
    let ids = &reference().britannica.tokens[..256];
    let ppl = |lp: &[f32]| (-lp.iter().map(|&v| f64::from(v)).sum::<f64>() / lp.len() as f64).exp();
    let base = m.model.token_logprobs(&[ids]).unwrap();
    let mut files = ModelFiles::open(m.files.path.as_path()).unwrap();
    files.weights = Box::new(Group4RoundTrip(files.weights));
    let round_trip = ReferenceModel::load(&files)
        .unwrap()
        .token_logprobs(&[ids])
        .unwrap();
    for device in devices() {
        let run = |weights: WeightFormat, compress_cache: bool, f16_cache: bool| {
            let options = GpuOptions {
                weights,
                compress_cache,
                f16_cache,
            };
            resident(device, &m.files, options).token_logprobs(&[ids])
        };
        let weights4 = run(WeightFormat::Group4, false, false);
        let cache4 = run(WeightFormat::Native, true, false);
        if device == DeviceKind::Cpu {
            // an f16 cache costs next to nothing (measured: ppl +0.021%, the worst of 255
            // tokens 0.032 nats); checked on the CPU device, whose halves the WebGPU device's
            // kernels reproduce bit for bit (src/gpu/kernels/tests.rs)
            let cache16 = run(WeightFormat::Native, false, true);
            let (p0, ph) = (ppl(&base[0]), ppl(&cache16[0]));
            let worst = worst_diff(&cache16, &base);
            eprintln!(
                "SmolLM2, 256 tokens: ppl {p0:.4}; f16 cache {ph:.4} ({:+.3}%), worst token \
                 {worst:.2e}",
                100.0 * (ph / p0 - 1.0)
            );
            assert!((ph / p0 - 1.0).abs() < 2e-3, "f16 cache: {ph} vs {p0}");
            assert!(
                worst > 0.0 && worst < 0.15,
                "f16 cache: worst token {worst}"
            );
        }
        let worst = worst_diff(&weights4, &round_trip);
        assert!(
            worst < 1e-3,
            "{device:?}: 4-bit weights vs the CPU round trip: {worst}"
        );
        let (p0, pw, pc) = (ppl(&base[0]), ppl(&weights4[0]), ppl(&cache4[0]));
        eprintln!(
            "{device:?}: SmolLM2, 256 tokens: ppl {p0:.4}; FlexGen 4-bit weights {pw:.4} \
             ({:+.1}%), 4-bit cache {pc:.4} ({:+.1}%); weights vs CPU round trip {worst:.2e}",
            100.0 * (pw / p0 - 1.0),
            100.0 * (pc / p0 - 1.0)
        );
        assert!(pw > p0, "requantizing 4-bit weights cannot help on average");
        // the 4-bit cache's cost swings with summation order: a code flips when a key moves
        // by 1e-6 across a rounding boundary, and 30 layers amplify it (measured: +9% to +20%
        // across the CPU device and WebGPU's two matmul variants)
        assert!(
            (pc / p0 - 1.0).abs() < 0.3,
            "{device:?} 4-bit cache: {pc} vs {p0}"
        );
    }
}

/// lm-eval's `loglikelihood` requests through the score job on the real tokenizer: the
/// continuation's logprob is the sum of the reference's per-token logprobs after the context's
/// tokens; `is_greedy` follows the greedy continuation (" Paris"); a context's trailing space
/// moves to the continuation, so both spellings give the same numbers; an empty context is
/// the BOS (or EOS) token; a record too long for any context fails alone.
#[test]
fn context_continuation_requests_match_the_reference() {
    use ferrogen::score::{encode_pair, score_jsonl, ScoreOptions};
    let Some(m) = smollm2() else { return };
    let tok = m.files.tokenizer().unwrap();
    let config = &m.files.config;
    let prefix = config.bos_token_id().or(config.eos_token_id()).unwrap();
    let long = "word ".repeat(config.max_context() + 10);
    let records = [
        ("paris", "The capital of France is", " Paris"),
        ("space", "The capital of France is ", "Paris"),
        ("london", "The capital of France is", " London"),
        ("two", "The capital of France is", " Paris."),
        ("empty", "", "The capital of France is Paris."),
        ("too-long", "x", long.as_str()),
    ];
    let input: String = records
        .iter()
        .map(|(id, c, x)| {
            serde_json::json!({"id": id, "context": c, "continuation": x}).to_string() + "\n"
        })
        .collect();
    let mut out = Vec::new();
    let mut options = ScoreOptions::default();
    options.per_token = true;
    let summary = score_jsonl(
        &m.model,
        Ok(tok),
        input.as_bytes(),
        &mut out,
        &options,
        |_| {},
    )
    .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!((summary.scored, summary.failed), (5, 1));
    for ((id, context, continuation), line) in records.iter().zip(&lines) {
        assert_eq!(line["id"], *id);
        if *id == "too-long" {
            assert!(
                line["error"].as_str().unwrap().contains("no room"),
                "{line}"
            );
            continue;
        }
        let encode = |t: &str| tok.encode(t);
        let (ctx, cont) = encode_pair(encode, context, continuation, prefix).unwrap();
        let seq: Vec<u32> = ctx.iter().chain(&cont).copied().collect();
        let scores = m.model.token_scores(&[&seq]).unwrap().remove(0);
        let want: f64 = scores.logprobs[ctx.len() - 1..]
            .iter()
            .map(|&v| f64::from(v))
            .sum();
        let got = line["logprob"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-6, "{id}: {got} vs {want}");
        assert_eq!(line["scored_tokens"], cont.len(), "{id}");
        assert_eq!(line["token_logprobs"].as_array().unwrap().len(), cont.len());
        let greedy = scores.greedy[ctx.len() - 1..].iter().all(|&g| g);
        assert_eq!(line["is_greedy"], greedy, "{id}");
    }
    let field = |i: usize, f: &str| lines[i][f].clone();
    assert_eq!(
        field(0, "is_greedy"),
        true,
        "\" Paris\" is the greedy continuation"
    );
    assert_eq!(field(1, "logprob"), field(0, "logprob"), "the moved space");
    assert_eq!(field(2, "is_greedy"), false);
    assert!(field(2, "logprob").as_f64() < field(0, "logprob").as_f64());
    assert_eq!(field(3, "is_greedy"), true, "\" Paris.\" is greedy too");
    assert_eq!(field(3, "scored_tokens"), 2);
}
