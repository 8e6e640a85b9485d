//! Development tasks: `cargo xtask <task>`.
//!
//! * `test`: fetch the models the tests need, then run the whole test suite
//!   (what CI runs; `LETHE_TEST_SIZE=full` for the bigger variants).
//! * `bench retrieval|lm|serve|labels`: run a benchmark in release mode and write
//!   its JSON under `evals/results/`.
//! * `cuda-build`: build the CUDA binary on a machine without a GPU, with
//!   NVIDIA's toolkit from its Python wheels (cached under `.lethe/cuda`).
//! * `gpu-bundle`: the CUDA builds a GPU session carries, in `gpu/`.
//! * `other-cache`: run a command as gemm would run it on a CPU with
//!   another L1 data cache (results must not change).
//!
//! All automation lives here, in Rust, rather than in shell scripts.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

mod bench_serve;
mod other_cache;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Fetch models, then run every test.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run a benchmark and write its JSON under evals/results/.
    Bench {
        /// Which benchmark.
        #[arg(value_parser = ["retrieval", "lm", "serve", "labels", "protect"])]
        which: String,
        /// Seconds of load (serve).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Concurrent clients (serve).
        #[arg(long, default_value_t = 4)]
        clients: usize,
    },
    /// Build `lethe` with CUDA kernels for an H100 or H200 (sm_90) on this
    /// machine.
    CudaBuild {
        /// Build this example (of `--package`) instead of the `lethe` binary,
        /// e.g. `bench_protect` for the H100 comparison.
        #[arg(long)]
        example: Option<String>,
        /// The package whose example is built.
        #[arg(long, default_value = "lethe-protect")]
        package: String,
        /// Convolutions through cuDNN (candle's `cudnn` feature): links
        /// `libcudnn.so.9` from NVIDIA's cuDNN wheel; at run time it and its
        /// engine libraries must be on the library path (the GPU machine's
        /// torch venv has them). EM rounds on an H100: 3769 image-steps/s
        /// against 2403 without it (two calls).
        #[arg(long)]
        cudnn: bool,
        /// Build the unit-test binary of `--package` instead (its CUDA
        /// tests run only on a GPU machine: carry it there and run it).
        #[arg(long, conflicts_with = "example")]
        tests: bool,
    },
    /// Build what a GPU session runs, into the ignored `gpu/` folder: the
    /// protection benchmark and `lethe-model`'s unit tests, both CUDA +
    /// cuDNN builds, stripped and gzipped (the device tool carries at most
    /// 64 MiB). On the GPU machine `python3
    /// crates/lethe-protect/gpu_session.py` runs the CUDA tests, an A/B of
    /// the GPU paths and the 50k-image EM round beside PyTorch.
    GpuBundle,
    /// Run a command with gemm seeing another L1 data cache (a fake
    /// sysfs in a private mount namespace; needs root or user
    /// namespaces), e.g. `cargo xtask other-cache -- target/release/lethe
    /// protect ...`: protection and victim training must give the same
    /// bits as without it.
    OtherCache {
        /// L1 data cache size in KiB (48 with 12 ways: gemm's depth block
        /// 1024, recent Intel Xeons; 32 with 8 ways: 512).
        #[arg(long, default_value_t = 48)]
        l1_kib: usize,
        /// Its associativity.
        #[arg(long, default_value_t = 12)]
        ways: usize,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Test { args } => {
            fetch_models()?;
            run(cargo().args(["test", "--workspace"]).args(args))
        }
        Task::Bench {
            which,
            seconds,
            clients,
        } => match which.as_str() {
            "serve" => bench_serve::bench(&root, seconds, clients),
            "retrieval" => run(cargo().args([
                "run",
                "--release",
                "-p",
                "lethe-ann",
                "--example",
                "bench_retrieval",
                "--",
                "--out",
                "evals/results/retrieval.json",
            ])),
            "lm" => bench_lm(&root),
            "labels" => run(cargo().args([
                "run",
                "--release",
                "-p",
                "lethe-engine",
                "--example",
                "bench_labels",
                "--",
                "--out",
                "evals/results/labels-bench.json",
            ])),
            "protect" => {
                fetch_models()?;
                run(cargo()
                    .args([
                        "run",
                        "--release",
                        "-p",
                        "lethe-protect",
                        "--example",
                        "bench_protect",
                    ])
                    .env("BENCH_OUT", root.join("evals/results/protect-bench.json")))
            }
            other => bail!("unknown benchmark {other}"),
        },
        Task::CudaBuild {
            example,
            package,
            cudnn,
            tests,
        } => {
            let what = match (example.as_deref(), tests) {
                (Some(e), _) => CudaTarget::Example(e),
                (None, true) => CudaTarget::Tests,
                (None, false) => CudaTarget::Cli,
            };
            let built = cuda_build(&root, what, &package, cudnn)?;
            println!("built {}", built.display());
            Ok(())
        }
        Task::GpuBundle => gpu_bundle(&root),
        Task::OtherCache {
            l1_kib,
            ways,
            command,
        } => other_cache::run(l1_kib, ways, &command),
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A `cargo` command, run with the cargo that runs this task.
///
/// Without the variables `cargo run` set for this binary
/// (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...): cargo compares a build
/// script's `rerun-if-env-changed` variables with its own environment, and
/// ring's build script names `CARGO_MANIFEST_DIR` and `CARGO_PKG_*` (see
/// its `output` file under `target/debug/build`). With them inherited,
/// ring and everything above it (every lethe crate) was compiled again
/// whenever `cargo xtask test` and a plain `cargo test` took turns.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    without_cargo_run_env(&mut cmd);
    cmd
}

