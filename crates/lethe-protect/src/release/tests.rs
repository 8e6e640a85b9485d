//! End to end on files: the release mirrors the source and the manifest
//! describes it.

use super::*;
use crate::dataset::Item;
use crate::model::Arch;
use crate::protect::StopRule;
use crate::sources::{lesions, LesionSpec};

fn params() -> ProtectParams {
    let mut p = ProtectParams::salm(8.0 / 255.0, 0.1);
    p.surrogate = Arch::Cnn {
        channels: vec![8, 16],
        batch_norm: true,
    };
    p.pgd_steps = 2;
    p.pgd_batch = 16;
    p.train_steps_per_round = 2;
    p.train_batch = 16;
    p.stop = StopRule {
        min_rounds: 2,
        max_rounds: 2,
        train_accuracy: None,
        loss_below: None,
        patience: 1,
        shortcut_accuracy: None,
    };
    p
}

/// A folder of 16x16 8-bit PNG lesions, two per class.
fn png_source() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let data = lesions(&LesionSpec {
        seed: 3,
        per_class: 2,
        size: 16,
        texture: 0.04,
    })
    .unwrap();
    formats::write(&data, dir.path()).unwrap();
    dir
}

#[test]
fn protect_writes_a_mirrored_release_and_a_manifest() {
    let src = png_source();
    let out = tempfile::tempdir().unwrap();
    let cfg = folder_config(src.path(), out.path().join("release"), params());
    let report = protect(&cfg).unwrap();
    assert!(report.finished);
    assert_eq!(report.images, 8);
    assert_eq!(report.files, 8);
    assert_eq!(report.rounds, 2);
    assert!(report.quality.linf_max <= 8.0 / 255.0 + 1e-6);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("release").join(MANIFEST_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["params"]["seed"], 0);
    assert_eq!(manifest["params"]["method"]["method"], "salm");
    let items = manifest["items"].as_array().unwrap();
    assert_eq!(items.len(), 8);
    for item in items {
        let rel = item["output"].as_str().unwrap();
        assert_eq!(item["source"].as_str().unwrap(), rel);
        let written = std::fs::read(out.path().join("release").join(rel)).unwrap();
        assert_eq!(item["output_sha256"], formats::sha256_hex(&written));
        let original = std::fs::read(src.path().join(rel)).unwrap();
        assert_eq!(item["source_sha256"], formats::sha256_hex(&original));
    }
    // The release reads back as the same dataset shape and labels.
    let back = formats::load(&DataSource::Folder {
        path: out.path().join("release"),
    })
    .unwrap();
    assert_eq!(back.len(), 8);
    assert_eq!(back.classes().len(), 4);

    // A second run refuses the non-empty output, and the source folder.
    let err = protect(&cfg).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");
    let inside = ProtectConfig {
        output: src.path().join("out"),
        ..cfg.clone()
    };
    let err = protect(&inside).unwrap_err().to_string();
    assert!(err.contains("inside"), "{err}");
}

#[test]
fn paused_runs_write_nothing_and_resume_to_the_same_release() {
    let src = png_source();
    let out = tempfile::tempdir().unwrap();
    let ck = tempfile::tempdir().unwrap();
    let cfg = ProtectConfig {
        checkpoint_dir: Some(ck.path().to_path_buf()),
        resume: true,
        ..folder_config(src.path(), out.path().join("a"), params())
    };
    let paused = protect_with(&cfg, Some(1), None).unwrap();
    assert!(!paused.finished);
    assert_eq!(paused.output, None);
    assert!(!out.path().join("a").exists());
    let done = protect(&cfg).unwrap();
    assert!(done.finished);
    let straight = protect(&ProtectConfig {
        output: out.path().join("b"),
        checkpoint_dir: None,
        resume: false,
        ..cfg.clone()
    })
    .unwrap();
    assert_eq!(done.quality, straight.quality);
    for f in ["normal/00000.png", "streak/00007.png"] {
        assert_eq!(
            std::fs::read(out.path().join("a").join(f)).unwrap(),
            std::fs::read(out.path().join("b").join(f)).unwrap()
        );
    }
}

