//! A node's saved state as a delta over its template: QEMU's migration
//! stream of the node, less the pages of its RAM that still hold what the
//! template's RAM file holds.
//!
//! A node restored from a template maps the template's RAM file privately,
//! so its RAM is not left out of a migration as the template's own was
//! (`x-ignore-shared` leaves out shared mappings only): the stream carries
//! every page. Restored into a QEMU that maps the same file privately, a
//! stream without the pages equal to the file's gives the same RAM, and a
//! node that changed a tenth of its memory is saved in a tenth of the
//! room; the restored node shares the rest with its template's other
//! nodes through the page cache.
//!
//! The stream is read as far as QEMU's RAM sections go, which is all this
//! module knows of QEMU's format: the header and the configuration
//! section, then RAM's setup (its blocks), its page records (a page, or a
//! page of one repeated byte) up to each section's end, commands between
//! sections; from the first device section on, the rest is copied as it
//! is. A live migration sends a page again when the guest wrote it after
//! it was sent: a page is left out only if it was not sent before, so that
//! the last copy sent is the one that counts. Page records are written
//! with their block's name each time, never as continuations, since the
//! record they would continue may have been left out. Anything else in the
//! stream (another iterable section, a compressed page, a capability that
//! changes the records) stops the save with what was found; QEMU's version
//! is part of a saved node's key, so a stream is only read back by the
//! QEMU that wrote it.

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::FileExt;

/// The only page size of the guests vmrig runs (x86_64).
const PAGE: usize = 4096;

/// Stream markers (QEMU's `migration/savevm.c`).
const FILE_MAGIC: &[u8; 4] = b"QEVM";
const FILE_VERSION: u32 = 3;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
const SECTION_FOOTER: u8 = 0x7e;
const EOF: u8 = 0x1f;

/// Page record flags (QEMU's `migration/ram.h`).
const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAG_MULTIFD_FLUSH: u64 = 0x200;
const FLAGS: u64 = PAGE as u64 - 1;

/// How much of a stream a delta kept and left out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeltaStats {
    /// Page records written.
    pub pages_kept: u64,
    /// Page records left out: the template's page was the same.
    pub pages_left_out: u64,
}

/// Why a stream could not be made a delta.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// Reading the stream, the template's RAM, or writing the delta failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The stream holds something this module does not read.
    #[error("QEMU's migration stream holds what vmrig does not read: {0}")]
    Format(String),
}

fn format_error<T>(what: impl Into<String>) -> Result<T, DeltaError> {
    Err(DeltaError::Format(what.into()))
}

/// Copies migration stream `input` to `output`, leaving out the pages of
/// RAM block `block` that equal the same page of `base` (the template's
/// RAM file, as long as the block).
pub fn write_delta(input: impl Read, base: &File, block: &str, output: impl Write) -> Result<DeltaStats, DeltaError> {
    let mut delta = Delta {
        input: io::BufReader::with_capacity(1 << 20, input),
        output: io::BufWriter::with_capacity(1 << 20, output),
        base,
        block: block.to_string(),
        sent: Vec::new(),
        last_block: String::new(),
        stats: DeltaStats::default(),
    };
    delta.run()?;
    delta.output.flush()?;
    Ok(delta.stats)
}

struct Delta<'a, R, W: Write> {
    input: io::BufReader<R>,
    output: io::BufWriter<W>,
    base: &'a File,
    block: String,
    /// One bit per page of the block: whether a copy of it was written.
    sent: Vec<u64>,
    /// The block of the last page record read: a record may continue it,
    /// even in the next section.
    last_block: String,
    stats: DeltaStats,
}