/// Removes from `cmd`'s environment the variables `cargo run` set for this
/// binary (see [`cargo`]), so that a cargo it starts, directly or not,
/// builds what a plain `cargo` would.
pub(crate) fn without_cargo_run_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(key);
        }
    }
}

/// Every model and dataset asset into the cache, as `lethe fetch` does
/// (idempotent), in this process.
///
/// Not through `cargo run -p lethe-cli -- fetch`: a build of one package
/// resolves its dependencies' features apart from the workspace's, so on a
/// fresh clone (CI) candle, tantivy, tokio and most of the tree were
/// compiled twice, once for the fetch and once for the tests.
fn fetch_models() -> anyhow::Result<()> {
    let cache = lethe_assets::Cache::from_env();
    for asset in lethe_assets::Asset::ALL {
        let dir = cache
            .ensure(*asset)
            .with_context(|| format!("fetching {}", asset.name))?;
        println!("{:<24} {}", asset.name, dir.display());
    }
    Ok(())
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs the inference and training benchmarks and merges them into
/// `evals/results/lm.json` with a `summary` of the four headline numbers.
fn bench_lm(root: &Path) -> anyhow::Result<()> {
    fetch_models()?;
    let infer = output(cargo().args([
        "run",
        "-q",
        "--release",
        "-p",
        "lethe-model",
        "--example",
        "bench_infer",
    ]))?;
    let train = output(cargo().args([
        "run",
        "-q",
        "--release",
        "-p",
        "lethe-model",
        "--example",
        "bench_train",
    ]))?;
    let infer: serde_json::Value =
        serde_json::from_str(infer.trim()).context("bench_infer output")?;
    let train: serde_json::Value =
        serde_json::from_str(train.trim()).context("bench_train output")?;
    // The headline is the engine's default in-memory format (Q8_0).
    let smol = &infer["smollm2_135m_instruct"]["q8_0"];
    let summary = serde_json::json!({
        "format": "q8_0",
        "prompt_tokens_per_s": smol["prompt_tokens_per_s"],
        "gen_tokens_per_s": smol["generated_tokens_per_s"],
        "score_tokens_per_s": smol["scoring"]["distinct_contexts"]["tokens_per_s"],
        "score_tokens_per_s_shared_prefix": smol["scoring"]["shared_100_token_prefix"]["tokens_per_s"],
        "train_tokens_per_s": train["decoder"]["train_tokens_per_s"],
        "peer_llama_cpp_gen_tokens_per_s": infer["peer_llama_cpp_q4_1_2_threads"]["generated_tokens_per_s"]["llama_bench_tg128"],
        "peer_llama_cpp_prompt_tokens_per_s": infer["peer_llama_cpp_q4_1_2_threads"]["prompt_tokens_per_s"]["llama_bench_pp424"],
        "peer_pytorch_train_tokens_per_s": train["decoder"]["pytorch_eager_anchor"]["train_tokens_per_s"],
    });
    let doc = serde_json::json!({"summary": summary, "inference": infer, "training": train});
    let out = root.join("evals/results/lm.json");
    std::fs::create_dir_all(out.parent().unwrap_or(root))?;
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    println!("wrote {}", out.display());
    Ok(())
}

/// NVIDIA's CUDA 13.0 toolkit pieces as Python wheels (the driver on the GPU
/// machines is CUDA 13.0: cudarc must not target anything newer).
const CUDA_WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-curand==10.4.0.35",
    "nvidia-cublas==13.0.2.14",
];

