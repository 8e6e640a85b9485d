//! Tests of `crate::lora`: identity at init and at gate 0, merge/unmerge,
//! stacking, gradients only into the adapter, save/load, O3's penalty.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::decoder::{Config, Decoder};
use crate::nn::Mode;
use crate::optim::{self, AdamW, AdamWConfig};

fn dev() -> Device {
    Device::Cpu
}

fn decoder(seed: u64) -> Decoder {
    let mut c = Config::new(40, 32, 48, 2, 4, 16);
    c.num_key_value_heads = Some(2);
    Decoder::new(c, &dev(), seed).unwrap()
}

fn ids(seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<u32> = (0..2 * 8).map(|_| rng.random_range(0..40)).collect();
    Tensor::from_vec(v, (2, 8), &dev()).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Fills every B with small random values so the adapter changes outputs.
fn randomise_b(adapter: &LoraAdapter, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let data = adapter.varmap().data().lock().unwrap();
    // Sorted by name: the map's own order changes from run to run.
    let mut vars: Vec<_> = data.iter().collect();
    vars.sort_by(|a, b| a.0.cmp(b.0));
    for (name, var) in vars {
        if name.ends_with("lora_B.weight") {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
            var.set(&Tensor::from_vec(v, var.dims(), &dev()).unwrap())
                .unwrap();
        }
    }
}

fn config(rank: usize, dropout: f32) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        dropout,
        targets: LoraTarget::ALL.to_vec(),
    }
}

#[test]
fn fresh_adapter_and_gate_zero_leave_the_base_output_bit_identical() {
    let mut model = decoder(1);
    let x = ids(2);
    let base = model.forward(&x, Mode::Eval).unwrap();
    let adapter = LoraAdapter::new(&model, "a", LoraConfig::o3(), 3).unwrap();
    assert_eq!(adapter.sites().len(), 2 * 7);
    model.attach_adapter(&adapter).unwrap();
    assert_eq!(
        crate::nn::tests::bits(&model.forward(&x, Mode::Eval).unwrap()),
        crate::nn::tests::bits(&base),
        "B = 0 is the identity"
    );
    randomise_b(&adapter, 4);
    let adapted = model.forward(&x, Mode::Eval).unwrap();
    assert!(
        max_abs_diff(&adapted, &base) > 1e-4,
        "a non-zero B changes the output"
    );
    adapter.set_gate(0.0).unwrap();
    assert_eq!(
        crate::nn::tests::bits(&model.forward(&x, Mode::Eval).unwrap()),
        crate::nn::tests::bits(&base),
        "gate 0 is the base"
    );
    // The gate scales the adapter's contribution linearly.
    adapter.set_gate(0.5).unwrap();
    let half = model.forward(&x, Mode::Eval).unwrap();
    adapter.set_gate(1.0).unwrap();
    let mid = ((&base + &adapted).unwrap() * 0.5).unwrap();
    // Not exactly linear through the network, but the first-order change halves.
    let (off, full) = (max_abs_diff(&half, &mid), max_abs_diff(&adapted, &base));
    println!("gate 0.5: {off:e} from the midpoint of a {full:e} change");
    assert!(off < 0.25 * full);
    assert!(adapter.set_gate(f64::NAN).is_err());
}

#[test]
fn merge_equals_unmerged_and_unmerge_restores_the_base() {
    let mut model = decoder(5);
    let x = ids(6);
    let base_weights: Vec<(String, Vec<u32>)> = model
        .named_vars()
        .iter()
        .map(|(n, v)| (n.clone(), crate::nn::tests::bits(v.as_tensor())))
        .collect();
    let base_out = model.forward(&x, Mode::Eval).unwrap();
    let a1 = LoraAdapter::new(&model, "one", config(4, 0.0), 7).unwrap();
    let a2 = LoraAdapter::new(&model, "two", config(2, 0.0), 8).unwrap();
    randomise_b(&a1, 9);
    randomise_b(&a2, 10);
    a2.set_gate(0.7).unwrap();
    model.attach_adapter(&a1).unwrap();
    model.attach_adapter(&a2).unwrap();
    assert_eq!(model.adapter_names(), vec!["one", "two"]);
    let stacked = model.forward(&x, Mode::Eval).unwrap();

    model.merge_adapter("one").unwrap();
    assert!(model.is_merged("one") && !model.is_merged("two"));
    let merged_one = model.forward(&x, Mode::Eval).unwrap();
    println!(
        "merged vs unmerged max |diff| {}",
        max_abs_diff(&merged_one, &stacked)
    );
    assert!(max_abs_diff(&merged_one, &stacked) < 1e-5);
    model.merge_adapter("two").unwrap();
    model.merge_adapter("two").unwrap(); // no-op
    assert!(max_abs_diff(&model.forward(&x, Mode::Eval).unwrap(), &stacked) < 1e-5);
    // Merged adapters ignore gate changes until unmerged.
    a2.set_gate(0.0).unwrap();
    assert!(max_abs_diff(&model.forward(&x, Mode::Eval).unwrap(), &stacked) < 1e-5);
    assert!(
        model.detach_adapter("one").is_err(),
        "detaching a merged adapter is refused"
    );

    model.unmerge_adapter("one").unwrap();
    model.unmerge_adapter("two").unwrap();
    a2.set_gate(1.0).unwrap();
    let mut worst = 0f32;
    for ((n, before), (_, v)) in base_weights.iter().zip(model.named_vars().iter()) {
        let before: Vec<f32> = before.iter().map(|b| f32::from_bits(*b)).collect();
        let after: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let d = before
            .iter()
            .zip(&after)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "{n}: {d}");
        worst = worst.max(d);
    }
    println!("unmerge restores base weights within {worst:e}");
    model.detach_adapter("one").unwrap();
    model.detach_adapter("two").unwrap();
    assert!(max_abs_diff(&model.forward(&x, Mode::Eval).unwrap(), &base_out) < 1e-5);
    assert!(model.merge_adapter("one").is_err(), "unknown adapter");
}