impl<R: Read, W: Write> Delta<'_, R, W> {
    fn run(&mut self) -> Result<(), DeltaError> {
        if &self.copy(4)?[..] != FILE_MAGIC || self.copy_u32()? != FILE_VERSION {
            return format_error("no QEMU migration stream of version 3");
        }
        let ignore_shared = self.configuration()?;
        let mut ram_section = None;
        loop {
            let kind = self.copy(1)?[0];
            match kind {
                SECTION_START => {
                    let (id, name) = self.section_header()?;
                    if name != "ram" {
                        return format_error(format!("an iterable section `{name}` besides RAM"));
                    }
                    ram_section = Some(id);
                    self.ram_setup(ignore_shared)?;
                    self.page_records()?;
                    self.footer(id)?;
                }
                SECTION_PART | SECTION_END => {
                    let id = self.copy_u32()?;
                    if Some(id) != ram_section {
                        return format_error(format!("a part of section {id}, which is not RAM's"));
                    }
                    self.page_records()?;
                    self.footer(id)?;
                }
                COMMAND => {
                    self.copy(2)?;
                    let length = self.copy_u16()?;
                    self.copy(usize::from(length))?;
                }
                // The devices' state and the end: kept as they are.
                SECTION_FULL | EOF => {
                    io::copy(&mut self.input, &mut self.output)?;
                    return if ram_section.is_some() { Ok(()) } else { format_error("no RAM section") };
                }
                other => return format_error(format!("a section of kind {other:#x} among RAM's")),
            }
        }
    }

    /// The configuration section: the machine's name and the subsections
    /// QEMU may add; whether `x-ignore-shared` is on (RAM's setup then
    /// gives each block's address).
    fn configuration(&mut self) -> Result<bool, DeltaError> {
        if self.copy(1)?[0] != CONFIGURATION {
            return format_error("no configuration section");
        }
        let length = self.copy_u32()? as usize;
        self.copy(length)?;
        let mut ignore_shared = false;
        while self.peek()? == Some(SUBSECTION) {
            self.copy(1)?;
            let name = self.copy_name()?;
            self.copy_u32()?;
            match name.as_str() {
                "configuration/capabilities" => {
                    for _ in 0..self.copy_u32()? {
                        match self.copy_name()?.as_str() {
                            "x-ignore-shared" => ignore_shared = true,
                            other => return format_error(format!("the capability `{other}`")),
                        }
                    }
                }
                "configuration/target-page-bits" => drop(self.copy_u32()?),
                "configuration/uuid" => drop(self.copy(16)?),
                other => return format_error(format!("the configuration subsection `{other}`")),
            }
        }
        Ok(ignore_shared)
    }

    /// A section's id and name; its instance and version are copied.
    fn section_header(&mut self) -> Result<(u32, String), DeltaError> {
        let id = self.copy_u32()?;
        let name = self.copy_name()?;
        self.copy(8)?;
        Ok((id, name))
    }

    /// RAM's setup: the total size, then each block's name and size (and
    /// address, with `x-ignore-shared`) until the sizes add up.
    fn ram_setup(&mut self, ignore_shared: bool) -> Result<(), DeltaError> {
        let first = self.copy_u64()?;
        if first & FLAG_MEM_SIZE == 0 {
            return format_error("RAM's setup without its size");
        }
        let total = first & !FLAGS;
        let mut listed = 0;
        while listed < total {
            let name = self.copy_name()?;
            let length = self.copy_u64()?;
            if ignore_shared {
                self.copy_u64()?;
            }
            if name == self.block {
                let base_length = self.base.metadata()?.len();
                if base_length != length {
                    return format_error(format!("RAM block `{name}` is {length} bytes, the template's RAM file {base_length}"));
                }
                self.sent = vec![0; (length as usize / PAGE).div_ceil(64)];
            }
            listed += length;
        }
        if self.sent.is_empty() {
            return format_error(format!("no RAM block `{}`", self.block));
        }
        Ok(())
    }

    /// Page records up to the end of the section, each written or left
    /// out.
    fn page_records(&mut self) -> Result<(), DeltaError> {
        let mut page = vec![0u8; PAGE];
        loop {
            let word = self.read_u64()?;
            let (flags, offset) = (word & FLAGS, word & !FLAGS);
            if flags & FLAG_EOS != 0 || flags == FLAG_MULTIFD_FLUSH {
                self.output.write_all(&word.to_be_bytes())?;
                if flags & FLAG_EOS != 0 {
                    return Ok(());
                }
                continue;
            }
            if flags & FLAG_CONTINUE == 0 {
                self.last_block = self.read_name()?;
            } else if self.last_block.is_empty() {
                return format_error("a page record continuing no block");
            }
            let in_block = self.last_block == self.block;
            let payload = match flags & !FLAG_CONTINUE {
                FLAG_ZERO => {
                    let fill = self.read_exact(1)?[0];
                    page.fill(fill);
                    1
                }
                FLAG_PAGE => {
                    self.input.read_exact(&mut page)?;
                    PAGE
                }
                other => return format_error(format!("a page record with flags {other:#x}")),
            };
            if in_block && self.equals_base(offset, &page)? {
                self.stats.pages_left_out += 1;
                continue;
            }
            if in_block {
                let index = offset as usize / PAGE;
                self.sent[index / 64] |= 1 << (index % 64);
            }
            self.output.write_all(&(word & !FLAG_CONTINUE).to_be_bytes())?;
            self.output.write_all(&[self.last_block.len() as u8])?;
            self.output.write_all(self.last_block.as_bytes())?;
            self.output.write_all(&page[..payload])?;
            self.stats.pages_kept += 1;
        }
    }

    /// Whether the page at `offset` of the block was never sent and the
    /// template holds `page` there.
    fn equals_base(&self, offset: u64, page: &[u8]) -> Result<bool, DeltaError> {
        let index = offset as usize / PAGE;
        let Some(word) = self.sent.get(index / 64) else {
            return format_error(format!("a page at {offset:#x}, past the end of RAM block `{}`", self.block));
        };
        if word & (1 << (index % 64)) != 0 {
            return Ok(false);
        }
        let mut base = [0u8; PAGE];
        self.base.read_exact_at(&mut base, offset)?;
        Ok(base[..] == *page)
    }

    /// A section footer, when QEMU writes them.
    fn footer(&mut self, id: u32) -> Result<(), DeltaError> {
        if self.peek()? == Some(SECTION_FOOTER) {
            self.copy(1)?;
            if self.copy_u32()? != id {
                return format_error("a section footer naming another section");
            }
        }
        Ok(())
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        Ok(self.input.fill_buf()?.first().copied())
    }

    fn read_exact(&mut self, count: usize) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; count];
        self.input.read_exact(&mut bytes)?;
        Ok(bytes)
    }

    fn read_u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_be_bytes(self.read_exact(8)?.try_into().expect("eight bytes")))
    }

    fn read_name(&mut self) -> io::Result<String> {
        let length = self.read_exact(1)?[0];
        Ok(String::from_utf8_lossy(&self.read_exact(usize::from(length))?).into_owned())
    }

    /// Reads `count` bytes and writes them on.
    fn copy(&mut self, count: usize) -> io::Result<Vec<u8>> {
        let bytes = self.read_exact(count)?;
        self.output.write_all(&bytes)?;
        Ok(bytes)
    }

    fn copy_u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_be_bytes(self.copy(2)?.try_into().expect("two bytes")))
    }

    fn copy_u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_be_bytes(self.copy(4)?.try_into().expect("four bytes")))
    }

    fn copy_u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_be_bytes(self.copy(8)?.try_into().expect("eight bytes")))
    }

    fn copy_name(&mut self) -> io::Result<String> {
        let length = self.copy(1)?[0];
        Ok(String::from_utf8_lossy(&self.copy(usize::from(length))?).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes migration streams as QEMU does, as far as this module reads
    /// them.
    #[derive(Default)]
    struct Stream(Vec<u8>);

    impl Stream {
        fn header(capabilities: &[&str]) -> Self {
            let mut s = Self::default();
            s.0.extend_from_slice(FILE_MAGIC);
            s.u32(FILE_VERSION);
            s.0.push(CONFIGURATION);
            s.u32(7);
            s.0.extend_from_slice(b"microvm");
            if !capabilities.is_empty() {
                s.0.push(SUBSECTION);
                s.name("configuration/capabilities");
                s.u32(1);
                s.u32(capabilities.len() as u32);
                for capability in capabilities {
                    s.name(capability);
                }
            }
            s
        }

        fn u32(&mut self, value: u32) {
            self.0.extend_from_slice(&value.to_be_bytes());
        }

        fn u64(&mut self, value: u64) {
            self.0.extend_from_slice(&value.to_be_bytes());
        }

        fn name(&mut self, name: &str) {
            self.0.push(name.len() as u8);
            self.0.extend_from_slice(name.as_bytes());
        }

        /// RAM's setup with `blocks` (name, size), with addresses.
        fn ram_start(&mut self, blocks: &[(&str, u64)]) {
            self.0.push(SECTION_START);
            self.u32(2);
            self.name("ram");
            self.u32(0);
            self.u32(4);
            self.u64(blocks.iter().map(|b| b.1).sum::<u64>() | FLAG_MEM_SIZE);
            for (name, size) in blocks {
                self.name(name);
                self.u64(*size);
                self.u64(0);
            }
            self.u64(FLAG_EOS);
            self.footer();
        }

        fn footer(&mut self) {
            self.0.push(SECTION_FOOTER);
            self.u32(2);
        }

        /// A page of `byte`s at page `index` of `block` (`None`: continuing).
        fn page(&mut self, block: Option<&str>, index: u64, byte: u8) {
            let offset = index * PAGE as u64;
            match block {
                Some(name) => {
                    self.u64(offset | FLAG_PAGE);
                    self.name(name);
                }
                None => self.u64(offset | FLAG_PAGE | FLAG_CONTINUE),
            }
            self.0.extend_from_slice(&[byte; PAGE]);
        }

        fn zero(&mut self, block: &str, index: u64) {
            self.u64((index * PAGE as u64) | FLAG_ZERO);
            self.name(block);
            self.0.push(0);
        }

        fn part(&mut self, kind: u8) {
            self.0.push(kind);
            self.u32(2);
        }

        fn end_of_section(&mut self) {
            self.u64(FLAG_EOS);
            self.footer();
        }

        /// The devices and the end, which are never looked into.
        fn devices(&mut self) {
            self.0.push(SECTION_FULL);
            self.0.extend_from_slice(b"\x00\x00\x00\x03\x05timer anything at all");
            self.0.push(EOF);
        }
    }

    /// A template RAM file of `pages` pages, page `i` filled with `fill(i)`.
    fn base(pages: u64, fill: impl Fn(u64) -> u8) -> (tempfile::NamedTempFile, File) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for index in 0..pages {
            file.write_all(&[fill(index); PAGE]).unwrap();
        }
        let reopened = file.reopen().unwrap();
        (file, reopened)
    }

    /// Restores `stream` as QEMU would into RAM that starts as `base`:
    /// the page records, applied in order, over the file's pages.
    fn restore(stream: &[u8], base: &File, pages: u64) -> Vec<u8> {
        let mut ram = vec![0u8; pages as usize * PAGE];
        base.read_exact_at(&mut ram, 0).unwrap();
        let header = Stream::header(&["x-ignore-shared"]).0.len();
        let mut at = header + 1 + 4 + 4 + 8;
        let take = |at: &mut usize, n: usize| {
            *at += n;
            &stream[*at - n..*at]
        };
        let setup = u64::from_be_bytes(take(&mut at, 8).try_into().unwrap()) & !FLAGS;
        let mut listed = 0;
        while listed < setup {
            let length = take(&mut at, 1)[0] as usize;
            take(&mut at, length);
            listed += u64::from_be_bytes(take(&mut at, 8).try_into().unwrap());
            take(&mut at, 8);
        }
        let mut block = String::new();
        loop {
            let word = u64::from_be_bytes(take(&mut at, 8).try_into().unwrap());
            if word & FLAG_EOS != 0 {
                take(&mut at, 5);
                match stream[at] {
                    SECTION_PART | SECTION_END => {
                        take(&mut at, 5);
                        continue;
                    }
                    _ => return ram,
                }
            }
            if word & FLAG_CONTINUE == 0 {
                let length = take(&mut at, 1)[0] as usize;
                block = String::from_utf8(take(&mut at, length).to_vec()).unwrap();
            }
            let offset = (word & !FLAGS) as usize;
            let page = if word & FLAG_ZERO != 0 { vec![take(&mut at, 1)[0]; PAGE] } else { take(&mut at, PAGE).to_vec() };
            if block == "ram" {
                ram[offset..offset + PAGE].copy_from_slice(&page);
            }
        }
    }

    #[test]
    fn pages_the_template_holds_are_left_out_and_the_rest_restores_the_same_memory() {
        let (_file, base) = base(8, |i| if i < 4 { i as u8 + 1 } else { 0 });
        let mut stream = Stream::header(&["x-ignore-shared"]);
        stream.ram_start(&[("ram", 8 * PAGE as u64), ("pc.bios", PAGE as u64)]);
        stream.part(SECTION_PART);
        stream.page(Some("ram"), 0, 1); // as the template: left out
        stream.page(None, 1, 9); // changed, and continuing a record left out
        stream.zero("ram", 2); // zeroed where the template had data
        stream.zero("ram", 4); // zero as in the template: left out
        stream.page(Some("pc.bios"), 0, 1); // another block: always kept
        stream.page(Some("ram"), 5, 7);
        stream.end_of_section();
        stream.part(SECTION_END);
        // Sent again after the guest wrote it back as the template had it:
        // this copy counts, and must be kept; a section may begin by
        // continuing the last block of the one before.
        stream.page(None, 1, 2);
        stream.page(None, 3, 4); // first sent now, as the template: left out
        stream.end_of_section();
        stream.devices();

        let mut delta = Vec::new();
        let stats = write_delta(&stream.0[..], &base, "ram", &mut delta).unwrap();
        assert_eq!(stats, DeltaStats { pages_kept: 5, pages_left_out: 3 });
        assert!(delta.len() < stream.0.len() - 2 * PAGE, "{} of {}", delta.len(), stream.0.len());
        assert!(delta.ends_with(b"timer anything at all\x1f"), "the devices are copied as they are");

        let mut expected = vec![0u8; 8 * PAGE];
        base.read_exact_at(&mut expected, 0).unwrap();
        for (index, byte) in [(1, 2u8), (2, 0), (5, 7)] {
            expected[index * PAGE..(index + 1) * PAGE].fill(byte);
        }
        assert!(restore(&stream.0, &base, 8) == expected, "the whole stream restores the node's memory");
        assert!(restore(&delta, &base, 8) == expected, "the delta restores the same memory");
    }

    #[test]
    fn what_it_cannot_read_stops_it_with_what_was_found() {
        let (_file, base) = base(2, |_| 0);
        let failure = |stream: Stream| match write_delta(&stream.0[..], &base, "ram", io::sink()) {
            Err(DeltaError::Format(what)) => what,
            other => panic!("{other:?}"),
        };
        let mut mapped = Stream::header(&["mapped-ram"]);
        mapped.ram_start(&[("ram", 2 * PAGE as u64)]);
        assert_eq!(failure(mapped), "the capability `mapped-ram`");

        let mut other_size = Stream::header(&["x-ignore-shared"]);
        other_size.ram_start(&[("ram", 4 * PAGE as u64)]);
        assert!(failure(other_size).contains("the template's RAM file 8192"));

        let mut compressed = Stream::header(&["x-ignore-shared"]);
        compressed.ram_start(&[("ram", 2 * PAGE as u64)]);
        compressed.part(SECTION_PART);
        compressed.u64(0x100);
        compressed.name("ram");
        assert_eq!(failure(compressed), "a page record with flags 0x100");

        let mut no_block = Stream::header(&["x-ignore-shared"]);
        no_block.ram_start(&[("mem", 2 * PAGE as u64)]);
        assert_eq!(failure(no_block), "no RAM block `ram`");
    }
}
