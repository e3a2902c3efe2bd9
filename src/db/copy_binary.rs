//! A streaming decoder for PostgreSQL's binary COPY format (`COPY … TO STDOUT (FORMAT binary)`).
//!
//! The stream is a header (`PGCOPY\n\xff\r\n\0`, flags, extension), then one tuple per row (an i16
//! field count, then per field an i32 length, −1 for NULL, and the bytes), then the trailer (field
//! count −1). Chunks may split a tuple anywhere; the decoder carries the unfinished tail over, and
//! hands each complete row to a callback as borrowed field slices, without allocating per row.

use anyhow::{Context, bail, ensure};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Decoder state across chunks.
pub struct CopyBinaryDecoder {
    carry: Vec<u8>,
    header_done: bool,
    finished: bool,
    columns: usize,
    /// Field ranges of the current row, reused (`None` = NULL).
    fields: Vec<Option<(usize, usize)>>,
    rows: u64,
}

/// One row's fields, borrowed from the decoder's buffer.
pub struct Row<'a> {
    data: &'a [u8],
    fields: &'a [Option<(usize, usize)>],
}

impl<'a> Row<'a> {
    /// Raw bytes of column `i`, `None` for NULL.
    pub fn raw(&self, i: usize) -> Option<&'a [u8]> {
        self.fields[i].map(|(start, len)| &self.data[start..start + len])
    }

    pub fn text(&self, i: usize) -> anyhow::Result<Option<&'a str>> {
        self.raw(i).map(|b| std::str::from_utf8(b).context("column is not UTF-8")).transpose()
    }

    pub fn f64(&self, i: usize) -> anyhow::Result<Option<f64>> {
        self.raw(i)
            .map(|b| {
                Ok(f64::from_be_bytes(
                    b.try_into().map_err(|_| anyhow::anyhow!("float8 column has {} bytes", b.len()))?,
                ))
            })
            .transpose()
    }

    /// A one-dimensional `text[]` column: `None` for NULL, its non-NULL elements otherwise (NULL
    /// elements are skipped). PostgreSQL's binary array: ndim, has-null flag, element type, then
    /// per dimension its length and lower bound, then each element as a length-prefixed value.
    pub fn text_array(&self, i: usize) -> anyhow::Result<Option<Vec<&'a str>>> {
        let Some(b) = self.raw(i) else { return Ok(None) };
        let int = |at: usize| read_i32(b, at).ok_or_else(|| anyhow::anyhow!("array column truncated at byte {at}"));
        let dims = int(0)?;
        if dims == 0 {
            return Ok(Some(Vec::new()));
        }
        anyhow::ensure!(dims == 1, "array column has {dims} dimensions; one was expected");
        let count = usize::try_from(int(12)?).map_err(|_| anyhow::anyhow!("array column has a negative length"))?;
        let mut at = 20;
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let len = int(at)?;
            at += 4;
            if len < 0 {
                continue;
            }
            let element = b.get(at..at + len as usize).ok_or_else(|| anyhow::anyhow!("array element truncated"))?;
            out.push(std::str::from_utf8(element).context("array element is not UTF-8")?);
            at += len as usize;
        }
        anyhow::ensure!(at == b.len(), "{} bytes after the array's last element", b.len() - at);
        Ok(Some(out))
    }

    /// A `timestamp` (without time zone, taken as UTC) in milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self, i: usize) -> anyhow::Result<Option<i64>> {
        // PostgreSQL's binary timestamp: i64 microseconds since 2000-01-01T00:00:00.
        const POSTGRES_EPOCH_MS: i64 = 946_684_800_000;
        self.raw(i)
            .map(|b| {
                let micros = i64::from_be_bytes(
                    b.try_into().map_err(|_| anyhow::anyhow!("timestamp column has {} bytes", b.len()))?,
                );
                Ok(POSTGRES_EPOCH_MS + micros.div_euclid(1000))
            })
            .transpose()
    }
}

