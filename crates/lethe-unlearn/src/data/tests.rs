//! Data containers keep their invariants; digits parse and load.

use std::io::Write;

use super::*;

#[test]
fn text_examples_check_their_invariant() {
    assert!(TextExample::new(vec![1], 0).is_err());
    assert!(TextExample::new(vec![1, 2, 3], 3).is_err());
    let e = TextExample::new(vec![1, 5, 6, 7], 2).unwrap();
    assert_eq!(
        (e.prompt(), e.answer(), e.query()),
        (&[1, 5][..], &[6, 7][..], &[1, 5][..])
    );
    let d = TextExample::document(vec![1, 5, 6]).unwrap();
    assert_eq!(d.query(), &[1, 5, 6]);
    assert!(d.with_answer(&[9]).is_err());
    assert_eq!(e.with_answer(&[9]).unwrap().ids(), &[1, 5, 9]);
    assert!(e.with_answer(&[]).is_err());
}

#[test]
fn batches_pad_right_and_mask_only_answer_tokens() {
    let set = TextSet::new(vec![
        TextExample::new(vec![1, 5, 6], 2).unwrap(),
        TextExample::document(vec![1, 7, 8, 9]).unwrap(),
    ]);
    let b = set.batch(&[0, 1], &Device::Cpu).unwrap();
    assert_eq!(
        b.ids.to_vec2::<u32>().unwrap(),
        vec![vec![1, 5, 6, 0], vec![1, 7, 8, 9]]
    );
    assert_eq!(
        b.loss_mask.to_vec2::<f32>().unwrap(),
        vec![vec![0.0, 0.0, 1.0, 0.0], vec![0.0, 1.0, 1.0, 1.0]]
    );
    assert_eq!(b.lengths, vec![3, 4]);
    assert_eq!(set.target_tokens(), 4);
    assert!(set.batch(&[], &Device::Cpu).is_err());
    assert!(set.batch(&[2], &Device::Cpu).is_err());
    assert!(set.check_fits(10, 4).is_ok());
    assert!(set.check_fits(9, 4).is_err());
    assert!(set.check_fits(10, 3).is_err());
}

#[test]
fn image_sets_subset_and_batch() {
    assert!(ImageSet::new(vec![0.0; 7], vec![0, 1], (1, 2, 2)).is_err());
    assert!(ImageSet::new(vec![f32::NAN; 4], vec![0], (1, 2, 2)).is_err());
    let set = ImageSet::new(
        (0..12).map(|v| v as f32).collect(),
        vec![0, 2, 1],
        (1, 2, 2),
    )
    .unwrap();
    assert_eq!(set.num_classes(), 3);
    assert_eq!(set.indices_where(|l| l != 2), vec![0, 2]);
    let sub = set.subset(&[2, 0]).unwrap();
    assert_eq!(sub.labels(), &[1, 0]);
    assert_eq!(sub.image(0).unwrap(), &[8.0, 9.0, 10.0, 11.0]);
    let (x, y) = set.batch(&[1], &Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[1, 1, 2, 2]);
    assert_eq!(y.to_vec1::<u32>().unwrap(), vec![2]);
    assert!(set.with_labels(vec![0]).is_err());
}

#[test]
fn shuffles_are_permutations_fixed_by_seed() {
    let a = shuffled(50, 3);
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    assert_eq!(a, shuffled(50, 3));
    assert_ne!(a, shuffled(50, 4));
}

fn digit_row(label: u32, fill: u32) -> String {
    let mut fields: Vec<String> = (0..64).map(|_| fill.to_string()).collect();
    fields.push(label.to_string());
    fields.join(",")
}

#[test]
fn digits_parse_scale_and_reject_bad_rows() {
    let text = format!("{}\n{}\n", digit_row(3, 16), digit_row(9, 8));
    let set = digits::parse(&text).unwrap();
    assert_eq!(set.len(), 2);
    assert_eq!(set.labels(), &[3, 9]);
    assert_eq!(set.shape(), (1, 8, 8));
    assert!(set.image(0).unwrap().iter().all(|&p| p == 1.0));
    assert!(set.image(1).unwrap().iter().all(|&p| p == 0.5));
    assert!(digits::parse("").is_err());
    assert!(digits::parse("1,2,3").is_err());
    assert!(digits::parse(&digit_row(10, 0)).is_err());
    assert!(digits::parse(&digit_row(1, 17)).is_err());
    assert!(digits::parse(&digit_row(1, 0).replace(",0,", ",x,")).is_err());
}

#[test]
fn digits_load_from_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("digits.csv.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::default(),
    );
    writeln!(gz, "{}", digit_row(4, 2)).unwrap();
    gz.finish().unwrap();
    let set = digits::load(&path).unwrap();
    assert_eq!(set.labels(), &[4]);
    let missing = digits::load(&dir.path().join("nope.csv.gz")).unwrap_err();
    assert!(missing.to_string().contains("nope.csv.gz"));
}
