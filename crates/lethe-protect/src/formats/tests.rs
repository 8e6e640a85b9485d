//! Round trips of every format and clear errors on bad input.

use std::path::{Path, PathBuf};

use dicom_core::value::Value;
use dicom_dictionary_std::tags;

use super::*;
use crate::dataset::ImageShape;

fn gray(h: usize, w: usize) -> ImageShape {
    ImageShape {
        channels: 1,
        height: h,
        width: w,
    }
}

/// Writes `values` (planar, in [0, 1]) as a PNG at `dir/rel`.
fn put_png(dir: &Path, rel: &str, values: &[f32], s: ImageShape, sixteen: bool) {
    let bytes = png::encode(values, s, sixteen, None).unwrap();
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

fn pattern(n: usize, levels: f32, offset: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 37 + offset * 11) % (levels as usize + 1)) as f32) / levels)
        .collect()
}

/// Moves interior values by `+-step` (alternating); 0 and 1 stay, so a
/// dataset normalised by its own range (DICOM) keeps that range on reload.
fn nudge(v: &[f32], step: f32) -> Vec<f32> {
    v.iter()
        .enumerate()
        .map(|(i, &x)| {
            if x <= 0.0 || x >= 1.0 {
                return x;
            }
            let d = if i % 2 == 0 { step } else { -step };
            (x + d).clamp(0.0, 1.0)
        })
        .collect()
}

fn check_roundtrip(data: &Dataset, out: &Path, max_err: f32) -> Dataset {
    let changed = data.with_pixels(nudge(data.pixels(), 3.0 / 255.0)).unwrap();
    let released = changed.quantize_within(data, 3.0 / 255.0).unwrap();
    write(&released, out).unwrap();
    let back = match data.format() {
        Format::Npy(src) => {
            let name = file_name(&src.path);
            load(&DataSource::Npy {
                path: out.join(name),
                images_key: None,
                labels_key: None,
                labels_path: src.labels_path.as_ref().map(|p| out.join(file_name(p))),
            })
            .unwrap()
        }
        _ => load(&folder(out)).unwrap(),
    };
    assert_eq!(back.len(), data.len());
    assert_eq!(back.shape(), data.shape());
    assert_eq!(back.labels(), data.labels());
    assert_eq!(back.classes(), data.classes());
    for (a, b) in back.pixels().iter().zip(released.pixels()) {
        assert!((a - b).abs() <= max_err, "{a} vs {b}");
    }
    back
}

#[test]
fn png_8bit_gray_folder_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let s = gray(6, 5);
    for (k, rel) in ["cat/a.png", "cat/b.png", "dog/c.png"].iter().enumerate() {
        put_png(dir.path(), rel, &pattern(30, 255.0, k), s, false);
    }
    let data = load(&folder(dir.path())).unwrap();
    assert_eq!(data.classes(), ["cat", "dog"]);
    assert_eq!(data.labels(), [0, 0, 1]);
    assert_eq!(
        data.items()[2].path.as_deref(),
        Some(Path::new("dog/c.png"))
    );
    assert_eq!(data.items()[0].levels, Some(255));
    assert_eq!(data.image(1), pattern(30, 255.0, 1).as_slice());
    let out = tempfile::tempdir().unwrap();
    check_roundtrip(&data, out.path(), 1e-6);
    assert!(out.path().join("dog/c.png").is_file());
}

#[test]
fn png_16bit_gray_keeps_its_depth() {
    let dir = tempfile::tempdir().unwrap();
    let s = gray(4, 4);
    let vals = pattern(16, 65535.0, 3);
    put_png(dir.path(), "a/x.png", &vals, s, true);
    put_png(dir.path(), "b/y.png", &pattern(16, 65535.0, 4), s, true);
    let data = load(&folder(dir.path())).unwrap();
    assert_eq!(data.items()[0].levels, Some(65535));
    for (a, b) in data.image(0).iter().zip(&vals) {
        assert!((a - b).abs() < 1e-7);
    }
    let out = tempfile::tempdir().unwrap();
    // A 3/255 nudge survives exactly on the 16-bit grid (error < 1/65535).
    check_roundtrip(&data, out.path(), 1.0 / 65535.0);
    let img = image::open(out.path().join("a/x.png")).unwrap();
    assert!(matches!(img, image::DynamicImage::ImageLuma16(_)));
}

#[test]
fn png_rgb_round_trips_channel_first() {
    let dir = tempfile::tempdir().unwrap();
    let s = ImageShape {
        channels: 3,
        height: 3,
        width: 4,
    };
    put_png(dir.path(), "r/0.png", &pattern(36, 255.0, 0), s, false);
    put_png(dir.path(), "g/0.png", &pattern(36, 255.0, 5), s, false);
    let data = load(&folder(dir.path())).unwrap();
    assert_eq!(data.shape(), s);
    // Pixel (y=1, x=2), green channel, is planar index 1*12 + 1*4 + 2.
    let raw = image::open(dir.path().join("g/0.png")).unwrap().to_rgb8();
    let g = raw.get_pixel(2, 1)[1] as f32 / 255.0;
    assert!((data.image(0)[12 + 4 + 2] - g).abs() < 1e-6);
    let out = tempfile::tempdir().unwrap();
    check_roundtrip(&data, out.path(), 1e-6);
}

