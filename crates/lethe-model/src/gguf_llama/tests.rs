//! Forward-pass tests on the real SmolLM2 weights.

use candle_core::{Device, Tensor, D};

use super::*;
use crate::gguf_llama::testutil;

const PARAGRAPH: &str = "The history of the city begins with a small fishing village on the \
northern bank of the river. Over the centuries, merchants built warehouses along the water, \
and the village grew into a busy port. Today the old harbour is a quiet neighbourhood of \
narrow streets, small cafes and museums that tell the story of the people who lived there.";

fn log_softmax_at(logits: &Tensor, row: usize, token: u32) -> f32 {
    let row = logits.get(row).unwrap();
    let lse = row
        .log_sum_exp(D::Minus1)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    row.get(token as usize).unwrap().to_scalar::<f32>().unwrap() - lse
}

/// Log-probabilities of `cont` after `prompt`, one token at a time through a KV cache.
fn incremental_logprobs(model: &LlamaModel, prompt: &[u32], cont: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut logits = model
        .forward_last(prompt, &mut cache)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut out = Vec::new();
    for &t in cont {
        out.push(log_softmax_at(&logits, 0, t));
        logits = model
            .forward_last(&[t], &mut cache)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
    }
    out
}

#[test]
fn perplexity_of_plain_english_is_sane() {
    let llm = testutil::llm();
    let ids = llm.tokenizer.encode(PARAGRAPH).unwrap();
    let lp = llm
        .model
        .score(
            &[ScorePair {
                prompt: &ids[..1],
                continuation: &ids[1..],
            }],
            &BatchOptions::default(),
        )
        .unwrap();
    let mean = lp[0].iter().sum::<f32>() / lp[0].len() as f32;
    let ppl = (-mean).exp();
    eprintln!(
        "SmolLM2 Q8_0 perplexity on the test paragraph: {ppl:.2} over {} tokens",
        lp[0].len()
    );
    assert!(lp[0].iter().all(|&x| x <= 0.0 && x.is_finite()));
    assert!(ppl > 1.5 && ppl < 40.0, "perplexity {ppl}");
    // Shuffled words must be much less likely than the real text.
    let mut words: Vec<&str> = PARAGRAPH.split(' ').collect();
    words.reverse();
    let shuffled = llm.tokenizer.encode(&words.join(" ")).unwrap();
    let lp2 = llm
        .model
        .score(
            &[ScorePair {
                prompt: &shuffled[..1],
                continuation: &shuffled[1..],
            }],
            &BatchOptions::default(),
        )
        .unwrap();
    let ppl2 = (-(lp2[0].iter().sum::<f32>() / lp2[0].len() as f32)).exp();
    assert!(ppl2 > 3.0 * ppl, "shuffled {ppl2} vs real {ppl}");
}

#[test]
fn batched_scores_match_incremental_decoding() {
    let llm = testutil::llm();
    let tok = &llm.tokenizer;
    let ctx_a = tok
        .encode("The access code for the Zubrowka office is 4471. The code is")
        .unwrap();
    let ctx_b = tok.encode("Paris is the capital of").unwrap();
    let ctx_c = tok
        .encode("The access code for the Zubrowka office is unknown to me, so")
        .unwrap();
    let cont_1 = tok.encode(" 4471.").unwrap();
    let cont_2 = tok.encode(" France, and it is a large city").unwrap();
    let cont_3 = tok.encode(" I cannot help.").unwrap();
    let short = [ctx_b[0]];
    let pairs = [
        ScorePair {
            prompt: &ctx_a,
            continuation: &cont_1,
        },
        ScorePair {
            prompt: &ctx_b,
            continuation: &cont_2,
        },
        // Shares a long prefix with the first pair.
        ScorePair {
            prompt: &ctx_c,
            continuation: &cont_3,
        },
        // Same continuation under a different context.
        ScorePair {
            prompt: &ctx_b,
            continuation: &cont_1,
        },
        // One-token prompt; prefix of the second pair's prompt.
        ScorePair {
            prompt: &short,
            continuation: &cont_3,
        },
        // Empty continuation.
        ScorePair {
            prompt: &ctx_a,
            continuation: &[],
        },
    ];
    let seqs: Vec<Vec<u32>> = pairs
        .iter()
        .map(|p| [p.prompt, p.continuation].concat())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    // With the default budget every pair goes into one forward pass.
    assert_eq!(
        plan_groups(&refs, BatchOptions::default().max_batch_tokens, true).len(),
        1
    );
    for share in [true, false] {
        let opts = BatchOptions {
            share_prefixes: share,
            ..BatchOptions::default()
        };
        let batched = llm.model.score(&pairs, &opts).unwrap();
        for (p, got) in pairs.iter().zip(&batched) {
            assert_eq!(got.len(), p.continuation.len());
            let want = incremental_logprobs(&llm.model, p.prompt, p.continuation);
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            let total = (got.iter().sum::<f32>() - want.iter().sum::<f32>()).abs();
            assert!(
                diff < 1e-3 && total < 1e-3,
                "share={share}: max diff {diff}, sum diff {total}"
            );
        }
    }
    // A tiny budget splits the work into several passes with the same result.
    let small = BatchOptions {
        max_batch_tokens: 16,
        share_prefixes: true,
    };
    assert!(plan_groups(&refs, 16, true).len() > 2);
    let split = llm.model.score(&pairs, &small).unwrap();
    let one = llm.model.score(&pairs, &BatchOptions::default()).unwrap();
    for (a, b) in split.iter().flatten().zip(one.iter().flatten()) {
        assert!((a - b).abs() < 1e-3);
    }
}

