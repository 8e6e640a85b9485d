//! The weights stage: unlearning the removed documents from a deployment's
//! own trainable decoder, writing the result as a new version, and the
//! live-model handle.
//!
//! * **Tokens.** The forget set is the removed documents' text, the retain
//!   set a sample of remaining documents the run may read. Text is
//!   tokenised with the decoder folder's `tokenizer.json` when it has one;
//!   else with the SmolLM2 tokenizer (from the generator's GGUF) when the
//!   decoder's vocabulary has exactly its size; else byte-level (token id =
//!   byte value) when the vocabulary has at least 256 entries. The receipt
//!   names the tokenizer used. Texts are cut into windows of
//!   `max_seq_len` tokens (at most the decoder's context).
//! * **Methods.** `npo`, `salun`, `ga`, `graddiff`, `kl` change the base
//!   weights (via `lethe_unlearn::lm`); `o3` trains one LoRA adapter and
//!   one OOD detector per request and leaves the base untouched
//!   (suppression: O3 needs prompt/answer pairs, so each window is split
//!   at six points into a prefix prompt and a continuation that the adapter
//!   learns to refuse). A new O3 adapter is trained with the orthogonality
//!   penalty against every adapter in force (the live state's
//!   suppressions, reloaded with their detectors), and its "after" metrics
//!   are measured with all of them gated. Its detector is also calibrated
//!   against the retain sample's prompts (a score floor that at most 1 % of
//!   them pass), so kept documents rarely open the gate. Defaults are below;
//!   `[unlearning.methods.NAME]` overrides any field.
//! * **Versions.** Training writes to `models/.staging-ID`, fsyncs, and
//!   renames to `models/ID`; only the ledger's `staged` record makes it
//!   count. `live.json` (written atomically) names the live version; old
//!   versions are kept for rollback. The base is the configured folder.
//! * **Metrics.** Forget and retain NLL before and after, measured on the
//!   same sets (for O3 through the gated model), plus the method's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lethe_model::decoder::Decoder;
use lethe_unlearn::data::{TextExample, TextSet};
use lethe_unlearn::lm::LmMethodConfig;
use lethe_unlearn::o3::{
    AdapterSpec, DetectorConfig, GateConfig, O3Config, O3Unlearner, OodDetector,
};
use lethe_unlearn::UnlearnReport;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ledger::WeightsRecord;
use crate::receipt::{fmt_f64, signable};
use crate::{Error, Result};

/// Methods `unlearn run --method` accepts.
pub const METHODS: [&str; 6] = ["npo", "salun", "ga", "graddiff", "kl", "o3"];

/// What the receipt says when no weights were trained on the documents.
pub(crate) const NOT_TRAINED: &str = "No model weights were trained on these documents. The generator served by \
     lethe never trained on customer documents; they reached it only through retrieval, and they were removed \
     from the document store and every index. The generator's weights are unchanged (hash below).";

const UNLEARNED: &str =
    "The deployment's decoder was unlearned on the removed documents; the new weights \
     replace the old ones as the live version (the old version is kept for rollback).";

const SUPPRESSION: &str =
    "Suppression only: an O3 adapter and detector now suppress the removed documents at \
     inference; the base weights still encode them and raw-weight access could recover them.";

/// The refusal O3 teaches for forgotten continuations.
const REFUSAL: &str = " I can't share that.";

/// The live weights: which version serves, which suppression adapters are
/// on, and the epoch (incremented by every completed request).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveState {
    /// Activations so far.
    pub epoch: u64,
    /// The live version folder under `unlearning/models/` (`None`: the
    /// configured base model, or no model).
    pub version: Option<String>,
    /// Tensor hash of the live weights, once a version was trained.
    pub weights_sha256: Option<String>,
    /// O3 adapters in force, by request id.
    pub suppressions: Vec<String>,
    /// Every request activated, in order.
    pub requests: Vec<String>,
}

/// A loaded live model: the decoder of one [`LiveState::version`] with the
/// O3 adapters and detectors in force, ready to serve
/// ([`crate::Compliance::complete`]).
pub struct LiveModel {
    /// The version folder it was loaded from (`None`: the configured base).
    pub version: Option<String>,
    /// The decoder (base weights of that version; the O3 adapters are
    /// attached gated off, so plain forward passes see the base).
    pub decoder: Decoder,
    /// The O3 requests in force, in order (their adapters are attached).
    pub suppressions: Vec<String>,
    pub(crate) o3: O3Unlearner,
    pub(crate) tok: Tok,
    pub(crate) tokenizer_name: String,
    /// Held while a completion sets the adapters' gates.
    pub(crate) serving: std::sync::Mutex<()>,
}