#[test]
fn png_alpha_travels_unchanged_while_the_colour_is_protected() {
    let dir = tempfile::tempdir().unwrap();
    let (rgb, gray) = (
        ImageShape {
            channels: 3,
            height: 3,
            width: 4,
        },
        gray(3, 4),
    );
    // Partly transparent: alpha 0, 128 and 255 (8-bit), and 16-bit gray+alpha.
    let alpha8: Vec<u16> = (0..12).map(|i| [0, 128, 255][i % 3]).collect();
    let alpha16: Vec<u16> = (0..12).map(|i| (i as u16) * 5000).collect();
    for (rel, s, sixteen, alpha) in [
        ("rgba/a/0.png", rgb, false, &alpha8),
        ("rgba/b/0.png", rgb, false, &alpha8),
        ("la16/a/0.png", gray, true, &alpha16),
        ("la16/b/0.png", gray, true, &alpha16),
    ] {
        let levels = if sixteen { 65535.0 } else { 255.0 };
        let values = pattern(s.values(), levels, rel.len());
        let bytes = png::encode(&values, s, sixteen, Some(alpha)).unwrap();
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    for (set, s, tol) in [("rgba", rgb, 1e-6), ("la16", gray, 1e-6)] {
        let data = load(&DataSource::Folder {
            path: dir.path().join(set),
        })
        .unwrap();
        assert_eq!(data.shape(), s, "{set}: alpha is not a protected channel");
        let out = tempfile::tempdir().unwrap();
        check_roundtrip(&data, out.path(), tol);
        let (src, written) = (
            image::open(dir.path().join(set).join("a/0.png")).unwrap(),
            image::open(out.path().join("a/0.png")).unwrap(),
        );
        assert_eq!(written.color(), src.color(), "{set}");
        let alpha = |img: &image::DynamicImage| -> Vec<u16> {
            img.to_rgba16().pixels().map(|p| p.0[3]).collect()
        };
        assert_eq!(alpha(&written), alpha(&src), "{set}");
    }
}

#[test]
fn nested_class_folders_are_read_in_order_and_released_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let s = gray(4, 4);
    for (i, rel) in [
        "a/p2/s1/0.png",
        "a/p1/0.png",
        "a/top.png",
        "b/p1/s9/x.png",
        "b/.cache/skipped.png",
    ]
    .iter()
    .enumerate()
    {
        put_png(dir.path(), rel, &pattern(16, 255.0, i), s, false);
    }
    std::fs::write(dir.path().join("b/.DS_Store"), b"junk").unwrap();
    let data = load(&folder(dir.path())).unwrap();
    let paths: Vec<String> = data
        .items()
        .iter()
        .map(|i| {
            i.path
                .as_ref()
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    assert_eq!(
        paths,
        ["a/p1/0.png", "a/p2/s1/0.png", "a/top.png", "b/p1/s9/x.png"]
    );
    assert_eq!(data.labels(), [0, 0, 0, 1]);
    let out = tempfile::tempdir().unwrap();
    check_roundtrip(&data, out.path(), 1e-6);
    assert!(out.path().join("a/p2/s1/0.png").is_file());
    assert!(!out.path().join("b/.cache").exists());
}

#[test]
fn class_folders_without_images_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let s = gray(4, 4);
    put_png(dir.path(), "a/0.png", &pattern(16, 255.0, 0), s, false);
    put_png(dir.path(), "c/0.png", &pattern(16, 255.0, 1), s, false);
    // An empty class, and one that holds only files that are not images.
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    std::fs::create_dir_all(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/readme.txt"), b"notes").unwrap();
    let source = folder(dir.path());
    let data = load(&source).unwrap();
    assert_eq!(data.classes(), ["a", "c"]);
    assert_eq!(data.labels(), [0, 1]);
    // With one class of images left there is nothing to protect.
    std::fs::remove_file(dir.path().join("c/0.png")).unwrap();
    let err = load(&source).unwrap_err().to_string();
    assert!(
        err.contains("at least two class sub-folders with images"),
        "{err}"
    );
}

/// `dir/x.npy` images with `dir/y.npy` labels.
fn npy_pair(dir: &Path) -> DataSource {
    DataSource::Npy {
        path: dir.join("x.npy"),
        images_key: None,
        labels_key: None,
        labels_path: Some(dir.join("y.npy")),
    }
}

fn npy_bytes(descr: &str, shape: &[usize], data: Vec<u8>) -> Vec<u8> {
    npy::Array {
        descr: descr.into(),
        shape: shape.to_vec(),
        data,
    }
    .to_bytes()
}

#[test]
fn npy_uint8_with_labels_file_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let imgs: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(
        dir.path().join("x.npy"),
        npy_bytes("|u1", &[3, 4, 5], imgs.clone()),
    )
    .unwrap();
    let labels: Vec<u8> = [7i64, 3, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.path().join("y.npy"), npy_bytes("<i8", &[3], labels)).unwrap();
    let data = load(&npy_pair(dir.path())).unwrap();
    assert_eq!(data.shape(), gray(4, 5));
    assert_eq!(data.classes(), ["3", "7"]);
    assert_eq!(data.labels(), [1, 0, 1]);
    assert!((data.image(2)[3] - imgs[43] as f32 / 255.0).abs() < 1e-7);
    let out = tempfile::tempdir().unwrap();
    check_roundtrip(&data, out.path(), 1e-6);
    // The labels file is copied unchanged.
    assert_eq!(
        std::fs::read(out.path().join("y.npy")).unwrap(),
        std::fs::read(dir.path().join("y.npy")).unwrap()
    );
}

#[test]
fn npy_string_labels_name_the_classes() {
    let dir = tempfile::tempdir().unwrap();
    let imgs: Vec<u8> = (0..3 * 2 * 2).map(|i| (i * 21 % 256) as u8).collect();
    std::fs::write(dir.path().join("x.npy"), npy_bytes("|u1", &[3, 2, 2], imgs)).unwrap();
    // NumPy's fixed-width encodings of ["dog", "cat", "dog"]: UTF-32 in
    // either byte order (padded with NULs to the widest), and bytes.
    let utf32 = |be: bool| -> Vec<u8> {
        ["dog", "cat", "dog"]
            .iter()
            .flat_map(|w| {
                let mut cps: Vec<u32> = w.chars().map(u32::from).collect();
                cps.resize(4, 0);
                cps.into_iter()
                    .flat_map(move |c| if be { c.to_be_bytes() } else { c.to_le_bytes() })
            })
            .collect()
    };
    let bytes: Vec<u8> = b"dog\0cat\0dog\0".to_vec();
    for (descr, data) in [("<U4", utf32(false)), (">U4", utf32(true)), ("|S4", bytes)] {
        std::fs::write(dir.path().join("y.npy"), npy_bytes(descr, &[3], data)).unwrap();
        let loaded = load(&npy_pair(dir.path())).unwrap();
        assert_eq!(loaded.classes(), ["cat", "dog"], "{descr}");
        assert_eq!(loaded.labels(), [1, 0, 1], "{descr}");
    }
    // Float labels that are not whole numbers are no labels at all.
    let halves: Vec<u8> = [0.5f64, 1.0, 0.5]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(dir.path().join("y.npy"), npy_bytes("<f8", &[3], halves)).unwrap();
    expect_err(
        npy_pair(dir.path()),
        "labels must be integers or strings, found dtype <f8",
    );
}

#[test]
fn npz_float_channels_last_keeps_other_entries() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("set.npz");
    let vals: Vec<f32> = (0..2 * 3 * 3 * 3).map(|i| (i as f32) / 60.0).collect();
    let img_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let lab: Vec<u8> = [0i32, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
    {
        let f = std::fs::File::create(&path).unwrap();
        let mut z = zip::ZipWriter::new(f);
        let o = zip::write::SimpleFileOptions::default();
        z.start_file("images.npy", o).unwrap();
        z.write_all(&npy_bytes("<f4", &[2, 3, 3, 3], img_bytes))
            .unwrap();
        z.start_file("labels.npy", o).unwrap();
        z.write_all(&npy_bytes("<i4", &[2], lab)).unwrap();
        z.start_file("meta.npy", o).unwrap();
        z.write_all(&npy_bytes("|u1", &[3], vec![1, 2, 3])).unwrap();
        z.finish().unwrap();
    }
    let data = load(&DataSource::Npy {
        path: path.clone(),
        images_key: None,
        labels_key: None,
        labels_path: None,
    })
    .unwrap();
    assert_eq!(
        data.shape(),
        ImageShape {
            channels: 3,
            height: 3,
            width: 3
        }
    );
    // Channels-last (y=0, x=1, c=2) is planar index 2*9 + 1.
    assert!((data.image(0)[19] - vals[5]).abs() < 1e-7);
    assert_eq!(data.items()[0].levels, None);
    let out = tempfile::tempdir().unwrap();
    check_roundtrip(&data, out.path(), 1e-7);
    let mut z =
        zip::ZipArchive::new(std::fs::File::open(out.path().join("set.npz")).unwrap()).unwrap();
    let mut meta = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name("meta.npy").unwrap(), &mut meta).unwrap();
    assert_eq!(meta, npy_bytes("|u1", &[3], vec![1, 2, 3]));
}

