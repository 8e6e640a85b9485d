//! Budgets, determinism, resume, the EM/SALM relation and parameter errors.

use super::mask::{feasible_saliency, mask_size, top_k};
use super::*;
use crate::model::Arch;
use crate::sources::{lesions, LesionSpec};

/// A tiny lesion set (16x16, `per_class` per class).
fn tiny(per_class: usize) -> Dataset {
    lesions(&LesionSpec {
        seed: 5,
        per_class,
        size: 16,
        texture: 0.04,
    })
    .unwrap()
}

/// Fast parameters: small surrogate, few steps and rounds.
fn fast(mut p: ProtectParams) -> ProtectParams {
    p.surrogate = Arch::Cnn {
        channels: vec![8, 16],
        batch_norm: true,
    };
    p.pgd_steps = 3;
    p.pgd_batch = 16;
    p.train_steps_per_round = 2;
    p.train_batch = 16;
    p.stop = StopRule {
        min_rounds: 2,
        max_rounds: 2,
        train_accuracy: None,
        loss_below: None,
        patience: 1,
        shortcut_accuracy: None,
    };
    p
}

fn quiet() -> RunControl {
    RunControl::default()
}

#[test]
fn salm_stays_within_eps_and_rho() {
    let data = tiny(6);
    let eps = 8.0 / 255.0;
    let rho = 0.1;
    let p = fast(ProtectParams::salm(eps, rho));
    let out = protect_dataset(&data, &p, &quiet()).unwrap();
    assert!(out.finished);
    let s = data.shape();
    let k = mask_size(rho, s.pixels());
    let mut any = 0;
    for i in 0..data.len() {
        let (a, b) = (data.image(i), out.protected.image(i));
        let changed = a.iter().zip(b).filter(|(x, y)| x != y).count();
        assert!(changed <= k, "image {i}: {changed} > {k} pixels changed");
        any += changed;
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= eps as f32 + 0.5 / 255.0 + 1e-6);
            assert!((0.0..=1.0).contains(y));
        }
    }
    assert!(
        any > data.len(),
        "SALM changed almost nothing ({any} values)"
    );
    assert!(out.quality.l0_max <= k as f64 / s.pixels() as f64 + 1e-12);
    let masks = out.masks.unwrap();
    for m in masks.chunks(s.pixels()) {
        assert_eq!(m.iter().filter(|&&v| v == 1).count(), k);
    }
}

#[test]
fn em_stays_within_eps_and_changes_most_pixels() {
    let data = tiny(4);
    let eps = 4.0 / 255.0;
    let out = protect_dataset(&data, &fast(ProtectParams::em(eps)), &quiet()).unwrap();
    let mut changed = 0;
    for (x, y) in data.pixels().iter().zip(out.protected.pixels()) {
        assert!((x - y).abs() <= eps as f32 + 0.5 / 255.0 + 1e-6);
        changed += usize::from(x != y);
    }
    assert!(changed > data.pixels().len() / 2, "{changed}");
    assert!(out.masks.is_none());
}

#[test]
fn salm_with_rho_one_is_em() {
    let data = tiny(3);
    let em = protect_dataset(&data, &fast(ProtectParams::em(8.0 / 255.0)), &quiet()).unwrap();
    let salm = protect_dataset(
        &data,
        &fast(ProtectParams::salm(8.0 / 255.0, 1.0)),
        &quiet(),
    )
    .unwrap();
    assert_eq!(em.protected.pixels(), salm.protected.pixels());
}

#[test]
fn runs_are_deterministic_per_seed() {
    let data = tiny(3);
    let p = fast(ProtectParams::salm(8.0 / 255.0, 0.2));
    let a = protect_dataset(&data, &p, &quiet()).unwrap();
    let b = protect_dataset(&data, &p, &quiet()).unwrap();
    assert_eq!(a.protected.pixels(), b.protected.pixels());
    assert_eq!(a.masks, b.masks);
    let mut q = p.clone();
    q.seed = 99;
    let c = protect_dataset(&data, &q, &quiet()).unwrap();
    assert_ne!(a.protected.pixels(), c.protected.pixels());
}

