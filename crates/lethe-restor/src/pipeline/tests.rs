//! Tests of the corruption trainer: frozen parameters stay put, the
//! gate-driven early stop ends training at the first check that meets
//! its threshold, and LoRA cannot be combined with freezing.

use std::collections::HashMap;

use candle_core::Device;
use lethe_model::decoder::{Config, Decoder};
use lethe_unlearn::data::{TextExample, TextSet};
use lethe_unlearn::lm::LmTrainConfig;
use lethe_unlearn::o3::AdapterSpec;

use super::{fit_corruption, StopCheck};

fn tiny() -> (Decoder, TextSet) {
    let cfg = Config::new(24, 16, 32, 2, 2, 32);
    let model = Decoder::new(cfg, &Device::Cpu, 1).unwrap();
    let docs = (0..8u32)
        .map(|i| TextExample::document((0..10).map(|t| (i * 3 + t * 7) % 24).collect()).unwrap())
        .collect();
    (model, TextSet::new(docs))
}

fn weights(m: &Decoder) -> HashMap<String, Vec<f32>> {
    m.named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

#[test]
fn frozen_parameters_keep_their_values_and_the_rest_train() {
    let (base, data) = tiny();
    let before = weights(&base);
    let freeze = vec![
        "embed_tokens".to_string(),
        "self_attn".to_string(),
        "layers.0.".to_string(),
    ];
    let train = LmTrainConfig::new(0.01, 2, 4);
    let (model, fit, log) = fit_corruption(&base, &data, &train, None, &freeze, None).unwrap();
    assert_eq!(fit.steps, 4);
    assert!(!log.stopped_early && log.checks.is_empty());
    let after = weights(&model);
    let (mut frozen, mut trained) = (0usize, 0usize);
    for (name, b) in &before {
        let a = &after[name];
        let is_frozen = freeze.iter().any(|p| name.contains(p.as_str()));
        if is_frozen {
            assert_eq!(a, b, "{name} moved although frozen");
            frozen += b.len();
        } else {
            assert_ne!(a, b, "{name} did not train");
            trained += b.len();
        }
    }
    assert_eq!(log.frozen_parameters, frozen);
    assert_eq!(log.trained_parameters, trained);
    // The base model itself is untouched.
    assert_eq!(weights(&base), before);
}

#[test]
fn early_stop_ends_at_the_first_check_at_or_below_the_threshold() {
    let (base, data) = tiny();
    let train = LmTrainConfig::new(0.001, 5, 2); // 4 steps per epoch, 20 in all
    let script = [0.9, 0.8, 0.55, 0.1];
    let mut calls = 0usize;
    let mut measure = |_: &Decoder| {
        let v = script[calls.min(script.len() - 1)];
        calls += 1;
        Ok(v)
    };
    let stop = StopCheck {
        every: 3,
        stop_at_or_below: 0.6,
        target_accuracy: &mut measure,
    };
    let (_, fit, log) = fit_corruption(&base, &data, &train, None, &[], Some(stop)).unwrap();
    assert!(log.stopped_early);
    assert_eq!(fit.steps, 9);
    assert_eq!(log.checks, vec![(3, 0.9), (6, 0.8), (9, 0.55)]);

    // A threshold never met: the whole budget runs, every check recorded.
    let mut never = |_: &Decoder| Ok(1.0);
    let stop = StopCheck {
        every: 4,
        stop_at_or_below: 0.5,
        target_accuracy: &mut never,
    };
    let (_, fit, log) = fit_corruption(&base, &data, &train, None, &[], Some(stop)).unwrap();
    assert!(!log.stopped_early);
    assert_eq!(fit.steps, 20);
    // No check at the last step: training ends there anyway.
    assert_eq!(
        log.checks.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![4, 8, 12, 16]
    );
}

#[test]
fn bad_corruption_settings_are_rejected() {
    let (base, data) = tiny();
    let train = LmTrainConfig::new(0.01, 1, 4);
    let spec = AdapterSpec {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec![lethe_model::lora::LoraTarget::Q],
    };
    let Err(err) = fit_corruption(&base, &data, &train, Some(&spec), &["lm_head".into()], None)
    else {
        panic!("LoRA with freezing is accepted");
    };
    assert!(err.to_string().contains("LoRA"), "{err}");
    let all = vec!["model".to_string(), "lm_head".to_string()];
    let Err(err) = fit_corruption(&base, &data, &train, None, &all, None) else {
        panic!("freezing everything is accepted");
    };
    assert!(err.to_string().contains("no parameter"), "{err}");
    let mut never = |_: &Decoder| Ok(1.0);
    let stop = StopCheck {
        every: 0,
        stop_at_or_below: 0.5,
        target_accuracy: &mut never,
    };
    assert!(fit_corruption(&base, &data, &train, None, &[], Some(stop)).is_err());
    // The LoRA path still trains and merges.
    let (merged, fit, log) = fit_corruption(&base, &data, &train, Some(&spec), &[], None).unwrap();
    assert_eq!(fit.steps, 2);
    assert!(log.trained_parameters > 0 && log.frozen_parameters == 0);
    assert!(merged.adapter_names().is_empty() || merged.is_merged("corruption"));
    assert_ne!(weights(&merged), weights(&base));
}
