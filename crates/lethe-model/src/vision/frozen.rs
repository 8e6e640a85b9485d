//! A classifier's weights frozen in evaluation mode, for repeated input
//! gradients ([`FrozenClassifier`]).
//!
//! Why: error-minimising noise takes thousands of input gradients through
//! weights that do not change during a noise pass. Chaining the layers'
//! backward passes by hand (`nn::frozen`) skips what candle's autograd adds
//! to every step (a zero tensor and an addition per edge, weight-gradient
//! sums nobody reads), and freezing once per pass folds each batch norm
//! into its convolution once instead of at every step. On the CPU the
//! gradient is the autograd path's bit for bit.

use candle_core::{DType, Tensor, D};

use super::{check_images, BatchNorm, Conv};
use crate::nn::frozen::{
    local_gradient, max_pool2x2_input_gradient, on_cpu_kernels, relu_input_gradient, FixedNorm,
    FrozenConv,
};
use crate::nn::{self, Param};
use crate::{Error, Result};

/// A snapshot of an [`super::ImageClassifier`]'s weights (copies: later
/// training does not change it) that computes logits and input gradients
/// in evaluation mode (batch norm with the running statistics). Made by
/// [`super::ImageClassifier::freeze`].
#[derive(Debug)]
pub struct FrozenClassifier {
    body: Body,
    head: Head,
    in_channels: usize,
    image_size: Option<usize>,
}

#[derive(Debug)]
enum Body {
    /// [`super::SmallCnn`]: conv (+ norm) -> 2x2 max-pool -> ReLU blocks.
    Cnn(Vec<FrozenConv>),
    /// [`super::ResNet18`]: stem conv + norm + ReLU, then basic blocks.
    ResNet {
        stem: FrozenConv,
        blocks: Vec<FrozenBlock>,
    },
}

#[derive(Debug)]
struct FrozenBlock {
    conv1: FrozenConv,
    conv2: FrozenConv,
    downsample: Option<FrozenConv>,
}

/// The linear head after flattening (CNN) or global average pooling
/// (ResNet).
#[derive(Debug)]
struct Head {
    weight: Tensor,
    bias: Tensor,
    pool: bool,
}

/// A copy of a parameter's current value, outside any graph.
fn copy(p: &Param) -> Result<Tensor> {
    Ok(p.var().as_detached_tensor().copy()?)
}

/// A frozen copy of `conv` followed by `bn` (evaluation mode).
pub(super) fn freeze_conv(conv: &Conv, bn: Option<&BatchNorm>) -> Result<FrozenConv> {
    let norm = match bn {
        None => None,
        Some(bn) => Some(FixedNorm {
            weight: copy(&bn.weight)?,
            bias: copy(&bn.bias)?,
            mean: bn.running_mean.as_detached_tensor().copy()?,
            var: bn.running_var.as_detached_tensor().copy()?,
            eps: super::BN_EPS,
        }),
    };
    let bias = conv.bias.as_ref().map(copy).transpose()?;
    FrozenConv::new(copy(&conv.weight)?, bias, norm, conv.stride, conv.padding)
}

impl FrozenClassifier {
    /// A SmallCnn's blocks and head.
    pub(super) fn cnn(
        blocks: Vec<FrozenConv>,
        head: &(Param, Param),
        in_channels: usize,
        image_size: usize,
    ) -> Result<FrozenClassifier> {
        Ok(FrozenClassifier {
            body: Body::Cnn(blocks),
            head: Head::new(head, false)?,
            in_channels,
            image_size: Some(image_size),
        })
    }

