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
mod figure;

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
    /// How the permissive search compares a sub-context's support of the
    /// answer with the full context's.
    #[serde(default)]
    pub utility: lethe_rag::Utility,
    /// The kNN-LM part of the run.
    #[serde(default)]
    pub knnlm: KnnEvalConfig,
}

/// The kNN-LM part of `lethe eval labels`: perplexity of held-out text
/// with and without a datastore of the benchmark's documents, and the
/// conservative against the permissive kNN label per item.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KnnEvalConfig {
    /// Run it.
    pub enabled: bool,
    /// Neighbours per step.
    pub k: usize,
    /// Weight of the kNN distribution.
    pub lambda: f32,
    /// Softmax temperature over cosine similarities.
    pub temperature: f32,
    /// Items whose questions are also answered by the kNN-LM (labels).
    pub label_items: usize,
}

impl Default for KnnEvalConfig {
    fn default() -> Self {
        let d = lethe_knnlm::KnnConfig::default();
        KnnEvalConfig {
            enabled: true,
            k: d.k,
            lambda: d.lambda,
            temperature: d.temperature,
            label_items: 8,
        }
    }
}

/// What the kNN-LM part measured.
#[derive(Debug, Clone, Serialize)]
pub struct KnnEval {
    /// Perplexity of the held-out text with the datastore.
    pub knnlm_ppl: f64,
    /// Perplexity of the held-out text with the LM alone.
    pub lm_ppl: f64,
    /// Tokens scored.
    pub tokens: usize,
    /// Entries in the datastore.
    pub entries: usize,
    /// Per item: the conservative and permissive kNN labels.
    pub items: Vec<KnnItem>,
    /// Of the items with more than one distinct label, the share whose
    /// permissive label is strictly below the conservative one.
    pub more_permissive_than_conservative: f64,
    /// Released answers stating a code that no document flowing to the
    /// answer's label states (must be 0).
    pub soundness_violations: usize,
}

/// One item answered by the kNN-LM.
#[derive(Debug, Clone, Serialize)]
pub struct KnnItem {
    /// Item id.
    pub id: String,
    /// Conservative label (every label among the neighbours).
    pub conservative: String,
    /// Permissive label.
    pub permissive: String,
    /// How the permissive label was found.
    pub route: String,
    /// Strictly below the conservative label.
    pub below_conservative: bool,
    /// The permissive answer.
    pub answer: String,
    /// Whether it states the gold code.
    pub exact_match: bool,
    /// Codes it states that its label does not cover.
    pub leaked_facts: Vec<String>,
}

fn default_alignment() -> Option<f32> {
    Some(0.5)
}

impl LabelsConfig {
    /// Reads a config file.
    pub fn load(path: &Path) -> Result<LabelsConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(e, path))?;
        toml::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.message())))
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
    let device = lethe_model::DeviceSpec::Cpu
        .open()
        .map_err(|e| Error::Model(e.to_string()))?;
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
    /// Answer tokens reused from the full-context answer after a draft check.
    pub reused_tokens: usize,
    /// How the label was found.
    pub route: String,
    /// The full-context answer, when the released one was regenerated from
    /// fewer sources.
    pub full_answer: Option<String>,
    /// Restricted regenerations rejected by the alignment check: the
    /// sources (indexes into the item's documents) and the text.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<(Vec<usize>, String)>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The kNN-LM part, when run.
    pub knnlm: Option<KnnEval>,
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

/// The codes an answer states although no document stating them flows to
/// its label: soundness violations.
fn leaked_facts(item: &Item, sources: &[Source], answer: &str, label: &Label) -> Vec<String> {
    let lower = answer.to_lowercase();
    item.facts
        .iter()
        .filter(|(code, _)| lower.contains(&code.to_lowercase()))
        .filter(|(code, _)| {
            !item
                .facts
                .iter()
                .filter(|(c, _)| c == code)
                .any(|(_, d)| sources[*d].label.flows_to(label))
        })
        .map(|(c, _)| c.clone())
        .collect()
}

