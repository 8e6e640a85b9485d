//! Tests of `crate::vision`: gradients reach every weight and the input,
//! batch norm behaves as PyTorch's, checkpoints round-trip, bad files are
//! clear errors, and a CNN learns a separable task.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::nn;
use crate::optim::{self, Optimizer, Sgd, SgdConfig};

fn dev() -> Device {
    Device::Cpu
}

fn images(n: usize, c: usize, s: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * c * s * s)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    Tensor::from_vec(v, (n, c, s, s), &dev()).unwrap()
}

fn labels(n: usize, classes: u32, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<u32> = (0..n).map(|_| rng.random_range(0..classes)).collect();
    Tensor::from_vec(v, n, &dev()).unwrap()
}

fn cnn_config(batch_norm: bool) -> CnnConfig {
    CnnConfig {
        in_channels: 3,
        image_size: 16,
        num_classes: 5,
        channels: vec![8, 16],
        batch_norm,
    }
}

fn small_resnet() -> ResNetConfig {
    ResNetConfig {
        in_channels: 3,
        num_classes: 4,
        width: 4,
    }
}

/// The loss of one training-mode pass and each trainable parameter's name
/// with its gradient (`None` where the backward pass gave it none).
fn loss_and_grads(
    model: &dyn ImageClassifier,
    x: &Tensor,
    y: &Tensor,
) -> (f32, Vec<(String, Option<Tensor>)>) {
    loss_and_grads_in(model, x, y, Mode::Train)
}

/// [`loss_and_grads`] in `mode`.
fn loss_and_grads_in(
    model: &dyn ImageClassifier,
    x: &Tensor,
    y: &Tensor,
    mode: Mode,
) -> (f32, Vec<(String, Option<Tensor>)>) {
    let logits = model.forward(x, mode).unwrap();
    let loss = nn::cross_entropy(&logits, y, None).unwrap();
    let grads = loss.backward().unwrap();
    let named = model
        .named_trainable_vars()
        .into_iter()
        .map(|(name, var)| {
            let g = grads.get(var.as_tensor()).cloned();
            (name, g)
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), named)
}

/// The parameters whose gradient is missing or zero.
fn zero_gradients(grads: &[(String, Option<Tensor>)]) -> Vec<String> {
    grads
        .iter()
        .filter(|(_, g)| !g.as_ref().is_some_and(|g| nn::tests::max_abs(g) > 0.0))
        .map(|(name, _)| name.clone())
        .collect()
}

fn count_nonzero(
    model: &dyn ImageClassifier,
    x: &Tensor,
    y: &Tensor,
) -> (usize, usize, Vec<String>) {
    let (_, grads) = loss_and_grads(model, x, y);
    let missing = zero_gradients(&grads);
    (grads.len() - missing.len(), grads.len(), missing)
}

/// Every parameter's gradient in `a` is within 1e-3 (relative to the
/// largest entry, at least 1e-3) of the same parameter's in `b`.
fn assert_same_gradients(
    name: &str,
    a: &[(String, Option<Tensor>)],
    b: &[(String, Option<Tensor>)],
) {
    assert_eq!(a.len(), b.len(), "{name}: parameter counts");
    for ((param, ga), (_, gb)) in a.iter().zip(b) {
        let (ga, gb) = (ga.as_ref().unwrap(), gb.as_ref().unwrap());
        let (d, scale) = (nn::tests::max_abs_diff(ga, gb), nn::tests::max_abs(gb));
        assert!(
            d <= 1e-3 * scale.max(1e-3),
            "{name}: {param} differs by {d} (max {scale})"
        );
    }
}

#[test]
fn every_cnn_parameter_gets_a_gradient() {
    for bn in [false, true] {
        let model = SmallCnn::new(cnn_config(bn), &dev(), 1).unwrap();
        let (ok, total, missing) = count_nonzero(&model, &images(4, 3, 16, 2), &labels(4, 5, 3));
        println!("CNN batch_norm={bn}: {ok} of {total} parameters have a non-zero gradient");
        assert_eq!(total, if bn { 2 * 3 + 2 } else { 2 * 2 + 2 });
        assert!(missing.is_empty(), "{missing:?}");
    }
}

