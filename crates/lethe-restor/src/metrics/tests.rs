//! Metric definitions on hand-made cases.

use std::collections::BTreeMap;

use crate::eval::{ModelEval, Outcome, TargetOutcome};
use crate::metrics::{
    accuracy_on, bucket, bucket_labels, confidences, forgetting, rates, recovery, summarize, Stat,
};

fn target(fact: usize, outcome: Outcome, lp_gold: f64) -> TargetOutcome {
    TargetOutcome {
        fact,
        outcome,
        lp_gold,
        lp_corrupted: -2.0,
        lp_random: -4.0,
        gold_top: outcome == Outcome::Gold,
    }
}

fn eval() -> ModelEval {
    ModelEval {
        targets: vec![
            target(1, Outcome::Gold, -0.1),
            target(2, Outcome::Corrupted, -3.0),
            target(3, Outcome::Corrupted, -1.0),
            target(4, Outcome::Other, f64::NEG_INFINITY),
        ],
        locality_correct: 3,
        locality_total: 4,
        other_correct: BTreeMap::from([(10, true), (11, false), (12, true), (13, true)]),
        heldout_perplexity: 2.5,
    }
}

#[test]
fn recovery_and_forgetting_follow_their_definitions() {
    // Clean 0.9, corrupted 0.1, unlearned 0.5: half the gap recovered.
    assert!((recovery(0.9, 0.1, 0.5).unwrap() - 0.5).abs() < 1e-12);
    assert!((recovery(0.9, 0.1, 0.9).unwrap() - 1.0).abs() < 1e-12);
    assert!((recovery(0.9, 0.1, 0.0).unwrap() + 0.125).abs() < 1e-12);
    assert_eq!(
        recovery(0.5, 0.5, 0.7),
        None,
        "no corruption effect: undefined"
    );
    assert!((forgetting(0.8, 0.2).unwrap() - 0.75).abs() < 1e-12);
    assert!((forgetting(0.8, 0.8).unwrap()).abs() < 1e-12);
    assert_eq!(forgetting(0.0, 0.0), None);
}

#[test]
fn rates_and_summary_on_a_hand_made_model() {
    let e = eval();
    let (acc, corr, other, n) = rates(&e, None);
    assert_eq!(n, 4);
    assert!((acc - 0.25).abs() < 1e-12);
    assert!((corr - 0.5).abs() < 1e-12);
    assert!((other - 0.25).abs() < 1e-12);
    let (acc, corr, _, n) = rates(&e, Some(&[2, 3]));
    assert_eq!((acc, corr, n), (0.0, 1.0, 2));
    assert_eq!(accuracy_on(&e, &[10, 11]), Some(0.5));
    assert_eq!(accuracy_on(&e, &[99]), None);
    let s = summarize(&e, &[10, 11, 12, 13], &[11, 12]);
    assert!((s.locality - 0.75).abs() < 1e-12);
    assert!((s.nontarget_accuracy - 0.75).abs() < 1e-12);
    assert_eq!(s.mixed_accuracy, Some(0.5));
    // The -inf gold log-prob is skipped in the mean.
    assert!((s.lp_gold - (-0.1 - 3.0 - 1.0) / 3.0).abs() < 1e-12);
    assert!((s.gold_top_rate - 0.25).abs() < 1e-12);
    assert_eq!(summarize(&e, &[10], &[]).mixed_accuracy, None);
}

#[test]
fn stats_buckets_and_confidence() {
    let s = Stat::of(&[1.0, 2.0, 3.0]).unwrap();
    assert!((s.mean - 2.0).abs() < 1e-12);
    assert!((s.std - 1.0).abs() < 1e-12);
    assert_eq!(s.n, 3);
    assert_eq!(Stat::of(&[4.0]).unwrap().std, 0.0);
    assert!(Stat::of(&[]).is_none());
    let edges = [0.5, 0.9];
    assert_eq!(bucket(0.1, &edges), 0);
    assert_eq!(bucket(0.5, &edges), 1);
    assert_eq!(bucket(0.95, &edges), 2);
    assert_eq!(bucket_labels(&edges), vec!["< 0.5", "0.5-0.9", ">= 0.9"]);
    let c = confidences(&eval());
    assert!((c[&1] - (-0.1f64).exp()).abs() < 1e-12);
    assert_eq!(c[&4], 0.0);
}
