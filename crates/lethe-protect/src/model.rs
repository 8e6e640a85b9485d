//! The classifiers this crate trains (surrogates and victims), built on
//! `lethe-model`'s vision runtime, and a checkpointable momentum SGD.
//!
//! [`Arch`] names an architecture; a `Net` wraps the runtime's
//! [`SmallCnn`] or [`ResNet18`] and zero-pads inputs to the square side the
//! architecture needs (a CNN with `b` pooling blocks needs a multiple of
//! `2^b`), so any image size can be protected; gradients flow back through
//! the padding to the real pixels.
//!
//! `MomentumSgd` is PyTorch's SGD (momentum, L2 weight decay, global-norm
//! clipping) written on top of `lethe-model`'s plain [`Sgd`]: the momentum
//! buffers live here, named by parameter, so that a protection run can
//! checkpoint them and resume bit-for-bit.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use lethe_model::nn::{self, Mode};
use lethe_model::optim::{clip_grad_norm, Optimizer, Sgd, SgdConfig};
use lethe_model::vision::{
    frozen_gradients, load_classifier, CnnConfig, FrozenClassifier, ImageClassifier, ResNet18,
    ResNetConfig, SmallCnn, VisionConfig,
};
use serde::{Deserialize, Serialize};

use crate::dataset::ImageShape;
use crate::{Error, Result};

/// A classifier architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "snake_case", deny_unknown_fields)]
pub enum Arch {
    /// `lethe-model`'s small CNN: one conv3x3 (+ batch norm) + ReLU + 2x2
    /// max-pool block per entry of `channels`, then a linear head.
    Cnn {
        /// Output channels per block.
        channels: Vec<usize>,
        /// Batch norm after each convolution.
        batch_norm: bool,
    },
    /// ResNet-18 (CIFAR stem) with first-stage width `width` (64 is the
    /// standard model; 8-16 is CPU-sized).
    Resnet18 {
        /// Channels of the first stage.
        width: usize,
    },
}

impl Arch {
    /// A short label for reports, e.g. `cnn-32-64-bn` or `resnet18-w8`.
    pub fn label(&self) -> String {
        match self {
            Arch::Cnn {
                channels,
                batch_norm,
            } => {
                let c: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
                format!(
                    "cnn-{}{}",
                    c.join("-"),
                    if *batch_norm { "-bn" } else { "" }
                )
            }
            Arch::Resnet18 { width } => format!("resnet18-w{width}"),
        }
    }

    /// The small CNN (batch norm) sized for images of side `side`, with
    /// `width` channels in its first block on small images.
    ///
    /// - side <= 12: `[w, 2w]`; side <= 64: `[w, 2w, 4w]` (the networks
    ///   the recorded results use, `w` = 32 for surrogates, 16 for victims).
    /// - Larger images get a pyramid: a block per halving until the map is
    ///   8 pixels wide (at most 6 blocks), with channels that grow as the
    ///   map shrinks (`w * 64 / R`, R the map's side rounded up to a power
    ///   of two, clamped to `w/4..=4w`), so that every block costs about the
    ///   same. The 3-block network spends almost all its time in wide
    ///   convolutions of large maps: on a 512x512 image this one needs
    ///   about 19x fewer multiply-adds per pass (0.13 G against 2.5 G).
    pub fn cnn_for_side(side: usize, width: usize) -> Arch {
        let w = width.max(1);
        let channels = if side <= 12 {
            vec![w, 2 * w]
        } else if side <= 64 {
            vec![w, 2 * w, 4 * w]
        } else {
            let (lo, hi) = ((w / 4).max(1), 4 * w);
            let mut channels = Vec::new();
            let mut r = side;
            while r > 8 && channels.len() < 6 {
                let c = (w * 64 / r.next_power_of_two()).clamp(lo, hi);
                channels.push(c);
                r = r.div_ceil(2);
            }
            channels
        };
        Arch::Cnn {
            channels,
            batch_norm: true,
        }
    }

    /// The square side inputs of `shape` are padded to.
    fn side(&self, shape: ImageShape) -> usize {
        let s = shape.height.max(shape.width);
        match self {
            Arch::Cnn { channels, .. } => {
                let m = 1usize << channels.len().min(16);
                s.div_ceil(m) * m
            }
            Arch::Resnet18 { .. } => s,
        }
    }