#[test]
fn gpu_convolution_backward_trains_every_parameter_as_candles_does() {
    // The GPU path of `conv2d` (convolution backward, lethe-model's
    // conv_grad), run on the CPU inside whole models: every parameter
    // gets a gradient, and loss and gradients equal those of the
    // reference path (candle's conv2d and its own backward).
    let resnet = ResNet18::new(small_resnet(), &dev(), 4).unwrap();
    let cnn = SmallCnn::new(cnn_config(true), &dev(), 1).unwrap();
    let x = images(4, 3, 16, 5);
    for (name, model, y) in [
        ("resnet", &resnet as &dyn ImageClassifier, labels(4, 4, 6)),
        ("cnn", &cnn, labels(4, 5, 6)),
    ] {
        let (l_gpu, g_gpu) = nn::tests::with_gpu_path(|| loss_and_grads(model, &x, &y));
        let missing = zero_gradients(&g_gpu);
        assert!(missing.is_empty(), "{name}: {missing:?}");
        let (l_ref, g_ref) = nn::tests::with_reference(|| loss_and_grads(model, &x, &y));
        assert!(
            (l_gpu - l_ref).abs() < 1e-4,
            "{name}: loss {l_gpu} vs {l_ref}"
        );
        assert_same_gradients(name, &g_gpu, &g_ref);
    }
}

#[test]
fn evaluation_on_the_gpu_path_matches_the_cpu_kernels() {
    // In evaluation the GPU path folds batch norm into the convolutions;
    // the CPU runs convolution and batch norm as two kernels. Logits, the
    // input gradient (what protection's noise steps use) and every
    // parameter's gradient agree, with running statistics that are not
    // the initial ones.
    let resnet = ResNet18::new(small_resnet(), &dev(), 7).unwrap();
    let cnn = SmallCnn::new(cnn_config(true), &dev(), 8).unwrap();
    let x = images(4, 3, 16, 9);
    for (name, model, y) in [
        ("resnet", &resnet as &dyn ImageClassifier, labels(4, 4, 10)),
        ("cnn", &cnn, labels(4, 5, 10)),
    ] {
        for seed in 0..3 {
            let shifted = ((images(4, 3, 16, 20 + seed) * 2.0).unwrap() + 0.5).unwrap();
            model.forward(&shifted, Mode::Train).unwrap();
        }
        let cpu = model.forward(&x, Mode::Eval).unwrap();
        let gpu = nn::tests::with_gpu_path(|| model.forward(&x, Mode::Eval).unwrap());
        let d = nn::tests::max_abs_diff(&cpu, &gpu);
        assert!(d < 1e-4, "{name}: logits differ by {d}");
        let (_, g_cpu) = input_gradient(model, &x, &y, Mode::Eval).unwrap();
        let (_, g_gpu) =
            nn::tests::with_gpu_path(|| input_gradient(model, &x, &y, Mode::Eval).unwrap());
        let (d, scale) = (
            nn::tests::max_abs_diff(&g_cpu, &g_gpu),
            nn::tests::max_abs(&g_cpu),
        );
        assert!(
            scale > 0.0 && d <= 1e-3 * scale,
            "{name}: input gradient differs by {d} (max {scale})"
        );
        let (l_cpu, p_cpu) = loss_and_grads_in(model, &x, &y, Mode::Eval);
        let (l_gpu, p_gpu) =
            nn::tests::with_gpu_path(|| loss_and_grads_in(model, &x, &y, Mode::Eval));
        assert!(
            (l_cpu - l_gpu).abs() < 1e-4,
            "{name}: loss {l_cpu} vs {l_gpu}"
        );
        let missing = zero_gradients(&p_gpu);
        assert!(missing.is_empty(), "{name}: {missing:?}");
        assert_same_gradients(name, &p_gpu, &p_cpu);
    }
}

#[test]
fn every_resnet18_parameter_gets_a_gradient() {
    let model = ResNet18::new(small_resnet(), &dev(), 4).unwrap();
    let (ok, total, missing) = count_nonzero(&model, &images(4, 3, 16, 5), &labels(4, 4, 6));
    println!("ResNet-18 (width 4): {ok} of {total} parameters have a non-zero gradient");
    // stem conv + bn (3), 8 blocks x (2 convs + 2 bns = 6), 3 downsamples x 3, fc 2.
    assert_eq!(total, 3 + 8 * 6 + 3 * 3 + 2);
    assert!(missing.is_empty(), "{missing:?}");
    // The standard CIFAR ResNet-18 has 11,173,962 parameters (10 classes).
    let full = ResNet18::new(ResNetConfig::cifar(10), &dev(), 0).unwrap();
    let n: usize = full.trainable_vars().iter().map(|v| v.elem_count()).sum();
    assert_eq!(n, 11_173_962);
}