#[test]
fn only_adapter_parameters_get_gradients_when_the_base_is_frozen() {
    let mut model = decoder(11);
    let frozen = LoraAdapter::new(&model, "old", config(2, 0.0), 12).unwrap();
    randomise_b(&frozen, 13);
    frozen.set_trainable(false);
    let adapter = LoraAdapter::new(&model, "new", config(4, 0.1), 14).unwrap();
    // With B = 0 the gradient of A is exactly zero; one step makes B non-zero.
    randomise_b(&adapter, 15);
    model.attach_adapter(&frozen).unwrap();
    model.attach_adapter(&adapter).unwrap();
    model.set_base_trainable(false);
    let loss = model.loss(&ids(16), None, Mode::Train).unwrap();
    let grads = loss.backward().unwrap();
    let vars = adapter.vars();
    let nonzero = vars
        .iter()
        .filter(|v| {
            grads
                .get(v.as_tensor())
                .map(|g| {
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0
                })
                .unwrap_or(false)
        })
        .count();
    println!(
        "LoRA (base frozen): {nonzero} of {} adapter tensors have a non-zero gradient",
        vars.len()
    );
    assert_eq!(nonzero, vars.len());
    assert_eq!(vars.len(), 2 * 7 * 2);
    for (name, var) in model.named_vars() {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "base {name} got a gradient"
        );
    }
    for var in frozen.vars() {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "frozen adapter got a gradient"
        );
    }
}

#[test]
fn training_an_adapter_moves_only_the_adapter() {
    let mut model = decoder(17);
    let adapter = LoraAdapter::new(&model, "fit", config(4, 0.0), 18).unwrap();
    model.attach_adapter(&adapter).unwrap();
    model.set_base_trainable(false);
    let before: Vec<Vec<u32>> = model
        .vars()
        .iter()
        .map(|v| crate::nn::tests::bits(v.as_tensor()))
        .collect();
    let mut opt = AdamW::new(
        adapter.vars(),
        AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let x = ids(19);
    let first = model
        .loss(&x, None, Mode::Train)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    for _ in 0..30 {
        let loss = model.loss(&x, None, Mode::Train).unwrap();
        optim::train_step(&mut opt, &loss, Some(1.0)).unwrap();
    }
    let last = model
        .loss(&x, None, Mode::Eval)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        last < first - 0.5,
        "adapter training lowered the loss {first} -> {last}"
    );
    let after: Vec<Vec<u32>> = model
        .vars()
        .iter()
        .map(|v| crate::nn::tests::bits(v.as_tensor()))
        .collect();
    assert_eq!(before, after, "the base did not move");
}

#[test]
fn dropout_is_only_active_in_training() {
    let mut model = decoder(20);
    let adapter = LoraAdapter::new(&model, "d", config(4, 0.5), 21).unwrap();
    randomise_b(&adapter, 22);
    model.attach_adapter(&adapter).unwrap();
    let x = ids(23);
    let e1 = model.forward(&x, Mode::Eval).unwrap();
    let e2 = model.forward(&x, Mode::Eval).unwrap();
    assert_eq!(crate::nn::tests::bits(&e1), crate::nn::tests::bits(&e2));
    let t1 = model.forward(&x, Mode::Train).unwrap();
    let t2 = model.forward(&x, Mode::Train).unwrap();
    assert!(
        max_abs_diff(&t1, &t2) > 0.0,
        "two training passes draw different dropout masks"
    );
}

