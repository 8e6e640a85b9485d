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
        releases: Vec::new(),
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
    // Per-class recall: one value per class, in 0..1, for every row.
    for row in &report.accuracy {
        assert_eq!(row.recall_peak.len(), report.dataset.classes.len());
        assert_eq!(row.recall_final.len(), report.dataset.classes.len());
        assert_eq!(row.precision_peak.len(), report.dataset.classes.len());
        for r in row
            .recall_peak
            .iter()
            .chain(&row.recall_final)
            .chain(&row.precision_peak)
        {
            assert!((0.0..=1.0).contains(r), "{row:?}");
        }
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Robustness"), "{md}");
    assert!(md.contains("## Per-class recall"), "{md}");
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
    // The SVG chart names its axes and every series in a legend.
    let svg = std::fs::read_to_string(out.join("figures/test_accuracy_curves.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
    for text in [
        "epoch",
        "test accuracy",
        "clean",
        "salm",
        "em-cw",
        "chance (25.0%)",
    ] {
        assert!(svg.contains(text), "{text} missing from the SVG");
    }
    assert!(md.contains("figures/test_accuracy_curves.svg"), "{md}");
    // The caption names each series by colour and marker, as drawn.
    assert!(
        md.contains("blue circles: clean; red triangles: salm"),
        "{md}"
    );
    assert!(report
        .files
        .iter()
        .any(|x| x == "figures/test_accuracy_curves.svg"));
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
    // A release may not take a method's name either.
    let mut release_dup = config(None);
    release_dup.releases.push(ReleaseRun {
        name: "salm".into(),
        source: DataSource::Folder { path: "rel".into() },
    });
    let mut twice = config(None);
    twice.seeds = vec![0, 0];
    let mut blank = config(None);
    blank.methods[1].name = " ".into();
    blank.headline.em = None;
    let mut headline_em = config(None);
    headline_em.headline.em = Some("missing-em".into());
    match audit(&headline_em) {
        Err(Error::Config(m)) => assert!(m.contains("`missing-em`"), "{m}"),
        other => panic!("an unknown headline em was accepted: {:?}", other.err()),
    }
    let mut pipe = config(None);
    pipe.methods[1].name = "a|b".into();
    pipe.headline.em = None;
    for (what, cfg) in [
        ("repeated seed", twice),
        ("blank name", blank),
        ("name with |", pipe),
        ("release duplicate", release_dup),
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
    // The confusion matrices count every test image once, and their
    // diagonals give the peak and final accuracies.
    for run in [&on_protected, &on_clean] {
        for (m, acc) in [
            (&run.confusion_peak, run.test_acc_peak),
            (&run.confusion_final, run.test_acc_final),
        ] {
            assert_eq!(m.len(), 4, "{run:?}");
            let total: u32 = m.iter().flatten().sum();
            assert_eq!(total, 40);
            let hits: u32 = (0..4).map(|c| m[c][c]).sum();
            assert!((f64::from(hits) / 40.0 - acc).abs() < 1e-12, "{run:?}");
        }
    }
}

#[test]
fn per_class_recall_and_precision_name_the_classes_a_victim_still_tells_apart() {
    // A victim that separates class 0 perfectly and puts every other
    // image into class 3 (the lattice-code CNN victim's peak on the
    // selection draw): class 0 is recognised; class 3 collects predictions
    // (recall ~1) without being recognised (precision ~1/3).
    let m = vec![
        vec![75, 0, 0, 0],
        vec![0, 0, 0, 75],
        vec![3, 0, 0, 72],
        vec![2, 0, 0, 73],
    ];
    assert!((recall(&m, 0) - 1.0).abs() < 1e-12);
    assert!((precision(&m, 0) - 75.0 / 80.0).abs() < 1e-12);
    assert!((recall(&m, 3) - 73.0 / 75.0).abs() < 1e-12);
    assert!((precision(&m, 3) - 73.0 / 220.0).abs() < 1e-12);
    assert_eq!(precision(&m, 1), 0.0, "never predicted");
    // Averages over runs, class by class.
    let chance = vec![vec![75, 0, 0, 0]; 4];
    let r = mean_per_class([&m, &chance].into_iter(), recall);
    assert_eq!(r.len(), 4);
    assert!((r[0] - 1.0).abs() < 1e-12 && (r[3] - 73.0 / 150.0).abs() < 1e-12);
    let row = AccuracyRow {
        data: "code".into(),
        arch: "cnn".into(),
        runs: 1,
        peak_mean: 0.49,
        peak_range: (0.49, 0.49),
        final_mean: 0.37,
        train_mean: 1.0,
        recall_peak: mean_per_class(std::iter::once(&m), recall),
        recall_final: vec![0.0; 4],
        precision_peak: mean_per_class(std::iter::once(&m), precision),
    };
    let classes: Vec<String> = ["normal", "nodule", "cluster", "streak"]
        .map(String::from)
        .to_vec();
    let kept = recognised(&row, &classes);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].0, "normal");
    let note = recognised_note(&row, &classes).unwrap();
    assert!(
        note.ends_with("still recognise normal (recall 100%, precision 94%)."),
        "{note}"
    );
    // A victim that learnt everything: one sentence, not a list.
    let all = AccuracyRow {
        recall_peak: vec![0.95; 4],
        precision_peak: vec![0.9; 4],
        ..row.clone()
    };
    let note = recognised_note(&all, &classes).unwrap();
    assert!(note.contains("every class"), "{note}");
    // Nothing recognised: no note.
    let none = AccuracyRow {
        precision_peak: vec![0.5; 4],
        ..row
    };
    assert_eq!(recognised_note(&none, &classes), None);
}

#[test]
fn a_release_on_disk_is_audited_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(Some(dir.path().join("audit")));
    // A class-wise EM release: the report calls the headline run EM.
    let params = cfg.methods[1].params.clone();
    crate::release::protect(&crate::ProtectConfig::new(
        cfg.source.clone(),
        dir.path().join("rel"),
        params.clone(),
    ))
    .unwrap();
    cfg.methods.clear();
    cfg.releases = vec![ReleaseRun {
        name: "rel".into(),
        source: DataSource::Folder {
            path: dir.path().join("rel"),
        },
    }];
    cfg.robustness = None;
    cfg.seeds = vec![0];
    cfg.headline = Headline {
        salm: "rel".into(),
        em: None,
    };
    let report = audit(&cfg).unwrap();

    // Clean and the release, each on both architectures; nothing crafted.
    let names: Vec<&str> = report.accuracy.iter().map(|r| r.data.as_str()).collect();
    assert_eq!(names, ["clean", "clean", "rel", "rel"]);
    let rel = &report.methods[0];
    assert_eq!(rel.params, params);
    assert_eq!(rel.rounds, params.stop.max_rounds);
    assert!(rel.release.as_deref().is_some_and(|p| p.ends_with("rel")));
    // Quality on the training split, within the release's budget.
    assert!(rel.quality.linf_max > 0.0);
    assert!(
        rel.quality.linf_max <= 8.5 / 255.0,
        "{}",
        rel.quality.linf_max
    );
    assert_eq!(report.summary.eps, params.eps);
    assert!(report
        .notes
        .iter()
        .any(|n| n.contains("not crafted by this audit")));
    let md = std::fs::read_to_string(dir.path().join("audit/report.md")).unwrap();
    assert!(md.contains("| EM accuracy (eps 8.0/255"), "{md}");
    assert!(!md.contains("SALM accuracy"), "{md}");
}

