//! Metrics on hand-made inputs equal hand-computed values.

use super::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn accuracy_counts_matches() {
    assert!(close(accuracy(&[1, 2, 3], &[1, 0, 3]).unwrap(), 2.0 / 3.0));
    assert_eq!(accuracy(&[], &[]).unwrap(), 0.0);
    assert!(accuracy(&[1], &[1, 2]).is_err());
}

#[test]
fn auroc_equals_pairwise_ranking_probability() {
    // Pairs: 0.9>0.1, 0.9>0.85, 0.8>0.1, 0.8<0.85 -> 3/4.
    assert!(close(auroc(&[0.9, 0.8], &[0.1, 0.85]).unwrap(), 0.75));
    // Ties count one half: (0.5 + 1 + 1) / 3.
    assert!(close(auroc(&[1.0, 2.0, 3.0], &[1.0]).unwrap(), 2.5 / 3.0));
    assert!(close(auroc(&[0.5], &[0.5]).unwrap(), 0.5));
    assert!(close(auroc(&[2.0, 3.0], &[0.0, 1.0]).unwrap(), 1.0));
    assert!(close(auroc(&[0.0], &[1.0, 2.0]).unwrap(), 0.0));
    assert!(auroc(&[], &[1.0]).is_err());
    assert!(auroc(&[f64::NAN], &[1.0]).is_err());
}

#[test]
fn average_gap_is_mean_absolute_difference() {
    let m = SalunMetrics {
        ua: 10.0,
        ra: 90.0,
        ta: 80.0,
        mia: 20.0,
    };
    let r = SalunMetrics {
        ua: 5.0,
        ra: 100.0,
        ta: 82.0,
        mia: 30.0,
    };
    // (5 + 10 + 2 + 10) / 4
    assert!(close(m.average_gap(&r), 6.75));
    assert!(close(r.average_gap(&r), 0.0));
    assert!(close(m.average_gap(&r), r.average_gap(&m)));
}

#[test]
fn mean_and_sample_std() {
    let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
    assert!(close(m, 2.5));
    assert!(close(s, (5.0f64 / 3.0).sqrt()));
    assert_eq!(mean_std(&[7.0]), (7.0, 0.0));
    assert_eq!(mean_std(&[]), (0.0, 0.0));
}

#[test]
fn mia_score_is_the_log_odds_of_the_true_label() {
    // Two classes: log-odds = z_y - z_other.
    assert!((mia_score(&[2.0, 0.5], 0).unwrap() - 1.5).abs() < 1e-9);
    assert!((mia_score(&[2.0, 0.5], 1).unwrap() + 1.5).abs() < 1e-9);
    // Three classes: p = softmax, log-odds = ln p_y - ln(1 - p_y).
    let z = [1.0f32, 2.0, 3.0];
    let e: Vec<f64> = z.iter().map(|&v| f64::from(v).exp()).collect();
    let p0 = e[0] / e.iter().sum::<f64>();
    assert!((mia_score(&z, 0).unwrap() - (p0.ln() - (1.0 - p0).ln())).abs() < 1e-9);
    // No saturation where f32 probabilities would be exactly 1.
    let a = mia_score(&[60.0, 0.0], 0).unwrap();
    let b = mia_score(&[80.0, 0.0], 0).unwrap();
    assert!(b > a && (a - 60.0).abs() < 1e-9);
    assert!(mia_score(&[1.0], 0).is_err());
    assert!(mia_score(&[1.0, 2.0], 2).is_err());
    assert!(mia_score(&[f32::NAN, 2.0], 0).is_err());
}