    fn validate(&self) -> Result<()> {
        match self {
            Arch::Cnn { channels, .. } if channels.is_empty() || channels.len() > 6 => Err(
                Error::Config(format!("a CNN needs 1..=6 blocks, got {}", channels.len())),
            ),
            Arch::Cnn { channels, .. } if channels.iter().any(|&c| c == 0 || c > 1024) => {
                Err(Error::Config("CNN channels must be in 1..=1024".into()))
            }
            Arch::Resnet18 { width } if *width == 0 || *width > 128 => Err(Error::Config(format!(
                "ResNet-18 width must be 1..=128, got {width}"
            ))),
            _ => Ok(()),
        }
    }
}

/// A classifier for images of one shape (see the module docs).
pub(crate) struct Net {
    inner: Box<dyn ImageClassifier>,
    shape: ImageShape,
    /// Zero rows/columns added (top, bottom, left, right).
    pad: [usize; 4],
    device: Device,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("config", self.inner.config())
            .field("shape", &self.shape)
            .field("pad", &self.pad)
            .finish()
    }
}

fn pads(side: usize, shape: ImageShape) -> [usize; 4] {
    let (dh, dw) = (side - shape.height, side - shape.width);
    [dh / 2, dh - dh / 2, dw / 2, dw - dw / 2]
}

impl Net {
    /// A randomly initialised network (deterministic per `seed`).
    pub(crate) fn new(
        arch: &Arch,
        shape: ImageShape,
        classes: usize,
        device: &Device,
        seed: u64,
    ) -> Result<Net> {
        arch.validate()?;
        let side = arch.side(shape);
        let inner: Box<dyn ImageClassifier> = match arch {
            Arch::Cnn {
                channels,
                batch_norm,
            } => Box::new(SmallCnn::new(
                CnnConfig {
                    in_channels: shape.channels,
                    image_size: side,
                    num_classes: classes,
                    channels: channels.clone(),
                    batch_norm: *batch_norm,
                },
                device,
                seed,
            )?),
            Arch::Resnet18 { width } => Box::new(ResNet18::new(
                ResNetConfig {
                    in_channels: shape.channels,
                    num_classes: classes,
                    width: *width,
                },
                device,
                seed,
            )?),
        };
        Ok(Net {
            inner,
            shape,
            pad: pads(side, shape),
            device: device.clone(),
        })
    }

    /// Loads a network saved with [`ImageClassifier::save`] for `shape`.
    pub(crate) fn load(dir: &Path, shape: ImageShape, device: &Device) -> Result<Net> {
        let inner = load_classifier(dir, device)?;
        let side = match inner.config() {
            VisionConfig::Cnn(c) => c.image_size,
            VisionConfig::Resnet18(_) => shape.height.max(shape.width),
            #[allow(unreachable_patterns)]
            _ => {
                return Err(Error::Unsupported(
                    "unknown architecture in checkpoint".into(),
                ))
            }
        };
        if side < shape.height.max(shape.width) {
            return Err(Error::Unsupported(format!(
                "{} was built for {side}px inputs, images are {}x{}",
                dir.display(),
                shape.height,
                shape.width
            )));
        }
        Ok(Net {
            inner,
            shape,
            pad: pads(side, shape),
            device: device.clone(),
        })
    }

    /// A `(n, c, h, w)` tensor of `n` images stored back to back.
    pub(crate) fn batch(&self, pixels: &[f32]) -> Result<Tensor> {
        let v = self.shape.values();
        let n = pixels.len() / v;
        Ok(Tensor::from_slice(
            pixels,
            (n, self.shape.channels, self.shape.height, self.shape.width),
            &self.device,
        )?)
    }

    pub(crate) fn labels(&self, labels: &[u32]) -> Result<Tensor> {
        Ok(Tensor::from_slice(labels, labels.len(), &self.device)?)
    }

    /// Predictions and mean cross-entropy on `pixels` (eval mode, no
    /// autograd graph), in batches of `batch`.
    pub(crate) fn evaluate(&self, pixels: &[f32], labels: &[u32], batch: usize) -> Result<Eval> {
        let v = self.shape.values();
        let n = labels.len();
        let mut loss_sum = 0f64;
        let mut confusion: Vec<Vec<u32>> = Vec::new();
        self.inner.set_trainable(false);
        let result = (|| -> Result<()> {
            let mut start = 0;
            while start < n {
                let end = (start + batch.max(1)).min(n);
                let x = self.batch(&pixels[start * v..end * v])?;
                let y = self.labels(&labels[start..end])?;
                let logits = self.forward(&x, Mode::Eval)?;
                let ce = nn::cross_entropy(&logits, &y, None)?.to_scalar::<f32>()?;
                loss_sum += ce as f64 * (end - start) as f64;
                let classes = logits.dim(D::Minus1)?;
                confusion.resize_with(classes, || vec![0; classes]);
                let preds = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
                for (&p, &l) in preds.iter().zip(&labels[start..end]) {
                    if let Some(cell) = confusion
                        .get_mut(l as usize)
                        .and_then(|row| row.get_mut(p as usize))
                    {
                        *cell += 1;
                    }
                }
                start = end;
            }
            Ok(())
        })();
        self.inner.set_trainable(true);
        result?;
        // Predictions are always classes of the net, so a correct one is
        // on the diagonal.
        let correct: u32 = (0..confusion.len()).map(|c| confusion[c][c]).sum();
        Ok(Eval {
            accuracy: f64::from(correct) / n.max(1) as f64,
            loss: loss_sum / n.max(1) as f64,
            confusion,
        })
    }
}

