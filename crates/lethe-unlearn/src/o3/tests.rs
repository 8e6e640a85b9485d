//! O3 on the tiny decoder: adapters suppress the requested domains,
//! detectors gate them on only for those domains, the orthogonality
//! penalty decreases, the base weights never change.

use lethe_model::decoder::Decoder;

use crate::data::TextSet;
use crate::lm::{decoder_hash, LmTrainConfig, Relabel};
use crate::lm_eval::{answer_accuracy, refusal_rate};
use crate::o3::{
    AdapterSpec, Calibration, DetectorConfig, GateConfig, O3Config, O3Unlearner, OodDetector,
};
use crate::testutil::tiny_decoder;

fn config(refusal: Vec<u32>, calibration: Calibration) -> O3Config {
    let mut train = LmTrainConfig::new(1e-2, 20, 8);
    train.seed = 3;
    O3Config {
        adapter: AdapterSpec {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: AdapterSpec::o3().targets,
        },
        orthogonal_weight: 0.1,
        target: Relabel::Refusal { answer: refusal },
        train,
        detector: DetectorConfig {
            calibration,
            ..DetectorConfig::o3()
        },
        gate: GateConfig::o3(),
    }
}

fn queries(set: &TextSet) -> Vec<&[u32]> {
    set.examples().iter().map(|e| e.query()).collect()
}

/// Fraction of `set`'s queries whose gate for request `i` is on (> 0).
fn gate_on_rate(o3: &O3Unlearner, model: &Decoder, set: &TextSet, i: usize) -> f64 {
    let d = o3.decide(model, &queries(set)).unwrap();
    d.iter().filter(|g| g[i].gate > 0.0).count() as f64 / d.len() as f64
}