impl CopyBinaryDecoder {
    /// A decoder for rows of exactly `columns` fields.
    pub fn new(columns: usize) -> Self {
        Self {
            carry: Vec::new(),
            header_done: false,
            finished: false,
            columns,
            fields: Vec::with_capacity(columns),
            rows: 0,
        }
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Decodes every complete row in `chunk` (plus what earlier chunks left over).
    pub fn feed(&mut self, chunk: &[u8], mut on_row: impl FnMut(Row<'_>) -> anyhow::Result<()>) -> anyhow::Result<()> {
        if self.carry.is_empty() {
            let used = self.decode(chunk, &mut on_row)?;
            self.carry.extend_from_slice(&chunk[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.carry);
            buf.extend_from_slice(chunk);
            let used = self.decode(&buf, &mut on_row)?;
            buf.drain(..used);
            self.carry = buf;
        }
        Ok(())
    }

    /// Checks that the stream ended with the trailer and nothing after it.
    pub fn finish(&self) -> anyhow::Result<()> {
        ensure!(self.finished, "COPY stream ended without its trailer ({} bytes left)", self.carry.len());
        ensure!(self.carry.is_empty(), "{} bytes after the COPY trailer", self.carry.len());
        Ok(())
    }

    /// Decodes complete units from `buf`; returns how many bytes were consumed.
    fn decode(&mut self, buf: &[u8], on_row: &mut impl FnMut(Row<'_>) -> anyhow::Result<()>) -> anyhow::Result<usize> {
        let mut pos = 0;
        if !self.header_done {
            if buf.len() < 19 {
                return Ok(0);
            }
            ensure!(&buf[..11] == SIGNATURE, "not a binary COPY stream");
            let extension = u32::from_be_bytes(buf[15..19].try_into().expect("4 bytes")) as usize;
            if buf.len() < 19 + extension {
                return Ok(0);
            }
            pos = 19 + extension;
            self.header_done = true;
        }
        while !self.finished {
            let Some(count) = read_i16(buf, pos) else { break };
            if count == -1 {
                self.finished = true;
                pos += 2;
                break;
            }
            ensure!(count as usize == self.columns, "COPY row has {count} fields, expected {}", self.columns);
            let mut p = pos + 2;
            self.fields.clear();
            let mut complete = true;
            for _ in 0..self.columns {
                let Some(len) = read_i32(buf, p) else {
                    complete = false;
                    break;
                };
                p += 4;
                if len < 0 {
                    self.fields.push(None);
                    continue;
                }
                let len = len as usize;
                if buf.len() < p + len {
                    complete = false;
                    break;
                }
                self.fields.push(Some((p, len)));
                p += len;
            }
            if !complete {
                break;
            }
            on_row(Row { data: buf, fields: &self.fields })?;
            self.rows += 1;
            pos = p;
        }
        if self.finished && pos < buf.len() {
            bail!("{} bytes after the COPY trailer", buf.len() - pos);
        }
        Ok(pos)
    }
}

fn read_i16(buf: &[u8], at: usize) -> Option<i16> {
    buf.get(at..at + 2).map(|b| i16::from_be_bytes(b.try_into().expect("2 bytes")))
}

fn read_i32(buf: &[u8], at: usize) -> Option<i32> {
    buf.get(at..at + 4).map(|b| i32::from_be_bytes(b.try_into().expect("4 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary COPY stream of (text, float8, timestamp) rows, built by hand.
    fn stream(rows: &[(Option<&str>, Option<f64>, i64)]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend(0i32.to_be_bytes()); // flags
        out.extend(0i32.to_be_bytes()); // no extension
        for (text, float, micros) in rows {
            out.extend(3i16.to_be_bytes());
            match text {
                Some(t) => {
                    out.extend((t.len() as i32).to_be_bytes());
                    out.extend(t.as_bytes());
                }
                None => out.extend((-1i32).to_be_bytes()),
            }
            match float {
                Some(f) => {
                    out.extend(8i32.to_be_bytes());
                    out.extend(f.to_be_bytes());
                }
                None => out.extend((-1i32).to_be_bytes()),
            }
            out.extend(8i32.to_be_bytes());
            out.extend(micros.to_be_bytes());
        }
        out.extend((-1i16).to_be_bytes());
        out
    }

    fn decode_in_chunks(bytes: &[u8], chunk: usize) -> Vec<(Option<String>, Option<f64>, i64)> {
        let mut dec = CopyBinaryDecoder::new(3);
        let mut rows = Vec::new();
        for part in bytes.chunks(chunk) {
            dec.feed(part, |r| {
                rows.push((r.text(0)?.map(String::from), r.f64(1)?, r.timestamp_ms(2)?.unwrap()));
                Ok(())
            })
            .unwrap();
        }
        dec.finish().unwrap();
        rows
    }

    #[test]
    fn decodes_rows_split_at_every_possible_boundary() {
        // 2026-01-01T00:00:00.123Z = 820_540_800_123_000 µs after 2000-01-01.
        let rows = [(Some("a-ü"), Some(1.5), 820_540_800_123_000), (None, None, 0), (Some(""), Some(f64::NAN), -1_000)];
        let bytes = stream(&rows);
        for chunk in 1..=bytes.len() {
            let got = decode_in_chunks(&bytes, chunk);
            assert_eq!(got.len(), 3, "chunk {chunk}");
            assert_eq!(got[0].0.as_deref(), Some("a-ü"));
            assert_eq!(got[0].1, Some(1.5));
            assert_eq!(got[0].2, 1_767_225_600_123);
            assert_eq!((got[1].0.as_deref(), got[1].1, got[1].2), (None, None, 946_684_800_000));
            assert!(got[2].1.unwrap().is_nan());
            assert_eq!(got[2].2, 946_684_799_999, "pre-2000 instants round down");
        }
    }

    #[test]
    fn rejects_truncated_streams_and_wrong_shapes() {
        let bytes = stream(&[(Some("x"), Some(1.0), 0)]);
        let mut dec = CopyBinaryDecoder::new(3);
        dec.feed(&bytes[..bytes.len() - 2], |_| Ok(())).unwrap();
        assert!(dec.finish().is_err(), "no trailer");
        let mut dec = CopyBinaryDecoder::new(2);
        assert!(dec.feed(&bytes, |_| Ok(())).is_err(), "three fields where two were expected");
        let mut dec = CopyBinaryDecoder::new(3);
        assert!(dec.feed(b"COPY? no, this is text at all", |_| Ok(())).is_err());
    }

    /// PostgreSQL's binary form of a one-dimensional text[] (NULL elements as `None`).
    fn text_array_bytes(elements: &[Option<&str>]) -> Vec<u8> {
        let mut out = Vec::new();
        if elements.is_empty() {
            out.extend(0i32.to_be_bytes()); // no dimensions
            out.extend(0i32.to_be_bytes());
            out.extend(25u32.to_be_bytes()); // text
            return out;
        }
        out.extend(1i32.to_be_bytes());
        out.extend(i32::from(elements.iter().any(Option::is_none)).to_be_bytes());
        out.extend(25u32.to_be_bytes());
        out.extend((elements.len() as i32).to_be_bytes());
        out.extend(1i32.to_be_bytes()); // lower bound
        for e in elements {
            match e {
                Some(t) => {
                    out.extend((t.len() as i32).to_be_bytes());
                    out.extend(t.as_bytes());
                }
                None => out.extend((-1i32).to_be_bytes()),
            }
        }
        out
    }

    fn decode_array(bytes: Option<&[u8]>) -> anyhow::Result<Option<Vec<String>>> {
        let fields = [bytes.map(|b| (0, b.len()))];
        let row = Row { data: bytes.unwrap_or_default(), fields: &fields };
        Ok(row.text_array(0)?.map(|v| v.into_iter().map(String::from).collect()))
    }

    #[test]
    fn text_arrays_decode_with_null_and_empty_and_null_elements() {
        let two = text_array_bytes(&[Some("Daft Punk"), Some("Pharrell Williams")]);
        assert_eq!(decode_array(Some(&two)).unwrap(), Some(vec!["Daft Punk".into(), "Pharrell Williams".into()]));
        assert_eq!(decode_array(Some(&text_array_bytes(&[]))).unwrap(), Some(vec![]));
        assert_eq!(decode_array(None).unwrap(), None);
        let with_null = text_array_bytes(&[None, Some("Justice")]);
        assert_eq!(decode_array(Some(&with_null)).unwrap(), Some(vec!["Justice".into()]));
        assert!(decode_array(Some(&two[..two.len() - 1])).is_err(), "a truncated element is an error");
        let mut trailing = two.clone();
        trailing.push(0);
        assert!(decode_array(Some(&trailing)).is_err(), "bytes after the last element are an error");
        let mut two_dims = two.clone();
        two_dims[..4].copy_from_slice(&2i32.to_be_bytes());
        assert!(decode_array(Some(&two_dims)).is_err());
    }
}
