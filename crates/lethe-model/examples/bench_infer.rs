//! Inference-throughput benchmark of `lethe-model` against the peers in
//! `shared/anchors.md` (llama.cpp for SmolLM2, sentence-transformers for
//! MiniLM), on the same CPU threads.
//!
//! Prints ONE JSON object to stdout; progress goes to stderr. For each weight
//! format of SmolLM2-135M-Instruct:
//! * prompt tokens/s: a 424-token English prompt into a fresh KV cache;
//! * generated tokens/s: 128 greedy tokens after that prompt (EOS ignored);
//! * batched scoring tokens/s: 32 pairs of a ~200-token context and a
//!   30-token continuation (the same continuation under every context, as the
//!   label propagator uses it), once with unrelated contexts and once with
//!   contexts sharing a 100-token prefix;
//!
//! and for all-MiniLM-L6-v2: sentences/s at batch 1 and batch 32 (random
//! 12-20 word sentences from a 90-word vocabulary, as in the anchor run).
//!
//! Run: `cargo run --release -p lethe-model --example bench_infer`.
//! Knobs: `BENCH_FORMATS=q8_0,f32` (default: all; `none` skips SmolLM2), `BENCH_REPS` (timed
//! repetitions, best is kept; default 2), `BENCH_SKIP_EMBED=1`,
//! `BENCH_SKIP_SCORE=1`.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::Device;
use lethe_model::embed::Embedder;
use lethe_model::generate::{GenerateConfig, Llm};
use lethe_model::gguf_llama::{BatchOptions, LoadOptions, ScorePair, WeightFormat};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const PROSE: &str = "The river town of Hallam grew up around a ford where the old road from the \
coast crossed the water on its way to the hill country. For most of its history it was a quiet \
place: a market on Thursdays, a mill that ground the barley of the surrounding farms, and a stone \
church whose bell could be heard three miles away when the wind came from the west. Travellers \
who stopped at the inn by the bridge remembered the town for its gardens, which ran down in long \
narrow strips from the backs of the houses to the edge of the river, and for the habit its people \
had of greeting strangers as if they were expected. Everything changed in the spring of the year \
the railway arrived. The engineers who surveyed the line chose a route along the valley floor, \
and within two summers a station, a goods yard and a row of brick cottages for the railway \
workers had appeared on the meadows south of the church. The mill was rebuilt with a steam \
engine and began to take grain from farms far beyond the old market's reach. New shops opened on \
the high street, selling cloth from the northern factories, tinned food, newspapers from the \
capital and, for a few years, bicycles, which the younger people rode up and down the towpath on \
summer evenings. Not everyone welcomed the changes. The older farmers complained that prices were \
now set by merchants they had never met, and the vicar preached more than once about the dangers \
of haste. Yet the town prospered. Its population doubled in a generation, a school and a library \
were built, and the gardens by the river, though smaller than before, were still full of roses \
every June. Historians who study the period point out that Hallam's story was repeated in \
hundreds of small towns across the country, each of which had to decide how much of its old life \
to keep and how much to trade for the speed and reach of the new age. The archive in the \
library still holds the letters, account books and photographs in which those choices can be \
traced, one family and one street at a time.";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The C allocator setting of the `lethe` binary (see the function).
    lethe_model::device::keep_freed_cpu_memory();
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
        .max(1);
    let formats: Vec<WeightFormat> = match std::env::var("BENCH_FORMATS") {
        Ok(s) if s == "none" => Vec::new(),
        Ok(s) if !s.is_empty() => s
            .split(',')
            .map(|f| f.trim().parse())
            .collect::<Result<_, _>>()?,
        _ => WeightFormat::ALL.to_vec(),
    };
    let skip_score = std::env::var("BENCH_SKIP_SCORE").is_ok_and(|v| v == "1");
    let device = Device::Cpu;
    let cache = lethe_assets::Cache::from_env();
    let gguf = cache
        .ensure(lethe_assets::Asset::SMOLLM2_135M_INSTRUCT)?
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");

    let mut llm_results = serde_json::Map::new();
    for format in formats {
        eprintln!("== {}", format.name());
        let t0 = Instant::now();
        let llm = Llm::load(
            &gguf,
            &device,
            &LoadOptions {
                format,
                max_context: None,
            },
        )?;
        let load_s = t0.elapsed().as_secs_f64();
        let mut text_ids = llm.tokenizer.encode(PROSE)?;
        while text_ids.len() < 424 + 230 * 32 {
            let more = llm.tokenizer.encode(&format!(" {PROSE}"))?;
            text_ids.extend(more);
        }
        let prompt = &text_ids[..424];

        // Prompt processing.
        let mut prompt_best = f64::MAX;
        for _ in 0..reps {
            let mut kv = llm.model.new_cache();
            let t = Instant::now();
            llm.model.forward_last(prompt, &mut kv)?;
            prompt_best = prompt_best.min(t.elapsed().as_secs_f64());
        }
        let prompt_tps = prompt.len() as f64 / prompt_best;
        eprintln!("prompt: {prompt_tps:.1} tok/s");

        // Generation.
        let cfg = GenerateConfig {
            max_tokens: 128,
            stop_at_eos: false,
            ..GenerateConfig::default()
        };
        let mut gen_best = 0f64;
        let mut generated = 0usize;
        for _ in 0..reps {
            let g = llm.generate(prompt, &cfg, |_| ControlFlow::Continue(()))?;
            generated = g.tokens.len();
            // The first token comes from the prompt pass; the rest are decode steps.
            let tps = (g.tokens.len().saturating_sub(1)) as f64 / g.generate_secs;
            gen_best = gen_best.max(tps);
        }
        eprintln!("generate: {gen_best:.1} tok/s ({generated} tokens)");

        // Batched scoring: the same 30-token continuation under 32 contexts.
        let cont = &text_ids[424..454];
        let distinct: Vec<Vec<u32>> = (0..32)
            .map(|i| text_ids[460 + i * 200..460 + i * 200 + 200].to_vec())
            .collect();
        let shared: Vec<Vec<u32>> = (0..32)
            .map(|i| {
                let mut c = text_ids[..100].to_vec();
                c.extend_from_slice(&text_ids[460 + i * 100..460 + i * 100 + 100]);
                c
            })
            .collect();
        let mut scoring = serde_json::Map::new();
        let score_sets: Vec<(&str, &Vec<Vec<u32>>)> = if skip_score {
            Vec::new()
        } else {
            vec![
                ("distinct_contexts", &distinct),
                ("shared_100_token_prefix", &shared),
            ]
        };
        for (name, contexts) in score_sets {
            let pairs: Vec<ScorePair<'_>> = contexts
                .iter()
                .map(|c| ScorePair {
                    prompt: c,
                    continuation: cont,
                })
                .collect();
            let tokens: usize = pairs
                .iter()
                .map(|p| p.prompt.len() + p.continuation.len())
                .sum();
            let mut best = f64::MAX;
            for _ in 0..reps {
                let t = Instant::now();
                let lp = llm.model.score(&pairs, &BatchOptions::default())?;
                best = best.min(t.elapsed().as_secs_f64());
                assert_eq!(lp.len(), 32);
            }
            eprintln!(
                "score {name}: {:.1} tok/s, {:.2} s per batch",
                tokens as f64 / best,
                best
            );
            scoring.insert(
                name.to_string(),
                json!({
                    "pairs": 32,
                    "tokens": tokens,
                    "seconds": best,
                    "tokens_per_s": tokens as f64 / best,
                }),
            );
        }
        llm_results.insert(
            format.name().to_string(),
            json!({
                "load_s": load_s,
                "prompt_tokens": prompt.len(),
                "prompt_tokens_per_s": prompt_tps,
                "generated_tokens": generated,
                "generated_tokens_per_s": gen_best,
                "scoring": scoring,
            }),
        );
    }

    let mut embed_result = serde_json::Value::Null;
    if std::env::var("BENCH_SKIP_EMBED").map_or(true, |v| v != "1") {
        let dir = cache.ensure(lethe_assets::Asset::ALL_MINILM_L6_V2)?;
        let t0 = Instant::now();
        let embedder = Embedder::load(&dir, &device)?;
        let load_s = t0.elapsed().as_secs_f64();
        let mut rng = StdRng::seed_from_u64(0);
        let vocab: Vec<String> = (0..90)
            .map(|i| {
                let len = 3 + (i * 7) % 6;
                (0..len)
                    .map(|j| (b'a' + ((i * 5 + j * 3) % 26) as u8) as char)
                    .collect()
            })
            .collect();
        let mut sentence = || {
            let n = rng.random_range(12..=20);
            (0..n)
                .map(|_| vocab[rng.random_range(0..vocab.len())].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let one: Vec<String> = (0..300).map(|_| sentence()).collect();
        let many: Vec<String> = (0..1024).map(|_| sentence()).collect();
        embedder.embed(&[one[0].as_str()])?; // warm-up
        let mut b1_best = 0f64;
        let mut b32_best = 0f64;
        for _ in 0..reps {
            let t = Instant::now();
            for s in &one {
                embedder.embed(&[s.as_str()])?;
            }
            b1_best = b1_best.max(one.len() as f64 / t.elapsed().as_secs_f64());
            let refs: Vec<&str> = many.iter().map(String::as_str).collect();
            let t = Instant::now();
            embedder.embed(&refs)?;
            b32_best = b32_best.max(many.len() as f64 / t.elapsed().as_secs_f64());
        }
        eprintln!("embed: batch 1 {b1_best:.1}/s, batch 32 {b32_best:.1}/s");
        embed_result = json!({
            "model": "all-MiniLM-L6-v2",
            "load_s": load_s,
            "batch1_sentences_per_s": b1_best,
            "batch32_sentences_per_s": b32_best,
            "peer_sentence_transformers": {"batch1_sentences_per_s": [85.4, 86.0], "batch32_sentences_per_s": [268.5, 279.9]},
        });
    }

    let out = json!({
        "benchmark": "lethe-model inference",
        "threads": candle_core::utils::get_num_threads(),
        "repetitions_best_of": reps,
        "smollm2_135m_instruct": llm_results,
        "peer_llama_cpp_q4_1_2_threads": {
            "prompt_tokens_per_s": {"llama_bench_pp424": [332.5, 275.3], "real_prompt_424": [337.6, 310.8]},
            "generated_tokens_per_s": {"llama_bench_tg128": [123.3, 113.9], "real_prompt_128": [109.7, 106.7]},
        },
        "minilm": embed_result,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