impl std::fmt::Debug for LiveModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveModel")
            .field("version", &self.version)
            .field("suppressions", &self.suppressions)
            .field("tokenizer", &self.tokenizer_name)
            .finish_non_exhaustive()
    }
}

/// Where a live model's parts come from.
pub(crate) struct LiveSources {
    /// The configured base folder (its tokenizer.json, if any, is used).
    pub base: PathBuf,
    /// `unlearning/models/`: versions and O3 adapters.
    pub models_dir: PathBuf,
    /// `[unlearning.methods.o3]` overrides (the gate thresholds in force).
    pub o3_overrides: Option<toml::Value>,
    /// The generator's GGUF (for the SmolLM2 tokenizer), found on demand.
    pub generator: Box<dyn Fn() -> Result<PathBuf>>,
}

impl LiveModel {
    /// Wraps `decoder` (of `version`) with the O3 `suppressions` in force,
    /// each reloaded from `models_dir/<id>` with its detector; gates follow
    /// the current O3 settings.
    pub(crate) fn build(
        version: Option<String>,
        mut decoder: Decoder,
        suppressions: &[String],
        src: &LiveSources,
    ) -> Result<LiveModel> {
        let cfg = decoder.config().clone();
        let (tok, tokenizer_name) = Tok::pick(&src.base, cfg.vocab_size, &*src.generator)?;
        let refusal = tok.encode(REFUSAL)?;
        let params = method_config("o3", src.o3_overrides.as_ref(), refusal)?;
        let o3cfg: O3Config = serde_json::from_value(strip_method(&params))
            .map_err(|e| Error::BadRequest(format!("o3 settings: {e}")))?;
        let mut o3 = O3Unlearner::new(o3cfg)?;
        for id in suppressions {
            let dir = src.models_dir.join(id);
            let adapter = lethe_model::lora::LoraAdapter::load(&dir, decoder.device())?;
            o3.restore(&mut decoder, id, adapter, load_detector(&dir)?)?;
        }
        Ok(LiveModel {
            version,
            decoder,
            suppressions: suppressions.to_vec(),
            o3,
            tok,
            tokenizer_name,
            serving: std::sync::Mutex::new(()),
        })
    }

    /// Whether this model is what `state` says is live.
    pub(crate) fn matches(&self, state: &LiveState) -> bool {
        self.version == state.version && self.suppressions == state.suppressions
    }
}

/// Tokenizer for the forget and retain sets.
pub(crate) enum Tok {
    Hf(Box<tokenizers::Tokenizer>),
    Smol(Box<lethe_model::tokenizer::Tokenizer>),
    Bytes,
}

impl Tok {
    pub(crate) fn pick(
        model_dir: &Path,
        vocab: usize,
        generator: &dyn Fn() -> Result<PathBuf>,
    ) -> Result<(Tok, String)> {
        let file = model_dir.join("tokenizer.json");
        if file.is_file() {
            let t = tokenizers::Tokenizer::from_file(&file)
                .map_err(|e| Error::Weights(format!("{}: {e}", file.display())))?;
            return Ok((Tok::Hf(Box::new(t)), "tokenizer.json".into()));
        }
        if vocab == lethe_model_smol_vocab() {
            let t = lethe_model::tokenizer::Tokenizer::from_gguf_file(&generator()?)?;
            if t.vocab_size() == vocab {
                return Ok((Tok::Smol(Box::new(t)), "smollm2".into()));
            }
        }
        if vocab >= 256 {
            return Ok((Tok::Bytes, "bytes".into()));
        }
        Err(Error::Weights(format!(
            "the decoder's vocabulary ({vocab}) fits no tokenizer: add a tokenizer.json to its folder"
        )))
    }

    /// Text of generated ids (control tokens left out; bytes that are not
    /// UTF-8 become U+FFFD; byte-level ids above 255 are dropped).
    pub(crate) fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tok::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| Error::Weights(format!("tokenizer: {e}"))),
            Tok::Smol(t) => Ok(t.decode(ids, true)?),
            Tok::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tok::Hf(t) => Ok(t
                .encode(text, false)
                .map_err(|e| Error::Weights(format!("tokenizer: {e}")))?
                .get_ids()
                .to_vec()),
            Tok::Smol(t) => Ok(t.encode_plain(text)?),
            Tok::Bytes => Ok(text.bytes().map(u32::from).collect()),
        }
    }
}