/// cuDNN for `cuda-build --cudnn` (CUDA 13 build; its soname is
/// `libcudnn.so.9`, so any cuDNN 9 serves at run time).
const CUDNN_WHEEL: &str = "nvidia-cudnn-cu13==9.28.1.4";

/// Downloads `specs` (no dependencies) into `wheels` and unpacks every
/// wheel there into `target`.
fn install_wheels(specs: &[&str], wheels: &Path, target: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(wheels)?;
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "-q", "-d"])
        .arg(wheels)
        .args(specs))?;
    let mut install = Command::new("python3");
    install
        .args([
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
        ])
        .arg(target);
    for e in std::fs::read_dir(wheels)? {
        install.arg(e?.path());
    }
    run(&mut install)
}

/// The folder holding `libcudnn.so` for the linker, fetched once.
fn cudnn_link_dir(base: &Path) -> anyhow::Result<PathBuf> {
    let target = base.join("cudnn");
    let so = target.join("nvidia/cudnn/lib/libcudnn.so.9");
    if !so.exists() {
        install_wheels(&[CUDNN_WHEEL], &base.join("cudnn-wheel"), &target)?;
    }
    let link = base.join("cudnn-link");
    std::fs::create_dir_all(&link)?;
    let name = link.join("libcudnn.so");
    if std::fs::symlink_metadata(&name).is_err() {
        std::os::unix::fs::symlink(&so, &name)?;
    }
    Ok(link)
}

/// What `cuda-build` builds.
enum CudaTarget<'a> {
    /// The `lethe` binary.
    Cli,
    /// An example of the package.
    Example(&'a str),
    /// The package's unit-test binary.
    Tests,
}