#[test]
fn resume_equals_an_uninterrupted_run() {
    let data = tiny(3);
    let mut ensemble = classwise_salm(0.5);
    ensemble.ensemble = vec![Arch::Cnn {
        channels: vec![4, 8, 8],
        batch_norm: false,
    }];
    let mut best_round = fast(ProtectParams::salm(8.0 / 255.0, 0.2));
    best_round.release = Release::BestRound;
    let mut proxy_round = classwise_salm(0.5);
    proxy_round.release = Release::ProxyVictim(tiny_proxy());
    // A restart at round 3, after the second pause.
    let mut restarts = classwise_salm(0.5);
    restarts.restart_every = 2;
    restarts.synthetic_start = Some(SyntheticStart {
        side: 2,
        layout: CodeLayout::Tiled,
    });
    for mut p in [
        fast(ProtectParams::salm(8.0 / 255.0, 0.2)),
        fast(ProtectParams {
            method: Method::Em { classwise: true },
            ..ProtectParams::em(8.0 / 255.0)
        }),
        ensemble,
        best_round,
        proxy_round,
        restarts,
    ] {
        p.stop.min_rounds = 3;
        p.stop.max_rounds = 3;
        let full = protect_dataset(&data, &p, &quiet()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut ctl = RunControl {
            checkpoint_dir: Some(dir.path().to_path_buf()),
            resume: true,
            pause_after_rounds: Some(1),
            ..RunControl::default()
        };
        let first = protect_dataset(&data, &p, &ctl).unwrap();
        assert!(!first.finished);
        assert_eq!(first.rounds.len(), 1);
        let second = protect_dataset(&data, &p, &ctl).unwrap();
        assert_eq!(second.rounds.len(), 2);
        ctl.pause_after_rounds = None;
        let last = protect_dataset(&data, &p, &ctl).unwrap();
        assert!(last.finished);
        assert_eq!(last.rounds.len(), 3);
        assert_eq!(last.protected.pixels(), full.protected.pixels());
        assert_eq!(last.released_round, full.released_round);
        assert_eq!(last.masks, full.masks);
        assert_eq!(last.image_steps, full.image_steps);
        // Accuracies match exactly; losses to the last bits of candle's
        // CPU reductions.
        for (a, b) in last.rounds.iter().zip(&full.rounds) {
            assert_eq!(a.accuracy, b.accuracy);
            assert_eq!(a.proxy_accuracy, b.proxy_accuracy);
            assert!((a.loss - b.loss).abs() <= 1e-9 * b.loss.abs().max(1.0));
        }
    }
}

#[test]
fn a_checkpoint_of_another_run_is_refused() {
    let data = tiny(3);
    let p = fast(ProtectParams::salm(8.0 / 255.0, 0.2));
    let dir = tempfile::tempdir().unwrap();
    let ctl = RunControl {
        checkpoint_dir: Some(dir.path().to_path_buf()),
        resume: true,
        pause_after_rounds: Some(1),
        ..RunControl::default()
    };
    protect_dataset(&data, &p, &ctl).unwrap();
    let mut other = p.clone();
    other.eps = 4.0 / 255.0;
    let err = protect_dataset(&data, &other, &ctl).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    // A damaged state file is reported, not ignored.
    std::fs::write(dir.path().join("current/state.json"), b"{").unwrap();
    let err = protect_dataset(&data, &p, &ctl).unwrap_err();
    assert!(err.to_string().contains("damaged"), "{err}");
}

#[test]
fn cancel_stops_the_run() {
    let data = tiny(2);
    let flag = Arc::new(AtomicBool::new(true));
    let ctl = RunControl {
        cancel: Some(flag),
        ..RunControl::default()
    };
    let err = protect_dataset(&data, &fast(ProtectParams::em(0.03)), &ctl).unwrap_err();
    assert!(matches!(err, Error::Cancelled));
}

#[test]
fn bad_parameters_are_named() {
    let data = tiny(1);
    // Masks kept after round 3, where no refreshed gradient mask exists.
    let frozen = |mask, refresh| ProtectParams {
        freeze_mask_after: 3,
        method: Method::Salm {
            rho: 0.25,
            mask,
            refresh,
            classwise: true,
        },
        ..ProtectParams::em(0.03)
    };
    let cases: Vec<(ProtectParams, &str)> = vec![
        (ProtectParams::em(0.0), "eps"),
        (ProtectParams::em(0.5), "eps"),
        (ProtectParams::em(f64::NAN), "eps"),
        (ProtectParams::salm(0.03, 0.0), "rho"),
        (ProtectParams::salm(0.03, 1.5), "rho"),
        (
            ProtectParams {
                freeze_mask_after: 3,
                ..ProtectParams::em(0.03)
            },
            "freeze_mask_after",
        ),
        (
            frozen(MaskStrategy::Feasible, MaskRefresh::Fixed),
            "freeze_mask_after",
        ),
        (
            frozen(MaskStrategy::Random, MaskRefresh::PerRound),
            "freeze_mask_after",
        ),
        (
            ProtectParams {
                step_size: Some(0.1),
                ..ProtectParams::em(0.03)
            },
            "step size",
        ),
        (
            ProtectParams {
                stop: StopRule {
                    min_rounds: 5,
                    max_rounds: 2,
                    train_accuracy: None,
                    loss_below: None,
                    patience: 1,
                    shortcut_accuracy: None,
                },
                ..ProtectParams::em(0.03)
            },
            "min_rounds",
        ),
        (
            ProtectParams {
                device: "tpu".into(),
                ..ProtectParams::em(0.03)
            },
            "tpu",
        ),
        (
            ProtectParams {
                stop: StopRule {
                    patience: 50,
                    ..StopRule::new(1, 10, Some(0.99), None)
                },
                ..ProtectParams::em(0.03)
            },
            "patience",
        ),
        (
            ProtectParams {
                stop: StopRule {
                    shortcut_accuracy: Some(1.5),
                    ..StopRule::new(1, 10, Some(0.99), None)
                },
                ..ProtectParams::em(0.03)
            },
            "shortcut_accuracy",
        ),
        (
            ProtectParams {
                cross_pairs: 1.0,
                method: Method::Em { classwise: true },
                ..ProtectParams::em(0.03)
            },
            "cross_pairs",
        ),
        (
            ProtectParams {
                cross_pairs: 0.5,
                ..ProtectParams::em(0.03)
            },
            "class-wise",
        ),
        (
            ProtectParams {
                synthetic_start: Some(SyntheticStart {
                    side: 4,
                    layout: CodeLayout::Tiled,
                }),
                ..ProtectParams::em(0.03)
            },
            "synthetic_start",
        ),
        (
            ProtectParams {
                synthetic_start: Some(SyntheticStart {
                    side: 4,
                    layout: CodeLayout::Blocks,
                }),
                random_start: true,
                method: Method::Em { classwise: true },
                ..ProtectParams::em(0.03)
            },
            "random_start",
        ),
        (
            ProtectParams {
                synthetic_start: Some(SyntheticStart {
                    side: 0,
                    layout: CodeLayout::Blocks,
                }),
                method: Method::Em { classwise: true },
                ..ProtectParams::em(0.03)
            },
            "side",
        ),
        (
            ProtectParams {
                ensemble_lr: vec![0.01],
                ..ProtectParams::em(0.03)
            },
            "ensemble_lr",
        ),
        (
            ProtectParams {
                ensemble: vec![Arch::Resnet18 { width: 2 }],
                ensemble_lr: vec![0.0],
                ..ProtectParams::em(0.03)
            },
            "ensemble_lr",
        ),
        (
            ProtectParams {
                pgd_steps: 0,
                ..ProtectParams::em(0.03)
            },
            "synthetic_start",
        ),
        (
            ProtectParams {
                stable_radius: 0.05,
                ..ProtectParams::em(0.03)
            },
            "stable_radius",
        ),
        (
            ProtectParams {
                stable_radius: -0.01,
                ..ProtectParams::em(0.03)
            },
            "stable_radius",
        ),
        (
            ProtectParams {
                stable_radius: f64::NAN,
                ..ProtectParams::em(0.03)
            },
            "stable_radius",
        ),
        (
            ProtectParams {
                stable_radius: 0.01,
                pgd_steps: 0,
                train_steps_per_round: 0,
                synthetic_start: Some(SyntheticStart {
                    side: 1,
                    layout: CodeLayout::Mask,
                }),
                method: Method::Em { classwise: true },
                ..ProtectParams::em(0.03)
            },
            "model-free",
        ),
    ];
    for (p, needle) in cases {
        let err = protect_dataset(&data, &p, &quiet())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
}

/// A round log of `(accuracy, loss, shortcut accuracy)` per round.
fn log_of(rounds: &[(f64, f64, Option<f64>)]) -> Vec<RoundLog> {
    rounds
        .iter()
        .enumerate()
        .map(|(i, &(accuracy, loss, shortcut_accuracy))| RoundLog {
            round: i + 1,
            train_loss: loss,
            accuracy,
            loss,
            saturated: 0.0,
            shortcut_accuracy,
            proxy_accuracy: None,
            mask_changed: None,
            seconds: 0.0,
        })
        .collect()
}

#[test]
fn stop_rule_waits_for_min_rounds() {
    let rule = StopRule::new(3, 5, Some(0.99), Some(1e-3));
    let stop = |r: &[(f64, f64, Option<f64>)]| stop_reason(&rule, &log_of(r));
    assert_eq!(stop(&[]), None);
    assert_eq!(stop(&[(1.0, 0.0, None)]), None);
    assert_eq!(
        stop(&[(0.5, 0.5, None), (0.5, 0.5, None), (1.0, 0.5, None)]),
        Some(StopReason::TrainAccuracy)
    );
    assert_eq!(
        stop(&[(0.5, 0.5, None), (0.5, 0.5, None), (0.5, 1e-4, None)]),
        Some(StopReason::LossThreshold)
    );
    assert_eq!(stop(&[(0.5, 0.5, None); 4]), None);
    assert_eq!(stop(&[(0.5, 0.5, None); 5]), Some(StopReason::MaxRounds));
}

#[test]
fn stop_rule_patience_needs_consecutive_rounds() {
    let rule = StopRule {
        patience: 3,
        ..StopRule::new(2, 10, Some(0.99), None)
    };
    let stop = |r: &[(f64, f64, Option<f64>)]| stop_reason(&rule, &log_of(r));
    let hit = (1.0, 0.1, None);
    let miss = (0.9, 0.1, None);
    // Two rounds past min_rounds at target: not yet.
    assert_eq!(stop(&[miss, hit, hit]), None);
    // Interrupted streak: the count starts again.
    assert_eq!(stop(&[hit, hit, miss, hit, hit]), None);
    assert_eq!(
        stop(&[hit, hit, miss, hit, hit, hit]),
        Some(StopReason::TrainAccuracy)
    );
    // max_rounds still wins over an unfinished streak.
    let mut r = vec![miss; 9];
    r.push(hit);
    assert_eq!(stop(&r), Some(StopReason::MaxRounds));
    // patience 0 is read as 1.
    let rule0 = StopRule {
        patience: 0,
        ..StopRule::new(1, 10, Some(0.99), None)
    };
    assert_eq!(
        stop_reason(&rule0, &log_of(&[hit])),
        Some(StopReason::TrainAccuracy)
    );
}

#[test]
fn stop_rule_shortcut_condition_blocks_accuracy_and_loss() {
    let rule = StopRule {
        shortcut_accuracy: Some(0.9),
        ..StopRule::new(1, 10, Some(0.99), Some(1e-3))
    };
    let stop = |r: &[(f64, f64, Option<f64>)]| stop_reason(&rule, &log_of(r));
    // Fits the protected images but the noise does not decide the label.
    assert_eq!(stop(&[(1.0, 1e-5, Some(0.3))]), None);
    // Not measured: never counts.
    assert_eq!(stop(&[(1.0, 1e-5, None)]), None);
    assert_eq!(
        stop(&[(1.0, 1e-5, Some(0.95))]),
        Some(StopReason::TrainAccuracy)
    );
    assert_eq!(
        stop(&[(0.5, 1e-5, Some(0.95))]),
        Some(StopReason::LossThreshold)
    );
}

#[test]
fn missed_targets_name_what_a_round_did_not_reach() {
    let rule = StopRule {
        shortcut_accuracy: Some(0.9),
        ..StopRule::new(1, 10, Some(0.99), Some(1e-3))
    };
    let missed = |r: (f64, f64, Option<f64>)| missed_targets(&rule, &log_of(&[r])[0]);
    // A round that would stop the run misses nothing; accuracy or loss
    // alone is a fit, as for stopping.
    assert!(missed((1.0, 0.5, Some(0.95))).is_empty());
    assert!(missed((0.5, 1e-4, Some(0.95))).is_empty());
    // The headline's collapsed final round: both targets missed.
    let m = missed((0.48, 2.03, Some(0.44)));
    assert_eq!(m.len(), 3, "{m:?}");
    assert!(m[0].contains("shortcut accuracy 0.44 < 0.90"), "{m:?}");
    assert!(m[1].contains("surrogate accuracy 0.480 < 0.99"), "{m:?}");
    assert!(m[2].contains("surrogate loss"), "{m:?}");
    // A fit without the shortcut, and a shortcut never measured.
    assert_eq!(missed((1.0, 1e-5, Some(0.3))).len(), 1);
    assert!(missed((1.0, 1e-5, None))[0].contains("not measured"));
    // A rule without targets (stops at max_rounds only) misses nothing.
    let none = StopRule::new(1, 3, None, None);
    assert!(missed_targets(&none, &log_of(&[(0.1, 3.0, Some(0.1))])[0]).is_empty());
}

#[test]
fn stop_rule_fields_default_in_json() {
    let rule: StopRule = serde_json::from_str(
        r#"{"min_rounds": 2, "max_rounds": 4, "train_accuracy": 0.99, "loss_below": null}"#,
    )
    .unwrap();
    assert_eq!(rule, StopRule::new(2, 4, Some(0.99), None));
}

#[test]
fn feasible_saliency_ignores_steps_the_box_clips() {
    let s = ImageShape {
        channels: 1,
        height: 1,
        width: 4,
    };
    // Black pixels: darkening (g > 0) is impossible, brightening is not.
    let x = [0.0, 0.0, 0.5, 1.0];
    let g = [5.0, -1.0, 0.1, -5.0];
    let sc = feasible_saliency(&x, &g, s, 0.03);
    assert_eq!(sc[0], 0.0);
    assert!((sc[1] - 0.03).abs() < 1e-7);
    assert!((sc[2] - 0.003).abs() < 1e-7);
    assert_eq!(sc[3], 0.0);
    assert_eq!(top_k(&sc, 1), vec![0, 1, 0, 0]);
}

#[test]
fn top_k_is_exact_and_breaks_ties_by_position() {
    let m = top_k(&[1.0, 3.0, 3.0, 3.0, f32::NAN, 2.0], 3);
    assert_eq!(m, vec![0, 1, 1, 1, 0, 0]);
    let m = top_k(&[0.0; 5], 2);
    assert_eq!(m, vec![1, 1, 0, 0, 0]);
    assert_eq!(mask_size(0.1, 64), 6);
    assert_eq!(mask_size(1e-9, 64), 1);
}

#[test]
fn the_mask_never_exceeds_rho() {
    // round(3.5) would be 4 of 35 pixels, 11.4 %.
    assert_eq!(mask_size(0.1, 35), 3);
    assert_eq!(mask_size(0.25, 1024), 256);
    assert_eq!(mask_size(0.1, 10), 1);
    assert!(super::mask::check_mask_size(0.1, 10).is_ok());
    let err = super::mask::check_mask_size(0.1, 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("allows no pixel"), "{err}");
    // A dataset whose images are too small for rho is refused up front.
    let data = tiny(2);
    let pixels = data.shape().pixels();
    let p = fast(ProtectParams::salm(8.0 / 255.0, 0.5 / pixels as f64));
    let err = protect_dataset(&data, &p, &RunControl::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("allows no pixel"), "{err}");
    assert!(estimate_dataset(&data, &p).is_err());
}

#[test]
fn estimate_gives_positive_times() {
    let data = tiny(2);
    let p = fast(ProtectParams::salm(8.0 / 255.0, 0.1));
    let e = estimate_dataset(&data, &p).unwrap();
    assert_eq!(e.images, 8);
    assert_eq!(e.image_steps_per_round, 24);
    assert!(e.image_steps_per_second > 0.0);
    assert!(e.max_seconds >= e.min_seconds && e.min_seconds > 0.0);
    // A proxy-victim release adds its training (here 200 epochs of a
    // ResNet, far more than the round itself) to the estimate.
    let mut q = p.clone();
    q.release = Release::ProxyVictim(ProxyVictim {
        epochs: 200,
        ..ProxyVictim::new(Arch::Resnet18 { width: 4 })
    });
    let eq = estimate_dataset(&data, &q).unwrap();
    assert_eq!(eq.image_steps_per_round, e.image_steps_per_round);
    assert!(
        eq.seconds_per_round > 2.0 * e.seconds_per_round,
        "{eq:?} vs {e:?}"
    );
}

/// Class-wise SALM with fast settings.
fn classwise_salm(cross_pairs: f64) -> ProtectParams {
    let mut p = fast(ProtectParams::salm(8.0 / 255.0, 0.25));
    if let Method::Salm { classwise, .. } = &mut p.method {
        *classwise = true;
    }
    p.cross_pairs = cross_pairs;
    p
}

#[test]
fn frozen_masks_stop_changing_and_the_log_counts_the_changes() {
    let data = tiny(3);
    for classwise in [true, false] {
        let mut p = classwise_salm(0.0);
        if let Method::Salm { classwise: c, .. } = &mut p.method {
            *c = classwise;
        }
        p.stop.min_rounds = 4;
        p.stop.max_rounds = 4;
        // Refreshed every round: rounds 2-4 report how many masked pixels
        // are new, the first round (nothing chosen before) none.
        let plain = protect_dataset(&data, &p, &quiet()).unwrap();
        let changed: Vec<Option<f64>> = plain.rounds.iter().map(|r| r.mask_changed).collect();
        assert_eq!(changed[0], None, "classwise {classwise}");
        for c in &changed[1..] {
            assert!(c.is_some_and(|c| (0.0..=1.0).contains(&c)), "{changed:?}");
        }
        // Frozen after round 2: rounds 3-4 keep round 2's masks, so the
        // released masks are those of a run that stopped at round 2.
        let frozen = protect_dataset(
            &data,
            &ProtectParams {
                freeze_mask_after: 2,
                ..p.clone()
            },
            &quiet(),
        )
        .unwrap();
        let changed: Vec<Option<f64>> = frozen.rounds.iter().map(|r| r.mask_changed).collect();
        assert!(
            changed[1].is_some() && changed[2..] == [None, None],
            "{changed:?}"
        );
        let label = ProtectParams {
            freeze_mask_after: 2,
            ..p.clone()
        }
        .label();
        assert!(label.ends_with("PerRound to round 2)"), "{label}");
        let mut two = p.clone();
        two.stop.min_rounds = 2;
        two.stop.max_rounds = 2;
        let at_two = protect_dataset(&data, &two, &quiet()).unwrap();
        assert_eq!(frozen.masks, at_two.masks, "classwise {classwise}");
        // The first two rounds are the plain run's; the noise still moves.
        let key = |r: &RoundLog| (r.accuracy, r.loss, r.shortcut_accuracy, r.mask_changed);
        let firsts = |o: &Protection| o.rounds[..2].iter().map(key).collect::<Vec<_>>();
        assert_eq!(firsts(&frozen), firsts(&plain));
        assert_ne!(frozen.protected.pixels(), at_two.protected.pixels());
        assert!(frozen.quality.linf_max <= p.eps + 1e-6);
    }
}

#[test]
fn shortcut_accuracy_is_logged_every_round() {
    let data = tiny(3);
    let out = protect_dataset(&data, &classwise_salm(0.0), &quiet()).unwrap();
    assert_eq!(out.rounds.len(), 2);
    for r in &out.rounds {
        let a = r.shortcut_accuracy.expect("measured with several classes");
        assert!((0.0..=1.0).contains(&a), "{a}");
    }
    let samplewise = protect_dataset(
        &data,
        &fast(ProtectParams::salm(8.0 / 255.0, 0.25)),
        &quiet(),
    )
    .unwrap();
    assert!(samplewise
        .rounds
        .iter()
        .all(|r| r.shortcut_accuracy.is_some()));
}

#[test]
fn cross_pairs_change_the_noise_but_keep_the_budgets() {
    let data = tiny(4);
    let eps = 8.0 / 255.0;
    let plain = protect_dataset(&data, &classwise_salm(0.0), &quiet()).unwrap();
    let cross = protect_dataset(&data, &classwise_salm(0.5), &quiet()).unwrap();
    let again = protect_dataset(&data, &classwise_salm(0.5), &quiet()).unwrap();
    assert_ne!(plain.protected.pixels(), cross.protected.pixels());
    assert_eq!(cross.protected.pixels(), again.protected.pixels());
    let hw = data.shape().pixels();
    let k = mask_size(0.25, hw);
    let masks = cross.masks.as_ref().unwrap();
    for (i, (a, b)) in data
        .pixels()
        .chunks(hw)
        .zip(cross.protected.pixels().chunks(hw))
        .enumerate()
    {
        let m = &masks[i * hw..(i + 1) * hw];
        assert_eq!(m.iter().filter(|&&x| x == 1).count(), k);
        for (q, (x, y)) in a.iter().zip(b).enumerate() {
            // Released on the 8-bit grid: within eps plus half a level.
            assert!((x - y).abs() <= eps as f32 + 0.5 / 255.0 + 1e-6);
            if m[q] == 0 {
                assert!(
                    (x - y).abs() <= 0.5 / 255.0 + 1e-6,
                    "moved outside the mask"
                );
            }
        }
    }
}

#[test]
fn cross_pairs_make_the_noise_decide_the_label() {
    // With cross pairs the surrogate is trained to read the noise whatever
    // the image, so the noise of another class flips most predictions; the
    // plain min-min run does not ask for this.
    let data = tiny(8);
    let mut plain = classwise_salm(0.0);
    plain.stop = StopRule::new(12, 12, None, None);
    plain.train_steps_per_round = 15;
    plain.sgd.lr = 0.02;
    let mut cross = plain.clone();
    cross.cross_pairs = 0.5;
    let a = protect_dataset(&data, &plain, &quiet()).unwrap();
    let b = protect_dataset(&data, &cross, &quiet()).unwrap();
    let last = |p: &Protection| p.rounds.last().unwrap().shortcut_accuracy.unwrap();
    assert!(
        last(&b) >= last(&a) + 0.3 && last(&b) >= 0.6,
        "shortcut accuracy plain {} cross {}",
        last(&a),
        last(&b)
    );
}

#[test]
fn an_ensemble_shapes_the_noise_within_the_budgets() {
    let data = tiny(4);
    let eps = 8.0 / 255.0;
    let single = classwise_salm(0.5);
    let mut ens = single.clone();
    ens.ensemble = vec![Arch::Resnet18 { width: 2 }];
    let a = protect_dataset(&data, &single, &quiet()).unwrap();
    let b = protect_dataset(&data, &ens, &quiet()).unwrap();
    assert_ne!(a.protected.pixels(), b.protected.pixels());
    assert!(b.quality.linf_max <= eps + 0.5 / 255.0 + 1e-6);
    assert!(b.quality.l0_mean <= 0.25 + 1e-6);
    assert_eq!(b.rounds.len(), 2);
    let e = estimate_dataset(&data, &ens).unwrap();
    assert!(e.seconds_per_round > 0.0 && e.max_seconds >= e.min_seconds);
    let mut bad = ens.clone();
    bad.ensemble = vec![Arch::Resnet18 { width: 2 }; 8];
    let err = protect_dataset(&data, &bad, &quiet())
        .unwrap_err()
        .to_string();
    assert!(err.contains("ensemble"), "{err}");
}

#[test]
fn stable_crafting_changes_the_noise_not_the_budgets() {
    let data = tiny(4);
    let eps = 8.0 / 255.0;
    let plain = classwise_salm(0.5);
    let mut stable = plain.clone();
    stable.stable_radius = 4.0 / 255.0;
    assert!(
        stable.label().contains("stable=4.0/255"),
        "{}",
        stable.label()
    );
    let a = protect_dataset(&data, &plain, &quiet()).unwrap();
    let b = protect_dataset(&data, &stable, &quiet()).unwrap();
    let again = protect_dataset(&data, &stable, &quiet()).unwrap();
    assert_ne!(a.protected.pixels(), b.protected.pixels());
    assert_eq!(b.protected.pixels(), again.protected.pixels());
    // The jitter is a crafting device: the release keeps SALM's budgets.
    assert!(b.quality.linf_max <= eps + 0.5 / 255.0 + 1e-6);
    assert!(b.quality.l0_mean <= 0.25 + 1e-6);
    // Sample-wise EM takes it too.
    let mut em = fast(ProtectParams::em(eps));
    let plain_em = protect_dataset(&data, &em, &quiet()).unwrap();
    em.stable_radius = 2.0 / 255.0;
    let stable_em = protect_dataset(&data, &em, &quiet()).unwrap();
    assert_ne!(plain_em.protected.pixels(), stable_em.protected.pixels());
    assert!(stable_em.quality.linf_max <= eps + 0.5 / 255.0 + 1e-6);
}

#[test]
fn jitter_stays_in_the_box_and_the_radius() {
    let mut rng = StdRng::seed_from_u64(3);
    let orig: Vec<f32> = (0..4000).map(|i| (i % 5) as f32 / 4.0).collect();
    let mut px = orig.clone();
    jitter(&mut px, 0.0, &mut rng);
    assert_eq!(px, orig, "radius 0 is a no-op");
    let r = 4.0 / 255.0;
    jitter(&mut px, r, &mut rng);
    let mut moved = 0;
    for (a, b) in orig.iter().zip(&px) {
        assert!((0.0..=1.0).contains(b));
        assert!((a - b).abs() <= r as f32 + 1e-6);
        moved += usize::from(a != b);
    }
    // Values at 0 and 1 move only inwards; the rest move almost surely.
    assert!(moved > 2400, "{moved}");
    let mean: f32 = orig.iter().zip(&px).map(|(a, b)| b - a).sum::<f32>() / 4000.0;
    assert!(mean.abs() < r as f32, "{mean}");
}

#[test]
fn stable_radius_defaults_to_off_in_json() {
    let p = ProtectParams::salm(0.03, 0.1);
    let json = serde_json::to_value(&p).unwrap();
    assert!(json.get("stable_radius").is_none(), "{json}");
    let back: ProtectParams = serde_json::from_value(json).unwrap();
    assert_eq!(back.stable_radius, 0.0);
}

/// A state with one class-wise unit of `v` values after `round` rounds.
fn state_with(v: usize) -> State {
    State {
        round: 0,
        delta: vec![0.0; v],
        mask: vec![1; v],
        mask_ready: vec![true],
        log: Vec::new(),
        seconds: 0.0,
        image_steps: 0,
        stop: None,
        best: None,
    }
}

/// Logs round `state.round + 1` with noise `fill` and the given metrics,
/// then applies the release rule.
fn push_round(state: &mut State, fill: f32, shortcut: Option<f64>, loss: f64, release: &Release) {
    state.delta.fill(fill);
    state.mask.fill(u8::from(fill != 0.0));
    state.round += 1;
    state.log.push(RoundLog {
        round: state.round,
        train_loss: loss,
        accuracy: 1.0,
        loss,
        saturated: 0.0,
        shortcut_accuracy: shortcut,
        proxy_accuracy: None,
        mask_changed: None,
        seconds: 0.0,
    });
    state.track_best(release);
}

#[test]
fn best_round_rule_prefers_shortcut_accuracy_then_lower_loss() {
    let mut s = state_with(4);
    let best = Release::BestRound;
    push_round(&mut s, 0.01, Some(0.5), 0.4, &best);
    assert_eq!(s.released_round(), 1);
    // Higher shortcut accuracy wins even with a higher loss.
    push_round(&mut s, 0.02, Some(0.9), 0.8, &best);
    assert_eq!(s.released_round(), 2);
    // A worse later round is not released.
    push_round(&mut s, 0.03, Some(0.6), 0.01, &best);
    assert_eq!(s.released_round(), 2);
    assert_eq!(s.released().delta, vec![0.02; 4]);
    // Equal shortcut accuracy: the lower loss wins.
    push_round(&mut s, 0.04, Some(0.9), 0.5, &best);
    assert_eq!(s.released_round(), 4);
    // A full tie keeps the earlier round; NaN and unmeasured never win.
    push_round(&mut s, 0.05, Some(0.9), 0.5, &best);
    push_round(&mut s, 0.06, Some(f64::NAN), 0.0, &best);
    push_round(&mut s, 0.07, None, 0.0, &best);
    assert_eq!(s.released_round(), 4);
    let released = s.released();
    assert_eq!(released.delta, vec![0.04; 4]);
    assert_eq!(released.mask, vec![1; 4]);
    // The current noise itself is untouched.
    assert_eq!(s.delta, vec![0.07; 4]);
    // Without any measured shortcut accuracy, the lowest loss decides.
    let mut single = state_with(2);
    push_round(&mut single, 0.01, None, 0.3, &best);
    push_round(&mut single, 0.02, None, 0.1, &best);
    push_round(&mut single, 0.03, None, 0.2, &best);
    assert_eq!(single.released_round(), 2);
    // The final-round release keeps no copy.
    let mut last = state_with(2);
    push_round(&mut last, 0.01, Some(0.9), 0.1, &Release::FinalRound);
    push_round(&mut last, 0.02, Some(0.1), 0.9, &Release::FinalRound);
    assert!(last.best.is_none());
    assert_eq!(last.released_round(), 2);
    assert_eq!(last.released().delta, vec![0.02; 2]);
}

/// Class-wise SALM with an ensemble member whose learning rate makes the
/// round log oscillate on the tiny set (checked by the test that uses it).
fn oscillating(rounds: usize) -> ProtectParams {
    let mut p = classwise_salm(0.5);
    p.ensemble = vec![Arch::Cnn {
        channels: vec![4, 8],
        batch_norm: true,
    }];
    p.sgd.lr = 0.5;
    p.stop = StopRule::new(rounds, rounds, None, None);
    p.release = Release::BestRound;
    p
}

#[test]
fn best_round_release_is_the_best_rounds_noise_when_a_later_round_is_worse() {
    let data = tiny(4);
    let rounds = 5;
    let p = oscillating(rounds);
    assert_eq!(p.release, Release::BestRound);
    let out = protect_dataset(&data, &p, &quiet()).unwrap();
    assert_eq!(out.rounds.len(), rounds);
    let b = out.released_round;
    // The case this test is about: the last round is worse than the best.
    assert!(
        b < rounds,
        "best round is the last one; log {:?}",
        out.rounds
    );
    let best_log = &out.rounds[b - 1];
    let last_log = out.rounds.last().unwrap();
    assert!(
        Release::better(best_log, last_log),
        "{best_log:?} {last_log:?}"
    );
    for l in &out.rounds {
        assert!(!Release::better(l, best_log), "round {} beats {b}", l.round);
    }
    // The same run stopped after round b releases that round's noise (a
    // run is deterministic per round): the best-round release must equal it.
    let mut upto_b = p.clone();
    upto_b.release = Release::FinalRound;
    upto_b.stop = StopRule::new(b, b, None, None);
    let at_b = protect_dataset(&data, &upto_b, &quiet()).unwrap();
    assert_eq!(at_b.released_round, b);
    assert!(
        out.protected.pixels() == at_b.protected.pixels(),
        "released pixels differ from round {b}'s"
    );
    assert!(
        out.masks == at_b.masks,
        "released masks differ from round {b}'s"
    );
    // And differs from the final round's noise, which the old behaviour
    // released.
    let mut last = p.clone();
    last.release = Release::FinalRound;
    let at_last = protect_dataset(&data, &last, &quiet()).unwrap();
    assert_eq!(at_last.released_round, rounds);
    // The release choice does not change the optimisation itself.
    for (a, o) in at_last.rounds.iter().zip(&out.rounds) {
        assert_eq!(a.accuracy, o.accuracy);
        assert_eq!(a.shortcut_accuracy, o.shortcut_accuracy);
    }
    assert!(
        out.protected.pixels() != at_last.protected.pixels(),
        "best and final round released the same pixels"
    );
}

#[test]
fn ensemble_lr_sets_each_members_rate() {
    let data = tiny(3);
    let mut p = classwise_salm(0.5);
    p.ensemble = vec![Arch::Cnn {
        channels: vec![4, 8],
        batch_norm: true,
    }];
    assert_eq!(p.sgd_of(1).lr, p.sgd.lr);
    let base = protect_dataset(&data, &p, &quiet()).unwrap();
    let mut same = p.clone();
    same.ensemble_lr = vec![p.sgd.lr];
    let same_out = protect_dataset(&data, &same, &quiet()).unwrap();
    assert_eq!(base.protected.pixels(), same_out.protected.pixels());
    let mut low = p.clone();
    low.ensemble_lr = vec![0.001];
    assert_eq!(low.sgd_of(0).lr, p.sgd.lr);
    assert_eq!(low.sgd_of(1).lr, 0.001);
    assert_eq!(low.sgd_of(1).momentum, p.sgd.momentum);
    let low_out = protect_dataset(&data, &low, &quiet()).unwrap();
    assert_ne!(base.protected.pixels(), low_out.protected.pixels());
}

#[test]
fn release_and_ensemble_lr_default_in_json() {
    let p = ProtectParams::salm(8.0 / 255.0, 0.25);
    let mut json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["release"], "final_round");
    assert!(json.get("ensemble_lr").is_none());
    let obj = json.as_object_mut().unwrap();
    obj.remove("release");
    let back: ProtectParams = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, p);
    json["release"] = "best_round".into();
    json["ensemble_lr"] = serde_json::json!([0.02]);
    let q: ProtectParams = serde_json::from_value(json).unwrap();
    assert_eq!(q.release, Release::BestRound);
    assert_eq!(q.ensemble_lr, vec![0.02]);
    // Best-round and final-round runs do not share checkpoints.
    let data = tiny(1);
    let mut best = p.clone();
    best.release = Release::BestRound;
    assert_ne!(
        checkpoint::fingerprint(&data, &best),
        checkpoint::fingerprint(&data, &p)
    );
}

