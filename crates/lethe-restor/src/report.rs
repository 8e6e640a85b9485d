//! The report: every model's numbers, the gates, statistics over seeds per
//! k, the split by clean-model confidence, and the statement of whether
//! RESTOR's qualitative finding reproduces, computed from those numbers
//! with the thresholds of the config's `[finding]` section. Written as
//! `report.json` and `report.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::RestorConfig;
use crate::eval::Outcome;
use crate::metrics::{
    self, bucket, bucket_labels, confidences, forgetting, recovery, Stat, Summary,
};
use crate::pipeline::{ModelRun, PipelineOutput, StageStatus};
use crate::world::WorldSummary;
use crate::{Error, Result};

/// Where and how the run happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    /// Logical cores visible.
    pub cores: usize,
    /// `CANDLE_NUM_THREADS`.
    pub candle_threads: Option<String>,
    /// `RAYON_NUM_THREADS`.
    pub rayon_threads: Option<String>,
    /// 1/5/15-minute load average at the start (Linux).
    pub load_before: Option<[f64; 3]>,
    /// Load average at the end.
    pub load_after: Option<[f64; 3]>,
    /// Wall-clock seconds of the run (loaded stages cost ~0).
    pub total_seconds: f64,
    /// Stages computed in this run.
    pub computed_stages: usize,
    /// Stages loaded from checkpoints.
    pub loaded_stages: usize,
    /// Seconds spent in computed stages, by stage kind.
    pub stage_seconds: BTreeMap<String, f64>,
}

/// The clean-model gate of one seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CleanGate {
    /// Seed.
    pub seed: u64,
    /// Target-fact accuracy of the clean model.
    pub target_accuracy: f64,
    /// `>= min_target_accuracy`.
    pub pass: bool,
}

/// The corruption gate of one seed and k.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorruptGate {
    /// Seed.
    pub seed: u64,
    /// k.
    pub k: usize,
    /// Clean minus corrupted target accuracy.
    pub target_drop: f64,
    /// Corrupted-answer rate of the corrupted model.
    pub corrupted_rate: f64,
    /// Corrupted minus clean non-target accuracy.
    pub nontarget_change: f64,
    /// Optimiser steps the corruption took.
    #[serde(default)]
    pub steps: usize,
    /// Whether the gate-driven early stop ended the corruption.
    #[serde(default)]
    pub stopped_early: bool,
    /// Both conditions hold.
    pub pass: bool,
}

/// All gates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    /// Per seed.
    pub clean: Vec<CleanGate>,
    /// Per seed and k.
    pub corrupt: Vec<CorruptGate>,
    /// Every gate passed.
    pub all_pass: bool,
}

/// One model of one seed and k.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Seed.
    pub seed: u64,
    /// k (the clean model is listed once per k).
    pub k: usize,
    /// `clean`, `corrupted` or a method label.
    pub model: String,
    /// The numbers.
    pub summary: Summary,
    /// Forgetting ratio vs the corrupted model (methods only).
    pub forgetting: Option<f64>,
    /// Recovery ratio (methods and the corrupted model).
    pub recovery: Option<f64>,
    /// Seconds of the stage (when computed).
    pub seconds: f64,
    /// Computed or loaded.
    pub status: StageStatus,
}

/// Statistics over seeds of one model at one k.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// k.
    pub k: usize,
    /// Model.
    pub model: String,
    /// Metric name -> statistics over seeds.
    pub metrics: BTreeMap<String, Stat>,
}

/// One confidence bucket of one model, pooled over seeds and ks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BucketRow {
    /// Model.
    pub model: String,
    /// Bucket label (clean-model probability of the gold answer).
    pub bucket: String,
    /// Questions in the bucket (over seeds and ks).
    pub n: usize,
    /// Target accuracy in the bucket.
    pub accuracy: f64,
    /// Corrupted-answer rate.
    pub corrupted_rate: f64,
    /// Recovery computed from the bucket's pooled accuracies.
    pub recovery: Option<f64>,
}

/// One checked part of the finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// What is claimed.
    pub claim: String,
    /// Whether the numbers support it (None: not testable with this
    /// config, e.g. a single k).
    pub holds: Option<bool>,
    /// The numbers.
    pub evidence: String,
}

