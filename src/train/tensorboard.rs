//! Scalars for TensorBoard: an `events.out.tfevents.*` file in the run folder, written directly.
//!
//! The format is small and fixed: TFRecord framing (little-endian u64 length, masked CRC-32C of the
//! length, the bytes, masked CRC-32C of the bytes) around `tensorflow.Event` protobufs with `wall_time`
//! (1, double), `step` (2, int64), `file_version` (3), `summary` (5: repeated `Value` {`tag` (1),
//! `simple_value` (2, float)}) and `session_log` (7: `status` (1) = START, written when a run resumes, so
//! TensorBoard drops the points the interrupted session logged past the checkpoint, as `log.jsonl` does). The crates that
//! write it pull in protobuf code generation; these forty lines do not.

use anyhow::{Context, Result};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<std::fs::File>,
}

impl EventWriter {
    /// A new event file in `dir` (TensorBoard reads every event file of a folder, so each session of a
    /// resumed run gets its own); `resumed_at` marks a resumed session's first step.
    pub fn create(dir: &Path, resumed_at: Option<usize>) -> Result<Self> {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let path = dir.join(format!("events.out.tfevents.{secs}.alignfuse.{}", std::process::id()));
        let file = std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = EventWriter { path, file: BufWriter::new(file) };
        w.event(0, |e| string(e, 3, "brain.Event:2"))?;
        if let Some(step) = resumed_at {
            // TensorBoard drops the points at and after a START's step: the checkpoint's own are kept.
            w.event(step + 1, |e| message(e, 7, &field_varint(1, 1)))?;
        }
        w.file.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` holding the scalars `values` (tag, value); flushed, so a killed run keeps them.
    pub fn scalars<'a>(&mut self, step: usize, values: impl IntoIterator<Item = (&'a str, f64)>) -> Result<()> {
        let mut summary = vec![];
        for (tag, v) in values {
            let mut value = vec![];
            string(&mut value, 1, tag);
            value.push((2 << 3) | 5);
            value.extend((v as f32).to_le_bytes());
            message(&mut summary, 1, &value);
        }
        self.event(step, |e| message(e, 5, &summary))?;
        self.file.flush().with_context(|| format!("cannot write {}", self.path.display()))
    }

    fn event(&mut self, step: usize, body: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
        let mut e = vec![(1 << 3) | 1];
        e.extend(wall.to_le_bytes());
        e.extend(field_varint(2, step as u64));
        body(&mut e);
        let len = (e.len() as u64).to_le_bytes();
        for part in [&len[..], &masked_crc(&len).to_le_bytes(), &e, &masked_crc(&e).to_le_bytes()] {
            self.file.write_all(part).with_context(|| format!("cannot write {}", self.path.display()))?;
        }
        Ok(())
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_varint(field: u64, v: u64) -> Vec<u8> {
    let mut out = vec![];
    varint(&mut out, field << 3);
    varint(&mut out, v);
    out
}

fn message(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn string(out: &mut Vec<u8>, field: u64, s: &str) {
    message(out, field, s.as_bytes());
}

/// CRC-32C (Castagnoli), bitwise: event records are a few hundred bytes.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// TFRecord's masking of a CRC, so that CRCs of data holding CRCs stay well distributed.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    /// Reads the records back: framing, both CRCs, and the scalars' tags, steps and values.
    #[test]
    fn records_frame_and_decode() {
        let dir = std::env::temp_dir().join(format!("alignfuse-tb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = EventWriter::create(&dir, Some(7)).unwrap();
        w.scalars(8, [("loss", 2.5), ("itm/acc", 0.75)]).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut records = vec![];
        let mut at = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(masked_crc(&bytes[at..at + 8]), u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(masked_crc(data), crc);
            records.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(records.len(), 3, "file_version, session START, one summary");
        assert!(records[0].windows(13).any(|w| w == b"brain.Event:2"));
        assert!(records[1].ends_with(&[0x10, 8, 0x3a, 2, 0x08, 1]), "step 8, session_log {{status: START}}");
        let summary = &records[2];
        assert_eq!(&summary[9..11], &[0x10, 8], "step 8");
        let value = |tag: &str, v: f32| {
            let mut m = vec![];
            string(&mut m, 1, tag);
            m.push(0x15);
            m.extend(v.to_le_bytes());
            m
        };
        for (tag, v) in [("loss", 2.5f32), ("itm/acc", 0.75)] {
            assert!(summary.windows(value(tag, v).len()).any(|w| w == value(tag, v)), "{tag}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