#[test]
fn npz_split_archive_protects_the_training_half() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mnist.npz");
    let entry = |n: usize, first: u8| -> Vec<u8> {
        npy_bytes(
            "|u1",
            &[n, 2, 2],
            (0..n * 4).map(|i| first + i as u8).collect(),
        )
    };
    {
        let f = std::fs::File::create(&path).unwrap();
        let mut z = zip::ZipWriter::new(f);
        let o = zip::write::SimpleFileOptions::default();
        // Keras order: the test half's labels come before the training labels
        // would under a plain name search, and `y` is a decoy of another length.
        z.start_file("x_test.npy", o).unwrap();
        z.write_all(&entry(1, 100)).unwrap();
        z.start_file("x_train.npy", o).unwrap();
        z.write_all(&entry(3, 0)).unwrap();
        z.start_file("y.npy", o).unwrap();
        z.write_all(&npy_bytes("|u1", &[5], vec![0; 5])).unwrap();
        z.start_file("y_test.npy", o).unwrap();
        z.write_all(&npy_bytes("|u1", &[1], vec![1])).unwrap();
        z.start_file("y_train.npy", o).unwrap();
        z.write_all(&npy_bytes("|u1", &[3], vec![0, 1, 0])).unwrap();
        z.finish().unwrap();
    }
    let source = |images_key: Option<&str>| DataSource::Npy {
        path: path.clone(),
        images_key: images_key.map(str::to_string),
        labels_key: None,
        labels_path: None,
    };
    let data = load(&source(None)).unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data.labels(), &[0, 1, 0]);
    assert!((data.image(1)[0] - 4.0 / 255.0).abs() < 1e-7);
    // An archive without any known name says which flag names the entry.
    let bare = dir.path().join("bare.npz");
    {
        let mut z = zip::ZipWriter::new(std::fs::File::create(&bare).unwrap());
        z.start_file("pixels.npy", zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(&entry(1, 0)).unwrap();
        z.finish().unwrap();
    }
    let err = load(&DataSource::Npy {
        path: bare,
        images_key: None,
        labels_key: None,
        labels_path: None,
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("pixels.npy") && err.contains("--images-key"),
        "{err}"
    );
}

fn pydicom_dir() -> PathBuf {
    lethe_assets::Cache::from_env()
        .ensure(lethe_assets::Asset::PYDICOM_DATA)
        .unwrap()
}

/// An element as comparable text: tag, VR and value; sequences item by
/// item (their encoded lengths may legitimately change on rewrite).
fn describe(e: &dicom_object::mem::InMemElement) -> String {
    match e.value() {
        Value::Sequence(seq) => {
            let items: Vec<String> = seq
                .items()
                .iter()
                .map(|item| item.iter().map(describe).collect::<Vec<_>>().join("; "))
                .collect();
            format!("{:?} {:?} [{}]", e.header().tag, e.vr(), items.join(" | "))
        }
        v => format!("{:?} {:?} {:?}", e.header().tag, e.vr(), v),
    }
}

/// Every element except PixelData, as comparable text.
fn non_pixel_elements(path: &Path) -> Vec<String> {
    let obj = dicom_object::open_file(path).unwrap();
    obj.iter()
        .filter(|e| e.header().tag != tags::PIXEL_DATA)
        .map(describe)
        .collect()
}

/// A folder of two classes, `a` and `b`, each holding a copy of `file`
/// under its own name.
fn two_class_copies(file: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let name = file.file_name().unwrap();
    for class in ["a", "b"] {
        std::fs::create_dir_all(dir.path().join(class)).unwrap();
        std::fs::copy(file, dir.path().join(class).join(name)).unwrap();
    }
    dir
}

/// The folder dataset at `dir`.
fn folder(dir: &Path) -> DataSource {
    DataSource::Folder {
        path: dir.to_path_buf(),
    }
}

/// Protects a two-class folder of copies of `src_dir/file` and checks the
/// release: every non-pixel element unchanged, most pixels of every frame
/// changed, the values read back; returns the written copy of the first
/// file.
fn dicom_round_trip_of(
    src: &Path,
    file: &str,
    shape: ImageShape,
    frames: usize,
) -> (tempfile::TempDir, PathBuf) {
    let dir = two_class_copies(&src.join(file));
    let data = load(&folder(dir.path())).unwrap();
    assert_eq!(data.shape(), shape);
    assert_eq!(data.len(), 2 * frames);
    assert_eq!(data.labels(), [vec![0; frames], vec![1; frames]].concat());
    let Format::Dicom { range, .. } = data.format().clone() else {
        panic!("not DICOM: {:?}", data.format());
    };
    let (_, stored) = dicom::stored_values(&src.join(file)).unwrap();
    assert_eq!(stored.len(), frames);
    let all = || stored.iter().flatten();
    assert_eq!(range.0, *all().min().unwrap() as f64);
    assert_eq!(range.1, *all().max().unwrap() as f64);
    let out = tempfile::tempdir().unwrap();
    let back = check_roundtrip(&data, out.path(), 0.5 / (range.1 - range.0) as f32 + 1e-6);
    assert_eq!(back.len(), 2 * frames);
    let place = |d: &Dataset| -> Vec<_> {
        d.items()
            .iter()
            .map(|i| (i.path.clone(), i.frame))
            .collect()
    };
    assert_eq!(place(&back), place(&data));
    let written = out.path().join("a").join(file);
    let (new, old) = (
        non_pixel_elements(&written),
        non_pixel_elements(&src.join(file)),
    );
    let diff: Vec<_> = new
        .iter()
        .zip(&old)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| {
            (
                a.chars().take(200).collect::<String>(),
                b.chars().take(200).collect::<String>(),
            )
        })
        .collect();
    assert!(
        diff.is_empty() && new.len() == old.len(),
        "{} vs {} elements, differing: {diff:?}",
        new.len(),
        old.len()
    );
    let (_, new_stored) = dicom::stored_values(&written).unwrap();
    assert_eq!(new_stored.len(), frames);
    // `nudge` moves every value strictly inside the dataset's range.
    let (lo, hi) = (range.0 as i64, range.1 as i64);
    for (new, old) in new_stored.iter().zip(&stored) {
        let interior = old.iter().filter(|&&v| v != lo && v != hi).count();
        let changed = new.iter().zip(old).filter(|(a, b)| a != b).count();
        assert!(
            interior > old.len() / 4 && changed * 100 >= interior * 99,
            "{changed} changed, {interior} of {} inside the range",
            old.len()
        );
    }
    (out, written)
}

