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
fn freeze_conv(conv: &Conv, bn: Option<&BatchNorm>) -> Result<FrozenConv> {
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

/// What a CNN block's backward pass reads: the block's input, the
/// convolution's output and the pooled output (before ReLU).
struct CnnTape {
    input: Tensor,
    conv: Tensor,
    pooled: Tensor,
}

/// What a basic block's backward pass reads: the block's input, conv1's
/// output, the ReLU of it, and the sum before the block's last ReLU.
struct BlockTape {
    input: Tensor,
    conv1: Tensor,
    hidden: Tensor,
    sum: Tensor,
}

/// The CNN block `relu(pool(conv(x)))`, with its tape.
fn cnn_block(conv: &FrozenConv, x: Tensor) -> Result<(Tensor, CnnTape)> {
    let c = conv.forward(&x)?;
    let pooled = nn::max_pool2x2(&c)?;
    let out = nn::relu(&pooled)?;
    Ok((
        out,
        CnnTape {
            input: x,
            conv: c,
            pooled,
        },
    ))
}

impl FrozenBlock {
    /// `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`, with its tape.
    fn forward(&self, x: Tensor) -> Result<(Tensor, BlockTape)> {
        let conv1 = self.conv1.forward(&x)?;
        let hidden = nn::relu(&conv1)?;
        let main = self.conv2.forward(&hidden)?;
        let shortcut = match &self.downsample {
            None => x.clone(),
            Some(d) => d.forward(&x)?,
        };
        let sum = (main + shortcut)?;
        let out = nn::relu(&sum)?;
        Ok((
            out,
            BlockTape {
                input: x,
                conv1,
                hidden,
                sum,
            },
        ))
    }

    /// The gradient with respect to the block's input, given the
    /// gradient `g` of its output.
    fn input_gradient(&self, t: &BlockTape, g: &Tensor) -> Result<Tensor> {
        let g_sum = relu_input_gradient(&t.sum, g)?;
        let g_hidden = self.conv2.input_gradient(&t.hidden, &g_sum)?;
        let g_conv1 = relu_input_gradient(&t.conv1, &g_hidden)?;
        let main = self.conv1.input_gradient(&t.input, &g_conv1)?;
        let shortcut = match &self.downsample {
            None => g_sum,
            Some(d) => d.input_gradient(&t.input, &g_sum)?,
        };
        Ok((main + shortcut)?)
    }
}

impl FrozenClassifier {
    /// A frozen copy of `m`.
    pub(super) fn of_cnn(m: &super::SmallCnn) -> Result<FrozenClassifier> {
        let blocks = m
            .blocks
            .iter()
            .map(|(conv, bn)| freeze_conv(conv, bn.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        Ok(FrozenClassifier {
            body: Body::Cnn(blocks),
            head: Head::new(&m.head, false)?,
            in_channels: m.cnn.in_channels,
            image_size: Some(m.cnn.image_size),
        })
    }

    /// A frozen copy of `m`.
    pub(super) fn of_resnet(m: &super::ResNet18) -> Result<FrozenClassifier> {
        let blocks = m
            .blocks
            .iter()
            .map(|b| {
                Ok(FrozenBlock {
                    conv1: freeze_conv(&b.conv1, Some(&b.bn1))?,
                    conv2: freeze_conv(&b.conv2, Some(&b.bn2))?,
                    downsample: match &b.downsample {
                        None => None,
                        Some((conv, bn)) => Some(freeze_conv(conv, Some(bn))?),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FrozenClassifier {
            body: Body::ResNet {
                stem: freeze_conv(&m.conv1, Some(&m.bn1))?,
                blocks,
            },
            head: Head::new(&m.fc, true)?,
            in_channels: m.res.in_channels,
            image_size: None,
        })
    }

    /// Logits `(n, classes)` for images `(n, channels, height, width)`.
    pub fn logits(&self, images: &Tensor) -> Result<Tensor> {
        let x = self.prepare(images)?;
        // The blocks' tapes are dropped as each block ends.
        let features = match &self.body {
            Body::Cnn(blocks) => blocks
                .iter()
                .try_fold(x, |x, conv| Ok::<_, Error>(cnn_block(conv, x)?.0))?,
            Body::ResNet { stem, blocks } => blocks
                .iter()
                .try_fold(nn::relu(&stem.forward(&x)?)?, |r, b| {
                    Ok::<_, Error>(b.forward(r)?.0)
                })?,
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
        let (loss, g) = match &self.body {
            Body::Cnn(blocks) => {
                let mut tapes = Vec::with_capacity(blocks.len());
                let mut x = x;
                for conv in blocks {
                    let (out, t) = cnn_block(conv, x)?;
                    tapes.push(t);
                    x = out;
                }
                let (loss, mut g) = self.head.loss_gradient(&x, labels)?;
                for (conv, t) in blocks.iter().zip(&tapes).rev() {
                    g = relu_input_gradient(&t.pooled, &g)?;
                    g = max_pool2x2_input_gradient(&t.conv, &g)?;
                    g = conv.input_gradient(&t.input, &g)?;
                }
                (loss, g)
            }
            Body::ResNet { stem, blocks } => {
                let s = stem.forward(&x)?;
                let mut r = nn::relu(&s)?;
                let mut tapes = Vec::with_capacity(blocks.len());
                for b in blocks {
                    let (out, t) = b.forward(r)?;
                    tapes.push(t);
                    r = out;
                }
                let (loss, mut g) = self.head.loss_gradient(&r, labels)?;
                for (b, t) in blocks.iter().zip(&tapes).rev() {
                    g = b.input_gradient(t, &g)?;
                }
                (
                    loss,
                    stem.input_gradient(&x, &relu_input_gradient(&s, &g)?)?,
                )
            }
        };
        // Last: off the CPU every step above is queued on the device
        // without waiting for it.
        self.head.check_labels(labels)?;
        Ok((loss.to_scalar::<f32>()?, g))
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
        Ok(nn::linear_product(&x, &self.weight)?.broadcast_add(&self.bias)?)
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