    /// A ResNet's stem, blocks `(conv1 + bn1, conv2 + bn2, downsample)`
    /// and head.
    pub(super) fn resnet(
        stem: FrozenConv,
        blocks: Vec<(FrozenConv, FrozenConv, Option<FrozenConv>)>,
        head: &(Param, Param),
        in_channels: usize,
    ) -> Result<FrozenClassifier> {
        let blocks = blocks
            .into_iter()
            .map(|(conv1, conv2, downsample)| FrozenBlock {
                conv1,
                conv2,
                downsample,
            })
            .collect();
        Ok(FrozenClassifier {
            body: Body::ResNet { stem, blocks },
            head: Head::new(head, true)?,
            in_channels,
            image_size: None,
        })
    }

    /// Logits `(n, classes)` for images `(n, channels, height, width)`.
    pub fn logits(&self, images: &Tensor) -> Result<Tensor> {
        let x = self.prepare(images)?;
        let features = match &self.body {
            Body::Cnn(blocks) => {
                let mut x = x;
                for conv in blocks {
                    x = nn::relu(&nn::max_pool2x2(&conv.forward(&x)?)?)?;
                }
                x
            }
            Body::ResNet { stem, blocks } => {
                let mut x = nn::relu(&stem.forward(&x)?)?;
                for b in blocks {
                    let y = nn::relu(&b.conv1.forward(&x)?)?;
                    let y = b.conv2.forward(&y)?;
                    let shortcut = match &b.downsample {
                        None => x.clone(),
                        Some(d) => d.forward(&x)?,
                    };
                    x = nn::relu(&(y + shortcut)?)?;
                }
                x
            }
        };
        self.head.logits(&features)
    }

    /// Mean cross-entropy of the logits of `images` against `labels`
    /// (`(n)` u32) and its gradient with respect to the images (f32, the
    /// images' shape).
    pub fn input_gradient(&self, images: &Tensor, labels: &Tensor) -> Result<(f32, Tensor)> {
        let x = self.prepare(images)?;
        let n = x.dim(0)?;
        if labels.dims() != [n] {
            return Err(Error::InvalidArgument(format!(
                "labels are {:?}, expected [{n}]",
                labels.dims()
            )));
        }
        let (loss, g) = self.loss_and_input_gradient(x, labels)?;
        // Last: off the CPU every step above is queued on the device
        // without waiting for it.
        self.head.check_labels(labels)?;
        Ok((loss.to_scalar::<f32>()?, g))
    }

    /// The loss (a scalar tensor) and the input gradient.
    fn loss_and_input_gradient(&self, x: Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.body {
            Body::Cnn(blocks) => {
                // Per block: its input, the convolution's output (pooled)
                // and the pooling's output (through ReLU).
                let mut saved = Vec::with_capacity(blocks.len());
                let mut x = x;
                for conv in blocks {
                    let c = conv.forward(&x)?;
                    let p = nn::max_pool2x2(&c)?;
                    let next = nn::relu(&p)?;
                    saved.push((x, c, p));
                    x = next;
                }
                let (loss, mut g) = self.head.loss_gradient(&x, labels)?;
                for (conv, (input, c, p)) in blocks.iter().zip(&saved).rev() {
                    g = relu_input_gradient(p, &g)?;
                    g = max_pool2x2_input_gradient(c, &g)?;
                    g = conv.input_gradient(input, &g)?;
                }
                Ok((loss, g))
            }
            Body::ResNet { stem, blocks } => {
                let a = stem.forward(&x)?;
                let mut r = nn::relu(&a)?;
                // Per block: its input, conv1's output, the ReLU after it,
                // and the sum before the block's last ReLU.
                let mut saved = Vec::with_capacity(blocks.len());
                for b in blocks {
                    let p1 = b.conv1.forward(&r)?;
                    let h = nn::relu(&p1)?;
                    let p2 = b.conv2.forward(&h)?;
                    let shortcut = match &b.downsample {
                        None => r.clone(),
                        Some(d) => d.forward(&r)?,
                    };
                    let z = (p2 + shortcut)?;
                    let next = nn::relu(&z)?;
                    saved.push((r, p1, h, z));
                    r = next;
                }
                let (loss, mut g) = self.head.loss_gradient(&r, labels)?;
                for (b, (input, p1, h, z)) in blocks.iter().zip(&saved).rev() {
                    let gz = relu_input_gradient(z, &g)?;
                    let gh = b.conv2.input_gradient(h, &gz)?;
                    let gp1 = relu_input_gradient(p1, &gh)?;
                    let main = b.conv1.input_gradient(input, &gp1)?;
                    let shortcut = match &b.downsample {
                        None => gz,
                        Some(d) => d.input_gradient(input, &gz)?,
                    };
                    g = (main + shortcut)?;
                }
                let g = relu_input_gradient(&a, &g)?;
                Ok((loss, stem.input_gradient(&x, &g)?))
            }
        }
    }

