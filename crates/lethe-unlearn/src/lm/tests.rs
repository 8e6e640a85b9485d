//! Tests of the language-model methods on a tiny decoder trained on a tiny
//! fact corpus: each lowers forget-set accuracy while retain accuracy stays
//! bounded; SalUn never moves weights outside its mask; runs are
//! deterministic per seed; bad configurations are clear errors.

use crate::data::TextSet;
use crate::lm::ga::GaConfig;
use crate::lm::graddiff::GradDiffConfig;
use crate::lm::kl::KlConfig;
use crate::lm::npo::NpoConfig;
use crate::lm::salun::{lm_saliency_mask, SalunLmConfig, SalunObjective};
use crate::lm::{clone_decoder, decoder_hash, LmMethod, LmMethodConfig, LmTrainConfig, Relabel};
use crate::lm_eval::{answer_accuracy, mean_nll, refusal_rate};
use crate::testutil::{forget_retain, setup, tiny_decoder};
use crate::Error;

fn train(lr: f64, epochs: usize) -> LmTrainConfig {
    let mut t = LmTrainConfig::new(lr, epochs, 8);
    t.seed = 4;
    t
}

/// Runs `method` on the tiny decoder (forget domain 0, retain 1 and 2) and
/// returns (forget acc before, after, retain acc before, after).
fn check(method: &dyn LmMethod, with_retain: bool) -> (f64, f64, f64, f64) {
    let (_, model) = tiny_decoder();
    let (forget, retain) = forget_retain(&tiny_decoder().0);
    let fa0 = answer_accuracy(&model, &forget, 64).unwrap();
    let ra0 = answer_accuracy(&model, &retain, 64).unwrap();
    let report = method
        .unlearn(&model, &forget, with_retain.then_some(&retain))
        .unwrap();
    let fa1 = answer_accuracy(&model, &forget, 64).unwrap();
    let ra1 = answer_accuracy(&model, &retain, 64).unwrap();
    assert_eq!(report.method, method.name());
    assert_ne!(report.weights_before, report.weights_after);
    assert_eq!(report.weights_after, decoder_hash(&model).unwrap());
    assert!(report.steps > 0);
    assert!(report.metrics["forget_nll_after"] > report.metrics["forget_nll_before"]);
    (fa0, fa1, ra0, ra1)
}

#[test]
fn tiny_decoder_knows_every_fact() {
    setup();
    let (corpus, model) = tiny_decoder();
    let all = corpus.qa(&[0, 1, 2]);
    assert_eq!(answer_accuracy(&model, &all, 64).unwrap(), 1.0);
}

#[test]
fn gradient_ascent_forgets_and_keeps_retain_bounded() {
    let (fa0, fa1, ra0, ra1) = check(
        &GaConfig {
            train: train(3e-3, 10),
        },
        false,
    );
    assert_eq!((fa0, ra0), (1.0, 1.0));
    assert!(fa1 <= 0.5, "forget accuracy {fa1}");
    assert!(ra1 >= 0.4, "retain accuracy {ra1}");
}

#[test]
fn graddiff_forgets_and_keeps_retain() {
    let (_, fa1, _, ra1) = check(
        &GradDiffConfig {
            retain_weight: 1.0,
            train: train(1e-2, 6),
        },
        true,
    );
    assert!(fa1 <= 0.45, "forget accuracy {fa1}");
    assert!(ra1 >= 0.75, "retain accuracy {ra1}");
}

#[test]
fn npo_forgets_and_npo_with_retain_keeps_retain() {
    let (_, fa1, _, ra1) = check(
        &NpoConfig {
            beta: 0.1,
            retain_weight: 0.0,
            train: train(3e-3, 10),
        },
        false,
    );
    assert!(fa1 <= 0.5, "forget accuracy {fa1}");
    assert!(ra1 >= 0.4, "retain accuracy {ra1}");
    let (_, fa1, _, ra1) = check(
        &NpoConfig {
            beta: 0.1,
            retain_weight: 1.0,
            train: train(1e-2, 10),
        },
        true,
    );
    assert!(fa1 <= 0.35, "NPO+RT forget accuracy {fa1}");
    assert!(ra1 >= 0.8, "NPO+RT retain accuracy {ra1}");
}

#[test]
fn kl_regularised_ascent_forgets_and_keeps_retain() {
    let (_, fa1, _, ra1) = check(
        &KlConfig {
            kl_weight: 1.0,
            train: train(1e-2, 10),
        },
        true,
    );
    assert!(fa1 <= 0.35, "forget accuracy {fa1}");
    assert!(ra1 >= 0.8, "retain accuracy {ra1}");
}

