//! Tests of `crate::nn`: values against direct formulas, and gradients.

use candle_core::{Device, Tensor, Var, D};

use super::*;

thread_local! {
    /// Set in a test thread to force the primitive-op (non-CPU) paths.
    pub(crate) static REFERENCE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

thread_local! {
    /// Set in a test thread to run `conv2d`'s GPU path on the CPU.
    pub(crate) static GPU_PATH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the fused CPU kernels disabled on this thread.
pub(crate) fn with_reference<T>(f: impl FnOnce() -> T) -> T {
    REFERENCE_ONLY.with(|r| r.set(true));
    let out = f();
    REFERENCE_ONLY.with(|r| r.set(false));
    out
}

/// Runs `f` on the paths a GPU takes (no fused CPU kernels; `conv2d` with
/// its GPU backward, `LETHE_GPU_CONV` unset meaning the convolution
/// backward) on this thread.
pub(crate) fn with_gpu_path<T>(f: impl FnOnce() -> T) -> T {
    GPU_PATH.with(|r| r.set(true));
    let out = with_reference(f);
    GPU_PATH.with(|r| r.set(false));
    out
}

fn dev() -> Device {
    Device::Cpu
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(data, shape, &dev()).unwrap()
}

pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// The bit patterns of `t`'s values (f32), for exact comparisons.
pub(crate) fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// The largest absolute value in `t`.
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn is_nonzero(t: &Tensor) -> bool {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        > 0.0
}

#[test]
fn rms_norm_matches_formula_and_backpropagates() {
    let x = Var::from_tensor(&randn(&[2, 3, 8], 1)).unwrap();
    let w = Var::from_tensor(&randn(&[8], 2)).unwrap();
    let y = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
    let xs = x.as_tensor().to_vec3::<f32>().unwrap();
    let ws = w.as_tensor().to_vec1::<f32>().unwrap();
    let ys = y.to_vec3::<f32>().unwrap();
    for (xb, yb) in xs.iter().zip(&ys) {
        for (row, yrow) in xb.iter().zip(yb) {
            let ms: f32 = row.iter().map(|v| v * v).sum::<f32>() / 8.0;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for i in 0..8 {
                assert!((row[i] * inv * ws[i] - yrow[i]).abs() < 1e-5);
            }
        }
    }
    let grads = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
    assert!(is_nonzero(grads.get(x.as_tensor()).unwrap()));
    assert!(is_nonzero(grads.get(w.as_tensor()).unwrap()));
}

/// Why this module exists: candle-nn's fused RMSNorm cuts the gradient.
/// If a candle upgrade gives it a backward pass this test flags that the
/// workaround may be dropped.
#[test]
fn fused_candle_rms_norm_has_no_weight_gradient_ours_does() {
    let x = Var::from_tensor(&randn(&[4, 8], 3)).unwrap();
    let w = Var::from_tensor(&randn(&[8], 4)).unwrap();
    let fused = candle_nn::ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
    let ours = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
    assert!(max_abs_diff(&fused, &ours) < 1e-5, "same values");
    let g_fused = fused.sum_all().unwrap().backward().unwrap();
    assert!(
        g_fused.get(w.as_tensor()).is_none(),
        "fused rms_norm now has a backward"
    );
    let g_ours = ours.sum_all().unwrap().backward().unwrap();
    assert!(g_ours.get(w.as_tensor()).is_some());
}

/// HF's formula, element by element: out[i] = x[i] cos(p f_i) - x[i+h] sin(p f_i)
/// for i < h and out[i+h] = x[i+h] cos + x[i] sin, with f_i = theta^(-2i/d).
#[test]
fn rotary_matches_hf_half_split_formula() {
    let (hd, t) = (8usize, 5usize);
    let theta = 10_000.0;
    let rot = Rotary::new(hd, 16, theta, &dev()).unwrap();
    let x = randn(&[1, 2, t, hd], 5);
    let offset = 3;
    let y = rot.apply(&x, offset).unwrap();
    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let yv: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let h = hd / 2;
    for head in 0..2 {
        for p in 0..t {
            let base = (head * t + p) * hd;
            let pos = (p + offset) as f64;
            for i in 0..h {
                let f = 1.0 / theta.powf(2.0 * i as f64 / hd as f64);
                let (c, s) = ((pos * f).cos() as f32, (pos * f).sin() as f32);
                let a = xv[base + i];
                let b = xv[base + i + h];
                assert!((yv[base + i] - (a * c - b * s)).abs() < 1e-5);
                assert!((yv[base + i + h] - (b * c + a * s)).abs() < 1e-5);
            }
        }
    }
    // Position 0 is the identity.
    let y0 = rot.apply(&x, 0).unwrap().narrow(2, 0, 1).unwrap();
    assert!(max_abs_diff(&y0, &x.narrow(2, 0, 1).unwrap()) == 0.0);
    assert!(rot.apply(&x, 12).is_err(), "past the table is an error");
    assert!(Rotary::new(7, 4, theta, &dev()).is_err());
}

#[test]
fn rotary_backpropagates_to_its_input() {
    let rot = Rotary::new(4, 8, 10_000.0, &dev()).unwrap();
    let x = Var::from_tensor(&randn(&[1, 1, 3, 4], 6)).unwrap();
    let y = rot.apply(x.as_tensor(), 1).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    // A rotation preserves norms: d/dx sum(y^2) = 2x.
    let gx = g.get(x.as_tensor()).unwrap();
    let expected = (x.as_tensor() * 2.0).unwrap();
    assert!(max_abs_diff(gx, &expected) < 1e-5);
}

fn repeat_kv(x: &Tensor, n: usize) -> Tensor {
    let (b, h, s, d) = x.dims4().unwrap();
    x.unsqueeze(2)
        .unwrap()
        .broadcast_as((b, h, n, s, d))
        .unwrap()
        .reshape((b, h * n, s, d))
        .unwrap()
}

fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
    let hd = q.dim(D::Minus1).unwrap();
    let s = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
    let s = s.broadcast_add(mask).unwrap();
    candle_nn::ops::softmax_last_dim(&s)
        .unwrap()
        .matmul(v)
        .unwrap()
}

#[test]
fn grouped_query_attention_matches_repeated_kv_reference() {
    let (b, h, hk, t, d) = (2, 6, 2, 5, 4);
    let q = randn(&[b, h, t, d], 7);
    let k = randn(&[b, hk, t, d], 8);
    let v = randn(&[b, hk, t, d], 9);
    let mask = causal_mask(t, &dev()).unwrap();
    let ours = attention(&q, &k, &v, &mask).unwrap();
    let reference = naive_attention(&q, &repeat_kv(&k, 3), &repeat_kv(&v, 3), &mask);
    assert!(max_abs_diff(&ours, &reference) < 1e-5);
    // Bad shapes are errors, not panics.
    assert!(attention(&q, &randn(&[b, 4, t, d], 1), &v, &mask).is_err());
    assert!(attention(&q, &k, &v, &causal_mask(t + 1, &dev()).unwrap()).is_err());
}

#[test]
fn attention_is_causal_and_backpropagates() {
    let (t, d) = (6, 4);
    let q = Var::from_tensor(&randn(&[1, 2, t, d], 10)).unwrap();
    let k = Var::from_tensor(&randn(&[1, 2, t, d], 11)).unwrap();
    let v = Var::from_tensor(&randn(&[1, 2, t, d], 12)).unwrap();
    let mask = causal_mask(t, &dev()).unwrap();
    let out = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask).unwrap();
    // Changing the last key/value does not change earlier outputs.
    let v2 = v
        .as_tensor()
        .slice_assign(&[0..1, 0..2, t - 1..t, 0..d], &randn(&[1, 2, 1, d], 13))
        .unwrap();
    let out2 = attention(q.as_tensor(), k.as_tensor(), &v2, &mask).unwrap();
    let early = |o: &Tensor| o.narrow(2, 0, t - 1).unwrap();
    assert_eq!(max_abs_diff(&early(&out), &early(&out2)), 0.0);
    assert!(max_abs_diff(&out, &out2) > 0.0);
    let g = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for var in [&q, &k, &v] {
        assert!(is_nonzero(g.get(var.as_tensor()).unwrap()));
    }
}