#[test]
fn a_saved_run_is_not_started_over_without_overwrite() {
    let src = png_source();
    let out = tempfile::tempdir().unwrap();
    let ck = tempfile::tempdir().unwrap();
    let cfg = ProtectConfig {
        checkpoint_dir: Some(ck.path().to_path_buf()),
        ..folder_config(src.path(), out.path().join("a"), params())
    };
    // An empty checkpoint folder is nothing to lose.
    let paused = protect_with(&cfg, Some(1), None).unwrap();
    assert!(!paused.finished);
    let state = ck.path().join("current").join("state.json");
    let saved = std::fs::read(&state).unwrap();
    // Rerunning the same command without resume would discard round 1.
    let err = protect(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("interrupted run after round 1") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(std::fs::read(&state).unwrap(), saved, "checkpoint kept");
    // Resuming continues it; starting over is allowed when asked for.
    let resumed = protect(&ProtectConfig {
        resume: true,
        ..cfg.clone()
    })
    .unwrap();
    assert!(resumed.finished);
    let again = protect(&ProtectConfig {
        output: out.path().join("b"),
        ..cfg.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(again.contains("a finished run of 2 rounds"), "{again}");
    let fresh = protect(&ProtectConfig {
        output: out.path().join("b"),
        overwrite: true,
        ..cfg.clone()
    })
    .unwrap();
    assert_eq!(fresh.quality, resumed.quality);
}

#[test]
fn resume_without_a_checkpoint_folder_is_a_config_error() {
    let cfg = ProtectConfig {
        source: DataSource::Digits,
        output: "unused".into(),
        params: params(),
        checkpoint_dir: None,
        resume: true,
        overwrite: false,
        progress: false,
        noise_file: None,
        reuse_noise: None,
    };
    assert!(matches!(protect(&cfg), Err(Error::Config(_))));
}

#[test]
fn estimate_reads_the_source() {
    let src = png_source();
    let cfg = folder_config(src.path(), "unused".into(), params());
    let e = estimate(&cfg).unwrap();
    assert_eq!(e.images, 8);
    assert!(e.seconds_per_round > 0.0);
}

/// Protects `source` into `out/name` with [`params`] and returns the
/// release's source description.
fn release_of(source: &DataSource, out: &Path, name: &str) -> DataSource {
    protect(&ProtectConfig::new(
        source.clone(),
        out.join(name),
        params(),
    ))
    .unwrap();
    DataSource::Folder {
        path: out.join(name),
    }
}

#[test]
fn a_release_reads_back_in_the_clean_order_and_within_eps() {
    // Generated lesions are interleaved by class; their PNG release reads
    // back grouped by class, and must be put back in the clean order.
    let spec = LesionSpec {
        seed: 5,
        per_class: 3,
        size: 16,
        texture: 0.04,
    };
    let source = DataSource::Lesions(spec.clone());
    let clean = formats::load(&source).unwrap();
    let out = tempfile::tempdir().unwrap();
    let rel = release_of(&source, out.path(), "rel");
    let raw = formats::load(&rel).unwrap();
    assert_ne!(
        raw.labels(),
        clean.labels(),
        "the fixture must need reordering"
    );

    let read = read_release(&rel, &clean).unwrap();
    assert_eq!(read.data.labels(), clean.labels());
    assert_eq!(read.params, params());
    assert_eq!(read.rounds.len(), 2);
    assert_eq!(read.hashes_checked, 0);
    let linf = clean
        .pixels()
        .iter()
        .zip(read.data.pixels())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(linf > 0.0 && linf <= 8.0 / 255.0 + 1e-6, "linf {linf}");

    // The same release against other data is refused, whatever differs.
    let other = formats::load(&DataSource::Lesions(LesionSpec { seed: 6, ..spec })).unwrap();
    let err = read_release(&rel, &other).unwrap_err().to_string();
    assert!(err.contains("is not a protection of"), "{err}");
    let fewer = clean.subset(&[0, 1, 2, 3]).unwrap();
    let err = read_release(&rel, &fewer).unwrap_err().to_string();
    assert!(err.contains("images"), "{err}");
}

#[test]
fn a_release_of_files_is_checked_against_the_source_hashes() {
    let src = png_source();
    let source = DataSource::Folder {
        path: src.path().to_path_buf(),
    };
    let clean = formats::load(&source).unwrap();
    let out = tempfile::tempdir().unwrap();
    let rel = release_of(&source, out.path(), "rel");
    assert_eq!(read_release(&rel, &clean).unwrap().hashes_checked, 8);

    // A source file changed after the release was made: refused by name.
    let changed = clean.items()[2].path.clone().unwrap();
    let other = tempfile::tempdir().unwrap();
    formats::write(&clean, other.path()).unwrap();
    let mut img = image::open(other.path().join(&changed)).unwrap().to_luma8();
    img.get_pixel_mut(0, 0).0[0] ^= 1;
    img.save(other.path().join(&changed)).unwrap();
    let edited = formats::load(&DataSource::Folder {
        path: other.path().to_path_buf(),
    })
    .unwrap();
    let err = read_release(&rel, &edited).unwrap_err().to_string();
    assert!(
        err.contains("made from another file") && err.contains(&changed.display().to_string()),
        "{err}"
    );

    // No manifest: not a lethe release.
    std::fs::remove_file(out.path().join("rel").join(MANIFEST_FILE)).unwrap();
    let err = read_release(&rel, &clean).unwrap_err().to_string();
    assert!(err.contains(MANIFEST_FILE), "{err}");
    // Generated data is not a release.
    let err = read_release(&DataSource::Digits, &clean)
        .unwrap_err()
        .to_string();
    assert!(err.contains("folder or array file"), "{err}");
}

#[test]
fn a_dicom_release_is_renormalised_to_the_clean_range() {
    let item = Item::in_memory(Some(80));
    let set = |values: Vec<f32>, range| {
        Dataset::new(
            "d",
            crate::dataset::ImageShape {
                channels: 1,
                height: 1,
                width: 3,
            },
            values,
            vec![0, 1],
            vec!["a".into(), "b".into()],
            vec![item.clone(); 2],
            Format::Dicom {
                root: PathBuf::from("x"),
                range,
            },
        )
        .unwrap()
    };
    // Stored 10, 50, 90 read as a release whose own range is 10..90, against
    // a clean dataset whose range is 0..100.
    let released = set(vec![0.0, 0.5, 1.0, 1.0, 0.5, 0.0], (10.0, 90.0));
    let clean = set(vec![0.0; 6], (0.0, 100.0));
    let back = renormalised_like(released, &clean).unwrap();
    for (got, want) in back.pixels().iter().zip([0.1f32, 0.5, 0.9, 0.9, 0.5, 0.1]) {
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}

#[test]
fn an_array_release_reads_back_from_its_folder_manifest() {
    use std::io::Write;
    // 8 images of 8x8 uint8 with alternating labels, in one .npz.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("set.npz");
    let pixels: Vec<u8> = (0..8 * 64).map(|i| ((i * 37) % 251) as u8).collect();
    let labels: Vec<u8> = (0..8i64).flat_map(|i| (i % 2).to_le_bytes()).collect();
    let npy = |descr: &str, shape: Vec<usize>, data: Vec<u8>| {
        formats::npy::Array {
            descr: descr.into(),
            shape,
            data,
        }
        .to_bytes()
    };
    {
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let o = zip::write::SimpleFileOptions::default();
        z.start_file("x.npy", o).unwrap();
        z.write_all(&npy("|u1", vec![8, 8, 8], pixels)).unwrap();
        z.start_file("y.npy", o).unwrap();
        z.write_all(&npy("<i8", vec![8], labels)).unwrap();
        z.finish().unwrap();
    }
    let source = DataSource::Npy {
        path,
        images_key: None,
        labels_key: None,
        labels_path: None,
    };
    let clean = formats::load(&source).unwrap();
    let out = tempfile::tempdir().unwrap();
    release_of(&source, out.path(), "rel");
    let rel = DataSource::Npy {
        path: out.path().join("rel").join("set.npz"),
        images_key: None,
        labels_key: None,
        labels_path: None,
    };
    let read = read_release(&rel, &clean).unwrap();
    assert_eq!(read.data.labels(), clean.labels());
    assert_eq!(read.hashes_checked, 0);
    // The array file itself is listed and verifiable.
    let check = verify_release(&out.path().join("rel")).unwrap();
    assert!(check.intact() && check.listed == 1, "{check:?}");
    let changed = clean
        .pixels()
        .iter()
        .zip(read.data.pixels())
        .filter(|(a, b)| a != b)
        .count();
    assert!(changed > 0);
}

#[test]
fn verify_finds_changed_missing_and_added_files() {
    let src = png_source();
    let source = DataSource::Folder {
        path: src.path().to_path_buf(),
    };
    let out = tempfile::tempdir().unwrap();
    release_of(&source, out.path(), "rel");
    let rel = out.path().join("rel");
    let report = verify_release(&rel).unwrap();
    assert!(report.intact(), "{report:?}");
    assert_eq!(report.listed, 8);

    let listed: Vec<PathBuf> = {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(rel.join(MANIFEST_FILE)).unwrap()).unwrap();
        m["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| PathBuf::from(f["path"].as_str().unwrap()))
            .collect()
    };
    let mut bytes = std::fs::read(rel.join(&listed[0])).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(rel.join(&listed[0]), bytes).unwrap();
    std::fs::remove_file(rel.join(&listed[1])).unwrap();
    std::fs::write(rel.join("extra.png"), b"x").unwrap();
    let report = verify_release(&rel).unwrap();
    assert!(!report.intact());
    assert_eq!(report.changed, [listed[0].clone()]);
    assert_eq!(report.missing, [listed[1].clone()]);
    assert_eq!(report.unlisted, [PathBuf::from("extra.png")]);

    // A manifest from before the file list: per-image output hashes.
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rel.join(MANIFEST_FILE)).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("files");
    std::fs::write(rel.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
    let old = verify_release(&rel).unwrap();
    assert_eq!(
        (old.listed, old.changed.len(), old.missing.len()),
        (8, 1, 1)
    );
}

fn classwise_params() -> ProtectParams {
    let mut p = params();
    if let crate::protect::Method::Salm { classwise, .. } = &mut p.method {
        *classwise = true;
    }
    p
}

/// A run on the PNG folder `src` without checkpoint, noise file or reuse.
fn folder_config(src: &Path, output: PathBuf, params: ProtectParams) -> ProtectConfig {
    let source = DataSource::Folder {
        path: src.to_path_buf(),
    };
    ProtectConfig::new(source, output, params)
}

#[test]
fn a_kept_class_noise_protects_later_images_exactly_as_the_release() {
    let src = png_source();
    let out = tempfile::tempdir().unwrap();
    let key = out.path().join("keys").join("noise.safetensors");
    let first = ProtectConfig {
        noise_file: Some(key.clone()),
        ..folder_config(src.path(), out.path().join("first"), classwise_params())
    };
    protect(&first).unwrap();
    let noise = ClassNoise::load(&key).unwrap();
    assert_eq!(noise.classes, vec!["cluster", "nodule", "normal", "streak"]);
    assert_eq!(noise.params, classwise_params());
    assert!(noise.delta.iter().any(|&d| d != 0.0));

    // The same images through the kept noise: byte-identical files.
    let again = ProtectConfig {
        reuse_noise: Some(key.clone()),
        ..folder_config(src.path(), out.path().join("again"), classwise_params())
    };
    let report = protect(&again).unwrap();
    assert_eq!((report.rounds, report.image_steps), (0, 0));
    for class in ["cluster", "nodule", "normal", "streak"] {
        for entry in std::fs::read_dir(out.path().join("first").join(class)).unwrap() {
            let name = entry.unwrap().file_name();
            assert_eq!(
                std::fs::read(out.path().join("first").join(class).join(&name)).unwrap(),
                std::fs::read(out.path().join("again").join(class).join(&name)).unwrap(),
                "{class}/{name:?}"
            );
        }
    }
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("again").join(MANIFEST_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["reused_noise"],
        formats::sha256_hex(&std::fs::read(&key).unwrap())
    );
    assert_eq!(manifest["params"]["eps"], classwise_params().eps);
    assert!(verify_release(&out.path().join("again")).unwrap().intact());

    // New images of two of the classes (another draw, folders in another
    // order): each moves by exactly its class's noise, snapped to 8 bits.
    let later = tempfile::tempdir().unwrap();
    let new = lesions(&LesionSpec {
        seed: 9,
        per_class: 2,
        size: 16,
        texture: 0.04,
    })
    .unwrap();
    formats::write(&new, later.path()).unwrap();
    for gone in ["cluster", "normal"] {
        std::fs::remove_dir_all(later.path().join(gone)).unwrap();
    }
    let clean = formats::load(&DataSource::Folder {
        path: later.path().to_path_buf(),
    })
    .unwrap();
    protect(&ProtectConfig {
        reuse_noise: Some(key.clone()),
        ..folder_config(later.path(), out.path().join("later"), classwise_params())
    })
    .unwrap();
    let released = formats::load(&DataSource::Folder {
        path: out.path().join("later"),
    })
    .unwrap();
    let v = clean.shape().values();
    for i in 0..clean.len() {
        let class = &clean.classes()[clean.labels()[i] as usize];
        let u = noise.classes.iter().position(|c| c == class).unwrap();
        for (k, (x, y)) in clean.image(i).iter().zip(released.image(i)).enumerate() {
            let want = ((x + noise.delta[u * v + k]).clamp(0.0, 1.0) * 255.0).round() / 255.0;
            assert!(
                (y - want).abs() < 1e-6,
                "image {i} value {k}: {y} vs {want}"
            );
        }
    }
}

#[test]
fn class_noise_misuse_is_refused_and_loses_nothing() {
    let src = png_source();
    let out = tempfile::tempdir().unwrap();
    // The secret never goes into the release.
    let inside = ProtectConfig {
        noise_file: Some(out.path().join("rel").join("noise.safetensors")),
        ..folder_config(src.path(), out.path().join("rel"), classwise_params())
    };
    let err = protect(&inside).unwrap_err().to_string();
    assert!(err.contains("inside the release"), "{err}");
    assert!(!out.path().join("rel").exists());
    // A sample-wise run has no class noise to keep.
    let samplewise = ProtectConfig {
        noise_file: Some(out.path().join("n.safetensors")),
        ..folder_config(src.path(), out.path().join("rel"), params())
    };
    let err = protect(&samplewise).unwrap_err().to_string();
    assert!(err.contains("sample-wise"), "{err}");

    let key = out.path().join("n.safetensors");
    protect(&ProtectConfig {
        noise_file: Some(key.clone()),
        ..folder_config(src.path(), out.path().join("rel"), classwise_params())
    })
    .unwrap();
    let noise = ClassNoise::load(&key).unwrap();
    // A second release does not take the first one's noise file.
    let err = protect(&ProtectConfig {
        noise_file: Some(key.clone()),
        ..folder_config(src.path(), out.path().join("second"), classwise_params())
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("exists"), "{err}");
    assert_eq!(ClassNoise::load(&key).unwrap(), noise);
    // The same noise saved again gives the same bytes (the metadata is
    // written in one order, not the hash map's), so a reuse's recorded
    // SHA-256 names the noise, not the run that saved it.
    let first = std::fs::read(&key).unwrap();
    for k in 0..8 {
        let again = out.path().join(format!("again{k}.safetensors"));
        noise.save(&again).unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), first, "save {k}");
    }
    // Another image size, or a class the noise does not cover.
    let other = lesions(&LesionSpec {
        seed: 3,
        per_class: 1,
        size: 20,
        texture: 0.04,
    })
    .unwrap();
    let err = noise.apply(&other).unwrap_err().to_string();
    assert!(err.contains("1x16x16") && err.contains("1x20x20"), "{err}");
    let renamed = tempfile::tempdir().unwrap();
    formats::write(
        &formats::load(&DataSource::Folder {
            path: src.path().into(),
        })
        .unwrap(),
        renamed.path(),
    )
    .unwrap();
    std::fs::rename(renamed.path().join("streak"), renamed.path().join("mass")).unwrap();
    let err = protect(&ProtectConfig {
        reuse_noise: Some(key.clone()),
        ..folder_config(
            renamed.path(),
            out.path().join("renamed"),
            classwise_params(),
        )
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("\"mass\"") && err.contains("no noise"),
        "{err}"
    );
    assert!(!out.path().join("renamed").exists());
    // A noise edited past its budget is not the protection it describes.
    let mut edited = noise.clone();
    edited.delta[0] = 0.5;
    let bad = out.path().join("edited.safetensors");
    edited.save(&bad).unwrap();
    let err = ClassNoise::load(&bad).unwrap_err().to_string();
    assert!(err.contains("outside the budget"), "{err}");
    // Not a noise file at all.
    let err = ClassNoise::load(&src.path().join("normal").join("00000.png"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("safetensors"), "{err}");
}

#[test]
fn a_loaded_dataset_is_protected_without_reading_its_source_again() {
    let src = png_source();
    let out = tempfile::tempdir().unwrap();
    let first = folder_config(src.path(), out.path().join("a"), params());
    protect(&first).unwrap();
    let data = formats::load(&first.source).unwrap();
    let second = ProtectConfig {
        output: out.path().join("b"),
        ..first.clone()
    };
    // The source is gone: only the loaded copy can be protected.
    let moved = out.path().join("moved-source");
    std::fs::rename(src.path(), &moved).unwrap();
    assert!(protect(&second).is_err());
    let estimate = estimate_loaded(&second, &data).unwrap();
    assert_eq!(estimate.images, 8);
    let report = protect_loaded(&second, &data).unwrap();
    assert_eq!(report.files, 8);
    std::fs::rename(&moved, src.path()).unwrap();
    let items = |dir: &str| -> Vec<(String, String, String)> {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.path().join(dir).join(MANIFEST_FILE)).unwrap(),
        )
        .unwrap();
        m["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let s = |k: &str| i[k].as_str().unwrap().to_string();
                (s("output"), s("source_sha256"), s("output_sha256"))
            })
            .collect()
    };
    assert_eq!(items("a"), items("b"));
    assert!(verify_release(&out.path().join("b")).unwrap().intact());
}

/// Hash of every file under `dir` (relative path, SHA-256), sorted.
fn tree(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut files: Vec<(PathBuf, String)> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e.path().strip_prefix(dir).unwrap().to_path_buf();
            (rel, formats::sha256_hex(&std::fs::read(e.path()).unwrap()))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn the_noise_never_lands_in_the_release_or_the_source() {
    let src = png_source();
    let before = tree(src.path());
    let out = tempfile::tempdir().unwrap();
    let rel = out.path().join("rel");
    let cases = [
        (
            Some(rel.join("ckpt")),
            None,
            "checkpoint folder",
            "inside the release",
        ),
        (
            Some(src.path().join("ckpt")),
            None,
            "checkpoint folder",
            "inside the source",
        ),
        (
            None,
            Some(src.path().join("a").join("n.safetensors")),
            "noise file",
            "inside the source",
        ),
    ];
    for (checkpoint_dir, noise_file, what, why) in cases {
        let cfg = ProtectConfig {
            checkpoint_dir,
            noise_file,
            ..folder_config(src.path(), rel.clone(), classwise_params())
        };
        let err = protect(&cfg).unwrap_err().to_string();
        assert!(err.contains(what) && err.contains(why), "{err}");
        assert!(!rel.exists(), "nothing is written: {err}");
    }
    assert_eq!(tree(src.path()), before, "the source is untouched");
}

#[test]
fn an_output_that_holds_the_source_is_refused() {
    let parent = tempfile::tempdir().unwrap();
    let src = png_source();
    let data = parent.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for (rel, _) in tree(src.path()) {
        std::fs::create_dir_all(data.join(&rel).parent().unwrap()).unwrap();
        std::fs::copy(src.path().join(&rel), data.join(&rel)).unwrap();
    }
    let before = tree(parent.path());
    let cfg = ProtectConfig {
        overwrite: true,
        ..folder_config(&data, parent.path().to_path_buf(), params())
    };
    let err = protect(&cfg).unwrap_err().to_string();
    assert!(err.contains("contains the source"), "{err}");
    assert_eq!(tree(parent.path()), before);
    // A file where the output folder should be.
    let file = parent.path().join("afile");
    std::fs::write(&file, b"x").unwrap();
    let err = protect(&folder_config(&data, file, params()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a folder"), "{err}");
}

#[test]
fn overwrite_replaces_an_earlier_release_and_nothing_else() {
    let src = png_source();
    let out = tempfile::tempdir().unwrap();
    let rel = out.path().join("rel");
    protect(&folder_config(src.path(), rel.clone(), params())).unwrap();
    // A smaller dataset into the same folder: the first release's files
    // for the images that are gone must go too.
    let fewer = tempfile::tempdir().unwrap();
    let mut kept = 0;
    for (k, (path, _)) in tree(src.path()).into_iter().enumerate() {
        if k % 2 == 0 {
            continue;
        }
        std::fs::create_dir_all(fewer.path().join(&path).parent().unwrap()).unwrap();
        std::fs::copy(src.path().join(&path), fewer.path().join(&path)).unwrap();
        kept += 1;
    }
    assert!(kept > 0 && kept < 8, "{kept}");
    let cfg = ProtectConfig {
        overwrite: true,
        ..folder_config(fewer.path(), rel.clone(), params())
    };
    let report = protect(&cfg).unwrap();
    assert_eq!(report.files, kept);
    let check = verify_release(&rel).unwrap();
    assert!(check.intact(), "{check:?}");
    assert_eq!(check.listed, kept);

    // A file no release wrote stops the overwrite before anything is lost.
    std::fs::write(rel.join("notes.txt"), b"mine").unwrap();
    let before = tree(&rel);
    let err = protect(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("notes.txt") && err.contains("no earlier release"),
        "{err}"
    );
    assert_eq!(tree(&rel), before);
}

#[test]
fn verify_checks_every_image_the_manifest_describes() {
    let src = png_source();
    let out = tempfile::tempdir().unwrap();
    let rel = out.path().join("rel");
    protect(&folder_config(src.path(), rel.clone(), params())).unwrap();
    // Strike one image's file from the file list and delete it: the item
    // still describes it.
    let path = rel.join(MANIFEST_FILE);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let gone = m["files"][0]["path"].as_str().unwrap().to_string();
    m["files"].as_array_mut().unwrap().remove(0);
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    std::fs::remove_file(rel.join(&gone)).unwrap();
    let report = verify_release(&rel).unwrap();
    assert_eq!(report.missing, [PathBuf::from(&gone)]);
    assert_eq!(report.listed, 8);
    assert!(!report.intact());
}

#[test]
fn a_run_resumed_with_more_rounds_goes_on() {
    let src = png_source();
    let out = tempfile::tempdir().unwrap();
    let ckpt = out.path().join("ckpt");
    let one = {
        let mut p = params();
        p.stop.min_rounds = 1;
        p.stop.max_rounds = 1;
        p
    };
    let first = protect(&ProtectConfig {
        checkpoint_dir: Some(ckpt.clone()),
        ..folder_config(src.path(), out.path().join("r1"), one)
    })
    .unwrap();
    assert_eq!(first.rounds, 1);
    let resumed = protect(&ProtectConfig {
        checkpoint_dir: Some(ckpt.clone()),
        resume: true,
        ..folder_config(src.path(), out.path().join("r2"), params())
    })
    .unwrap();
    assert_eq!(resumed.rounds, 2);
    assert_eq!(resumed.stop_reason, Some(StopReason::MaxRounds));
    // The same two rounds as a run that was never interrupted.
    let straight = protect(&folder_config(src.path(), out.path().join("r3"), params())).unwrap();
    assert_eq!(resumed.quality, straight.quality);
}

#[test]
fn the_release_keeps_eps_on_its_grid_and_the_manifest_says_so() {
    let src = png_source();
    let out = tempfile::tempdir().unwrap();
    let rel = out.path().join("rel");
    // 0.03 is 7.65 steps of 1/255: the nearest step of the code's +eps is
    // 8, which would break the budget.
    let p = ProtectParams::lattice_code(0.03, 0.25);
    let report = protect(&folder_config(src.path(), rel.clone(), p)).unwrap();
    assert!(
        (report.quality.linf_max - 7.0 / 255.0).abs() < 1e-6,
        "{}",
        report.quality.linf_max * 255.0
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rel.join(MANIFEST_FILE)).unwrap()).unwrap();
    let warnings = m["warnings"].to_string();
    assert!(warnings.contains("capped at 7 steps"), "{warnings}");
    assert_eq!(m["source"]["kind"], "folder");
    // Below one step nothing could change: refused before any work.
    let mut tiny = params();
    tiny.eps = 0.5 / 255.0;
    let err = protect(&folder_config(src.path(), out.path().join("tiny"), tiny))
        .unwrap_err()
        .to_string();
    assert!(err.contains("below one step"), "{err}");
    assert!(!out.path().join("tiny").exists());
}

#[test]
fn a_dicom_release_warns_that_it_keeps_the_source_uids() {
    let pydicom = lethe_assets::Cache::from_env()
        .ensure(lethe_assets::Asset::PYDICOM_DATA)
        .unwrap();
    let src = tempfile::tempdir().unwrap();
    for (class, name) in [("a", "x.dcm"), ("b", "y.dcm")] {
        std::fs::create_dir_all(src.path().join(class)).unwrap();
        std::fs::copy(
            pydicom.join("MR_small.dcm"),
            src.path().join(class).join(name),
        )
        .unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let rel = out.path().join("rel");
    let p = ProtectParams::lattice_code(8.0 / 255.0, 0.25);
    protect(&folder_config(src.path(), rel.clone(), p)).unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rel.join(MANIFEST_FILE)).unwrap()).unwrap();
    let warnings = m["warnings"].to_string();
    assert!(warnings.contains("SOP Instance UIDs"), "{warnings}");
    // A PNG release has no such caveat.
    let png = png_source();
    let rel2 = out.path().join("rel2");
    protect(&folder_config(png.path(), rel2.clone(), params())).unwrap();
    let text = std::fs::read_to_string(rel2.join(MANIFEST_FILE)).unwrap();
    assert!(!text.contains("SOP Instance UIDs"));
}

/// The release's manifest as JSON, edited by `edit`, written back.
fn edit_manifest(rel: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = rel.join(MANIFEST_FILE);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[test]
fn manifest_paths_never_lead_out_of_the_release() {
    let src = png_source();
    let out = tempfile::tempdir().unwrap();
    let outside = out.path().join("secret.txt");
    std::fs::write(&outside, b"secret").unwrap();
    let sha = formats::sha256_hex(b"secret");
    let rel = out.path().join("rel");
    protect(&folder_config(src.path(), rel.clone(), params())).unwrap();
    let pristine = std::fs::read(rel.join(MANIFEST_FILE)).unwrap();
    for bad in [
        outside.to_str().unwrap().to_string(),
        "../secret.txt".to_string(),
        "a/../../secret.txt".to_string(),
    ] {
        std::fs::write(rel.join(MANIFEST_FILE), &pristine).unwrap();
        let entry = serde_json::json!({"path": bad.clone(), "sha256": sha});
        edit_manifest(&rel, |m| m["files"].as_array_mut().unwrap().push(entry));
        let err = verify_release(&rel).unwrap_err().to_string();
        assert!(err.contains("stay inside it"), "{bad}: {err}");
        // An image's own output path is checked the same way.
        std::fs::write(rel.join(MANIFEST_FILE), &pristine).unwrap();
        edit_manifest(&rel, |m| m["items"][0]["output"] = bad.clone().into());
        let err = verify_release(&rel).unwrap_err().to_string();
        assert!(err.contains("stay inside it"), "{bad}: {err}");
    }
}

#[test]
fn a_release_whose_files_left_its_manifest_is_not_audited() {
    let src = png_source();
    let source = DataSource::Folder {
        path: src.path().to_path_buf(),
    };
    let clean = formats::load(&source).unwrap();
    let out = tempfile::tempdir().unwrap();
    let released = release_of(&source, out.path(), "rel");
    let rel = out.path().join("rel");
    assert!(read_release(&released, &clean).is_ok());
    let pristine = std::fs::read(rel.join(MANIFEST_FILE)).unwrap();

    // A file listed twice counts once; two different hashes for one file
    // cannot both hold.
    edit_manifest(&rel, |m| {
        let first = m["files"][0].clone();
        m["files"].as_array_mut().unwrap().push(first);
    });
    let report = verify_release(&rel).unwrap();
    assert!(report.intact() && report.listed == 8, "{report:?}");
    std::fs::write(rel.join(MANIFEST_FILE), &pristine).unwrap();
    edit_manifest(&rel, |m| {
        m["items"][0]["output_sha256"] = "00".repeat(32).into()
    });
    let report = verify_release(&rel).unwrap();
    assert_eq!(report.changed.len(), 1, "{report:?}");
    let err = read_release(&released, &clean).unwrap_err().to_string();
    assert!(err.contains("does not match its manifest"), "{err}");

    // One pixel moved by a level, within eps, manifest untouched.
    std::fs::write(rel.join(MANIFEST_FILE), &pristine).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&pristine).unwrap();
    let file = rel.join(m["files"][0]["path"].as_str().unwrap());
    let img = image::open(&file).unwrap().to_luma8();
    let mut edited = img.clone();
    let p = edited.get_pixel_mut(0, 0);
    p.0[0] = if p.0[0] > 0 { p.0[0] - 1 } else { 1 };
    edited.save(&file).unwrap();
    let err = read_release(&released, &clean).unwrap_err().to_string();
    assert!(err.contains("1 file(s) changed"), "{err}");
}

#[test]
fn images_no_step_moved_are_named_in_the_warnings() {
    // The lattice code only brightens: an all-white image cannot move.
    let src = png_source();
    let p = ProtectParams::lattice_code(8.0 / 255.0, 0.25);
    let out = tempfile::tempdir().unwrap();
    protect(&folder_config(src.path(), out.path().join("a"), p.clone())).unwrap();
    let text = std::fs::read_to_string(out.path().join("a").join(MANIFEST_FILE)).unwrap();
    assert!(!text.contains("released unchanged"), "{text}");

    let normal = src.path().join("normal");
    let first = std::fs::read_dir(&normal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let shape = crate::dataset::ImageShape {
        channels: 1,
        height: 16,
        width: 16,
    };
    std::fs::write(
        &first,
        formats::png::encode(&[1.0; 256], shape, false, None).unwrap(),
    )
    .unwrap();
    let report = protect(&folder_config(src.path(), out.path().join("b"), p)).unwrap();
    assert_eq!(report.quality.unchanged, 1);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("b").join(MANIFEST_FILE)).unwrap())
            .unwrap();
    let warnings = m["warnings"].to_string();
    assert!(
        warnings.contains("1 of 8 images are released unchanged"),
        "{warnings}"
    );
}

#[test]
fn a_release_of_a_round_that_missed_the_stop_targets_says_so() {
    let src = png_source();
    let out = tempfile::tempdir().unwrap();
    // No targets: the run stops at max_rounds and nothing was missed.
    let report = protect(&folder_config(src.path(), out.path().join("a"), params())).unwrap();
    let released = report.released.as_ref().unwrap();
    assert_eq!(released.round, report.released_round);
    assert_eq!(weak_release_note(&report, &params().stop), None);
    let text = std::fs::read_to_string(out.path().join("a").join(MANIFEST_FILE)).unwrap();
    assert!(!text.contains("missed the stop rule"), "{text}");

    // A loss target two rounds cannot reach: max_rounds releases a round
    // that missed it, and the manifest and the report's note say so.
    let mut p = params();
    p.stop.loss_below = Some(1e-30);
    let report = protect(&folder_config(src.path(), out.path().join("b"), p.clone())).unwrap();
    assert_eq!(report.stop_reason, Some(StopReason::MaxRounds));
    let note = weak_release_note(&report, &p.stop).unwrap();
    assert!(note.contains("round 2 of 2 (max rounds)"), "{note}");
    assert!(note.contains("surrogate loss"), "{note}");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("b").join(MANIFEST_FILE)).unwrap())
            .unwrap();
    assert!(m["warnings"]
        .to_string()
        .contains("missed the stop rule's targets"));

    // Model-free codes have no round to judge.
    let code = ProtectParams::lattice_code(8.0 / 255.0, 0.25);
    let report = protect(&folder_config(
        src.path(),
        out.path().join("c"),
        code.clone(),
    ))
    .unwrap();
    assert_eq!(weak_release_note(&report, &code.stop), None);
}
