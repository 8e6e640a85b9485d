//! The in-memory dataset every method works on, and the split that the
//! audit protocol needs.
//!
//! A [`Dataset`] is a stack of same-shaped images with values in `[0, 1]`
//! (channel-first, row-major), one label per image, the class names, and,
//! per image, where it came from ([`Item`]) so that the protected images
//! can be written back in the format they were read from ([`Format`]).
//! Pixel values are normalised on load (8-bit PNG: `v / 255`, 16-bit:
//! `v / 65535`, DICOM: the stored value mapped from the dataset's stored
//! range, see [`Format::Dicom`]); [`Dataset::quantize_within`] snaps them
//! back onto the grid the release format can hold, within the budget,
//! because protection must be judged on what is actually published, never
//! on float tensors.

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Shape of every image of a dataset (channel-first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageShape {
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl ImageShape {
    /// Pixel locations per image (`height * width`).
    pub fn pixels(&self) -> usize {
        self.height * self.width
    }

    /// Values per image (`channels * height * width`).
    pub fn values(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// `channels x height x width`, as in error messages.
impl std::fmt::Display for ImageShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}

/// How a dataset is stored on disk, so that protected images are written
/// back the same way.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// Made in memory (generated, or decoded from a bundled archive);
    /// written as a folder of 8-bit PNGs with one sub-folder per class.
    Generated,
    /// A folder with one sub-folder of PNG files per class (8- or 16-bit,
    /// grayscale or RGB; each [`Item`] keeps its own bit depth).
    PngFolder {
        /// The folder that was read.
        root: PathBuf,
    },
    /// A NumPy `.npy` (images) or `.npz` (images and labels) file.
    Npy(crate::formats::npy::NpySource),
    /// A folder with one sub-folder of DICOM files per class. Pixel values
    /// are normalised as `(stored - lo) / (hi - lo)` with `(lo, hi)` the
    /// smallest and largest stored value over the whole dataset, so that
    /// epsilon is a fraction of the data's actual dynamic range (a CT with
    /// 16 bits allocated rarely uses more than 12).
    Dicom {
        /// The folder that was read.
        root: PathBuf,
        /// Smallest and largest stored value.
        range: (f64, f64),
    },
}

/// Where one image came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Path relative to the dataset root (`None` for images inside one
    /// array file or generated ones).
    pub path: Option<PathBuf>,
    /// SHA-256 of the source file, lower-case hex (`None` when not a file
    /// of its own).
    pub sha256: Option<String>,
    /// The release grid: values are multiples of `1 / levels` (255 for
    /// 8-bit, 65535 for 16-bit, `hi - lo` for DICOM); `None` for
    /// floating-point storage.
    pub levels: Option<u32>,
    /// A PNG source's alpha channel, one value per pixel at the file's
    /// bit depth: not protected (a model trains on the colour), written
    /// back unchanged. `None` for every other source.
    pub alpha: Option<Vec<u16>>,
    /// The frame of a multi-frame source file this image is (0-based);
    /// `None` when the file holds one image. The frames of one file are
    /// consecutive images of the dataset and are written back together.
    pub frame: Option<u32>,
}

impl Item {
    /// An image without a file of its own, released on a `levels` grid.
    pub fn in_memory(levels: Option<u32>) -> Item {
        Item {
            path: None,
            sha256: None,
            levels,
            alpha: None,
            frame: None,
        }
    }
}

/// A labelled stack of same-shaped images with values in `[0, 1]`.
///
/// Invariant: `pixels.len() == len * shape.values()`, every value finite
/// and in `[0, 1]`, every label `< classes.len()`, one [`Item`] per image,
/// at least one image and two classes.
#[derive(Debug, Clone)]
pub struct Dataset {
    name: String,
    shape: ImageShape,
    pixels: Vec<f32>,
    labels: Vec<u32>,
    classes: Vec<String>,
    items: Vec<Item>,
    format: Format,
}

impl Dataset {
    /// Builds a dataset, checking its invariant.
    pub fn new(
        name: impl Into<String>,
        shape: ImageShape,
        pixels: Vec<f32>,
        labels: Vec<u32>,
        classes: Vec<String>,
        items: Vec<Item>,
        format: Format,
    ) -> Result<Dataset> {
        let n = labels.len();
        if n == 0 {
            return Err(Error::Unsupported("the dataset has no images".into()));
        }
        if shape.channels != 1 && shape.channels != 3 {
            return Err(Error::Unsupported(format!(
                "images must have 1 or 3 channels, got {}",
                shape.channels
            )));
        }
        if shape.height == 0 || shape.width == 0 {
            return Err(Error::Unsupported("images must not be empty".into()));
        }
        if pixels.len() != n * shape.values() {
            return Err(Error::Unsupported(format!(
                "{} pixel values for {n} images of shape {shape:?}",
                pixels.len()
            )));
        }
        if classes.len() < 2 {
            return Err(Error::Unsupported(format!(
                "protection needs at least two classes, found {}",
                classes.len()
            )));
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes.len()) {
            return Err(Error::Unsupported(format!(
                "label {bad} but only {} classes",
                classes.len()
            )));
        }
        if items.len() != n {
            return Err(Error::Unsupported(format!(
                "{} item records for {n} images",
                items.len()
            )));
        }
        if let Some(v) = pixels.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            return Err(Error::Unsupported(format!(
                "pixel value {v} outside [0, 1] after normalisation"
            )));
        }
        Ok(Dataset {
            name: name.into(),
            shape,
            pixels,
            labels,
            classes,
            items,
            format,
        })
    }

    /// A short name (for reports).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Always false (a dataset has at least one image); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The shape of every image.
    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// All pixel values, image after image.
    pub fn pixels(&self) -> &[f32] {
        &self.pixels
    }

    /// The values of image `i` (panics if `i >= len`, a caller bug).
    pub fn image(&self, i: usize) -> &[f32] {
        let v = self.shape.values();
        &self.pixels[i * v..(i + 1) * v]
    }

    /// Labels, one per image.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Class names; label `k` is `classes()[k]`.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Per-image provenance.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The storage format.
    pub fn format(&self) -> &Format {
        &self.format
    }

    /// Images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// The same images in the order of `indices` (each `< len`).
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        let v = self.shape.values();
        let mut pixels = Vec::with_capacity(indices.len() * v);
        let mut labels = Vec::with_capacity(indices.len());
        let mut items = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(Error::Config(format!(
                    "index {i} out of range for {} images",
                    self.len()
                )));
            }
            pixels.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
            items.push(self.items[i].clone());
        }
        Dataset::new(
            self.name.clone(),
            self.shape,
            pixels,
            labels,
            self.classes.clone(),
            items,
            self.format.clone(),
        )
    }

    /// The same dataset with other pixel values (same length, in `[0, 1]`).
    pub fn with_pixels(&self, pixels: Vec<f32>) -> Result<Dataset> {
        Dataset::new(
            self.name.clone(),
            self.shape,
            pixels,
            self.labels.clone(),
            self.classes.clone(),
            self.items.clone(),
            self.format.clone(),
        )
    }

    /// The same dataset under another name.
    pub fn renamed(mut self, name: impl Into<String>) -> Dataset {
        self.name = name.into();
        self
    }

    /// The release of `self`, a perturbed copy of `original`, on the
    /// release grid without breaking the `eps` budget: each value is
    /// rounded to the nearest grid step, then kept within
    /// [`budget_steps`]`(eps, levels)` steps of the original's value (the
    /// nearest step can lie up to half a step beyond `eps` when `eps` is
    /// not a whole number of steps). Floating-point items are clamped to
    /// `original +- eps`. `original` must be this dataset's source (same
    /// shape, items and length).
    pub fn quantize_within(&self, original: &Dataset, eps: f64) -> Result<Dataset> {
        if original.shape != self.shape || original.items.len() != self.items.len() {
            return Err(Error::Config(format!(
                "quantize_within: {} images of {} against {} of {}",
                self.items.len(),
                self.shape,
                original.items.len(),
                original.shape
            )));
        }
        let v = self.shape.values();
        let mut pixels = self.pixels.clone();
        for (i, item) in self.items.iter().enumerate() {
            let range = i * v..(i + 1) * v;
            let clean = &original.pixels[range.clone()];
            let noisy = &mut pixels[range];
            match item.levels {
                Some(levels) => {
                    let l = f64::from(levels);
                    let steps = f64::from(budget_steps(eps, levels));
                    for (p, &x) in noisy.iter_mut().zip(clean) {
                        let k0 = (f64::from(x) * l).round();
                        let k = (f64::from(*p) * l)
                            .round()
                            .clamp(k0 - steps, k0 + steps)
                            .clamp(0.0, l);
                        *p = (k / l) as f32;
                    }
                }
                None => {
                    let e = eps as f32;
                    for (p, &x) in noisy.iter_mut().zip(clean) {
                        *p = p.clamp(x - e, x + e).clamp(0.0, 1.0);
                    }
                }
            }
        }
        Ok(Dataset {
            pixels,
            ..self.clone()
        })
    }

    /// Checks that `eps` allows at least one step on every item's release
    /// grid (an `eps` below one step would release the images unchanged)
    /// and says, as a caveat for the manifest, where it is not a whole
    /// number of steps (changes are then capped at the whole steps below
    /// it, see [`Dataset::quantize_within`]).
    pub fn check_eps(&self, eps: f64) -> Result<Option<String>> {
        let mut grids: Vec<u32> = self.items.iter().filter_map(|i| i.levels).collect();
        grids.sort_unstable();
        grids.dedup();
        let mut notes = Vec::new();
        for levels in grids {
            let steps = budget_steps(eps, levels);
            if steps == 0 {
                return Err(Error::Config(format!(
                    "eps {eps} is below one step of the release grid (1/{levels} = {:.6}): \
                     no pixel could change; use eps >= 1/{levels}",
                    1.0 / f64::from(levels)
                )));
            }
            let exact = eps * f64::from(levels);
            if exact - f64::from(steps) > GRID_TOLERANCE {
                notes.push(format!(
                    "eps {eps} is {exact:.2} steps of the 1/{levels} grid: changes are capped at \
                     {steps} steps ({:.5})",
                    f64::from(steps) / f64::from(levels)
                ));
            }
        }
        Ok((!notes.is_empty()).then(|| notes.join("; ")))
    }

    /// A stratified split: per class, `round(test_fraction * count)` images
    /// (at least one when the class has two or more) go to the test side,
    /// chosen by a shuffle seeded with `seed`. The frames of one multi-frame
    /// file move together (near-copies of each other on both sides would
    /// measure memory, not learning), so such a class's test share is
    /// rounded up to whole files, and a class held in one file stays on the
    /// training side. Returns sorted `(train, test)` indices.
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(Error::Config(format!(
                "test fraction must be in (0, 1), got {test_fraction}"
            )));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for class in 0..self.classes.len() as u32 {
            // Units that move together: a file's frames, else one image.
            let mut units: Vec<Vec<usize>> = Vec::new();
            for i in (0..self.len()).filter(|&i| self.labels[i] == class) {
                let item = &self.items[i];
                match units.last_mut() {
                    Some(unit)
                        if item.frame.is_some_and(|k| k > 0)
                            && self.items[unit[0]].path == item.path =>
                    {
                        unit.push(i)
                    }
                    _ => units.push(vec![i]),
                }
            }
            let images: usize = units.iter().map(Vec::len).sum();
            units.shuffle(&mut rng);
            let target = (test_fraction * images as f64).round() as usize;
            let (mut taken, mut taken_images) = (0, 0);
            if units.len() >= 2 {
                while taken < units.len() - 1 && (taken == 0 || taken_images < target) {
                    taken_images += units[taken].len();
                    taken += 1;
                }
            }
            test.extend(units[..taken].iter().flatten());
            train.extend(units[taken..].iter().flatten());
        }
        train.sort_unstable();
        test.sort_unstable();
        if train.is_empty() || test.is_empty() {
            return Err(Error::Unsupported(
                "too few images to split into train and test".into(),
            ));
        }
        Ok((train, test))
    }
}

/// How far `eps * levels` may fall short of a whole number and still count
/// as that number (an `8/255` stored in floating point).
const GRID_TOLERANCE: f64 = 1e-3;

/// The largest change, in steps of a `levels` grid (values `k / levels`),
/// that stays within `eps`: `floor(eps * levels)`, with `8/255` on the
/// 255 grid counted as 8 despite floating-point error.
pub fn budget_steps(eps: f64, levels: u32) -> u32 {
    let steps = (eps * f64::from(levels) + GRID_TOLERANCE).floor();
    if steps.is_finite() && steps > 0.0 {
        steps.min(f64::from(levels)) as u32
    } else {
        0
    }
}

#[cfg(test)]
mod tests;