#[test]
fn swiglu_is_silu_times_up() {
    let g = randn(&[3, 4], 14);
    let u = randn(&[3, 4], 15);
    let y = swiglu(&g, &u).unwrap();
    let gv: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
    let uv: Vec<f32> = u.flatten_all().unwrap().to_vec1().unwrap();
    let yv: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..12 {
        let silu = gv[i] / (1.0 + (-gv[i]).exp());
        assert!((yv[i] - silu * uv[i]).abs() < 1e-6);
    }
}

#[test]
fn cross_entropy_matches_formula_and_ignores_index() {
    let logits = Var::from_tensor(&randn(&[4, 5], 16)).unwrap();
    let targets = Tensor::new(&[1u32, 4, 0, 2], &dev()).unwrap();
    let rows = logits.as_tensor().to_vec2::<f32>().unwrap();
    let nll = |r: &[f32], t: usize| -> f32 {
        let lse = r.iter().map(|v| v.exp()).sum::<f32>().ln();
        lse - r[t]
    };
    let all = cross_entropy(logits.as_tensor(), &targets, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want: f32 = [1, 4, 0, 2]
        .iter()
        .enumerate()
        .map(|(i, &t)| nll(&rows[i], t))
        .sum::<f32>()
        / 4.0;
    assert!((all - want).abs() < 1e-5);

    // Rows whose target is the ignore index drop out of the mean and get no gradient.
    let targets = Tensor::new(&[1u32, 99, 0, 99], &dev()).unwrap();
    let loss = cross_entropy(logits.as_tensor(), &targets, Some(99)).unwrap();
    let want = (nll(&rows[0], 1) + nll(&rows[2], 0)) / 2.0;
    assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
    let g = loss.backward().unwrap();
    let g = g.get(logits.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    assert!(g[1].iter().all(|v| *v == 0.0) && g[3].iter().all(|v| *v == 0.0));
    assert!(g[0].iter().any(|v| *v != 0.0));
    // Softmax gradient rows sum to zero.
    assert!(g[0].iter().sum::<f32>().abs() < 1e-6);

    // Everything ignored: loss 0, finite zero gradient.
    let none = Tensor::new(&[99u32; 4], &dev()).unwrap();
    let loss = cross_entropy(logits.as_tensor(), &none, Some(99)).unwrap();
    assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
    let g = loss.backward().unwrap();
    let g = g.get(logits.as_tensor()).unwrap();
    assert!(!is_nonzero(g));

    // An out-of-vocabulary target is an error, not a panic.
    let bad = Tensor::new(&[1u32, 5, 0, 2], &dev()).unwrap();
    assert!(cross_entropy(logits.as_tensor(), &bad, None).is_err());
    assert!(cross_entropy(
        logits.as_tensor(),
        &Tensor::new(&[1u32], &dev()).unwrap(),
        None
    )
    .is_err());
}

#[test]
fn causal_lm_loss_shifts_and_masks() {
    let (b, t, v) = (2, 4, 6);
    let logits = randn(&[b, t, v], 17);
    let ids = Tensor::new(&[[1u32, 2, 3, 4], [5, 0, 1, 2]], &dev()).unwrap();
    let loss = causal_lm_loss(&logits, &ids, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let pred = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape((b * (t - 1), v))
        .unwrap();
    let tgt = Tensor::new(&[2u32, 3, 4, 0, 1, 2], &dev()).unwrap();
    let want = cross_entropy(&pred, &tgt, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((loss - want).abs() < 1e-6);

    // Mask out the second sequence's last two predictions.
    let mask = Tensor::new(&[[1f32, 1., 1., 1.], [1., 1., 0., 0.]], &dev()).unwrap();
    let masked = causal_lm_loss(&logits, &ids, Some(&mask))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let tgt = Tensor::new(&[2u32, 3, 4, 0, 99, 99], &dev()).unwrap();
    let want = cross_entropy(&pred, &tgt, Some(99))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((masked - want).abs() < 1e-6);

    // Per-sequence log-likelihoods sum the same terms.
    let seq = sequence_log_probs(&logits, &ids, None)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let per_tok = token_log_probs(&pred, &Tensor::new(&[2u32, 3, 4, 0, 1, 2], &dev()).unwrap())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((seq[0] - per_tok[..3].iter().sum::<f32>()).abs() < 1e-5);
    assert!((seq[1] - per_tok[3..].iter().sum::<f32>()).abs() < 1e-5);

    assert!(causal_lm_loss(&logits, &ids.narrow(1, 0, 3).unwrap(), None).is_err());
    let short = randn(&[1, 1, v], 18);
    assert!(causal_lm_loss(&short, &Tensor::new(&[[1u32]], &dev()).unwrap(), None).is_err());
}

/// candle's max_pool2d backward hands a unique maximum 1/4 of its gradient;
/// ours hands it all of it. If a candle upgrade fixes it, this test says so.
#[test]
fn max_pool_routes_the_full_gradient_to_the_maximum() {
    let x = Var::from_tensor(
        &Tensor::new(&[[[[1f32, 2., 0., 5.], [3., 4., -1., 0.]]]], &dev()).unwrap(),
    )
    .unwrap();
    let ours = max_pool2x2(x.as_tensor()).unwrap();
    assert_eq!(
        ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![4.0, 5.0]
    );
    let g = ours.sum_all().unwrap().backward().unwrap();
    let g = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(g, vec![0., 0., 0., 1., 0., 1., 0., 0.]);

    let theirs = x.as_tensor().max_pool2d(2).unwrap();
    assert_eq!(max_abs_diff(&theirs, &ours), 0.0, "same values");
    let g = theirs.sum_all().unwrap().backward().unwrap();
    let g = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(
        g[3], 0.25,
        "candle's max_pool2d backward changed: re-check it"
    );

    // Larger random input: the gradient is the arg-max indicator.
    let x = Var::from_tensor(&randn(&[2, 3, 6, 8], 19)).unwrap();
    let y = max_pool2x2(x.as_tensor()).unwrap();
    assert_eq!(max_abs_diff(&y, &x.as_tensor().max_pool2d(2).unwrap()), 0.0);
    let g = y.sum_all().unwrap().backward().unwrap();
    let total = g
        .get(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(
        total,
        (2 * 3 * 3 * 4) as f32,
        "one unit of gradient per window"
    );
    assert!(max_pool2x2(&randn(&[1, 1, 3, 4], 1)).is_err());
}

/// `f(inputs)` and the gradients of `sum(f(inputs) * probe)` (a fixed
/// random probe) with respect to every input.
fn output_and_gradients(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>) {
    output_and_gradients_on(&dev(), inputs, f)
}

/// Largest difference between the gradients of `t` in two stores.
fn grad_diff(
    a: &candle_core::backprop::GradStore,
    b: &candle_core::backprop::GradStore,
    t: &Tensor,
) -> f32 {
    max_abs_diff(a.get(t).unwrap(), b.get(t).unwrap())
}

/// Runs `f` on fresh Vars made from `inputs`, once with the fused kernels and
/// once with the primitive ops, and checks that outputs and the gradients of
/// `sum(out * probe)` w.r.t. every input agree.
fn check_fused(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, tol: f32) {
    let (out_f, g_f) = output_and_gradients(inputs, &f);
    let (out_r, g_r) = output_and_gradients(inputs, |ts| with_reference(|| f(ts)));
    assert_eq!(out_f.dims(), out_r.dims(), "{name}: shapes");
    let d = max_abs_diff(&out_f, &out_r);
    assert!(d < tol, "{name}: outputs differ by {d}");
    for (i, (a, b)) in g_f.iter().zip(&g_r).enumerate() {
        assert_eq!(a.dims(), b.dims(), "{name}: gradient {i} shape");
        let d = max_abs_diff(a, b);
        assert!(d < tol, "{name}: gradient {i} differs by {d}");
        assert!(is_nonzero(a), "{name}: gradient {i} is zero");
    }
}

#[test]
fn fused_max_pool_matches_reference() {
    check_fused(
        "max_pool2x2",
        &[randn(&[3, 4, 6, 8], 23)],
        |t| max_pool2x2(&t[0]).unwrap(),
        1e-6,
    );
    // Ties, as in a flat background: whole windows of one value, and
    // equal entries within and across rows.
    let ties = randn(&[2, 3, 6, 8], 25)
        .round()
        .unwrap()
        .clamp(-1f32, 1f32)
        .unwrap();
    check_fused(
        "max_pool2x2 with ties",
        &[ties],
        |t| max_pool2x2(&t[0]).unwrap(),
        1e-6,
    );
    check_fused(
        "max_pool2x2 of a constant",
        &[Tensor::ones((1, 2, 4, 4), DType::F32, &dev()).unwrap()],
        |t| max_pool2x2(&t[0]).unwrap(),
        1e-6,
    );
    // A non-contiguous input (height and width swapped).
    check_fused(
        "max_pool2x2 of a transpose",
        &[randn(&[2, 3, 8, 6], 24)],
        |t| max_pool2x2(&t[0].transpose(2, 3).unwrap()).unwrap(),
        1e-6,
    );
}

#[test]
fn fused_rms_norm_matches_reference() {
    check_fused(
        "rms_norm",
        &[randn(&[2, 5, 16], 20), randn(&[16], 21)],
        |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        1e-5,
    );
}

#[test]
fn fused_rotary_matches_reference() {
    let rot = Rotary::new(8, 32, 10_000.0, &dev()).unwrap();
    check_fused(
        "rope",
        &[randn(&[2, 5, 3, 8], 22)],
        |t| rot.apply_bthd(&t[0], 4).unwrap(),
        1e-5,
    );
    assert!(rot.apply_bthd(&randn(&[1, 30, 1, 8], 1), 4).is_err());
}

#[test]
fn fused_causal_attention_matches_masked_reference() {
    // Grouped-query heads, and a query block at the end of a longer key sequence.
    for (h, hk, t, s) in [(4, 2, 6, 6), (2, 2, 3, 7), (6, 1, 5, 5)] {
        let inputs = [
            randn(&[2, h, t, 8], 23),
            randn(&[2, hk, s, 8], 24),
            randn(&[2, hk, s, 8], 25),
        ];
        check_fused(
            "attention",
            &inputs,
            |x| causal_attention(&x[0], &x[1], &x[2]).unwrap(),
            1e-5,
        );
    }
    let out = causal_attention(
        &randn(&[1, 2, 4, 8], 1),
        &randn(&[1, 2, 4, 8], 2),
        &randn(&[1, 2, 4, 8], 3),
    )
    .unwrap();
    let reference = attention(
        &randn(&[1, 2, 4, 8], 1),
        &randn(&[1, 2, 4, 8], 2),
        &randn(&[1, 2, 4, 8], 3),
        &causal_mask(4, &dev()).unwrap(),
    )
    .unwrap();
    assert!(
        max_abs_diff(&out, &reference) < 1e-5,
        "same as the explicit causal mask"
    );
    assert!(causal_attention(
        &randn(&[1, 2, 5, 8], 1),
        &randn(&[1, 2, 4, 8], 2),
        &randn(&[1, 2, 4, 8], 3)
    )
    .is_err());
}

#[test]
fn fused_swiglu_matches_reference() {
    check_fused(
        "swiglu",
        &[randn(&[3, 7, 10], 26), randn(&[3, 7, 10], 27)],
        |t| swiglu(&t[0], &t[1]).unwrap(),
        1e-5,
    );
    assert!(swiglu(&randn(&[2, 3], 1), &randn(&[3, 2], 2)).is_err());
}

#[test]
fn fused_token_log_probs_match_reference() {
    let targets = Tensor::new(&[3u32, 0, 9, 4, 4, 1], &dev()).unwrap();
    check_fused(
        "nll",
        &[(randn(&[6, 10], 28) * 4.0).unwrap()],
        |t| token_log_probs(&t[0], &targets).unwrap(),
        1e-5,
    );
}

#[test]
fn fused_conv2d_matches_candle_conv2d() {
    for (n, cin, cout, k, stride, pad, size, bias) in [
        (2, 3, 4, 3, 1, 1, 8, true),
        (2, 4, 6, 3, 2, 1, 9, false),
        (2, 2, 3, 1, 2, 0, 8, false),
        (2, 3, 2, 5, 1, 0, 7, true),
        // Padding wider than a tap reaches (rows and columns of pure
        // padding), and a stride larger than the kernel's half.
        (2, 2, 3, 3, 2, 2, 6, false),
        (2, 2, 2, 5, 3, 2, 9, true),
        // Pointwise (the image is its own column matrix).
        (3, 4, 5, 1, 1, 0, 6, false),
        // More images than one partial sum of the kernel gradient holds.
        (19, 2, 3, 3, 1, 1, 5, false),
        // Products summed in depth blocks (module `depth`): the forward
        // (72 x 576 by 576 x 100) and the kernel gradient (4 x 576 by
        // 576 x 72).
        (2, 64, 72, 3, 1, 1, 10, false),
        (2, 8, 4, 3, 1, 1, 24, true),
    ] {
        let mut inputs = vec![
            randn(&[n, cin, size, size], 30),
            randn(&[cout, cin, k, k], 31),
        ];
        if bias {
            inputs.push(randn(&[cout], 32));
        }
        check_fused(
            "conv2d",
            &inputs,
            |t| conv2d(&t[0], &t[1], t.get(2), stride, pad).unwrap(),
            1e-4,
        );
    }
    assert!(conv2d(
        &randn(&[1, 3, 4, 4], 1),
        &randn(&[2, 2, 3, 3], 2),
        None,
        1,
        1
    )
    .is_err());
    assert!(conv2d(
        &randn(&[1, 3, 4, 4], 1),
        &randn(&[2, 3, 3, 3], 2),
        None,
        0,
        1
    )
    .is_err());
}

#[test]
fn linear_product_matches_matmul_and_its_gradients() {
    // Rows cut into blocks (600 > 512), depth in three blocks (1100), and
    // a product gemm sums in one pass.
    for (m, k, n) in [(600, 1100, 5), (130, 700, 4), (7, 300, 3)] {
        let inputs = [randn(&[m, k], 60), randn(&[n, k], 61)];
        let (ours, g_ours) =
            output_and_gradients(&inputs, |t| linear_product(&t[0], &t[1]).unwrap());
        let (plain, g_plain) =
            output_and_gradients(&inputs, |t| t[0].matmul(&t[1].t().unwrap()).unwrap());
        assert_eq!(ours.dims(), &[m, n]);
        let d = max_abs_diff(&ours, &plain);
        assert!(d < 1e-4, "{m}x{k}x{n}: values differ by {d}");
        for (i, (a, b)) in g_ours.iter().zip(&g_plain).enumerate() {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-4, "{m}x{k}x{n}: gradient {i} differs by {d}");
            assert!(is_nonzero(a), "{m}x{k}x{n}: gradient {i} is zero");
        }
    }
    assert!(linear_product(&randn(&[2, 3], 1), &randn(&[4, 5], 2)).is_err());
}

/// FNV-1a over the bit patterns of `ts`' values.
fn fingerprint(ts: &[Tensor]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for t in ts {
        for b in bits(t) {
            for byte in b.to_le_bytes() {
                h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    h
}

/// The cross-host guarantee of module `depth`: these products (a deep
/// convolution forward, a convolution kernel gradient over 576 pixels, a
/// linear head 2048 deep, and their input gradients) give the same bits on
/// every x86-64 host with FMA, whatever its caches. The value was recorded
/// on an AMD EPYC (32 KiB 8-way L1, gemm's depth block 512); before module
/// `depth`, a host with a 48 KiB 12-way L1 (block 1024) gave other bits.
/// A change here means a change in the CPU arithmetic of training, so in
/// every recorded crafting and victim result: rerun them.
#[test]
fn deep_products_give_the_same_bits_on_every_x86_fma_host() {
    #[cfg(target_arch = "x86_64")]
    let fma = std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let fma = false;
    if !fma {
        eprintln!("not an x86-64 host with FMA and AVX2: other gemm kernels, other bits");
        return;
    }
    let (y1, g1) = output_and_gradients(
        &[randn(&[2, 64, 10, 10], 70), randn(&[72, 64, 3, 3], 71)],
        |t| conv2d(&t[0], &t[1], None, 1, 1).unwrap(),
    );
    let (y2, g2) = output_and_gradients(
        &[randn(&[2, 8, 24, 24], 72), randn(&[4, 8, 3, 3], 73)],
        |t| conv2d(&t[0], &t[1], None, 1, 1).unwrap(),
    );
    let (y3, g3) = output_and_gradients(&[randn(&[128, 2048], 74), randn(&[4, 2048], 75)], |t| {
        linear_product(&t[0], &t[1]).unwrap()
    });
    let all: Vec<Tensor> = [vec![y1, y2, y3], g1, g2, g3].concat();
    assert_eq!(fingerprint(&all), GOLDEN, "{:#x}", fingerprint(&all));
}

/// [`deep_products_give_the_same_bits_on_every_x86_fma_host`]'s record.
const GOLDEN: u64 = 0xb1e8_16cb_2fd1_611f;

#[test]
fn fused_conv2d_differentiates_only_what_is_tracked() {
    let x = Var::from_tensor(&randn(&[5, 3, 7, 7], 40)).unwrap();
    let k = randn(&[4, 3, 3, 3], 41);
    // A frozen kernel (a noise step): the input gradient only.
    let loss = |x: &Tensor, k: &Tensor| {
        (conv2d(x, k, None, 2, 1).unwrap() * randn(&[5, 4, 4, 4], 42))
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(x.as_tensor(), &k).backward().unwrap();
    let reference = with_reference(|| loss(x.as_tensor(), &k).backward().unwrap());
    let d = grad_diff(&grads, &reference, x.as_tensor());
    assert!(
        d < 1e-4,
        "input gradient with a frozen kernel differs by {d}"
    );
    assert!(grads.get(&k).is_none());
    // Untracked images (training): the kernel gradient only.
    let kv = Var::from_tensor(&k).unwrap();
    let images = x.as_tensor().detach();
    let grads = loss(&images, kv.as_tensor()).backward().unwrap();
    let reference = with_reference(|| loss(&images, kv.as_tensor()).backward().unwrap());
    let d = grad_diff(&grads, &reference, kv.as_tensor());
    assert!(d < 1e-4, "kernel gradient with fixed images differs by {d}");
    assert!(grads.get(&images).is_none());
    // Nothing tracked: a plain value.
    assert!(!conv2d(&images, &k, None, 1, 1).unwrap().track_op());
}

#[test]
fn kernel_gradient_partials_stay_within_their_memory_budget() {
    use kernels::{images_per_partial, PARTIALS_BUDGET};
    // Small kernels (the CNNs): partials of 8 images.
    assert_eq!(images_per_partial(512, 128 * 64 * 9), 8);
    assert_eq!(images_per_partial(3, 128 * 64 * 9), 8);
    // ResNet-18's widest kernel (512 x 512 x 3 x 3): fewer, larger partials.
    let wide = 512 * 512 * 9;
    let chunk = images_per_partial(512, wide);
    assert!(chunk > 8);
    assert!(512usize.div_ceil(chunk) * wide <= PARTIALS_BUDGET);
    // A kernel larger than the budget: one partial.
    assert_eq!(images_per_partial(100, PARTIALS_BUDGET + 1), 100);
}

#[test]
fn fused_relu_matches_candle_relu_and_its_gradient() {
    // Zeros included: candle passes the gradient at 0, and so must we.
    let x = Tensor::new(&[[-1.5f32, 0.0, 2.0], [0.25, -0.0, -3.0]], &dev()).unwrap();
    let x = Tensor::cat(&[x, randn(&[2, 3], 43)], 0).unwrap();
    let (out_f, g_f) = output_and_gradients(std::slice::from_ref(&x), |t| relu(&t[0]).unwrap());
    let (out_r, g_r) = output_and_gradients(std::slice::from_ref(&x), |t| {
        with_reference(|| relu(&t[0]).unwrap())
    });
    assert_eq!(
        out_f.to_vec2::<f32>().unwrap(),
        out_r.to_vec2::<f32>().unwrap()
    );
    assert_eq!(
        g_f[0].to_vec2::<f32>().unwrap(),
        g_r[0].to_vec2::<f32>().unwrap()
    );
    let g = g_f[0].to_vec2::<f32>().unwrap();
    assert_eq!(g[0][0], 0.0, "a negative input passes no gradient");
    assert_ne!(g[0][1], 0.0, "a zero input passes the gradient");
}

#[test]
fn im2col_from_primitive_ops_matches_candle_conv2d() {
    // The GPU path of `conv2d`, run here on the CPU: the same product as
    // the fused kernel, with im2col (and so its backward) from narrow,
    // reshape and stack.
    for (cin, cout, k, stride, pad, size) in [
        (3, 4, 3, 1, 1, 8),
        (4, 6, 3, 2, 1, 9),
        (4, 6, 3, 2, 1, 8),
        (2, 3, 1, 2, 0, 8),
        (3, 2, 5, 1, 0, 7),
        (2, 2, 3, 3, 2, 10),
    ] {
        let inputs = [
            randn(&[2, cin, size, size], 40),
            randn(&[cout, cin, k, k], 41),
        ];
        let via_ops = |t: &[Tensor]| {
            let (n, c, h, w) = t[0].dims4().unwrap();
            let oh = (h + 2 * pad - k) / stride + 1;
            let ow = (w + 2 * pad - k) / stride + 1;
            let cols = im2col_ops(&t[0], (k, k), stride, pad, (oh, ow)).unwrap();
            t[1].reshape((cout, c * k * k))
                .unwrap()
                .matmul(&cols)
                .unwrap()
                .reshape((cout, n, oh, ow))
                .unwrap()
                .transpose(0, 1)
                .unwrap()
        };
        let case = format!("cin {cin} k {k} stride {stride} pad {pad} size {size}");
        assert_same_as_candle_conv(&case, &inputs, via_ops, stride, pad);
    }
}

/// Checks that `ours` gives candle's `conv2d(inputs[0], inputs[1], pad,
/// stride)` and the same, non-zero, gradients for both inputs.
fn assert_same_as_candle_conv(
    case: &str,
    inputs: &[Tensor],
    ours: impl Fn(&[Tensor]) -> Tensor,
    stride: usize,
    pad: usize,
) {
    let candle = |t: &[Tensor]| t[0].conv2d(&t[1], pad, stride, 1, 1).unwrap();
    let (a, ga) = output_and_gradients(inputs, ours);
    let (b, gb) = output_and_gradients(inputs, candle);
    assert_eq!(a.dims(), b.dims(), "{case}");
    assert!(max_abs_diff(&a, &b) < 1e-4, "{case}: outputs");
    for (x, y) in ga.iter().zip(&gb) {
        assert_eq!(x.dims(), y.dims(), "{case}: gradient shape");
        assert!(max_abs_diff(x, y) < 1e-4, "{case}: gradients");
        assert!(is_nonzero(x), "{case}: zero gradient");
    }
}

#[test]
fn conv_with_gemm_backward_matches_candle_conv2d() {
    // The default GPU path of `conv2d`, run here on the CPU: candle's
    // forward, the input gradient as a convolution of the dilated output
    // gradient with the flipped kernel, the kernel gradient only when the
    // kernel is tracked. Covers odd and even sizes at strides 1-3 (the
    // rows a strided forward drops), 1x1 and non-square kernels, and a
    // padding wider than the kernel (the transposed-convolution fallback).
    for (cin, cout, (kh, kw), stride, pad, size) in [
        (3, 4, (3, 3), 1, 1, 8),
        (4, 6, (3, 3), 2, 1, 9),
        (4, 6, (3, 3), 2, 1, 8),
        (2, 3, (1, 1), 2, 0, 8),
        (3, 2, (5, 5), 1, 0, 7),
        (2, 2, (3, 3), 3, 2, 10),
        (2, 3, (3, 3), 3, 0, 11),
        (3, 2, (3, 5), 1, 2, 9),
        (2, 2, (1, 1), 1, 1, 6),
    ] {
        let inputs = [
            randn(&[2, cin, size, size], 50),
            randn(&[cout, cin, kh, kw], 51),
        ];
        let ours =
            |t: &[Tensor]| conv_grad::conv2d_gemm_backward(&t[0], &t[1], stride, pad).unwrap();
        let case = format!("cin {cin} k {kh}x{kw} stride {stride} pad {pad} size {size}");
        assert_same_as_candle_conv(&case, &inputs, ours, stride, pad);
    }
    // Frozen kernel (a PGD step): only the input gets a gradient, and it is
    // the same one.
    let x = Var::from_tensor(&randn(&[2, 3, 8, 8], 52)).unwrap();
    let k = randn(&[4, 3, 3, 3], 53);
    let y = conv_grad::conv2d_gemm_backward(x.as_tensor(), &k, 2, 1).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&k).is_none(), "a frozen kernel got a gradient");
    let reference = x
        .as_tensor()
        .conv2d(&k, 1, 2, 1, 1)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let d = grad_diff(&grads, &reference, x.as_tensor());
    assert!(
        d < 1e-4,
        "input gradient with a frozen kernel differs by {d}"
    );
    // Nothing tracked: a plain value, no graph.
    let plain = conv_grad::conv2d_gemm_backward(&randn(&[1, 3, 5, 5], 54), &k, 1, 1).unwrap();
    assert!(!plain.track_op());
}

#[test]
fn batch_norm_folded_into_the_convolution_matches_the_two_ops() {
    // Off the CPU kernels (`with_reference`), evaluation-mode batch norm is
    // folded into the convolution; on them it is conv2d + fused batch norm.
    // Values and the gradients of the input, the kernel, both biases and
    // the batch norm's scale agree.
    let mean = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0], &dev()).unwrap();
    let var = Tensor::new(&[1.5f32, 0.5, 2.0, 0.01], &dev()).unwrap();
    for (stride, padding, with_bias) in [(1, 1, false), (2, 1, true), (2, 0, false)] {
        let inputs = [
            randn(&[3, 2, 7, 7], 60),
            randn(&[4, 2, 3, 3], 61),
            randn(&[4], 62),
            randn(&[4], 63),
            randn(&[4], 64),
        ];
        check_fused(
            &format!("conv-bn-eval stride {stride} padding {padding} bias {with_bias}"),
            &inputs,
            |t| {
                let conv_bias = with_bias.then_some(&t[2]);
                // Without a conv bias the third input is used elsewhere,
                // so that every input has a gradient to compare.
                let extra = if with_bias {
                    t[3].clone()
                } else {
                    (&t[3] + &t[2]).unwrap()
                };
                conv2d_batch_norm_eval(
                    &t[0],
                    (&t[1], conv_bias),
                    stride,
                    padding,
                    (&extra, &t[4]),
                    (&mean, &var),
                    1e-5,
                )
                .unwrap()
            },
            1e-4,
        );
    }
    let x = randn(&[1, 2, 5, 5], 65);
    let k = randn(&[4, 2, 3, 3], 66);
    let bad = Tensor::new(&[1f32, 2.0], &dev()).unwrap();
    for t in [
        ((&bad, &mean), (&mean, &var)),
        ((&mean, &mean), (&bad, &var)),
    ] {
        let e = conv2d_batch_norm_eval(&x, (&k, None), 1, 1, t.0, t.1, 1e-5).unwrap_err();
        assert!(e.to_string().contains("4 output channels"), "{e}");
    }
}

#[test]
fn fused_batch_norm_matches_reference_in_both_modes() {
    let x = (randn(&[4, 3, 5, 5], 33) * 2.0)
        .unwrap()
        .affine(1.0, 0.5)
        .unwrap();
    check_fused(
        "bn-train",
        &[x.clone(), randn(&[3], 34), randn(&[3], 35)],
        |t| batch_norm2d(&t[0], &t[1], &t[2], None, 1e-5).unwrap(),
        1e-4,
    );
    let mean = Tensor::new(&[0.1f32, -0.2, 0.3], &dev()).unwrap();
    let var = Tensor::new(&[1.5f32, 0.5, 2.0], &dev()).unwrap();
    check_fused(
        "bn-eval",
        &[x.clone(), randn(&[3], 36), randn(&[3], 37)],
        |t| batch_norm2d(&t[0], &t[1], &t[2], Some((&mean, &var)), 1e-5).unwrap(),
        1e-4,
    );
    let (m, v) = channel_stats(&x).unwrap();
    let (mr, vr) = with_reference(|| channel_stats(&x).unwrap());
    assert!(max_abs_diff(&m, &mr) < 1e-5 && max_abs_diff(&v, &vr) < 1e-4);
}

#[test]
fn channel_bias_op_matches_broadcast_addition_and_skips_a_frozen_bias() {
    // The op CUDA runs (its CPU form here): values and gradients of a
    // broadcast addition, and no gradient for an untracked bias.
    let x = randn(&[2, 3, 4, 5], 70);
    let b = randn(&[3], 71);
    let reference = |t: &[Tensor]| {
        t[0].broadcast_add(&t[1].reshape((1, 3, 1, 1)).unwrap())
            .unwrap()
    };
    let op = |t: &[Tensor]| t[0].apply_op2(&t[1], kernels::ChannelBias).unwrap();
    let (out_r, g_r) = output_and_gradients(&[x.clone(), b.clone()], reference);
    let (out_o, g_o) = output_and_gradients(&[x.clone(), b.clone()], op);
    assert_eq!(max_abs_diff(&out_r, &out_o), 0.0);
    assert_eq!(max_abs_diff(&g_r[0], &g_o[0]), 0.0);
    assert!(max_abs_diff(&g_r[1], &g_o[1]) < 1e-5);
    assert!(is_nonzero(&g_o[1]));
    let xv = Var::from_tensor(&x).unwrap();
    let y = xv.as_tensor().apply_op2(&b, kernels::ChannelBias).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&b).is_none());
    assert!(grads.get(xv.as_tensor()).is_some());
    assert!(channel_bias(&x, &randn(&[4], 72)).is_err());
}

/// [`output_and_gradients`] on `device`, the results brought back to the
/// CPU.
fn output_and_gradients_on(
    device: &Device,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(device).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let probe = randn(out.dims(), 99).to_device(device).unwrap();
    let grads = (&out * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gs = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).unwrap().to_device(&dev()).unwrap())
        .collect();
    (out.to_device(&dev()).unwrap(), gs)
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_kernels_match_the_cpu() {
    // Runs where a CUDA device is present (the `cuda` build is only run
    // on such machines: it needs the driver to start at all).
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    // Exact zeros in the input: the ReLU gradient passes there on both.
    let x = randn(&[3, 4, 6, 6], 80)
        .broadcast_mul(
            &Tensor::new(&[1f32, 0.0, 1.0, 1.0], &dev())
                .unwrap()
                .reshape((1, 4, 1, 1))
                .unwrap(),
        )
        .unwrap();
    let b = randn(&[4], 81);
    // Tolerances relative to the largest value: the element-wise kernels
    // are exact; cuDNN may run the convolution in TF32 (10-bit mantissa).
    type Case = (
        &'static str,
        f32,
        Vec<Tensor>,
        Box<dyn Fn(&[Tensor]) -> Tensor>,
    );
    let cases: Vec<Case> = vec![
        (
            "relu",
            0.0,
            vec![x.clone()],
            Box::new(|t: &[Tensor]| relu(&t[0]).unwrap()),
        ),
        (
            "channel bias",
            1e-6,
            vec![x.clone(), b.clone()],
            Box::new(|t: &[Tensor]| channel_bias(&t[0], &t[1]).unwrap()),
        ),
        (
            "conv + batch norm (eval)",
            1e-2,
            vec![
                x.clone(),
                randn(&[5, 4, 3, 3], 82),
                randn(&[5], 83),
                randn(&[5], 84),
            ],
            Box::new(|t: &[Tensor]| {
                let d = t[0].device();
                let mean = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0, 0.5], d).unwrap();
                let var = Tensor::new(&[1.5f32, 0.5, 2.0, 0.01, 1.0], d).unwrap();
                relu(
                    &conv2d_batch_norm_eval(
                        &t[0],
                        (&t[1], None),
                        2,
                        1,
                        (&t[2], &t[3]),
                        (&mean, &var),
                        1e-5,
                    )
                    .unwrap(),
                )
                .unwrap()
            }),
        ),
    ];
    for (name, tol, inputs, f) in cases {
        let (out_c, g_c) = output_and_gradients_on(&dev(), &inputs, &f);
        let (out_g, g_g) = output_and_gradients_on(&gpu, &inputs, &f);
        let d = max_abs_diff(&out_c, &out_g);
        println!("{name}: output differs by {d}");
        assert!(
            d <= 1e-3 * max_abs(&out_c).max(1.0),
            "{name}: output differs by {d}"
        );
        for (i, (c, g)) in g_c.iter().zip(&g_g).enumerate() {
            let d = max_abs_diff(c, g);
            println!("{name}: gradient {i} differs by {d}");
            assert!(is_nonzero(c), "{name}: gradient {i} is zero");
            assert!(
                d <= tol * max_abs(c).max(1.0),
                "{name}: gradient {i} differs by {d}"
            );
        }
    }
}