/// The input gradient is non-zero and matches a central finite difference.
#[test]
fn input_gradient_matches_finite_differences() {
    let model = SmallCnn::new(cnn_config(true), &dev(), 7).unwrap();
    let x = images(3, 3, 16, 8);
    let y = labels(3, 5, 9);
    let (loss, grad) = input_gradient(&model, &x, &y, Mode::Eval).unwrap();
    assert_eq!(grad.dims(), x.dims());
    let g: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let nonzero = g.iter().filter(|v| **v != 0.0).count();
    println!(
        "input gradient: {nonzero} of {} pixels non-zero, loss {loss:.4}",
        g.len()
    );
    assert!(nonzero > g.len() / 2);
    // Finite differences in f64-ish precision on the pixels with the largest gradients.
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|a, b| g[*b].abs().total_cmp(&g[*a].abs()));
    let flat = x.flatten_all().unwrap();
    let eps = 1e-2f32;
    for &i in order.iter().take(3) {
        let bump = |delta: f32| {
            let mut v: Vec<f32> = flat.to_vec1().unwrap();
            v[i] += delta;
            let xi = Tensor::from_vec(v, x.dims(), &dev()).unwrap();
            let l = nn::cross_entropy(&model.forward(&xi, Mode::Eval).unwrap(), &y, None).unwrap();
            l.to_scalar::<f32>().unwrap()
        };
        let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
        assert!(
            (fd - g[i]).abs() < 0.05 * g[i].abs() + 1e-4,
            "pixel {i}: fd {fd} vs grad {}",
            g[i]
        );
    }
    // The weights were not trainable only during the call.
    let (ok, total, _) = count_nonzero(&model, &x, &y);
    assert_eq!(ok, total);
}