/// [`dicom_round_trip_of`] one of pydicom's single-frame files.
fn dicom_round_trip(file: &str, shape: ImageShape) -> (tempfile::TempDir, PathBuf) {
    dicom_round_trip_of(&pydicom_dir(), file, shape, 1)
}

/// dicom-rs's own RLE decoder on every frame of `path`, as 16-bit words.
fn dicom_rs_rle_frames(path: &Path, frames: u32) -> Vec<Vec<u16>> {
    let obj = dicom_object::open_file(path).unwrap();
    (0..frames)
        .map(|f| {
            let mut decoded = Vec::new();
            dicom_encoding::adapters::PixelDataReader::decode_frame(
                dicom_transfer_syntax_registry::entries::RLE_LOSSLESS
                    .pixel_data_reader()
                    .unwrap(),
                &obj,
                f,
                &mut decoded,
            )
            .unwrap();
            let bits = obj
                .element(tags::BITS_ALLOCATED)
                .unwrap()
                .to_int::<u16>()
                .unwrap();
            if bits == 8 {
                decoded.into_iter().map(u16::from).collect()
            } else {
                decoded
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect()
            }
        })
        .collect()
}

#[test]
fn dicom_folder_round_trip_keeps_every_tag() {
    let (_out, written) = dicom_round_trip("CT_small.dcm", gray(128, 128));
    let obj = dicom_object::open_file(&written).unwrap();
    assert!(matches!(
        obj.element(tags::PIXEL_DATA).unwrap().value(),
        Value::Primitive(_)
    ));
}