#[test]
fn o3_suppresses_each_request_and_gates_only_its_domain() {
    let (corpus, mut model) = tiny_decoder();
    let base = decoder_hash(&model).unwrap();
    let retain = corpus.qa(&[2]);
    let retain_before = answer_accuracy(&model, &retain, 64).unwrap();
    let mut o3 = O3Unlearner::new(config(corpus.refusal(), Calibration::o3())).unwrap();
    let mut reports = Vec::new();
    for d in 0..2 {
        let forget = corpus.qa(&[d]);
        let report = o3
            .unlearn(&mut model, &format!("request-{d}"), &forget)
            .unwrap();
        assert!(report.suppression_only);
        assert_eq!(report.weights_before, base);
        assert_eq!(report.weights_after, base);
        assert_eq!(report.adapter.as_ref().unwrap().sha256.len(), 64);
        assert!(report.detector_sha256.is_some());
        let gated = o3.gated(&model);
        for seen in 0..=d {
            let set = corpus.qa(&[seen]);
            let acc = answer_accuracy(&gated, &set, 64).unwrap();
            let refused = refusal_rate(&gated, &set, &corpus.refusal(), 64).unwrap();
            assert!(
                acc <= corpus.chance_accuracy(),
                "request {d}, domain {seen}: accuracy {acc}"
            );
            assert!(
                refused >= 0.75,
                "request {d}, domain {seen}: refusal {refused}"
            );
            assert!(gate_on_rate(&o3, &model, &set, seen) >= 0.8);
        }
        let ra = answer_accuracy(&gated, &retain, 64).unwrap();
        assert!(
            ra >= retain_before - 0.2,
            "retain accuracy {retain_before} -> {ra}"
        );
        for i in 0..=d {
            assert!(
                gate_on_rate(&o3, &model, &retain, i) <= 0.15,
                "detector {i} fires on retain"
            );
        }
        reports.push(report);
    }
    // The second adapter was pushed away from the first one's subspace.
    let m = &reports[1].metrics;
    assert!(m["orthogonality_penalty_before"] > 0.0);
    assert!(m["orthogonality_penalty_after"] < 0.5 * m["orthogonality_penalty_before"]);
    assert_eq!(reports[0].metrics["orthogonality_penalty_before"], 0.0);
    let total = o3.total_orthogonality_penalty().unwrap();
    assert!((total - m["orthogonality_penalty_after"]).abs() < 1e-6);
    // Served completions: forgotten queries get the refusal through the
    // gates; retain queries whose gates stay off decode exactly as the base.
    let (_, plain) = tiny_decoder();
    let refusal = corpus.refusal();
    let forget = corpus.qa(&[0]);
    let mut refused = 0;
    for q in queries(&forget) {
        let c = o3.complete(&model, q, refusal.len(), &[]).unwrap();
        assert_eq!(c.gates.len(), 2);
        refused += usize::from(c.gates[0].gate > 0.0 && c.tokens == refusal);
    }
    assert!(
        refused as f64 >= 0.75 * forget.len() as f64,
        "{refused} of {} forgotten queries refused",
        forget.len()
    );
    let mut off = 0;
    for q in queries(&retain) {
        let c = o3.complete(&model, q, 3, &[]).unwrap();
        if c.gates.iter().all(|g| g.gate == 0.0) {
            off += 1;
            assert_eq!(c.tokens, plain.greedy(q, 3, &[]).unwrap());
        }
    }
    assert!(off as f64 >= 0.85 * retain.len() as f64, "{off} gates off");
    assert!(o3.complete(&model, &[], 3, &[]).is_err());
    // Without any gate on, the model is exactly the base model.
    o3.decide(&model, &queries(&retain)).unwrap();
    let b = retain.batch(&[0, 1, 2], model.device()).unwrap();
    let l1 = plain.forward(&b.ids, lethe_model::nn::Mode::Eval).unwrap();
    let l2 = model.forward(&b.ids, lethe_model::nn::Mode::Eval).unwrap();
    let diff = (l1 - l2)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn the_penalty_weight_drives_adapters_apart() {
    let penalty_after = |lambda: f64| {
        let (corpus, mut model) = tiny_decoder();
        let mut cfg = config(corpus.refusal(), Calibration::o3());
        cfg.orthogonal_weight = lambda;
        cfg.train.epochs = 6;
        let mut o3 = O3Unlearner::new(cfg).unwrap();
        o3.unlearn(&mut model, "a", &corpus.qa(&[0])).unwrap();
        o3.unlearn(&mut model, "b", &corpus.qa(&[1])).unwrap();
        o3.total_orthogonality_penalty().unwrap()
    };
    let free = penalty_after(0.0);
    let pushed = penalty_after(1.0);
    assert!(
        pushed < 0.5 * free,
        "penalty with lambda 1: {pushed}, without: {free}"
    );
}

#[test]
fn negatives_set_a_floor_that_closes_the_gate_on_kept_data() {
    let (corpus, mut model) = tiny_decoder();
    let mut cfg = config(corpus.refusal(), Calibration::o3());
    cfg.train.epochs = 3;
    cfg.detector.max_false_positive = 0.0;
    let mut o3 = O3Unlearner::new(cfg).unwrap();
    let (forget, kept) = (corpus.qa(&[0]), corpus.qa(&[2]));
    let negatives = queries(&kept);
    let r = o3
        .unlearn_with_negatives(&mut model, "a", &forget, &negatives)
        .unwrap();
    let det = &o3.requests()[0].detector;
    let floor = det.floor().expect("negatives give a floor");
    assert_eq!(r.metrics["detector_negative_floor"], floor);
    assert_eq!(r.metrics["detector_negatives"], negatives.len() as f64);
    let cap = det.floor_cap();
    assert!(floor <= cap);
    assert_eq!(det.weight(floor), 0.0);
    assert!(det.weight(floor + 10.0 * det.calibration_stats().2) > 0.0);
    // With max_false_positive 0 the floor is the highest negative score
    // (unless capped): no negative opens the gate.
    let neg_scores = det.scores(&model, &negatives).unwrap();
    let above = neg_scores.iter().filter(|&&x| x > floor).count();
    assert!(
        above == 0 || floor == cap,
        "{above} above an uncapped floor"
    );
    let decisions = o3.decide(&model, &negatives).unwrap();
    for (s, d) in neg_scores.iter().zip(&decisions) {
        if *s <= floor {
            assert_eq!(d[0].gate, 0.0);
        }
    }
    assert!(gate_on_rate(&o3, &model, &kept, 0) <= above as f64 / negatives.len() as f64);
    assert!(gate_on_rate(&o3, &model, &forget, 0) >= 0.8);
    // Negatives that look like the forget data cannot raise the floor past
    // the cap: every query of the request keeps a score above it.
    let mut alike = det.clone();
    let f = alike
        .calibrate_negatives(&model, &queries(&forget))
        .unwrap();
    assert_eq!(f, Some(alike.floor_cap()));
    let fs = alike.scores(&model, &queries(&forget)).unwrap();
    assert!(fs.iter().all(|&x| x > alike.floor_cap()));
    // Without negatives there is no floor; bad negatives are an error.
    let mut plain = O3Unlearner::new(config(corpus.refusal(), Calibration::o3())).unwrap();
    let (_, mut model2) = tiny_decoder();
    plain.unlearn(&mut model2, "a", &forget).unwrap();
    assert_eq!(plain.requests()[0].detector.floor(), None);
    let mut det = plain.requests()[0].detector.clone();
    assert!(det.calibrate_negatives(&model2, &[&[]]).is_err());
    let mut bad = config(corpus.refusal(), Calibration::o3());
    bad.detector.max_false_positive = 1.0;
    assert!(O3Unlearner::new(bad).is_err());
}

#[test]
fn o3_is_deterministic_per_seed() {
    let run = || {
        let (corpus, mut model) = tiny_decoder();
        let mut cfg = config(corpus.refusal(), Calibration::o3());
        cfg.train.epochs = 3;
        let mut o3 = O3Unlearner::new(cfg).unwrap();
        let r = o3.unlearn(&mut model, "a", &corpus.qa(&[0])).unwrap();
        (r.adapter.unwrap().sha256, r.detector_sha256.unwrap())
    };
    assert_eq!(run(), run());
}

#[test]
fn gates_follow_o3_post_processing() {
    let g = GateConfig::o3();
    assert_eq!(g.gate(0.95), 1.2);
    assert_eq!(g.gate(0.9), 0.0);
    assert_eq!(g.gate(0.35), 0.35);
    assert_eq!(g.gate(0.4), 0.4);
    assert_eq!(g.gate(0.3), 0.0);
    assert_eq!(g.gate(0.5), 0.0);
    assert_eq!(g.gate(0.12), 0.0);
    let reversed = GateConfig {
        keep_low: 0.5,
        keep_high: 0.4,
        ..GateConfig::o3()
    };
    assert!(reversed.validate().is_err());
}

#[test]
fn calibrated_weights_follow_their_formulas() {
    let (corpus, model) = tiny_decoder();
    let set = corpus.qa(&[0]);
    let det = OodDetector::fit(&model, &queries(&set), &DetectorConfig::o3()).unwrap();
    let (m1, m2, s2) = det.calibration_stats();
    assert!(m1 > m2, "in-sample scores exceed held-out ones");
    // One-sided: at or above x0 the weight is sigmoid(10 - 2).
    let top = crate::metrics::sigmoid(8.0);
    assert!((det.weight(m1) - top).abs() < 1e-12);
    assert!((det.weight(0.5 * (m1 + m2)) - top).abs() < 1e-12);
    // Far below: c -> 0, weight -> sigmoid(-2).
    assert!((det.weight(m2 - 50.0 * s2) - crate::metrics::sigmoid(-2.0)).abs() < 1e-6);
    let w: Vec<f64> = (0..20)
        .map(|k| det.weight(m2 - 0.5 * k as f64 * s2))
        .collect();
    assert!(
        w.windows(2).all(|p| p[1] <= p[0] + 1e-12),
        "weights must fall with the score"
    );
    let tail = DetectorConfig {
        calibration: Calibration::Tail {
            z: 2.0,
            softness: 0.5,
        },
        ..DetectorConfig::o3()
    };
    let det = OodDetector::fit(&model, &queries(&set), &tail).unwrap();
    let (_, m2, s2) = det.calibration_stats();
    assert!((det.weight(m2 - 2.0 * s2) - 0.5).abs() < 1e-12);
    // Detector statistics survive serialisation (JSON parsing may round
    // the last bit of an f64, so compare decisions, not bits).
    let json = serde_json::to_string(&det).unwrap();
    let back: OodDetector = serde_json::from_str(&json).unwrap();
    let other = corpus.qa(&[1]);
    let q = queries(&other);
    let (a, b) = (
        det.scores(&model, &q).unwrap(),
        back.scores(&model, &q).unwrap(),
    );
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-9));
}