#[test]
fn adapters_save_and_load_with_peft_names() {
    let mut model = decoder(24);
    let adapter = LoraAdapter::new(&model, "saved", config(4, 0.05), 25).unwrap();
    randomise_b(&adapter, 26);
    adapter.set_gate(0.8).unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path()).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["target_modules"][0], "q_proj");
    let names =
        candle_core::safetensors::load(dir.path().join(ADAPTER_WEIGHTS_FILE), &dev()).unwrap();
    assert!(names.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));

    let loaded = LoraAdapter::load(dir.path(), &dev()).unwrap();
    assert_eq!(loaded.name(), "saved");
    assert_eq!(loaded.config(), adapter.config());
    assert_eq!(loaded.gate(), 0.8);
    let x = ids(27);
    model.attach_adapter(&adapter).unwrap();
    let a = model.forward(&x, Mode::Eval).unwrap();
    model.detach_adapter("saved").unwrap();
    model.attach_adapter(&loaded).unwrap();
    let b = model.forward(&x, Mode::Eval).unwrap();
    assert_eq!(crate::nn::tests::bits(&a), crate::nn::tests::bits(&b));

    // Attaching twice, or to a model of another shape, is refused.
    assert!(model.attach_adapter(&loaded).is_err());
    let mut other = Decoder::new(Config::new(40, 16, 24, 2, 4, 16), &dev(), 1).unwrap();
    let e = other.attach_adapter(&loaded).unwrap_err();
    assert!(e.to_string().contains("saved"), "{e}");
    assert!(
        other.adapter_names().is_empty(),
        "a failed attach changes nothing"
    );
}

#[test]
fn bad_adapter_files_are_clear_errors() {
    let model = decoder(28);
    let adapter = LoraAdapter::new(&model, "x", config(2, 0.0), 29).unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path()).unwrap();
    let cfg_path = dir.path().join(ADAPTER_CONFIG_FILE);
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, good.replace("\"r\": 2", "\"r\": 3")).unwrap();
    let e = LoraAdapter::load(dir.path(), &dev()).unwrap_err();
    assert!(
        matches!(e, Error::Format(_)) && e.to_string().contains("rank"),
        "{e}"
    );
    std::fs::write(&cfg_path, good.replace("\"r\": 2", "\"r\": 0")).unwrap();
    assert!(matches!(
        LoraAdapter::load(dir.path(), &dev()).unwrap_err(),
        Error::Format(_)
    ));
    std::fs::write(&cfg_path, good.replace("q_proj", "qq_proj")).unwrap();
    assert!(matches!(
        LoraAdapter::load(dir.path(), &dev()).unwrap_err(),
        Error::Format(_)
    ));
    std::fs::write(&cfg_path, &good).unwrap();
    std::fs::remove_file(dir.path().join(ADAPTER_WEIGHTS_FILE)).unwrap();
    assert!(matches!(
        LoraAdapter::load(dir.path(), &dev()).unwrap_err(),
        Error::Format(_)
    ));
    assert!(matches!(
        LoraAdapter::load(&dir.path().join("missing"), &dev()).unwrap_err(),
        Error::Io { .. }
    ));
    // Invalid configs are refused at creation.
    assert!(LoraAdapter::new(&model, "y", config(0, 0.0), 1).is_err());
    assert!(LoraAdapter::new(&model, "y", config(2, 1.0), 1).is_err());
    let mut dup = config(2, 0.0);
    dup.targets = vec![LoraTarget::Q, LoraTarget::Q];
    assert!(LoraAdapter::new(&model, "y", dup, 1).is_err());
}

#[test]
fn orthogonality_penalty_matches_its_definition_and_trains_only_the_new_a() {
    let model = decoder(30);
    let mut only_q = config(2, 0.0);
    only_q.targets = vec![LoraTarget::Q, LoraTarget::V];
    let old1 = LoraAdapter::new(&model, "old1", only_q.clone(), 31).unwrap();
    let old2 = LoraAdapter::new(&model, "old2", config(3, 0.0), 32).unwrap();
    let new = LoraAdapter::new(&model, "new", config(4, 0.0), 33).unwrap();
    let pen = orthogonality_penalty(&new, &[&old1, &old2]).unwrap();
    let mut want = 0f32;
    let new_a: std::collections::HashMap<_, _> = new.a_matrices().into_iter().collect();
    for old in [&old1, &old2] {
        for (site, a_old) in old.a_matrices() {
            let a_new = &new_a[&site];
            let p = a_old.matmul(&a_new.t().unwrap()).unwrap();
            want += p
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
        }
    }
    let got = pen.to_scalar::<f32>().unwrap();
    assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} vs {want}");
    let grads = pen.backward().unwrap();
    // old2 covers every site, so every new A is pushed away from it.
    for (site, a) in new.a_matrices() {
        let g = grads.get(&a).unwrap();
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{site}"
        );
    }
    for var in old1.vars().iter().chain(old2.vars().iter()) {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "previous adapters are constants"
        );
    }
    let alone = orthogonality_penalty(&new, &[])
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(alone, 0.0);
}
