//! The data unlearning methods consume: token sequences for language models
//! and labelled images for classifiers, plus scikit-learn's digits.
//!
//! * [`TextExample`] is a token sequence with a prompt/answer split: the
//!   loss covers only the answer tokens (`prompt_len == 0` makes the whole
//!   text the target, a plain document). The prompt is also the *query* an
//!   O3 gate is allowed to look at: the answer must never leak into the
//!   decision of whether to suppress it.
//! * [`TextSet`] batches examples by right-padding (the decoder's causal
//!   mask keeps padding from affecting real positions) with a 0/1 loss mask.
//! * [`ImageSet`] holds `(n, c, h, w)` f32 pixels and `u32` labels.
//! * [`digits`] reads scikit-learn's `digits.csv.gz` (1797 8x8 images).

use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::{Error, Result};

/// One token sequence with a prompt/answer split.
///
/// Invariant: `ids.len() >= 2` and `prompt_len < ids.len()`, so at least one
/// token is predicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextExample {
    ids: Vec<u32>,
    prompt_len: usize,
}

impl TextExample {
    /// A prompt/answer example: tokens from `prompt_len` on are the answer.
    pub fn new(ids: Vec<u32>, prompt_len: usize) -> Result<TextExample> {
        if ids.len() < 2 {
            return Err(Error::InvalidData(format!(
                "a text example needs at least 2 tokens, got {}",
                ids.len()
            )));
        }
        if prompt_len >= ids.len() {
            return Err(Error::InvalidData(format!(
                "prompt of {prompt_len} tokens leaves no answer in a {}-token example",
                ids.len()
            )));
        }
        Ok(TextExample { ids, prompt_len })
    }

    /// Builds an example whose invariant the caller guarantees.
    pub(crate) fn from_parts(ids: Vec<u32>, prompt_len: usize) -> TextExample {
        debug_assert!(ids.len() >= 2 && prompt_len < ids.len());
        TextExample { ids, prompt_len }
    }

    /// A plain document: every token after the first is a target.
    pub fn document(ids: Vec<u32>) -> Result<TextExample> {
        TextExample::new(ids, 0)
    }

    /// All tokens.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Number of prompt tokens (0 for a document).
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The prompt tokens.
    pub fn prompt(&self) -> &[u32] {
        &self.ids[..self.prompt_len]
    }

    /// The answer tokens (the whole text for a document).
    pub fn answer(&self) -> &[u32] {
        &self.ids[self.prompt_len..]
    }

    /// What an inference-time gate may look at: the prompt, or the whole
    /// text of a document.
    pub fn query(&self) -> &[u32] {
        if self.prompt_len > 0 {
            self.prompt()
        } else {
            &self.ids
        }
    }

    /// The same prompt with another answer (relabelling for random-label
    /// and refusal objectives). Needs a prompt and a non-empty answer.
    pub fn with_answer(&self, answer: &[u32]) -> Result<TextExample> {
        if self.prompt_len == 0 {
            return Err(Error::InvalidData(
                "cannot relabel a document without a prompt (prompt_len 0)".into(),
            ));
        }
        if answer.is_empty() {
            return Err(Error::InvalidData("replacement answer is empty".into()));
        }
        let mut ids = self.prompt().to_vec();
        ids.extend_from_slice(answer);
        TextExample::new(ids, self.prompt_len)
    }

    /// Positions whose token is a training target (`>= max(prompt_len, 1)`).
    fn first_target(&self) -> usize {
        self.prompt_len.max(1)
    }
}

/// A padded batch of [`TextExample`]s.
#[derive(Debug, Clone)]
pub struct TextBatch {
    /// `(batch, seq)` u32, right-padded with token 0.
    pub ids: Tensor,
    /// `(batch, seq)` f32: 1 where the token is an answer target.
    pub loss_mask: Tensor,
    /// Real length of each row.
    pub lengths: Vec<usize>,
}

/// A list of [`TextExample`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextSet {
    examples: Vec<TextExample>,
}

impl TextSet {
    /// A set of examples.
    pub fn new(examples: Vec<TextExample>) -> TextSet {
        TextSet { examples }
    }

