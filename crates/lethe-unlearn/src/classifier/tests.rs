//! Classifier methods on a tiny CNN trained on synthetic images: SalUn
//! forgets a class while keeping the others and never moves a weight
//! outside its mask; GA and fine-tuning change the model; Retrain is
//! training from scratch on the retain set; SalUn's metrics are in range;
//! runs are deterministic; bad inputs are clear errors.

use crate::classifier::finetune::FinetuneConfig;
use crate::classifier::ga::GaClassifierConfig;
use crate::classifier::retrain::RetrainConfig;
use crate::classifier::salun::{classifier_saliency_mask, random_labels, SalunRlConfig};
use crate::classifier::{
    accuracy, classifier_hash, clone_classifier, evaluate, new_classifier, train_classifier,
    ClassifierMethod, ClassifierMethodConfig,
};
use crate::data::ImageSet;
use crate::testutil::{cnn_config, cnn_train_config, dev, setup, tiny_cnn};
use crate::Error;

/// (forget = class 0 of train, retain = the rest, test without class 0).
fn classwise(train: &ImageSet, test: &ImageSet) -> (ImageSet, ImageSet, ImageSet) {
    (
        train.subset(&train.indices_where(|l| l == 0)).unwrap(),
        train.subset(&train.indices_where(|l| l != 0)).unwrap(),
        test.subset(&test.indices_where(|l| l != 0)).unwrap(),
    )
}

fn salun(lr: f64, epochs: usize) -> SalunRlConfig {
    SalunRlConfig {
        epochs,
        batch_size: 32,
        mask_batch_size: 64,
        seed: 2,
        ..SalunRlConfig::paper(lr)
    }
}

#[test]
fn tiny_cnn_learns_the_synthetic_classes() {
    let (model, _, test) = tiny_cnn();
    let acc = accuracy(model.as_ref(), &test, 64).unwrap();
    assert!(acc >= 0.9, "test accuracy {acc}");
}

#[test]
fn salun_forgets_a_class_and_keeps_the_others() {
    let (model, train, test) = tiny_cnn();
    let (forget, retain, test_r) = classwise(&train, &test);
    let before = evaluate(model.as_ref(), &forget, &retain, &test_r, 0).unwrap();
    assert!(
        before.ua <= 10.0,
        "the original knows the class: UA {}",
        before.ua
    );
    let report = salun(0.01, 2)
        .unlearn(model.as_ref(), &forget, &retain)
        .unwrap();
    let after = evaluate(model.as_ref(), &forget, &retain, &test_r, 0).unwrap();
    assert!(after.ua >= 90.0, "UA {}", after.ua);
    assert!(after.ra >= 90.0, "RA {}", after.ra);
    assert!(
        after.ta >= before.ta - 10.0,
        "TA {} -> {}",
        before.ta,
        after.ta
    );
    assert_eq!(report.method, "salun");
    assert_eq!(report.metrics["frozen_weights_changed"], 0.0);
    assert!(report.metrics["forget_acc_after"] < report.metrics["forget_acc_before"]);
    let mask = report.mask.unwrap();
    assert_eq!(mask.kept, mask.total / 2);
    assert_eq!(
        report.weights_after,
        classifier_hash(model.as_ref()).unwrap()
    );
    assert_ne!(report.weights_before, report.weights_after);
}

