//! `cargo xtask bench serve`: concurrent clients against a running daemon.
//!
//! Builds the release `lethe`, ingests the Acme corpus into a fresh data
//! directory, starts `lethe serve` as a child process, and runs N client
//! threads asking questions as several principals for the given duration.
//! Records every latency and error, samples the daemon's resident memory
//! once a second, stops it with SIGTERM (graceful shutdown) and verifies the
//! audit chain. Writes `evals/results/serve.json`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::cargo;

const QUESTIONS: &[(&str, &str)] = &[
    ("alice", "What are the salary bands for engineers?"),
    ("ed", "When does the on-call rotation start?"),
    ("frank", "What was the revenue in the third quarter?"),
    ("support-bot", "How do I reset my password?"),
    ("erin", "What caused the March ingestion incident?"),
    ("lena", "What is the risk of the pending lawsuit?"),
];

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub(crate) fn bench(root: &Path, seconds: u64, clients: usize) -> anyhow::Result<()> {
    crate::run(cargo().args(["build", "--release", "-q", "-p", "lethe-cli"]))?;
    let lethe = root.join("target/release/lethe");
    let work = root.join(".lethe/bench-serve");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let config = work.join("lethe.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\npolicy = \"{}\"\n\n[server]\nlisten = \"127.0.0.1:{port}\"\ndefault_max_tokens = 16\nqueue_capacity = {}\n",
            root.join("policies/example-org.toml").display(),
            clients * 2
        ),
    )?;
    let lethe_cmd = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(&lethe)
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("lethe {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    };
    lethe_cmd(&[
        "ingest",
        root.join("datasets/acme/corpus.jsonl")
            .to_str()
            .unwrap_or_default(),
    ])?;
    let mut keys = std::collections::HashMap::new();
    for (p, _) in QUESTIONS {
        keys.insert(
            *p,
            lethe_cmd(&["keys", "create", "--principal", p])?
                .trim()
                .to_string(),
        );
    }
    let child = Command::new(&lethe)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting lethe serve")?;
    let daemon = Daemon(child);
    let pid = daemon.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let started = Instant::now();
    loop {
        if agent
            .get(&format!("{base}/healthz"))
            .call()
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the daemon did not come up");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Warm-up: one request per principal, not timed.
    for (p, q) in QUESTIONS {
        let _ = agent
            .post(&format!("{base}/v1/query"))
            .header("authorization", &format!("Bearer {}", keys[p]))
            .send_json(serde_json::json!({"query": q}));
    }
    let rss_start = rss_mib(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut threads = Vec::new();
    for c in 0..clients {
        let (stop, latencies, errors, agent, base) = (
            stop.clone(),
            latencies.clone(),
            errors.clone(),
            agent.clone(),
            base.clone(),
        );
        let keys = keys.clone();
        threads.push(std::thread::spawn(move || {
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let (p, q) = QUESTIONS[i % QUESTIONS.len()];
                i += 1;
                let t = Instant::now();
                let r = agent
                    .post(&format!("{base}/v1/query"))
                    .header("authorization", &format!("Bearer {}", keys[p]))
                    .send_json(serde_json::json!({"query": q}));
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                match r {
                    Ok(mut resp) if resp.status() == 200 => {
                        let _ = resp.body_mut().read_to_string();
                        latencies.lock().unwrap_or_else(|e| e.into_inner()).push(ms);
                    }
                    Ok(resp) => errors
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("HTTP {}", resp.status())),
                    Err(e) => errors
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(e.to_string()),
                }
            }
        }));
    }
    let mut rss = Vec::new();
    let load_start = Instant::now();
    while load_start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        if let Some(m) = rss_mib(pid) {
            rss.push(m);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = load_start.elapsed().as_secs_f64();
    // Graceful shutdown, then the audit chain.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let mut daemon = daemon;
    let exit = daemon.0.wait()?;
    let audit = lethe_cmd(&["audit", "verify"]);
    let mut lat = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    lat.sort_by(|a, b| a.total_cmp(b));
    let errors = errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let half = rss.len() / 2;
    let mean = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let summary = serde_json::json!({
        "qps": lat.len() as f64 / elapsed,
        "p50_ms": percentile(&lat, 0.5),
        "p99_ms": percentile(&lat, 0.99),
        "errors": errors.len(),
        "clients": clients,
        "seconds": elapsed,
    });
    let doc = serde_json::json!({
        "summary": summary,
        "requests": lat.len(),
        "max_tokens": 16,
        "workers": 1,
        "latency_ms": {"p90": percentile(&lat, 0.9), "max": lat.last()},
        "memory_mib": {
            "after_warmup": rss_start,
            "first_half_mean": mean(&rss[..half]),
            "second_half_mean": mean(&rss[half..]),
            "max": rss.iter().cloned().fold(f64::NAN, f64::max),
            "samples": rss,
        },
        "error_samples": errors.iter().take(10).collect::<Vec<_>>(),
        "graceful_exit": exit.success(),
        "audit_verify": match &audit { Ok(s) => s.trim().to_string(), Err(e) => e.to_string() },
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
    });
    let out = root.join("evals/results/serve.json");
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&doc["summary"])?);
    println!("wrote {}", out.display());
    if audit.is_err() {
        bail!("the audit chain did not verify after the run");
    }
    Ok(())
}