/// SmolLM2's vocabulary size.
fn lethe_model_smol_vocab() -> usize {
    49_152
}

/// Token windows of at most `max_len` tokens, at least 2.
fn windows(
    tok: &Tok,
    texts: &[(String, String)],
    max_len: usize,
    vocab: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for (_, text) in texts {
        let ids = tok.encode(text)?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::Weights(format!(
                "token {bad} is outside the decoder's vocabulary of {vocab}"
            )));
        }
        for w in ids.chunks(max_len.max(2)) {
            if w.len() >= 2 {
                out.push(w.to_vec());
            }
        }
    }
    Ok(out)
}

/// O3's prompt/answer form: each window split at up to six points.
fn prompt_set(windows: &[Vec<u32>]) -> Result<TextSet> {
    let mut ex = Vec::new();
    for w in windows {
        let mut cuts: Vec<usize> = (1..=6)
            .map(|k| w.len() * k / 7)
            .filter(|&c| c >= 1 && c < w.len())
            .collect();
        cuts.dedup();
        for c in cuts {
            ex.push(TextExample::new(w.clone(), c)?);
        }
    }
    Ok(TextSet::new(ex))
}

/// The method configuration: defaults, then the config file's overrides.
pub(crate) fn method_config(
    name: &str,
    overrides: Option<&toml::Value>,
    refusal: Vec<u32>,
) -> Result<Value> {
    let train = |lr: f64, epochs: usize| json!({"lr": lr, "epochs": epochs, "batch_size": 4, "max_grad_norm": 1.0, "seed": 0});
    let mut v = match name {
        "npo" => {
            json!({"method": "npo", "beta": 0.1, "retain_weight": 1.0, "train": train(1e-5, 5)})
        }
        "salun" => {
            json!({"method": "salun", "keep_ratio": 0.5, "objective": {"kind": "npo", "beta": 0.1},
                          "retain_weight": 1.0, "train": train(1e-5, 5)})
        }
        "ga" => json!({"method": "ga", "train": train(1e-5, 3)}),
        "graddiff" => json!({"method": "graddiff", "retain_weight": 1.0, "train": train(1e-5, 5)}),
        "kl" => json!({"method": "kl", "kl_weight": 1.0, "train": train(1e-5, 5)}),
        "o3" => {
            let cfg = O3Config {
                adapter: AdapterSpec::o3(),
                orthogonal_weight: 0.1,
                target: lethe_unlearn::lm::Relabel::Refusal { answer: refusal },
                train: serde_json::from_value(train(3e-4, 15))
                    .map_err(|e| Error::Weights(e.to_string()))?,
                detector: DetectorConfig::o3(),
                gate: GateConfig::o3(),
            };
            let mut v = serde_json::to_value(cfg).map_err(|e| Error::Weights(e.to_string()))?;
            if let Value::Object(m) = &mut v {
                m.insert("method".into(), json!("o3"));
            }
            v
        }
        other => {
            return Err(Error::BadRequest(format!(
                "unknown method {other:?}: use one of {}",
                METHODS.join(", ")
            )))
        }
    };
    if let Some(o) = overrides {
        let o = serde_json::to_value(o)
            .map_err(|e| Error::BadRequest(format!("[unlearning.methods.{name}]: {e}")))?;
        merge(&mut v, o);
        if let Value::Object(m) = &mut v {
            m.insert("method".into(), json!(name));
        }
    }
    Ok(v)
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Everything the weights stage needs.
pub(crate) struct StageInput<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub base_dir: PathBuf,
    pub models_dir: &'a Path,
    pub overrides: Option<&'a toml::Value>,
    pub max_seq_len: usize,
    pub forget: &'a [(String, String)],
    pub retain: &'a [(String, String)],
    pub generator: String,
    pub generator_path: &'a Path,
    pub generator_sha256: String,
    /// O3 requests whose adapters are in force (their folders are under
    /// `models_dir`): a new O3 adapter is trained orthogonal to them.
    pub suppressions: &'a [String],
}