    /// Plain documents ([`TextExample::document`]), one per token
    /// sequence; a sequence that cannot be one is an error naming its index.
    pub fn documents(seqs: &[Vec<u32>]) -> Result<TextSet> {
        let mut out = Vec::with_capacity(seqs.len());
        for (i, ids) in seqs.iter().enumerate() {
            out.push(
                TextExample::document(ids.clone())
                    .map_err(|e| Error::InvalidData(format!("document {i}: {e}")))?,
            );
        }
        Ok(TextSet::new(out))
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The examples.
    pub fn examples(&self) -> &[TextExample] {
        &self.examples
    }

    /// The examples at `indices` (in that order).
    pub fn subset(&self, indices: &[usize]) -> Result<TextSet> {
        let mut out = Vec::with_capacity(indices.len());
        for &i in indices {
            out.push(
                self.examples
                    .get(i)
                    .ok_or_else(|| {
                        Error::InvalidData(format!("index {i} outside a set of {}", self.len()))
                    })?
                    .clone(),
            );
        }
        Ok(TextSet::new(out))
    }

    /// Concatenation of two sets.
    pub fn concat(&self, other: &TextSet) -> TextSet {
        let mut out = self.examples.clone();
        out.extend(other.examples.iter().cloned());
        TextSet::new(out)
    }

    /// Longest example, in tokens.
    pub fn max_len(&self) -> usize {
        self.examples.iter().map(|e| e.ids.len()).max().unwrap_or(0)
    }

    /// Total number of target tokens.
    pub fn target_tokens(&self) -> usize {
        self.examples
            .iter()
            .map(|e| e.ids.len() - e.first_target())
            .sum()
    }

    /// Checks that every token is `< vocab_size` and every example fits in
    /// `max_positions`.
    pub fn check_fits(&self, vocab_size: usize, max_positions: usize) -> Result<()> {
        for (i, e) in self.examples.iter().enumerate() {
            if let Some(t) = e.ids.iter().find(|&&t| t as usize >= vocab_size) {
                return Err(Error::InvalidData(format!(
                    "example {i}: token {t} is outside the vocabulary of {vocab_size}"
                )));
            }
            if e.ids.len() > max_positions {
                return Err(Error::InvalidData(format!(
                    "example {i} has {} tokens, the model takes {max_positions}",
                    e.ids.len()
                )));
            }
        }
        Ok(())
    }

    /// The padded batch of the examples at `indices`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<TextBatch> {
        if indices.is_empty() {
            return Err(Error::InvalidData("empty batch".into()));
        }
        let mut rows = Vec::with_capacity(indices.len());
        for &i in indices {
            rows.push(self.examples.get(i).ok_or_else(|| {
                Error::InvalidData(format!("index {i} outside a set of {}", self.len()))
            })?);
        }
        pad_batch(&rows, device)
    }
}

/// Right-pads `rows` into a batch.
pub(crate) fn pad_batch(rows: &[&TextExample], device: &Device) -> Result<TextBatch> {
    let t = rows.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let b = rows.len();
    let mut ids = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    let mut lengths = Vec::with_capacity(b);
    for (r, e) in rows.iter().enumerate() {
        ids[r * t..r * t + e.ids.len()].copy_from_slice(&e.ids);
        for p in e.first_target()..e.ids.len() {
            mask[r * t + p] = 1.0;
        }
        lengths.push(e.ids.len());
    }
    Ok(TextBatch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        loss_mask: Tensor::from_vec(mask, (b, t), device)?,
        lengths,
    })
}

/// Right-pads plain token sequences (e.g. queries) into `(batch, seq)` u32
/// with their lengths. Every sequence must be non-empty.
pub(crate) fn pad_sequences(seqs: &[&[u32]], device: &Device) -> Result<(Tensor, Vec<usize>)> {
    if seqs.is_empty() || seqs.iter().any(|s| s.is_empty()) {
        return Err(Error::InvalidData("empty sequence in a batch".into()));
    }
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut ids = vec![0u32; seqs.len() * t];
    for (r, s) in seqs.iter().enumerate() {
        ids[r * t..r * t + s.len()].copy_from_slice(s);
    }
    Ok((
        Tensor::from_vec(ids, (seqs.len(), t), device)?,
        seqs.iter().map(|s| s.len()).collect(),
    ))
}

/// `0..n` shuffled by a generator seeded with `seed`.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    idx
}

/// Labelled images `(n, channels, height, width)`, f32.
///
/// Invariant: `pixels.len() == labels.len() * channels * height * width`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    pixels: Vec<f32>,
    labels: Vec<u32>,
    shape: (usize, usize, usize),
}