/// Accuracy and loss of a network on a set of images.
#[derive(Debug, Clone)]
pub(crate) struct Eval {
    pub accuracy: f64,
    pub loss: f64,
    /// Counts by true class (rows) and predicted class (columns); labels
    /// outside the net's classes are left out.
    pub confusion: Vec<Vec<u32>>,
}

impl Net {
    /// Logits for `images` (`(n, c, h, w)` of this net's shape).
    pub(crate) fn forward(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(self.inner.forward(&self.padded(images)?, mode)?)
    }

    /// Pads `images` to the architecture's side.
    fn padded(&self, images: &Tensor) -> Result<Tensor> {
        let [t, b, l, r] = self.pad;
        Ok(if t + b + l + r == 0 {
            images.clone()
        } else {
            images
                .pad_with_zeros(D::Minus2, t, b)?
                .pad_with_zeros(D::Minus1, l, r)?
        })
    }

    /// The weights as they are now, in evaluation mode, for the input
    /// gradients of a noise pass (one snapshot for every step through
    /// unchanged weights; see [`FrozenNet`]).
    pub(crate) fn freeze(&self) -> Result<FrozenNet<'_>> {
        let frozen = if frozen_gradients() {
            Some(self.inner.freeze()?)
        } else {
            None
        };
        Ok(FrozenNet { net: self, frozen })
    }

    /// Mean cross-entropy in evaluation mode and its gradient with respect
    /// to `images`, by candle's autograd through the padding (weights
    /// untracked for the pass): what [`FrozenNet`] computes where
    /// `LETHE_FROZEN_GRAD=off`.
    fn autograd_input_gradient(&self, images: &Tensor, labels: &Tensor) -> Result<(f32, Tensor)> {
        let x = Var::from_tensor(&images.to_dtype(DType::F32)?)?;
        self.inner.set_trainable(false);
        let result = (|| -> Result<(f32, Tensor)> {
            let logits = self.forward(x.as_tensor(), Mode::Eval)?;
            let loss = nn::cross_entropy(&logits, labels, None)?;
            let value = loss.to_scalar::<f32>()?;
            let grads = loss.backward()?;
            let g = match grads.get(x.as_tensor()) {
                Some(g) => g.clone(),
                None => x.as_tensor().zeros_like()?,
            };
            Ok((value, g))
        })();
        self.inner.set_trainable(true);
        result
    }

    /// Trainable parameters with their names.
    pub(crate) fn named_trainable_vars(&self) -> Vec<(String, Var)> {
        self.inner.named_trainable_vars()
    }

    /// Whether forward passes track weight gradients.
    pub(crate) fn set_trainable(&self, trainable: bool) {
        self.inner.set_trainable(trainable)
    }

    /// Writes `config.json` and `model.safetensors` into `dir`.
    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        Ok(self.inner.save(dir)?)
    }
}

/// A [`Net`]'s weights frozen in evaluation mode: `lethe-model`'s
/// [`FrozenClassifier`] (hand-chained input gradients, batch norm folded
/// once per snapshot off the CPU) behind the net's padding, or autograd on
/// the live net where `LETHE_FROZEN_GRAD=off`.
pub(crate) struct FrozenNet<'a> {
    net: &'a Net,
    frozen: Option<FrozenClassifier>,
}

impl FrozenNet<'_> {
    /// Mean cross-entropy in evaluation mode and its gradient with respect
    /// to `images` (unpadded: the padding's gradient is dropped, as
    /// autograd through the padding drops it).
    pub(crate) fn input_gradient(&self, images: &Tensor, labels: &Tensor) -> Result<(f32, Tensor)> {
        let Some(frozen) = &self.frozen else {
            return self.net.autograd_input_gradient(images, labels);
        };
        let [t, _, l, _] = self.net.pad;
        let (_, _, h, w) = images.dims4()?;
        let (loss, g) = frozen.input_gradient(&self.net.padded(images)?, labels)?;
        let g = if self.net.pad.iter().all(|&p| p == 0) {
            g
        } else {
            g.narrow(D::Minus2, t, h)?.narrow(D::Minus1, l, w)?
        };
        Ok((loss, g))
    }
}