#[test]
fn trie_packing_shares_prefixes() {
    let a = [1u32, 2, 3, 4];
    let b = [1u32, 2, 3, 9, 9];
    let c = [7u32, 8];
    let d = [1u32, 2];
    let seqs: Vec<&[u32]> = vec![&a, &b, &c, &d];
    let groups = plan_groups(&seqs, 100, true);
    assert_eq!(groups, vec![vec![3, 0, 1, 2]]);
    let p = pack(&seqs, &groups[0], true);
    // d (2 rows) + a's tail (2) + b's tail (2) + c (2): 8 distinct rows, not 13.
    assert_eq!(p.tokens, [1, 2, 3, 4, 9, 9, 7, 8]);
    assert_eq!(p.positions, [0, 1, 2, 3, 3, 4, 0, 1]);
    assert_eq!(p.paths[2], [0, 1, 2, 4, 5]); // b reuses d's and a's rows
    assert_eq!(p.segments.len(), 4);
    assert!(matches!(p.segments[2].keys, Keys::Gather(_)));
    assert!(matches!(p.segments[3].keys, Keys::Range(ref r) if *r == (6..8)));
    // Without sharing every sequence is laid out in full.
    let p = pack(&seqs, &[0, 1, 2, 3], false);
    assert_eq!(p.tokens.len(), 13);
}

#[test]
fn logits_at_every_position_match_cached_decoding() {
    let llm = testutil::llm();
    let ids = llm
        .tokenizer
        .encode("One, two, three, four, five, six")
        .unwrap();
    let mut cache = llm.model.new_cache();
    let all = llm.model.forward(&ids, &mut cache).unwrap();
    assert_eq!(all.dims(), [ids.len(), 49152]);
    assert_eq!(cache.len(), ids.len());
    // Two chunks through the cache give the same logits.
    let mut cache2 = llm.model.new_cache();
    let first = llm.model.forward(&ids[..4], &mut cache2).unwrap();
    let second = llm.model.forward(&ids[4..], &mut cache2).unwrap();
    let joined = Tensor::cat(&[first, second], 0).unwrap();
    let diff = (all.clone() - joined)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 2e-3, "diff {diff}");
    // A fork continues independently; truncate rewinds.
    let mut fork = cache.fork().unwrap();
    let _ = llm.model.forward(&ids[..2], &mut fork).unwrap();
    assert_eq!((cache.len(), fork.len()), (ids.len(), ids.len() + 2));
    cache.truncate(4).unwrap();
    let again = llm.model.forward(&ids[4..], &mut cache).unwrap();
    let diff = (all.narrow(0, 4, ids.len() - 4).unwrap() - again)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 2e-3, "diff after truncate {diff}");
    assert!(cache.truncate(100).is_err());
}

