//! `vmrig shell`: a root shell on a node's pseudo-terminal, carried as a
//! tunnel connection ([`crate::tunnel::Target::Shell`]). What the guest
//! sends is what the terminal shows, as it comes; what the driver sends is
//! a sequence of [`ShellInput`] frames, so that a change of the window's
//! size travels in order with the keys typed around it.
//!
//! A frame is a kind byte then its body, big-endian: `0`, a `u32` length
//! and the keys' bytes; or `1`, the rows and the columns as two `u16`.

use std::io::{self, Read};

/// Most bytes of keys in one frame.
const KEYS_LIMIT: usize = 1 << 20;

/// One frame of what the person at `vmrig shell` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellInput {
    /// Bytes typed, Ctrl-C and the like included.
    Keys(Vec<u8>),
    /// The window now has this size.
    Resize {
        /// Lines.
        rows: u16,
        /// Columns.
        cols: u16,
    },
}

impl ShellInput {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Keys(keys) => {
                let length = u32::try_from(keys.len()).expect("keys are read in small pieces");
                let mut frame = Vec::with_capacity(5 + keys.len());
                frame.push(0);
                frame.extend_from_slice(&length.to_be_bytes());
                frame.extend_from_slice(keys);
                frame
            }
            Self::Resize { rows, cols } => {
                let mut frame = vec![1];
                frame.extend_from_slice(&rows.to_be_bytes());
                frame.extend_from_slice(&cols.to_be_bytes());
                frame
            }
        }
    }

    /// The next frame, or `None` where the input ends between frames.
    pub fn read(input: &mut impl Read) -> io::Result<Option<Self>> {
        let mut kind = [0u8; 1];
        if input.read(&mut kind)? == 0 {
            return Ok(None);
        }
        match kind[0] {
            0 => {
                let mut length = [0u8; 4];
                input.read_exact(&mut length)?;
                let length = u32::from_be_bytes(length) as usize;
                if length > KEYS_LIMIT {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {length} bytes of keys")));
                }
                let mut keys = vec![0; length];
                input.read_exact(&mut keys)?;
                Ok(Some(Self::Keys(keys)))
            }
            1 => {
                let mut size = [0u8; 4];
                input.read_exact(&mut size)?;
                Ok(Some(Self::Resize { rows: u16::from_be_bytes([size[0], size[1]]), cols: u16::from_be_bytes([size[2], size[3]]) }))
            }
            other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown shell frame kind {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back_as_written_and_the_input_ends_between_them() {
        let frames = [ShellInput::Resize { rows: 40, cols: 120 }, ShellInput::Keys(b"ls\r\x03".to_vec()), ShellInput::Keys(Vec::new())];
        let wire: Vec<u8> = frames.iter().flat_map(ShellInput::encode).collect();
        let mut reader = wire.as_slice();
        for frame in &frames {
            assert_eq!(ShellInput::read(&mut reader).unwrap().as_ref(), Some(frame));
        }
        assert_eq!(ShellInput::read(&mut reader).unwrap(), None);
        assert!(ShellInput::read(&mut [7u8].as_slice()).is_err());
        assert!(ShellInput::read(&mut [0u8, 0, 0].as_slice()).is_err(), "a frame cut short was taken");
    }
}