/// Runs `p` to the end pausing after every round (a fresh call resumes from
/// the checkpoint each time): the result, the number of calls and the
/// checkpoint directory.
fn one_round_per_call(data: &Dataset, p: &ProtectParams) -> (Protection, usize, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ctl = RunControl {
        checkpoint_dir: Some(dir.path().to_path_buf()),
        resume: true,
        pause_after_rounds: Some(1),
        ..RunControl::default()
    };
    let mut out = protect_dataset(data, p, &ctl).unwrap();
    let mut calls = 1;
    while !out.finished {
        out = protect_dataset(data, p, &ctl).unwrap();
        calls += 1;
    }
    (out, calls, dir)
}

#[test]
fn the_best_round_survives_checkpoints() {
    // Resumed one round at a time, the run must still release the best
    // round's noise, which by then lives only in the checkpoint.
    let data = tiny(4);
    let rounds = 5;
    let p = oscillating(rounds);
    let full = protect_dataset(&data, &p, &quiet()).unwrap();
    assert!(full.released_round < rounds);
    let (out, calls, dir) = one_round_per_call(&data, &p);
    assert_eq!(calls, rounds);
    assert!(dir.path().join("current/best_delta.bin").is_file());
    assert_eq!(out.released_round, full.released_round);
    assert!(
        out.protected.pixels() == full.protected.pixels(),
        "resumed run released other pixels"
    );
    assert_eq!(out.masks, full.masks);
}