#[test]
fn salun_never_moves_weights_outside_its_mask() {
    let (model, train, test) = tiny_cnn();
    let (forget, retain, _) = classwise(&train, &test);
    let bits = |m: &dyn lethe_model::vision::ImageClassifier| -> Vec<(String, Vec<u32>)> {
        m.named_trainable_vars()
            .into_iter()
            .map(|(n, v)| {
                let b = v
                    .as_detached_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                (n, b.into_iter().map(f32::to_bits).collect())
            })
            .collect()
    };
    let before = bits(model.as_ref());
    // Mixed passes here; the sequential order is covered above.
    let cfg = SalunRlConfig {
        keep_ratio: 0.2,
        mixed: true,
        ..salun(0.05, 2)
    };
    let mask = classifier_saliency_mask(model.as_ref(), &forget, 0.2, 64).unwrap();
    cfg.unlearn(model.as_ref(), &forget, &retain).unwrap();
    let after = bits(model.as_ref());
    let (mut frozen, mut moved) = (0, 0);
    for ((name, old), (_, new)) in before.iter().zip(&after) {
        let m: Vec<u8> = mask
            .mask(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for ((o, n), k) in old.iter().zip(new).zip(&m) {
            if *k == 0 {
                assert_eq!(o, n, "{name}: a weight outside the mask moved");
                frozen += 1;
            } else if o != n {
                moved += 1;
            }
        }
    }
    assert_eq!(frozen + mask.kept(), mask.total());
    assert!(
        moved > mask.kept() / 2,
        "{moved} of {} salient weights moved",
        mask.kept()
    );
}

#[test]
fn random_labels_differ_from_true_ones_when_asked() {
    let labels: Vec<u32> = (0..200).map(|i| i % 4).collect();
    let other = random_labels(&labels, 4, true, 9).unwrap();
    assert!(other.iter().zip(&labels).all(|(a, b)| a != b && *a < 4));
    let any = random_labels(&labels, 4, false, 9).unwrap();
    assert!(any.iter().zip(&labels).any(|(a, b)| a == b));
    assert!(any.iter().all(|&a| a < 4));
    assert_eq!(other, random_labels(&labels, 4, true, 9).unwrap());
    assert!(random_labels(&labels, 1, true, 0).is_err());
}

#[test]
fn gradient_ascent_and_finetune_baselines_change_the_model() {
    let (model, train, test) = tiny_cnn();
    let (forget, retain, _) = classwise(&train, &test);
    let ga = GaClassifierConfig {
        lr: 0.02,
        epochs: 4,
        batch_size: 32,
        momentum: 0.9,
        weight_decay: 5e-4,
        seed: 1,
    };
    let report = ga.unlearn(model.as_ref(), &forget, &retain).unwrap();
    assert!(
        report.metrics["forget_acc_after"] <= 0.5,
        "GA forget accuracy {}",
        report.metrics["forget_acc_after"]
    );
    let (model, _, _) = tiny_cnn();
    let ft = FinetuneConfig {
        lr: 0.01,
        epochs: 2,
        batch_size: 32,
        momentum: 0.9,
        weight_decay: 5e-4,
        seed: 1,
    };
    let report = ft.unlearn(model.as_ref(), &forget, &retain).unwrap();
    assert_eq!(report.method, "finetune");
    assert_ne!(report.weights_before, report.weights_after);
    assert!(report.metrics["retain_acc_after"] >= 0.9);
}

#[test]
fn retrain_is_training_from_scratch_on_the_retain_set() {
    let (model, train, test) = tiny_cnn();
    let (forget, retain, _) = classwise(&train, &test);
    let cfg = RetrainConfig {
        train: cnn_train_config(),
        init_seed: 21,
    };
    let report = cfg.unlearn(model.as_ref(), &forget, &retain).unwrap();
    let reference = new_classifier(&cnn_config(), &dev(), 21).unwrap();
    train_classifier(reference.as_ref(), &retain, &cnn_train_config()).unwrap();
    assert_eq!(
        report.weights_after,
        classifier_hash(reference.as_ref()).unwrap()
    );
    // A class never seen in training is never predicted.
    assert_eq!(accuracy(model.as_ref(), &forget, 64).unwrap(), 0.0);
    assert!(accuracy(model.as_ref(), &retain, 64).unwrap() >= 0.9);
}

#[test]
fn evaluate_reports_salun_metrics_in_range_and_clones_are_independent() {
    let (model, train, test) = tiny_cnn();
    let forget = train.subset(&(0..16).collect::<Vec<_>>()).unwrap();
    let retain = train
        .subset(&(16..train.len()).collect::<Vec<_>>())
        .unwrap();
    let m = evaluate(model.as_ref(), &forget, &retain, &test, 0).unwrap();
    for v in [m.ua, m.ra, m.ta, m.mia] {
        assert!((0.0..=100.0).contains(&v), "{m:?}");
    }
    assert!(m.ra >= 90.0 && m.ua <= 10.0, "{m:?}");
    assert_eq!(
        m,
        evaluate(model.as_ref(), &forget, &retain, &test, 0).unwrap()
    );
    let copy = clone_classifier(model.as_ref()).unwrap();
    assert_eq!(
        classifier_hash(copy.as_ref()).unwrap(),
        classifier_hash(model.as_ref()).unwrap()
    );
    salun(0.01, 1)
        .unlearn(copy.as_ref(), &forget, &retain)
        .unwrap();
    assert_ne!(
        classifier_hash(copy.as_ref()).unwrap(),
        classifier_hash(model.as_ref()).unwrap()
    );
}

#[test]
fn salun_is_deterministic_per_seed() {
    let run = |seed: u64| {
        let (model, train, test) = tiny_cnn();
        let (forget, retain, _) = classwise(&train, &test);
        SalunRlConfig {
            seed,
            ..salun(0.01, 1)
        }
        .unlearn(model.as_ref(), &forget, &retain)
        .unwrap()
        .weights_after
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
}

#[test]
fn bad_configs_and_inputs_are_clear_errors() {
    setup();
    let (model, train, test) = tiny_cnn();
    let (forget, retain, _) = classwise(&train, &test);
    let e = SalunRlConfig {
        keep_ratio: 0.0,
        ..salun(0.01, 1)
    }
    .unlearn(model.as_ref(), &forget, &retain)
    .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)) && e.to_string().contains("keep_ratio"));
    let e = salun(-1.0, 1)
        .unlearn(model.as_ref(), &forget, &retain)
        .unwrap_err();
    assert!(e.to_string().contains("lr"));
    let e = SalunRlConfig {
        momentum: 1.0,
        ..salun(0.01, 1)
    }
    .unlearn(model.as_ref(), &forget, &retain)
    .unwrap_err();
    assert!(e.to_string().contains("momentum"));
    let empty = train.subset(&[]).unwrap();
    let e = salun(0.01, 1)
        .unlearn(model.as_ref(), &empty, &retain)
        .unwrap_err();
    assert!(e.to_string().contains("forget set is empty"));
    let bad_labels = forget.with_labels(vec![7; forget.len()]).unwrap();
    let e = salun(0.01, 1)
        .unlearn(model.as_ref(), &bad_labels, &retain)
        .unwrap_err();
    assert!(e.to_string().contains("classes"));
    let cfg: ClassifierMethodConfig = serde_json::from_value(serde_json::json!({
        "method": "salun", "keep_ratio": 0.5, "lr": 0.01, "epochs": 1, "batch_size": 32,
        "momentum": 0.9, "weight_decay": 0.0005, "mask_batch_size": 64,
        "exclude_true_label": true, "seed": 0
    }))
    .unwrap();
    assert_eq!(cfg.method().name(), "salun");
}
