//! A minimal `.npy` writer (format version 1.0, little-endian, C order) for the `--export-dir`
//! files: f32, u32 and i64 arrays.

use std::io::Write;
use std::path::Path;

/// An element type of an `.npy` file: its NumPy type string and little-endian bytes.
pub(super) trait NpyElement: Copy {
    const DESCR: &'static str;
    fn put(self, out: &mut Vec<u8>);
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for u32 {
    const DESCR: &'static str = "<u4";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for i64 {
    const DESCR: &'static str = "<i8";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// An `.npy` (format version 1.0) file: the magic string, the version, a little-endian u16 header
/// length, a Python-literal header dict padded with spaces and ended by `\n` so that the data starts
/// at a multiple of 64 bytes, then the data in C order.
fn npy_bytes<T: NpyElement>(shape: &[usize], data: &[T]) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(shape.iter().product::<usize>() == data.len(), "shape {shape:?} does not hold {}", data.len());
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {dims}, }}", T::DESCR);
    let unpadded = 10 + header.len() + 1;
    header.extend(std::iter::repeat_n(' ', unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let header_len = u16::try_from(header.len())?;
    let mut out = Vec::with_capacity(10 + header.len() + std::mem::size_of_val(data));
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &v in data {
        v.put(&mut out);
    }
    Ok(out)
}

pub(super) fn write_npy<T: NpyElement>(path: &Path, shape: &[usize], data: &[T]) -> anyhow::Result<()> {
    let bytes = npy_bytes(shape, data)?;
    let mut file = std::fs::File::create(path)?;
    file.write_all(&bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_version_1_and_aligned() {
        let bytes = npy_bytes(&[2, 3], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"), "{header}");
        assert!(header.ends_with('\n'));
        assert_eq!(&bytes[10 + header_len..10 + header_len + 4], &1.0f32.to_le_bytes());
        assert_eq!(bytes.len(), 10 + header_len + 24);
        let one_d = npy_bytes(&[3], &[1u32, 2, 3]).unwrap();
        let h = u16::from_le_bytes([one_d[8], one_d[9]]) as usize;
        assert!(
            std::str::from_utf8(&one_d[10..10 + h])
                .unwrap()
                .starts_with("{'descr': '<u4', 'fortran_order': False, 'shape': (3,), }")
        );
        assert!(npy_bytes(&[2, 2], &[1.0f32]).is_err());
    }
}