/// A `proxy_victim` release with a tiny CNN proxy (2 epochs, every round).
fn tiny_proxy() -> ProxyVictim {
    ProxyVictim {
        epochs: 10,
        batch: 8,
        holdout_fraction: 0.25,
        ..ProxyVictim::new(Arch::Cnn {
            channels: vec![4, 8],
            batch_norm: true,
        })
    }
}

/// Logs round `state.round + 1` with noise `fill` and proxy accuracy
/// `proxy`, then applies the release rule.
fn push_proxy_round(state: &mut State, fill: f32, proxy: Option<f64>, release: &Release) {
    state.delta.fill(fill);
    state.round += 1;
    state.log.push(RoundLog {
        round: state.round,
        train_loss: 0.1,
        accuracy: 1.0,
        loss: 0.1,
        saturated: 0.0,
        shortcut_accuracy: Some(1.0),
        proxy_accuracy: proxy,
        mask_changed: None,
        seconds: 0.0,
    });
    state.track_best(release);
}

#[test]
fn proxy_rule_keeps_the_lowest_proxy_accuracy_ties_to_the_later_round() {
    let rel = Release::ProxyVictim(tiny_proxy());
    let mut s = state_with(3);
    // An unmeasured first round is no candidate.
    push_proxy_round(&mut s, 0.01, None, &rel);
    assert!(s.best.is_none());
    assert_eq!(s.released_round(), 1, "nothing measured: the final round");
    push_proxy_round(&mut s, 0.02, Some(0.6), &rel);
    assert_eq!(s.released_round(), 2);
    push_proxy_round(&mut s, 0.03, Some(0.4), &rel);
    assert_eq!(s.released_round(), 3);
    // Higher, unmeasured and NaN rounds do not replace it.
    push_proxy_round(&mut s, 0.04, Some(0.7), &rel);
    push_proxy_round(&mut s, 0.05, None, &rel);
    push_proxy_round(&mut s, 0.06, Some(f64::NAN), &rel);
    assert_eq!(s.released_round(), 3);
    assert_eq!(s.released().delta, vec![0.03; 3]);
    // An equal accuracy goes to the later round.
    push_proxy_round(&mut s, 0.07, Some(0.4), &rel);
    assert_eq!(s.released_round(), 7);
    assert_eq!(s.released().delta, vec![0.07; 3]);
    assert_eq!(s.delta, vec![0.07; 3]);
}