#[test]
fn mia_attack_separates_members_and_measures_efficacy() {
    // Members: confident; non-members: unsure.
    let members: Vec<f64> = (0..20).map(|i| 5.0 + 0.05 * i as f64).collect();
    let nonmembers: Vec<f64> = (0..20).map(|i| -1.0 + 0.05 * i as f64).collect();
    let attack = MiaAttack::fit(&members, &nonmembers).unwrap();
    assert!(close(attack.train_accuracy, 1.0));
    assert!(
        attack.threshold > -0.05 && attack.threshold <= 5.0,
        "{}",
        attack.threshold
    );
    assert!(attack.is_member(5.5));
    assert!(!attack.is_member(-0.5));
    // Forget set half member-like, half not: efficacy 50.
    let forget = [5.2, -0.8, 6.0, -0.2];
    assert!(close(attack.efficacy(&forget), 50.0));
    assert!(close(attack.efficacy(&forget[1..2]), 100.0));
    assert!(close(attack.efficacy(&[]), 0.0));
    // Far below everything is always a non-member.
    assert!(!attack.is_member(-1e6));
    assert!(MiaAttack::fit(&[], &nonmembers).is_err());
    assert!(MiaAttack::fit(&[f64::NAN], &nonmembers).is_err());
    assert_eq!(attack, MiaAttack::fit(&members, &nonmembers).unwrap());
}

#[test]
fn mia_threshold_maximises_balanced_accuracy() {
    // Members {3, 4, 5}, non-members {1, 2, 3.5}: threshold 4 gets 2/3 of
    // members and all non-members (BA 5/6); threshold 3 gets all members
    // and 2/3 of non-members (BA 5/6). The tie takes the middle candidate.
    let attack = MiaAttack::fit(&[3.0, 4.0, 5.0], &[1.0, 2.0, 3.5]).unwrap();
    assert!(close(attack.train_accuracy, 5.0 / 6.0));
    assert!(attack.threshold == 3.0 || attack.threshold == 4.0);
    // Unbalanced sizes are balanced: 1 member at 10, 9 non-members at 0.
    let attack = MiaAttack::fit(&[10.0], &[0.0; 9]).unwrap();
    assert!(close(attack.train_accuracy, 1.0));
    assert!(close(attack.efficacy(&[0.0, 10.0]), 50.0));
}

#[test]
fn mia_attack_on_identical_distributions_is_chance() {
    let same: Vec<f64> = (0..40).map(|i| (i % 7) as f64).collect();
    let attack = MiaAttack::fit(&same, &same).unwrap();
    assert!(
        close(attack.train_accuracy, 0.5),
        "{}",
        attack.train_accuracy
    );
}

#[test]
fn normal_cdf_and_sigmoid_known_values() {
    assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
    assert!((normal_cdf(1.959_963_985) - 0.975).abs() < 1e-6);
    assert!((normal_cdf(-1.0) - 0.158_655_254).abs() < 1e-6);
    assert!(close(sigmoid(0.0), 0.5));
    assert!((sigmoid(-2.0) - 0.119_202_922).abs() < 1e-8);
    assert!(sigmoid(-1000.0) >= 0.0 && sigmoid(1000.0) <= 1.0);
}

#[test]
fn truth_ratio_aggregates() {
    // min(R, 1/R): 0.5, 0.5, 1.
    assert!(close(
        truth_ratio_forget_score(&[0.5, 2.0, 1.0]).unwrap(),
        2.0 / 3.0
    ));
    // max(0, 1 - R): 0.75, 0.
    assert!(close(
        truth_ratio_retain_score(&[0.25, 2.0]).unwrap(),
        0.375
    ));
    assert!(truth_ratio_forget_score(&[]).is_err());
    assert!(truth_ratio_forget_score(&[0.0]).is_err());
}

