//! `cargo xtask bench labels`: what the permissive label costs at query time.
//!
//! Ingests the Acme corpus, then asks the same questions (k = 5, hybrid
//! retrieval, greedy, 32 tokens) two ways through the engine:
//! conservative, answering to the caller itself (the answer is released),
//! and permissive, answering to a sink the conservative label could not
//! reach (the support bot's public channel; staff asking for the intranet),
//! so the propagator has to find and verify a smaller context. Reports
//! latency percentiles and their ratio, the outcome of each permissive
//! query, and writes `evals/results/labels-bench.json`.
//!
//! Usage: `bench_labels [--out FILE] [--rounds N]`.

use std::path::PathBuf;
use std::time::Instant;

use lethe_engine::{
    Actor, AnswerRequest, Config, Decision, Engine, GenerateConfig, Mode, PermissiveConfig,
    Propagator,
};

const QUESTIONS: &[(&str, &str, &str)] = &[
    (
        "support-bot",
        "How do I reset a password?",
        "app:support-bot",
    ),
    (
        "support-bot",
        "How can customers export forecasts?",
        "app:support-bot",
    ),
    (
        "support-bot",
        "What happened during the March outage?",
        "app:support-bot",
    ),
    (
        "support-bot",
        "How do I change the refresh interval?",
        "app:support-bot",
    ),
    (
        "erin",
        "When does the on-call rotation start?",
        "app:intranet",
    ),
    (
        "erin",
        "What caused the March ingestion incident?",
        "app:intranet",
    ),
    (
        "alice",
        "How many days of paid holiday do employees get?",
        "app:intranet",
    ),
    (
        "frank",
        "What is the expense policy for hotels?",
        "app:intranet",
    ),
];

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Same thread settings as the other CPU benchmarks.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let root = lethe_engine::project_root();
    let out = arg("--out")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("evals/results/labels-bench.json"));
    let rounds: usize = arg("--rounds").and_then(|r| r.parse().ok()).unwrap_or(2);

    let dir = tempfile::tempdir()?;
    let engine = Engine::open(
        Config::new(
            dir.path().join("data"),
            root.join("policies/example-org.toml"),
        ),
        "bench",
    )?;
    engine.ingest(
        &Actor::Operator,
        lethe_engine::read_jsonl(&root.join("datasets/acme/corpus.jsonl"))?,
        false,
    )?;
    engine.warm_up()?;
    let request =
        |principal: &str, query: &str, sink: Option<&str>, propagator: Propagator| AnswerRequest {
            principal: principal.into(),
            query: query.into(),
            sink: sink.map(String::from),
            k: 5,
            mode: Mode::Hybrid,
            propagator,
            generation: GenerateConfig {
                max_tokens: 32,
                ..GenerateConfig::default()
            },
            generator: lethe_engine::Generator::Rag,
        };
    // Warm-up, not timed.
    let _ = engine.answer(
        &request("erin", "hello", None, Propagator::Conservative),
        |_| std::ops::ControlFlow::Continue(()),
    );

    let mut conservative = Vec::new();
    let mut permissive = Vec::new();
    let mut outcomes = Vec::new();
    for _ in 0..rounds {
        for (principal, q, sink) in QUESTIONS {
            let t = Instant::now();
            let c = engine.answer(
                &request(principal, q, None, Propagator::Conservative),
                |_| std::ops::ControlFlow::Continue(()),
            )?;
            conservative.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            let p = engine.answer(
                &request(
                    principal,
                    q,
                    Some(sink),
                    Propagator::Permissive(PermissiveConfig::default()),
                ),
                |_| std::ops::ControlFlow::Continue(()),
            )?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            permissive.push(ms);
            let conservative_to_sink = engine
                .policy()
                .check_flow(
                    &c.answer.label,
                    &engine.policy().resolve_sink(principal, Some(sink))?,
                )
                .is_empty();
            outcomes.push(serde_json::json!({
                "principal": principal, "question": q, "sink": sink,
                "conservative_label_would_flow": conservative_to_sink,
                "permissive_decision": match p.answer.decision { Decision::Released => "released", Decision::Refused(_) => "refused" },
                "permissive_route": p.answer.trace.route,
                "permissive_sources": p.answer.label_sources.len(),
                "generations": p.answer.cost.generations,
                "scored_contexts": p.answer.cost.scored_contexts,
                "score_batches": p.answer.cost.score_batches,
                "generated_tokens": p.answer.cost.generated_tokens,
                "reused_tokens": p.answer.cost.reused_tokens,
                "full_answer": p.answer.trace.full_answer,
                "answer": p.answer.text,
                "permissive_ms": ms,
            }));
        }
    }
    let (c50, p50) = (percentile(&conservative, 0.5), percentile(&permissive, 0.5));
    let summary = serde_json::json!({
        "permissive_over_conservative_latency": p50 / c50,
        "conservative_p50_ms": c50,
        "permissive_p50_ms": p50,
        "conservative_p95_ms": percentile(&conservative, 0.95),
        "permissive_p95_ms": percentile(&permissive, 0.95),
        "k": 5,
        "queries": conservative.len(),
        "released_by_permissive": outcomes.iter().filter(|o| o["permissive_decision"] == "released").count(),
    });
    let doc = serde_json::json!({
        "summary": summary,
        "setup": {"generator": engine.model_id(), "max_tokens": 32, "retrieval": "hybrid", "rounds": rounds, "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "outcomes": outcomes,
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
