//! Tests of `crate::optim`: masks freeze weights bit for bit, updates follow
//! PyTorch's formulas, schedule values, clipping.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn dev() -> Device {
    Device::Cpu
}

fn random_var(shape: (usize, usize), seed: u64) -> Var {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &dev()).unwrap()).unwrap()
}

/// A loss whose gradient is non-zero everywhere: sum((W x - y)^2).
fn loss_of(w: &Var, x: &Tensor, y: &Tensor) -> Tensor {
    w.as_tensor()
        .matmul(x)
        .unwrap()
        .sub(y)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
}

fn run_masked(mut opt: Box<dyn Optimizer>, w: &Var, mask: &Tensor) {
    let x = random_var((6, 3), 2).as_detached_tensor();
    let y = random_var((4, 3), 3).as_detached_tensor();
    let before = w
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    opt.set_mask(w, mask).unwrap();
    for _ in 0..100 {
        let loss = loss_of(w, &x, &y);
        train_step(opt.as_mut(), &loss, None).unwrap();
    }
    let after = w
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let m = mask.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let mut moved = 0;
    for i in 0..m.len() {
        if m[i] == 0 {
            assert_eq!(
                before[i].to_bits(),
                after[i].to_bits(),
                "masked weight {i} moved"
            );
        } else if before[i] != after[i] {
            moved += 1;
        }
    }
    let trainable = m.iter().filter(|v| **v == 1).count();
    assert_eq!(moved, trainable, "every unmasked weight moved");
}

fn half_mask() -> Tensor {
    let m: Vec<u8> = (0..24).map(|i| u8::from(i % 3 != 0)).collect();
    Tensor::from_vec(m, (4, 6), &dev()).unwrap()
}

#[test]
fn masked_adamw_leaves_masked_weights_bit_identical() {
    let w = random_var((4, 6), 1);
    let opt = AdamW::new(
        vec![w.clone()],
        AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    run_masked(Box::new(opt), &w, &half_mask());
}

#[test]
fn masked_sgd_with_momentum_and_decay_leaves_masked_weights_bit_identical() {
    for nesterov in [false, true] {
        let w = random_var((4, 6), 4);
        let cfg = SgdConfig {
            lr: 1e-3,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 5e-2,
            nesterov,
        };
        run_masked(
            Box::new(Sgd::new(vec![w.clone()], cfg).unwrap()),
            &w,
            &half_mask(),
        );
    }
}

#[test]
fn clearing_a_mask_lets_weights_move_again() {
    let w = random_var((4, 6), 5);
    let mut opt = Sgd::new(vec![w.clone()], SgdConfig::salun(1e-2)).unwrap();
    let zeros = Tensor::zeros((4, 6), DType::U8, &dev()).unwrap();
    opt.set_mask(&w, &zeros).unwrap();
    let x = random_var((6, 3), 6).as_detached_tensor();
    let y = random_var((4, 3), 7).as_detached_tensor();
    let before = crate::nn::tests::bits(w.as_tensor());
    train_step(&mut opt, &loss_of(&w, &x, &y), None).unwrap();
    assert_eq!(crate::nn::tests::bits(w.as_tensor()), before);
    opt.clear_mask(&w).unwrap();
    train_step(&mut opt, &loss_of(&w, &x, &y), None).unwrap();
    assert_ne!(crate::nn::tests::bits(w.as_tensor()), before);
}

/// Three AdamW steps on one scalar against the formula in f64.
#[test]
fn adamw_follows_pytorch_update() {
    let w = Var::from_tensor(&Tensor::new(&[0.5f32], &dev()).unwrap()).unwrap();
    let c = AdamWConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(vec![w.clone()], c).unwrap();
    let (mut p, mut m, mut v) = (0.5f64, 0.0, 0.0);
    for t in 1..=3 {
        // loss = 3 p^2 -> grad 6 p
        let loss = (w.as_tensor().sqr().unwrap() * 3.0)
            .unwrap()
            .sum_all()
            .unwrap();
        train_step(&mut opt, &loss, None).unwrap();
        let g = 6.0 * p;
        p *= 1.0 - c.lr * c.weight_decay;
        m = c.beta1 * m + (1.0 - c.beta1) * g;
        v = c.beta2 * v + (1.0 - c.beta2) * g * g;
        let mh = m / (1.0 - c.beta1.powi(t));
        let vh = v / (1.0 - c.beta2.powi(t));
        p -= c.lr * mh / (vh.sqrt() + c.eps);
        let got = f64::from(w.as_tensor().to_vec1::<f32>().unwrap()[0]);
        assert!((got - p).abs() < 1e-6, "step {t}: {got} vs {p}");
    }
}

/// SGD with momentum, dampening and decay on one scalar against PyTorch's
/// formula (first buffer = gradient), plain and Nesterov.
#[test]
fn sgd_follows_pytorch_update() {
    for nesterov in [false, true] {
        let w = Var::from_tensor(&Tensor::new(&[1.0f32], &dev()).unwrap()).unwrap();
        let c = SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.01,
            nesterov,
        };
        let mut opt = Sgd::new(vec![w.clone()], c).unwrap();
        let (mut p, mut buf) = (1.0f64, None::<f64>);
        for step in 0..4 {
            let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
            train_step(&mut opt, &loss, None).unwrap();
            let d = 2.0 * p + c.weight_decay * p;
            let b = match buf {
                None => d,
                Some(b) => c.momentum * b + (1.0 - c.dampening) * d,
            };
            buf = Some(b);
            let d = if nesterov { d + c.momentum * b } else { b };
            p -= c.lr * d;
            let got = f64::from(w.as_tensor().to_vec1::<f32>().unwrap()[0]);
            assert!(
                (got - p).abs() < 1e-6,
                "nesterov={nesterov} step {step}: {got} vs {p}"
            );
        }
    }
    let w = Var::zeros(1, DType::F32, &dev()).unwrap();
    let bad = SgdConfig {
        lr: 0.1,
        momentum: 0.0,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: true,
    };
    assert!(Sgd::new(vec![w], bad).is_err());
}