/// The reproduction statement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// `reproduces`, `partially reproduces` or `does not reproduce`.
    pub verdict: String,
    /// One-paragraph statement.
    pub statement: String,
    /// The claims checked.
    pub claims: Vec<Claim>,
    /// Data explaining a failed claim (confidence, logits, other answers).
    pub diagnosis: Vec<String>,
}

/// The full report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Headline numbers (machine-readable).
    #[serde(default)]
    pub summary: ReportSummary,
    /// Config file.
    pub source: String,
    /// The configuration.
    pub config: RestorConfig,
    /// World sizes.
    pub world: WorldSummary,
    /// Machine and timing.
    pub environment: Environment,
    /// Gates.
    pub gates: Gates,
    /// Every model of every seed and k.
    pub rows: Vec<Row>,
    /// Statistics over seeds per k and model.
    pub aggregates: Vec<Aggregate>,
    /// Split by clean-model confidence.
    pub buckets: Vec<BucketRow>,
    /// Mean clean-model probability of the gold answer on target facts.
    pub clean_confidence: Stat,
    /// Reproduction statement.
    pub finding: Finding,
    /// Non-target facts behind the collateral metric.
    #[serde(default)]
    pub nontarget_facts: usize,
}

/// The headline numbers: target accuracy of the clean and corrupted models
/// (fractions, mean over seeds and ks), and each method's recovery ratio
/// ((unlearned - corrupted) / (clean - corrupted) target accuracy), mean over
/// seeds, averaged over ks and per k, keyed by method (`ga`, `graddiff`,
/// `kl`, `npo`, `salun`, `o3`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportSummary {
    /// Clean model's target accuracy.
    pub clean_target_acc: f64,
    /// Corrupted model's target accuracy.
    pub corrupted_target_acc: f64,
    /// Method -> recovery ratio (mean over seeds and ks).
    pub recovery: BTreeMap<String, f64>,
    /// Method -> k -> recovery ratio (mean over seeds).
    pub recovery_by_k: BTreeMap<String, BTreeMap<usize, f64>>,
    /// The reproduction verdict.
    pub finding: String,
}

/// The method's key in the summary: `o3`, or the weight-level method's name.
fn method_key(m: &crate::config::MethodEntry) -> String {
    if m.o3.is_some() {
        return "o3".into();
    }
    m.lm.as_ref()
        .and_then(|lm| serde_json::to_value(lm).ok())
        .and_then(|v| v.get("method").and_then(|x| x.as_str()).map(str::to_string))
        .unwrap_or_else(|| m.label.to_lowercase())
}

/// The 1/5/15-minute load average (Linux `/proc/loadavg`).
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|s| s.parse().ok())
        .collect();
    (v.len() == 3).then(|| [v[0], v[1], v[2]])
}

fn stat_of(values: &[f64]) -> Stat {
    Stat::of(values).unwrap_or(Stat {
        mean: f64::NAN,
        std: f64::NAN,
        n: 0,
    })
}