/// A deterministic stream of values in `[0, 1)` (an LCG), for test data.
fn uniform(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

/// Checks the SVC's dual solution against the KKT conditions of the
/// C-SVC problem on the training data (distinct features): `sum y_i a_i =
/// 0`, `0 < a_i <= C` for support vectors, `y f(x) >= 1` off the support,
/// `y f(x) = 1` on free support vectors, `y f(x) <= 1` at the bound.
fn check_kkt(svc: &RbfSvc, pos: &[f64], neg: &[f64], c: f64) {
    let tol = 5e-3;
    assert!(
        svc.dual_coef().iter().sum::<f64>().abs() < 1e-9,
        "y^T a != 0"
    );
    for (x, y) in pos
        .iter()
        .map(|&x| (x, 1.0))
        .chain(neg.iter().map(|&x| (x, -1.0)))
    {
        let yf = y * svc.decision(x);
        match svc.support_vectors().iter().position(|&s| s == x) {
            None => assert!(yf >= 1.0 - tol, "x {x}: y f = {yf} off the support"),
            Some(k) => {
                let a = svc.dual_coef()[k] * y;
                assert!(a > 0.0 && a <= c + 1e-12, "x {x}: alpha {a}");
                if a < c - 1e-9 {
                    assert!((yf - 1.0).abs() <= tol, "x {x}: free SV with y f = {yf}");
                } else {
                    assert!(yf <= 1.0 + tol, "x {x}: bounded SV with y f = {yf}");
                }
            }
        }
    }
}

#[test]
fn rbf_svc_solution_satisfies_the_kkt_conditions() {
    // Separable.
    let pos: Vec<f64> = uniform(1, 30).iter().map(|u| 0.8 + 0.2 * u).collect();
    let neg: Vec<f64> = uniform(2, 30).iter().map(|u| 0.3 * u).collect();
    let svc = RbfSvc::fit(&pos, &neg, 3.0, 1.0).unwrap();
    check_kkt(&svc, &pos, &neg, 3.0);
    assert!(pos.iter().all(|&x| svc.predict(x)) && neg.iter().all(|&x| !svc.predict(x)));
    // Overlapping classes (many bounded support vectors), a sharper kernel.
    let pos: Vec<f64> = uniform(3, 80).iter().map(|u| 0.4 + 0.6 * u).collect();
    let neg: Vec<f64> = uniform(4, 80).iter().map(|u| 0.7 * u).collect();
    for (c, gamma) in [(3.0, 1.0), (1.0, 20.0)] {
        let svc = RbfSvc::fit(&pos, &neg, c, gamma).unwrap();
        check_kkt(&svc, &pos, &neg, c);
        assert!(svc.iterations() > 0);
        // The majority region of each class is predicted as that class.
        assert!(svc.predict(0.95) && !svc.predict(0.05));
    }
    assert!(RbfSvc::fit(&[], &neg, 3.0, 1.0).is_err());
    assert!(RbfSvc::fit(&pos, &neg, 0.0, 1.0).is_err());
    assert!(RbfSvc::fit(&[f64::NAN], &neg, 3.0, 1.0).is_err());
}

#[test]
fn svc_mia_counts_only_clearly_unconfident_forget_examples() {
    // Members: near-certain; non-members: mostly near-certain, a tail of
    // unsure ones (a model with 100% train and ~90% test accuracy).
    let members: Vec<f64> = uniform(5, 100).iter().map(|u| 1.0 - 1e-4 * u).collect();
    let mut nonmembers: Vec<f64> = uniform(6, 85).iter().map(|u| 1.0 - 1e-3 * u).collect();
    nonmembers.extend(uniform(7, 15).iter().map(|u| 0.1 + 0.5 * u));
    let attack = SvcMiaAttack::fit(&members, &nonmembers).unwrap();
    // Near-certain forget examples are members however their last digits
    // differ; clearly unsure ones are not.
    assert!(attack.is_member(0.99999) && attack.is_member(0.9999999));
    assert!(!attack.is_member(0.3) && !attack.is_member(0.0));
    let forget = [0.999_99, 0.999, 0.2, 0.05];
    assert!(close(attack.efficacy(&forget), 50.0));
    assert!(close(attack.efficacy(&[]), 0.0));
    let p = mia_confidence(&[2.0, 0.0], 0).unwrap();
    assert!((p - 1.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-12);
    assert!((mia_confidence(&[0.0, 0.0, 0.0], 1).unwrap() - 1.0 / 3.0).abs() < 1e-12);
}
