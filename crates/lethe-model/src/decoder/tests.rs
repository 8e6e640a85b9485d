//! Tests of `crate::decoder`: gradients reach every weight, checkpoints
//! round-trip bit for bit, bad files are clear errors, a tiny model learns
//! generated facts, and the dequantized SmolLM2 agrees with the quantized
//! reference.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::nn::{self, Mode};
use crate::optim::{self, AdamW, AdamWConfig, CosineSchedule, Optimizer};

fn dev() -> Device {
    Device::Cpu
}

fn full_size() -> bool {
    std::env::var("LETHE_TEST_SIZE").as_deref() == Ok("full")
}

fn tiny_config(tied: bool, kv_heads: Option<usize>) -> Config {
    let mut c = Config::new(50, 32, 48, 2, 4, 32);
    c.num_key_value_heads = kv_heads;
    c.tie_word_embeddings = tied;
    c
}

fn random_ids(b: usize, t: usize, vocab: u32, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab)).collect();
    Tensor::from_vec(ids, (b, t), &dev()).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn nonzero_grads(model: &Decoder, loss: &Tensor) -> (usize, usize, Vec<String>) {
    let grads = loss.backward().unwrap();
    let mut ok = 0;
    let mut missing = Vec::new();
    let vars = model.named_vars();
    for (name, var) in &vars {
        let nz = grads
            .get(var.as_tensor())
            .map(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            })
            .unwrap_or(false);
        if nz {
            ok += 1;
        } else {
            missing.push(name.clone());
        }
    }
    (ok, vars.len(), missing)
}

#[test]
fn models_and_adapters_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Decoder>();
    shared::<crate::lora::LoraAdapter>();
    shared::<crate::vision::SmallCnn>();
    shared::<crate::vision::ResNet18>();
    shared::<crate::optim::AdamW>();
}

#[test]
fn every_parameter_gets_a_gradient_untied_gqa_and_tied() {
    for (tied, kv) in [(false, Some(2)), (true, None)] {
        let model = Decoder::new(tiny_config(tied, kv), &dev(), 1).unwrap();
        let ids = random_ids(2, 8, 50, 2);
        let loss = model.loss(&ids, None, Mode::Train).unwrap();
        let (ok, total, missing) = nonzero_grads(&model, &loss);
        println!(
            "decoder tied={tied} kv={kv:?}: {ok} of {total} parameters have a non-zero gradient"
        );
        assert_eq!(total, 2 + 9 * 2 + usize::from(!tied), "parameter count");
        assert!(missing.is_empty(), "no gradient for {missing:?}");
    }
}

/// The same model through the primitive-op path (what runs off the CPU):
/// same logits, and again every parameter gets a gradient.
#[test]
fn primitive_op_path_matches_fused_path() {
    let model = Decoder::new(tiny_config(false, Some(2)), &dev(), 21).unwrap();
    let ids = random_ids(2, 9, 50, 22);
    let fused = model.forward(&ids, Mode::Eval).unwrap();
    let (reference, counts) = crate::nn::tests::with_reference(|| {
        let logits = model.forward(&ids, Mode::Eval).unwrap();
        let loss = model.loss(&ids, None, Mode::Train).unwrap();
        (logits, nonzero_grads(&model, &loss))
    });
    assert!(
        max_abs_diff(&fused, &reference) < 1e-4,
        "{}",
        max_abs_diff(&fused, &reference)
    );
    let (ok, total, missing) = counts;
    println!("decoder, primitive ops: {ok} of {total} parameters have a non-zero gradient");
    assert!(missing.is_empty(), "{missing:?}");
}

#[test]
fn frozen_base_computes_no_base_gradient() {
    let model = Decoder::new(tiny_config(false, None), &dev(), 1).unwrap();
    model.set_base_trainable(false);
    let ids = random_ids(1, 6, 50, 3);
    let logits = model.forward(&ids, Mode::Train).unwrap();
    let grads = logits.sum_all().unwrap().backward().unwrap();
    for (name, var) in model.named_vars() {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "{name} got a gradient"
        );
    }
    // Only the root of the backward pass is in the store: nothing was tracked.
    assert_eq!(grads.get_ids().count(), 1);
    model.set_base_trainable(true);
    assert!(model.is_base_trainable());
}