/// Runs the weights stage and writes its output under `models_dir`
/// (weights methods) or `models_dir/../adapters` (O3). Returns the record
/// and, for weights methods, the trained decoder (to hot-swap).
pub(crate) fn stage(input: &StageInput<'_>) -> Result<(WeightsRecord, Option<Decoder>)> {
    let device = candle_core::Device::Cpu;
    let mut model = Decoder::load(&input.base_dir, &device)?;
    let cfg = model.config().clone();
    let generator = || Ok(input.generator_path.to_path_buf());
    let (tok, tok_name) = Tok::pick(&input.base_dir, cfg.vocab_size, &generator)?;
    let max_len = input.max_seq_len.min(cfg.max_position_embeddings).max(2);
    let forget_w = windows(&tok, input.forget, max_len, cfg.vocab_size)?;
    let retain_w = windows(&tok, input.retain, max_len, cfg.vocab_size)?;
    if forget_w.is_empty() {
        return Err(Error::Weights(
            "the forget set is empty (the documents' text gives no tokens)".into(),
        ));
    }
    let forget = TextSet::documents(&forget_w)?;
    let retain = TextSet::documents(&retain_w)?;
    let refusal = tok.encode(REFUSAL)?;
    let params = method_config(input.method, input.overrides, refusal)?;
    let mut metrics: BTreeMap<String, String> = BTreeMap::new();
    let staging = input
        .models_dir
        .join(format!(".staging-{}", input.request_id));
    remove_dir(&staging)?;
    let (report, kind, statement, version, trained) = if input.method == "o3" {
        let o3cfg: O3Config = serde_json::from_value(strip_method(&params))
            .map_err(|e| Error::BadRequest(format!("o3 settings: {e}")))?;
        let prompts = prompt_set(&forget_w)?;
        let retain_eval = if retain.is_empty() {
            None
        } else {
            Some(&retain)
        };
        nll_metrics(&model, &prompts, retain_eval, "before", &mut metrics)?;
        let mut o3 = O3Unlearner::new(o3cfg.clone())?;
        for earlier in input.suppressions {
            let dir = input.models_dir.join(earlier);
            let adapter = lethe_model::lora::LoraAdapter::load(&dir, &device)?;
            let detector = load_detector(&dir)?;
            o3.restore(&mut model, earlier, adapter, detector)?;
        }
        // Kept documents' prompts calibrate the new detector's floor.
        let kept = prompt_set(&retain_w)?;
        let negatives: Vec<&[u32]> = kept.examples().iter().map(|e| e.query()).collect();
        let report =
            o3.unlearn_with_negatives(&mut model, input.request_id, &prompts, &negatives)?;
        nll_metrics(
            &o3.gated(&model),
            &prompts,
            retain_eval,
            "after",
            &mut metrics,
        )?;
        let req = o3
            .requests()
            .last()
            .ok_or_else(|| Error::Weights("O3 returned no adapter".into()))?;
        std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        req.adapter.save(&staging)?;
        write_json(&staging.join("detector.json"), &req.detector)?;
        write_json(&staging.join("gate.json"), &o3cfg.gate)?;
        let dest = input.models_dir.join(input.request_id);
        publish(&staging, &dest)?;
        (report, "suppression", SUPPRESSION, None, None)
    } else {
        let lm: LmMethodConfig = serde_json::from_value(params.clone())
            .map_err(|e| Error::BadRequest(format!("{} settings: {e}", input.method)))?;
        let retain_arg = if retain.is_empty() {
            None
        } else {
            Some(&retain)
        };
        let report = lm.unlearn(&model, &forget, retain_arg)?;
        std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        model.save(&staging)?;
        for name in ["config.json", "model.safetensors"] {
            if let Ok(f) = std::fs::File::open(staging.join(name)) {
                f.sync_all()
                    .map_err(|e| Error::io(&staging.join(name), e))?;
            }
        }
        if let Some(t) = ["tokenizer.json"]
            .iter()
            .map(|n| input.base_dir.join(n))
            .find(|p| p.is_file())
        {
            std::fs::copy(&t, staging.join("tokenizer.json")).map_err(|e| Error::io(&t, e))?;
        }
        let dest = input.models_dir.join(input.request_id);
        publish(&staging, &dest)?;
        (
            report,
            "unlearned",
            UNLEARNED,
            Some(input.request_id.to_string()),
            Some(model),
        )
    };
    for (k, v) in &report.metrics {
        metrics.entry(k.clone()).or_insert_with(|| fmt_f64(*v));
    }
    metrics.insert("seconds".into(), fmt_f64(report.seconds));
    Ok((
        record(&report, kind, statement, version, &tok_name, input, metrics),
        trained,
    ))
}

