//! Test helper for the crash tests: runs one unlearning request in its own
//! process and announces each step on stdout, so that the test can kill it
//! with SIGKILL at a chosen point.
//!
//! `lethe-compliance-child CONFIG PRINCIPAL REQUEST STEP MODE`: opens the
//! engine of `CONFIG` (a `lethe.toml`), runs `REQUEST` as `PRINCIPAL`
//! (`operator` for the local operator) and, when step `STEP` begins,
//! prints `AT STEP` and then either blocks forever (`MODE` = `stop`: the
//! kill lands exactly before the step) or carries on (`MODE` = `go`: the
//! kill lands somewhere inside the step or after it). Prints `DONE` when
//! the run finishes. Not part of the product.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: lethe-compliance-child CONFIG PRINCIPAL REQUEST STEP stop|go");
        return ExitCode::from(2);
    }
    match run(&args[1], &args[2], &args[3], &args[4], args[5] == "stop") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(
    config: &str,
    principal: &str,
    request: &str,
    at: &str,
    stop: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = lethe_engine::Config::load(std::path::Path::new(config))?;
    let engine = Arc::new(lethe_engine::Engine::open(config, "cli")?);
    let compliance = lethe_compliance::Compliance::open(&engine)?;
    let actor = if principal == "operator" {
        lethe_engine::Actor::Operator
    } else {
        lethe_engine::Actor::Principal(principal.to_string())
    };
    let mut progress = |p: lethe_compliance::Progress<'_>| {
        if p.step == at {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "AT {}", p.step);
            let _ = out.flush();
            drop(out);
            if stop {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(60));
                }
            }
        }
    };
    compliance.run(&actor, request, None, &mut progress)?;
    println!("DONE");
    Ok(())
}