#[test]
fn forward_is_causal_and_hidden_states_are_consistent() {
    let model = Decoder::new(tiny_config(false, Some(2)), &dev(), 4).unwrap();
    let ids = random_ids(2, 7, 50, 5);
    let logits = model.forward(&ids, Mode::Eval).unwrap();
    assert_eq!(logits.dims(), &[2, 7, 50]);
    // Changing the last token leaves the earlier positions bit-identical.
    let changed = ids
        .slice_assign(&[0..2, 6..7], &Tensor::new(&[[0u32], [1]], &dev()).unwrap())
        .unwrap();
    let logits2 = model.forward(&changed, Mode::Eval).unwrap();
    assert_eq!(
        max_abs_diff(
            &logits.narrow(1, 0, 6).unwrap(),
            &logits2.narrow(1, 0, 6).unwrap()
        ),
        0.0
    );

    // Layer 0 is the embedding; the last layer + final norm + head gives the logits.
    let h0 = model.hidden_states(&ids, 0, Mode::Eval).unwrap();
    let emb = model.varmap().data().lock().unwrap()["model.embed_tokens.weight"]
        .as_tensor()
        .clone();
    let want = emb
        .embedding(&ids.flatten_all().unwrap())
        .unwrap()
        .reshape((2, 7, 32))
        .unwrap();
    assert_eq!(max_abs_diff(&h0, &want), 0.0);
    let (l2, h1) = model.forward_with_hidden(&ids, 1, Mode::Eval).unwrap();
    assert_eq!(max_abs_diff(&l2, &logits), 0.0);
    assert_eq!(
        max_abs_diff(&h1, &model.hidden_states(&ids, 1, Mode::Eval).unwrap()),
        0.0
    );
    let last = model.hidden_states(&ids, 2, Mode::Eval).unwrap();
    let norm = model.varmap().data().lock().unwrap()["model.norm.weight"]
        .as_tensor()
        .clone();
    let head = model.varmap().data().lock().unwrap()["lm_head.weight"]
        .as_tensor()
        .clone();
    let manual = nn::rms_norm(&last, &norm, 1e-5)
        .unwrap()
        .broadcast_matmul(&head.t().unwrap())
        .unwrap();
    assert!(max_abs_diff(&manual, &logits) < 1e-5);

    let (l_all, all) = model.forward_all(&ids, Mode::Eval).unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(max_abs_diff(&l_all, &logits), 0.0);
    assert_eq!(max_abs_diff(&all[2], &last), 0.0);
    assert!(model.hidden_states(&ids, 3, Mode::Eval).is_err());
    assert!(
        model
            .forward(&random_ids(1, 33, 50, 1), Mode::Eval)
            .is_err(),
        "longer than the context"
    );
    let oov = Tensor::new(&[[1u32, 50]], &dev()).unwrap();
    assert!(matches!(
        model.forward(&oov, Mode::Eval),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn save_load_round_trips_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (tied, kv)) in [(false, Some(2)), (true, None)].into_iter().enumerate() {
        let path = dir.path().join(format!("m{i}"));
        let model = Decoder::new(tiny_config(tied, kv), &dev(), 6).unwrap();
        model.save(&path).unwrap();
        let loaded = Decoder::load(&path, &dev()).unwrap();
        assert_eq!(loaded.config(), model.config());
        for ((n1, v1), (n2, v2)) in model.named_vars().iter().zip(loaded.named_vars().iter()) {
            assert_eq!(n1, n2);
            let a: Vec<f32> = v1.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = v2.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{n1}"
            );
        }
        let ids = random_ids(1, 5, 50, 7);
        let a = model.forward(&ids, Mode::Eval).unwrap();
        let b = loaded.forward(&ids, Mode::Eval).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
    }
}

