//! A class-wise run's noise, kept to protect images added later.
//!
//! Class-wise methods give every image of a class the same noise. A
//! hospital that adds scans to a dataset it has released can then protect
//! the new ones exactly as the first release was protected, instead of
//! releasing them clean or crafting new noise: clean images mixed into a
//! protected set undo much of the protection (the research notes' partial
//! poisoning; HanxunH/Unlearnable-Examples#22), and fresh noise would give
//! the same class two codes to learn.
//!
//! The noise is a secret: whoever holds it can subtract it from the
//! release. It is written next to the release (like the checkpoint, which
//! holds it too), never into it. File: safetensors, one `F32` tensor
//! `delta` of shape `[classes, C, H, W]` (offsets at full scale 1, within
//! `[-eps, eps]`) and metadata `format`, `classes` and `params` (JSON).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::dataset::{Dataset, ImageShape};
use crate::formats::{read_file, write_file};
use crate::protect::ProtectParams;
use crate::{Error, Result};

/// The `format` metadata value of a noise file.
const FORMAT: &str = "lethe-class-noise/1";

/// One noise per class, with the parameters of the run that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassNoise {
    /// The image shape the noise fits.
    pub shape: ImageShape,
    /// Class names, in the order of `delta`.
    pub classes: Vec<String>,
    /// The parameters of the run that crafted it.
    pub params: ProtectParams,
    /// `classes.len() * shape.values()` offsets (full scale 1), planar.
    pub delta: Vec<f32>,
}

impl ClassNoise {
    /// Writes the noise to `path` (replacing a file there).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes: Vec<u8> = self.delta.iter().flat_map(|v| v.to_le_bytes()).collect();
        let s = self.shape;
        let dims = vec![self.classes.len(), s.channels, s.height, s.width];
        let view = TensorView::new(Dtype::F32, dims, &bytes)
            .map_err(|e| Error::Config(format!("class noise of the wrong size: {e}")))?;
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("classes".to_string(), to_json(&self.classes)?),
            ("params".to_string(), to_json(&self.params)?),
        ]);
        let out = safetensors::serialize([("delta", view)], Some(meta))
            .map_err(|e| Error::Unsupported(format!("serialising the class noise: {e}")))?;
        write_file(Path::new(""), path, &sorted_metadata(out)?).map(drop)
    }

    /// Reads a noise file written by [`ClassNoise::save`].
    pub fn load(path: &Path) -> Result<ClassNoise> {
        ClassNoise::from_bytes(&read_file(path)?, path)
    }

    /// [`ClassNoise::load`] on the file's bytes (`path` names it in errors).
    pub(crate) fn from_bytes(bytes: &[u8], path: &Path) -> Result<ClassNoise> {
        let bad = |detail: String| Error::decode(path, detail);
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!(
                "not a lethe class-noise file (format {:?}, expected {FORMAT:?})",
                meta.get("format")
            )));
        }
        let field = |k: &str| {
            meta.get(k)
                .ok_or_else(|| bad(format!("metadata {k} is missing")))
        };
        let classes: Vec<String> = serde_json::from_str(field("classes")?)
            .map_err(|e| bad(format!("metadata classes: {e}")))?;
        let params: ProtectParams = serde_json::from_str(field("params")?)
            .map_err(|e| bad(format!("metadata params: {e}")))?;
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let t = tensors
            .tensor("delta")
            .map_err(|e| bad(format!("tensor delta: {e}")))?;
        let dims = t.shape();
        if t.dtype() != Dtype::F32 || dims.len() != 4 || dims[0] != classes.len() {
            return Err(bad(format!(
                "tensor delta is {:?} {dims:?}, expected F32 [{}, C, H, W]",
                t.dtype(),
                classes.len()
            )));
        }
        let shape = ImageShape {
            channels: dims[1],
            height: dims[2],
            width: dims[3],
        };
        let delta: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // The budget travels with the noise: a file edited past it is not
        // the protection its parameters describe.
        let limit = params.eps as f32 + 1e-6;
        if let Some(v) = delta.iter().find(|v| !v.is_finite() || v.abs() > limit) {
            return Err(bad(format!(
                "an offset of {v} is outside the budget eps = {}",
                params.eps
            )));
        }
        Ok(ClassNoise {
            shape,
            classes,
            params,
            delta,
        })
    }

    /// `data` with each image's class noise added, clipped to `[0, 1]` and
    /// snapped to its release grid. Classes are matched by name, so `data`
    /// may hold any subset of the noise's classes, in any order.
    pub fn apply(&self, data: &Dataset) -> Result<Dataset> {
        data.check_eps(self.params.eps)?;
        if data.shape() != self.shape {
            return Err(Error::Config(format!(
                "the class noise fits {}x{}x{} images, {} holds {}x{}x{}",
                self.shape.channels,
                self.shape.height,
                self.shape.width,
                data.name(),
                data.shape().channels,
                data.shape().height,
                data.shape().width
            )));
        }
        let unit: Vec<usize> = data
            .classes()
            .iter()
            .map(|c| {
                self.classes.iter().position(|k| k == c).ok_or_else(|| {
                    Error::Config(format!(
                        "class {c:?} of {} has no noise (the noise covers {:?})",
                        data.name(),
                        self.classes
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let v = self.shape.values();
        let mut pixels = Vec::with_capacity(data.pixels().len());
        for (i, &label) in data.labels().iter().enumerate() {
            let u = unit[label as usize];
            let d = &self.delta[u * v..(u + 1) * v];
            pixels.extend(
                data.image(i)
                    .iter()
                    .zip(d)
                    .map(|(x, d)| (x + d).clamp(0.0, 1.0)),
            );
        }
        data.with_pixels(pixels)?
            .quantize_within(data, self.params.eps)
    }
}

/// `bytes` (a safetensors file) with its metadata keys in sorted order.
///
/// safetensors writes the metadata map in hash order, which changes from
/// run to run: the same noise would give files of different bytes, and so
/// different SHA-256s in the manifests of the releases that reuse it. The
/// header keeps its length (the same keys and values, reordered).
fn sorted_metadata(mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bad = |detail: &str| Error::Unsupported(format!("serialising the class noise: {detail}"));
    // The header follows its length, a little-endian u64.
    let (len, _) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(&e.to_string()))?;
    let header = &bytes[8..8 + len];
    let mut doc: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
    if let Some(serde_json::Value::Object(meta)) = doc.get_mut("__metadata__") {
        let sorted: std::collections::BTreeMap<String, serde_json::Value> =
            std::mem::take(meta).into_iter().collect();
        meta.extend(sorted);
    }
    let mut text = serde_json::to_vec(&doc).map_err(|e| bad(&e.to_string()))?;
    if text.len() > len {
        return Err(bad("the sorted header grew"));
    }
    // safetensors pads its header with spaces to keep the data aligned.
    text.resize(len, b' ');
    bytes[8..8 + len].copy_from_slice(&text);
    Ok(bytes)
}

/// A metadata value as JSON.
fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v)
        .map_err(|e| Error::Unsupported(format!("serialising noise metadata: {e}")))
}
