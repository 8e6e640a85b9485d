//! `lethe eval labels`: how good are the answer labels each propagator
//! computes, and are they sound?
//!
//! Runs every item of the generated benchmark ([`dataset`]) through the
//! conservative, permissive and introspection propagators with the real
//! generator, and measures per propagator:
//!
//! * how often the label is strictly more permissive than the conservative
//!   join (on items whose context has more than one distinct label), and
//!   than introspection's;
//! * exact match with the ground-truth minimal label (the model's label
//!   joined with the labels of the documents the gold answer needs), and
//!   with the answer's provenance (the documents whose facts the released
//!   answer, right or wrong, actually states);
//! * soundness: a released answer that contains a fact (a code) stated only
//!   by documents whose labels do not flow to the answer's label is a
//!   violation;
//! * answer quality: exact match (the gold code appears) and token F1;
//! * cost: generations, scored contexts, scoring batches, tokens, latency.

pub mod dataset;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use lethe_label::{Label, Policy};
use lethe_model::generate::{GenerateConfig, Llm};
use lethe_rag::{AnswerConfig, Decision, PermissiveConfig, Propagator, Source};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{Error, Result};
use dataset::{Item, Kind, Spec};

/// Configuration of a run (`evals/labels/*.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelsConfig {
    /// The benchmark.
    pub spec: Spec,
    /// λ of the permissive propagator.
    pub lambda: f32,
    /// Most generated tokens per answer.
    pub max_tokens: usize,
    /// Scoring budget of the permissive search.
    pub max_scored: usize,
    /// Output alignment threshold of the permissive propagator (token F1 of
    /// the restricted regeneration against the full-context answer).
    #[serde(default = "default_alignment")]
    pub min_alignment: Option<f32>,
}

fn default_alignment() -> Option<f32> {
    Some(0.5)
}

impl LabelsConfig {
    /// Reads a config file.
    pub fn load(path: &Path) -> Result<LabelsConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(e, path))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {}", path.display(), e.message())))
    }
}

/// Loads the generator from the model cache (fetching it if needed) and
/// runs the benchmark under the example organisation's policy.
pub fn run_default(
    config: &LabelsConfig,
    policy_path: &Path,
    progress: impl FnMut(usize, usize),
) -> Result<Report> {
    let policy = Policy::load(policy_path).map_err(|e| Error::Config(e.to_string()))?;
    let dir = lethe_assets::Cache::from_env()
        .ensure(lethe_assets::Asset::SMOLLM2_135M_INSTRUCT)
        .map_err(|e| Error::Model(e.to_string()))?;
    let device = lethe_model::DeviceSpec::Cpu.open().map_err(|e| Error::Model(e.to_string()))?;
    let llm = Llm::load(
        &dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        &device,
        &lethe_model::gguf_llama::LoadOptions::default(),
    )
    .map_err(|e| Error::Model(e.to_string()))?;
    run(&Arc::new(llm), &policy, config, progress)
}

/// The outcome of one item under one propagator.
#[derive(Debug, Clone, Serialize)]
pub struct ItemResult {
    /// Item id.
    pub id: String,
    /// Item kind.
    pub kind: Kind,
    /// Propagator name.
    pub propagator: String,
    /// The answer's label.
    pub label: String,
    /// Documents the answer was generated from.
    pub label_sources: Vec<usize>,
    /// The label equals the ground-truth minimal label.
    pub minimal_exact: bool,
    /// The label equals the join of the labels of the documents whose facts
    /// the answer actually states (what the answer, right or wrong, used).
    pub provenance_exact: bool,
    /// The label is strictly below the conservative join.
    pub below_conservative: bool,
    /// Whether the context holds more than one distinct label.
    pub multi_label: bool,
    /// Facts in the answer stated only outside its label (should be empty).
    pub leaked_facts: Vec<String>,
    /// The answer.
    pub answer: String,
    /// The gold code appears in the answer.
    pub exact_match: bool,
    /// Token F1 against the gold answer sentence.
    pub f1: f64,
    /// Milliseconds.
    pub latency_ms: f64,
    /// Generations.
    pub generations: usize,
    /// Contexts scored.
    pub scored_contexts: usize,
    /// Scoring batches.
    pub score_batches: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// How the label was found.
    pub route: String,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Headline numbers.
    pub summary: serde_json::Value,
    /// Per propagator aggregates.
    pub propagators: BTreeMap<String, serde_json::Value>,
    /// Per kind, per propagator.
    pub by_kind: BTreeMap<String, serde_json::Value>,
    /// Every item result.
    pub items: Vec<ItemResult>,
    /// The configuration.
    pub config: LabelsConfig,
}