/// The oscillating run under the proxy-victim release, with a seed whose
/// proxy ranks an earlier round below the last one (the tests check it), so
/// that the rule can be told from `final_round`.
fn oscillating_proxy(rounds: usize) -> ProtectParams {
    let mut p = oscillating(rounds);
    p.release = Release::ProxyVictim(tiny_proxy());
    p.seed = 2;
    p
}

/// The proxy accuracy logged for each round.
fn proxies(o: &Protection) -> Vec<Option<f64>> {
    o.rounds.iter().map(|l| l.proxy_accuracy).collect()
}

#[test]
fn proxy_victim_release_is_the_round_with_the_lowest_proxy_accuracy() {
    let data = tiny(12);
    let rounds = 4;
    let p = oscillating_proxy(rounds);
    let out = protect_dataset(&data, &p, &quiet()).unwrap();
    assert_eq!(out.rounds.len(), rounds);
    let acc: Vec<f64> = out
        .rounds
        .iter()
        .map(|l| l.proxy_accuracy.expect("every round is measured"))
        .collect();
    for a in &acc {
        assert!((0.0..=1.0).contains(a), "{acc:?}");
    }
    // The lowest proxy accuracy, ties to the later round.
    let lowest = acc.iter().copied().fold(f64::INFINITY, f64::min);
    let expected = acc.iter().rposition(|&a| a == lowest).unwrap() + 1;
    assert_eq!(out.released_round, expected, "proxy accuracies {acc:?}");
    assert!(expected < rounds, "the last round is the best: {acc:?}");
    assert!(acc[rounds - 1] > lowest, "{acc:?}");
    // The release choice does not change the optimisation: a final-round
    // run logs the same rounds (without proxy accuracies).
    let mut fin = p.clone();
    fin.release = Release::FinalRound;
    let at_last = protect_dataset(&data, &fin, &quiet()).unwrap();
    for (a, o) in at_last.rounds.iter().zip(&out.rounds) {
        assert_eq!(a.accuracy, o.accuracy);
        assert_eq!(a.shortcut_accuracy, o.shortcut_accuracy);
        assert_eq!(a.proxy_accuracy, None);
    }
    assert_eq!(at_last.released_round, rounds);
    assert!(at_last.protected.pixels() != out.protected.pixels());
    // The released pixels are that round's: a run stopped there releases
    // the same images, and the proxy measures the same on it.
    let mut upto = p.clone();
    upto.stop = StopRule::new(expected, expected, None, None);
    let at_b = protect_dataset(&data, &upto, &quiet()).unwrap();
    assert_eq!(at_b.released_round, expected);
    assert_eq!(at_b.rounds[expected - 1].proxy_accuracy, Some(lowest));
    assert!(out.protected.pixels() == at_b.protected.pixels());
    assert_eq!(out.masks, at_b.masks);
    // Deterministic per seed.
    let again = protect_dataset(&data, &p, &quiet()).unwrap();
    assert_eq!(proxies(&again), proxies(&out));
    assert_eq!(again.released_round, out.released_round);
    assert!(again.protected.pixels() == out.protected.pixels());
}

