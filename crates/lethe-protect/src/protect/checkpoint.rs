//! Saving and resuming a protection run.
//!
//! After every round the whole optimisation state is written to
//! `<dir>/current/`: `state.json` (round, log, timers, stop reason, the
//! run's fingerprint), `delta.bin` and `mask.bin` (raw little-endian), the
//! surrogate (`surrogate/config.json` + `model.safetensors`, batch-norm
//! statistics included) and the SGD momentum (`momentum.safetensors`).
//! With the `best_round` and `proxy_victim` releases the noise and masks of
//! the best round so far go to `best_delta.bin` and `best_mask.bin` (their round in
//! `state.json`), so a resumed run releases the same round as an
//! uninterrupted one.
//! A round is first written to `<dir>/staging/` and then swapped in by
//! renames, so an interrupted write leaves the previous round intact.
//!
//! The fingerprint is a SHA-256 over the parameters (except the stop rule,
//! which may be extended on resume, and the device) and the data; a
//! `final_round` release is left out of it, so checkpoints written before
//! the release option existed (which release the final round) still
//! resume; the other releases (with every proxy-victim setting) are in it.
//! The proxy accuracies are part of the saved round log, and the proxy's
//! holdout and seed are functions of the data and the run's seed, so a
//! resumed `proxy_victim` run ranks and releases as an uninterrupted one.
//! Resuming with other data or parameters is refused rather than silently
//! mixing two runs. Because each round draws its randomness from `(seed, round)`
//! and every piece of state is restored bit-for-bit, a resumed run ends
//! exactly where an uninterrupted one does (a test checks this).

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{BestRound, ProtectParams, Release, RoundLog, State, StopReason};
use crate::dataset::{Dataset, ImageShape};
use crate::model::{MomentumSgd, Net};
use crate::{Error, Result};

const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct StateFile {
    format_version: u32,
    fingerprint: String,
    round: usize,
    mask_ready: Vec<bool>,
    log: Vec<RoundLog>,
    seconds: f64,
    image_steps: u64,
    stop: Option<StopReason>,
    delta_len: usize,
    mask_len: usize,
    /// Round of `best_delta.bin` / `best_mask.bin` (absent: none kept).
    #[serde(default)]
    best_round: Option<usize>,
}

/// SHA-256 of the run-defining parameters and the data.
pub(crate) fn fingerprint(data: &Dataset, params: &ProtectParams) -> String {
    let mut p = params.clone();
    p.stop = super::StopRule {
        min_rounds: 1,
        max_rounds: 1,
        train_accuracy: None,
        loss_below: None,
        patience: 1,
        shortcut_accuracy: None,
    };
    p.device = String::new();
    let mut json = serde_json::to_value(&p).unwrap_or_default();
    if p.release == Release::FinalRound {
        if let Some(obj) = json.as_object_mut() {
            obj.remove("release");
        }
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(json.to_string().as_bytes());
    let s = data.shape();
    for d in [s.channels, s.height, s.width, data.len()] {
        ctx.update(&(d as u64).to_le_bytes());
    }
    for v in data.pixels() {
        ctx.update(&v.to_le_bytes());
    }
    for l in data.labels() {
        ctx.update(&l.to_le_bytes());
    }
    hex::encode(ctx.finish().as_ref())
}

fn ck_err(dir: &Path, detail: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: dir.to_path_buf(),
        detail: detail.into(),
    }
}

fn io(e: std::io::Error, what: &Path) -> Error {
    Error::io(e, format!("checkpoint {}", what.display()))
}

/// Writes the state after a round (see the module docs).
pub(crate) fn save(
    dir: &Path,
    fingerprint: &str,
    state: &State,
    nets: &[Net],
    opts: &[MomentumSgd],
) -> Result<()> {
    let staging = dir.join("staging");
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| io(e, &staging))?;
    }
    fs::create_dir_all(&staging).map_err(|e| io(e, &staging))?;
    let delta: Vec<u8> = state.delta.iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(staging.join("delta.bin"), delta).map_err(|e| io(e, &staging))?;
    fs::write(staging.join("mask.bin"), &state.mask).map_err(|e| io(e, &staging))?;
    if let Some(best) = &state.best {
        let bytes: Vec<u8> = best.delta.iter().flat_map(|v| v.to_le_bytes()).collect();
        fs::write(staging.join("best_delta.bin"), bytes).map_err(|e| io(e, &staging))?;
        fs::write(staging.join("best_mask.bin"), &best.mask).map_err(|e| io(e, &staging))?;
    }
    for (k, (net, opt)) in nets.iter().zip(opts).enumerate() {
        net.save(&staging.join(surrogate_dir(k)))?;
        let momentum = opt.state();
        if !momentum.is_empty() {
            candle_core::safetensors::save(&momentum, staging.join(momentum_file(k)))?;
        }
    }
    let file = StateFile {
        format_version: FORMAT_VERSION,
        fingerprint: fingerprint.to_string(),
        round: state.round,
        mask_ready: state.mask_ready.clone(),
        log: state.log.clone(),
        seconds: state.seconds,
        image_steps: state.image_steps,
        stop: state.stop,
        delta_len: state.delta.len(),
        mask_len: state.mask.len(),
        best_round: state.best.as_ref().map(|b| b.round),
    };
    let json = serde_json::to_vec_pretty(&file)
        .map_err(|e| ck_err(dir, format!("serialising state: {e}")))?;
    fs::write(staging.join("state.json"), json).map_err(|e| io(e, &staging))?;
    let current = dir.join("current");
    let old = dir.join("previous");
    if old.exists() {
        fs::remove_dir_all(&old).map_err(|e| io(e, &old))?;
    }
    if current.exists() {
        fs::rename(&current, &old).map_err(|e| io(e, &current))?;
    }
    fs::rename(&staging, &current).map_err(|e| io(e, &current))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(|e| io(e, &old))?;
    }
    Ok(())
}