/// Hyper-parameters of the crate-private momentum SGD optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdParams {
    /// Learning rate (peak of the cosine schedule for victims).
    pub lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (`None`: no clipping).
    pub grad_clip: Option<f64>,
}

impl SgdParams {
    /// The unlearnable-examples setting: lr 0.1, momentum 0.9, weight decay
    /// 5e-4, clip 5.
    pub fn unlearnable_examples() -> SgdParams {
        SgdParams {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            grad_clip: Some(5.0),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !(ok(self.lr)
            && self.lr > 0.0
            && ok(self.momentum)
            && self.momentum < 1.0
            && ok(self.weight_decay))
            || self.grad_clip.is_some_and(|c| !(c.is_finite() && c > 0.0))
        {
            return Err(Error::Config(format!(
                "bad SGD parameters {self:?}: need lr > 0, 0 <= momentum < 1, weight decay >= 0, clip > 0"
            )));
        }
        Ok(())
    }
}

/// PyTorch SGD with momentum whose state can be saved (see module docs).
pub(crate) struct MomentumSgd {
    inner: Sgd,
    vars: Vec<(String, Var)>,
    bufs: Vec<Option<Tensor>>,
    params: SgdParams,
}

impl MomentumSgd {
    pub(crate) fn new(vars: Vec<(String, Var)>, params: SgdParams) -> Result<MomentumSgd> {
        params.validate()?;
        let inner = Sgd::new(
            vars.iter().map(|(_, v)| v.clone()).collect(),
            SgdConfig {
                lr: params.lr,
                momentum: 0.0,
                dampening: 0.0,
                weight_decay: 0.0,
                nesterov: false,
            },
        )?;
        let bufs = vec![None; vars.len()];
        Ok(MomentumSgd {
            inner,
            vars,
            bufs,
            params,
        })
    }

    pub(crate) fn set_lr(&mut self, lr: f64) {
        self.inner.set_learning_rate(lr);
    }