fn sources_of(item: &Item, policy: &Policy) -> Result<Vec<Source>> {
    item.docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let label = policy
                .label(&d.label)
                .map_err(|e| Error::Config(format!("item {}: {e}", item.id)))?
                .clone();
            Ok(Source {
                chunk_id: format!("{}#{i}", item.id),
                doc_id: format!("{}/{i}", item.id),
                label,
                label_name: Some(d.label.clone()),
                text: d.text.clone(),
            })
        })
        .collect()
}

fn join(model: &Label, sources: &[Source], idx: impl IntoIterator<Item = usize>) -> Label {
    idx.into_iter().fold(model.clone(), |acc, i| acc.join(&sources[i].label))
}

fn tokens(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric() && c != '-')
        .filter(|t| !t.is_empty())
        .map(|t| t.to_lowercase())
        .collect()
}

fn f1(answer: &str, gold: &str) -> f64 {
    let a = tokens(answer);
    let g = tokens(gold);
    if a.is_empty() || g.is_empty() {
        return 0.0;
    }
    let mut pool = g.clone();
    let mut common = 0usize;
    for t in &a {
        if let Some(p) = pool.iter().position(|x| x == t) {
            pool.swap_remove(p);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let p = common as f64 / a.len() as f64;
    let r = common as f64 / g.len() as f64;
    2.0 * p * r / (p + r)
}

/// The propagators compared.
fn propagators(config: &LabelsConfig) -> Vec<Propagator> {
    vec![
        Propagator::Conservative,
        Propagator::Permissive(PermissiveConfig {
            lambda: config.lambda,
            max_scored: config.max_scored,
            // No sink here: the search looks for the minimal label itself.
            sink_directed: false,
            total_order_shortcut: true,
            exhaustive: false,
            min_alignment: config.min_alignment,
        }),
        Propagator::Introspection,
    ]
}

/// Runs the benchmark. `progress(done, total)` is called after each answer.
pub fn run(
    llm: &Arc<Llm>,
    policy: &Policy,
    config: &LabelsConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<Report> {
    let items = dataset::generate(&config.spec);
    let model_label = Label::public_trusted();
    let props = propagators(config);
    let total = items.len() * props.len();
    let mut results = Vec::with_capacity(total);
    for item in &items {
        let sources = sources_of(item, policy)?;
        let conservative = join(&model_label, &sources, 0..sources.len());
        let minimal = join(&model_label, &sources, item.needed.iter().copied());
        let distinct: std::collections::BTreeSet<&str> = item.docs.iter().map(|d| d.label.as_str()).collect();
        for p in &props {
            let cfg = AnswerConfig {
                generation: GenerateConfig {
                    max_tokens: config.max_tokens,
                    ..GenerateConfig::default()
                },
                model_label: model_label.clone(),
                propagator: *p,
            };
            let t = Instant::now();
            let a = lethe_rag::answer(llm, &item.question, &sources, &cfg, &|_| Vec::new(), |_| {
                std::ops::ControlFlow::Continue(())
            })
            .map_err(|e| Error::Model(e.to_string()))?;
            let latency_ms = t.elapsed().as_secs_f64() * 1000.0;
            let answer = match (&a.decision, &a.text) {
                (Decision::Released, Some(t)) => t.clone(),
                _ => String::new(),
            };
            // A fact leaks when no document stating it flows to the label.
            let leaked_facts = item
                .facts
                .iter()
                .filter(|(code, _)| answer.to_lowercase().contains(&code.to_lowercase()))
                .filter(|(code, _)| {
                    !item
                        .facts
                        .iter()
                        .filter(|(c, _)| c == code)
                        .any(|(_, d)| sources[*d].label.flows_to(&a.label))
                })
                .map(|(c, _)| c.clone())
                .collect();
            let lower = answer.to_lowercase();
            let mut used: std::collections::BTreeSet<usize> = item
                .facts
                .iter()
                .filter(|(code, _)| lower.contains(&code.to_lowercase()))
                .map(|(_, d)| *d)
                .collect();
            if lower.contains(&item.gold.to_lowercase()) {
                used.extend(item.needed.iter().copied());
            }
            let provenance = join(&model_label, &sources, used.iter().copied());
            results.push(ItemResult {
                provenance_exact: a.label == provenance,
                id: item.id.clone(),
                kind: item.kind,
                propagator: p.name().to_string(),
                label: a.label.to_string(),
                label_sources: a.label_sources.clone(),
                minimal_exact: a.label == minimal,
                below_conservative: a.label != conservative && a.label.flows_to(&conservative),
                multi_label: distinct.len() > 1,
                leaked_facts,
                exact_match: answer.to_lowercase().contains(&item.gold.to_lowercase()),
                f1: f1(&answer, &item.gold),
                answer,
                latency_ms,
                generations: a.cost.generations,
                scored_contexts: a.cost.scored_contexts,
                score_batches: a.cost.score_batches,
                generated_tokens: a.cost.generated_tokens,
                route: a.trace.route.to_string(),
            });
            progress(results.len(), total);
        }
    }
    Ok(report(results, config.clone(), policy))
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn aggregate(rs: &[&ItemResult]) -> serde_json::Value {
    let n = rs.len().max(1) as f64;
    let multi: Vec<&&ItemResult> = rs.iter().filter(|r| r.multi_label).collect();
    let mut lat: Vec<f64> = rs.iter().map(|r| r.latency_ms).collect();
    json!({
        "items": rs.len(),
        "more_permissive_than_conservative": multi.iter().filter(|r| r.below_conservative).count() as f64 / multi.len().max(1) as f64,
        "minimal_label_exact_match": rs.iter().filter(|r| r.minimal_exact).count() as f64 / n,
        "provenance_label_exact_match": rs.iter().filter(|r| r.provenance_exact).count() as f64 / n,
        "soundness_violations": rs.iter().filter(|r| !r.leaked_facts.is_empty()).count(),
        "exact_match": rs.iter().filter(|r| r.exact_match).count() as f64 / n,
        "f1": rs.iter().map(|r| r.f1).sum::<f64>() / n,
        "mean_generations": rs.iter().map(|r| r.generations).sum::<usize>() as f64 / n,
        "mean_scored_contexts": rs.iter().map(|r| r.scored_contexts).sum::<usize>() as f64 / n,
        "mean_score_batches": rs.iter().map(|r| r.score_batches).sum::<usize>() as f64 / n,
        "mean_generated_tokens": rs.iter().map(|r| r.generated_tokens).sum::<usize>() as f64 / n,
        "latency_ms_p50": percentile(&mut lat.clone(), 0.5),
        "latency_ms_p95": percentile(&mut lat, 0.95),
    })
}

fn report(items: Vec<ItemResult>, config: LabelsConfig, _policy: &Policy) -> Report {
    let mut propagators = BTreeMap::new();
    let mut by_kind: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for p in ["conservative", "permissive", "introspection"] {
        let rs: Vec<&ItemResult> = items.iter().filter(|r| r.propagator == p).collect();
        propagators.insert(p.to_string(), aggregate(&rs));
        for kind in [Kind::Single, Kind::TwoHop, Kind::Conflict, Kind::Injection] {
            let rk: Vec<&ItemResult> = rs.iter().copied().filter(|r| r.kind == kind).collect();
            if rk.is_empty() {
                continue;
            }
            let key = serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
            let entry = by_kind.entry(key).or_insert_with(|| json!({}));
            entry[p] = aggregate(&rk);
        }
    }
    // Permissive against introspection, item by item.
    let perm: Vec<&ItemResult> = items.iter().filter(|r| r.propagator == "permissive").collect();
    let labels_by: BTreeMap<(String, String), &ItemResult> =
        items.iter().map(|r| ((r.id.clone(), r.propagator.clone()), r)).collect();
    let mut below_intro = 0usize;
    for r in &perm {
        if let Some(intro) = labels_by.get(&(r.id.clone(), "introspection".to_string())) {
            // Strictly more permissive: different label, and the permissive
            // sources are a subset of introspection's.
            let subset = r.label_sources.iter().all(|i| intro.label_sources.contains(i));
            if r.label != intro.label && subset {
                below_intro += 1;
            }
        }
    }
    let p = &propagators["permissive"];
    let c = &propagators["conservative"];
    let soundness: u64 = propagators.values().map(|v| v["soundness_violations"].as_u64().unwrap_or(0)).sum();
    let summary = json!({
        "more_permissive_than_conservative": p["more_permissive_than_conservative"],
        "more_permissive_than_introspection": below_intro as f64 / perm.len().max(1) as f64,
        "minimal_label_exact_match": p["minimal_label_exact_match"],
        "provenance_label_exact_match": p["provenance_label_exact_match"],
        "soundness_violations": soundness,
        "answer_quality_delta_points": (p["exact_match"].as_f64().unwrap_or(0.0) - c["exact_match"].as_f64().unwrap_or(0.0)) * 100.0,
        "knnlm_ppl": serde_json::Value::Null,
        "lm_ppl": serde_json::Value::Null,
    });
    Report {
        summary,
        propagators,
        by_kind,
        items,
        config,
    }
}

impl Report {
    /// A Markdown summary table.
    pub fn markdown(&self) -> String {
        let mut s = String::from("# Label propagation benchmark\n\n");
        s.push_str(&format!(
            "Generator: SmolLM2-135M-Instruct (CPU), {} items, k = {}, λ = {}.\n\n",
            self.items.len() / 3,
            self.config.spec.k,
            self.config.lambda
        ));
        s.push_str("| propagator | more permissive than conservative | minimal label exact | provenance label exact | soundness violations | answer EM | F1 | generations | scored contexts | p50 ms | p95 ms |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
        for (name, v) in &self.propagators {
            s.push_str(&format!(
                "| {name} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |\n",
                v["more_permissive_than_conservative"].as_f64().unwrap_or(0.0),
                v["minimal_label_exact_match"].as_f64().unwrap_or(0.0),
                v["provenance_label_exact_match"].as_f64().unwrap_or(0.0),
                v["soundness_violations"],
                v["exact_match"].as_f64().unwrap_or(0.0),
                v["f1"].as_f64().unwrap_or(0.0),
                v["mean_generations"].as_f64().unwrap_or(0.0),
                v["mean_scored_contexts"].as_f64().unwrap_or(0.0),
                v["latency_ms_p50"].as_f64().unwrap_or(0.0),
                v["latency_ms_p95"].as_f64().unwrap_or(0.0),
            ));
        }
        s.push_str("\n## By kind\n\n| kind | propagator | more permissive | minimal exact | EM |\n|---|---|---|---|---|\n");
        for (kind, per) in &self.by_kind {
            if let Some(obj) = per.as_object() {
                for (p, v) in obj {
                    s.push_str(&format!(
                        "| {kind} | {p} | {:.2} | {:.2} | {:.2} |\n",
                        v["more_permissive_than_conservative"].as_f64().unwrap_or(0.0),
                        v["minimal_label_exact_match"].as_f64().unwrap_or(0.0),
                        v["exact_match"].as_f64().unwrap_or(0.0)
                    ));
                }
            }
        }
        s.push_str(&format!("\nSummary: `{}`\n", self.summary));
        s
    }

    /// Writes `labels.json` and `labels.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(e, dir))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Config(e.to_string()))?;
        std::fs::write(dir.join("labels.json"), json + "\n").map_err(|e| Error::io(e, dir))?;
        std::fs::write(dir.join("labels.md"), self.markdown()).map_err(|e| Error::io(e, dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