/// Folder of surrogate `k` (0: the main one, then the ensemble).
fn surrogate_dir(k: usize) -> String {
    if k == 0 {
        "surrogate".into()
    } else {
        format!("surrogate-{k}")
    }
}

/// Momentum file of surrogate `k`.
fn momentum_file(k: usize) -> String {
    if k == 0 {
        "momentum.safetensors".into()
    } else {
        format!("momentum-{k}.safetensors")
    }
}

/// What `dir` holds, in words, when it holds a saved run ("an interrupted
/// run after round 3", "a finished run of 12 rounds", "an unreadable
/// checkpoint"); `None` when there is nothing to lose there.
pub(crate) fn describe_saved(dir: &Path) -> Option<String> {
    let state = ["current", "previous"]
        .iter()
        .map(|d| dir.join(d).join("state.json"))
        .find(|p| p.is_file())?;
    let value: Option<serde_json::Value> = fs::read(&state)
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok());
    let round = value
        .as_ref()
        .and_then(|v| v.get("round"))
        .and_then(|r| r.as_u64());
    let finished = value
        .as_ref()
        .and_then(|v| v.get("stop"))
        .is_some_and(|s| !s.is_null());
    Some(match round {
        Some(r) if finished => format!("a finished run of {r} rounds"),
        Some(r) => format!("an interrupted run after round {r}"),
        None => "an unreadable checkpoint".to_string(),
    })
}

/// What [`load`] restores: the state, the surrogates and their momentum.
pub(crate) type Restored = (State, Vec<Net>, Vec<HashMap<String, Tensor>>);

/// The saved state with its `surrogates` networks, if `dir` holds one; an
/// error if it belongs to another run or is damaged.
pub(crate) fn load(
    dir: &Path,
    fingerprint: &str,
    shape: ImageShape,
    surrogates: usize,
    device: &Device,
) -> Result<Option<Restored>> {
    let mut current = dir.join("current");
    if !current.join("state.json").is_file() {
        // Interrupted between the two renames of `save`.
        current = dir.join("previous");
        if !current.join("state.json").is_file() {
            return Ok(None);
        }
    }
    let text = fs::read(current.join("state.json")).map_err(|e| io(e, &current))?;
    let file: StateFile = serde_json::from_slice(&text)
        .map_err(|e| ck_err(dir, format!("state.json is damaged: {e}")))?;
    if file.format_version != FORMAT_VERSION {
        return Err(ck_err(
            dir,
            format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                file.format_version
            ),
        ));
    }
    if file.fingerprint != fingerprint {
        return Err(ck_err(
            dir,
            "it belongs to a run with other data or parameters; use another checkpoint folder \
             or start over with overwrite (CLI: --checkpoint DIR / --overwrite)",
        ));
    }
    let read_delta = |name: &str| -> Result<Vec<f32>> {
        let raw = fs::read(current.join(name)).map_err(|e| io(e, &current))?;
        if raw.len() != file.delta_len * 4 {
            return Err(ck_err(dir, format!("{name} has the wrong size")));
        }
        Ok(raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let read_mask = |name: &str| -> Result<Vec<u8>> {
        let mask = fs::read(current.join(name)).map_err(|e| io(e, &current))?;
        if mask.len() != file.mask_len || file.mask_ready.len() * shape.pixels() != mask.len() {
            return Err(ck_err(dir, format!("{name} has the wrong size")));
        }
        Ok(mask)
    };
    let delta = read_delta("delta.bin")?;
    let mask = read_mask("mask.bin")?;
    let best = match file.best_round {
        Some(round) if round >= 1 && round <= file.round => Some(BestRound {
            round,
            delta: read_delta("best_delta.bin")?,
            mask: read_mask("best_mask.bin")?,
        }),
        Some(round) => {
            return Err(ck_err(
                dir,
                format!("best round {round} is not one of its {} rounds", file.round),
            ))
        }
        None => None,
    };
    let mut nets = Vec::with_capacity(surrogates);
    let mut momentum = Vec::with_capacity(surrogates);
    for k in 0..surrogates {
        nets.push(
            Net::load(&current.join(surrogate_dir(k)), shape, device)
                .map_err(|e| ck_err(dir, format!("{}: {e}", surrogate_dir(k))))?,
        );
        let mpath = current.join(momentum_file(k));
        momentum.push(if mpath.is_file() {
            candle_core::safetensors::load(&mpath, device)
                .map_err(|e| ck_err(dir, format!("momentum: {e}")))?
        } else {
            HashMap::new()
        });
    }
    Ok(Some((
        State {
            round: file.round,
            delta,
            mask,
            mask_ready: file.mask_ready,
            log: file.log,
            seconds: file.seconds,
            image_steps: file.image_steps,
            stop: file.stop,
            best,
        },
        nets,
        momentum,
    )))
}