    /// Backward of `loss`, clipping, momentum, one step. Returns the loss.
    pub(crate) fn step(&mut self, loss: &Tensor) -> Result<f32> {
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::Unsupported(format!(
                "training diverged (loss {value}); lower the learning rate"
            )));
        }
        let mut grads = loss.backward()?;
        let vars: Vec<Var> = self.vars.iter().map(|(_, v)| v.clone()).collect();
        if let Some(max) = self.params.grad_clip {
            clip_grad_norm(&mut grads, &vars, max)?;
        }
        for ((_, var), buf) in self.vars.iter().zip(self.bufs.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let p = var.as_detached_tensor();
            let mut d = g.clone();
            if self.params.weight_decay > 0.0 {
                d = (d + (&p * self.params.weight_decay)?)?;
            }
            if self.params.momentum > 0.0 {
                let b = match buf.take() {
                    None => d,
                    Some(old) => ((old * self.params.momentum)? + d)?,
                };
                *buf = Some(b.clone());
                d = b;
            }
            grads.insert(var.as_tensor(), d);
        }
        self.inner.step(&grads)?;
        Ok(value)
    }

    /// Momentum buffers by parameter name.
    pub(crate) fn state(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .zip(&self.bufs)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| (n.clone(), b.clone())))
            .collect()
    }

    /// Restores buffers saved by [`MomentumSgd::state`].
    pub(crate) fn load_state(&mut self, mut state: HashMap<String, Tensor>) -> Result<()> {
        for ((name, var), buf) in self.vars.iter().zip(self.bufs.iter_mut()) {
            *buf = match state.remove(name) {
                Some(t) if t.dims() == var.dims() => Some(t),
                Some(t) => {
                    return Err(Error::Unsupported(format!(
                        "momentum of {name} has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    )))
                }
                None => None,
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Noise steps (a [`FrozenNet`]) and autograd through the padding give
    /// the same loss and input gradient, bit for bit on the CPU, on nets
    /// that pad 25x21 images, after training-mode passes moved the running
    /// statistics.
    #[test]
    fn frozen_net_gives_autograds_gradient_through_the_padding() {
        let shape = ImageShape {
            channels: 1,
            height: 25,
            width: 21,
        };
        let (n, v) = (6, shape.values());
        let px: Vec<f32> = (0..n * v)
            .map(|i| ((i * 37) % 101) as f32 / 100.0)
            .collect();
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
        for arch in [
            Arch::Cnn {
                channels: vec![4, 8],
                batch_norm: true,
            },
            Arch::Resnet18 { width: 4 },
        ] {
            let net = Net::new(&arch, shape, 3, &Device::Cpu, 5).unwrap();
            assert!(net.pad.iter().any(|&p| p > 0), "{arch:?} does not pad");
            let x = net.batch(&px).unwrap();
            let y = net.labels(&labels).unwrap();
            for _ in 0..2 {
                net.forward(&(&x * 0.5).unwrap(), Mode::Train).unwrap();
            }
            let (l_auto, g_auto) = net.autograd_input_gradient(&x, &y).unwrap();
            let (l_frozen, g_frozen) = net.freeze().unwrap().input_gradient(&x, &y).unwrap();
            assert_eq!(g_frozen.dims(), x.dims(), "{arch:?}");
            assert_eq!(l_frozen.to_bits(), l_auto.to_bits(), "{arch:?}");
            let (a, b) = (
                g_auto.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                g_frozen.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(a.iter().any(|g| *g != 0.0), "{arch:?}: zero gradient");
            assert!(a == b, "{arch:?}: gradients differ");
        }
    }

    /// Multiply-adds of one forward pass of `arch`'s convolutions on a
    /// one-channel square image of side `side` (3x3, pooling after each).
    fn conv_macs(arch: &Arch, side: usize) -> Vec<usize> {
        let Arch::Cnn { channels, .. } = arch else {
            panic!("not a CNN: {arch:?}");
        };
        let (mut r, mut c_in) = (
            arch.side(ImageShape {
                channels: 1,
                height: side,
                width: side,
            }),
            1,
        );
        channels
            .iter()
            .map(|&c| {
                let m = r * r * 9 * c_in * c;
                (r, c_in) = (r / 2, c);
                m
            })
            .collect()
    }

    #[test]
    fn cnn_for_side_keeps_small_nets_and_builds_a_flat_cost_pyramid_above_64() {
        let ch = |side, w| match Arch::cnn_for_side(side, w) {
            Arch::Cnn {
                channels,
                batch_norm,
            } => {
                assert!(batch_norm);
                channels
            }
            a => panic!("{a:?}"),
        };
        // The networks the recorded results were made with.
        assert_eq!(ch(8, 32), [32, 64]);
        assert_eq!(ch(12, 32), [32, 64]);
        assert_eq!(ch(13, 32), [32, 64, 128]);
        assert_eq!(ch(32, 32), [32, 64, 128]);
        assert_eq!(ch(64, 32), [32, 64, 128]);
        assert_eq!(ch(32, 16), [16, 32, 64]);
        // Above 64: a block per halving down to an 8-pixel map.
        assert_eq!(ch(128, 32), [16, 32, 64, 128]);
        assert_eq!(ch(512, 32), [8, 8, 16, 32, 64, 128]);
        assert_eq!(ch(512, 16), [4, 4, 8, 16, 32, 64]);
        assert_eq!(ch(100, 32), [16, 32, 64, 128]);
        // At most 6 blocks, channels within w/4..=4w.
        let big = ch(4096, 32);
        assert_eq!(big.len(), 6);
        assert!(big.iter().all(|c| (8..=128).contains(c)), "{big:?}");
        // Every block of the 512 pyramid costs at most twice the cheapest,
        // and the whole pass is >= 15x cheaper than the 3-block net.
        let pyramid = conv_macs(&Arch::cnn_for_side(512, 32), 512);
        let (lo, hi) = (
            *pyramid.iter().min().unwrap(),
            *pyramid.iter().max().unwrap(),
        );
        assert!(hi <= 2 * lo, "{pyramid:?}");
        let three = conv_macs(&Arch::cnn_for_side(64, 32), 512);
        let (p, t) = (pyramid.iter().sum::<usize>(), three.iter().sum::<usize>());
        assert!(t >= 15 * p, "3-block {t} vs pyramid {p}");
        // A pyramid net builds and runs on an odd side (padded to 2^blocks).
        let shape = ImageShape {
            channels: 1,
            height: 100,
            width: 90,
        };
        let net = Net::new(&Arch::cnn_for_side(100, 8), shape, 3, &Device::Cpu, 1).unwrap();
        let x = net.batch(&vec![0.5; 2 * shape.values()]).unwrap();
        let logits = net.forward(&x, Mode::Eval).unwrap();
        assert_eq!(logits.dims(), [2, 3]);
    }
}
