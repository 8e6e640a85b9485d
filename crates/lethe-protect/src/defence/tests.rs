//! The countermeasures do what they claim.

use rand::SeedableRng;

use super::*;

fn shape(c: usize, h: usize, w: usize) -> ImageShape {
    ImageShape {
        channels: c,
        height: h,
        width: w,
    }
}

fn smooth(s: ImageShape) -> Vec<f32> {
    (0..s.values())
        .map(|i| {
            let p = i % s.pixels();
            let (y, x) = (p / s.width, p % s.width);
            0.3 + 0.4 * ((x + y) as f32 / (s.width + s.height) as f32)
        })
        .collect()
}

#[test]
fn grayscale_uses_luma_and_keeps_gray_images() {
    let s = shape(3, 1, 2);
    let img = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
    let g = grayscale(&img, s);
    assert!((g[0] - 0.299).abs() < 1e-6 && (g[2] - 0.299).abs() < 1e-6);
    assert!((g[1] - 0.587).abs() < 1e-6);
    let one = shape(1, 1, 2);
    assert_eq!(grayscale(&[0.2, 0.7], one), vec![0.2, 0.7]);
}

#[test]
fn jpeg_removes_small_noise_more_at_low_quality() {
    let s = shape(1, 16, 16);
    let base = smooth(s);
    let noisy: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v + if (i * 7) % 3 == 0 {
                8.0 / 255.0
            } else {
                -8.0 / 255.0
            }
        })
        .collect();
    let err = |out: &[f32]| -> f32 {
        out.iter()
            .zip(&base)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / out.len() as f32
    };
    let q10 = jpeg(&noisy, s, 10).unwrap();
    let q95 = jpeg(&noisy, s, 95).unwrap();
    assert_eq!(q10.len(), noisy.len());
    // Quality 95 keeps the noise, quality 10 smooths it towards the base.
    assert!(err(&q95) > err(&q10), "{} {}", err(&q95), err(&q10));
    let rgb = shape(3, 8, 8);
    assert_eq!(jpeg(&smooth(rgb), rgb, 50).unwrap().len(), rgb.values());
}

#[test]
fn blur_and_median_keep_constants_and_remove_impulses() {
    let s = shape(1, 7, 7);
    let flat = vec![0.4f32; 49];
    for v in gaussian_blur(&flat, s, 1.0) {
        assert!((v - 0.4).abs() < 1e-6);
    }
    let mut spike = flat.clone();
    spike[24] = 1.0;
    assert!((median3(&spike, s)[24] - 0.4).abs() < 1e-6);
    assert!(gaussian_blur(&spike, s, 1.0)[24] < 0.7);
}

#[test]
fn flip_crop_and_cutout_move_and_erase_pixels() {
    let s = shape(1, 4, 4);
    let img: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
    let mut rng = StdRng::seed_from_u64(3);
    let mut seen_flip = false;
    for _ in 0..20 {
        let mut x = img.clone();
        flip_crop(&mut x, s, 0, &mut rng);
        if x != img {
            // With no padding only a mirror image is possible.
            assert_eq!(x[0], img[3]);
            seen_flip = true;
        }
    }
    assert!(seen_flip);
    let mut x = vec![1.0f32; 16];
    cutout(&mut x, s, 2, &mut rng);
    let zeros = x.iter().filter(|&&v| v == 0.0).count();
    assert!((1..=4).contains(&zeros), "{zeros}");
}

#[test]
fn beta_draws_lie_in_the_unit_interval() {
    let mut rng = StdRng::seed_from_u64(1);
    let draws: Vec<f32> = (0..200).map(|_| beta(1.0, &mut rng)).collect();
    assert!(draws.iter().all(|d| (0.0..=1.0).contains(d)));
    let mean = draws.iter().sum::<f32>() / 200.0;
    assert!((mean - 0.5).abs() < 0.1, "{mean}");
}

#[test]
fn bad_defence_parameters_are_refused() {
    assert!(Defence::Jpeg { quality: 0 }.validate().is_err());
    assert!(Defence::Blur { sigma: -1.0 }.validate().is_err());
    assert!(Defence::Adversarial { eps: 0.5, steps: 3 }
        .validate()
        .is_err());
    assert!(Defence::Jpeg { quality: 10 }.validate().is_ok());
    assert_eq!(Defence::Jpeg { quality: 10 }.label(), "jpeg-q10");
}

#[test]
fn labels_say_the_budget_they_ran_with() {
    assert_eq!(
        Defence::Noise { sigma: 8.0 / 255.0 }.label(),
        "noise-s8/255"
    );
    assert_eq!(Defence::Noise { sigma: 0.03 }.label(), "noise-s7.6/255");
    let adv = Defence::Adversarial {
        eps: 4.0 / 255.0,
        steps: 3,
    };
    assert_eq!(adv.label(), "adv-train-eps4/255-k3");
}