#[test]
fn cholesky_of_a_known_matrix() {
    // [[4, 2], [2, 3]] = L L^T with L = [[2, 0], [1, sqrt 2]].
    let l = crate::o3::detector::cholesky(&[4.0, 0.0, 2.0, 3.0], 2).unwrap();
    let want = [2.0, 0.0, 1.0, 2f64.sqrt()];
    assert!(
        l.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
        "{l:?}"
    );
    assert!(crate::o3::detector::cholesky(&[1.0, 0.0, 2.0, 1.0], 2).is_none());
}

#[test]
fn bad_requests_and_configs_are_clear_errors() {
    let (corpus, mut model) = tiny_decoder();
    let mut cfg = config(corpus.refusal(), Calibration::o3());
    cfg.train.epochs = 1;
    let mut o3 = O3Unlearner::new(cfg.clone()).unwrap();
    let forget = corpus.qa(&[0]);
    assert!(o3
        .unlearn(&mut model, "", &forget)
        .unwrap_err()
        .to_string()
        .contains("empty"));
    o3.unlearn(&mut model, "x", &forget).unwrap();
    let e = o3.unlearn(&mut model, "x", &forget).unwrap_err();
    assert!(e.to_string().contains("already served"));
    let few = forget.subset(&[0, 1, 2]).unwrap();
    let e = o3.unlearn(&mut model, "few", &few).unwrap_err();
    assert!(e.to_string().contains("distinct forget queries"), "{e}");
    // A failed request leaves no adapter behind.
    assert_eq!(model.adapter_names(), vec!["o3-0"]);
    let docs = TextSet::new(vec![
        crate::data::TextExample::document(vec![1, 6, 7]).unwrap()
    ]);
    assert!(o3
        .unlearn(&mut model, "docs", &docs)
        .unwrap_err()
        .to_string()
        .contains("prompt"));
    let bad = |f: &dyn Fn(&mut O3Config)| {
        let mut c = cfg.clone();
        f(&mut c);
        O3Unlearner::new(c).unwrap_err().to_string()
    };
    assert!(bad(&|c| c.detector.folds = 1).contains("folds"));
    assert!(bad(&|c| c.detector.shrinkage = 0.0).contains("shrinkage"));
    assert!(bad(&|c| c.adapter.rank = 0).contains("rank"));
    assert!(bad(&|c| c.orthogonal_weight = -1.0).contains("orthogonal_weight"));
    assert!(bad(&|c| c.target = Relabel::Refusal { answer: vec![] }).contains("refusal"));
    let parsed: Result<O3Config, _> = serde_json::from_value(serde_json::to_value(&cfg).unwrap());
    assert_eq!(parsed.unwrap(), cfg);
}