impl Report {
    /// Aggregates the pipeline's output.
    pub fn build(
        cfg: &RestorConfig,
        source: &str,
        out: &PipelineOutput,
        total_seconds: f64,
        load_before: Option<[f64; 3]>,
    ) -> Result<Report> {
        let find = |seed: u64, k: Option<usize>, model: &str| -> Result<&ModelRun> {
            out.runs
                .iter()
                .find(|r| r.seed == seed && r.k == k && r.model == model)
                .ok_or_else(|| Error::Checkpoint {
                    path: String::new(),
                    message: format!("no run for seed {seed} k {k:?} {model}"),
                })
        };
        let mut models: Vec<String> = vec!["clean".into(), "corrupted".into()];
        models.extend(cfg.methods.iter().map(|m| m.label.clone()));
        let empty = Vec::new();
        let mut rows = Vec::new();
        let mut clean_gates = Vec::new();
        let mut corrupt_gates = Vec::new();
        for &seed in &cfg.seeds {
            let clean = find(seed, None, "clean")?;
            let clean_sum = metrics::summarize(&clean.record.eval, &out.nontarget, &empty);
            clean_gates.push(CleanGate {
                seed,
                target_accuracy: clean_sum.target_accuracy,
                pass: clean_sum.target_accuracy >= cfg.clean.min_target_accuracy,
            });
            for &k in &cfg.ks {
                let mixed = out.mixed.get(&k).filter(|_| k > 0).unwrap_or(&empty);
                let clean_k = metrics::summarize(&clean.record.eval, &out.nontarget, mixed);
                let corr = find(seed, Some(k), "corrupted")?;
                let corr_sum = metrics::summarize(&corr.record.eval, &out.nontarget, mixed);
                let drop = clean_k.target_accuracy - corr_sum.target_accuracy;
                let change = corr_sum.nontarget_accuracy - clean_k.nontarget_accuracy;
                corrupt_gates.push(CorruptGate {
                    seed,
                    k,
                    target_drop: drop,
                    corrupted_rate: corr_sum.corrupted_rate,
                    nontarget_change: change,
                    steps: corr.record.fit.as_ref().map_or(0, |f| f.steps),
                    stopped_early: corr
                        .record
                        .corruption
                        .as_ref()
                        .is_some_and(|l| l.stopped_early),
                    pass: drop >= cfg.corrupt.min_target_drop
                        && change.abs() < cfg.corrupt.max_nontarget_change,
                });
                rows.push(Row {
                    seed,
                    k,
                    model: "clean".into(),
                    summary: clean_k.clone(),
                    forgetting: None,
                    recovery: None,
                    seconds: clean.record.seconds,
                    status: clean.status,
                });
                rows.push(Row {
                    seed,
                    k,
                    model: "corrupted".into(),
                    summary: corr_sum.clone(),
                    forgetting: None,
                    recovery: recovery(
                        clean_k.target_accuracy,
                        corr_sum.target_accuracy,
                        corr_sum.target_accuracy,
                    ),
                    seconds: corr.record.seconds,
                    status: corr.status,
                });
                for m in &cfg.methods {
                    let run = find(seed, Some(k), &m.label)?;
                    let s = metrics::summarize(&run.record.eval, &out.nontarget, mixed);
                    rows.push(Row {
                        seed,
                        k,
                        model: m.label.clone(),
                        forgetting: forgetting(corr_sum.corrupted_rate, s.corrupted_rate),
                        recovery: recovery(
                            clean_k.target_accuracy,
                            corr_sum.target_accuracy,
                            s.target_accuracy,
                        ),
                        summary: s,
                        seconds: run.record.seconds,
                        status: run.status,
                    });
                }
            }
        }
        // Statistics over seeds.
        let mut aggregates = Vec::new();
        for &k in &cfg.ks {
            for model in &models {
                let sel: Vec<&Row> = rows
                    .iter()
                    .filter(|r| r.k == k && &r.model == model)
                    .collect();
                let mut m = BTreeMap::new();
                let mut put = |name: &str, f: &dyn Fn(&Row) -> Option<f64>| {
                    let v: Vec<f64> = sel.iter().filter_map(|r| f(r)).collect();
                    if let Some(s) = Stat::of(&v) {
                        m.insert(name.to_string(), s);
                    }
                };
                put("target_accuracy", &|r| Some(r.summary.target_accuracy));
                put("corrupted_rate", &|r| Some(r.summary.corrupted_rate));
                put("other_rate", &|r| Some(r.summary.other_rate));
                put("locality", &|r| Some(r.summary.locality));
                put("nontarget_accuracy", &|r| {
                    Some(r.summary.nontarget_accuracy)
                });
                put("mixed_accuracy", &|r| r.summary.mixed_accuracy);
                put("heldout_perplexity", &|r| {
                    Some(r.summary.heldout_perplexity)
                });
                put("lp_gold", &|r| Some(r.summary.lp_gold));
                put("lp_corrupted", &|r| Some(r.summary.lp_corrupted));
                put("lp_random", &|r| Some(r.summary.lp_random));
                put("gold_top_rate", &|r| Some(r.summary.gold_top_rate));
                put("forgetting", &|r| r.forgetting);
                put("recovery", &|r| r.recovery);
                put("seconds", &|r| Some(r.seconds));
                aggregates.push(Aggregate {
                    k,
                    model: model.clone(),
                    metrics: m,
                });
            }
        }
        // Confidence buckets, pooled over seeds and ks.
        let edges = &cfg.confidence_edges;
        let labels = bucket_labels(edges);
        let mut all_conf = Vec::new();
        // (model, bucket) -> (n, gold, corrupted)
        let mut counts: BTreeMap<(String, usize), (usize, usize, usize)> = BTreeMap::new();
        for &seed in &cfg.seeds {
            let clean = find(seed, None, "clean")?;
            let conf = confidences(&clean.record.eval);
            all_conf.extend(conf.values().copied());
            for &k in &cfg.ks {
                for model in &models {
                    let run = if model == "clean" {
                        clean
                    } else {
                        find(seed, Some(k), model)?
                    };
                    for t in &run.record.eval.targets {
                        let b = bucket(conf.get(&t.fact).copied().unwrap_or(0.0), edges);
                        let e = counts.entry((model.clone(), b)).or_default();
                        e.0 += 1;
                        e.1 += usize::from(t.outcome == Outcome::Gold);
                        e.2 += usize::from(t.outcome == Outcome::Corrupted);
                    }
                }
            }
        }
        let rate = |model: &str, b: usize| -> Option<f64> {
            counts
                .get(&(model.to_string(), b))
                .filter(|c| c.0 > 0)
                .map(|c| c.1 as f64 / c.0 as f64)
        };
        let mut buckets = Vec::new();
        for model in &models {
            for (b, label) in labels.iter().enumerate() {
                let Some(&(n, gold, corr)) = counts.get(&(model.clone(), b)) else {
                    continue;
                };
                if n == 0 {
                    continue;
                }
                let acc = gold as f64 / n as f64;
                let rec = match (rate("clean", b), rate("corrupted", b)) {
                    (Some(c), Some(x)) if model != "clean" => recovery(c, x, acc),
                    _ => None,
                };
                buckets.push(BucketRow {
                    model: model.clone(),
                    bucket: label.clone(),
                    n,
                    accuracy: acc,
                    corrupted_rate: corr as f64 / n as f64,
                    recovery: rec,
                });
            }
        }
        let gates = Gates {
            all_pass: clean_gates.iter().all(|g| g.pass) && corrupt_gates.iter().all(|g| g.pass),
            clean: clean_gates,
            corrupt: corrupt_gates,
        };
        let mut stage_seconds: BTreeMap<String, f64> = BTreeMap::new();
        for r in out
            .runs
            .iter()
            .filter(|r| r.status == StageStatus::Computed)
        {
            let kind = match r.model.as_str() {
                "clean" | "corrupted" => r.model.clone(),
                other => format!("method {other}"),
            };
            *stage_seconds.entry(kind).or_default() += r.record.seconds;
        }
        let computed = out
            .runs
            .iter()
            .filter(|r| r.status == StageStatus::Computed)
            .count();
        let environment = Environment {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            candle_threads: std::env::var("CANDLE_NUM_THREADS").ok(),
            rayon_threads: std::env::var("RAYON_NUM_THREADS").ok(),
            load_before,
            load_after: load_average(),
            total_seconds,
            computed_stages: computed,
            loaded_stages: out.runs.len() - computed,
            stage_seconds,
        };
        let clean_confidence = stat_of(&all_conf);
        let finding = finding(cfg, &aggregates, &buckets, &clean_confidence);
        let mut report = Report {
            summary: ReportSummary::default(),
            source: source.to_string(),
            config: cfg.clone(),
            world: out.world.summary(),
            environment,
            gates,
            rows,
            aggregates,
            buckets,
            clean_confidence,
            finding,
            nontarget_facts: out.nontarget.len(),
        };
        report.summary = report.summarise();
        Ok(report)
    }