fn join(model: &Label, sources: &[Source], idx: impl IntoIterator<Item = usize>) -> Label {
    idx.into_iter()
        .fold(model.clone(), |acc, i| acc.join(&sources[i].label))
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
            utility: config.utility,
            ..PermissiveConfig::default()
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
        let distinct: std::collections::BTreeSet<&str> =
            item.docs.iter().map(|d| d.label.as_str()).collect();
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
            let leaked_facts = leaked_facts(item, &sources, &answer, &a.label);
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
                reused_tokens: a.cost.reused_tokens,
                route: a.trace.route.to_string(),
                full_answer: a.trace.full_answer.clone(),
                rejected: a.trace.rejected.clone(),
            });
            progress(results.len(), total);
        }
    }
    let knn = if config.knnlm.enabled {
        Some(knn_eval(llm, policy, &items, &config.knnlm)?)
    } else {
        None
    };
    let mut r = report(results, config.clone(), policy);
    if let Some(k) = &knn {
        r.summary["knnlm_ppl"] = json!(k.knnlm_ppl);
        r.summary["lm_ppl"] = json!(k.lm_ppl);
        r.summary["knnlm_more_permissive_than_conservative"] =
            json!(k.more_permissive_than_conservative);
        r.summary["knnlm_soundness_violations"] = json!(k.soundness_violations);
    }
    r.knnlm = knn;
    Ok(r)
}

fn knn_err(e: lethe_knnlm::Error) -> Error {
    Error::Model(e.to_string())
}

/// Held-out text of the corpus's domain: each item's question answered in
/// a sentence that no document contains verbatim.
fn held_out(item: &Item) -> String {
    format!("Question: {} Answer: it is {}.", item.question, item.gold)
}

