//! Embedding tests on the real all-MiniLM-L6-v2 weights.

use crate::gguf_llama::{attention, testutil};

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn unit_vectors_of_384_dimensions() {
    let e = testutil::embedder();
    assert_eq!(e.dim(), 384);
    let v = e.embed(&["A cat is sitting on the mat.", ""]).unwrap();
    assert_eq!(v.len(), 2);
    for x in &v {
        assert_eq!(x.len(), 384);
        let n: f32 = x.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-4, "norm {n}");
    }
    assert!(e.embed(&[]).unwrap().is_empty());
}

#[test]
fn paraphrases_score_above_unrelated_pairs() {
    let e = testutil::embedder();
    let paraphrases = [
        ("A cat is sitting on the mat.", "A kitten rests on a rug."),
        (
            "The stock market fell sharply today.",
            "Share prices dropped steeply this afternoon.",
        ),
        (
            "How do I reset my password?",
            "What are the steps to change my login password?",
        ),
        (
            "The train to Berlin is delayed.",
            "The Berlin train is running late.",
        ),
    ];
    let texts: Vec<&str> = paraphrases.iter().flat_map(|(a, b)| [*a, *b]).collect();
    let v = e.embed(&texts).unwrap();
    let mut para = Vec::new();
    let mut unrelated = Vec::new();
    for i in 0..paraphrases.len() {
        para.push(cos(&v[2 * i], &v[2 * i + 1]));
        for j in 0..paraphrases.len() {
            if i != j {
                unrelated.push(cos(&v[2 * i], &v[2 * j + 1]));
            }
        }
    }
    let worst_para = para.iter().copied().fold(f32::INFINITY, f32::min);
    let best_unrelated = unrelated.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    eprintln!("paraphrase cosines {para:?}; best unrelated {best_unrelated}");
    assert!(
        worst_para > best_unrelated,
        "{worst_para} <= {best_unrelated}"
    );
    // The anchor pair from the sentence-transformers reference run (0.653).
    assert!(
        (para[0] - 0.653).abs() < 0.01,
        "cat/kitten cosine {}",
        para[0]
    );
}

#[test]
fn batched_equals_one_by_one() {
    let e = testutil::embedder();
    let long = "word ".repeat(600);
    let texts = [
        "short",
        "A somewhat longer sentence about retrieval and embeddings.",
        "",
        "Numbers 1 2 3 and punctuation!?",
        long.as_str(),
        "Ünïcödé and 東京 text.",
    ];
    let batched = e.embed(&texts).unwrap();
    for (t, b) in texts.iter().zip(&batched) {
        let one = e.embed(&[t]).unwrap();
        let diff = one[0]
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-4, "{t:?}: diff {diff}");
    }
}

#[test]
fn matches_candle_transformers_bert() {
    // The packed encoder equals candle-transformers' padded BertModel with an
    // attention mask, followed by masked mean pooling.
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use candle_transformers::models::bert::{BertModel, Config};
    let dir = testutil::minilm_dir();
    let e = testutil::embedder();
    let cfg: Config =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let vb = VarBuilder::from_buffered_safetensors(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let bert = BertModel::load(vb, &cfg).unwrap();
    let texts = [
        "A short one.",
        "",
        "A rather longer sentence, with several more words in it than the others.",
    ];
    let enc: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| e.tokenizer.encode(*t, true).unwrap().get_ids().to_vec())
        .collect();
    let t = enc.iter().map(Vec::len).max().unwrap();
    let mut ids = vec![0u32; texts.len() * t];
    let mut mask = vec![0u32; texts.len() * t];
    for (r, s) in enc.iter().enumerate() {
        ids[r * t..r * t + s.len()].copy_from_slice(s);
        mask[r * t..r * t + s.len()].fill(1);
    }
    let ids = Tensor::from_vec(ids, (texts.len(), t), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (texts.len(), t), &Device::Cpu).unwrap();
    let hidden = bert
        .forward(&ids, &ids.zeros_like().unwrap(), Some(&mask))
        .unwrap();
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let mean = hidden
        .broadcast_mul(&m)
        .unwrap()
        .sum(1)
        .unwrap()
        .broadcast_div(&m.sum(1).unwrap())
        .unwrap();
    let reference: Vec<Vec<f32>> = mean.to_vec2().unwrap();
    let got = e.embed(&texts).unwrap();
    for (r, g) in reference.iter().zip(&got) {
        let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        let diff = r
            .iter()
            .zip(g)
            .map(|(a, b)| (a / n - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "diff {diff}");
    }
}

#[test]
fn tensor_op_attention_matches_the_cpu_kernel() {
    use candle_core::{Device, Tensor};
    let e = testutil::embedder();
    let n = 11;
    let qkv = Tensor::randn(0f32, 1.0, (n, 3 * 384), &Device::Cpu).unwrap();
    let spans = [0..4, 4..5, 5..11];
    let scale = 1.0 / (32f32).sqrt();
    let by_ops = e
        .attend_ops(&qkv, &spans, scale)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let data = qkv.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let jobs: Vec<attention::Job<'_>> = spans
        .iter()
        .map(|r| attention::Job {
            q_rows: r.clone(),
            keys: attention::KeyRows::Range {
                start: r.start,
                len: r.len(),
            },
            causal: false,
        })
        .collect();
    let view = |o: usize| attention::Rows {
        data: &data[o..],
        stride: 3 * 384,
        head_stride: 32,
    };
    let heads = attention::Heads {
        n_head: 12,
        n_kv_head: 12,
        head_dim: 32,
    };
    let kernel = attention::attend(view(0), view(384), view(768), n, &jobs, heads, scale);
    for (i, row) in by_ops.iter().enumerate() {
        for (j, x) in row.iter().enumerate() {
            assert!((x - kernel[i * 384 + j]).abs() < 1e-5);
        }
    }
}

#[test]
fn vectorized_gelu_matches_candle() {
    use candle_core::{Device, Tensor};
    let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.0025).collect();
    let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
    let want: Vec<f32> = t.gelu_erf().unwrap().to_vec1().unwrap();
    for (x, w) in xs.iter().zip(&want) {
        let got = super::gelu_erf(*x);
        assert!(
            (got - w).abs() < 1e-6 * w.abs().max(1.0),
            "gelu({x}) = {got}, want {w}"
        );
    }
}