#[test]
fn rle_dicom_is_released_as_rle_with_every_tag_kept() {
    let (_out, written) = dicom_round_trip("MR_small_RLE.dcm", gray(64, 64));
    let obj = dicom_object::open_file(&written).unwrap();
    assert_eq!(
        obj.meta().transfer_syntax().trim_end_matches('\0'),
        "1.2.840.10008.1.2.5"
    );
    let Value::PixelSequence(seq) = obj.element(tags::PIXEL_DATA).unwrap().value() else {
        panic!("RLE pixel data written unencapsulated");
    };
    assert_eq!(seq.fragments().len(), 1);
    // dicom-rs's own RLE decoder reads what lethe's encoder wrote.
    let theirs = dicom_rs_rle_frames(&written, 1);
    let (_, ours) = dicom::stored_values(&written).unwrap();
    assert_eq!(
        theirs[0],
        ours[0].iter().map(|&v| v as u16).collect::<Vec<_>>()
    );
}

#[test]
fn deflated_dicom_is_released_deflated_with_every_tag_kept() {
    // pydicom's 512x512 8-bit image in Deflated Explicit VR Little Endian.
    let (_out, written) = dicom_round_trip("image_dfl.dcm", gray(512, 512));
    let obj = dicom_object::open_file(&written).unwrap();
    assert_eq!(
        obj.meta().transfer_syntax().trim_end_matches('\0'),
        "1.2.840.10008.1.2.1.99"
    );
    // Deflated on disk: far smaller than the 262 144 bytes of its pixels.
    let size = std::fs::metadata(&written).unwrap().len();
    assert!(size < 200_000, "{size} bytes");
}

fn rgb(h: usize, w: usize) -> ImageShape {
    ImageShape {
        channels: 3,
        height: h,
        width: w,
    }
}

