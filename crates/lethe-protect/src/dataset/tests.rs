//! The release grid and the budget: what is published never moves a value
//! further than eps.

use super::*;

fn two_images(levels: Option<u32>, values: Vec<f32>) -> Dataset {
    let shape = ImageShape {
        channels: 1,
        height: 1,
        width: values.len() / 2,
    };
    Dataset::new(
        "t",
        shape,
        values,
        vec![0, 1],
        vec!["a".into(), "b".into()],
        vec![Item::in_memory(levels), Item::in_memory(levels)],
        Format::Generated,
    )
    .unwrap()
}

#[test]
fn budget_steps_are_the_whole_steps_within_eps() {
    assert_eq!(budget_steps(8.0 / 255.0, 255), 8);
    assert_eq!(budget_steps(f64::from(8.0f32 / 255.0), 255), 8);
    assert_eq!(budget_steps(0.03, 255), 7);
    assert_eq!(budget_steps(8.0 / 255.0, 65535), 2056);
    assert_eq!(budget_steps(0.03, 4095), 122);
    assert_eq!(budget_steps(0.5 / 255.0, 255), 0);
    assert_eq!(budget_steps(f64::NAN, 255), 0);
    assert_eq!(budget_steps(2.0, 255), 255);
}

#[test]
fn quantize_within_never_exceeds_eps_on_the_grid() {
    let clean = two_images(Some(255), vec![0.0, 100.0 / 255.0, 1.0, 50.0 / 255.0]);
    let eps = 0.03; // 7.65 steps
    let noisy = clean
        .with_pixels(vec![
            0.03,
            (100.0 / 255.0) - 0.03,
            1.0,
            50.0 / 255.0 + 0.0149,
        ])
        .unwrap();
    // Nearest-step rounding would move the first two by 8 steps.
    let plain = (noisy.pixels()[0] * 255.0).round() / 255.0;
    assert!((plain - 8.0 / 255.0).abs() < 1e-7);
    let released = noisy.quantize_within(&clean, eps).unwrap();
    let steps: Vec<i32> = released
        .pixels()
        .iter()
        .zip(clean.pixels())
        .map(|(r, c)| ((r - c) * 255.0).round() as i32)
        .collect();
    assert_eq!(steps, vec![7, -7, 0, 4]);
    for (r, c) in released.pixels().iter().zip(clean.pixels()) {
        assert!(f64::from((r - c).abs()) <= eps + 1e-7);
        assert!(
            ((r * 255.0) - (r * 255.0).round()).abs() < 1e-4,
            "on the grid"
        );
    }
}

#[test]
fn floating_point_items_are_clamped_to_eps() {
    let clean = two_images(None, vec![0.5, 0.2, 0.9, 0.0]);
    let noisy = clean.with_pixels(vec![0.6, 0.1, 1.0, 0.001]).unwrap();
    let released = noisy.quantize_within(&clean, 0.05).unwrap();
    let expect = [0.55, 0.15, 0.95, 0.001];
    for (r, e) in released.pixels().iter().zip(expect) {
        assert!((r - e).abs() < 1e-6, "{r} vs {e}");
    }
    let other = two_images(None, vec![0.5, 0.2, 0.9, 0.0, 0.1, 0.1]);
    assert!(noisy.quantize_within(&other, 0.05).is_err());
}

#[test]
fn check_eps_refuses_a_budget_below_one_step_and_notes_a_partial_one() {
    let clean = two_images(Some(255), vec![0.0, 0.5, 1.0, 0.5]);
    assert_eq!(clean.check_eps(8.0 / 255.0).unwrap(), None);
    let note = clean.check_eps(0.03).unwrap().unwrap();
    assert!(note.contains("capped at 7 steps"), "{note}");
    let err = clean.check_eps(0.001).unwrap_err().to_string();
    assert!(err.contains("below one step"), "{err}");
    // Floating-point storage has no grid.
    let float = two_images(None, vec![0.0, 0.5, 1.0, 0.5]);
    assert_eq!(float.check_eps(1e-9).unwrap(), None);
}