/// A victim row with a given test-accuracy curve (percent).
fn row(data: &str, arch: &str, seed: u64, curve: &[u32]) -> VictimRow {
    let curve: Vec<f64> = curve.iter().map(|&c| f64::from(c) / 100.0).collect();
    let (peak_epoch, peak) =
        curve.iter().enumerate().fold(
            (0, 0.0),
            |(e, p), (i, &c)| if c > p { (i + 1, c) } else { (e, p) },
        );
    VictimRow {
        data: data.into(),
        run: VictimRun {
            arch: arch.into(),
            seed,
            defence: "none".into(),
            test_acc_peak: peak,
            test_acc_final: *curve.last().unwrap(),
            peak_epoch,
            train_acc_final: 1.0,
            curve,
            confusion_peak: Vec::new(),
            confusion_final: Vec::new(),
            seconds: 0.0,
        },
    }
}

#[test]
fn early_peaks_are_put_beside_clean_victims_at_the_same_epoch() {
    // 20 epochs: the window is the first 2.
    let tail = [25; 18];
    let curve = |head: [u32; 2], rest: &[u32]| [&head[..], rest].concat();
    let victims = vec![
        row("clean", "cnn", 0, &curve([30, 60], &[90; 18])),
        row("clean", "cnn", 1, &curve([45, 70], &[92; 18])),
        row("noisy", "cnn", 0, &curve([30, 50], &tail)),
        row(
            "noisy",
            "cnn",
            1,
            &curve(
                [40, 25],
                &[
                    26, 31, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25,
                ],
            ),
        ),
        // Peaks at once and holds it (a task learned in an epoch): no note.
        row("held", "cnn", 0, &curve([100, 100], &[100; 18])),
        row("held", "cnn", 1, &curve([90, 100], &[100; 18])),
        // Peaks late: no note for this training set.
        row(
            "late",
            "cnn",
            0,
            &curve(
                [25, 25],
                &[
                    25, 60, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25, 25,
                ],
            ),
        ),
    ];
    let notes = early_peak_notes(&victims, 20);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(
        notes[0],
        "noisy: 2 of 2 victims peak within the first 2 of 20 epochs (at 50, 40%; epochs 2, 1), \
         where clean victims of the same architecture and seed are at 60, 45%; after epoch 2 \
         their best is 25, 31% (mean 28.0%)."
    );
}

