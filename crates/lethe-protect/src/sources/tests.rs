//! The built-in datasets load and the generator is deterministic.

use super::*;

#[test]
fn lesions_are_deterministic_sparse_and_balanced() {
    let spec = LesionSpec {
        seed: 1,
        per_class: 5,
        size: 32,
        texture: 0.04,
    };
    let a = lesions(&spec).unwrap();
    let b = lesions(&spec).unwrap();
    assert_eq!(a.pixels(), b.pixels());
    assert_eq!(a.class_counts(), vec![5; 4]);
    assert_eq!(a.classes(), LESION_CLASSES);
    let zeros = a.pixels().iter().filter(|&&v| v == 0.0).count() as f64;
    let frac = zeros / a.pixels().len() as f64;
    assert!(frac > 0.5, "background fraction {frac}");
    // On the 8-bit grid.
    assert!(a
        .pixels()
        .iter()
        .all(|v| ((v * 255.0).round() - v * 255.0).abs() < 1e-3));
    // More images per class keep the first ones.
    let more = lesions(&LesionSpec {
        per_class: 6,
        ..spec.clone()
    })
    .unwrap();
    assert_eq!(&more.pixels()[..a.pixels().len()], a.pixels());
    let other = lesions(&LesionSpec { seed: 2, ..spec }).unwrap();
    assert_ne!(other.pixels(), a.pixels());
}

#[test]
fn lesion_classes_differ_in_bright_pixels() {
    let d = lesions(&LesionSpec {
        seed: 0,
        per_class: 20,
        size: 32,
        texture: 0.04,
    })
    .unwrap();
    // Lesions are the brightest structures: a normal image rarely has
    // pixels above 0.5, a lesion image usually does.
    let bright = |class: u32| {
        (0..d.len())
            .filter(|&i| d.labels()[i] == class)
            .filter(|&i| d.image(i).iter().any(|&v| v > 0.5))
            .count()
    };
    assert!(bright(0) < 5, "normal: {}", bright(0));
    assert!(bright(1) > 15, "nodule: {}", bright(1));
}

#[test]
fn lesion_class_signal_measures_what_the_lesions_add() {
    // The default 32x32 images, texture 0.04.
    let spec = LesionSpec {
        seed: 3,
        per_class: 12,
        ..LesionSpec::default()
    };
    let signal = lesion_class_signal(&spec).unwrap();
    assert_eq!(signal.len(), 4);
    // `normal` has no lesion; the others change 1-3% of the pixels
    // (module docs), by a squared norm of at least one full-contrast pixel.
    assert_eq!(signal[0].class, "normal");
    assert_eq!((signal[0].energy_mean, signal[0].pixels_mean), (0.0, 0.0));
    for c in &signal[1..] {
        assert_eq!(c.images, 12);
        assert!(c.energy_min > 0.1 && c.energy_min <= c.energy_mean, "{c:?}");
        let fraction = c.pixels_mean / (32.0 * 32.0);
        assert!((0.005..=0.04).contains(&fraction), "{c:?}");
    }
    // A nodule (a disk of radius 2-3) carries more than a thin streak's
    // worth on average.
    assert!(signal[1].energy_mean > signal[3].energy_mean, "{signal:?}");
    assert!(lesion_class_signal(&LesionSpec { size: 8, ..spec }).is_err());
}

#[test]
fn bad_lesion_specs_are_refused() {
    for spec in [
        LesionSpec {
            size: 8,
            ..LesionSpec::default()
        },
        LesionSpec {
            per_class: 0,
            ..LesionSpec::default()
        },
        LesionSpec {
            texture: 1.0,
            ..LesionSpec::default()
        },
    ] {
        assert!(matches!(lesions(&spec), Err(Error::Config(_))));
    }
}

#[test]
fn digits_parse_and_load() {
    let d = digits().unwrap();
    assert_eq!(d.len(), 1797);
    assert_eq!(d.shape().pixels(), 64);
    assert_eq!(d.classes().len(), 10);
    let counts = d.class_counts();
    assert!(
        counts.iter().all(|&c| (174..=183).contains(&c)),
        "{counts:?}"
    );
    let path = std::path::Path::new("digits.csv");
    assert!(parse_digits("1,2,3\n", path).is_err());
    let row = format!("{}17\n", "0,".repeat(64));
    assert!(parse_digits(&row, path).is_err());
}

#[test]
fn lfw_subset_and_dicom_patches_load() {
    let lfw = lfw_subset().unwrap();
    assert_eq!(lfw.len(), 200);
    assert_eq!(lfw.class_counts(), vec![100, 100]);
    assert_eq!(lfw.shape().height, 25);
    let tiles = dicom_patches(16).unwrap();
    assert_eq!(tiles.classes(), ["ct", "mr"]);
    let counts = tiles.class_counts();
    assert!(counts[0] > 50 && counts[1] > 50, "{counts:?}");
    assert!(dicom_patches(4).is_err());
}

#[test]
fn medical_patches_are_balanced_colour_tiles_on_the_8bit_grid() {
    let data = medical_patches(16).unwrap();
    assert_eq!(data.classes(), ["histology", "fundus"]);
    let counts = data.class_counts();
    assert_eq!(counts[0], counts[1]);
    assert!(counts[0] > 500, "{counts:?}");
    let s = data.shape();
    assert_eq!((s.channels, s.height, s.width), (3, 16, 16));
    assert!(data
        .pixels()
        .iter()
        .all(|&v| (0.0..=1.0).contains(&v) && ((v * 255.0).round() - v * 255.0).abs() < 1e-3));
    // Colour, not gray: the channels differ.
    let plane = 16 * 16;
    let differs = (0..data.len()).any(|i| {
        let img = data.image(i);
        img[..plane] != img[plane..2 * plane]
    });
    assert!(differs);
    // Some fundus tiles lie on the field's rim: part black, part retina.
    let fundus = data.labels().iter().position(|&l| l == 1).unwrap();
    let rim = (fundus..data.len()).any(|i| {
        let black = data.image(i).iter().filter(|&&v| v == 0.0).count();
        black > 3 * plane / 4 / 2 && black < 3 * plane - 16
    });
    assert!(rim);
    // Deterministic.
    assert_eq!(medical_patches(16).unwrap().pixels(), data.pixels());
    assert!(medical_patches(4).is_err());
    assert!(medical_patches(64).is_err());
}
