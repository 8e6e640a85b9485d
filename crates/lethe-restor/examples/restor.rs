//! Runs the RESTOR-style evaluation from a config, with a progress bar.
//!
//! `cargo run --release -p lethe-restor --example restor -- [CONFIG] [OUT_DIR]`
//! (defaults `evals/restor/small.toml`, `evals/results/restor`). Writes
//! `report.json`, `report.md` and two SVG figures into OUT_DIR;
//! checkpoints go to `OUT_DIR/stages` unless the config names a folder.
//! A rerun loads every finished stage instead of recomputing it.
//!
//! Threads: unless set, `CANDLE_NUM_THREADS=1` (candle's element-wise pool
//! spin-waits and competes with the matmul threads on small machines) and
//! `RAYON_NUM_THREADS=2`.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The C allocator setting of the `lethe` binary (see the function).
    lethe_model::device::keep_freed_cpu_memory();
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "lethe_restor=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let config = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "evals/restor/small.toml".into()),
    );
    let out = PathBuf::from(args.next().unwrap_or_else(|| "evals/results/restor".into()));
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")?
            .progress_chars("=> "),
    );
    let report = lethe_restor::run_with_progress(&config, &out, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(format!("{} ({:?})", p.stage, p.status));
    })?;
    bar.finish();
    eprintln!(
        "gates pass: {}; finding: {}; {:.1} s; report in {}",
        report.gates.all_pass,
        report.finding.verdict,
        report.environment.total_seconds,
        out.display()
    );
    Ok(())
}