#[test]
fn barely_trained_victims_are_named_with_their_step_count() {
    // The audits' victim batch (evals/protect/*.json, CLI default).
    let victim = |epochs| VictimConfig {
        epochs,
        batch: 64,
        sgd: SgdParams::unlearnable_examples(),
    };
    // 38 images in one batch an epoch, 5 epochs: 5 steps.
    let note = short_training(38, &victim(5)).expect("a note");
    assert!(
        note.contains("only 5 SGD steps") && note.contains("38 training images"),
        "{note}"
    );
    // The reported lesions recipe (900 images, 30 epochs) is not flagged;
    // the step count, not the epoch count, decides.
    assert_eq!(short_training(900, &victim(30)), None);
    let epochs = FEW_VICTIM_STEPS.div_ceil(900usize.div_ceil(64));
    assert_eq!(short_training(900, &victim(epochs)), None);
    assert!(short_training(900, &victim(epochs - 1)).is_some());
    assert_eq!(short_training(0, &victim(5)), None);
}

#[test]
fn a_loaded_dataset_is_audited_without_reading_its_source_again() {
    let dir = tempfile::tempdir().unwrap();
    // A folder-per-class PNG dataset: a model-free release of the lesions.
    let mut cfg = config(None);
    crate::release::protect(&crate::ProtectConfig::new(
        cfg.source.clone(),
        dir.path().join("src"),
        ProtectParams::lattice_code(8.0 / 255.0, 0.25),
    ))
    .unwrap();
    cfg.source = DataSource::Folder {
        path: dir.path().join("src"),
    };
    cfg.methods.truncate(1);
    cfg.robustness = None;
    cfg.seeds = vec![0];
    cfg.victims.truncate(1);
    cfg.headline = Headline {
        salm: "salm".into(),
        em: None,
    };
    let data = formats::load(&cfg.source).unwrap();
    let moved = dir.path().join("moved");
    std::fs::rename(dir.path().join("src"), &moved).unwrap();
    assert!(audit(&cfg).is_err());
    let loaded = audit_loaded(&cfg, &data).unwrap();
    std::fs::rename(&moved, dir.path().join("src")).unwrap();
    let read = audit(&cfg).unwrap();
    let accs = |r: &AuditReport| -> Vec<(String, f64, f64)> {
        r.accuracy
            .iter()
            .map(|a| (a.data.clone(), a.peak_mean, a.final_mean))
            .collect()
    };
    assert_eq!(accs(&loaded).len(), 2);
    assert_eq!(accs(&loaded), accs(&read));
    assert_eq!(loaded.summary.salm_psnr_db, read.summary.salm_psnr_db);
}