fn record(
    report: &UnlearnReport,
    kind: &str,
    statement: &str,
    version: Option<String>,
    tokenizer: &str,
    input: &StageInput<'_>,
    metrics: BTreeMap<String, String>,
) -> WeightsRecord {
    WeightsRecord {
        kind: kind.into(),
        statement: statement.into(),
        generator: input.generator.clone(),
        generator_sha256: input.generator_sha256.clone(),
        method: report.method.clone(),
        hyperparameters: signable(report.hyperparameters.clone()),
        weights_before: Some(report.weights_before.clone()),
        weights_after: Some(report.weights_after.clone()),
        version,
        mask: report
            .mask
            .as_ref()
            .and_then(|m| serde_json::to_value(m).ok())
            .map(signable),
        adapter: report
            .adapter
            .as_ref()
            .and_then(|a| serde_json::to_value(a).ok())
            .map(signable),
        detector_sha256: report.detector_sha256.clone(),
        tokenizer: Some(tokenizer.into()),
        forget_examples: report.forget_examples,
        retain_examples: report.retain_examples,
        steps: report.steps,
        metrics,
    }
}

/// The record when no model is configured.
pub(crate) fn not_trained(generator: String, generator_sha256: String) -> WeightsRecord {
    WeightsRecord {
        kind: "not_trained".into(),
        statement: NOT_TRAINED.into(),
        generator,
        generator_sha256: generator_sha256.clone(),
        method: "none".into(),
        hyperparameters: json!({}),
        weights_before: Some(generator_sha256.clone()),
        weights_after: Some(generator_sha256),
        version: None,
        mask: None,
        adapter: None,
        detector_sha256: None,
        tokenizer: None,
        forget_examples: 0,
        retain_examples: 0,
        steps: 0,
        metrics: BTreeMap::new(),
    }
}

fn strip_method(v: &Value) -> Value {
    let mut v = v.clone();
    if let Value::Object(m) = &mut v {
        m.remove("method");
    }
    v
}

fn nll_metrics(
    scorer: &dyn lethe_unlearn::lm_eval::Scorer,
    forget: &TextSet,
    retain: Option<&TextSet>,
    when: &str,
    out: &mut BTreeMap<String, String>,
) -> Result<()> {
    out.insert(
        format!("forget_nll_{when}"),
        fmt_f64(lethe_unlearn::lm_eval::mean_nll(scorer, forget, 16)?),
    );
    if let Some(r) = retain {
        out.insert(
            format!("retain_nll_{when}"),
            fmt_f64(lethe_unlearn::lm_eval::mean_nll(scorer, r, 16)?),
        );
    }
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| Error::Weights(e.to_string()))?;
    lethe_durable::atomic_write(path, &bytes).map_err(|e| Error::io(path, e))
}

/// Renames a complete staging folder to its final name, durably.
fn publish(staging: &Path, dest: &Path) -> Result<()> {
    remove_dir(dest)?;
    std::fs::rename(staging, dest).map_err(|e| Error::io(dest, e))?;
    if let Some(parent) = dest.parent() {
        lethe_durable::sync_dir(parent).map_err(|e| Error::io(parent, e))?;
    }
    Ok(())
}

/// Removes a folder if it exists.
pub(crate) fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Reads `live.json` (absent: the initial state).
pub(crate) fn read_live(path: &Path) -> Result<LiveState> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LiveState::default()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Writes `live.json` atomically.
pub(crate) fn write_live(path: &Path, state: &LiveState) -> Result<()> {
    write_json(path, state)
}

/// Loads the decoder of a live state with its suppressions.
pub(crate) fn load_live(state: &LiveState, src: &LiveSources) -> Result<Arc<LiveModel>> {
    let dir = match &state.version {
        Some(v) => src.models_dir.join(v),
        None => src.base.clone(),
    };
    let decoder = Decoder::load(&dir, &candle_core::Device::Cpu)?;
    Ok(Arc::new(LiveModel::build(
        state.version.clone(),
        decoder,
        &state.suppressions,
        src,
    )?))
}

/// An O3 detector saved with a request's adapter.
pub fn load_detector(dir: &Path) -> Result<OodDetector> {
    let path = dir.join("detector.json");
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
}