/// Interleaved (`PlanarConfiguration` 0) words of a planar RGB frame.
fn interleaved(planar: &[i64]) -> Vec<u16> {
    let hw = planar.len() / 3;
    (0..hw)
        .flat_map(|p| (0..3).map(move |c| planar[c * hw + p] as u16))
        .collect()
}

#[test]
fn multi_frame_rle_dicom_is_protected_frame_by_frame() {
    // pydicom's two-frame RGB file, with its basic offset table.
    let src = pydicom_dir();
    let (_out, written) = dicom_round_trip_of(&src, "SC_rgb_rle_2frame.dcm", rgb(100, 100), 2);
    let obj = dicom_object::open_file(&written).unwrap();
    let Value::PixelSequence(seq) = obj.element(tags::PIXEL_DATA).unwrap().value() else {
        panic!("RLE pixel data written unencapsulated");
    };
    assert_eq!(seq.fragments().len(), 2, "one fragment per frame");
    let second = 8 + seq.fragments()[0].len() as u32;
    assert_eq!(seq.offset_table(), [0, second]);
    let (_, ours) = dicom::stored_values(&written).unwrap();
    let theirs = dicom_rs_rle_frames(&written, 2);
    for (t, o) in theirs.iter().zip(&ours) {
        assert_eq!(*t, interleaved(o));
    }

    // The same file without an offset table: each fragment is one frame.
    let scratch = tempfile::tempdir().unwrap();
    let mut obj = dicom_object::open_file(src.join("SC_rgb_rle_2frame.dcm")).unwrap();
    let Value::PixelSequence(seq) = obj.element(tags::PIXEL_DATA).unwrap().value().clone() else {
        panic!("not encapsulated");
    };
    let fragments = seq.fragments().to_vec();
    obj.put(dicom_core::DataElement::new(
        tags::PIXEL_DATA,
        dicom_core::VR::OB,
        dicom_core::value::PixelFragmentSequence::new(Vec::<u32>::new(), fragments),
    ));
    obj.write_to_file(scratch.path().join("no_bot.dcm"))
        .unwrap();
    let (_, with) = dicom::stored_values(&src.join("SC_rgb_rle_2frame.dcm")).unwrap();
    let (_, without) = dicom::stored_values(&scratch.path().join("no_bot.dcm")).unwrap();
    assert_eq!(with, without);
    assert_ne!(with[0], with[1], "the two frames differ");
    let (_out, written) = dicom_round_trip_of(scratch.path(), "no_bot.dcm", rgb(100, 100), 2);
    let obj = dicom_object::open_file(&written).unwrap();
    let Value::PixelSequence(seq) = obj.element(tags::PIXEL_DATA).unwrap().value() else {
        panic!("RLE pixel data written unencapsulated");
    };
    assert!(seq.offset_table().is_empty(), "no offset table added");
    assert_eq!(seq.fragments().len(), 2);
}

