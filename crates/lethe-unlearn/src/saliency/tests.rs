//! The saliency mask keeps exactly the global top fraction, breaks ties
//! deterministically, and masked optimisation never moves a frozen weight.

use candle_core::{Device, Tensor, Var};
use lethe_model::optim::{self, Sgd, SgdConfig};

use super::*;

fn t(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
}

fn mask_of(m: &SaliencyMask, name: &str) -> Vec<u8> {
    m.mask(name).unwrap().to_vec1::<u8>().unwrap()
}

#[test]
fn keeps_the_global_top_fraction() {
    let scores = vec![
        ("b".to_string(), t(&[0.4, 0.2])),
        ("a".to_string(), t(&[0.1, 0.5, 0.3])),
    ];
    // floor(0.4 * 5) = 2: 0.5 (a) and 0.4 (b).
    let m = SaliencyMask::from_scores(&scores, 0.4).unwrap();
    assert_eq!((m.kept(), m.total()), (2, 5));
    assert_eq!(mask_of(&m, "a"), vec![0, 1, 0]);
    assert_eq!(mask_of(&m, "b"), vec![1, 0]);
    let names: Vec<&str> = m.masks().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    // keep_ratio 1: everything.
    let all = SaliencyMask::from_scores(&scores, 1.0).unwrap();
    assert_eq!(all.kept(), 5);
    assert_eq!(mask_of(&all, "a"), vec![1, 1, 1]);
}

#[test]
fn ties_are_broken_by_name_then_index() {
    let scores = vec![
        ("y".to_string(), t(&[1.0, 1.0])),
        ("x".to_string(), t(&[1.0, 1.0, 2.0])),
    ];
    // floor(0.6 * 5) = 3: the 2.0, then the first two ties in (x, y) order.
    let m = SaliencyMask::from_scores(&scores, 0.6).unwrap();
    assert_eq!(mask_of(&m, "x"), vec![1, 1, 1]);
    assert_eq!(mask_of(&m, "y"), vec![0, 0]);
    let again = SaliencyMask::from_scores(&scores, 0.6).unwrap();
    assert_eq!(m.sha256().unwrap(), again.sha256().unwrap());
    let other = SaliencyMask::from_scores(&scores, 0.8).unwrap();
    assert_ne!(m.sha256().unwrap(), other.sha256().unwrap());
}

#[test]
fn bad_ratios_and_scores_are_errors() {
    let scores = vec![("a".to_string(), t(&[1.0, 2.0]))];
    for r in [0.0, -0.1, 1.5, f64::NAN] {
        assert!(matches!(
            SaliencyMask::from_scores(&scores, r),
            Err(Error::InvalidConfig(_))
        ));
    }
    // 0.4 of 2 keeps nothing.
    assert!(SaliencyMask::from_scores(&scores, 0.4).is_err());
    assert!(SaliencyMask::from_scores(&[], 0.5).is_err());
    let nan = vec![("a".to_string(), t(&[f32::NAN, 1.0]))];
    assert!(SaliencyMask::from_scores(&nan, 0.5).is_err());
    let dup = vec![("a".to_string(), t(&[1.0])), ("a".to_string(), t(&[2.0]))];
    assert!(SaliencyMask::from_scores(&dup, 0.5).is_err());
}

#[test]
fn accumulated_gradients_sum_over_batches() {
    let w = Var::from_tensor(&t(&[1.0, -2.0, 3.0])).unwrap();
    let mut acc = GradientAccumulator::new(vec![("w".into(), w.clone())]);
    // d/dw sum(w * c) = c.
    acc.add(
        &(w.as_tensor() * t(&[1.0, 0.0, -1.0]))
            .unwrap()
            .sum_all()
            .unwrap(),
    )
    .unwrap();
    acc.add(
        &(w.as_tensor() * t(&[1.0, 0.5, -4.0]))
            .unwrap()
            .sum_all()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(acc.batches(), 2);
    let s = acc.abs_scores().unwrap();
    assert_eq!(s[0].1.to_vec1::<f32>().unwrap(), vec![2.0, 0.5, 5.0]);
}

#[test]
fn masked_sgd_with_momentum_and_decay_never_moves_frozen_weights() {
    let init: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) / 3.0).collect();
    let w = Var::from_tensor(&t(&init)).unwrap();
    let named = vec![("w".to_string(), w.clone())];
    let scores = vec![("w".to_string(), t(&init).abs().unwrap())];
    let mask = SaliencyMask::from_scores(&scores, 0.5).unwrap();
    let theta0 = snapshot(&named).unwrap();
    let mut opt = Sgd::new(vec![w.clone()], SgdConfig::salun(0.1)).unwrap();
    mask.apply(&mut opt, &named).unwrap();
    for step in 0..25 {
        let target = t(&[step as f32; 12]);
        let loss = (w.as_tensor() - target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        optim::train_step(&mut opt, &loss, None).unwrap();
    }
    assert_eq!(mask.count_changed_outside(&theta0, &named).unwrap(), 0);
    let now = w.as_tensor().to_vec1::<f32>().unwrap();
    let m = mask_of(&mask, "w");
    for i in 0..12 {
        if m[i] == 0 {
            assert_eq!(now[i].to_bits(), init[i].to_bits());
        } else {
            assert_ne!(now[i], init[i]);
        }
    }
    // The check itself notices moved frozen weights (the 6 of 12 outside).
    let moved: Vec<f32> = now.iter().map(|v| v + 1.0).collect();
    w.set(&t(&moved)).unwrap();
    assert_eq!(mask.count_changed_outside(&theta0, &named).unwrap(), 6);
}
