//! `cargo xtask other-cache`: run a command on this machine as gemm would
//! run it on a CPU with another L1 data cache.
//!
//! gemm (candle's CPU matrix products) reads the cache sizes from
//! `/sys/devices/system/cpu/cpu*/cache/index*` and sizes its depth blocks
//! from the L1 (module `nn/depth.rs` in `lethe-model`). A copy of that
//! folder with the L1 rewritten, bind-mounted over the real one in a
//! private mount namespace (`unshare -m`: root or user namespaces), shows
//! what another host would compute, without one: the check behind the
//! claim that protection results are the same on every x86-64 host.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _};

const CPU_SYSFS: &str = "/sys/devices/system/cpu";

/// Runs `command` with gemm seeing an L1 data cache of `kib` KiB and
/// `ways`-way associativity on every CPU.
pub(crate) fn run(kib: usize, ways: usize, command: &[String]) -> anyhow::Result<()> {
    if command.is_empty() {
        bail!("other-cache: no command to run");
    }
    if kib == 0 || ways == 0 {
        bail!("other-cache: the L1 needs a size and a number of ways");
    }
    let fake = std::env::temp_dir().join(format!("lethe-cpu-sysfs-{}", std::process::id()));
    let rewritten = copy_tree(Path::new(CPU_SYSFS), &fake, 0)
        .and_then(|()| rewrite_l1(&fake, kib, ways))
        .and_then(|count| match count {
            0 => bail!("other-cache: no L1 data cache under {CPU_SYSFS}/cpu*/cache"),
            n => Ok(n),
        });
    let rewritten = match rewritten {
        Ok(n) => n,
        Err(e) => {
            fs::remove_dir_all(&fake).ok();
            return Err(e);
        }
    };
    eprintln!("other-cache: L1d {kib} KiB {ways}-way on {rewritten} CPUs");
    let mut unshare = Command::new("unshare");
    // The command may be a cargo build: let it reuse this tree's builds.
    crate::without_cargo_run_env(&mut unshare);
    let status = unshare
        .args(["-m", "sh", "-c"])
        .arg(format!("mount --bind \"$0\" {CPU_SYSFS} && exec \"$@\""))
        .arg(&fake)
        .args(command)
        .status();
    fs::remove_dir_all(&fake).ok();
    let status = status.context("running unshare (util-linux)")?;
    if !status.success() {
        bail!("other-cache: {command:?} failed with {status}");
    }
    Ok(())
}

/// Copies the regular files and folders of `from` into `to`, skipping
/// links (sysfs links back into itself) and files the kernel refuses to
/// read.
fn copy_tree(from: &Path, to: &Path, depth: usize) -> anyhow::Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    if depth > 4 {
        return Ok(());
    }
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target, depth + 1)?;
        } else if kind.is_file() {
            if let Ok(text) = fs::read(entry.path()) {
                fs::write(&target, text)?;
            }
        }
    }
    Ok(())
}

/// Rewrites the size and ways of every level-1 data cache under `cpu`;
/// returns how many it rewrote.
fn rewrite_l1(cpu: &Path, kib: usize, ways: usize) -> anyhow::Result<usize> {
    let mut count = 0;
    for core in fs::read_dir(cpu)? {
        let caches = core?.path().join("cache");
        let Ok(indexes) = fs::read_dir(&caches) else {
            continue;
        };
        for index in indexes {
            let index = index?.path();
            let read = |name: &str| fs::read_to_string(index.join(name)).unwrap_or_default();
            if read("level").trim() == "1" && read("type").trim() == "Data" {
                fs::write(index.join("size"), format!("{kib}K\n"))?;
                fs::write(index.join("ways_of_associativity"), format!("{ways}\n"))?;
                count += 1;
            }
        }
    }
    Ok(count)
}