#[test]
fn proxy_release_survives_checkpoints() {
    // Resumed one round at a time (a new process each time, in effect),
    // the run must log the same proxy accuracies and release the same
    // round's noise as an uninterrupted run.
    let data = tiny(12);
    let rounds = 4;
    let p = oscillating_proxy(rounds);
    let full = protect_dataset(&data, &p, &quiet()).unwrap();
    // The kept round is an earlier one, so it lives in the checkpoint.
    assert!(full.released_round < rounds);
    let (out, calls, dir) = one_round_per_call(&data, &p);
    assert_eq!(calls, rounds);
    assert!(dir.path().join("current/best_delta.bin").is_file());
    assert_eq!(proxies(&out), proxies(&full));
    assert_eq!(out.released_round, full.released_round);
    assert!(
        out.protected.pixels() == full.protected.pixels(),
        "resumed run released other pixels"
    );
    assert_eq!(out.masks, full.masks);
    // A proxy run does not resume from a final-round run's checkpoint.
    let mut fin = p.clone();
    fin.release = Release::FinalRound;
    let ctl = RunControl {
        checkpoint_dir: Some(dir.path().to_path_buf()),
        resume: true,
        ..RunControl::default()
    };
    assert!(matches!(
        protect_dataset(&data, &fin, &ctl),
        Err(Error::Checkpoint { .. })
    ));
}

#[test]
fn proxy_measures_every_nth_round_and_the_stop_round() {
    let data = tiny(3);
    let mut p = classwise_salm(0.0);
    p.stop = StopRule::new(5, 5, None, None);
    p.release = Release::ProxyVictim(ProxyVictim {
        every: 2,
        epochs: 1,
        ..tiny_proxy()
    });
    let out = protect_dataset(&data, &p, &quiet()).unwrap();
    let measured: Vec<usize> = out
        .rounds
        .iter()
        .filter(|l| l.proxy_accuracy.is_some())
        .map(|l| l.round)
        .collect();
    assert_eq!(measured, vec![2, 4, 5]);
    assert!(measured.contains(&out.released_round));
}

#[test]
fn proxy_holdout_is_a_stratified_part_of_the_crafting_data_only() {
    // The audit's flow: split the test images off, protect the rest.
    let all = tiny(8);
    let (tr, te) = all.split(0.25, 3).unwrap();
    let train = all.subset(&tr).unwrap();
    let split = proxy::ProxySplit::new(&train, 0.25, 7).unwrap();
    // A partition of the crafting data's indices.
    let mut union: Vec<usize> = split.train.iter().chain(&split.holdout).copied().collect();
    union.sort_unstable();
    assert_eq!(union, (0..train.len()).collect::<Vec<_>>());
    assert!(split.holdout.iter().all(|i| !split.train.contains(i)));
    // Stratified: every class has holdout and proxy-training images.
    for c in 0..train.classes().len() as u32 {
        assert!(split.holdout.iter().any(|&i| train.labels()[i] == c));
        assert!(split.train.iter().any(|&i| train.labels()[i] == c));
    }
    // No holdout image is a test image (by content).
    for &h in &split.holdout {
        let x = train.image(h);
        assert!(
            te.iter().all(|&t| all.image(t) != x),
            "holdout {h} is a test image"
        );
    }
    // Deterministic per seed, different across seeds.
    assert_eq!(proxy::ProxySplit::new(&train, 0.25, 7).unwrap(), split);
    assert_ne!(proxy::ProxySplit::new(&train, 0.25, 8).unwrap(), split);
    // The holdout is still protected and released like every other image.
    let mut p = classwise_salm(0.0);
    p.seed = 7;
    p.release = Release::ProxyVictim(tiny_proxy());
    let out = protect_dataset(&train, &p, &quiet()).unwrap();
    assert_eq!(out.protected.len(), train.len());
    for &h in &split.holdout {
        assert_ne!(
            out.protected.image(h),
            train.image(h),
            "holdout {h} unprotected"
        );
    }
}

#[test]
fn proxy_settings_are_validated_and_default_in_json() {
    let mut p = classwise_salm(0.0);
    for bad in [
        ProxyVictim {
            every: 0,
            ..tiny_proxy()
        },
        ProxyVictim {
            holdout_fraction: 0.0,
            ..tiny_proxy()
        },
        ProxyVictim {
            holdout_fraction: 0.6,
            ..tiny_proxy()
        },
        ProxyVictim {
            epochs: 0,
            ..tiny_proxy()
        },
    ] {
        p.release = Release::ProxyVictim(bad.clone());
        assert!(matches!(p.validate(), Err(Error::Config(_))), "{bad:?}");
    }
    let mut json = serde_json::to_value(classwise_salm(0.0)).unwrap();
    json["release"] =
        serde_json::json!({"proxy_victim": {"arch": {"arch": "resnet18", "width": 8}}});
    let q: ProtectParams = serde_json::from_value(json.clone()).unwrap();
    let expected = ProxyVictim::new(Arch::Resnet18 { width: 8 });
    assert_eq!(q.release, Release::ProxyVictim(expected.clone()));
    assert_eq!(
        (expected.every, expected.epochs, expected.holdout_fraction),
        (1, 5, 0.2)
    );
    json["release"]["proxy_victim"]["holdout"] = 0.1.into();
    assert!(serde_json::from_value::<ProtectParams>(json).is_err());
    // With one image per class there is nothing to hold out.
    let one = tiny(1);
    assert!(proxy::ProxySplit::new(&one, 0.2, 0).is_err());
}

#[test]
fn synthetic_start_writes_one_sign_code_per_class() {
    let shape = ImageShape {
        channels: 3,
        height: 10,
        width: 10,
    };
    let (v, hw) = (shape.values(), shape.pixels());
    let eps = 0.03f32;
    let blank = |ready: bool| State {
        round: 0,
        delta: vec![0.0; 4 * v],
        mask: vec![u8::from(!ready); 4 * hw],
        mask_ready: vec![ready; 4],
        log: Vec::new(),
        seconds: 0.0,
        image_steps: 0,
        stop: None,
        best: None,
    };
    let blocks = SyntheticStart {
        side: 4,
        layout: CodeLayout::Blocks,
    };
    let tiled = SyntheticStart {
        side: 3,
        layout: CodeLayout::Tiled,
    };
    for (start, same_cell) in [
        // Blocks: constant inside a 4x4 block (the last blocks are
        // clipped to the 10x10 image).
        (
            blocks,
            &(|q: usize| (q / 10 / 4 * 4) * 10 + q % 10 / 4 * 4) as &dyn Fn(usize) -> usize,
        ),
        // Tiled: pixel (y, x) repeats pixel (y mod 3, x mod 3).
        (tiled, &|q: usize| (q / 10 % 3) * 10 + q % 10 % 3),
    ] {
        // Masks not chosen yet (a gradient strategy): every pixel gets its code.
        let mut a = blank(false);
        synthetic_start(&mut a, shape, start, eps, 7);
        for u in 0..4 {
            let d = &a.delta[u * v..(u + 1) * v];
            assert!(
                d.iter().all(|x| x.abs() == eps),
                "{start:?} unit {u}: not +-eps"
            );
            for q in 0..hw {
                assert_eq!(d[q], d[same_cell(q)], "{start:?} unit {u} pixel {q}");
                assert_eq!(d[q], d[hw + q]);
                assert_eq!(d[q], d[2 * hw + q]);
            }
        }
        let codes: std::collections::BTreeSet<Vec<bool>> = (0..4)
            .map(|u| (0..hw).map(|q| a.delta[u * v + q] > 0.0).collect())
            .collect();
        assert_eq!(codes.len(), 4, "{start:?}: two classes share a code");
        // Deterministic per seed; another seed, other codes.
        let mut b = blank(false);
        synthetic_start(&mut b, shape, start, eps, 7);
        assert_eq!(a.delta, b.delta);
        let mut c = blank(false);
        synthetic_start(&mut c, shape, start, eps, 8);
        assert_ne!(a.delta, c.delta);
        // Chosen masks are respected: nothing outside them.
        let mut m = blank(true);
        for u in 0..4 {
            m.mask[u * hw + 3] = 1;
        }
        synthetic_start(&mut m, shape, start, eps, 7);
        for u in 0..4 {
            for q in 0..hw {
                let nonzero = m.delta[u * v + q] != 0.0;
                assert_eq!(nonzero, q == 3, "{start:?} unit {u} pixel {q}");
            }
        }
    }
}

