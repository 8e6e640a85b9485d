//! End-to-end tests: a tiny run of the whole pipeline (sized by
//! `LETHE_TEST_SIZE`: `small` by default, `full` for three seeds and more
//! training), resumability and config validation.

use std::path::Path;

use crate::config::RestorConfig;
use crate::pipeline::StageStatus;
use crate::{run_config, Progress};

/// A tiny configuration: every stage and method, seconds per stage.
pub(crate) fn tiny_config() -> RestorConfig {
    let full = std::env::var("LETHE_TEST_SIZE").is_ok_and(|s| s == "full");
    let (seeds, epochs) = if full {
        ("[0, 1, 2]", 150)
    } else {
        ("[0]", 80)
    };
    let text = format!(
        r#"
seeds = {seeds}
ks = [0, 2]
eval_batch = 32
confidence_edges = [0.5, 0.9]

[world]
seed = 3
entities = 24
relations = 3
values_per_type = 6
max_golds = 2
min_mentions = 4
max_mentions = 8
zipf_exponent = 1.0
sentences_per_doc = 3
targets = 3
corrupt_fraction_min = 0.3
corrupt_fraction_max = 0.7
bundles_per_target = 1
paraphrases = 2
retain_docs = 8
heldout_docs = 4
shots = 1
random_answers = 2
nontarget_eval = 20

[model]
hidden_size = 64
intermediate_size = 128
layers = 1
heads = 2

[clean]
min_target_accuracy = 0.85
train = {{ lr = 0.01, epochs = {epochs}, batch_size = 8, cosine = true }}

[corrupt]
min_target_drop = 0.4
max_nontarget_change = 0.03
train = {{ lr = 0.003, epochs = 3, batch_size = 4 }}
early_stop = {{ drop = 0.4, every = 1 }}

[[methods]]
label = "GA"
lm = {{ method = "ga", train = {{ lr = 0.001, epochs = 1, batch_size = 4 }} }}

[[methods]]
label = "GradDiff"
lm = {{ method = "graddiff", retain_weight = 1.0, train = {{ lr = 0.001, epochs = 1, batch_size = 4 }} }}

[[methods]]
label = "KL"
lm = {{ method = "kl", kl_weight = 1.0, train = {{ lr = 0.001, epochs = 1, batch_size = 4 }} }}

[[methods]]
label = "NPO"
lm = {{ method = "npo", beta = 0.1, train = {{ lr = 0.001, epochs = 1, batch_size = 4 }} }}

[[methods]]
label = "SalUn-NPO"
lm = {{ method = "salun", keep_ratio = 0.5, objective = {{ kind = "npo", beta = 0.1 }}, train = {{ lr = 0.001, epochs = 1, batch_size = 4 }} }}

[[methods]]
label = "O3"
[methods.o3]
orthogonal_weight = 0.1
target = "refusal"
adapter = {{ rank = 2, alpha = 4.0, targets = ["q_proj", "v_proj"] }}
train = {{ lr = 0.01, epochs = 2, batch_size = 4 }}
detector = {{ pooling = "mean", shrinkage = 0.1, cosine_weight = 1.0, folds = 2, calibration = {{ kind = "o3", sharpness = 10.0, offset = 2.0 }} }}
gate = {{ full_above = 0.9, full_value = 1.2, keep_low = 0.3, keep_high = 0.4 }}

[finding]
forgetters = ["GA", "KL"]
restorer = "NPO"
forget_min = 0.5
no_restore_max = 0.2
restore_min = 0.2
"#
    );
    let cfg: RestorConfig = toml::from_str(&text).expect("tiny config parses");
    cfg.validate().expect("tiny config is valid");
    cfg
}

/// Summaries equal up to the last bits an f64 can lose in a JSON round
/// trip (serde_json's default float parser is not exact).
fn assert_close(a: &crate::metrics::Summary, b: &crate::metrics::Summary) {
    let (va, vb) = (
        serde_json::to_value(a).unwrap(),
        serde_json::to_value(b).unwrap(),
    );
    let (oa, ob) = (va.as_object().unwrap(), vb.as_object().unwrap());
    assert_eq!(oa.keys().collect::<Vec<_>>(), ob.keys().collect::<Vec<_>>());
    for (k, x) in oa {
        let y = &ob[k];
        match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => {
                assert!((x - y).abs() <= 1e-12 * x.abs().max(1.0), "{k}: {x} vs {y}")
            }
            _ => assert_eq!(x, y, "{k}"),
        }
    }
}

fn run(cfg: &RestorConfig, out: &Path) -> (crate::Report, Vec<Progress>) {
    let mut events = Vec::new();
    let report = run_config(cfg, "tiny", out, &mut |p| events.push(p)).expect("run succeeds");
    (report, events)
}

