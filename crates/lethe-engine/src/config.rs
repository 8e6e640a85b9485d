//! `lethe.toml`: where the data lives, which policy governs it, where models
//! are cached and which device runs them.
//!
//! ```toml
//! data_dir = ".lethe/data"
//! policy = "policies/example-org.toml"
//!
//! [models]
//! cache = ".lethe/cache"
//! device = "cpu"          # or "cuda", "cuda:1"
//! ```
//!
//! Relative paths are relative to the config file's folder.

use std::path::{Path, PathBuf};

use lethe_model::gguf_llama::WeightFormat;
use lethe_model::DeviceSpec;
use serde::Deserialize;

use crate::{Error, Result};

/// Engine configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The policy file.
    pub policy: PathBuf,
    /// Models.
    pub models: ModelsConfig,
    /// The `[server]` table, read by the daemon.
    pub server: Option<toml::Value>,
}

/// Where models come from and where they run.
#[derive(Debug, Clone)]
pub struct ModelsConfig {
    /// Cache folder for fetched models.
    pub cache: PathBuf,
    /// Device.
    pub device: DeviceSpec,
    /// In-memory weight format of the generator.
    pub generator_format: WeightFormat,
    /// Context window of the generator, in tokens.
    pub max_context: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    policy: Option<PathBuf>,
    #[serde(default)]
    models: RawModels,
    server: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawModels {
    cache: Option<PathBuf>,
    device: Option<String>,
    generator_format: Option<String>,
    max_context: Option<usize>,
}

impl Config {
    /// A configuration from explicit paths, with the model cache from
    /// `LETHE_CACHE` or the project's `.lethe/cache`, on the CPU.
    pub fn new(data_dir: PathBuf, policy: PathBuf) -> Config {
        Config {
            data_dir,
            policy,
            models: ModelsConfig {
                cache: lethe_assets::Cache::from_env().root().to_path_buf(),
                device: DeviceSpec::Cpu,
                generator_format: WeightFormat::default(),
                max_context: 2048,
            },
            server: None,
        }
    }

    /// Reads a `lethe.toml`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let raw: RawConfig = toml::from_str(&text)
            .map_err(|e| Error::BadRequest(format!("{}: {}", path.display(), e.message())))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let policy = raw.policy.map(rel).ok_or_else(|| {
            Error::BadRequest(format!("{}: `policy` is required", path.display()))
        })?;
        let mut config = Config::new(
            rel(raw.data_dir.unwrap_or_else(|| ".lethe/data".into())),
            policy,
        );
        if let Some(cache) = raw.models.cache {
            config.models.cache = rel(cache);
        }
        if let Some(device) = raw.models.device {
            config.models.device = device.parse().map_err(|e: lethe_model::Error| {
                Error::BadRequest(format!("{}: {e}", path.display()))
            })?;
        }
        if let Some(f) = raw.models.generator_format {
            config.models.generator_format = f
                .parse()
                .map_err(|e: lethe_model::Error| Error::BadRequest(format!("{}: {e}", path.display())))?;
        }
        config.server = raw.server;
        if let Some(n) = raw.models.max_context {
            config.models.max_context = n;
        }
        Ok(config)
    }
}