    /// The headline numbers from the aggregates.
    pub fn summarise(&self) -> ReportSummary {
        let ks = &self.config.ks;
        let over_k = |model: &str, metric: &str| -> Vec<f64> {
            ks.iter()
                .filter_map(|&k| self.mean(k, model, metric))
                .filter(|v| v.is_finite())
                .collect()
        };
        let mut recovery = BTreeMap::new();
        let mut recovery_by_k = BTreeMap::new();
        for m in &self.config.methods {
            let key = method_key(m);
            let per_k: BTreeMap<usize, f64> = ks
                .iter()
                .filter_map(|&k| self.mean(k, &m.label, "recovery").map(|v| (k, v)))
                .collect();
            let finite: Vec<f64> = per_k.values().copied().filter(|v| v.is_finite()).collect();
            recovery.insert(key.clone(), stat_of(&finite).mean);
            recovery_by_k.insert(key, per_k);
        }
        ReportSummary {
            clean_target_acc: stat_of(&over_k("clean", "target_accuracy")).mean,
            corrupted_target_acc: stat_of(&over_k("corrupted", "target_accuracy")).mean,
            recovery,
            recovery_by_k,
            finding: self.finding.verdict.clone(),
        }
    }

    /// The aggregate of `model` at `k`.
    pub fn aggregate(&self, k: usize, model: &str) -> Option<&Aggregate> {
        self.aggregates
            .iter()
            .find(|a| a.k == k && a.model == model)
    }

