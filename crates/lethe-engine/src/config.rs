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
//!
//! [unlearning]             # optional: the compliance-unlearning workflow
//! model = "models/support-decoder"   # a trainable decoder folder (config.json + model.safetensors)
//! method = "npo"           # default method: npo, salun, ga, graddiff, kl, o3
//! retain_sample = 32       # retained documents sampled for the retain set
//! max_seq_len = 128        # tokens per forget/retain example
//! label = "internal"       # policy label of its training data: serves it (POST /v1/model/complete)
//! [unlearning.methods.npo] # optional overrides of a method's defaults
//! beta = 0.1
//!
//! [knnlm]                 # optional: kNN-LM datastore (mode = "knnlm")
//! enabled = true
//! k = 16
//! lambda = 0.25
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
    /// The `[unlearning]` table, read by the compliance workflow.
    pub unlearning: UnlearningConfig,
    /// The `[knnlm]` table: the kNN-LM datastore and its decoding.
    pub knnlm: KnnlmConfig,
}

/// The `[knnlm]` table. With `enabled`, every ingested document also goes
/// into a kNN-LM datastore (one forward pass of the generator per
/// document), deletions remove its entries exactly, and queries may use
/// `mode = "knnlm"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KnnlmConfig {
    /// Keep a datastore in step with the store.
    pub enabled: bool,
    /// Neighbours per decoding step.
    pub k: usize,
    /// Weight of the kNN distribution in the mixture.
    pub lambda: f32,
    /// Softmax temperature over cosine similarities.
    pub temperature: f32,
    /// Share of an emitted token's probability a label's neighbours must
    /// give it to count as carrying it (permissive label).
    pub carry_epsilon: f32,
    /// λ-similarity tolerance of the permissive label.
    pub similarity: f32,
    /// Tokens of each document that enter the datastore.
    pub max_doc_tokens: usize,
}

impl Default for KnnlmConfig {
    fn default() -> Self {
        let d = lethe_knnlm::KnnConfig::default();
        KnnlmConfig {
            enabled: false,
            k: d.k,
            lambda: d.lambda,
            temperature: d.temperature,
            carry_epsilon: d.carry_epsilon,
            similarity: d.similarity,
            max_doc_tokens: 512,
        }
    }
}

/// The `[unlearning]` table: the deployment's own trainable decoder, if
/// any, and method defaults. Without `model`, unlearning removes documents
/// from the store and indexes and its receipts state that no weights were
/// trained on them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnlearningConfig {
    /// A `lethe_model::decoder::Decoder` folder trained on the documents.
    pub model: Option<PathBuf>,
    /// The method `unlearn run` uses when none is given.
    pub method: String,
    /// Retained documents sampled for the retain set.
    pub retain_sample: usize,
    /// Tokens per forget or retain example (longer texts are split).
    pub max_seq_len: usize,
    /// Per-method overrides of the defaults, by method name.
    pub methods: std::collections::BTreeMap<String, toml::Value>,
    /// The policy label (by name) of the data `model` was trained on: every
    /// completion the daemon serves from the decoder carries it, so only
    /// principals cleared for it may ask, and only sinks it may flow to
    /// receive. Without it the decoder is unlearned but not served.
    pub label: Option<String>,
}

impl Default for UnlearningConfig {
    fn default() -> Self {
        UnlearningConfig {
            model: None,
            method: "npo".into(),
            retain_sample: 32,
            max_seq_len: 128,
            methods: Default::default(),
            label: None,
        }
    }
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
    #[serde(default)]
    unlearning: UnlearningConfig,
    #[serde(default)]
    knnlm: KnnlmConfig,
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
            unlearning: UnlearningConfig::default(),
            knnlm: KnnlmConfig::default(),
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
            config.models.generator_format = f.parse().map_err(|e: lethe_model::Error| {
                Error::BadRequest(format!("{}: {e}", path.display()))
            })?;
        }
        config.server = raw.server;
        config.unlearning = raw.unlearning;
        config.knnlm = raw.knnlm;
        if let Some(m) = config.unlearning.model.take() {
            config.unlearning.model = Some(rel(m));
        }
        if let Some(n) = raw.models.max_context {
            config.models.max_context = n;
        }
        Ok(config)
    }
}
