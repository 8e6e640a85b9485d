//! The audit end to end on a tiny dataset (report files, tables, summary
//! keys), config validation, and the victim-side evidence that class-wise
//! noise is a learnable shortcut.
//!
//! `LETHE_TEST_SIZE=full` makes the end-to-end audit bigger (more images,
//! rounds and epochs); the default `small` keeps it to seconds.

use super::*;
use crate::dataset::{Format, Item};
use crate::model::SgdParams;
use crate::protect::StopRule;
use crate::sources::LesionSpec;

fn full() -> bool {
    std::env::var("LETHE_TEST_SIZE").is_ok_and(|v| v == "full")
}

fn fast(mut p: ProtectParams, rounds: usize) -> ProtectParams {
    p.surrogate = Arch::Cnn {
        channels: vec![8, 16],
        batch_norm: true,
    };
    p.pgd_steps = 3;
    p.pgd_batch = 32;
    p.train_steps_per_round = 4;
    p.train_batch = 32;
    p.stop = StopRule {
        min_rounds: rounds,
        max_rounds: rounds,
        train_accuracy: None,
        loss_below: None,
        patience: 1,
        shortcut_accuracy: None,
    };
    p
}

fn classwise_salm(eps: f64, rho: f64) -> ProtectParams {
    let mut p = ProtectParams::salm(eps, rho);
    if let Method::Salm { classwise, .. } = &mut p.method {
        *classwise = true;
    }
    p
}

fn config(out: Option<PathBuf>) -> AuditConfig {
    let (per_class, rounds, epochs) = if full() { (40, 4, 10) } else { (8, 1, 2) };
    AuditConfig {
        source: DataSource::Lesions(LesionSpec {
            seed: 3,
            per_class,
            size: 16,
            texture: 0.04,
        }),
        test_fraction: 0.25,
        split_seed: 0,
        methods: vec![
            MethodRun {
                name: "salm".into(),
                params: fast(classwise_salm(8.0 / 255.0, 0.25), rounds),
            },
            MethodRun {
                name: "em-cw".into(),
                params: fast(
                    ProtectParams {
                        method: Method::Em { classwise: true },
                        ..ProtectParams::em(8.0 / 255.0)
                    },
                    rounds,
                ),
            },
        ],
        victims: vec![
            Arch::Cnn {
                channels: vec![4, 8],
                batch_norm: true,
            },
            Arch::Resnet18 { width: 2 },
        ],
        seeds: vec![0, 1],
        victim: VictimConfig {
            epochs,
            batch: 16,
            sgd: SgdParams {
                lr: 0.05,
                ..SgdParams::unlearnable_examples()
            },
        },
        robustness: Some(RobustnessConfig {
            defences: vec![
                Defence::Grayscale,
                Defence::Jpeg { quality: 10 },
                Defence::FlipCrop,
            ],
            methods: vec!["salm".into()],
            arch: 0,
            seed: 0,
        }),
        headline: Headline {
            salm: "salm".into(),
            em: Some("em-cw".into()),
        },
        out_dir: out,
        device: "cpu".into(),
        progress: false,
    }
}

#[test]
fn audit_writes_report_tables_summary_and_figures() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("audit");
    let mut cfg = config(Some(out.clone()));
    // One method releases by proxy victim (its log and report line below).
    cfg.methods[1].params.release = crate::Release::ProxyVictim(crate::ProxyVictim {
        epochs: 1,
        batch: 16,
        ..crate::ProxyVictim::new(Arch::Cnn {
            channels: vec![4, 8],
            batch_norm: true,
        })
    });
    let report = audit(&cfg).unwrap();

    // Victim grid: (clean + 2 methods) x 2 architectures, 2 seeds each.
    assert_eq!(report.accuracy.len(), 6);
    assert!(report.accuracy.iter().all(|r| r.runs == 2));
    // Robustness: grayscale does not apply to gray data; the others ran on
    // clean and the listed method only.
    assert_eq!(report.robustness.len(), 3);
    assert!(report.robustness[0].not_applicable.is_some());
    for row in &report.robustness[1..] {
        let names: Vec<&str> = row.results.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names, ["clean", "salm"], "{}", row.defence);
    }
    let s = &report.summary;
    assert_eq!(s.dataset, "lesions");
    assert!((s.eps - 8.0 / 255.0).abs() < 1e-12);
    assert_eq!(s.rho, 0.25);
    for acc in [s.clean_acc, s.salm_acc, s.em_acc.unwrap_or(-1.0)] {
        assert!((0.0..=1.0).contains(&acc), "{acc}");
    }
    let psnr = s.salm_psnr_db.unwrap();
    assert!(psnr > 30.0 && psnr < 80.0, "{psnr}");
    let expected = s.clean_acc >= 0.9 && s.salm_acc <= 0.3 && psnr >= 30.0;
    assert_eq!(s.meets_acceptance, expected);
    // The SALM release respects its budget.
    let salm = &report.methods[0];
    assert!(salm.quality.linf_max <= 8.0 / 255.0 + 0.5 / 255.0 + 1e-9);
    assert!(salm.quality.l0_max <= 0.25 + 1.0 / 256.0);

    // Files: JSON with the machine-readable summary, Markdown, figures.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    for key in [
        "clean_acc",
        "salm_acc",
        "em_acc",
        "salm_psnr_db",
        "eps",
        "rho",
        "dataset",
    ] {
        assert!(!json["summary"][key].is_null(), "summary.{key} missing");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Robustness"), "{md}");
    assert!(md.contains("| jpeg-q10 |"), "{md}");
    assert!(md.contains("| em-cw |"), "{md}");
    assert!(
        md.contains("em-cw: proxy-victim peak accuracy on the clean holdout"),
        "{md}"
    );
    let em = &report.methods[1];
    assert!(em.round_log.iter().all(|l| l.proxy_accuracy.is_some()));
    assert!(report.methods[0]
        .round_log
        .iter()
        .all(|l| l.proxy_accuracy.is_none()));
    let logged = &json["methods"][1]["round_log"][0]["proxy_accuracy"];
    assert!(logged.is_f64(), "{logged}");
    assert!(json["methods"][0]["round_log"][0]
        .get("proxy_accuracy")
        .is_none());
    for f in ["figures/examples.png", "figures/test_accuracy_curves.png"] {
        let img = image::open(out.join(f)).unwrap();
        assert!(img.width() > 16 && img.height() > 16, "{f}");
        assert!(report.files.iter().any(|x| x == f), "{f} not listed");
    }
}