/// Every trainable parameter O3 creates (each A and B matrix of each
/// adapter) receives a non-zero gradient from the O3 objective (CE on the
/// relabelled forget set + orthogonality penalty); frozen earlier adapters
/// and the base weights receive none.
#[test]
fn every_adapter_parameter_gets_a_gradient() {
    use crate::lm::{Objective, StepInput};
    use crate::o3::O3Objective;

    let (corpus, mut model) = tiny_decoder();
    let cfg = config(corpus.refusal(), Calibration::o3());
    let mut o3 = O3Unlearner::new(cfg.clone()).unwrap();
    for d in 0..2 {
        o3.unlearn(&mut model, &format!("request-{d}"), &corpus.qa(&[d]))
            .unwrap();
    }
    let base_vars = model.named_vars();
    for t in 0..2 {
        let targets = cfg.target.apply(&corpus.qa(&[t]), 0).unwrap();
        let idx: Vec<usize> = (0..targets.len()).collect();
        let batch = targets.batch(&idx, model.device()).unwrap();
        let reqs = o3.requests();
        let current = &reqs[t].adapter;
        let previous: Vec<_> = reqs[..t].iter().map(|r| &r.adapter).collect();
        current.set_gate(1.0).unwrap();
        current.set_trainable(true);
        let was = model.is_base_trainable();
        model.set_base_trainable(false);
        let objective = O3Objective {
            adapter: current,
            previous: previous.clone(),
            lambda: 0.1,
        };
        let input = StepInput {
            forget: &batch,
            forget_idx: &idx,
            retain: None,
        };
        let grads = objective.loss(&model, &input).unwrap().backward().unwrap();
        let vars = current.vars();
        assert_eq!(
            vars.len(),
            2 * current.sites().len(),
            "one A and one B per site"
        );
        for (i, v) in vars.iter().enumerate() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("adapter {t} var {i}: no gradient"));
            let norm = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "adapter {t} var {i}: gradient norm {norm}"
            );
        }
        for p in &previous {
            for v in p.vars() {
                assert!(
                    grads.get(v.as_tensor()).is_none(),
                    "a frozen earlier adapter got a gradient"
                );
            }
        }
        for (name, v) in &base_vars {
            assert!(
                grads.get(v.as_tensor()).is_none(),
                "base weight {name} got a gradient"
            );
        }
        model.set_base_trainable(was);
        current.set_trainable(false);
        current.set_gate(0.0).unwrap();
    }
}
