//! Shared fixtures of the unit tests: thread setup, a tiny decoder trained
//! on a tiny fact corpus and a tiny CNN trained on synthetic images, each
//! trained once per test binary and handed out as fresh copies.
//!
//! `LETHE_TEST_SIZE=full` enlarges the fixtures (more entities, wider
//! models); the default `small` keeps the whole suite to a few minutes on
//! two cores in the dev profile.

use std::collections::HashMap;
use std::sync::{Once, OnceLock};

use candle_core::{Device, Tensor};
use lethe_model::decoder::{Config, Decoder};
use lethe_model::vision::{CnnConfig, ImageClassifier, SmallCnn, VisionConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::classifier::{self, ClassifierTrainConfig};
use crate::corpus::{CorpusConfig, FactCorpus};
use crate::data::{ImageSet, TextSet};
use crate::lm::{self, LmTrainConfig};

/// Sets the thread knobs before the first candle call (candle's pools read
/// them once). Every test calls it first.
pub(crate) fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
        }
    });
}

pub(crate) fn full_size() -> bool {
    std::env::var("LETHE_TEST_SIZE").is_ok_and(|v| v == "full")
}

pub(crate) fn dev() -> Device {
    Device::Cpu
}

/// Three domains; the tiny decoder knows every fact.
pub(crate) fn tiny_corpus() -> FactCorpus {
    let entities = if full_size() { 10 } else { 6 };
    FactCorpus::generate(CorpusConfig {
        domains: 3,
        entities_per_domain: entities,
        relations_per_domain: 2,
        values_per_relation: 4,
        value_pool: 8,
        seed: 7,
    })
    .expect("valid corpus config")
}

fn decoder_config(vocab: usize) -> Config {
    let (d, ffn) = if full_size() { (64, 128) } else { (32, 64) };
    Config::new(vocab, d, ffn, 2, 2, 8)
}

struct Trained {
    config: Config,
    tensors: Vec<(String, Tensor)>,
}

/// A fresh copy of the tiny decoder trained on every fact of
/// [`tiny_corpus`] (trained once per test binary).
pub(crate) fn tiny_decoder() -> (FactCorpus, Decoder) {
    setup();
    static TRAINED: OnceLock<Trained> = OnceLock::new();
    let corpus = tiny_corpus();
    let trained = TRAINED.get_or_init(|| {
        let all = corpus.qa(&[0, 1, 2]);
        let model = Decoder::new(decoder_config(corpus.vocab().len()), &dev(), 0)
            .expect("valid decoder config");
        let mut cfg = LmTrainConfig::new(1e-2, 120, 16);
        cfg.seed = 1;
        lm::fit(&model, &all, &cfg).expect("training the tiny decoder");
        Trained {
            config: model.config().clone(),
            tensors: model
                .named_vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_detached_tensor().copy().expect("copy")))
                .collect(),
        }
    });
    let tensors: HashMap<String, Tensor> = trained
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.copy().expect("copy")))
        .collect();
    let model = Decoder::from_tensors(trained.config.clone(), tensors, &dev()).expect("rebuild");
    (corpus, model)
}

/// Forget domain 0, retain domains 1 and 2.
pub(crate) fn forget_retain(corpus: &FactCorpus) -> (TextSet, TextSet) {
    (corpus.qa(&[0]), corpus.qa(&[1, 2]))
}

/// Synthetic 1x8x8 images of 4 classes: a fixed random prototype per class
/// plus Gaussian-ish noise. Returns (train, test).
pub(crate) fn synthetic_images(per_class: usize, seed: u64) -> (ImageSet, ImageSet) {
    let mut rng = StdRng::seed_from_u64(99);
    let protos: Vec<Vec<f32>> = (0..4)
        .map(|_| (0..64).map(|_| rng.random_range(0.0f32..1.0)).collect())
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut make = |n: usize| {
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n * 4 {
            let c = i % 4;
            for p in &protos[c] {
                let noise: f32 = (0..3).map(|_| rng.random_range(-0.3f32..0.3)).sum();
                pixels.push((p + noise).clamp(0.0, 1.0));
            }
            labels.push(c as u32);
        }
        ImageSet::new(pixels, labels, (1, 8, 8)).expect("valid images")
    };
    let train = make(per_class);
    let test = make(per_class / 2);
    (train, test)
}

pub(crate) fn cnn_config() -> VisionConfig {
    VisionConfig::Cnn(CnnConfig {
        in_channels: 1,
        image_size: 8,
        num_classes: 4,
        channels: vec![8, 16],
        batch_norm: true,
    })
}

pub(crate) fn cnn_train_config() -> ClassifierTrainConfig {
    ClassifierTrainConfig {
        epochs: 8,
        batch_size: 32,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        cosine: true,
        seed: 3,
    }
}

pub(crate) fn images_per_class() -> usize {
    if full_size() {
        80
    } else {
        40
    }
}

/// A fresh copy of a tiny CNN trained on [`synthetic_images`], with the
/// data.
pub(crate) fn tiny_cnn() -> (Box<dyn ImageClassifier>, ImageSet, ImageSet) {
    setup();
    static TRAINED: OnceLock<Vec<(String, Tensor)>> = OnceLock::new();
    let (train, test) = synthetic_images(images_per_class(), 5);
    let VisionConfig::Cnn(cfg) = cnn_config() else {
        unreachable!("cnn_config is a CNN")
    };
    let weights = TRAINED.get_or_init(|| {
        let model = SmallCnn::new(cfg.clone(), &dev(), 11).expect("cnn");
        classifier::train_classifier(&model, &train, &cnn_train_config()).expect("train cnn");
        let data = model.varmap().data().lock().expect("varmap");
        data.iter()
            .map(|(n, v)| (n.clone(), v.as_detached_tensor().copy().expect("copy")))
            .collect()
    });
    let model = SmallCnn::new(cfg, &dev(), 0).expect("cnn");
    {
        let data = model.varmap().data().lock().expect("varmap");
        for (n, t) in weights {
            data[n].set(&t.copy().expect("copy")).expect("set");
        }
    }
    (Box::new(model), train, test)
}