#[test]
fn config_json_is_hf_compatible() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let mut c = tiny_config(true, Some(2));
    c.bos_token_id = Some(1);
    c.to_json_file(&path).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["architectures"][0], "LlamaForCausalLM");
    assert_eq!(v["model_type"], "llama");
    assert_eq!(v["num_key_value_heads"], 2);
    assert_eq!(Config::from_json_file(&path).unwrap(), c);

    // SmolLM2's HF config.json (with keys we do not use) parses.
    let smol = r#"{"architectures":["LlamaForCausalLM"],"attention_bias":false,"bos_token_id":1,
        "eos_token_id":2,"hidden_act":"silu","hidden_size":576,"initializer_range":0.041666666666666664,
        "intermediate_size":1536,"max_position_embeddings":8192,"model_type":"llama",
        "num_attention_heads":9,"num_hidden_layers":30,"num_key_value_heads":3,"pretraining_tp":1,
        "rms_norm_eps":1e-05,"rope_scaling":null,"rope_theta":100000,"tie_word_embeddings":true,
        "torch_dtype":"bfloat16","transformers_version":"4.42.3","use_cache":true,"vocab_size":49152}"#;
    std::fs::write(&path, smol).unwrap();
    let c = Config::from_json_file(&path).unwrap();
    assert_eq!(
        (c.num_hidden_layers, c.kv_heads(), c.head_size()),
        (30, 3, 64)
    );
    assert!(c.tie_word_embeddings);
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    let model = Decoder::new(tiny_config(false, None), &dev(), 8).unwrap();
    model.save(&path).unwrap();
    let cfg_path = path.join(CONFIG_FILE);
    let good_cfg = std::fs::read_to_string(&cfg_path).unwrap();

    // Not JSON.
    std::fs::write(&cfg_path, "{ not json").unwrap();
    let e = Decoder::load(&path, &dev()).unwrap_err();
    assert!(matches!(e, Error::Format(_)), "{e}");
    // JSON, but an impossible model (heads do not divide the width).
    std::fs::write(
        &cfg_path,
        good_cfg.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 5"),
    )
    .unwrap();
    let e = Decoder::load(&path, &dev()).unwrap_err();
    assert!(e.to_string().contains("num_attention_heads"), "{e}");
    // Another architecture.
    std::fs::write(&cfg_path, good_cfg.replace("\"llama\"", "\"gpt2\"")).unwrap();
    assert!(matches!(
        Decoder::load(&path, &dev()).unwrap_err(),
        Error::Format(_)
    ));
    std::fs::write(&cfg_path, &good_cfg).unwrap();

    // A missing tensor and a tensor of the wrong shape name the tensor.
    let mut tensors: HashMap<String, Tensor> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let removed = tensors.remove("model.layers.1.mlp.up_proj.weight").unwrap();
    candle_core::safetensors::save(&tensors, path.join(WEIGHTS_FILE)).unwrap();
    let e = Decoder::load(&path, &dev()).unwrap_err();
    assert!(
        matches!(e, Error::Format(_))
            && e.to_string().contains("model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
    tensors.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        removed.narrow(0, 0, 10).unwrap(),
    );
    candle_core::safetensors::save(&tensors, path.join(WEIGHTS_FILE)).unwrap();
    let e = Decoder::load(&path, &dev()).unwrap_err();
    assert!(e.to_string().contains("shape"), "{e}");
    // Garbage weights file, and no weights file at all.
    std::fs::write(path.join(WEIGHTS_FILE), b"garbage").unwrap();
    assert!(matches!(
        Decoder::load(&path, &dev()).unwrap_err(),
        Error::Format(_)
    ));
    std::fs::remove_file(path.join(WEIGHTS_FILE)).unwrap();
    assert!(matches!(
        Decoder::load(&path, &dev()).unwrap_err(),
        Error::Format(_)
    ));
    assert!(matches!(
        Decoder::load(&dir.path().join("nowhere"), &dev()).unwrap_err(),
        Error::Io { .. }
    ));
    // Not a GGUF file.
    std::fs::write(dir.path().join("x.gguf"), b"not a gguf").unwrap();
    assert!(matches!(
        Decoder::from_gguf(&dir.path().join("x.gguf"), &dev()).unwrap_err(),
        Error::Format(_)
    ));
}

