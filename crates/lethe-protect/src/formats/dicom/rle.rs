//! DICOM RLE Lossless (PS3.5 Annex G): decode a frame to sample planes and
//! encode the protected planes back, so an RLE archive is released as RLE.
//!
//! dicom-rs decodes RLE but has no encoder, and its decoder indexes the
//! fragment header without checking its length; this module does both, and
//! every malformed input is an `Err` with what is wrong.
//!
//! A frame is one fragment: a 64-byte header (the number of segments, then
//! up to 15 little-endian byte offsets) and one PackBits segment per byte
//! plane, most significant byte of sample 0 first. Segments have even
//! lengths; runs never cross a row.

/// Most segments a header can address.
const MAX_SEGMENTS: usize = 15;
const HEADER_LEN: usize = 64;

/// The shape of one frame: `samples` planes of `rows x cols` samples of
/// `bytes_per_sample` bytes (1 or 2), one RLE segment per byte plane.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub rows: usize,
    pub cols: usize,
    pub samples: usize,
    pub bytes_per_sample: usize,
}

impl Geometry {
    fn plane(&self) -> usize {
        self.rows * self.cols
    }

    fn segments(&self) -> usize {
        self.samples * self.bytes_per_sample
    }

    /// Segment `s`'s sample plane and bit shift (most significant byte of
    /// each sample first).
    fn segment(&self, s: usize) -> (usize, usize) {
        let (c, byte) = (s / self.bytes_per_sample, s % self.bytes_per_sample);
        (c, 8 * (self.bytes_per_sample - 1 - byte))
    }
}

/// Decodes one RLE frame into `g.samples` planes of `rows * cols` words
/// (plane `c` at `c * rows * cols`).
pub(super) fn decode_frame(fragment: &[u8], g: Geometry) -> Result<Vec<u16>, String> {
    let expected = g.segments();
    if fragment.len() < HEADER_LEN {
        return Err(format!(
            "RLE fragment of {} bytes is shorter than its 64-byte header",
            fragment.len()
        ));
    }
    let word = |i: usize| {
        u32::from_le_bytes([
            fragment[4 * i],
            fragment[4 * i + 1],
            fragment[4 * i + 2],
            fragment[4 * i + 3],
        ]) as usize
    };
    let segments = word(0);
    if segments != expected {
        return Err(format!(
            "RLE header lists {segments} segments; {} sample(s) of {} byte(s) need {expected}",
            g.samples, g.bytes_per_sample
        ));
    }
    let hw = g.plane();
    let mut words = vec![0u16; g.samples * hw];
    for s in 0..segments {
        let start = word(1 + s);
        let end = if s + 1 < segments {
            word(2 + s)
        } else {
            fragment.len()
        };
        let segment = fragment
            .get(start..end)
            .filter(|_| start >= HEADER_LEN)
            .ok_or_else(|| {
                format!(
                    "RLE segment {s} spans bytes {start}..{end} of a {}-byte fragment",
                    fragment.len()
                )
            })?;
        let plane = unpack_bits(segment, hw).map_err(|e| format!("RLE segment {s}: {e}"))?;
        let (c, shift) = g.segment(s);
        for (w, b) in words[c * hw..(c + 1) * hw].iter_mut().zip(plane) {
            *w |= u16::from(b) << shift;
        }
    }
    Ok(words)
}

/// Encodes `g.samples` planes of `rows * cols` words (as [`decode_frame`]
/// returns them) into one RLE frame.
pub(super) fn encode_frame(words: &[u16], g: Geometry) -> Result<Vec<u8>, String> {
    let hw = g.plane();
    let segments = g.segments();
    if segments > MAX_SEGMENTS || words.len() != g.samples * hw || g.cols == 0 {
        return Err(format!(
            "cannot RLE-encode {} words as {} sample(s) of {}x{} in {} byte(s)",
            words.len(),
            g.samples,
            g.rows,
            g.cols,
            g.bytes_per_sample
        ));
    }
    let mut out = vec![0u8; HEADER_LEN];
    out[..4].copy_from_slice(&(segments as u32).to_le_bytes());
    let mut plane = vec![0u8; hw];
    for s in 0..segments {
        let offset = u32::try_from(out.len()).map_err(|_| "RLE frame over 4 GiB".to_string())?;
        out[4 * (1 + s)..4 * (2 + s)].copy_from_slice(&offset.to_le_bytes());
        let (c, shift) = g.segment(s);
        for (b, &w) in plane.iter_mut().zip(&words[c * hw..(c + 1) * hw]) {
            *b = (w >> shift) as u8;
        }
        for row in plane.chunks(g.cols) {
            pack_bits(row, &mut out);
        }
        if out.len() % 2 == 1 {
            out.push(0);
        }
    }
    Ok(out)
}

