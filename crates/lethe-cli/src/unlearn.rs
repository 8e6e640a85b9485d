//! `lethe unlearn`: file compliance-unlearning requests, run them with a
//! progress bar, inspect the ledger, and print or verify signed receipts.
//!
//! Everything goes through `lethe_compliance`; this module knows argv and
//! terminal output only. `verify-receipt` needs no data directory when a
//! public key is given.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use lethe_compliance::{
    Compliance, NewRequest, PublicKey, Receipt, RequestStatus, State, METHODS, STEPS,
};
use lethe_engine::{Actor, Engine};

/// `lethe unlearn ...`
#[derive(Clone, clap::Subcommand)]
pub enum UnlearnCommand {
    /// File an unlearning request in the ledger (needs the unlearn role).
    Request {
        /// Documents to forget (repeat the flag for several).
        #[arg(long = "doc", required = true)]
        docs: Vec<String>,
        /// Why (legal basis, ticket number).
        #[arg(long)]
        reason: String,
        /// Who asked (the data subject or their representative).
        #[arg(long)]
        requester: String,
        /// Method for this request (default: the run's, else `[unlearning] method`).
        #[arg(long, value_parser = METHODS)]
        method: Option<String>,
        /// Act as this principal; default: local operator.
        #[arg(long = "as")]
        principal: Option<String>,
    },
    /// Execute requests: interrupted ones are resumed (or rolled back and
    /// redone), then pending ones run in filing order.
    Run {
        /// Only this request (a failed one is retried).
        #[arg(long)]
        id: Option<String>,
        /// Method (overrides the request's and the config's).
        #[arg(long, value_parser = METHODS)]
        method: Option<String>,
        /// Act as this principal; default: local operator.
        #[arg(long = "as")]
        principal: Option<String>,
    },
    /// One request's state, or a summary of the ledger and the live weights.
    Status {
        /// Request id.
        id: Option<String>,
        /// Act as this principal; default: local operator.
        #[arg(long = "as")]
        principal: Option<String>,
    },
    /// Every request with its state.
    List {
        /// Act as this principal; default: local operator.
        #[arg(long = "as")]
        principal: Option<String>,
    },
    /// Print a completed request's signed receipt (JSON).
    Receipt {
        /// Request id.
        id: String,
        /// Write it to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Act as this principal; default: local operator.
        #[arg(long = "as")]
        principal: Option<String>,
    },
    /// Verify a receipt file's Ed25519 signature.
    VerifyReceipt {
        /// The receipt file.
        file: PathBuf,
        /// The public key (`ed25519:<hex>`) or a file holding it; default:
        /// this data directory's key.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Print the public key that verifies this data directory's receipts.
    PublicKey {
        /// Write it to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Runs an `unlearn` subcommand; `open` opens the engine when needed.
pub fn run(
    cmd: &UnlearnCommand,
    open: impl FnOnce() -> anyhow::Result<Engine>,
) -> anyhow::Result<ExitCode> {
    if let UnlearnCommand::VerifyReceipt {
        file,
        public_key: Some(key),
    } = cmd
    {
        return verify(file, &parse_key(key)?);
    }
    let engine = Arc::new(open()?);
    let c = Compliance::open(&engine).context("opening the unlearning ledger")?;
    let code = match cmd {
        UnlearnCommand::Request {
            docs,
            reason,
            requester,
            method,
            principal,
        } => {
            let s = c.file(
                &actor(principal),
                NewRequest {
                    documents: docs.clone(),
                    reason: reason.clone(),
                    requester: requester.clone(),
                    method: method.clone(),
                },
            )?;
            println!("{}", s.request.id);
            eprintln!(
                "filed {} for {} document(s); run it with `lethe unlearn run`",
                s.request.id,
                s.request.documents.len()
            );
            ExitCode::SUCCESS
        }
        UnlearnCommand::Run {
            id,
            method,
            principal,
        } => {
            let ids = match id {
                Some(id) => vec![id.clone()],
                None => c.runnable(),
            };
            if ids.is_empty() {
                println!("nothing to run");
                return Ok(ExitCode::SUCCESS);
            }
            let steps = STEPS.len() as u64;
            let pb = indicatif::ProgressBar::new(ids.len() as u64 * steps);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb.enable_steady_tick(std::time::Duration::from_millis(150));
            let mut failed = false;
            for (i, id) in ids.iter().enumerate() {
                let base = i as u64 * steps;
                let result = c.run(&actor(principal), id, method.as_deref(), &mut |p| {
                    pb.set_position(base + p.done);
                    pb.set_message(format!("{}: {}", p.request, p.step));
                });
                pb.set_position(base + steps);
                match result {
                    Ok(out) => pb.suspend(|| {
                        println!(
                            "{} completed{}: receipt {}",
                            out.id,
                            if out.resumed { " (resumed)" } else { "" },
                            engine
                                .config()
                                .data_dir
                                .join("unlearning/receipts")
                                .join(format!("{}.json", out.id))
                                .display()
                        )
                    }),
                    Err(e) => {
                        failed = true;
                        pb.suspend(|| eprintln!("{id} failed: {e}"));
                    }
                }
            }
            pb.finish_and_clear();
            if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        UnlearnCommand::Status {
            id: Some(id),
            principal,
        } => {
            let s = c.status(&actor(principal), id)?;
            print_status(&s);
            if let State::Failed(e) = &s.state {
                println!("  error: {e}");
            }
            if let Some(w) = &s.weights {
                println!("  weights: {} ({})", w.kind, w.method);
            }
            if let Some(e) = &s.erasure {
                println!(
                    "  erased: {} now, {} already absent; probe: {}/{} forget queries hit, {}/{} retained found",
                    e.removed.len(),
                    e.already_absent.len(),
                    e.probe[1],
                    e.probe[0],
                    e.probe[3],
                    e.probe[2]
                );
            }
            ExitCode::SUCCESS
        }
        UnlearnCommand::Status {
            id: None,
            principal,
        } => {
            let all = c.list(&actor(principal))?;
            let count = |name: &str| all.iter().filter(|s| s.state.name() == name).count();
            println!(
                "{} requests: {} pending, {} running or interrupted, {} completed, {} failed",
                all.len(),
                count("pending"),
                count("running"),
                count("completed"),
                count("failed")
            );
            let live = c.live();
            let model = match &engine.config().unlearning.model {
                None => "no trainable model configured (retrieval-only unlearning)".to_string(),
                Some(p) => format!(
                    "{} (live version: {})",
                    p.display(),
                    live.version.as_deref().unwrap_or("base")
                ),
            };
            println!("live epoch {}; model: {model}", live.epoch);
            if !live.suppressions.is_empty() {
                println!("O3 suppression adapters: {}", live.suppressions.join(", "));
            }
            println!("receipt key: {}", c.public_key().to_text());
            ExitCode::SUCCESS
        }
        UnlearnCommand::List { principal } => {
            for s in c.list(&actor(principal))? {
                print_status(&s);
            }
            ExitCode::SUCCESS
        }
        UnlearnCommand::Receipt { id, out, principal } => {
            let r = c.receipt(&actor(principal), id)?;
            match out {
                Some(path) => {
                    std::fs::write(path, r.to_json())
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{}", r.to_json()),
            }
            ExitCode::SUCCESS
        }
        UnlearnCommand::VerifyReceipt {
            file,
            public_key: _,
        } => verify(file, c.public_key())?,
        UnlearnCommand::PublicKey { out } => {
            let text = c.public_key().to_text();
            match out {
                Some(path) => {
                    std::fs::write(path, format!("{text}\n"))
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => println!("{text}"),
            }
            ExitCode::SUCCESS
        }
    };
    Ok(code)
}

fn actor(principal: &Option<String>) -> Actor {
    match principal {
        Some(p) => Actor::Principal(p.clone()),
        None => Actor::Operator,
    }
}

fn parse_key(arg: &str) -> anyhow::Result<PublicKey> {
    let text = if std::path::Path::new(arg).is_file() {
        std::fs::read_to_string(arg).with_context(|| format!("reading {arg}"))?
    } else {
        arg.to_string()
    };
    Ok(PublicKey::parse(&text)?)
}

fn verify(file: &std::path::Path, key: &PublicKey) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let receipt = Receipt::parse(&text)?;
    match receipt.verify(key) {
        Ok(()) => {
            println!(
                "receipt {} verified: signed by key {}",
                receipt.request_id().unwrap_or("?"),
                key.key_id()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("receipt {} does NOT verify: {e}", file.display());
            Ok(ExitCode::from(2))
        }
    }
}

fn print_status(s: &RequestStatus) {
    let state = match &s.state {
        State::Running(p) => format!("running ({})", p.name()),
        other => other.name().to_string(),
    };
    println!(
        "{}  {:<20} {:<8} {}  [{}]",
        s.request.id,
        state,
        s.method.as_deref().unwrap_or("-"),
        s.request
            .documents
            .iter()
            .map(|d| d.id.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        s.request.requester
    );
}
