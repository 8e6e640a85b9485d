//! The reproduction statement is computed from the numbers.

use std::collections::BTreeMap;

use crate::metrics::Stat;
use crate::report::{finding, Aggregate};
use crate::tests::tiny_config;

fn agg(k: usize, model: &str, forgetting: f64, recovery: f64) -> Aggregate {
    let st = |v: f64| Stat {
        mean: v,
        std: 0.0,
        n: 3,
    };
    Aggregate {
        k,
        model: model.into(),
        metrics: BTreeMap::from([
            ("forgetting".to_string(), st(forgetting)),
            ("recovery".to_string(), st(recovery)),
            ("other_rate".to_string(), st(0.5)),
        ]),
    }
}

fn conf() -> Stat {
    Stat {
        mean: 0.8,
        std: 0.1,
        n: 10,
    }
}

#[test]
fn restor_pattern_reproduces() {
    let cfg = tiny_config(); // ks [0, 2], forgetters GA KL, restorer NPO
    let aggs = vec![
        agg(0, "GA", 0.9, 0.05),
        agg(2, "GA", 0.95, 0.0),
        agg(0, "KL", 0.8, 0.1),
        agg(2, "KL", 0.7, 0.1),
        agg(0, "NPO", 0.9, 0.7),
        agg(2, "NPO", 0.9, 0.4),
    ];
    let f = finding(&cfg, &aggs, &[], &conf());
    assert_eq!(f.verdict, "reproduces");
    assert!(f.claims.iter().all(|c| c.holds == Some(true)));
    assert!(f.diagnosis.is_empty());
    assert!(
        f.claims[2].evidence.contains("0.55"),
        "{}",
        f.claims[2].evidence
    );
}

#[test]
fn a_restoring_ga_and_a_flat_npo_do_not_reproduce_and_are_explained() {
    let cfg = tiny_config();
    let aggs = vec![
        agg(0, "GA", 0.9, 0.6),
        agg(2, "GA", 0.9, 0.6),
        agg(0, "KL", 0.2, 0.0),
        agg(2, "KL", 0.2, 0.0),
        agg(0, "NPO", 0.9, 0.1),
        agg(2, "NPO", 0.9, 0.3),
    ];
    let f = finding(&cfg, &aggs, &[], &conf());
    assert_eq!(f.verdict, "does not reproduce");
    assert!(f.claims.iter().all(|c| c.holds == Some(false)));
    assert!(
        f.diagnosis.iter().any(|d| d.contains("0.800")),
        "{:?}",
        f.diagnosis
    );
}

#[test]
fn mixed_evidence_is_partial_and_single_k_is_not_testable() {
    let mut cfg = tiny_config();
    cfg.ks = vec![0];
    let aggs = vec![
        agg(0, "GA", 0.9, 0.0),
        agg(0, "KL", 0.9, 0.0),
        agg(0, "NPO", 0.5, 0.05),
    ];
    let f = finding(&cfg, &aggs, &[], &conf());
    assert_eq!(f.verdict, "partially reproduces");
    assert_eq!(f.claims[3].holds, None);
}