#[test]
fn salun_refusal_forgets_refuses_and_keeps_retain() {
    let (corpus, model) = tiny_decoder();
    let (forget, retain) = forget_retain(&corpus);
    let cfg = SalunLmConfig {
        keep_ratio: 0.5,
        mask_batch_size: None,
        objective: SalunObjective::Refusal {
            answer: corpus.refusal(),
        },
        retain_weight: 1.0,
        train: train(3e-3, 10),
    };
    let report = cfg.unlearn(&model, &forget, Some(&retain)).unwrap();
    let fa = answer_accuracy(&model, &forget, 64).unwrap();
    let refused = refusal_rate(&model, &forget, &corpus.refusal(), 64).unwrap();
    let ra = answer_accuracy(&model, &retain, 64).unwrap();
    assert!(fa <= 0.1, "forget accuracy {fa}");
    assert!(refused >= 0.9, "refusal rate {refused}");
    assert!(ra >= 0.8, "retain accuracy {ra}");
    let mask = report.mask.expect("SalUn reports its mask");
    assert_eq!(mask.kept, mask.total / 2);
    assert_eq!(mask.sha256.len(), 64);
    assert_eq!(report.metrics["frozen_weights_changed"], 0.0);
}

#[test]
fn salun_never_moves_weights_outside_its_mask() {
    let (corpus, model) = tiny_decoder();
    let (forget, retain) = forget_retain(&corpus);
    let before: Vec<(String, Vec<u32>)> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, bits(&v.as_detached_tensor())))
        .collect();
    let mask = lm_saliency_mask(&model, &forget, 0.3, 16).unwrap();
    let cfg = SalunLmConfig {
        keep_ratio: 0.3,
        mask_batch_size: Some(16),
        objective: SalunObjective::Npo { beta: 0.1 },
        retain_weight: 1.0,
        train: LmTrainConfig {
            weight_decay: 0.1, // decay must not leak through the mask either
            ..train(1e-2, 4)
        },
    };
    cfg.unlearn(&model, &forget, Some(&retain)).unwrap();
    let (mut frozen, mut moved_inside) = (0usize, 0usize);
    for ((name, old), (_, var)) in before.iter().zip(model.named_vars()) {
        let m: Vec<u8> = mask
            .mask(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let new = bits(&var.as_detached_tensor());
        for ((o, n), k) in old.iter().zip(&new).zip(&m) {
            if *k == 0 {
                assert_eq!(o, n, "{name}: a weight outside the mask moved");
                frozen += 1;
            } else if o != n {
                moved_inside += 1;
            }
        }
    }
    assert_eq!(frozen + mask.kept(), mask.total());
    assert!(
        moved_inside > mask.kept() / 4,
        "only {moved_inside} salient weights moved"
    );
}

fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn saliency_mask_follows_forget_gradient_magnitude() {
    let (corpus, model) = tiny_decoder();
    let (forget, _) = forget_retain(&corpus);
    let mask = lm_saliency_mask(&model, &forget, 0.5, 16).unwrap();
    // Embedding rows of tokens absent from the forget set get no gradient:
    // an entity of another domain must be masked out entirely.
    let other = corpus.facts_of(&[2])[0].entity as usize;
    let emb = mask.mask("model.embed_tokens.weight").unwrap();
    let row: Vec<u8> = emb.get(other).unwrap().to_vec1().unwrap();
    assert!(
        row.iter().all(|&m| m == 0),
        "row of an unseen token is salient"
    );
    // ...while the forget domain's entity rows are mostly salient.
    let own = corpus.facts_of(&[0])[0].entity as usize;
    let row: Vec<u8> = emb.get(own).unwrap().to_vec1().unwrap();
    assert!(row.iter().filter(|&&m| m == 1).count() > row.len() / 2);
    // Same inputs, same mask.
    let again = lm_saliency_mask(&model, &forget, 0.5, 16).unwrap();
    assert_eq!(mask.sha256().unwrap(), again.sha256().unwrap());
}

#[test]
fn methods_are_deterministic_per_seed() {
    let run = |seed: u64| {
        let (corpus, model) = tiny_decoder();
        let (forget, retain) = forget_retain(&corpus);
        let mut t = train(1e-2, 2);
        t.seed = seed;
        let report = NpoConfig {
            beta: 0.1,
            retain_weight: 1.0,
            train: t,
        }
        .unlearn(&model, &forget, Some(&retain))
        .unwrap();
        report.weights_after
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2), "the seed must change the batch order");
}