#[test]
fn batch_norm_uses_batch_stats_in_training_and_running_stats_in_eval() {
    let model = SmallCnn::new(cnn_config(true), &dev(), 10).unwrap();
    let x = (images(8, 3, 16, 11) * 3.0)
        .unwrap()
        .affine(1.0, 2.0)
        .unwrap();
    let rm = |m: &SmallCnn| {
        m.varmap().data().lock().unwrap()["blocks.0.bn.running_mean"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert!(rm(&model).iter().all(|v| *v == 0.0));
    let e1 = model.forward(&x, Mode::Eval).unwrap();
    assert!(
        rm(&model).iter().all(|v| *v == 0.0),
        "eval does not update running stats"
    );
    model.forward(&x, Mode::Train).unwrap();
    let after = rm(&model);
    assert!(
        after.iter().any(|v| *v != 0.0),
        "training updates running stats"
    );
    // PyTorch: running_mean = 0.9 * 0 + 0.1 * batch_mean of the conv output.
    let conv0 = &model.blocks[0].0;
    let batch_mean = conv0
        .forward(&x)
        .unwrap()
        .mean_keepdim((0, 2, 3))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (r, b) in after.iter().zip(&batch_mean) {
        assert!((r - 0.1 * b).abs() < 1e-5);
    }
    let e2 = model.forward(&x, Mode::Eval).unwrap();
    assert!(
        (e1 - e2)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );

    // batch_norm2d in training normalises each channel to mean 0, variance 1.
    let w = Tensor::ones(3, DType::F32, &dev()).unwrap();
    let b = Tensor::zeros(3, DType::F32, &dev()).unwrap();
    let y = nn::batch_norm2d(&x, &w, &b, None, 1e-5).unwrap();
    let mean = y
        .mean_keepdim((0, 2, 3))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let var = y
        .sqr()
        .unwrap()
        .mean_keepdim((0, 2, 3))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(mean.iter().all(|m| m.abs() < 1e-4) && var.iter().all(|v| (v - 1.0).abs() < 1e-3));
}

#[test]
fn checkpoints_round_trip_and_dispatch_by_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let x = images(2, 3, 16, 12);
    let cnn = SmallCnn::new(cnn_config(true), &dev(), 13).unwrap();
    cnn.forward(&x, Mode::Train).unwrap(); // non-trivial running stats
    let res = ResNet18::new(small_resnet(), &dev(), 14).unwrap();
    res.forward(&x, Mode::Train).unwrap();
    for (name, model) in [
        ("cnn", &cnn as &dyn ImageClassifier),
        ("res", &res as &dyn ImageClassifier),
    ] {
        let path = dir.path().join(name);
        model.save(&path).unwrap();
        let loaded = load_classifier(&path, &dev()).unwrap();
        assert_eq!(loaded.config(), model.config());
        let a = model.forward(&x, Mode::Eval).unwrap();
        let b = loaded.forward(&x, Mode::Eval).unwrap();
        let a: Vec<u32> = a
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let b: Vec<u32> = b
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(a, b, "{name}");
    }
    assert!(SmallCnn::load(&dir.path().join("cnn"), &dev()).is_ok());
    assert!(matches!(
        SmallCnn::load(&dir.path().join("res"), &dev()).unwrap_err(),
        Error::Format(_)
    ));
    assert!(ResNet18::load(&dir.path().join("res"), &dev()).is_ok());
}

#[test]
fn bad_classifier_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    let model = SmallCnn::new(cnn_config(false), &dev(), 15).unwrap();
    model.save(&path).unwrap();
    let weights = path.join(WEIGHTS_FILE);
    let mut tensors: HashMap<String, Tensor> = model
        .varmap()
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let head = tensors.remove("head.weight").unwrap();
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let e = load_classifier(&path, &dev()).unwrap_err();
    assert!(
        matches!(e, Error::Format(_)) && e.to_string().contains("head.weight"),
        "{e}"
    );
    tensors.insert("head.weight".into(), head.narrow(1, 0, 3).unwrap());
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    assert!(load_classifier(&path, &dev())
        .unwrap_err()
        .to_string()
        .contains("shape"));
    tensors.insert("head.weight".into(), head);
    tensors.insert(
        "stray.weight".into(),
        Tensor::zeros(2, DType::F32, &dev()).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    assert!(load_classifier(&path, &dev())
        .unwrap_err()
        .to_string()
        .contains("stray.weight"));
    std::fs::write(path.join(CONFIG_FILE), r#"{"arch": "vgg"}"#).unwrap();
    assert!(matches!(
        load_classifier(&path, &dev()).unwrap_err(),
        Error::Format(_)
    ));
    std::fs::write(
        path.join(CONFIG_FILE),
        r#"{"arch": "cnn", "in_channels": 3, "image_size": 10, "num_classes": 5, "channels": [8, 16], "batch_norm": false}"#,
    )
    .unwrap();
    assert!(
        matches!(
            load_classifier(&path, &dev()).unwrap_err(),
            Error::Format(_)
        ),
        "10 is not a multiple of 4"
    );
    assert!(matches!(
        load_classifier(&dir.path().join("none"), &dev()).unwrap_err(),
        Error::Io { .. }
    ));
    // Wrong input shapes are errors.
    assert!(model.forward(&images(1, 1, 16, 1), Mode::Eval).is_err());
    assert!(model.forward(&images(1, 3, 8, 1), Mode::Eval).is_err());
}

/// A separable task: class = which quadrant of the image is bright.
#[test]
fn cnn_learns_a_separable_task_with_masked_sgd() {
    let model = SmallCnn::new(cnn_config(true), &dev(), 16).unwrap();
    let mut rng = StdRng::seed_from_u64(17);
    let mut make = |n: usize| {
        let mut px = vec![0f32; n * 3 * 16 * 16];
        let mut ys = Vec::with_capacity(n);
        for i in 0..n {
            let class = rng.random_range(0..4u32);
            ys.push(class);
            let (oy, ox) = ((class / 2) as usize * 8, (class % 2) as usize * 8);
            for c in 0..3 {
                for yy in 0..16 {
                    for xx in 0..16 {
                        let inside = (oy..oy + 8).contains(&yy) && (ox..ox + 8).contains(&xx);
                        let noise = rng.random_range(-0.3f32..0.3);
                        px[((i * 3 + c) * 16 + yy) * 16 + xx] =
                            if inside { 1.0 } else { 0.0 } + noise;
                    }
                }
            }
        }
        (
            Tensor::from_vec(px, (n, 3, 16, 16), &dev()).unwrap(),
            Tensor::from_vec(ys, n, &dev()).unwrap(),
        )
    };
    let mut opt = Sgd::new(model.trainable_vars(), SgdConfig::salun(0.05)).unwrap();
    // Freeze half of the head (SalUn-style mask): those weights must not move.
    let (_, head) = model
        .named_trainable_vars()
        .into_iter()
        .find(|(n, _)| n == "head.weight")
        .unwrap();
    let mask: Vec<u8> = (0..head.elem_count())
        .map(|i| u8::from(i % 2 == 0))
        .collect();
    opt.set_mask(
        &head,
        &Tensor::from_vec(mask.clone(), head.dims(), &dev()).unwrap(),
    )
    .unwrap();
    let head_before: Vec<f32> = head.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    for _ in 0..40 {
        let (x, y) = make(16);
        let loss = nn::cross_entropy(&model.forward(&x, Mode::Train).unwrap(), &y, None).unwrap();
        optim::train_step(&mut opt, &loss, Some(5.0)).unwrap();
    }
    let (x, y) = make(64);
    let pred: Vec<u32> = model
        .forward(&x, Mode::Eval)
        .unwrap()
        .argmax(D::Minus1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let y: Vec<u32> = y.to_vec1().unwrap();
    let acc = pred.iter().zip(&y).filter(|(a, b)| a == b).count() as f64 / 64.0;
    println!("CNN quadrant task accuracy after 40 steps: {acc:.3}");
    assert!(acc >= 0.9, "accuracy {acc}");
    let head_after: Vec<f32> = head.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    for (i, m) in mask.iter().enumerate() {
        if *m == 0 {
            assert_eq!(head_before[i].to_bits(), head_after[i].to_bits());
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn models_on_cuda_match_the_cpu_in_training_and_evaluation() {
    // Runs where a CUDA device is present (the `cuda` build needs the
    // driver to start at all). The same seed builds the same weights on
    // both devices; training-mode passes move the running statistics, then
    // evaluation (batch norm folded into the convolutions, lethe's CUDA
    // element-wise kernels) gives the same logits and input gradient.
    // Tolerances allow for TF32 in cuDNN's convolutions.
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let x = images(4, 3, 16, 9);
    for name in ["resnet", "cnn"] {
        let build = |d: &Device| -> Box<dyn ImageClassifier> {
            match name {
                "resnet" => Box::new(ResNet18::new(small_resnet(), d, 7).unwrap()),
                _ => Box::new(SmallCnn::new(cnn_config(true), d, 8).unwrap()),
            }
        };
        let classes = if name == "resnet" { 4 } else { 5 };
        let (cpu, cuda) = (build(&dev()), build(&gpu));
        let y = labels(4, classes, 10);
        for seed in 0..3 {
            let shifted = ((images(4, 3, 16, 20 + seed) * 2.0).unwrap() + 0.5).unwrap();
            cpu.forward(&shifted, Mode::Train).unwrap();
            cuda.forward(&shifted.to_device(&gpu).unwrap(), Mode::Train)
                .unwrap();
        }
        let (xg, yg) = (x.to_device(&gpu).unwrap(), y.to_device(&gpu).unwrap());
        let l_cpu = cpu.forward(&x, Mode::Eval).unwrap();
        let l_gpu = cuda
            .forward(&xg, Mode::Eval)
            .unwrap()
            .to_device(&dev())
            .unwrap();
        let (d, scale) = (
            nn::tests::max_abs_diff(&l_cpu, &l_gpu),
            nn::tests::max_abs(&l_cpu),
        );
        println!("{name}: logits differ by {d} (max {scale})");
        assert!(d <= 1e-2 * scale.max(1.0), "{name}: logits differ by {d}");
        let (_, g_cpu) = input_gradient(cpu.as_ref(), &x, &y, Mode::Eval).unwrap();
        let (_, g_gpu) = input_gradient(cuda.as_ref(), &xg, &yg, Mode::Eval).unwrap();
        let g_gpu = g_gpu.to_device(&dev()).unwrap();
        let (d, scale) = (
            nn::tests::max_abs_diff(&g_cpu, &g_gpu),
            nn::tests::max_abs(&g_cpu),
        );
        println!("{name}: input gradient differs by {d} (max {scale})");
        assert!(
            scale > 0.0 && d <= 2e-2 * scale,
            "{name}: input gradient differs by {d}"
        );
        // On the GPU too, the hand-chained gradient (the default above) is
        // autograd's.
        let (_, g_auto) = autograd_input_gradient(cuda.as_ref(), &xg, &yg, Mode::Eval).unwrap();
        let g_auto = g_auto.to_device(&dev()).unwrap();
        let d = nn::tests::max_abs_diff(&g_auto, &g_gpu);
        println!("{name}: frozen against autograd on the GPU: {d} (max {scale})");
        assert!(d <= 1e-3 * scale, "{name}: frozen gradient differs by {d}");
        let (_, grads) = loss_and_grads_in(cuda.as_ref(), &xg, &yg, Mode::Eval);
        let missing = zero_gradients(&grads);
        assert!(missing.is_empty(), "{name}: {missing:?}");
    }
}

/// A ResNet and two CNNs (with and without batch norm) whose running
/// statistics moved away from their initial values, with their labels.
fn trained_statistics_models() -> Vec<(&'static str, Box<dyn ImageClassifier>, Tensor)> {
    let models: Vec<(&'static str, Box<dyn ImageClassifier>, Tensor)> = vec![
        (
            "resnet",
            Box::new(ResNet18::new(small_resnet(), &dev(), 7).unwrap()),
            labels(4, 4, 10),
        ),
        (
            "cnn-bn",
            Box::new(SmallCnn::new(cnn_config(true), &dev(), 8).unwrap()),
            labels(4, 5, 10),
        ),
        (
            "cnn",
            Box::new(SmallCnn::new(cnn_config(false), &dev(), 9).unwrap()),
            labels(4, 5, 11),
        ),
    ];
    for (_, model, _) in &models {
        for seed in 0..3 {
            let shifted = ((images(4, 3, 16, 20 + seed) * 2.0).unwrap() + 0.5).unwrap();
            model.forward(&shifted, Mode::Train).unwrap();
        }
    }
    models
}

#[test]
fn frozen_input_gradient_is_autograds_bit_for_bit_on_the_cpu() {
    // The hand-chained backward calls the kernels autograd calls, so
    // protection's CPU results do not move when noise steps switch to it.
    let x = images(4, 3, 16, 12);
    for (name, model, y) in trained_statistics_models() {
        let frozen = model.freeze().unwrap();
        let logits = model.forward(&x, Mode::Eval).unwrap();
        assert_eq!(
            nn::tests::bits(&frozen.logits(&x).unwrap()),
            nn::tests::bits(&logits),
            "{name}: logits"
        );
        let (l_auto, g_auto) = autograd_input_gradient(model.as_ref(), &x, &y, Mode::Eval).unwrap();
        let (l_frozen, g_frozen) = frozen.input_gradient(&x, &y).unwrap();
        assert!(nn::tests::max_abs(&g_auto) > 0.0, "{name}: zero gradient");
        assert_eq!(l_frozen.to_bits(), l_auto.to_bits(), "{name}: loss");
        assert_eq!(g_frozen.dims(), x.dims(), "{name}: gradient shape");
        // Zeros may differ in sign only (autograd adds its gradients to a
        // +0 tensor).
        let same = nn::tests::bits(&g_frozen)
            .iter()
            .zip(nn::tests::bits(&g_auto))
            .all(|(a, b)| *a == b || (a << 1 == 0 && b << 1 == 0));
        assert!(same, "{name}: input gradients differ");
        // `input_gradient` in evaluation mode takes this path.
        let (_, g_default) = input_gradient(model.as_ref(), &x, &y, Mode::Eval).unwrap();
        assert_eq!(
            nn::tests::bits(&g_default),
            nn::tests::bits(&g_frozen),
            "{name}: default path"
        );
    }
}

#[test]
fn frozen_input_gradient_off_the_cpu_kernels_matches_autograd() {
    // With the fused CPU kernels off, the frozen path folds batch norm into
    // its convolutions and takes input gradients as convolutions of the
    // transposed kernel (what runs on a GPU); autograd takes the reference
    // ops (candle's convolution and its own backward, or with the GPU
    // convolution path forced, lethe's conv_grad).
    let x = images(4, 3, 16, 13);
    for (name, model, y) in trained_statistics_models() {
        for gpu_conv in [false, true] {
            let run = |f: &dyn Fn() -> (f32, Tensor, Tensor)| {
                nn::tests::with_reference(|| {
                    if gpu_conv {
                        nn::tests::with_gpu_path(f)
                    } else {
                        f()
                    }
                })
            };
            let (l_auto, g_auto, logits_auto) = run(&|| {
                let (l, g) = autograd_input_gradient(model.as_ref(), &x, &y, Mode::Eval).unwrap();
                (l, g, model.forward(&x, Mode::Eval).unwrap())
            });
            let (l_frozen, g_frozen, logits_frozen) = run(&|| {
                let frozen = model.freeze().unwrap();
                let (l, g) = frozen.input_gradient(&x, &y).unwrap();
                (l, g, frozen.logits(&x).unwrap())
            });
            let d = nn::tests::max_abs_diff(&logits_auto, &logits_frozen);
            assert!(d < 1e-5, "{name} gpu_conv={gpu_conv}: logits differ by {d}");
            assert!(
                (l_auto - l_frozen).abs() < 1e-5,
                "{name} gpu_conv={gpu_conv}: loss {l_auto} vs {l_frozen}"
            );
            let (d, scale) = (
                nn::tests::max_abs_diff(&g_auto, &g_frozen),
                nn::tests::max_abs(&g_auto),
            );
            assert!(
                scale > 0.0 && d <= 1e-5 * scale,
                "{name} gpu_conv={gpu_conv}: input gradient differs by {d} (max {scale})"
            );
        }
    }
}

#[test]
fn a_frozen_classifier_keeps_the_weights_it_was_made_with() {
    let model = SmallCnn::new(cnn_config(true), &dev(), 3).unwrap();
    let (x, y) = (images(4, 3, 16, 14), labels(4, 5, 15));
    let frozen = model.freeze().unwrap();
    let (_, before) = frozen.input_gradient(&x, &y).unwrap();
    let vars = model.trainable_vars();
    let mut opt = Sgd::new(vars, SgdConfig::salun(0.5)).unwrap();
    for _ in 0..3 {
        let logits = model.forward(&x, Mode::Train).unwrap();
        let loss = nn::cross_entropy(&logits, &y, None).unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
    }
    let (_, after) = frozen.input_gradient(&x, &y).unwrap();
    assert_eq!(
        nn::tests::bits(&before),
        nn::tests::bits(&after),
        "the snapshot changed"
    );
    let (_, fresh) = model.freeze().unwrap().input_gradient(&x, &y).unwrap();
    assert!(
        nn::tests::max_abs_diff(&fresh, &before) > 0.0,
        "training did not change the model"
    );
}

#[test]
fn a_frozen_classifier_refuses_bad_inputs() {
    let model = SmallCnn::new(cnn_config(true), &dev(), 3).unwrap();
    let frozen = model.freeze().unwrap();
    let y = labels(4, 5, 15);
    for bad in [images(4, 1, 16, 1), images(4, 3, 8, 1)] {
        assert!(frozen.input_gradient(&bad, &y).is_err(), "{:?}", bad.dims());
        assert!(frozen.logits(&bad).is_err());
    }
    let wrong_count = labels(3, 5, 15);
    assert!(frozen
        .input_gradient(&images(4, 3, 16, 1), &wrong_count)
        .is_err());
    // A label past the classes, on the CPU kernels and on the closed-form
    // head used elsewhere.
    let outside = Tensor::from_vec(vec![0u32, 5, 1, 2], 4, &dev()).unwrap();
    let x = images(4, 3, 16, 1);
    assert!(frozen.input_gradient(&x, &outside).is_err());
    assert!(nn::tests::with_reference(|| frozen.input_gradient(&x, &outside)).is_err());
    let resnet = ResNet18::new(small_resnet(), &dev(), 4).unwrap();
    let empty = Tensor::zeros((0, 3, 16, 16), DType::F32, &dev()).unwrap();
    assert!(resnet.freeze().unwrap().logits(&empty).is_err());
}