#[test]
fn restarts_give_fresh_surrogates_at_their_rounds() {
    // Round 1 is the same with or without restarts; a restart at round 2
    // trains fresh surrogates, so from there the noise differs. A young
    // surrogate fits the protected images less well than one trained for
    // two rounds.
    let data = tiny(6);
    let mut p = classwise_salm(0.0);
    p.stop = StopRule::new(2, 2, None, None);
    p.train_steps_per_round = 8;
    let mut restarted = p.clone();
    restarted.restart_every = 1;
    let a = protect_dataset(&data, &p, &quiet()).unwrap();
    let b = protect_dataset(&data, &restarted, &quiet()).unwrap();
    assert_eq!(a.rounds[0].accuracy, b.rounds[0].accuracy);
    assert_eq!(a.rounds[0].loss, b.rounds[0].loss);
    assert_ne!(a.protected.pixels(), b.protected.pixels());
    assert!(
        b.rounds[1].train_loss > a.rounds[1].train_loss,
        "round-2 surrogate loss: kept {}, restarted {}",
        a.rounds[1].train_loss,
        b.rounds[1].train_loss
    );
    assert!(b.quality.linf_max <= 8.0 / 255.0 + 0.5 / 255.0 + 1e-6);
}

#[test]
fn grating_codes_are_distinct_up_to_translation() {
    // Every code repeats with period `m` along both axes (`period` for a
    // lattice of that index, `width * period` for thick lines), so shifts
    // in `0..m` and a `2m x 2m` window decide translate equality.
    let repeat = |c: &mask::GratingCode, period: i64| match *c {
        mask::GratingCode::Lattice { .. } => period,
        mask::GratingCode::Lines { width, period, .. } => width * period,
    };
    for period in [2i64, 4, 10] {
        let codes = mask::grating_codes(12, period);
        assert_eq!(codes.len(), 12);
        for (i, c) in codes.iter().enumerate() {
            let m = repeat(c, period);
            let n = (0..m * m).filter(|q| c.contains(q % m, q / m)).count() as i64;
            assert_eq!(n * period, m * m, "period {period} code {i} {c:?}: density");
            for d in &codes[..i] {
                let m = m.max(repeat(d, period));
                let w = 2 * m;
                let set = |c: &mask::GratingCode, dx: i64, dy: i64| -> Vec<bool> {
                    (0..w * w)
                        .map(|q| c.contains(q % w + dx, q / w + dy))
                        .collect()
                };
                let base = set(d, 0, 0);
                for shift in 0..m * m {
                    assert!(
                        set(c, shift % m, shift / m) != base,
                        "period {period}: {c:?} is a translate of {d:?}"
                    );
                }
            }
        }
    }
    // Period 4: the 2x2 dots first, every index-4 sublattice (7) before
    // thick lines, rows and columns last among them.
    let codes = mask::grating_codes(8, 4);
    assert_eq!(codes[0], mask::GratingCode::Lattice { a: 2, b: 0, d: 2 });
    assert!(codes[..7]
        .iter()
        .all(|c| matches!(c, mask::GratingCode::Lattice { .. })));
    assert!(matches!(
        codes[7],
        mask::GratingCode::Lines { width: 2, .. }
    ));
    let rows_or_columns = |c: &mask::GratingCode| {
        matches!(c, mask::GratingCode::Lattice { a: 1, .. })
            || matches!(c, mask::GratingCode::Lattice { b: 0, d: 1, .. })
    };
    assert!(codes[5..7].iter().all(rows_or_columns));
    assert!(!codes[..5].iter().any(rows_or_columns));
}

#[test]
fn grating_masks_are_one_texture_per_class_within_rho() {
    let shape = ImageShape {
        channels: 1,
        height: 32,
        width: 32,
    };
    for rho in [0.1, 0.25, 0.7] {
        let k = mask_size(rho, shape.pixels());
        let codes = mask::grating_codes(10, mask::grating_period(rho));
        let masks: Vec<Vec<u8>> = codes.iter().map(|&c| mask::grating(c, shape, k)).collect();
        for (c, m) in masks.iter().enumerate() {
            let n = m.iter().filter(|&&v| v == 1).count();
            assert!(n <= k, "rho {rho} class {c}: {n} > {k}");
            let period = mask::grating_period(rho) as f64;
            let expect = shape.pixels() as f64 / period;
            assert!(
                n as f64 >= expect.min(k as f64) * 0.85,
                "rho {rho} class {c}: only {n} pixels"
            );
        }
        let distinct: std::collections::BTreeSet<&Vec<u8>> = masks.iter().collect();
        assert_eq!(distinct.len(), 10, "rho {rho}: two classes share a mask");
    }
    // Class 0 at rho 0.25: every other pixel of every other row.
    let code = mask::grating_codes(1, mask::grating_period(0.25))[0];
    let m = mask::grating(code, shape, 256);
    for (q, &v) in m.iter().enumerate() {
        assert_eq!(v == 1, q / 32 % 2 == 0 && q % 2 == 0, "pixel {q}");
    }
}

#[test]
fn grating_salm_perturbs_only_the_class_grating() {
    let data = tiny(6);
    let eps = 8.0 / 255.0;
    let rho = 0.25;
    let s = data.shape();
    let k = mask_size(rho, s.pixels());
    for classwise in [true, false] {
        let mut p = fast(ProtectParams::salm(eps, rho));
        p.method = Method::Salm {
            rho,
            mask: MaskStrategy::Grating,
            refresh: MaskRefresh::Fixed,
            classwise,
        };
        if classwise {
            p.synthetic_start = Some(SyntheticStart {
                side: 1,
                layout: CodeLayout::Mask,
            });
        }
        let out = protect_dataset(&data, &p, &quiet()).unwrap();
        let masks = out.masks.clone().unwrap();
        for i in 0..data.len() {
            let label = data.labels()[i] as usize;
            let unit = if classwise { label } else { i };
            let m = &masks[unit * s.pixels()..(unit + 1) * s.pixels()];
            let code = mask::grating_codes(4, mask::grating_period(rho))[label];
            assert_eq!(m, mask::grating(code, s, k).as_slice());
            let (a, b) = (data.image(i), out.protected.image(i));
            for q in 0..s.pixels() {
                assert!((a[q] - b[q]).abs() <= eps as f32 + 0.5 / 255.0 + 1e-6);
                if m[q] == 0 {
                    assert_eq!(a[q], b[q], "classwise {classwise} image {i} pixel {q}");
                }
            }
        }
        assert!(
            out.quality.l0_mean > 0.05,
            "classwise {classwise}: empty noise"
        );
    }
}

#[test]
fn mask_code_start_brightens_the_mask() {
    let shape = ImageShape {
        channels: 1,
        height: 8,
        width: 8,
    };
    let hw = shape.pixels();
    let mut state = State {
        round: 0,
        delta: vec![0.0; 2 * hw],
        mask: mask::class_gratings(2, 0.25, shape),
        mask_ready: vec![true; 2],
        log: Vec::new(),
        seconds: 0.0,
        image_steps: 0,
        stop: None,
        best: None,
    };
    let start = SyntheticStart {
        side: 1,
        layout: CodeLayout::Mask,
    };
    synthetic_start(&mut state, shape, start, 0.03, 1);
    for (d, m) in state.delta.iter().zip(&state.mask) {
        assert_eq!(*d, if *m == 1 { 0.03 } else { 0.0 });
    }
}