fn info(test_per_class: Vec<usize>) -> DatasetInfo {
    let test: usize = test_per_class.iter().sum();
    DatasetInfo {
        name: "d".into(),
        shape: crate::dataset::ImageShape {
            channels: 1,
            height: 8,
            width: 8,
        },
        classes: (0..test_per_class.len()).map(|c| c.to_string()).collect(),
        train: 900,
        test,
        zero_fraction: 0.0,
        chance: *test_per_class.iter().max().unwrap() as f64 / test as f64,
        test_per_class,
        class_signal: None,
    }
}

#[test]
fn generated_lesions_report_their_signal_against_the_budget() {
    let spec = crate::LesionSpec {
        per_class: 10,
        ..crate::LesionSpec::default()
    };
    let mut i = info(vec![75; 4]);
    i.shape = crate::dataset::ImageShape {
        channels: 1,
        height: 32,
        width: 32,
    };
    let s = summary_of(0.94, 0.5, i.chance);
    assert!(signal_note(&s, &i).is_none(), "no signal, no note");
    let signal = crate::sources::lesion_class_signal(&spec).unwrap();
    i.class_signal = Some(signal.clone());
    let note = signal_note(&s, &i).unwrap();
    // 0.25 of 1024 values moved by 8/255: 0.252.
    assert!(note.contains("0.252"), "{note}");
    for c in &signal[1..] {
        assert!(note.contains(&c.class), "{note}");
        let ratio = c.energy_mean / 0.252;
        assert!(
            ratio > 1.0,
            "{} carries less than the budget: {ratio}",
            c.class
        );
    }
    assert!(
        !note.contains("normal"),
        "the normal class carries nothing: {note}"
    );
    assert!(!note.contains("  "), "stray spaces: {note}");
}

fn summary_of(clean_acc: f64, salm_acc: f64, chance: f64) -> Summary {
    let learned = clean_acc - chance;
    Summary {
        dataset: "d".into(),
        clean_acc,
        salm_acc,
        em_acc: None,
        salm_acc_worst: salm_acc,
        salm_psnr_db: Some(36.0),
        em_psnr_db: None,
        eps: 8.0 / 255.0,
        rho: 0.25,
        salm_unlearnability: (learned >= MIN_LEARNED).then(|| (clean_acc - salm_acc) / learned),
        salm_acc_worst_defence: None,
        worst_defence: None,
        meets_acceptance: false,
    }
}

#[test]
fn reports_say_when_their_numbers_cannot_carry_a_conclusion() {
    let victim = VictimConfig {
        epochs: 30,
        batch: 64,
        sgd: SgdParams::unlearnable_examples(),
    };
    let notes_of = |s: &Summary, i: &DatasetInfo| notes(s, &[], &[], i, "SALM", &victim).join("\n");
    // A balanced, well-sized split with a clear result: none of these notes.
    let ok = info(vec![75; 4]);
    let text = notes_of(&summary_of(0.94, 0.5, ok.chance), &ok);
    assert!(
        !text.contains("not defined") && !text.contains("small") && !text.contains("unbalanced"),
        "{text}"
    );
    // Clean victims at chance: no unlearnability, said so.
    let s = summary_of(0.52, 0.56, 0.5);
    assert_eq!(s.salm_unlearnability, None);
    let two = info(vec![50, 50]);
    assert!(notes_of(&s, &two).contains("Unlearnability is not defined"));
    // 8 + 1 test images: the chance level is the majority's 88.9 %, and a
    // class with one image makes the split small.
    let unbalanced = info(vec![8, 1]);
    assert!((unbalanced.chance - 8.0 / 9.0).abs() < 1e-12);
    let text = notes_of(&summary_of(0.889, 0.889, unbalanced.chance), &unbalanced);
    assert!(
        text.contains("unbalanced") && text.contains("88.9%"),
        "{text}"
    );
    assert!(text.contains("test split is small"), "{text}");
    // A class without test images has no recall.
    let empty = info(vec![3, 0]);
    let text = notes_of(&summary_of(1.0, 1.0, empty.chance), &empty);
    assert!(text.contains("no recall: n/a"), "{text}");
}

