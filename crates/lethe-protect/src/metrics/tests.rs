//! Reference values for the quality measures.

use super::*;

fn shape(c: usize, h: usize, w: usize) -> ImageShape {
    ImageShape {
        channels: c,
        height: h,
        width: w,
    }
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 97) as f32 / 120.0 + 0.1).collect()
}

#[test]
fn psnr_of_a_uniform_one_level_shift_is_48_13_db() {
    let a = ramp(3 * 32 * 32);
    let b: Vec<f32> = a.iter().map(|v| v + 1.0 / 255.0).collect();
    let p = psnr(&a, &b).unwrap();
    assert!((p - 48.1308).abs() < 1e-3, "{p}");
    assert_eq!(psnr(&a, &a), None);
}

#[test]
fn ssim_is_one_for_identical_images_and_drops_with_noise() {
    let s = shape(3, 16, 16);
    let a = ramp(s.values());
    assert!((ssim(&a, &a, s) - 1.0).abs() < 1e-12);
    let b: Vec<f32> = a
        .iter()
        .enumerate()
        .map(|(i, v)| v + if i % 2 == 0 { 0.05 } else { -0.05 })
        .collect();
    let small = ssim(&a, &b, s);
    let c: Vec<f32> = a
        .iter()
        .enumerate()
        .map(|(i, v)| v + if i % 2 == 0 { 0.2 } else { -0.2 })
        .collect();
    let big = ssim(&a, &c, s);
    assert!(small < 1.0 && big < small, "{small} {big}");
}

#[test]
fn ssim_works_on_images_smaller_than_the_window() {
    let s = shape(1, 8, 8);
    let a = ramp(64);
    assert!((ssim(&a, &a, s) - 1.0).abs() < 1e-12);
    let mut b = a.clone();
    b[10] += 0.3;
    let v = ssim(&a, &b, s);
    assert!(v > 0.0 && v < 1.0, "{v}");
}

#[test]
fn norms_count_pixel_locations_once_across_channels() {
    let s = shape(3, 4, 4);
    let a = vec![0.5f32; s.values()];
    let mut b = a.clone();
    // Location 3 changed in two channels, location 7 in one, location 9 by
    // less than half a level (not counted).
    b[3] += 0.02;
    b[16 + 3] -= 0.03;
    b[32 + 7] += 0.01;
    b[9] += 0.001;
    let q = image_quality(&a, &b, s);
    assert!((q.linf - 0.03).abs() < 1e-6);
    assert!((q.l0_fraction - 2.0 / 16.0).abs() < 1e-12);
    let l2 = (0.02f64.powi(2) + 0.03f64.powi(2) + 0.01f64.powi(2) + 0.001f64.powi(2)).sqrt();
    assert!((q.l2 - l2).abs() < 1e-6);
}

#[test]
fn summary_skips_unchanged_images_in_psnr() {
    let s = shape(1, 4, 4);
    let a = vec![0.5f32; 32];
    let mut b = a.clone();
    for v in &mut b[16..] {
        *v += 1.0 / 255.0;
    }
    let (per, sum) = dataset_quality(&a, &b, s);
    assert_eq!(per.len(), 2);
    assert_eq!(sum.unchanged, 1);
    assert!((sum.psnr_mean_db.unwrap() - 48.1308).abs() < 1e-3);
    assert!((sum.psnr_dataset_db.unwrap() - 51.1411).abs() < 1e-3);
}