#[test]
fn code_fraction_keeps_the_code_and_refines_the_rest() {
    let data = tiny(6);
    let eps = 8.0 / 255.0;
    let rho = 0.25;
    let mut p = classwise_salm(0.0);
    p.eps = eps;
    p.method = Method::Salm {
        rho,
        mask: MaskStrategy::Feasible,
        refresh: MaskRefresh::PerRound,
        classwise: true,
    };
    p.code_fraction = 0.5;
    p.validate().unwrap();
    let out = protect_dataset(&data, &p, &quiet()).unwrap();
    let s = data.shape();
    let hw = s.pixels();
    let k = mask_size(rho, hw);
    let k_code = mask_size(rho * 0.5, hw);
    let codes = mask::grating_codes(4, mask::grating_period(rho * 0.5));
    let masks = out.masks.clone().unwrap();
    let mut refined = 0;
    for (c, &code) in codes.iter().enumerate() {
        let code = mask::grating(code, s, k_code);
        let m = &masks[c * hw..(c + 1) * hw];
        assert_eq!(m.iter().filter(|&&v| v == 1).count(), k, "class {c}");
        assert!(code.iter().zip(m).all(|(&a, &b)| a == 0 || b == 1));
        for i in (0..data.len()).filter(|&i| data.labels()[i] as usize == c) {
            let (a, b) = (data.image(i), out.protected.image(i));
            for q in 0..hw {
                let d = b[q] - a[q];
                if code[q] == 1 {
                    // The code: +eps wherever the box allows it.
                    let want = (a[q] + eps as f32).min(1.0) - a[q];
                    assert!(
                        (d - want).abs() < 1e-5,
                        "class {c} image {i} pixel {q}: {d}"
                    );
                } else if m[q] == 0 {
                    assert_eq!(d, 0.0);
                } else if d != 0.0 && d != eps as f32 {
                    refined += 1;
                }
            }
        }
    }
    assert!(
        refined > 0,
        "the refined part never moved off the code's value"
    );
    // Where a code cannot be combined.
    let mut em = ProtectParams::em(eps);
    em.code_fraction = 0.5;
    assert!(em
        .validate()
        .unwrap_err()
        .to_string()
        .contains("code_fraction"));
    let mut grating = p.clone();
    grating.method = Method::Salm {
        rho,
        mask: MaskStrategy::Grating,
        refresh: MaskRefresh::Fixed,
        classwise: true,
    };
    assert!(grating.validate().is_err());
    let mut whole = p.clone();
    whole.code_fraction = 1.0;
    assert!(whole.validate().is_err());
    let mut started = p.clone();
    started.random_start = true;
    assert!(started.validate().is_err());
}

#[test]
fn lattice_code_brightens_exactly_the_class_lattice() {
    let data = tiny(6);
    let eps = 8.0 / 255.0;
    let p = ProtectParams::lattice_code(eps, 0.25);
    p.validate().unwrap();
    assert!(p.model_free());
    let out = protect_dataset(&data, &p, &quiet()).unwrap();
    // No surrogate shapes the code: no round runs (an untrained
    // surrogate's accuracy would measure nothing), and the run is done.
    assert!(out.rounds.is_empty());
    assert_eq!(out.released_round, 0);
    assert_eq!(out.image_steps, 0);
    assert!(out.finished);
    assert_eq!(out.stop_reason, Some(StopReason::ModelFree));
    let estimate = estimate_dataset(&data, &p).unwrap();
    assert_eq!((estimate.images, estimate.max_seconds), (data.len(), 0.0));
    // A proxy victim picks among rounds: there are none.
    let mut proxied = p.clone();
    proxied.release = Release::ProxyVictim(tiny_proxy());
    let err = proxied.validate().unwrap_err().to_string();
    assert!(err.contains("model-free"), "{err}");
    // Training the surrogate on the code makes rounds measurable again.
    let mut trained = p.clone();
    trained.train_steps_per_round = 1;
    trained.train_batch = 8;
    assert!(!trained.model_free());
    let measured = protect_dataset(&data, &trained, &quiet()).unwrap();
    assert_eq!(measured.rounds.len(), 1);
    assert_eq!(measured.protected.pixels(), out.protected.pixels());
    let s = data.shape();
    let hw = s.pixels();
    let codes = mask::class_gratings(4, 0.25, s);
    for i in 0..data.len() {
        let c = data.labels()[i] as usize;
        let code = &codes[c * hw..(c + 1) * hw];
        let (a, b) = (data.image(i), out.protected.image(i));
        for q in 0..hw {
            let want = if code[q] == 1 {
                (a[q] + eps as f32).min(1.0) - a[q]
            } else {
                0.0
            };
            assert!((b[q] - a[q] - want).abs() < 1e-4, "image {i} pixel {q}");
        }
    }
    assert!(p.label().contains("start=code"), "{}", p.label());
    // Deterministic and seed-free: the code does not depend on the seed.
    let mut other = p.clone();
    other.seed = 9;
    let again = protect_dataset(&data, &other, &quiet()).unwrap();
    assert_eq!(out.protected.pixels(), again.protected.pixels());
}

/// [`fast`] with the targeted objective and enough surrogate training for
/// the surrogate to know the classes.
fn targeted(method: Method, eps: f64) -> ProtectParams {
    let mut p = fast(ProtectParams::em(eps));
    p.method = method;
    p.objective = Objective::Targeted;
    p.stop = StopRule::new(4, 4, None, None);
    p.train_steps_per_round = 15;
    p.pgd_steps = 10;
    p.step_size = Some(eps / 5.0);
    p
}

#[test]
fn targeted_noise_moves_images_towards_the_next_class() {
    // The round log scores the surrogate against the targets (y + 1): a
    // clean-trained surrogate puts almost no image there, the noise must
    // put most there (chance is 1/4), sample-wise and class-wise, within
    // the budgets.
    let data = tiny(8);
    let eps = 32.0 / 255.0;
    for method in [
        Method::Em { classwise: false },
        Method::Em { classwise: true },
        Method::Salm {
            rho: 0.5,
            mask: MaskStrategy::Feasible,
            refresh: MaskRefresh::PerRound,
            classwise: false,
        },
    ] {
        let p = targeted(method.clone(), eps);
        let out = protect_dataset(&data, &p, &quiet()).unwrap();
        let last = out.rounds.last().unwrap();
        assert!(last.shortcut_accuracy.is_none(), "{method:?}");
        assert!(
            last.accuracy >= 0.6,
            "{method:?}: success towards the targets {}",
            last.accuracy
        );
        for (x, y) in data.pixels().iter().zip(out.protected.pixels()) {
            assert!((x - y).abs() <= eps as f32 + 0.5 / 255.0 + 1e-6);
        }
        assert!(p.label().contains("targeted"));
    }
}

#[test]
fn targeted_surrogates_train_on_the_clean_images() {
    // Same seed, different budgets: the surrogates of a targeted run see
    // only clean images, so their training losses match round for round;
    // error-minimising surrogates train on the protected images and differ
    // from the second round on.
    let data = tiny(4);
    let method = Method::Em { classwise: false };
    let losses = |p: &ProtectParams| -> Vec<f64> {
        let out = protect_dataset(&data, p, &quiet()).unwrap();
        out.rounds.iter().map(|r| r.train_loss).collect()
    };
    let small = targeted(method.clone(), 4.0 / 255.0);
    let large = targeted(method, 32.0 / 255.0);
    assert_eq!(losses(&small), losses(&large));
    let mut em_small = small.clone();
    em_small.objective = Objective::ErrorMinimising;
    let mut em_large = large.clone();
    em_large.objective = Objective::ErrorMinimising;
    let (a, b) = (losses(&em_small), losses(&em_large));
    assert_eq!(a[0], b[0]);
    assert_ne!(a[1..], b[1..]);
}

#[test]
fn targeted_objective_refuses_min_min_options_and_defaults_in_json() {
    let data = tiny(1);
    let mut cross = classwise_salm(0.5);
    cross.objective = Objective::Targeted;
    let mut shortcut = fast(ProtectParams::em(0.03));
    shortcut.objective = Objective::Targeted;
    shortcut.stop.shortcut_accuracy = Some(0.9);
    for p in [cross, shortcut] {
        let e = protect_dataset(&data, &p, &quiet())
            .unwrap_err()
            .to_string();
        assert!(e.contains("targeted"), "{e}");
    }
    let json = serde_json::to_value(ProtectParams::em(0.03)).unwrap();
    assert!(json.get("objective").is_none(), "default left out: {json}");
    let mut with = json.clone();
    with["objective"] = "targeted".into();
    let p: ProtectParams = serde_json::from_value(with).unwrap();
    assert_eq!(p.objective, Objective::Targeted);
    let mut bad = json;
    bad["objective"] = "maximising".into();
    assert!(serde_json::from_value::<ProtectParams>(bad).is_err());
}
