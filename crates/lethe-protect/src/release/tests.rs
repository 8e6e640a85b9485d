//! End to end on files: the release mirrors the source and the manifest
//! describes it.

use super::*;
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
    let cfg = ProtectConfig {
        source: DataSource::Folder {
            path: src.path().to_path_buf(),
        },
        output: out.path().join("release"),
        params: params(),
        checkpoint_dir: None,
        resume: false,
        overwrite: false,
        progress: false,
    };
    let report = protect(&cfg).unwrap();
    assert!(report.finished);
    assert_eq!(report.images, 8);
    assert_eq!(report.files, 8);
    assert_eq!(report.rounds, 2);
    assert!(report.quality.linf_max <= 8.5 / 255.0 + 1e-6);
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
        source: DataSource::Folder {
            path: src.path().to_path_buf(),
        },
        output: out.path().join("a"),
        params: params(),
        checkpoint_dir: Some(ck.path().to_path_buf()),
        resume: true,
        overwrite: false,
        progress: false,
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
fn resume_without_a_checkpoint_folder_is_a_config_error() {
    let cfg = ProtectConfig {
        source: DataSource::Digits,
        output: "unused".into(),
        params: params(),
        checkpoint_dir: None,
        resume: true,
        overwrite: false,
        progress: false,
    };
    assert!(matches!(protect(&cfg), Err(Error::Config(_))));
}

#[test]
fn estimate_reads_the_source() {
    let src = png_source();
    let cfg = ProtectConfig {
        source: DataSource::Folder {
            path: src.path().to_path_buf(),
        },
        output: "unused".into(),
        params: params(),
        checkpoint_dir: None,
        resume: false,
        overwrite: false,
        progress: false,
    };
    let e = estimate(&cfg).unwrap();
    assert_eq!(e.images, 8);
    assert!(e.seconds_per_round > 0.0);
}
