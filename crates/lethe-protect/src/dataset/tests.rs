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

/// `files[c]` lists class `c`'s files by frame count (1: a single-frame
/// file), one 1x1 image per frame.
fn framed(files: &[&[u32]]) -> Dataset {
    let (mut labels, mut items) = (Vec::new(), Vec::new());
    for (class, counts) in files.iter().enumerate() {
        for (f, &n) in counts.iter().enumerate() {
            for k in 0..n {
                labels.push(class as u32);
                items.push(Item {
                    path: Some(PathBuf::from(format!("{class}/{f}.dcm"))),
                    sha256: None,
                    levels: Some(255),
                    alpha: None,
                    frame: (n > 1).then_some(k),
                });
            }
        }
    }
    let n = labels.len();
    Dataset::new(
        "t",
        ImageShape {
            channels: 1,
            height: 1,
            width: 1,
        },
        vec![0.5; n],
        labels,
        (0..files.len()).map(|c| c.to_string()).collect(),
        items,
        Format::Generated,
    )
    .unwrap()
}

#[test]
fn split_of_single_images_is_the_per_image_shuffle() {
    // The split every earlier report was made with: per class, shuffle the
    // indices and take round(f * n), clamped to [1, n - 1].
    let data = framed(&[&[1; 9], &[1; 4], &[1; 1], &[1; 30]]);
    for (f, seed) in [(0.25, 0), (0.25, 1), (0.5, 7), (0.05, 3), (0.95, 2)] {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for class in 0..4u32 {
            let mut idx: Vec<usize> = (0..data.len())
                .filter(|&i| data.labels()[i] == class)
                .collect();
            idx.shuffle(&mut rng);
            let n = idx.len();
            let k = if n >= 2 {
                ((f * n as f64).round() as usize).clamp(1, n - 1)
            } else {
                0
            };
            test.extend_from_slice(&idx[..k]);
            train.extend_from_slice(&idx[k..]);
        }
        train.sort_unstable();
        test.sort_unstable();
        assert_eq!(
            data.split(f, seed).unwrap(),
            (train, test),
            "f {f} seed {seed}"
        );
    }
}

#[test]
fn split_keeps_the_frames_of_a_file_together() {
    let data = framed(&[&[3, 3, 3, 3], &[1, 1, 1, 1, 1], &[2, 5], &[4]]);
    for seed in 0..20 {
        let (train, test) = data.split(0.25, seed).unwrap();
        assert_eq!(train.len() + test.len(), data.len());
        let file = |i: &usize| data.items()[*i].path.clone().unwrap();
        let test_files: std::collections::HashSet<_> = test.iter().map(file).collect();
        assert!(
            train.iter().all(|i| !test_files.contains(&file(i))),
            "seed {seed}: a file on both sides"
        );
        let count = |side: &[usize], class: u32| {
            side.iter().filter(|&&i| data.labels()[i] == class).count()
        };
        // Class 0: one whole file of 3 frames (3 of 12 is the 25 %).
        assert_eq!(count(&test, 0), 3, "seed {seed}");
        // Class 1: single images, as before.
        assert_eq!(count(&test, 1), 1, "seed {seed}");
        // Class 2: one of its two files, whichever the shuffle drew.
        assert!([2, 5].contains(&count(&test, 2)), "seed {seed}");
        assert_eq!(count(&train, 2) + count(&test, 2), 7);
        // Class 3 is one file: it stays on the training side.
        assert_eq!(count(&test, 3), 0);
    }
}