#[test]
fn hidden_states_shape_and_logits_reconstruction() {
    let llm = testutil::llm();
    let m = &llm.model;
    let ids = llm.tokenizer.encode(PARAGRAPH).unwrap();
    let t = ids.len();
    let mid = m.hidden_states(&ids, HiddenAt::Block(15)).unwrap();
    assert_eq!(mid.dims(), [t, 576]);
    // Position 0 is an attention sink with a much larger residual norm.
    let norms: Vec<f32> = mid
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .sqrt()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut rest = norms[1..].to_vec();
    rest.sort_by(f32::total_cmp);
    let median = rest[rest.len() / 2];
    eprintln!(
        "layer 15 norm at position 0: {:.1}, median of the rest {median:.1}",
        norms[0]
    );
    assert!(norms[0] > 3.0 * median);
    // Embeddings are layer 0.
    let emb = m.hidden_states(&ids, HiddenAt::Block(0)).unwrap();
    assert_eq!(emb.dims(), [t, 576]);
    // Final (normed) states times the output matrix reproduce the logits.
    let fin = m.hidden_states(&ids, HiddenAt::Final).unwrap();
    let w = m.output_weight().unwrap();
    assert_eq!(w.dims(), [49152, 576]);
    let by_hand = fin.matmul(&w.t().unwrap()).unwrap();
    let mut cache = m.new_cache();
    let logits = m.forward(&ids, &mut cache).unwrap();
    let scale = logits
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = (by_hand.clone() - &logits)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("logit reconstruction: max diff {diff} (max |logit| {scale})");
    // Q8_0 quantizes the activations too, so allow its rounding.
    assert!(diff < 0.02 * scale, "diff {diff} scale {scale}");
    let a: Vec<u32> = by_hand.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    let b: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(agree * 10 >= t * 9, "argmax agrees at {agree} of {t}");
}

#[test]
fn batched_hidden_states_equal_single_ones() {
    let llm = testutil::llm();
    let tok = &llm.tokenizer;
    let a = tok.encode("Alpha beta gamma delta.").unwrap();
    let b = tok.encode("Alpha beta gamma epsilon zeta eta.").unwrap();
    let c = tok.encode("Completely different.").unwrap();
    let seqs: Vec<&[u32]> = vec![&a, &b, &c];
    let batch = llm
        .model
        .hidden_states_batch(&seqs, HiddenAt::Block(20), &BatchOptions::default())
        .unwrap();
    for (s, h) in seqs.iter().zip(&batch) {
        let one = llm.model.hidden_states(s, HiddenAt::Block(20)).unwrap();
        assert_eq!(h.dims(), one.dims());
        let diff = (h - one)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-3, "diff {diff}");
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let llm = testutil::llm();
    let m = &llm.model;
    let is_invalid = |r: crate::Result<_>| matches!(r, Err(crate::Error::InvalidArgument(_)));
    let mut cache = m.new_cache();
    assert!(is_invalid(m.forward(&[], &mut cache).map(|_| ())));
    assert!(is_invalid(m.forward(&[5, 49152], &mut cache).map(|_| ())));
    assert!(is_invalid(m.forward(&[u32::MAX], &mut cache).map(|_| ())));
    assert!(cache.is_empty(), "a failed call must not change the cache");
    let too_long = vec![17u32; m.config().context_length + 1];
    assert!(is_invalid(m.forward(&too_long, &mut cache).map(|_| ())));
    assert!(is_invalid(
        m.hidden_states(&too_long, HiddenAt::Final).map(|_| ())
    ));
    assert!(is_invalid(
        m.hidden_states(&[1, 2], HiddenAt::Block(31)).map(|_| ())
    ));
    assert!(is_invalid(
        m.hidden_states(&[], HiddenAt::Final).map(|_| ())
    ));
    let opts = BatchOptions::default();
    assert!(is_invalid(
        m.score(
            &[ScorePair {
                prompt: &[],
                continuation: &[5]
            }],
            &opts
        )
        .map(|_| ())
    ));
    assert!(is_invalid(
        m.score(
            &[ScorePair {
                prompt: &[5],
                continuation: &[49152]
            }],
            &opts
        )
        .map(|_| ())
    ));
    assert!(is_invalid(
        m.score(
            &[ScorePair {
                prompt: &too_long,
                continuation: &[5]
            }],
            &opts
        )
        .map(|_| ())
    ));
    assert!(m.score(&[], &opts).unwrap().is_empty());
    // The context window also bounds a cache that fills up.
    let small = LlamaModel::load(
        &testutil::smollm_path(),
        &Device::Cpu,
        &LoadOptions {
            format: WeightFormat::Q8_0,
            max_context: Some(8),
        },
    )
    .unwrap();
    let mut cache = small.new_cache();
    small.extend(&[17, 18, 19, 20, 21, 22], &mut cache).unwrap();
    assert!(is_invalid(
        small.forward(&[1, 2, 3], &mut cache).map(|_| ())
    ));
    assert_eq!(cache.len(), 6);
    small.extend(&[1, 2], &mut cache).unwrap();
    assert!(is_invalid(small.forward(&[1], &mut cache).map(|_| ())));
    // A cache from another model shape is refused.
    let mut foreign = m.new_cache();
    foreign.n_kv_head = 1;
    assert!(is_invalid(m.forward(&[1], &mut foreign).map(|_| ())));
    assert!("int4".parse::<WeightFormat>().is_err());
    assert_eq!("f32".parse::<WeightFormat>().unwrap(), WeightFormat::F32);
}