/// llama.cpp's converter permutation (convert_hf_to_gguf.py `permute`).
fn llama_cpp_permute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, 2, out / heads / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// The un-permutation is exact, and interleaved rotary on the permuted
/// weights gives the same attention scores as half-split rotary on the
/// un-permuted ones.
#[test]
fn unpermuted_qk_with_half_split_rope_equals_llama_cpp_interleaved_rope() {
    let (heads, hd, d, t) = (3usize, 8usize, 12usize, 5usize);
    let mut rng = StdRng::seed_from_u64(9);
    let mut rand_t = |shape: (usize, usize)| {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(data, shape, &dev()).unwrap()
    };
    let wq = rand_t((heads * hd, d));
    let wk = rand_t((heads * hd, d));
    let x = rand_t((t, d));
    let (pq, pk) = (llama_cpp_permute(&wq, heads), llama_cpp_permute(&wk, heads));
    assert_eq!(
        max_abs_diff(&unpermute_qk_rows(&pq, heads).unwrap(), &wq),
        0.0
    );
    assert!(max_abs_diff(&pq, &wq) > 0.0);

    let theta = 10_000f32;
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let ang: Vec<f32> = (0..t)
        .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
        .collect();
    let cos = Tensor::from_vec(
        ang.iter().map(|a| a.cos()).collect::<Vec<_>>(),
        (t, hd / 2),
        &dev(),
    )
    .unwrap();
    let sin = Tensor::from_vec(
        ang.iter().map(|a| a.sin()).collect::<Vec<_>>(),
        (t, hd / 2),
        &dev(),
    )
    .unwrap();
    let heads_of = |w: &Tensor| {
        x.matmul(&w.t().unwrap())
            .unwrap()
            .reshape((1, t, heads, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let q_i = candle_nn::rotary_emb::rope_i_slow(&heads_of(&pq), &cos, &sin).unwrap();
    let k_i = candle_nn::rotary_emb::rope_i_slow(&heads_of(&pk), &cos, &sin).unwrap();
    let rot = nn::Rotary::new(hd, t, theta as f64, &dev()).unwrap();
    let q_h = rot.apply(&heads_of(&wq), 0).unwrap();
    let k_h = rot.apply(&heads_of(&wk), 0).unwrap();
    let s_i = q_i.matmul(&k_i.t().unwrap()).unwrap();
    let s_h = q_h.matmul(&k_h.t().unwrap()).unwrap();
    assert!(
        max_abs_diff(&s_i, &s_h) < 1e-4,
        "{}",
        max_abs_diff(&s_i, &s_h)
    );
    // Without the un-permutation, the scores differ.
    let q_wrong = rot.apply(&heads_of(&pq), 0).unwrap();
    let k_wrong = rot.apply(&heads_of(&pk), 0).unwrap();
    assert!(max_abs_diff(&q_wrong.matmul(&k_wrong.t().unwrap()).unwrap(), &s_i) > 1e-2);
    assert!(unpermute_qk_rows(&wq, 5).is_err());
}

/// A deterministic corpus of templated facts over a word vocabulary:
/// `<s> NAME lives in CITY . NAME works as a JOB . </s>` where each name has
/// one city and one job.
struct Facts {
    names: usize,
}

impl Facts {
    const CITIES: usize = 8;
    const JOBS: usize = 8;
    // Token ids: 0 <s>, 1 </s>, 2 lives, 3 in, 4 ., 5 works, 6 as, 7 a,
    // then cities, jobs, names.
    fn vocab(&self) -> usize {
        8 + Self::CITIES + Self::JOBS + self.names
    }
    fn city(&self, n: usize) -> u32 {
        8 + ((n * 5 + 1) % Self::CITIES) as u32
    }
    fn job(&self, n: usize) -> u32 {
        (8 + Self::CITIES + (n * 3 + 2) % Self::JOBS) as u32
    }
    fn name(&self, n: usize) -> u32 {
        (8 + Self::CITIES + Self::JOBS + n) as u32
    }
    fn sentence(&self, n: usize) -> Vec<u32> {
        let name = self.name(n);
        vec![
            0,
            name,
            2,
            3,
            self.city(n),
            4,
            name,
            5,
            6,
            7,
            self.job(n),
            4,
            1,
        ]
    }
    fn batch(&self, rng: &mut StdRng, b: usize) -> Tensor {
        let rows: Vec<u32> = (0..b)
            .flat_map(|_| self.sentence(rng.random_range(0..self.names)))
            .collect();
        Tensor::from_vec(rows, (b, 13), &dev()).unwrap()
    }
    fn all(&self) -> Tensor {
        let rows: Vec<u32> = (0..self.names).flat_map(|n| self.sentence(n)).collect();
        Tensor::from_vec(rows, (self.names, 13), &dev()).unwrap()
    }
}

/// The tiny decoder learns the corpus from scratch: the mean next-token loss
/// over all sentences falls below 0.45 nats (the irreducible part is the
/// unpredictable first name, ln(names)/12 = 0.23) and it completes every
/// "NAME lives in" with the right city. Then save, reload: the same loss,
/// bit for bit.
#[test]
fn tiny_decoder_learns_generated_facts_and_reloads_bit_exactly() {
    let facts = Facts { names: 16 };
    let mut config = Config::new(facts.vocab(), 64, 128, 2, 4, 16);
    config.tie_word_embeddings = true;
    let model = Decoder::new(config, &dev(), 11).unwrap();
    let steps = if full_size() { 600 } else { 300 };
    let schedule = CosineSchedule::new(3e-3, 3e-4, 20, steps).unwrap();
    let mut opt = AdamW::new(
        model.vars(),
        AdamWConfig {
            lr: 3e-3,
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(12);
    let all = facts.all();
    let before = model
        .loss(&all, None, Mode::Eval)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let start = Instant::now();
    for step in 0..steps {
        opt.set_learning_rate(schedule.lr_at(step));
        let ids = facts.batch(&mut rng, 32);
        let loss = model.loss(&ids, None, Mode::Train).unwrap();
        optim::train_step(&mut opt, &loss, Some(1.0)).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let after = model
        .loss(&all, None, Mode::Eval)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("facts: loss {before:.3} -> {after:.4} in {steps} steps, {secs:.1} s");
    assert!(after < 0.45, "loss {after}");

    // "NAME lives in" -> CITY for every name (prediction at position 3).
    let logits = model.forward(&all, Mode::Eval).unwrap();
    let pred: Vec<u32> = logits
        .narrow(1, 3, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .argmax(D::Minus1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let right = (0..facts.names)
        .filter(|&n| pred[n] == facts.city(n))
        .count();
    assert_eq!(right, facts.names, "cities right: {right}/{}", facts.names);

    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    let loaded = Decoder::load(dir.path(), &dev()).unwrap();
    // Greedy decoding completes a sentence:
    // "<s> NAME" -> "lives in CITY . NAME works as a JOB . </s>".
    let answer = loaded.greedy(&facts.sentence(5)[..2], 20, &[1]).unwrap();
    assert_eq!(answer, facts.sentence(5)[2..].to_vec());
    assert!(loaded.greedy(&[], 3, &[]).is_err());
    let again = loaded
        .loss(&all, None, Mode::Eval)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(after.to_bits(), again.to_bits());
}

/// Maps English text to SmolLM2 token ids by greedy longest match over the
/// GGUF vocabulary in GPT-2 byte-level form (space -> 'Ġ'). Not the model's
/// BPE, but real words as the model knows them.
fn greedy_tokenize(text: &str, vocab: &HashMap<String, u32>) -> Vec<u32> {
    let chars: Vec<char> = text
        .chars()
        .map(|c| if c == ' ' { 'Ġ' } else { c })
        .collect();
    let mut ids = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let mut len = (chars.len() - i).min(16);
        loop {
            let piece: String = chars[i..i + len].iter().collect();
            if let Some(&id) = vocab.get(&piece) {
                ids.push(id);
                i += len;
                break;
            }
            len -= 1;
            assert!(len > 0, "no token for {:?}", chars[i]);
        }
    }
    ids
}

const PARAGRAPH: &str = "The old lighthouse stood on the edge of the cliff, and every night its keeper climbed the narrow stairs to light the lamp. Ships that passed along the coast relied on its beam to find their way through the fog.";
const PARAGRAPH_MORE: &str = " In the morning, the keeper wrote in his journal about the weather, the birds that nested on the rocks, and the boats that came into the harbor. He had lived there alone for many years, but he never felt lonely, because the sea was always changing and there was always something new to see. When the storms came in winter, the waves crashed against the walls and the wind howled through the windows, yet the light never went out.";

/// Decoder with weights dequantized from SmolLM2's Q4_1 GGUF against
/// candle-transformers' quantized Llama fed one token at a time: logits at
/// every position are close and the greedy next token agrees at >= 95% of
/// positions.
#[test]
fn dequantized_smollm2_matches_quantized_reference() {
    use candle_transformers::models::quantized_llama::ModelWeights;

    let dir = lethe_assets::Cache::from_env()
        .ensure(lethe_assets::Asset::SMOLLM2_135M_INSTRUCT)
        .expect("SmolLM2 asset");
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let tokens = content.metadata["tokenizer.ggml.tokens"].to_vec().unwrap();
    let vocab: HashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string().unwrap().clone(), i as u32))
        .collect();
    let text = if full_size() {
        format!("{PARAGRAPH}{PARAGRAPH_MORE}")
    } else {
        PARAGRAPH.to_string()
    };
    let ids = greedy_tokenize(&text, &vocab);
    let t = ids.len();

    let start = Instant::now();
    let model = Decoder::from_gguf(&path, &dev()).unwrap();
    let load_s = start.elapsed().as_secs_f64();
    assert_eq!(model.num_parameters(), 134_515_008);
    assert!(model.config().tie_word_embeddings);
    model.set_base_trainable(false);
    let input = Tensor::from_vec(ids.clone(), (1, t), &dev()).unwrap();
    let ours = model
        .forward(&input, Mode::Eval)
        .unwrap()
        .squeeze(0)
        .unwrap();

    let mut reference = ModelWeights::from_gguf(content, &mut file, &dev()).unwrap();
    let mut rows = Vec::with_capacity(t);
    for (pos, &id) in ids.iter().enumerate() {
        let x = Tensor::new(&[[id]], &dev()).unwrap();
        rows.push(reference.forward(&x, pos).unwrap().squeeze(0).unwrap());
    }
    let reference = Tensor::stack(&rows, 0).unwrap();

    let diff = (&ours - &reference).unwrap().abs().unwrap();
    let max = diff
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let a: Vec<u32> = ours.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    let b: Vec<u32> = reference.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    let spread = reference
        .flatten_all()
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!(
        "SmolLM2 f32 (dequantized) vs Q4_1 reference on {t} tokens: max |dlogit| {max:.4}, mean {mean:.4} \
         (mean |logit| {spread:.3}), top-1 agreement {agree}/{t}; load {load_s:.2} s"
    );
    assert!(
        agree as f64 >= 0.95 * t as f64,
        "top-1 agreement {agree}/{t}"
    );
    assert!(
        mean < 0.1 * spread,
        "mean difference {mean} vs logit scale {spread}"
    );

    // The dequantized model trains: a backward pass on a short prefix reaches
    // every one of its tensors.
    model.set_base_trainable(true);
    let n = if full_size() { 32 } else { 8 };
    let prefix = input.narrow(1, 0, n).unwrap();
    let start = Instant::now();
    let loss = model.loss(&prefix, None, Mode::Train).unwrap();
    let (ok, total, missing) = nonzero_grads(&model, &loss);
    println!(
        "SmolLM2 backward on {n} tokens: {ok} of {total} tensors have a non-zero gradient ({:.1} s)",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(total, 272);
    assert!(missing.is_empty(), "{missing:?}");
}