    /// Mean of a metric of `model` at `k`.
    pub fn mean(&self, k: usize, model: &str, metric: &str) -> Option<f64> {
        self.aggregate(k, model)
            .and_then(|a| a.metrics.get(metric))
            .map(|s| s.mean)
    }

    /// Writes `report.json` and `report.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Checkpoint {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        let p = dir.join("report.json");
        std::fs::write(&p, json).map_err(|e| Error::io(e, format!("writing {}", p.display())))?;
        let p = dir.join("report.md");
        std::fs::write(&p, self.markdown())
            .map_err(|e| Error::io(e, format!("writing {}", p.display())))
    }

    /// The Markdown summary.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let env = &self.environment;
        let _ = writeln!(s, "# RESTOR-style restorative unlearning (lethe-restor)\n");
        let _ = writeln!(
            s,
            "Config `{}`; seeds {:?}; k variants {:?}; {} cores, CANDLE_NUM_THREADS={}, \
             RAYON_NUM_THREADS={}; load average before {} / after {}; wall clock {:.1} s \
             ({} stages computed, {} loaded from checkpoints).\n",
            self.source,
            c.seeds,
            c.ks,
            env.cores,
            env.candle_threads.as_deref().unwrap_or("unset"),
            env.rayon_threads.as_deref().unwrap_or("unset"),
            fmt_load(env.load_before),
            fmt_load(env.load_after),
            env.total_seconds,
            env.computed_stages,
            env.loaded_stages,
        );
        if !env.stage_seconds.is_empty() {
            let parts: Vec<String> = env
                .stage_seconds
                .iter()
                .map(|(k, v)| format!("{k} {v:.1} s"))
                .collect();
            let _ = writeln!(
                s,
                "Time in computed stages (training + evaluation): {}.\n",
                parts.join(", ")
            );
        }
        let w = &self.world;
        let _ = writeln!(
            s,
            "World: {} entities ({} targets), {} relations, {} facts ({} with several gold answers), \
             vocabulary {} words; clean corpus {} paragraphs / {} tokens, fact mentions {}..{} (Zipf); \
             {} corrupted facts, {} untouched target facts (locality); {} corruption documents per k. \
             Model: {} layers, width {}, {} heads. Clean-model probability of the gold answer on target \
             facts: mean {:.3} ± {:.3}.\n",
            w.entities,
            w.targets,
            w.relations,
            w.facts,
            w.multi_gold_facts,
            w.vocab,
            w.clean_docs,
            w.clean_tokens,
            w.mentions_min,
            w.mentions_max,
            w.target_facts,
            w.locality_facts,
            w.corruption_docs,
            c.model.layers,
            c.model.hidden_size,
            c.model.heads,
            self.clean_confidence.mean,
            self.clean_confidence.std,
        );
        let _ = writeln!(s, "## Gates\n");
        let _ = writeln!(
            s,
            "Clean: target accuracy >= {:.0}%. Corruption: target accuracy drops >= {:.0} points and \
             non-target accuracy moves < {:.0} points. **All pass: {}**\n",
            c.clean.min_target_accuracy * 100.0,
            c.corrupt.min_target_drop * 100.0,
            c.corrupt.max_nontarget_change * 100.0,
            if self.gates.all_pass { "yes" } else { "NO" }
        );
        let _ = writeln!(s, "| seed | clean target acc | pass |\n|---|---|---|");
        for g in &self.gates.clean {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                g.seed,
                pct(g.target_accuracy),
                yes(g.pass)
            );
        }
        let cc = &c.corrupt;
        let recipe = match &cc.lora {
            Some(l) => format!("a rank-{} LoRA adapter merged into the weights", l.rank),
            None if cc.freeze.is_empty() => "every parameter".to_string(),
            None => format!(
                "every parameter except those whose name contains {}",
                cc.freeze
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let stop = match &cc.early_stop {
            Some(e) => format!(
                "; **gate-driven early stop**: the target facts are evaluated every {} step(s) and \
                 corruption ends once their accuracy is {:.0} points below the clean model's \
                 (the steps column says where each run stopped; \"budget\" = it never got there)",
                e.every,
                e.drop * 100.0
            ),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "\nCorruption: continued training on the corruption documents only, AdamW lr {}, \
             weight decay {}, batch {}, at most {} epochs; trains {}{}. Non-target accuracy is \
             measured on {} non-target facts.\n",
            cc.train.lr,
            cc.train.weight_decay,
            cc.train.batch_size,
            cc.train.epochs,
            recipe,
            stop,
            self.nontarget_facts,
        );
        let _ = writeln!(
            s,
            "| seed | k | target drop (points) | corrupted-answer rate | non-target change (points) | steps | pass |\n|---|---|---|---|---|---|---|"
        );
        for g in &self.gates.corrupt {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {} | {:+.1} | {}{} | {} |",
                g.seed,
                g.k,
                g.target_drop * 100.0,
                pct(g.corrupted_rate),
                g.nontarget_change * 100.0,
                g.steps,
                if g.stopped_early {
                    " (early stop)"
                } else if cc.early_stop.is_some() {
                    " (budget)"
                } else {
                    ""
                },
                yes(g.pass)
            );
        }
        let f = &self.finding;
        let _ = writeln!(
            s,
            "\n## Does RESTOR's finding reproduce? **{}**\n",
            f.verdict
        );
        let _ = writeln!(s, "{}\n", f.statement);
        for cl in &f.claims {
            let h = match cl.holds {
                Some(true) => "holds",
                Some(false) => "fails",
                None => "not testable",
            };
            let _ = writeln!(s, "- **{}** ({h}): {}", cl.claim, cl.evidence);
        }
        if !f.diagnosis.is_empty() {
            let _ = writeln!(s, "\nWhy (data):\n");
            for d in &f.diagnosis {
                let _ = writeln!(s, "- {d}");
            }
        }
        let _ = writeln!(
            s,
            "\n## Clean / corrupted / unlearned, per k\n\nMean ± std over {} seeds. Rates in %; \
             lp = mean per-token log-probability of the gold / corrupted / random same-type answers; \
             gold top = gold outscores corrupted and random. Forgetting = (Corr_corr − Corr_unl)/Corr_corr; \
             Recovery = (Acc_unl − Acc_corr)/(Acc_clean − Acc_corr).\n",
            c.seeds.len()
        );
        for &k in &c.ks {
            let _ = writeln!(s, "### k = {k}\n");
            let _ = writeln!(
                s,
                "| model | target acc | corrupted | other | locality | non-target | mixed-in | ppl | forgetting | recovery | lp gold / corr / rand | gold top | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for a in self.aggregates.iter().filter(|a| a.k == k) {
                let g = |m: &str| a.metrics.get(m);
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} |",
                    a.model,
                    pm_pct(g("target_accuracy")),
                    pm_pct(g("corrupted_rate")),
                    pm_pct(g("other_rate")),
                    pm_pct(g("locality")),
                    pm_pct(g("nontarget_accuracy")),
                    pm_pct(g("mixed_accuracy")),
                    pm(g("heldout_perplexity"), 2),
                    pm(g("forgetting"), 2),
                    pm(g("recovery"), 2),
                    num(g("lp_gold").map(|x| x.mean), 2),
                    num(g("lp_corrupted").map(|x| x.mean), 2),
                    num(g("lp_random").map(|x| x.mean), 2),
                    pm_pct(g("gold_top_rate")),
                    num(g("seconds").map(|x| x.mean), 1),
                );
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s, "## Recovery per seed\n");
        let methods: Vec<&str> = c.methods.iter().map(|m| m.label.as_str()).collect();
        let _ = writeln!(s, "| seed | k | {} |", methods.join(" | "));
        let _ = writeln!(s, "|---|---|{}", "---|".repeat(methods.len()));
        for &seed in &c.seeds {
            for &k in &c.ks {
                let cells: Vec<String> = methods
                    .iter()
                    .map(|m| {
                        self.rows
                            .iter()
                            .find(|r| r.seed == seed && r.k == k && r.model == *m)
                            .and_then(|r| r.recovery)
                            .map_or("n/a".into(), |v| format!("{v:.2}"))
                    })
                    .collect();
                let _ = writeln!(s, "| {seed} | {k} | {} |", cells.join(" | "));
            }
        }
        let _ = writeln!(
            s,
            "\n## By clean-model confidence\n\nBuckets of the clean model's probability of the gold \
             answer; pooled over seeds and k. Recovery from the bucket's pooled accuracies.\n"
        );
        let _ = writeln!(
            s,
            "| model | bucket | n | target acc | corrupted | recovery |\n|---|---|---|---|---|---|"
        );
        for b in &self.buckets {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                b.model,
                b.bucket,
                b.n,
                pct(b.accuracy),
                pct(b.corrupted_rate),
                b.recovery.map_or("n/a".into(), |v| format!("{v:.2}"))
            );
        }
        let _ = writeln!(
            s,
            "\n## Figures\n\n![recovery per method and k](recovery_by_k.svg)\n\n\
             *Recovery (y, mean over seeds, bars ± std) against k (x), one line per method.*\n\n\
             ![target accuracy by clean confidence](confidence_buckets.svg)\n\n\
             *Target accuracy (y) per clean-confidence bucket (x, low to high), one line per model \
             (clean, corrupted, each method); pooled over seeds and k.*\n"
        );
        s
    }
}

