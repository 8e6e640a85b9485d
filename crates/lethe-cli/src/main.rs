//! `lethe`: the command-line front end.
//!
//! Parses arguments, opens an [`Engine`] and prints results. It knows argv,
//! exit codes and terminal output; everything else goes through
//! `lethe-engine`.

mod protect;
mod quickstart;
mod unlearn;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lethe_engine::{label::Policy, Actor, Config, Engine, Mode};

#[derive(Parser)]
#[command(
    name = "lethe",
    version,
    about = "Keeps ML pipelines honest about data: labels, policies, retrieval, unlearning"
)]
struct Cli {
    /// Configuration file (default: ./lethe.toml when it exists).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory (overrides the config).
    #[arg(long, global = true, env = "LETHE_DATA")]
    data_dir: Option<PathBuf>,
    /// Policy file (overrides the config).
    #[arg(long, global = true, env = "LETHE_POLICY")]
    policy: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch the models, build the demo corpus, and query it as several principals.
    Quickstart {
        /// Where the demo data goes (recreated).
        #[arg(long, default_value = ".lethe/quickstart")]
        dir: PathBuf,
    },
    /// Fetch and cache the models lethe uses (idempotent).
    Fetch,
    /// Run the daemon: policy-checked queries over HTTP (OpenAI-compatible).
    Serve {
        /// Address to listen on (overrides `[server] listen`; default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Ingest a JSON Lines file or a folder of .txt/.md files.
    Ingest {
        /// The file or folder.
        path: PathBuf,
        /// Act as this principal (needs the ingest role); default: local operator.
        #[arg(long = "as")]
        principal: Option<String>,
        /// Replace documents whose ids already exist instead of refusing.
        #[arg(long)]
        replace: bool,
    },
    /// Search as a principal: only what it may read.
    Search {
        /// The principal.
        #[arg(long = "as")]
        principal: String,
        /// The query.
        query: String,
        /// Number of hits.
        #[arg(short, default_value_t = 5)]
        k: usize,
        /// Retriever.
        #[arg(long, value_enum, default_value_t = ModeArg::Hybrid)]
        mode: ModeArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Documents.
    #[command(subcommand)]
    Doc(DocCommand),
    /// Evaluation suites (reports under evals/results/).
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The document store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Protect an image dataset before release (EM / SALM unlearnable
    /// examples), or audit a protected release.
    Protect(Box<protect::ProtectArgs>),
    /// Compliance unlearning: file requests, run them, signed receipts.
    #[command(subcommand)]
    Unlearn(unlearn::UnlearnCommand),
    /// The kNN-LM datastore (`[knnlm]` in lethe.toml).
    #[command(subcommand)]
    Knnlm(KnnlmCommand),
}

#[derive(Subcommand)]
enum DocCommand {
    /// Delete documents exactly from the store and every index.
    Delete {
        /// Document ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Act as this principal (needs the delete role); default: local operator.
        #[arg(long = "as")]
        principal: Option<String>,
    },
    /// List documents with their labels.
    List,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Label quality and soundness of the propagators on the generated benchmark.
    Labels {
        /// Run configuration.
        #[arg(long, default_value = "evals/labels/full.toml")]
        config: PathBuf,
        /// Where the report goes.
        #[arg(long, default_value = "evals/results")]
        out: PathBuf,
    },
    /// RESTOR: clean -> corrupted -> unlearned, for every unlearning method
    /// (resumable: finished stages are loaded, not recomputed).
    Restor {
        /// Run configuration.
        #[arg(long, default_value = "evals/restor/small.toml")]
        config: PathBuf,
        /// Where the report (and stage checkpoints) go.
        #[arg(long, default_value = "evals/results/restor")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files; problems are printed as file:line:column.
    Check {
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key for a principal; the key is printed once and not stored.
    Create {
        /// The principal.
        #[arg(long)]
        principal: String,
    },
    /// List key ids and their principals.
    List,
    /// Revoke a key by id.
    Revoke {
        /// Key id.
        id: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the hash chain; report any modified, removed, inserted or reordered record.
    Verify {
        /// An audit log file (default: the data directory's).
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Check that the document table and both indexes agree.
    Verify,
}

#[derive(Subcommand)]
enum KnnlmCommand {
    /// Build or update the kNN-LM datastore from the stored documents (one
    /// forward pass of the generator per new or changed document).
    Sync,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Bm25,
    Dense,
    Hybrid,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Bm25 => Mode::Bm25,
            ModeArg::Dense => Mode::Dense,
            ModeArg::Hybrid => Mode::Hybrid,
        }
    }
}

fn main() -> ExitCode {
    // Tensor-sized buffers stay in the heap for reuse instead of being
    // mapped and faulted in again at every step (1.5x on CPU protection).
    lethe_model::device::keep_freed_cpu_memory();
    quiet_on_closed_stdout();
    init_tracing();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// A reader that stops early (`lethe ... | head`) closes stdout: the next
/// print fails with a broken pipe, which `println!` turns into a panic.
/// That is the reader's choice, not an error: exit quietly, as the shell
/// tools do (status 141, a SIGPIPE death, without the signal). Every
/// other panic keeps the default report.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if payload.starts_with("failed printing to stdout") && payload.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// The error and its causes, `: `-separated, leaving out a cause whose text
/// the message already holds (the libraries' I/O errors print their source
/// in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn config(cli: &Cli) -> anyhow::Result<Config> {
    let path = cli.config.clone().or_else(|| {
        Path::new("lethe.toml")
            .exists()
            .then(|| PathBuf::from("lethe.toml"))
    });
    let mut config = match path {
        Some(p) => Config::load(&p)?,
        None => {
            let policy = cli.policy.clone().ok_or_else(|| {
                anyhow::format_err!(
                    "no policy: pass --policy FILE, set LETHE_POLICY, or write a lethe.toml"
                )
            })?;
            Config::new(PathBuf::from(".lethe/data"), policy)
        }
    };
    if let Some(d) = &cli.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(p) = &cli.policy {
        config.policy = p.clone();
    }
    Ok(config)
}

fn open(cli: &Cli) -> anyhow::Result<Engine> {
    let config = config(cli)?;
    Engine::open(config, "cli").context("opening the data directory")
}

fn actor(principal: &Option<String>) -> Actor {
    match principal {
        Some(p) => Actor::Principal(p.clone()),
        None => Actor::Operator,
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // `protect` needs no engine and takes its arguments by value. It reads
    // no configuration file, but a named one that does not exist is a
    // mistake worth stopping for.
    if let Some(path) = cli
        .config
        .as_deref()
        .filter(|_| matches!(cli.command, Command::Protect(_)))
    {
        if !path.is_file() {
            anyhow::bail!("configuration file {} not found", path.display());
        }
        tracing::warn!(
            "protect reads no settings from {}: its options are its flags",
            path.display()
        );
    }
    if let Command::Protect(args) = cli.command {
        return protect::run(*args).map(|()| ExitCode::SUCCESS);
    }
    match &cli.command {
        Command::Quickstart { dir } => quickstart::run(dir),
        Command::Serve { listen } => {
            let config = config(&cli)?;
            let mut server = lethe_daemon::ServerConfig::from_table(config.server.as_ref())
                .map_err(anyhow::Error::msg)?;
            if let Some(l) = listen {
                server.listen = *l;
            }
            let engine = std::sync::Arc::new(
                Engine::open(config, "http").context("opening the data directory")?,
            );
            let pb = spinner("loading models".into());
            let warm = engine.warm_up();
            pb.finish_and_clear();
            warm?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(server.listen)
                    .await
                    .with_context(|| format!("binding {}", server.listen))?;
                eprintln!("lethe serving on http://{}", listener.local_addr()?);
                let state = lethe_daemon::AppState::new(engine, server);
                lethe_daemon::serve(state, listener, lethe_daemon::shutdown_signal()).await?;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(EvalCommand::Labels { config, out }) => {
            let root = lethe_engine::project_root();
            let resolve = |p: &PathBuf| if p.exists() { p.clone() } else { root.join(p) };
            let cfg = lethe_eval::labels::LabelsConfig::load(&resolve(config))?;
            let pb = indicatif::ProgressBar::new(0);
            pb.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} answers, ETA {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let report = lethe_eval::labels::run_default(
                &cfg,
                &root.join("policies/example-org.toml"),
                |done, total| {
                    pb.set_length(total as u64);
                    pb.set_position(done as u64);
                },
            );
            pb.finish_and_clear();
            let report = report?;
            let out = if out.is_absolute() {
                out.clone()
            } else {
                root.join(out)
            };
            report.write(&out)?;
            println!("{}", report.markdown());
            println!("wrote {}", out.join("labels.json").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(EvalCommand::Restor { config, out }) => {
            // Small-model training: candle's element-wise pool competes with
            // the matmul threads on small machines (see lethe-restor).
            if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
                std::env::set_var("CANDLE_NUM_THREADS", "1");
            }
            let root = lethe_engine::project_root();
            let resolve = |p: &PathBuf| {
                if p.is_absolute() || p.exists() {
                    p.clone()
                } else {
                    root.join(p)
                }
            };
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} {msg} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let out = resolve(out);
            let report = lethe_restor::run_with_progress(&resolve(config), &out, &mut |p| {
                bar.set_length(p.total as u64);
                bar.set_position(p.done as u64);
                bar.set_message(format!("{} ({:?})", p.stage, p.status));
            });
            bar.finish_and_clear();
            let report = report?;
            println!(
                "gates pass: {}; finding: {}; {:.1} s",
                report.gates.all_pass, report.finding.verdict, report.environment.total_seconds
            );
            println!("wrote {}", out.join("report.md").display());
            Ok(if report.gates.all_pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Command::Fetch => {
            for (name, dir) in lethe_engine::fetch_models(&lethe_engine::default_model_cache())? {
                println!("{name:<24} {}", dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Check { files }) => {
            let mut failed = false;
            for f in files {
                match Policy::load(f) {
                    Ok(p) => println!(
                        "{}: ok ({} principals, {} groups, {} labels, {} sinks)",
                        f.display(),
                        p.principals().len(),
                        p.groups().len(),
                        p.labels().len(),
                        p.sinks().len()
                    ),
                    Err(e) => {
                        failed = true;
                        eprintln!("{e}");
                    }
                }
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Audit(AuditCommand::Verify { file: Some(file) }) => {
            audit_verify(&lethe_engine::verify_audit_file(file)?)
        }
        Command::Ingest {
            path,
            principal,
            replace,
        } => {
            let engine = open(&cli)?;
            let docs = if path.is_dir() {
                lethe_engine::read_folder(path)?
            } else {
                lethe_engine::read_jsonl(path)?
            };
            let n = docs.len();
            let spinner = spinner(format!("embedding and indexing {n} documents"));
            let report = engine.ingest(&actor(principal), docs, *replace);
            spinner.finish_and_clear();
            let report = report?;
            println!(
                "ingested {} documents ({} chunks){}",
                report.documents.len(),
                report.chunks,
                if report.replaced.is_empty() {
                    String::new()
                } else {
                    format!(", replaced {}", report.replaced.len())
                }
            );
            engine.close()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Search {
            principal,
            query,
            k,
            mode,
            json,
        } => {
            let engine = open(&cli)?;
            let r = engine.search(principal, query, *k, (*mode).into())?;
            if *json {
                let hits: Vec<serde_json::Value> = r
                    .hits
                    .iter()
                    .map(|h| {
                        serde_json::json!({
                            "chunk": h.chunk_id, "doc": h.doc_id, "score": h.score,
                            "label": lethe_engine::label_display(h), "text": h.text,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"hits": hits, "readable_chunks": r.readable_chunks, "total_chunks": r.total_chunks, "audit_seq": r.audit_seq})
                );
            } else {
                print_hits(principal, query, &r);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Doc(DocCommand::Delete { ids, principal }) => {
            let engine = open(&cli)?;
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let report = engine.delete(&actor(principal), &ids)?;
            for r in &report.removed {
                println!(
                    "deleted {} ({} chunks, sha256 {})",
                    r.id, r.chunks, r.content_sha256
                );
            }
            engine.close()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Doc(DocCommand::List) => {
            let engine = open(&cli)?;
            for d in engine.documents() {
                let label = d.label_name.clone().unwrap_or_else(|| d.label.to_string());
                println!("{:<40} {:<24} {} chunks", d.id, label, d.chunks);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(KeysCommand::Create { principal }) => {
            let engine = open(&cli)?;
            let key = engine.create_key(&Actor::Operator, principal)?;
            println!("{}", key.key);
            eprintln!(
                "key id {} for {principal}: shown once, store it now",
                key.record.id
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(KeysCommand::List) => {
            let engine = open(&cli)?;
            for k in engine.keys() {
                println!(
                    "{}  {:<20} {}",
                    k.id,
                    k.principal,
                    if k.revoked { "revoked" } else { "active" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(KeysCommand::Revoke { id }) => {
            let engine = open(&cli)?;
            let r = engine.revoke_key(&Actor::Operator, id)?;
            println!("revoked {} ({})", r.id, r.principal);
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::Verify { file: None }) => {
            let engine = open(&cli)?;
            audit_verify(&engine.verify_audit()?)
        }
        Command::Unlearn(cmd) => unlearn::run(cmd, || open(&cli)),
        Command::Protect(_) => anyhow::bail!("protect is handled before the engine opens"),
        Command::Knnlm(KnnlmCommand::Sync) => {
            let engine = open(&cli)?;
            let s = engine.sync_datastore(&Actor::Operator)?;
            println!(
                "kNN-LM datastore: {} documents added, {} removed, {} entries",
                s.added, s.removed, s.entries
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Store(StoreCommand::Verify) => {
            let engine = open(&cli)?;
            let c = engine.verify_store()?;
            println!(
                "{} documents, {} chunks, {} in BM25, {} vectors",
                c.documents, c.chunks, c.bm25_chunks, c.vectors
            );
            for p in &c.problems {
                eprintln!("problem: {p}");
            }
            Ok(if c.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn audit_verify(report: &lethe_engine::AuditReport) -> anyhow::Result<ExitCode> {
    if report.is_intact() {
        println!("audit log intact: {} records", report.records);
        Ok(ExitCode::SUCCESS)
    } else {
        println!("audit log damaged: {} records read", report.records);
        for f in &report.findings {
            println!("  {f}");
        }
        Ok(ExitCode::from(2))
    }
}

pub(crate) fn print_hits(principal: &str, query: &str, r: &lethe_engine::SearchResult) {
    println!(
        "{principal} searches {query:?}: {} hits ({} of {} chunks readable)",
        r.hits.len(),
        r.readable_chunks,
        r.total_chunks
    );
    for h in &r.hits {
        let text: String = h.text.chars().take(90).collect();
        println!(
            "  {:>7.3}  {:<28} [{}]  {}",
            h.score,
            h.chunk_id,
            lethe_engine::label_display(h),
            text
        );
    }
}

pub(crate) fn spinner(msg: String) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg);
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}
