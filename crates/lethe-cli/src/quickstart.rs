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

    section("6. The daemon: the same question, asked over HTTP by two principals");
    let engine = std::sync::Arc::new(engine);
    let pb = spinner("loading SmolLM2 and MiniLM".into());
    let warm = engine.warm_up();
    pb.finish_and_clear();
    warm?;
    daemon_demo(&engine)?;
    let engine = std::sync::Arc::try_unwrap(engine)
        .map_err(|_| anyhow::format_err!("the daemon still holds the engine"))?;

    section("7. API keys and the audit log");
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

/// Starts the daemon on a free loopback port, asks questions as two
/// principals and as the support bot towards its public sink, then stops it.
fn daemon_demo(engine: &std::sync::Arc<Engine>) -> anyhow::Result<()> {
    let config = lethe_daemon::ServerConfig {
        default_max_tokens: 32,
        default_k: 5,
        ..lethe_daemon::ServerConfig::default()
    };
    let state = lethe_daemon::AppState::new(engine.clone(), config);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let _ = addr_tx.send(listener.local_addr()?);
            lethe_daemon::serve(state, listener, async {
                let _ = stop_rx.await;
            })
            .await?;
            anyhow::Ok(())
        })
    });
    let addr = addr_rx.recv()?;
    println!("  lethe daemon on http://{addr} (SmolLM2-135M-Instruct + all-MiniLM-L6-v2, CPU)");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let ask = |principal: &str,
               query: &str,
               sink: Option<&str>,
               propagator: &str|
     -> anyhow::Result<()> {
        let key = engine.create_key(&Actor::Operator, principal)?.key;
        let mut body = serde_json::json!({ "query": query, "propagator": propagator });
        if let Some(s) = sink {
            body["sink"] = serde_json::json!(s);
        }
        let mut resp = agent
            .post(&format!("http://{addr}/v1/query"))
            .header("authorization", &format!("Bearer {key}"))
            .send_json(&body)?;
        let status = resp.status().as_u16();
        let v: serde_json::Value = serde_json::from_str(&resp.body_mut().read_to_string()?)?;
        let to = sink.unwrap_or("itself");
        println!("\n  {principal} asks {query:?} (answer goes to {to}, {propagator} label): HTTP {status}");
        if status == 200 {
            let sources: Vec<String> = v["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| {
                    let id = s["id"].as_str()?;
                    Some(if s["used"] == true {
                        id.to_string()
                    } else {
                        format!("({id}: retrieved, not used)")
                    })
                })
                .collect();
            println!("    sources: {}", sources.join(", "));
            println!(
                "    label:   {}",
                v["label"]["display"].as_str().unwrap_or("?")
            );
            let answer = v["answer"]
                .as_str()
                .unwrap_or("")
                .trim()
                .replace('\n', "\n             ");
            println!("    answer:  {answer}");
        } else {
            println!("    {}", v["error"]["message"].as_str().unwrap_or("?"));
            for reason in v["error"]["violations"].as_array().into_iter().flatten() {
                println!("      - {}", reason["message"].as_str().unwrap_or("?"));
            }
            // Which sources the label came from: under the permissive
            // propagator, only those found to influence the answer.
            let blocking: Vec<String> = v["error"]["blocking_sources"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    format!(
                        "{} [{}]",
                        s["id"].as_str().unwrap_or("?"),
                        s["label"]["name"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            if !blocking.is_empty() {
                println!("    blocked by: {}", blocking.join(", "));
            }
        }
        Ok(())
    };
    let question = "What are the salary bands for engineers?";
    ask("alice", question, None, "conservative")?;
    ask("ed", question, None, "conservative")?;
    println!(
        "\n  The support bot answers customers (a public sink). Retrieval also brings internal"
    );
    println!("  notes and untrusted web text, so the conservative label blocks the answer. The");
    println!(
        "  permissive label keeps only the sources that influenced it and regenerates from them:"
    );
    println!("  the answer goes out when none of those is internal or untrusted. Which ones");
    println!("  influence a 135M model's greedy answer can change with the CPU's rounding:");
    let password = "How do I reset a password?";
    ask(
        "support-bot",
        password,
        Some("app:support-bot"),
        "conservative",
    )?;
    ask(
        "support-bot",
        password,
        Some("app:support-bot"),
        "permissive",
    )?;
    ask(
        "support-bot",
        "Tell me about the March outage.",
        Some("app:support-bot"),
        "permissive",
    )?;
    let _ = stop_tx.send(());
    server
        .join()
        .map_err(|_| anyhow::format_err!("the daemon thread panicked"))??;
    Ok(())
}

fn section(title: &str) {
    println!("\n== {title} ==");
}

fn show_sink(s: &SinkRef) -> String {
    s.to_string()
}