#[test]
fn tiny_run_end_to_end_then_resume_without_recomputing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let (first, events) = run(&cfg, dir.path());
    let stages = cfg.seeds.len() * (1 + cfg.ks.len() * (1 + cfg.methods.len()));
    assert_eq!(events.len(), stages);
    assert!(events.iter().all(|e| e.status == StageStatus::Computed));
    assert_eq!(events.last().unwrap().done, stages);
    // The report has every model of every seed and k side by side.
    assert_eq!(
        first.rows.len(),
        cfg.seeds.len() * cfg.ks.len() * (2 + cfg.methods.len())
    );
    for label in [
        "clean",
        "corrupted",
        "GA",
        "GradDiff",
        "KL",
        "NPO",
        "SalUn-NPO",
        "O3",
    ] {
        for &k in &cfg.ks {
            assert!(
                first.aggregate(k, label).is_some(),
                "{label} at k={k} missing"
            );
        }
    }
    // The machine-readable headline: both accuracies and every method's
    // recovery under its key.
    let h = &first.summary;
    assert!((0.0..=1.0).contains(&h.clean_target_acc), "{h:?}");
    assert!((0.0..=1.0).contains(&h.corrupted_target_acc), "{h:?}");
    let keys: Vec<&str> = h.recovery.keys().map(String::as_str).collect();
    assert_eq!(keys, ["ga", "graddiff", "kl", "npo", "o3", "salun"]);
    assert_eq!(h.finding, first.finding.verdict);
    for r in &first.rows {
        let s = &r.summary;
        let sum = s.target_accuracy + s.corrupted_rate + s.other_rate;
        assert!(
            (sum - 1.0).abs() < 1e-9,
            "rates of {} sum to {sum}",
            r.model
        );
        assert!(s.heldout_perplexity.is_finite() && s.heldout_perplexity >= 1.0);
    }
    // Training from scratch learned something: the clean model beats chance.
    let clean = first.rows.iter().find(|r| r.model == "clean").unwrap();
    assert!(
        clean.summary.nontarget_accuracy > 0.3,
        "clean model: {:?}",
        clean.summary
    );
    // A corruption that the early stop ended reached the gate's drop at
    // that step, and the report says where it stopped.
    for g in &first.gates.corrupt {
        assert!(g.steps > 0 && g.steps <= 3 * 2, "{g:?}");
        if g.stopped_early {
            assert!(g.target_drop >= 0.4 - 1e-9, "{g:?}");
        }
    }
    assert_eq!(first.nontarget_facts, cfg.world.nontarget_eval);
    // O3 leaves the base weights untouched and says it only suppresses.
    let o3 = first.rows.iter().find(|r| r.model == "O3").unwrap();
    assert_eq!(o3.status, StageStatus::Computed);
    for f in [
        "report.json",
        "report.md",
        "recovery_by_k.svg",
        "confidence_buckets.svg",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} not written");
    }
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains(&first.finding.verdict));
    let svg = std::fs::read_to_string(dir.path().join("recovery_by_k.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("NPO"));

    // Second run: every stage is loaded, the numbers are identical.
    let (second, events) = run(&cfg, dir.path());
    assert!(events.iter().all(|e| e.status == StageStatus::Loaded));
    assert_eq!(second.rows.len(), first.rows.len());
    for (a, b) in first.rows.iter().zip(&second.rows) {
        assert_close(&a.summary, &b.summary);
        assert_eq!(b.status, StageStatus::Loaded);
    }
    assert_eq!(first.finding.verdict, second.finding.verdict);

    // Changing one method recomputes that method only.
    let mut changed = cfg.clone();
    if let Some(crate::config::MethodEntry {
        lm: Some(lethe_unlearn::lm::LmMethodConfig::Npo(c)),
        ..
    }) = changed.methods.iter_mut().find(|m| m.label == "NPO")
    {
        c.train.lr = 0.002;
    } else {
        panic!("NPO entry not found");
    }
    let (_, events) = run(&changed, dir.path());
    let computed: Vec<&str> = events
        .iter()
        .filter(|e| e.status == StageStatus::Computed)
        .map(|e| e.stage.as_str())
        .collect();
    assert_eq!(computed.len(), cfg.seeds.len() * cfg.ks.len());
    assert!(computed.iter().all(|s| s.ends_with(" NPO")), "{computed:?}");
}

#[test]
fn same_seed_same_numbers_in_a_fresh_folder() {
    let mut cfg = tiny_config();
    cfg.seeds = vec![5];
    cfg.ks = vec![1];
    cfg.methods
        .retain(|m| m.label == "NPO" || m.label == "GA" || m.label == "KL");
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (ra, _) = run(&cfg, a.path());
    let (rb, _) = run(&cfg, b.path());
    for (x, y) in ra.rows.iter().zip(&rb.rows) {
        assert_eq!(x.model, y.model);
        assert_close(&x.summary, &y.summary);
    }
}

#[test]
fn bad_configs_are_rejected_with_the_field_named() {
    let mut cfg = tiny_config();
    cfg.ks = vec![2, 0];
    assert!(cfg.validate().unwrap_err().to_string().contains("ks"));
    let mut cfg = tiny_config();
    cfg.methods[0].o3 = cfg.methods[5].o3.clone();
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("exactly one"));
    let mut cfg = tiny_config();
    cfg.device = Some("tpu".into());
    assert!(cfg.validate().unwrap_err().to_string().contains("device"));
    // The shipped configs parse and validate.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../evals/restor");
    for name in ["small.toml", "large.toml"] {
        let c = crate::config::RestorConfig::from_file(&root.join(name)).unwrap();
        c.validate().unwrap();
    }
    let mut cfg = tiny_config();
    cfg.finding.restorer = "nope".into();
    assert!(cfg.validate().unwrap_err().to_string().contains("nope"));
    let mut cfg = tiny_config();
    cfg.methods[1].label = "GA".into();
    assert!(cfg.validate().unwrap_err().to_string().contains("repeats"));
    let mut cfg = tiny_config();
    cfg.corrupt.early_stop = Some(crate::config::EarlyStop {
        drop: 0.4,
        every: 0,
    });
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("early_stop"));
    let mut cfg = tiny_config();
    cfg.corrupt.freeze = vec!["lm_head".into()];
    cfg.corrupt.lora = cfg.methods[5].o3.as_ref().map(|o| o.adapter.clone());
    assert!(cfg.validate().unwrap_err().to_string().contains("freeze"));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "seeds = [0]\nunknown_key = 1\n").unwrap();
    assert!(matches!(
        crate::run(&p, dir.path()),
        Err(crate::Error::ConfigParse { .. })
    ));
}