#[test]
fn inconsistent_audit_configs_are_refused() {
    let mut dup = config(None);
    dup.methods[1].name = "salm".into();
    let mut clean = config(None);
    clean.methods[1].name = "clean".into();
    clean.headline.em = None;
    let mut headline = config(None);
    headline.headline.salm = "nope".into();
    let mut arch = config(None);
    if let Some(r) = &mut arch.robustness {
        r.arch = 5;
    }
    let mut no_seeds = config(None);
    no_seeds.seeds.clear();
    for (what, cfg) in [
        ("duplicate", dup),
        ("clean", clean),
        ("headline", headline),
        ("arch", arch),
        ("seeds", no_seeds),
    ] {
        assert!(
            matches!(audit(&cfg), Err(Error::Config(_))),
            "{what} was accepted"
        );
    }
}

/// Label-independent gray images (values 0.4..0.6 on the 8-bit grid):
/// nothing real to learn.
fn no_signal(n: usize) -> Dataset {
    let shape = ImageShape {
        channels: 1,
        height: 8,
        width: 8,
    };
    let mut state = 12345u64;
    let pixels = (0..n * shape.values())
        .map(|_| {
            state = crate::sources::mix(state, 1, 2);
            (102 + (state % 52) as u32) as f32 / 255.0
        })
        .collect();
    Dataset::new(
        "no-signal",
        shape,
        pixels,
        (0..n).map(|i| (i % 4) as u32).collect(),
        (0..4).map(|c| c.to_string()).collect(),
        vec![Item::in_memory(Some(255)); n],
        Format::Generated,
    )
    .unwrap()
}

#[test]
fn classwise_noise_is_a_shortcut_that_clean_test_images_lack() {
    // Protect everything class-wise, then split: a victim trained on the
    // protected training images recognises protected held-out images of
    // the same class (it learnt the noise) but is at chance on the clean
    // ones, because the images themselves carry no signal.
    let data = no_signal(160);
    let mut p = fast(classwise_salm(16.0 / 255.0, 0.5), 2);
    p.surrogate = Arch::Cnn {
        channels: vec![8],
        batch_norm: true,
    };
    let prot = protect::protect_dataset(&data, &p, &RunControl::default())
        .unwrap()
        .protected;
    let train: Vec<usize> = (0..120).collect();
    let test: Vec<usize> = (120..160).collect();
    let cfg = VictimConfig {
        epochs: 15,
        batch: 16,
        sgd: SgdParams {
            lr: 0.05,
            ..SgdParams::unlearnable_examples()
        },
    };
    let arch = Arch::Cnn {
        channels: vec![8, 16],
        batch_norm: true,
    };
    let cpu = candle_core::Device::Cpu;
    let ptrain = prot.subset(&train).unwrap();
    let on_protected = train_victim(
        &ptrain,
        &prot.subset(&test).unwrap(),
        &arch,
        0,
        &Defence::None,
        &cfg,
        &cpu,
    )
    .unwrap();
    let on_clean = train_victim(
        &ptrain,
        &data.subset(&test).unwrap(),
        &arch,
        0,
        &Defence::None,
        &cfg,
        &cpu,
    )
    .unwrap();
    assert!(
        on_protected.test_acc_final >= 0.9,
        "the noise was not learnt: {on_protected:?}"
    );
    assert!(
        on_clean.test_acc_final <= 0.5,
        "clean images were classified: {on_clean:?}"
    );
}
