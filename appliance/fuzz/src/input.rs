//! Reading a fuzz input as a sequence of small decisions and byte chunks, and
//! writing inputs in that shape (for the seeds).

/// A cursor over the fuzz input; reads past the end return nothing.
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { rest: data }
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(b)
    }

    /// A little-endian u16 (missing bytes read as 0).
    pub fn u16(&mut self) -> u16 {
        let lo = self.byte().unwrap_or(0);
        let hi = self.byte().unwrap_or(0);
        u16::from_le_bytes([lo, hi])
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (chunk, rest) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = rest;
        chunk
    }
}

/// Appends `bytes` as chunks of at most `u16::MAX` bytes, each preceded by `op` and
/// its little-endian length (the shape [`Input::byte`] + [`Input::u16`] +
/// [`Input::take`] reads).
pub fn put_chunks(out: &mut Vec<u8>, op: u8, bytes: &[u8]) {
    for chunk in bytes.chunks(usize::from(u16::MAX)) {
        out.push(op);
        out.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
        out.extend_from_slice(chunk);
    }
}