#[test]
fn the_report_never_lands_in_the_data_or_a_release() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rel = dir.path().join("rel");
    std::fs::create_dir_all(data.join("a")).unwrap();
    std::fs::create_dir_all(&rel).unwrap();
    let with = |out: PathBuf| {
        let mut cfg = config(Some(out));
        cfg.source = DataSource::Folder { path: data.clone() };
        cfg.releases.push(ReleaseRun {
            name: "rel".into(),
            source: DataSource::Folder { path: rel.clone() },
        });
        cfg.validate()
    };
    for (out, what) in [
        (data.clone(), "inside the data"),
        (data.join("a/report"), "inside the data"),
        (rel.join("audit"), "inside a release"),
    ] {
        let err = with(out.clone()).unwrap_err().to_string();
        assert!(err.contains(what), "{}: {err}", out.display());
    }
    // A folder of other files is not rewritten; an earlier report's is.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"mine").unwrap();
    let err = with(other.clone()).unwrap_err().to_string();
    assert!(err.contains("no earlier report.json"), "{err}");
    std::fs::write(other.join("report.json"), b"{}").unwrap();
    assert!(with(other).is_ok());
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(with(file).unwrap_err().to_string().contains("not a folder"));
    assert!(with(dir.path().join("new")).is_ok());
}

#[test]
fn reports_say_when_a_released_round_missed_its_stop_targets() {
    let victim = VictimConfig {
        epochs: 30,
        batch: 64,
        sgd: SgdParams::unlearnable_examples(),
    };
    let mut params = ProtectParams::salm(8.0 / 255.0, 0.25);
    params.stop = StopRule {
        shortcut_accuracy: Some(0.9),
        ..StopRule::new(1, 2, Some(0.99), None)
    };
    let log = |round, accuracy, shortcut| RoundLog {
        round,
        train_loss: 0.1,
        accuracy,
        loss: 0.1,
        saturated: 1.0,
        shortcut_accuracy: Some(shortcut),
        proxy_accuracy: None,
        mask_changed: None,
        seconds: 1.0,
    };
    let shape = ImageShape {
        channels: 1,
        height: 2,
        width: 2,
    };
    let (_, quality) = crate::metrics::dataset_quality(&[0.5; 4], &[0.5; 4], shape);
    let method = |released_round| MethodResult {
        name: "salm".into(),
        label: params.label(),
        params: params.clone(),
        rounds: 2,
        stop_reason: Some(StopReason::MaxRounds),
        released_round,
        seconds: 2.0,
        image_steps: 8,
        image_steps_per_second: 4.0,
        quality: quality.clone(),
        round_log: vec![log(1, 1.0, 0.97), log(2, 0.48, 0.44)],
        release: None,
    };
    let i = info(vec![75; 4]);
    let s = summary_of(0.94, 0.5, i.chance);
    let text = notes(&s, &[method(2)], &[], &i, "SALM", &victim).join("\n");
    assert!(
        text.contains("`salm` releases round 2 of 2 (max rounds), which missed")
            && text.contains("shortcut accuracy 0.44 < 0.90")
            && text.contains("surrogate accuracy 0.480 < 0.99"),
        "{text}"
    );
    // The round that met both targets, released: no such note.
    let text = notes(&s, &[method(1)], &[], &i, "SALM", &victim).join("\n");
    assert!(!text.contains("missed"), "{text}");
}