#[cfg(feature = "cudnn")]
#[test]
fn cudnn_algorithm_asked_once_gives_candles_numbers() {
    // The cached algorithm is the one candle's per-call heuristic picks:
    // the same values bit for bit, first call (asked) and later (cached).
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    for (x, k, padding, stride, dilation) in [
        (vec![8, 16, 32, 32], vec![32, 16, 3, 3], 1, 1, 1),
        (vec![8, 32, 32, 32], vec![64, 32, 3, 3], 1, 2, 1),
        (vec![8, 32, 16, 16], vec![64, 32, 1, 1], 0, 2, 1),
        (vec![4, 3, 9, 9], vec![5, 3, 3, 3], 0, 1, 2),
    ] {
        let x = randn(&x, 90).to_device(&gpu).unwrap();
        let k = randn(&k, 91).to_device(&gpu).unwrap();
        // Contiguous, then a strided view (as the dilated gradients of
        // stride-2 convolutions are).
        let (h, w) = (x.dim(2).unwrap(), x.dim(3).unwrap());
        let view = x.narrow(2, 1, h - 1).unwrap().narrow(3, 0, w - 1).unwrap();
        assert!(!view.is_contiguous());
        for x in [x, view] {
            let candle = x.conv2d(&k, padding, stride, dilation, 1).unwrap();
            for call in 0..2 {
                let ours = cudnn_algo::conv2d(&x, &k, padding, stride, dilation).unwrap();
                assert_eq!(ours.dims(), candle.dims());
                let d = max_abs_diff(&ours, &candle);
                assert_eq!(d, 0.0, "call {call}: {:?} differs by {d}", x.dims());
            }
        }
    }
}