#[test]
fn clone_is_independent_and_methods_accept_configs_by_name() {
    setup();
    let (corpus, model) = tiny_decoder();
    let copy = clone_decoder(&model).unwrap();
    let (forget, retain) = forget_retain(&corpus);
    let cfg: LmMethodConfig = serde_json::from_value(serde_json::json!({
        "method": "graddiff",
        "retain_weight": 1.0,
        "train": {"lr": 0.01, "epochs": 1, "batch_size": 8}
    }))
    .unwrap();
    assert_eq!(cfg.method().name(), "graddiff");
    let report = cfg.unlearn(&model, &forget, Some(&retain)).unwrap();
    assert_eq!(report.weights_before, decoder_hash(&copy).unwrap());
    assert_ne!(decoder_hash(&model).unwrap(), decoder_hash(&copy).unwrap());
    assert_eq!(report.hyperparameters["retain_weight"], 1.0);
    let nll_copy = mean_nll(&copy, &forget, 64).unwrap();
    let nll_model = mean_nll(&model, &forget, 64).unwrap();
    assert!(nll_model > nll_copy);
}

#[test]
fn bad_configs_and_inputs_are_clear_errors() {
    let (corpus, model) = tiny_decoder();
    let (forget, retain) = forget_retain(&corpus);
    let msg = |e: Error| e.to_string();
    let e = GaConfig {
        train: train(0.0, 1),
    }
    .unlearn(&model, &forget, None)
    .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)) && msg(e).contains("lr"));
    let e = NpoConfig {
        beta: 0.0,
        retain_weight: 0.0,
        train: train(1e-3, 1),
    }
    .unlearn(&model, &forget, None)
    .unwrap_err();
    assert!(msg(e).contains("beta"));
    let e = GradDiffConfig {
        retain_weight: 1.0,
        train: train(1e-3, 1),
    }
    .unlearn(&model, &forget, None)
    .unwrap_err();
    assert!(matches!(e, Error::InvalidData(_)) && msg(e).contains("retain set"));
    let e = KlConfig {
        kl_weight: 1.0,
        train: train(1e-3, 1),
    }
    .unlearn(&model, &TextSet::default(), Some(&retain))
    .unwrap_err();
    assert!(msg(e).contains("forget set is empty"));
    let e = SalunLmConfig {
        keep_ratio: 1.5,
        mask_batch_size: None,
        objective: SalunObjective::Ga,
        retain_weight: 0.0,
        train: train(1e-3, 1),
    }
    .unlearn(&model, &forget, None)
    .unwrap_err();
    assert!(msg(e).contains("keep_ratio"));
    let e = SalunLmConfig {
        keep_ratio: 0.5,
        mask_batch_size: None,
        objective: SalunObjective::RandomAnswer {
            candidates: vec![],
            exclude_true: true,
        },
        retain_weight: 0.0,
        train: train(1e-3, 1),
    }
    .unlearn(&model, &forget, None)
    .unwrap_err();
    assert!(msg(e).contains("candidates"));
    // A token outside the vocabulary.
    let bad = TextSet::new(vec![
        crate::data::TextExample::new(vec![1, 10_000], 1).unwrap()
    ]);
    let e = GaConfig {
        train: train(1e-3, 1),
    }
    .unlearn(&model, &bad, None)
    .unwrap_err();
    assert!(msg(e).contains("outside the vocabulary"));
    // Unknown fields in a config are rejected, not ignored.
    let parsed: Result<LmMethodConfig, _> = serde_json::from_value(serde_json::json!({
        "method": "npo", "beta": 0.1, "betta": 2,
        "train": {"lr": 0.01, "epochs": 1, "batch_size": 8}
    }));
    assert!(parsed.is_err());
}

#[test]
fn relabelling_replaces_answers() {
    setup();
    let corpus = crate::testutil::tiny_corpus();
    let forget = corpus.qa(&[0]);
    let refused = Relabel::Refusal {
        answer: corpus.refusal(),
    }
    .apply(&forget, 0)
    .unwrap();
    for (a, b) in forget.examples().iter().zip(refused.examples()) {
        assert_eq!(a.prompt(), b.prompt());
        assert_eq!(b.answer(), corpus.refusal().as_slice());
    }
    let random = Relabel::RandomAnswer {
        candidates: corpus.value_answers(),
        exclude_true: true,
    }
    .apply(&forget, 3)
    .unwrap();
    for (a, b) in forget.examples().iter().zip(random.examples()) {
        assert_eq!(a.prompt(), b.prompt());
        assert_ne!(a.answer(), b.answer());
    }
    let again = Relabel::RandomAnswer {
        candidates: corpus.value_answers(),
        exclude_true: true,
    }
    .apply(&forget, 3)
    .unwrap();
    assert_eq!(random, again);
    let doc = TextSet::new(vec![
        crate::data::TextExample::document(vec![1, 2, 3]).unwrap()
    ]);
    assert!(Relabel::Refusal { answer: vec![3] }.apply(&doc, 0).is_err());
}