    fn prepare(&self, images: &Tensor) -> Result<Tensor> {
        check_images(images, self.in_channels, self.image_size)?;
        Ok(images.to_dtype(DType::F32)?.detach())
    }
}

impl Head {
    fn new((w, b): &(Param, Param), pool: bool) -> Result<Head> {
        Ok(Head {
            weight: copy(w)?,
            bias: copy(b)?,
            pool,
        })
    }

    /// The models' own head: the same ops, so the same values.
    fn logits(&self, features: &Tensor) -> Result<Tensor> {
        let x = if self.pool {
            features.mean(D::Minus1)?.mean(D::Minus1)?
        } else {
            features.flatten_from(1)?
        };
        Ok(x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }

    /// The mean cross-entropy (a scalar tensor) and its gradient with
    /// respect to `features`. On the CPU kernels by autograd over the head
    /// alone (the autograd path's ops, so its values); elsewhere in closed
    /// form ([`Head::direct_loss_gradient`]).
    fn loss_gradient(&self, features: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
        if on_cpu_kernels(features) {
            return local_gradient(features, |f| {
                nn::cross_entropy(&self.logits(f)?, labels, None)
            });
        }
        self.direct_loss_gradient(features, labels)
    }

    /// [`Head::loss_gradient`] written out: `softmax - onehot` through the
    /// linear layer (and the average pool), about half the device ops of
    /// autograd's and no wait for the device: labels are compared with
    /// every class instead of gathered, so an out-of-range label reads no
    /// memory, and the range is checked after the gradient is queued.
    fn direct_loss_gradient(&self, features: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
        let dims = features.dims().to_vec();
        let n = dims[0];
        let classes = self.weight.dim(0)?;
        let logits = self.logits(features)?;
        let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?)?;
        let e = shifted.exp()?;
        let total = e.sum_keepdim(1)?;
        let targets = labels.to_dtype(DType::U32)?;
        let class_ids = Tensor::arange(0u32, classes as u32, features.device())?;
        let onehot = targets
            .unsqueeze(1)?
            .broadcast_eq(&class_ids.unsqueeze(0)?)?
            .to_dtype(DType::F32)?;
        let target_logp = ((&shifted * &onehot)?.sum_keepdim(1)? - total.log()?)?;
        let loss = (target_logp.sum_all()?.neg()? / n as f64)?;
        let dlogits = ((e.broadcast_div(&total)? - onehot)? / n as f64)?;
        let dx = dlogits.matmul(&self.weight)?;
        let g = if self.pool {
            let (h, w) = (dims[2], dims[3]);
            (dx / (h * w) as f64)?
                .reshape((n, dims[1], 1, 1))?
                .broadcast_as(dims.as_slice())?
                .contiguous()?
        } else {
            dx.reshape(dims.as_slice())?
        };
        Ok((loss, g))
    }

    /// An error if a label is not a class of the head (a wait for the
    /// device: callers make it last).
    fn check_labels(&self, labels: &Tensor) -> Result<()> {
        let classes = self.weight.dim(0)?;
        let max = labels.to_dtype(DType::U32)?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= classes {
            return Err(Error::InvalidArgument(format!(
                "label {max} is outside the {classes} classes"
            )));
        }
        Ok(())
    }
}