#[test]
fn variables_without_a_gradient_are_not_touched() {
    let used = random_var((2, 2), 8);
    let unused = random_var((2, 2), 9);
    let before = crate::nn::tests::bits(unused.as_tensor());
    let mut opt = AdamW::new(
        vec![used.clone(), unused.clone()],
        AdamWConfig {
            weight_decay: 0.5,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    for _ in 0..5 {
        let loss = used.as_tensor().sqr().unwrap().sum_all().unwrap();
        train_step(&mut opt, &loss, None).unwrap();
    }
    assert_eq!(
        crate::nn::tests::bits(unused.as_tensor()),
        before,
        "no gradient, no weight decay"
    );
}

#[test]
fn bad_masks_and_arguments_are_errors() {
    let w = random_var((2, 3), 10);
    let mut opt = AdamW::new(vec![w.clone()], AdamWConfig::default()).unwrap();
    assert!(opt
        .set_mask(&w, &Tensor::ones((3, 2), DType::U8, &dev()).unwrap())
        .is_err());
    let not_binary = Tensor::new(&[[0f32, 1., 0.5], [1., 1., 1.]], &dev()).unwrap();
    assert!(opt.set_mask(&w, &not_binary).is_err());
    // A float 0/1 mask is accepted.
    let float_mask = Tensor::new(&[[0f32, 1., 0.], [1., 1., 1.]], &dev()).unwrap();
    opt.set_mask(&w, &float_mask).unwrap();
    let stranger = random_var((2, 3), 11);
    assert!(opt.set_mask(&stranger, &float_mask).is_err());
    assert!(AdamW::new(vec![w.clone(), w.clone()], AdamWConfig::default()).is_err());
    assert!(AdamW::new(
        vec![w.clone()],
        AdamWConfig {
            lr: f64::NAN,
            ..AdamWConfig::default()
        }
    )
    .is_err());
    let not_scalar = w.as_tensor().sqr().unwrap();
    assert!(train_step(&mut opt, &not_scalar, None).is_err());
}

#[test]
fn cosine_schedule_values() {
    let s = CosineSchedule::new(1.0, 0.1, 10, 110).unwrap();
    assert_eq!(s.lr_at(0), 0.0);
    assert!((s.lr_at(5) - 0.5).abs() < 1e-12, "half-way through warm-up");
    assert!((s.lr_at(10) - 1.0).abs() < 1e-12, "peak after warm-up");
    assert!(
        (s.lr_at(60) - 0.55).abs() < 1e-12,
        "middle of the decay: (peak + min) / 2"
    );
    assert!((s.lr_at(110) - 0.1).abs() < 1e-12, "end");
    assert!((s.lr_at(1000) - 0.1).abs() < 1e-12, "after the end");
    let mut prev = f64::INFINITY;
    for step in 10..=110 {
        assert!(s.lr_at(step) <= prev, "monotone decay");
        prev = s.lr_at(step);
    }
    assert!(CosineSchedule::new(1.0, 2.0, 0, 10).is_err());
    assert!(CosineSchedule::new(1.0, 0.0, 11, 10).is_err());
    assert!(CosineSchedule::new(1.0, 0.0, 0, 0).is_err());
}

#[test]
fn clipping_bounds_the_global_norm() {
    let a = random_var((3, 4), 12);
    let b = random_var((5, 2), 13);
    let loss = ((a.as_tensor().sqr().unwrap().sum_all().unwrap() * 50.0).unwrap()
        + b.as_tensor().sum_all().unwrap().affine(30.0, 0.0).unwrap())
    .unwrap();
    let vars = vec![a.clone(), b.clone()];
    let mut grads = loss.backward().unwrap();
    let norm = global_grad_norm(&grads, &vars).unwrap();
    assert!(norm > 10.0);
    let reported = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
    assert!((reported - norm).abs() < 1e-3 * norm);
    let after = global_grad_norm(&grads, &vars).unwrap();
    assert!(after <= 1.0 + 1e-5 && after > 0.99, "{after}");
    // Below the threshold nothing changes.
    let again = clip_grad_norm(&mut grads, &vars, 5.0).unwrap();
    assert!((again - after).abs() < 1e-6);
    assert!((global_grad_norm(&grads, &vars).unwrap() - after).abs() < 1e-6);
    assert!(clip_grad_norm(&mut grads, &vars, 0.0).is_err());
}