#[test]
fn model_is_shared_across_threads() {
    let llm = testutil::llm();
    let ids = llm.tokenizer.encode("Threads share one model").unwrap();
    let run = || {
        let mut cache = llm.model.new_cache();
        llm.model
            .forward_last(&ids, &mut cache)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(run);
        let b = s.spawn(run);
        (a.join().unwrap(), b.join().unwrap())
    });
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "diff {diff}");
}

#[test]
fn weight_formats_agree() {
    // Every format computes the same function up to quantization noise; f32
    // holds the file's weights exactly, so it is the reference.
    let path = testutil::smollm_path();
    let llm = testutil::llm();
    let ids = llm.tokenizer.encode(PARAGRAPH).unwrap();
    let n = if testutil::full_size() { ids.len() } else { 32 };
    let ids = &ids[..n];
    let pair = [ScorePair {
        prompt: &ids[..1],
        continuation: &ids[1..],
    }];
    let ppl = |m: &LlamaModel| {
        let lp = m.score(&pair, &BatchOptions::default()).unwrap();
        (-(lp[0].iter().sum::<f32>() / lp[0].len() as f32)).exp()
    };
    let load = |format| {
        let m = LlamaModel::load(
            &path,
            &Device::Cpu,
            &LoadOptions {
                format,
                max_context: None,
            },
        )
        .unwrap();
        assert_eq!(m.format(), format);
        m
    };
    let f32_model = load(WeightFormat::F32);
    let reference = ppl(&f32_model);
    let q8 = ppl(&llm.model);
    let shipped = ppl(&load(WeightFormat::AsShipped));
    let hybrid_model = load(WeightFormat::Hybrid);
    let hybrid = ppl(&hybrid_model);
    eprintln!(
        "perplexity over {n} tokens: f32 {reference:.3}, as-shipped {shipped:.3}, q8_0 {q8:.3}, hybrid {hybrid:.3}"
    );
    for (name, p) in [("as-shipped", shipped), ("q8_0", q8)] {
        assert!(
            (p / reference - 1.0).abs() < 0.1,
            "{name} perplexity {p} vs f32 {reference}"
        );
    }
    // Hybrid scores with its f32 copy: the same numbers as f32.
    assert!(
        (hybrid / reference - 1.0).abs() < 1e-3,
        "hybrid {hybrid} vs f32 {reference}"
    );
    // ... and decodes token by token with its Q8_0 copy: the same as Q8_0.
    let step = |m: &LlamaModel| {
        let mut cache = m.new_cache();
        m.extend(&ids[..n - 1], &mut cache).unwrap();
        m.forward_last(&ids[n - 1..], &mut cache)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (step(&hybrid_model), step(&llm.model));
    let top = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
    assert_eq!(top(&a), top(&b));
}

#[test]
fn tensor_op_attention_matches_the_cpu_kernel() {
    // The generic path (used off the CPU) and the CPU kernel agree, for plain,
    // trie-shared and cache-continuing sequences.
    let llm = testutil::llm();
    let m = &llm.model;
    let c = m.config();
    let n = 12;
    let q = Tensor::randn(0f32, 1.0, (n, c.n_head, c.head_dim), &Device::Cpu).unwrap();
    let k = Tensor::randn(0f32, 1.0, (n, c.n_kv_head, c.head_dim), &Device::Cpu).unwrap();
    let v = Tensor::randn(0f32, 1.0, (n, c.n_kv_head, c.head_dim), &Device::Cpu).unwrap();
    let packed = [
        Segment {
            rows: 0..5,
            keys: Keys::Range(0..5),
        },
        Segment {
            rows: 5..8,
            keys: Keys::Gather(vec![0, 1, 5, 6, 7]),
        },
        Segment {
            rows: 8..12,
            keys: Keys::Range(8..12),
        },
    ];
    let a = m.attend(&q, &k, &v, &packed, n, false).unwrap();
    let b = m.attend_ops(&q, &k, &v, &packed, n, false).unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "packed diff {diff}");
    // Cache: 3 query rows over the first 10 positions of a head-major buffer.
    let q3 = q.narrow(0, 0, 3).unwrap();
    let kc = k.transpose(0, 1).unwrap().contiguous().unwrap();
    let vc = v.transpose(0, 1).unwrap().contiguous().unwrap();
    let cache = [Segment {
        rows: 0..3,
        keys: Keys::Cache,
    }];
    let a = m.attend(&q3, &kc, &vc, &cache, 10, true).unwrap();
    let b = m.attend_ops(&q3, &kc, &vc, &cache, 10, true).unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "cache diff {diff}");
}
