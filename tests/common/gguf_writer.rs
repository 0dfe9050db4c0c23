//! A minimal GGUF v3 writer for tests: builds llama GGUF files from safetensors fixtures the way
//! llama.cpp's converter does (Q/K rows permuted), so the reader can be checked end to end, and
//! then corrupted on purpose.
#![allow(dead_code)]

use half::f16;

/// A metadata value to write.
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

/// A tensor to write: GGUF name, row-major shape, ggml type id and its encoded bytes.
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Serializes a GGUF v3 file with 32-byte alignment.
pub fn write_gguf(meta: &[(&str, Meta)], tensors: &[Tensor]) -> Vec<u8> {
    write_gguf_pointing(meta, tensors, None)
}

/// [`write_gguf`], with tensor `a`'s offset in the table pointing at tensor `b`'s data when
/// `alias = Some((a, b))` (a table that lies).
pub fn write_gguf_pointing(
    meta: &[(&str, Meta)],
    tensors: &[Tensor],
    alias: Option<(usize, usize)>,
) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        put_str(&mut out, key);
        match value {
            Meta::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::Bool(v) => {
                out.extend(7u32.to_le_bytes());
                out.push(u8::from(*v));
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Meta::StrArray(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for s in items {
                    put_str(&mut out, s);
                }
            }
            Meta::I32Array(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for v in items {
                    out.extend(v.to_le_bytes());
                }
            }
        }
    }
    let offsets: Vec<u64> = tensors
        .iter()
        .scan(0u64, |at, t| {
            let o = *at;
            *at += (t.data.len() as u64).div_ceil(32) * 32;
            Some(o)
        })
        .collect();
    for (i, t) in tensors.iter().enumerate() {
        put_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(t.ggml_type.to_le_bytes());
        let offset = match alias {
            Some((a, b)) if a == i => offsets[b],
            _ => offsets[i],
        };
        out.extend(offset.to_le_bytes());
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    for t in tensors {
        out.extend(&t.data);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
    }
    out
}

/// llama.cpp's permutation of Q/K rows: within each head, HF row `j * hd/2 + i` goes to
/// `2 * i + j` (a reshape `(heads, 2, hd/2, cols)` then swapping axes 1 and 2).
pub fn permute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + j * hd / 2 + i;
                let dst = h * hd + 2 * i + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Element encodings the writer supports.
#[derive(Clone, Copy, Debug)]
pub enum Encoding {
    F32,
    F16,
    /// 8-bit blocks of 32 with an f16 scale: `d = max|x| / 127`, `q = round(x / d)`.
    Q8_0,
    /// 4-bit blocks of 32, symmetric: `d = max|x| / 7`, `q = clamp(round(x / d) + 8, 0, 15)`.
    Q4_0,
    /// 4-bit blocks of 32, asymmetric: `d = (max - min) / 15`, `m = min`, `q = round((x - m) / d)`.
    Q4_1,
    /// 5-bit blocks of 32 (kept as blocks at run time, not repacked): `d = x_max / -16` for
    /// the value of largest magnitude, `q = clamp(trunc(x / d + 16.5), 0, 31)`, as ggml.
    Q5_0,
}

/// `1 / d`, or 0 for an all-zero block.
fn inverse(d: f16) -> f32 {
    if d.to_f32() == 0.0 {
        0.0
    } else {
        1.0 / d.to_f32()
    }
}

/// Packs 32 nibbles: byte j holds value j (low) and value j + 16 (high).
fn pack_nibbles(q: &[u8]) -> Vec<u8> {
    (0..16).map(|j| q[j] | (q[j + 16] << 4)).collect()
}

fn unpack_nibbles(b: &[u8]) -> Vec<f32> {
    let lo = b.iter().map(|v| f32::from(v & 15));
    let hi = b.iter().map(|v| f32::from(v >> 4));
    lo.chain(hi).collect()
}