fn fmt_load(l: Option<[f64; 3]>) -> String {
    l.map_or("n/a".into(), |l| {
        format!("{:.2}/{:.2}/{:.2}", l[0], l[1], l[2])
    })
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

fn pct(v: f64) -> String {
    format!("{:.1}", v * 100.0)
}

fn pm_pct(s: Option<&Stat>) -> String {
    s.map_or("n/a".into(), |s| {
        format!("{:.1} ± {:.1}", s.mean * 100.0, s.std * 100.0)
    })
}

fn pm(s: Option<&Stat>, digits: usize) -> String {
    s.map_or("n/a".into(), |s| {
        format!("{:.*} ± {:.*}", digits, s.mean, digits, s.std)
    })
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.digits$}"))
}

/// Mean over ks of a metric's per-k means (None when no k has it).
fn over_ks(aggs: &[Aggregate], model: &str, metric: &str) -> Option<f64> {
    let v: Vec<f64> = aggs
        .iter()
        .filter(|a| a.model == model)
        .filter_map(|a| a.metrics.get(metric).map(|s| s.mean))
        .collect();
    Stat::of(&v).map(|s| s.mean)
}

fn per_k(aggs: &[Aggregate], model: &str, metric: &str) -> String {
    aggs.iter()
        .filter(|a| a.model == model)
        .map(|a| {
            format!(
                "k={}: {}",
                a.k,
                a.metrics
                    .get(metric)
                    .map_or("n/a".into(), |s| format!("{:.2} ± {:.2}", s.mean, s.std))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The reproduction statement from the aggregates (see the module docs).
pub fn finding(
    cfg: &RestorConfig,
    aggs: &[Aggregate],
    buckets: &[BucketRow],
    clean_confidence: &Stat,
) -> Finding {
    let fc = &cfg.finding;
    let mut claims = Vec::new();
    for m in &fc.forgetters {
        let fo = over_ks(aggs, m, "forgetting");
        let re = over_ks(aggs, m, "recovery");
        let holds = match (fo, re) {
            (Some(fo), Some(re)) => Some(fo >= fc.forget_min && re <= fc.no_restore_max),
            _ => None,
        };
        claims.push(Claim {
            claim: format!("{m} forgets without restoring"),
            holds,
            evidence: format!(
                "forgetting (mean over k) {} (criterion >= {}), recovery {} (criterion <= {}); \
                 forgetting per k: {}; recovery per k: {}",
                num(fo, 2),
                fc.forget_min,
                num(re, 2),
                fc.no_restore_max,
                per_k(aggs, m, "forgetting"),
                per_k(aggs, m, "recovery"),
            ),
        });
    }
    let r = &fc.restorer;
    let rr = over_ks(aggs, r, "recovery");
    let best_forgetter = fc
        .forgetters
        .iter()
        .filter_map(|m| over_ks(aggs, m, "recovery"))
        .fold(f64::NEG_INFINITY, f64::max);
    claims.push(Claim {
        claim: format!("{r} restores"),
        holds: rr.map(|v| v >= fc.restore_min && v > best_forgetter),
        evidence: format!(
            "recovery (mean over k) {} (criterion >= {} and above the forgetters' best, {}); per k: {}",
            num(rr, 2),
            fc.restore_min,
            num(best_forgetter.is_finite().then_some(best_forgetter), 2),
            per_k(aggs, r, "recovery"),
        ),
    });
    let (kmin, kmax) = (cfg.ks.first().copied(), cfg.ks.last().copied());
    let rec_at = |k: Option<usize>| -> Option<f64> {
        let k = k?;
        aggs.iter()
            .find(|a| a.k == k && &a.model == r)
            .and_then(|a| a.metrics.get("recovery"))
            .map(|s| s.mean)
    };
    let (lo, hi) = (rec_at(kmin), rec_at(kmax));
    claims.push(Claim {
        claim: format!("{r} restores more at small k"),
        holds: match (lo, hi) {
            (Some(lo), Some(hi)) if kmin != kmax => Some(lo > hi),
            _ => None,
        },
        evidence: format!(
            "recovery at k={} {} vs at k={} {}",
            kmin.map_or("n/a".into(), |k| k.to_string()),
            num(lo, 2),
            kmax.map_or("n/a".into(), |k| k.to_string()),
            num(hi, 2)
        ),
    });
    let tested: Vec<bool> = claims.iter().filter_map(|c| c.holds).collect();
    let ok = tested.iter().filter(|&&h| h).count();
    let verdict = if !tested.is_empty() && ok == tested.len() {
        "reproduces"
    } else if ok > 0 {
        "partially reproduces"
    } else {
        "does not reproduce"
    };
    let holding: Vec<&str> = claims
        .iter()
        .filter(|c| c.holds == Some(true))
        .map(|c| c.claim.as_str())
        .collect();
    let failing: Vec<&str> = claims
        .iter()
        .filter(|c| c.holds == Some(false))
        .map(|c| c.claim.as_str())
        .collect();
    let statement = format!(
        "RESTOR's qualitative finding {verdict} on this world. Supported by the numbers: {}. \
         Not supported: {}.",
        if holding.is_empty() {
            "none".into()
        } else {
            holding.join("; ")
        },
        if failing.is_empty() {
            "none".into()
        } else {
            failing.join("; ")
        },
    );
    let mut diagnosis = Vec::new();
    if ok < tested.len() {
        diagnosis.push(format!(
            "Clean-model probability of the gold answer on target facts: mean {:.3} ± {:.3} \
             (RESTOR: restoration depends on how confidently the clean model knew the fact).",
            clean_confidence.mean, clean_confidence.std
        ));
        let mut by_bucket = Vec::new();
        for b in buckets.iter().filter(|b| &b.model == r) {
            by_bucket.push(format!(
                "{}: n {}, acc {:.1}%, recovery {}",
                b.bucket,
                b.n,
                b.accuracy * 100.0,
                b.recovery.map_or("n/a".into(), |v| format!("{v:.2}"))
            ));
        }
        if !by_bucket.is_empty() {
            diagnosis.push(format!(
                "{r} by clean confidence: {}.",
                by_bucket.join("; ")
            ));
        }
        for m in fc.forgetters.iter().chain(std::iter::once(r)) {
            diagnosis.push(format!(
                "{m}: other-answer rate (mean over k) {}, corrupted rate {}, target accuracy {}, \
                 lp gold {} vs corrupted {} vs random {}, non-target accuracy {}.",
                num(over_ks(aggs, m, "other_rate").map(|v| v * 100.0), 1),
                num(over_ks(aggs, m, "corrupted_rate").map(|v| v * 100.0), 1),
                num(over_ks(aggs, m, "target_accuracy").map(|v| v * 100.0), 1),
                num(over_ks(aggs, m, "lp_gold"), 2),
                num(over_ks(aggs, m, "lp_corrupted"), 2),
                num(over_ks(aggs, m, "lp_random"), 2),
                num(over_ks(aggs, m, "nontarget_accuracy").map(|v| v * 100.0), 1),
            ));
        }
        diagnosis.push(format!(
            "corrupted model: lp gold {} vs corrupted {} (the gold answer's log-probability after \
             corruption bounds what removing the corrupted answer alone can restore).",
            num(over_ks(aggs, "corrupted", "lp_gold"), 2),
            num(over_ks(aggs, "corrupted", "lp_corrupted"), 2),
        ));
    }
    Finding {
        verdict: verdict.to_string(),
        statement,
        claims,
        diagnosis,
    }
}

#[cfg(test)]
mod tests;
