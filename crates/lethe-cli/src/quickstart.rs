//! `lethe quickstart`: the main job end to end on a fresh machine.
//!
//! Fetches the models, ingests the Acme demo corpus under the example
//! policy into a fresh data directory, searches as several principals
//! (showing labels and what each may not see), checks where results may
//! flow (showing refusals with their reasons), creates an API key and
//! verifies the audit log.

use std::path::Path;
use std::process::ExitCode;

use lethe_engine::label::SinkRef;
use lethe_engine::{Actor, Config, Engine, Mode};

use crate::{print_hits, spinner};

pub(crate) fn run(dir: &Path) -> anyhow::Result<ExitCode> {
    let root = lethe_engine::project_root();
    let policy_path = root.join("policies/example-org.toml");
    let corpus_path = root.join("datasets/acme/corpus.jsonl");

    section("1. Models (fetched once, cached)");
    let cache = lethe_engine::default_model_cache();
    let pb = spinner("fetching models".into());
    let models = lethe_engine::fetch_models(&cache);
    pb.finish_and_clear();
    for (name, path) in models? {
        println!("  {name:<24} {}", path.display());
    }

    section("2. Policy");
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let engine = Engine::open(Config::new(dir.to_path_buf(), policy_path.clone()), "cli")?;
    let policy = engine.policy();
    println!(
        "  {}: {} principals, {} groups, {} labels, {} sinks",
        policy_path.display(),
        policy.principals().len(),
        policy.groups().len(),
        policy.labels().len(),
        policy.sinks().len()
    );

    section("3. Ingest the demo corpus");
    let docs = lethe_engine::read_jsonl(&corpus_path)?;
    let unlabeled = docs
        .iter()
        .filter(|d| d.label == lethe_engine::LabelSpec::Unlabeled)
        .count();
    let pb = spinner(format!("embedding and indexing {} documents", docs.len()));
    let report = engine.ingest(&Actor::Operator, docs, false);
    pb.finish_and_clear();
    let report = report?;
    println!(
        "  {} documents, {} chunks ({} unlabeled got the policy default label {:?})",
        report.documents.len(),
        report.chunks,
        unlabeled,
        policy.default_label().map(|(n, _)| n).unwrap_or("-")
    );

    section("4. The same questions, asked by different principals");
    let asks = [
        ("alice", "salary bands for engineers"),
        ("ed", "salary bands for engineers"),
        ("support-bot", "I forgot my login credentials"),
        ("frank", "quarterly revenue and cash"),
        ("support-bot", "quarterly revenue and cash"),
        ("lena", "risk of the pending lawsuit"),
    ];
    for (principal, query) in asks {
        let r = engine.search(principal, query, 3, Mode::Hybrid)?;
        print_hits(principal, query, &r);
        println!();
    }

    section("5. Where may results go? (label flow checks)");
    let flows = [
        ("alice", "salary bands for engineers", None),
        (
            "alice",
            "salary bands for engineers",
            Some("app:support-bot"),
        ),
        (
            "support-bot",
            "how do I export forecasts",
            Some("app:support-bot"),
        ),
        (
            "support-bot",
            "what went wrong during the March outage",
            Some("app:support-bot"),
        ),
        (
            "support-bot",
            "what people said on the forum",
            Some("app:support-bot"),
        ),
        (
            "frank",
            "quarterly revenue and cash",
            Some("email:external"),
        ),
        ("ed", "forecasting architecture", Some("app:support-bot")),
    ];
    for (principal, query, sink) in flows {
        let hit = engine
            .search(principal, query, 1, Mode::Hybrid)?
            .hits
            .into_iter()
            .next();
        let Some(hit) = hit else { continue };
        let sink_name = sink.unwrap_or("(the caller itself)");
        let sink_ref = match policy.resolve_sink(principal, sink) {
            Ok(s) => s,
            Err(e) => {
                println!("  {principal} -> {sink_name}: refused before retrieval: {e}");
                continue;
            }
        };
        let violations = policy.check_flow(&hit.label, &sink_ref);
        let label = lethe_engine::label_display(&hit);
        if violations.is_empty() {
            println!(
                "  {principal}: {} [{label}] -> {}: allowed",
                hit.doc_id,
                show_sink(&sink_ref)
            );
        } else {
            println!(
                "  {principal}: {} [{label}] -> {}: REFUSED",
                hit.doc_id,
                show_sink(&sink_ref)
            );
            for v in violations {
                println!("      - {v}");
            }
        }
    }

    section("6. API keys and the audit log");
    let key = engine.create_key(&Actor::Operator, "support-bot")?;
    let shown: String = key.key.chars().take(20).collect();
    println!("  key for support-bot: {shown}... (printed once; only its HMAC digest is stored)");
    println!(
        "  the key authenticates: {}",
        engine.authenticate(&key.key)?
    );
    let audit = engine.verify_audit()?;
    println!(
        "  audit log {}: {} records, {}",
        dir.join("audit.jsonl").display(),
        audit.records,
        if audit.is_intact() {
            "hash chain intact"
        } else {
            "DAMAGED"
        }
    );
    let consistency = engine.verify_store()?;
    println!(
        "  store: {} documents, {} chunks, BM25 and vectors agree: {}",
        consistency.documents,
        consistency.chunks,
        consistency.problems.is_empty()
    );
    engine.close()?;
    println!(
        "\nTry: lethe --data-dir {} --policy {} search --as erin \"on-call rotation\"",
        dir.display(),
        policy_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn section(title: &str) {
    println!("\n== {title} ==");
}

fn show_sink(s: &SinkRef) -> String {
    s.to_string()
}