impl Encoding {
    pub fn ggml_type(self) -> u32 {
        match self {
            Encoding::F32 => 0,
            Encoding::F16 => 1,
            Encoding::Q8_0 => 8,
            Encoding::Q4_0 => 2,
            Encoding::Q4_1 => 3,
            Encoding::Q5_0 => 6,
        }
    }

    pub fn encode(self, data: &[f32]) -> Vec<u8> {
        match self {
            Encoding::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Encoding::F16 => data
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            Encoding::Q8_0 => data
                .chunks(32)
                .flat_map(|block| {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = f16::from_f32(amax / 127.0);
                    let inv = inverse(d);
                    let mut b = d.to_le_bytes().to_vec();
                    b.extend(
                        block
                            .iter()
                            .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
                    );
                    b
                })
                .collect(),
            Encoding::Q4_0 => data
                .chunks(32)
                .flat_map(|block| {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = f16::from_f32(amax / 7.0);
                    let inv = inverse(d);
                    let q: Vec<u8> = block
                        .iter()
                        .map(|v| ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u8)
                        .collect();
                    let mut b = d.to_le_bytes().to_vec();
                    b.extend(pack_nibbles(&q));
                    b
                })
                .collect(),
            Encoding::Q4_1 => data
                .chunks(32)
                .flat_map(|block| {
                    let min = block.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                    let max = block.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let (d, m) = (f16::from_f32((max - min) / 15.0), f16::from_f32(min));
                    let inv = inverse(d);
                    let q: Vec<u8> = block
                        .iter()
                        .map(|v| ((v - m.to_f32()) * inv).round().clamp(0.0, 15.0) as u8)
                        .collect();
                    let mut b = d.to_le_bytes().to_vec();
                    b.extend(m.to_le_bytes());
                    b.extend(pack_nibbles(&q));
                    b
                })
                .collect(),
            Encoding::Q5_0 => data
                .chunks(32)
                .flat_map(|block| {
                    let max = block
                        .iter()
                        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let d = f16::from_f32(max / -16.0);
                    let inv = if max == 0.0 { 0.0 } else { -16.0 / max };
                    let q: Vec<u8> = block
                        .iter()
                        .map(|v| (v * inv + 16.5).trunc().clamp(0.0, 31.0) as u8)
                        .collect();
                    let high = (0..32).fold(0u32, |h, i| h | (u32::from(q[i] >> 4) << i));
                    let low: Vec<u8> = q.iter().map(|v| v & 15).collect();
                    let mut b = d.to_le_bytes().to_vec();
                    b.extend(high.to_le_bytes());
                    b.extend(pack_nibbles(&low));
                    b
                })
                .collect(),
        }
    }

    /// What the reader should decode `data` to after encoding.
    pub fn round_trip(self, data: &[f32]) -> Vec<f32> {
        match self {
            Encoding::F32 => data.to_vec(),
            Encoding::F16 => data.iter().map(|v| f16::from_f32(*v).to_f32()).collect(),
            Encoding::Q8_0 => self
                .encode(data)
                .chunks(34)
                .flat_map(|b| {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    b[2..]
                        .iter()
                        .map(move |&q| d * f32::from(q as i8))
                        .collect::<Vec<_>>()
                })
                .collect(),
            Encoding::Q4_0 => self
                .encode(data)
                .chunks(18)
                .flat_map(|b| {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    unpack_nibbles(&b[2..])
                        .into_iter()
                        .map(move |q| d * (q - 8.0))
                })
                .collect(),
            Encoding::Q4_1 => self
                .encode(data)
                .chunks(20)
                .flat_map(|b| {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                    unpack_nibbles(&b[4..]).into_iter().map(move |q| d * q + m)
                })
                .collect(),
            Encoding::Q5_0 => self
                .encode(data)
                .chunks(22)
                .flat_map(|b| {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    let high = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                    unpack_nibbles(&b[6..])
                        .into_iter()
                        .enumerate()
                        .map(move |(i, q)| d * (q + 16.0 * ((high >> i) & 1) as f32 - 16.0))
                })
                .collect(),
        }
    }
}