impl ImageSet {
    /// Images from flat pixels (row-major `n, c, h, w`) and labels.
    pub fn new(
        pixels: Vec<f32>,
        labels: Vec<u32>,
        shape: (usize, usize, usize),
    ) -> Result<ImageSet> {
        let per = shape.0 * shape.1 * shape.2;
        if per == 0 {
            return Err(Error::InvalidData(format!(
                "image shape {shape:?} is empty"
            )));
        }
        if pixels.len() != labels.len() * per {
            return Err(Error::InvalidData(format!(
                "{} pixels for {} images of {per}",
                pixels.len(),
                labels.len()
            )));
        }
        if let Some(p) = pixels.iter().find(|p| !p.is_finite()) {
            return Err(Error::InvalidData(format!("pixel value {p} is not finite")));
        }
        Ok(ImageSet {
            pixels,
            labels,
            shape,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `(channels, height, width)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        self.shape
    }

    /// The labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Pixels of image `i`.
    pub fn image(&self, i: usize) -> Option<&[f32]> {
        let per = self.shape.0 * self.shape.1 * self.shape.2;
        self.pixels.get(i * per..(i + 1) * per)
    }

    /// Number of classes (max label + 1; 0 when empty).
    pub fn num_classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |&m| m as usize + 1)
    }

    /// The images at `indices` (in that order).
    pub fn subset(&self, indices: &[usize]) -> Result<ImageSet> {
        let per = self.shape.0 * self.shape.1 * self.shape.2;
        let mut pixels = Vec::with_capacity(indices.len() * per);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let img = self.image(i).ok_or_else(|| {
                Error::InvalidData(format!("index {i} outside a set of {}", self.len()))
            })?;
            pixels.extend_from_slice(img);
            labels.push(self.labels[i]);
        }
        ImageSet::new(pixels, labels, self.shape)
    }

    /// Indices of the images whose label satisfies `keep`.
    pub fn indices_where(&self, keep: impl Fn(u32) -> bool) -> Vec<usize> {
        (0..self.len()).filter(|&i| keep(self.labels[i])).collect()
    }

    /// Images `(b, c, h, w)` and labels `(b)` u32 of the images at `indices`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        if indices.is_empty() {
            return Err(Error::InvalidData("empty batch".into()));
        }
        let sub = self.subset(indices)?;
        let (c, h, w) = self.shape;
        let images = Tensor::from_vec(sub.pixels, (indices.len(), c, h, w), device)?;
        let labels = Tensor::from_vec(sub.labels, indices.len(), device)?;
        Ok((images, labels))
    }

    /// Both sets' images, `self` first. Shapes must match.
    pub fn concat(&self, other: &ImageSet) -> Result<ImageSet> {
        if self.shape != other.shape {
            return Err(Error::InvalidData(format!(
                "cannot concatenate images of shape {:?} and {:?}",
                self.shape, other.shape
            )));
        }
        let mut pixels = self.pixels.clone();
        pixels.extend_from_slice(&other.pixels);
        let mut labels = self.labels.clone();
        labels.extend_from_slice(&other.labels);
        ImageSet::new(pixels, labels, self.shape)
    }

    /// The same images with other labels (random-label unlearning).
    pub fn with_labels(&self, labels: Vec<u32>) -> Result<ImageSet> {
        if labels.len() != self.len() {
            return Err(Error::InvalidData(format!(
                "{} labels for {} images",
                labels.len(),
                self.len()
            )));
        }
        ImageSet::new(self.pixels.clone(), labels, self.shape)
    }
}

/// scikit-learn's handwritten digits (UCI optdigits test set): 1797 images of
/// 8x8 pixels with values 0..16, ten classes.
pub mod digits {
    use super::*;

    /// Number of rows in the file.
    pub const ROWS: usize = 1797;

    /// Reads `digits.csv.gz` (each row: 64 pixel values 0..16, then the
    /// label 0..9). Pixels are scaled to `[0, 1]` (divided by 16).
    pub fn load(path: &Path) -> Result<ImageSet> {
        let file = std::fs::File::open(path)
            .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .map_err(|e| Error::io(e, format!("decompressing {}", path.display())))?;
        parse(&text).map_err(|e| match e {
            Error::Format(m) => Error::Format(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses the decompressed CSV text.
    pub fn parse(text: &str) -> Result<ImageSet> {
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for (line_no, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(',').collect();
            if fields.len() != 65 {
                return Err(Error::Format(format!(
                    "line {}: {} fields, expected 65",
                    line_no + 1,
                    fields.len()
                )));
            }
            for f in &fields[..64] {
                let v: f32 = f
                    .trim()
                    .parse()
                    .map_err(|_| Error::Format(format!("line {}: bad pixel {f:?}", line_no + 1)))?;
                if !(0.0..=16.0).contains(&v) {
                    return Err(Error::Format(format!(
                        "line {}: pixel {v} outside 0..16",
                        line_no + 1
                    )));
                }
                pixels.push(v / 16.0);
            }
            let label: f32 = fields[64].trim().parse().map_err(|_| {
                Error::Format(format!("line {}: bad label {:?}", line_no + 1, fields[64]))
            })?;
            if !(0.0..=9.0).contains(&label) || label.fract() != 0.0 {
                return Err(Error::Format(format!(
                    "line {}: label {label} is not a digit",
                    line_no + 1
                )));
            }
            labels.push(label as u32);
        }
        if labels.is_empty() {
            return Err(Error::Format("no rows".into()));
        }
        ImageSet::new(pixels, labels, (1, 8, 8))
    }

    /// Loads the digits through the project's asset cache
    /// (`lethe_assets::Asset::SKLEARN_DATA`, fetched on first use).
    pub fn from_cache() -> Result<ImageSet> {
        let dir = lethe_assets::Cache::from_env().ensure(lethe_assets::Asset::SKLEARN_DATA)?;
        load(&dir.join("digits.csv.gz"))
    }
}

#[cfg(test)]
mod tests;
