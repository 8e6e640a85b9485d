//! Hashes are order-independent and change with any bit.

use candle_core::{Device, Tensor};

use super::*;

fn t(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
}

#[test]
fn hashes_depend_on_every_bit_not_on_order() {
    let a = vec![
        ("x".to_string(), t(&[1.0, 2.0])),
        ("y".to_string(), t(&[3.0])),
    ];
    let b = vec![
        ("y".to_string(), t(&[3.0])),
        ("x".to_string(), t(&[1.0, 2.0])),
    ];
    let h = hash_tensors(&a).unwrap();
    assert_eq!(h.len(), 64);
    assert_eq!(h, hash_tensors(&b).unwrap());
    let flipped = f32::from_bits(2.0f32.to_bits() ^ 1);
    let c = vec![
        ("x".to_string(), t(&[1.0, flipped])),
        ("y".to_string(), t(&[3.0])),
    ];
    assert_ne!(h, hash_tensors(&c).unwrap());
    let renamed = vec![
        ("z".to_string(), t(&[1.0, 2.0])),
        ("y".to_string(), t(&[3.0])),
    ];
    assert_ne!(h, hash_tensors(&renamed).unwrap());
    let reshaped = vec![
        ("x".to_string(), t(&[1.0, 2.0]).reshape((2, 1)).unwrap()),
        ("y".to_string(), t(&[3.0])),
    ];
    assert_ne!(h, hash_tensors(&reshaped).unwrap());
    assert_eq!(
        hash_bytes(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}