#[test]
fn multi_frame_native_dicom_is_protected_frame_by_frame() {
    // MR_small as a three-frame file: the frame itself, inverted, shifted.
    let src = pydicom_dir();
    let (_, frames) = dicom::stored_values(&src.join("MR_small.dcm")).unwrap();
    let frame = &frames[0];
    let hi = *frame.iter().max().unwrap();
    let three: Vec<u16> = frame
        .iter()
        .map(|&v| v as u16)
        .chain(frame.iter().map(|&v| (hi - v) as u16))
        .chain(frame.iter().map(|&v| (v / 2 + 7) as u16))
        .collect();
    let mut obj = dicom_object::open_file(src.join("MR_small.dcm")).unwrap();
    obj.put(dicom_core::DataElement::new(
        tags::NUMBER_OF_FRAMES,
        dicom_core::VR::IS,
        dicom_core::value::PrimitiveValue::from("3"),
    ));
    obj.put(dicom_core::DataElement::new(
        tags::PIXEL_DATA,
        dicom_core::VR::OW,
        dicom_core::value::PrimitiveValue::U16(three.into_iter().collect()),
    ));
    let scratch = tempfile::tempdir().unwrap();
    obj.write_to_file(scratch.path().join("three.dcm")).unwrap();
    let (_, read) = dicom::stored_values(&scratch.path().join("three.dcm")).unwrap();
    assert_eq!(read.len(), 3);
    assert_eq!(read[0], *frame);
    assert_eq!(read[1], frame.iter().map(|&v| hi - v).collect::<Vec<_>>());
    let (_out, _) = dicom_round_trip_of(scratch.path(), "three.dcm", gray(64, 64), 3);

    // Frames are written back together and in order, or not at all.
    let dir = two_class_copies(&scratch.path().join("three.dcm"));
    let data = load(&folder(dir.path())).unwrap();
    let frames: Vec<Option<u32>> = data.items().iter().map(|i| i.frame).collect();
    assert_eq!(
        frames,
        [Some(0), Some(1), Some(2), Some(0), Some(1), Some(2)]
    );
    let swapped = data.subset(&[1, 0, 2, 3, 4, 5]).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = write(&swapped, out.path()).unwrap_err().to_string();
    assert!(err.contains("frame") && err.contains("in order"), "{err}");
    let partial = data.subset(&[0, 1, 3, 4, 5]).unwrap();
    let err = write(&partial, &out.path().join("p"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 frame(s)"), "{err}");
}

#[test]
fn palette_and_ycbcr_dicom_are_refused_with_the_reason() {
    let src = pydicom_dir();
    let scratch = tempfile::tempdir().unwrap();
    for (file, photometric, name, needle) in [
        (
            "MR_small.dcm",
            "PALETTE COLOR",
            "palette.dcm",
            "colour table",
        ),
        ("SC_rgb_rle_2frame.dcm", "YBR_FULL", "ybr.dcm", "chroma"),
    ] {
        let mut obj = dicom_object::open_file(src.join(file)).unwrap();
        obj.put(dicom_core::DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            dicom_core::VR::CS,
            dicom_core::value::PrimitiveValue::from(photometric),
        ));
        obj.write_to_file(scratch.path().join(name)).unwrap();
        let dir = two_class_copies(&scratch.path().join(name));
        let err = load(&folder(dir.path())).unwrap_err().to_string();
        assert!(
            err.contains(photometric) && err.contains(needle) && err.contains(name),
            "{err}"
        );
    }
}

#[test]
fn dicom_transfer_syntaxes_decode_to_the_same_pixels() {
    let src = pydicom_dir();
    let (s, le) = dicom::stored_values(&src.join("MR_small.dcm")).unwrap();
    assert_eq!(le.len(), 1);
    assert_eq!(s, gray(64, 64));
    let (_, implicit) = dicom::stored_values(&src.join("MR_small_implicit.dcm")).unwrap();
    let (_, big) = dicom::stored_values(&src.join("MR_small_bigendian.dcm")).unwrap();
    let (_, rle) = dicom::stored_values(&src.join("MR_small_RLE.dcm")).unwrap();
    assert_eq!(le, implicit);
    assert_eq!(le, big);
    assert_eq!(le, rle);
}

fn expect_err(source: DataSource, needle: &str) {
    let err = load(&source).unwrap_err().to_string();
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
}

#[test]
fn compressed_or_truncated_dicom_is_refused_clearly() {
    let src = pydicom_dir();
    // pydicom's RLE file relabelled as JPEG Baseline: encapsulated data
    // lethe cannot decode.
    let scratch = tempfile::tempdir().unwrap();
    let mut jpeg = dicom_object::open_file(src.join("MR_small_RLE.dcm")).unwrap();
    jpeg.update_meta(|m| m.transfer_syntax = "1.2.840.10008.1.2.4.50".into());
    jpeg.write_to_file(scratch.path().join("jpeg.dcm")).unwrap();
    // pydicom's plain MR relabelled with a private transfer syntax (22
    // bytes, two more than explicit VR LE's padded UID): refused by the
    // reader itself, with advice instead of dicom-rs's wording.
    let mut private = std::fs::read(src.join("MR_small.dcm")).unwrap();
    let at = private
        .windows(20)
        .position(|w| w == b"1.2.840.10008.1.2.1\0")
        .expect("the explicit VR LE transfer syntax UID");
    private.splice(at..at + 20, b"1.2.3.4.5.6.7.8.9.10.1".iter().copied());
    // The meta group's length (the value of its first element, after the
    // 128-byte preamble, "DICM" and an 8-byte header) grew by two bytes.
    let group_len = 128 + 4 + 8;
    assert_eq!(&private[132..136], [2, 0, 0, 0], "(0002,0000) first");
    let len = u32::from_le_bytes(private[group_len..group_len + 4].try_into().unwrap());
    private[group_len..group_len + 4].copy_from_slice(&(len + 2).to_le_bytes());
    let tsl = at - 2;
    assert_eq!(u16::from_le_bytes([private[tsl], private[tsl + 1]]), 20);
    private[tsl..tsl + 2].copy_from_slice(&22u16.to_le_bytes());
    std::fs::write(scratch.path().join("private.dcm"), private).unwrap();
    for (path, needle) in [
        (scratch.path().join("jpeg.dcm"), "compressed"),
        (
            scratch.path().join("private.dcm"),
            "1.2.3.4.5.6.7.8.9.10.1 is not one lethe knows; convert the file to explicit VR little endian first",
        ),
        (src.join("MR_truncated.dcm"), "MR_truncated.dcm"),
    ] {
        let dir = two_class_copies(&path);
        expect_err(folder(dir.path()), needle);
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    // Corrupt PNG.
    let dir = tempfile::tempdir().unwrap();
    put_png(
        dir.path(),
        "a/ok.png",
        &pattern(16, 255.0, 0),
        gray(4, 4),
        false,
    );
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    std::fs::write(
        dir.path().join("b/broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    expect_err(folder(dir.path()), "broken.png");
    // A .png that is not one at all.
    std::fs::write(dir.path().join("b/broken.png"), b"hello").unwrap();
    expect_err(folder(dir.path()), "bad signature");
    // Mismatched shapes.
    std::fs::remove_file(dir.path().join("b/broken.png")).unwrap();
    put_png(
        dir.path(),
        "b/big.png",
        &pattern(25, 255.0, 0),
        gray(5, 5),
        false,
    );
    expect_err(folder(dir.path()), "differ in shape");
    // Same size, grayscale beside colour.
    std::fs::remove_file(dir.path().join("b/big.png")).unwrap();
    let colour = png::encode(&pattern(48, 255.0, 0), rgb(4, 4), false, None).unwrap();
    std::fs::write(dir.path().join("b/colour.png"), colour).unwrap();
    expect_err(folder(dir.path()), "convert them to one colour type");
    // One class only.
    let one = tempfile::tempdir().unwrap();
    put_png(
        one.path(),
        "a/x.png",
        &pattern(16, 255.0, 0),
        gray(4, 4),
        false,
    );
    expect_err(folder(one.path()), "at least two");
    // Not an .npy.
    let f = tempfile::tempdir().unwrap();
    std::fs::write(f.path().join("x.npy"), b"garbage!!garbage").unwrap();
    std::fs::write(f.path().join("y.npy"), b"garbage!!garbage").unwrap();
    expect_err(npy_pair(f.path()), "magic");
    // Float images outside [0, 1].
    let vals: Vec<u8> = [0.5f32, 2.0, 0.1, 0.2]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(f.path().join("x.npy"), npy_bytes("<f4", &[1, 2, 2], vals)).unwrap();
    std::fs::write(f.path().join("y.npy"), npy_bytes("|u1", &[1], vec![0])).unwrap();
    expect_err(npy_pair(f.path()), "[0, 1]");
    // Not a number, or far outside [0, 255]: no hint about dividing by 255.
    for (v, needle) in [(f32::NAN, "NaN (a missing"), (-3.0, "-3 (rescale")] {
        let vals: Vec<u8> = [0.5f32, v, 0.1, 0.2]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(f.path().join("x.npy"), npy_bytes("<f4", &[1, 2, 2], vals)).unwrap();
        expect_err(npy_pair(f.path()), needle);
    }
    // Labels that do not match the images.
    std::fs::write(
        f.path().join("x.npy"),
        npy_bytes("|u1", &[2, 2, 2], vec![0; 8]),
    )
    .unwrap();
    expect_err(npy_pair(f.path()), "labels have shape");
    // Truncated data.
    let mut b = npy_bytes("|u1", &[2, 3, 3], vec![0; 18]);
    b.truncate(b.len() - 5);
    std::fs::write(f.path().join("x.npy"), b).unwrap();
    expect_err(npy_pair(f.path()), "needs 18");
}

/// PNG bytes with the given IHDR depth, colour type and interlace flag and
/// these further chunks (empty bodies; only the layout matters here).
fn png_layout(depth: u8, colour: u8, interlace: u8, chunks: &[&[u8; 4]]) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    let chunk = |b: &mut Vec<u8>, kind: &[u8; 4], body: &[u8]| {
        b.extend_from_slice(&(body.len() as u32).to_be_bytes());
        b.extend_from_slice(kind);
        b.extend_from_slice(body);
        b.extend_from_slice(&[0; 4]);
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&4u32.to_be_bytes());
    ihdr.extend_from_slice(&4u32.to_be_bytes());
    ihdr.extend_from_slice(&[depth, colour, 0, 0, interlace]);
    chunk(&mut b, b"IHDR", &ihdr);
    for kind in chunks {
        chunk(&mut b, kind, &[1, 2]);
    }
    chunk(&mut b, b"IEND", &[]);
    b
}

#[test]
fn png_storage_changes_are_named_from_the_file_layout() {
    // What this crate writes comes back as it is.
    let own = png::encode(&pattern(16, 255.0, 0), gray(4, 4), false, None).unwrap();
    assert!(png::storage_changes(&own).is_empty());
    let palette = png::storage_changes(&png_layout(8, 3, 0, &[b"PLTE", b"tRNS", b"IDAT"]));
    assert_eq!(palette, ["with a palette are released as RGB"]);
    let low = png::storage_changes(&png_layout(1, 0, 1, &[b"tEXt", b"pHYs", b"IDAT"]));
    assert_eq!(low.len(), 3, "{low:?}");
    assert!(low[0].contains("1, 2 or 4 bits"));
    assert!(low[1].contains("interlaced"));
    assert!(low[2].contains("metadata"));
    let key = png::storage_changes(&png_layout(8, 2, 0, &[b"tRNS", b"IDAT"]));
    assert_eq!(key.len(), 1);
    assert!(key[0].contains("alpha channel"));
    // Not a PNG header at all: nothing to say.
    assert!(png::storage_changes(b"GIF89a").is_empty());
}