/// PackBits-decodes `n` bytes from `segment` (trailing padding ignored).
fn unpack_bits(segment: &[u8], n: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while out.len() < n {
        let Some(&h) = segment.get(i) else {
            return Err(format!("ends after {} of {n} bytes", out.len()));
        };
        i += 1;
        match h {
            0..=127 => {
                let len = usize::from(h) + 1;
                let lit = segment
                    .get(i..i + len)
                    .ok_or_else(|| format!("literal run of {len} past the end at byte {i}"))?;
                out.extend_from_slice(lit);
                i += len;
            }
            128 => {}
            _ => {
                let len = 257 - usize::from(h);
                let &b = segment
                    .get(i)
                    .ok_or_else(|| format!("replicate run without its byte at byte {i}"))?;
                out.extend(std::iter::repeat_n(b, len));
                i += 1;
            }
        }
    }
    if out.len() > n {
        return Err(format!(
            "a run overflows the plane ({} > {n} bytes)",
            out.len()
        ));
    }
    Ok(out)
}

/// Appends the PackBits encoding of `row`: replicate runs of 2..=128
/// equal bytes, literal runs of up to 128 others.
fn pack_bits(row: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < row.len() {
        let run = row[i..]
            .iter()
            .take(128)
            .take_while(|&&b| b == row[i])
            .count();
        if run >= 2 {
            out.push((257 - run) as u8);
            out.push(row[i]);
            i += run;
            continue;
        }
        // A literal run stops before the next pair of equal bytes.
        let start = i;
        while i < row.len() && i - start < 128 && !(i + 1 < row.len() && row[i] == row[i + 1]) {
            i += 1;
        }
        out.push((i - start - 1) as u8);
        out.extend_from_slice(&row[start..i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64, levels: u64) -> Vec<u16> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) % levels) as u16
            })
            .collect()
    }

    #[test]
    fn frames_round_trip_for_every_layout() {
        for (rows, cols, samples, bps, levels) in [
            (7, 5, 1, 1, 256),
            (64, 64, 1, 2, 65536),
            (3, 300, 3, 1, 4), // long replicate and literal runs, three planes
            (1, 1, 1, 2, 2),
        ] {
            let mut words = lcg(rows * cols * samples, rows as u64, levels);
            // Runs longer than 128 and a row-crossing run of one value.
            for w in words.iter_mut().take(200.min(rows * cols)) {
                *w = 7;
            }
            let g = Geometry {
                rows,
                cols,
                samples,
                bytes_per_sample: bps,
            };
            let frame = encode_frame(&words, g).unwrap();
            assert_eq!(frame.len() % 2, 0);
            assert_eq!(
                decode_frame(&frame, g).unwrap(),
                words,
                "{rows}x{cols}x{samples} in {bps} byte(s)"
            );
        }
    }

    #[test]
    fn pack_bits_matches_the_standard_example() {
        // TIFF's PackBits example (the scheme Annex G uses).
        let row = [
            0xAA, 0xAA, 0xAA, 0x80, 0x00, 0x2A, 0xAA, 0xAA, 0xAA, 0xAA, 0x80, 0x00, 0x2A, 0x22,
            0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA,
        ];
        let mut packed = Vec::new();
        pack_bits(&row, &mut packed);
        assert_eq!(
            packed,
            [
                0xFE, 0xAA, 0x02, 0x80, 0x00, 0x2A, 0xFD, 0xAA, 0x03, 0x80, 0x00, 0x2A, 0x22, 0xF7,
                0xAA
            ]
        );
        assert_eq!(unpack_bits(&packed, row.len()).unwrap(), row);
    }

    #[test]
    fn malformed_frames_are_errors() {
        let words = lcg(16, 1, 256);
        let g = |samples| Geometry {
            rows: 4,
            cols: 4,
            samples,
            bytes_per_sample: 1,
        };
        let good = encode_frame(&words, g(1)).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..10].to_vec(), "shorter than its 64-byte header"),
            (
                {
                    let mut f = good[..HEADER_LEN].to_vec();
                    f.extend([0x00, 5]); // one literal byte of 16
                    f
                },
                "ends after 1 of 16",
            ),
            (
                {
                    let mut f = good.clone();
                    f[0] = 2;
                    f
                },
                "need 1",
            ),
            (
                {
                    let mut f = good.clone();
                    f[4..8].copy_from_slice(&9000u32.to_le_bytes());
                    f
                },
                "spans bytes",
            ),
            (
                {
                    let mut f = good[..HEADER_LEN].to_vec();
                    f.extend([0x7F, 1]); // a 128-byte literal with one byte
                    f
                },
                "past the end",
            ),
        ];
        for (frame, needle) in cases {
            let err = decode_frame(&frame, g(1)).unwrap_err();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
        assert!(encode_frame(&words, g(2)).is_err());
    }
}