/// Builds `what` with CUDA (and cuDNN) under `target/cuda`; returns the
/// executable.
fn cuda_build(
    root: &Path,
    what: CudaTarget<'_>,
    package: &str,
    cudnn: bool,
) -> anyhow::Result<PathBuf> {
    let base = root.join(".lethe/cuda");
    let wheels = base.join("wheels");
    let tk = base.join("toolkit");
    let cu = tk.join("nvidia/cu13");
    if !cu.join("bin/nvcc").exists() {
        install_wheels(CUDA_WHEELS, &wheels, &tk)?;
    }
    let lib = cu.join("lib");
    for (link, target) in [
        ("libcublas.so", "libcublas.so.13"),
        ("libcublasLt.so", "libcublasLt.so.13"),
        ("libcurand.so", "libcurand.so.10"),
        ("libnvrtc.so", "libnvrtc.so.13"),
        ("libcudart.so", "libcudart.so.13"),
    ] {
        let l = lib.join(link);
        if !l.exists() {
            std::os::unix::fs::symlink(target, &l)
                .with_context(|| format!("linking {}", l.display()))?;
        }
    }
    // The wheels carry no libcuda (the driver): a stub with cudarc's symbols
    // is enough to link; the real driver is loaded on the GPU machine.
    let stubs = lib.join("stubs");
    if !stubs.join("libcuda.so").exists() {
        std::fs::create_dir_all(&stubs)?;
        let mut names = cudarc_driver_symbols()?;
        if names.is_empty() {
            // A fresh machine has unpacked only what the CPU build used;
            // cudarc is an optional dependency of the `cuda` feature.
            run(cargo().arg("fetch"))?;
            names = cudarc_driver_symbols()?;
        }
        if names.is_empty() {
            bail!(
                "cudarc 0.19 sources not found under {} even after `cargo fetch`",
                cargo_home().join("registry/src").display()
            );
        }
        let c: String = names
            .iter()
            .map(|n| format!("int {n}(void){{return 999;}}\n"))
            .collect();
        let src = stubs.join("libcuda_stub.c");
        std::fs::write(&src, c)?;
        run(Command::new("gcc")
            .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
            .arg(stubs.join("libcuda.so"))
            .arg(&src))?;
    }
    let path = format!(
        "{}:{}",
        cu.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut build = cargo();
    match what {
        CudaTarget::Example(e) => build.args(["build", "--release", "-p", package, "--example", e]),
        CudaTarget::Tests => build.args([
            "test",
            "--release",
            "--no-run",
            "--lib",
            "-p",
            package,
            "--message-format=json-render-diagnostics",
        ]),
        CudaTarget::Cli => build.args(["build", "--release", "-p", "lethe-cli"]),
    };
    let mut library_path = format!("{}:{}", lib.display(), stubs.display());
    if cudnn {
        library_path = format!("{library_path}:{}", cudnn_link_dir(&base)?.display());
    }
    build
        .args([
            "--features",
            if cudnn { "cuda,cudnn" } else { "cuda" },
            "--target-dir",
            "target/cuda",
        ])
        .env("CUDA_HOME", &cu)
        .env("CUDA_ROOT", &cu)
        .env("PATH", path)
        .env("CUDA_COMPUTE_CAP", "90")
        .env("LIBRARY_PATH", library_path);
    Ok(match what {
        CudaTarget::Example(e) => {
            run(&mut build)?;
            root.join("target/cuda/release/examples").join(e)
        }
        CudaTarget::Cli => {
            run(&mut build)?;
            root.join("target/cuda/release/lethe")
        }
        CudaTarget::Tests => test_executable(&output(&mut build)?)?,
    })
}

/// The unit-test executable in the JSON messages of `cargo test --no-run
/// --lib --message-format=json`.
fn test_executable(messages: &str) -> anyhow::Result<PathBuf> {
    for line in messages.lines() {
        let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if m["reason"] == "compiler-artifact" && m["profile"]["test"] == true {
            if let Some(exe) = m["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    bail!("cargo reported no test executable")
}

/// `cargo xtask gpu-bundle`: see [`Task::GpuBundle`].
fn gpu_bundle(root: &Path) -> anyhow::Result<()> {
    // The GPU check protects scikit-learn's digits, carried from the cache.
    fetch_models()?;
    let bench = cuda_build(
        root,
        CudaTarget::Example("bench_protect"),
        "lethe-protect",
        true,
    )?;
    let tests = cuda_build(root, CudaTarget::Tests, "lethe-model", true)?;
    let dir = root.join("gpu");
    std::fs::create_dir_all(&dir)?;
    for (exe, name) in [(bench, "bench_protect"), (tests, "lethe_model_tests")] {
        let plain = dir.join(name);
        let stripped = Command::new("strip")
            .arg("-o")
            .arg(&plain)
            .arg(&exe)
            .status()
            .is_ok_and(|s| s.success());
        if !stripped {
            std::fs::copy(&exe, &plain)?;
        }
        let gz = std::fs::File::create(dir.join(format!("{name}.gz")))?;
        run(Command::new("gzip").arg("-9c").arg(&plain).stdout(gz))?;
        std::fs::remove_file(&plain)?;
    }
    println!(
        "bundled into {}. On the GPU machine (device tool `run`, carry \
         [\"gpu\", \".lethe/cache/sklearn-data\"]): \
         python3 crates/lethe-protect/gpu_session.py --out $OUT",
        dir.display()
    );
    Ok(())
}

/// The CUDA driver functions cudarc 0.19 binds (its `driver/sys` module),
/// read from the unpacked crate sources: the names a link stub must export.
fn cudarc_driver_symbols() -> anyhow::Result<std::collections::BTreeSet<String>> {
    let registry = cargo_home().join("registry/src");
    let mut names = std::collections::BTreeSet::new();
    if !registry.exists() {
        return Ok(names);
    }
    for reg in std::fs::read_dir(&registry)? {
        for krate in std::fs::read_dir(reg?.path())? {
            let p = krate?.path();
            let is_cudarc = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("cudarc-0.19"));
            let sys = p.join("src/driver/sys/mod.rs");
            if is_cudarc && sys.exists() {
                let text = std::fs::read_to_string(&sys)?;
                for part in text.split("pub unsafe fn ").skip(1) {
                    let name: String = part
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if name.starts_with("cu") {
                        names.insert(name);
                    }
                }
            }
        }
    }
    Ok(names)
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"))
}