fn knn_eval(
    llm: &Arc<Llm>,
    policy: &Policy,
    items: &[Item],
    cfg: &KnnEvalConfig,
) -> Result<KnnEval> {
    use lethe_knnlm::{Datastore, DocText, KnnConfig, KnnRequest};
    let knn_config = KnnConfig {
        k: cfg.k,
        lambda: cfg.lambda,
        temperature: cfg.temperature,
        ..KnnConfig::default()
    };
    let d_model = llm.model.config().d_model;
    // Perplexity: one datastore of every document of the benchmark.
    let mut all = Datastore::new(d_model, 512).map_err(knn_err)?;
    let mut seen = std::collections::BTreeSet::new();
    for item in items {
        let sources = sources_of(item, policy)?;
        let docs: Vec<DocText<'_>> = sources
            .iter()
            .filter(|s| seen.insert(s.text.clone()))
            .map(|s| DocText {
                id: &s.doc_id,
                label: &s.label,
                text: &s.text,
                version: "1",
            })
            .collect();
        all.add_documents(llm, &docs).map_err(knn_err)?;
    }
    let everything = all.allowed(&|_| true);
    let (mut nll_knn, mut nll_lm, mut tokens) = (0.0f64, 0.0f64, 0usize);
    for item in items {
        let p = lethe_knnlm::perplexity(llm, &all, &held_out(item), &everything, &knn_config)
            .map_err(knn_err)?;
        nll_knn += p.knn.ln() * p.tokens as f64;
        nll_lm += p.lm.ln() * p.tokens as f64;
        tokens += p.tokens;
    }
    let n = tokens.max(1) as f64;
    // Labels: per item, a datastore of its own context.
    let model_label = Label::public_trusted();
    let open = |_: &Label| Vec::new();
    let mut out = Vec::new();
    let (mut multi, mut below, mut violations) = (0usize, 0usize, 0usize);
    for item in items.iter().take(cfg.label_items) {
        let sources = sources_of(item, policy)?;
        let mut ds = Datastore::new(d_model, 512).map_err(knn_err)?;
        let docs: Vec<DocText<'_>> = sources
            .iter()
            .map(|s| DocText {
                id: &s.doc_id,
                label: &s.label,
                text: &s.text,
                version: "1",
            })
            .collect();
        ds.add_documents(llm, &docs).map_err(knn_err)?;
        let allowed = ds.allowed(&|_| true);
        let request = KnnRequest {
            question: &item.question,
            caller_allowed: &allowed,
            model_label: &model_label,
            flow_check: &open,
            config: &knn_config,
            permissive: false,
        };
        let c = lethe_knnlm::answer(llm, &ds, &request, |_| std::ops::ControlFlow::Continue(()))
            .map_err(knn_err)?;
        let p = lethe_knnlm::answer(
            llm,
            &ds,
            &KnnRequest {
                permissive: true,
                ..request
            },
            |_| std::ops::ControlFlow::Continue(()),
        )
        .map_err(knn_err)?;
        let answer = p.text.clone().unwrap_or_default();
        let lower = answer.to_lowercase();
        let leaked_facts = leaked_facts(item, &sources, &answer, &p.label);
        violations += leaked_facts.len();
        let distinct: std::collections::BTreeSet<&str> =
            item.docs.iter().map(|d| d.label.as_str()).collect();
        let is_below = p.label != c.label && p.label.flows_to(&c.label);
        if distinct.len() > 1 {
            multi += 1;
            below += usize::from(is_below);
        }
        out.push(KnnItem {
            id: item.id.clone(),
            conservative: c.label.to_string(),
            permissive: p.label.to_string(),
            route: p.route.to_string(),
            below_conservative: is_below,
            exact_match: lower.contains(&item.gold.to_lowercase()),
            answer,
            leaked_facts,
        });
    }
    Ok(KnnEval {
        knnlm_ppl: (nll_knn / n).exp(),
        lm_ppl: (nll_lm / n).exp(),
        tokens,
        entries: all.len(),
        items: out,
        more_permissive_than_conservative: below as f64 / multi.max(1) as f64,
        soundness_violations: violations,
    })
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
            let key = serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            let entry = by_kind.entry(key).or_insert_with(|| json!({}));
            entry[p] = aggregate(&rk);
        }
    }
    // Permissive against introspection, item by item.
    let perm: Vec<&ItemResult> = items
        .iter()
        .filter(|r| r.propagator == "permissive")
        .collect();
    let labels_by: BTreeMap<(String, String), &ItemResult> = items
        .iter()
        .map(|r| ((r.id.clone(), r.propagator.clone()), r))
        .collect();
    let mut below_intro = 0usize;
    for r in &perm {
        if let Some(intro) = labels_by.get(&(r.id.clone(), "introspection".to_string())) {
            // Strictly more permissive: different label, and the permissive
            // sources are a subset of introspection's.
            let subset = r
                .label_sources
                .iter()
                .all(|i| intro.label_sources.contains(i));
            if r.label != intro.label && subset {
                below_intro += 1;
            }
        }
    }
    let p = &propagators["permissive"];
    let c = &propagators["conservative"];
    let soundness: u64 = propagators
        .values()
        .map(|v| v["soundness_violations"].as_u64().unwrap_or(0))
        .sum();
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
        knnlm: None,
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
            "Generator: SmolLM2-135M-Instruct (CPU), {} items, k = {}, λ = {}, utility {:?}. \
             Figure: `labels.svg`.\n\n",
            self.items.len() / 3,
            self.config.spec.k,
            self.config.lambda,
            self.config.utility
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
                        v["more_permissive_than_conservative"]
                            .as_f64()
                            .unwrap_or(0.0),
                        v["minimal_label_exact_match"].as_f64().unwrap_or(0.0),
                        v["exact_match"].as_f64().unwrap_or(0.0)
                    ));
                }
            }
        }
        if let Some(k) = &self.knnlm {
            s.push_str(&format!(
                "\n## kNN-LM\n\nHeld-out text (each question answered in a sentence no document contains), {} tokens, \
                 datastore of every benchmark document ({} entries), k = {}, λ = {}:\n\n\
                 | model | perplexity |\n|---|---|\n| SmolLM2 alone | {:.2} |\n| kNN-LM | {:.2} |\n\n\
                 Labels on {} items (a datastore per item context): permissive strictly below conservative on {:.2} \
                 of the multi-label items; soundness violations {}.\n\n\
                 | item | conservative | permissive | route | EM |\n|---|---|---|---|---|\n",
                k.tokens,
                k.entries,
                self.config.knnlm.k,
                self.config.knnlm.lambda,
                k.lm_ppl,
                k.knnlm_ppl,
                k.items.len(),
                k.more_permissive_than_conservative,
                k.soundness_violations
            ));
            for i in &k.items {
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    i.id, i.conservative, i.permissive, i.route, i.exact_match
                ));
            }
        }
        s.push_str(&format!("\nSummary: `{}`\n", self.summary));
        s
    }

    /// Writes `labels.json`, `labels.md` and the figure `labels.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(e, dir))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Config(e.to_string()))?;
        std::fs::write(dir.join("labels.json"), json + "\n").map_err(|e| Error::io(e, dir))?;
        std::fs::write(dir.join("labels.md"), self.markdown()).map_err(|e| Error::io(e, dir))?;
        figure::draw(self, &dir.join("labels.svg"))
    }
}

#[cfg(test)]
mod tests;
