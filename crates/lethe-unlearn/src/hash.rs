//! Content hashes of weights, masks and adapters, for unlearning receipts.
//!
//! A receipt must let an auditor check that the model it describes is the
//! model that runs: SHA-256 over every named tensor, in name order, of the
//! name, the dtype, the shape and the raw little-endian bytes. Two models
//! hash equal iff every tensor is bit-identical (up to SHA-256 collisions).
//! Only f32 and u8 tensors are hashed byte-exactly; other dtypes are
//! converted to f32 first (the hash records the original dtype).

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use ring::digest::{Context, SHA256};

use crate::Result;

/// SHA-256 (lowercase hex) of named tensors; the order of `named` does not
/// matter (they are sorted by name).
pub fn hash_tensors(named: &[(String, Tensor)]) -> Result<String> {
    let mut sorted: Vec<&(String, Tensor)> = named.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut ctx = Context::new(&SHA256);
    ctx.update(b"lethe-tensors-v1\0");
    for (name, t) in sorted {
        ctx.update(name.as_bytes());
        ctx.update(&[0]);
        ctx.update(format!("{:?}", t.dtype()).as_bytes());
        ctx.update(&[0]);
        ctx.update(&(t.dims().len() as u64).to_le_bytes());
        for d in t.dims() {
            ctx.update(&(*d as u64).to_le_bytes());
        }
        let flat = t.flatten_all()?;
        match t.dtype() {
            DType::U8 => ctx.update(&flat.to_vec1::<u8>()?),
            DType::F32 => update_f32(&mut ctx, &flat.to_vec1::<f32>()?),
            _ => update_f32(&mut ctx, &flat.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        }
    }
    Ok(hex::encode(ctx.finish().as_ref()))
}

/// SHA-256 of named Vars (their current values).
pub fn hash_vars(named: &[(String, Var)]) -> Result<String> {
    let tensors: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, v)| (n.clone(), v.as_detached_tensor()))
        .collect();
    hash_tensors(&tensors)
}

/// SHA-256 of every tensor in a candle `VarMap`'s data (running statistics
/// of batch norm included).
pub fn hash_varmap(varmap: &VarMap) -> Result<String> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let named: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    drop(data);
    hash_vars(&named)
}

/// SHA-256 of arbitrary bytes (lowercase hex).
pub fn hash_bytes(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&SHA256, bytes).as_ref())
}

fn update_f32(ctx: &mut Context, values: &[f32]) {
    let mut buf = Vec::with_capacity(values.len().min(1 << 16) * 4);
    for chunk in values.chunks(1 << 16) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        ctx.update(&buf);
    }
}

#[cfg(test)]
mod tests;