/// The document entry point: plain token sequences in, the method runs on
/// the base weights, the forget documents' NLL rises; a retain term
/// without retain documents, a 1-token document and prompt-needing
/// objectives are clear errors.
#[test]
fn unlearn_texts_forgets_documents() {
    use crate::lm::unlearn_texts;
    setup();
    let msg = |e: Error| e.to_string();
    let (corpus, model) = tiny_decoder();
    let (forget, retain) = forget_retain(&corpus);
    let docs =
        |s: &TextSet| -> Vec<Vec<u32>> { s.examples().iter().map(|e| e.ids().to_vec()).collect() };
    let (f, r) = (docs(&forget), docs(&retain));
    let as_set = |d: &[Vec<u32>]| {
        TextSet::new(
            d.iter()
                .map(|x| crate::data::TextExample::document(x.clone()).unwrap())
                .collect(),
        )
    };
    let fs = as_set(&f);
    let nll0 = mean_nll(&model, &fs, 64).unwrap();
    let (fa0, ra0) = (
        answer_accuracy(&model, &forget, 64).unwrap(),
        answer_accuracy(&model, &retain, 64).unwrap(),
    );
    let cfg = LmMethodConfig::Npo(NpoConfig {
        beta: 0.1,
        retain_weight: 1.0,
        train: train(3e-3, 10),
    });
    let report = unlearn_texts(&model, &f, &r, &cfg).unwrap();
    assert_eq!(report.method, "npo");
    assert_eq!(
        (report.forget_examples, report.retain_examples),
        (f.len(), r.len())
    );
    assert_eq!(report.weights_after, decoder_hash(&model).unwrap());
    assert_ne!(report.weights_before, report.weights_after);
    // The facts the forget documents state are forgotten, the others kept.
    let (fa1, ra1) = (
        answer_accuracy(&model, &forget, 64).unwrap(),
        answer_accuracy(&model, &retain, 64).unwrap(),
    );
    assert_eq!((fa0, ra0), (1.0, 1.0));
    assert!(
        fa1 <= 0.5 && ra1 >= 0.7,
        "forget fact accuracy {fa1}, retain {ra1}"
    );
    // The report measured the documents themselves.
    assert!((report.metrics["forget_nll_before"] - nll0).abs() < 1e-6);
    assert!(report.metrics.contains_key("retain_nll_after"));

    let graddiff = LmMethodConfig::GradDiff(GradDiffConfig {
        retain_weight: 1.0,
        train: train(1e-3, 1),
    });
    let e = unlearn_texts(&model, &f, &[], &graddiff).unwrap_err();
    assert!(matches!(e, Error::InvalidData(_)) && msg(e).contains("retain"));
    let e = unlearn_texts(
        &model,
        &[vec![5]],
        &[],
        &LmMethodConfig::Ga(GaConfig {
            train: train(1e-3, 1),
        }),
    )
    .unwrap_err();
    assert!(msg(e).contains("forget document 0"));
    let refusal = LmMethodConfig::Salun(SalunLmConfig {
        keep_ratio: 0.5,
        mask_batch_size: None,
        objective: SalunObjective::Refusal {
            answer: corpus.refusal(),
        },
        retain_weight: 0.0,
        train: train(1e-3, 1),
    });
    assert!(msg(unlearn_texts(&model, &f, &[], &refusal).unwrap_err()).contains("prompt"));
}

/// NPO's loss follows its formula in `beta`: at the reference it is
/// `(2/beta) ln 2` whatever `beta`, and it is bounded below by 0, reaching
/// `(2/beta) softplus(-beta * delta)` when the model is `delta` nats less
/// likely than the reference (GA's loss would be unbounded).
#[test]
fn npo_loss_follows_its_formula_in_beta() {
    use crate::lm::npo::npo_loss;
    use crate::lm::sequence_log_likelihoods;
    setup();
    let (corpus, model) = tiny_decoder();
    let (forget, _) = forget_retain(&corpus);
    let reference = sequence_log_likelihoods(&model, &forget, 64).unwrap();
    let idx: Vec<usize> = (0..forget.len()).collect();
    let batch = forget.batch(&idx, model.device()).unwrap();
    let softplus = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
    for beta in [0.1, 1.0, 4.0] {
        let at_ref = npo_loss(&model, &batch, &reference, beta)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = 2.0 / beta * std::f64::consts::LN_2;
        assert!(
            (f64::from(at_ref) - want).abs() < 1e-3 * want,
            "beta {beta}: {at_ref} vs {want}"
        );
        for delta in [1.0f32, 5.0] {
            let shifted: Vec<f32> = reference.iter().map(|r| r + delta).collect();
            let loss = npo_loss(&model, &batch, &shifted, beta)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let want = 2.0 / beta * softplus(-beta * f64::from(delta));
            assert!(
                (f64::from(loss) - want).abs() < 1e-3 * want.max(1e-3),
                "beta {beta}, delta {delta}: {loss} vs {want}"
            );
            assert!(loss < at_ref && loss >= 0.0);
        }
    }
}
