//! How encapsulated fragments are grouped into frames.

use super::rle_frames;

#[test]
fn one_frame_joins_every_fragment() {
    let frags = vec![vec![1, 2], vec![3]];
    assert_eq!(rle_frames(&[0], &frags, 1).unwrap(), [vec![1, 2, 3]]);
    assert_eq!(rle_frames(&[], &frags, 1).unwrap(), [vec![1, 2, 3]]);
}

#[test]
fn offsets_group_fragments_into_frames() {
    // Items: 8-byte header + 2, + 4, + 2: frame 1 starts at the third item.
    let frags = vec![vec![1, 1], vec![2, 2, 2, 2], vec![3, 3]];
    let frames = rle_frames(&[0, 10 + 12], &frags, 2).unwrap();
    assert_eq!(frames, [vec![1, 1, 2, 2, 2, 2], vec![3, 3]]);
    // No table: one fragment per frame.
    assert_eq!(rle_frames(&[], &frags, 3).unwrap(), frags);
}

#[test]
fn inconsistent_tables_are_errors_not_panics() {
    let frags = vec![vec![1, 1], vec![2, 2]];
    let err = rle_frames(&[], &frags, 3).unwrap_err();
    assert!(err.contains("2 RLE fragments for 3 frames"), "{err}");
    // Wrong count, not starting at 0, not increasing.
    for table in [&[0u32][..], &[4, 10], &[0, 0]] {
        assert!(rle_frames(table, &frags, 2).is_err(), "{table:?}");
    }
    // A frame that would start beyond the last fragment.
    let err = rle_frames(&[0, 1000], &frags, 2).unwrap_err();
    assert!(err.contains("frame 1"), "{err}");
}
