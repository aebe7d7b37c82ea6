//! Text on a node's screen, read by OCR: the screen QEMU saved made into a
//! few variants in-process, each read by tesseract, side by side.
//!
//! A virtual terminal is light text on black, and tesseract reads dark
//! text on a light page best, at a larger size than a console font's: the
//! variants are the screen in grey, enlarged with its contrast stretched;
//! that negated; and that made black and white.

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use ::image::imageops::{self, FilterType};
use ::image::{GrayImage, ImageFormat, Luma};

use crate::host::{HostError, TESSERACT};

/// How much each variant enlarges the screen: a console font's 16-pixel
/// cells become 32, near the size tesseract is trained on.
const SCALE: u32 = 2;

/// Errors reading a screen's text.
#[derive(Debug, thiserror::Error)]
pub enum OcrError {
    /// The screen could not be read or a variant written.
    #[error("cannot read the screen's image")]
    Image(#[from] ::image::ImageError),
    /// tesseract is missing.
    #[error(transparent)]
    Host(#[from] HostError),
    /// tesseract could not be run.
    #[error("cannot run tesseract")]
    Run(#[from] std::io::Error),
    /// tesseract failed.
    #[error("tesseract failed ({status}): {stderr}")]
    Failed {
        /// How it ended.
        status: String,
        /// What it printed.
        stderr: String,
    },
}

/// The variants of a screen (a PNG) that OCR reads, as PNGs.
pub fn variants(screen_png: &[u8]) -> Result<Vec<Vec<u8>>, OcrError> {
    let enlarged = enlarged(screen_png)?;
    let negated = negated(&enlarged);
    let mut black_and_white = negated.clone();
    for Luma([value]) in black_and_white.pixels_mut() {
        *value = if *value < 128 { 0 } else { 255 };
    }
    [enlarged, negated, black_and_white].iter().map(png).collect()
}

/// The text tesseract reads in the main variant of a screen (a PNG),
/// without making the others.
pub fn read_main(screen_png: &[u8]) -> Result<String, OcrError> {
    read(&png(&negated(&enlarged(screen_png)?))?)
}

/// The screen in grey, enlarged, its contrast stretched.
fn enlarged(screen_png: &[u8]) -> Result<GrayImage, OcrError> {
    let grey = ::image::load_from_memory(screen_png)?.to_luma8();
    let (width, height) = grey.dimensions();
    let mut enlarged = imageops::resize(&grey, width * SCALE, height * SCALE, FilterType::CatmullRom);
    stretch_contrast(&mut enlarged);
    Ok(enlarged)
}

fn negated(image: &GrayImage) -> GrayImage {
    let mut negated = image.clone();
    imageops::invert(&mut negated);
    negated
}

/// Spreads the image's grey levels over the whole range, darkest to black
/// and lightest to white.
fn stretch_contrast(image: &mut GrayImage) {
    let (low, high) = image.pixels().fold((u8::MAX, u8::MIN), |(low, high), Luma([v])| (low.min(*v), high.max(*v)));
    if high <= low {
        return;
    }
    let range = u32::from(high - low);
    for Luma([value]) in image.pixels_mut() {
        *value = u8::try_from(u32::from(*value - low) * 255 / range).expect("within 0..=255");
    }
}

fn png(image: &GrayImage) -> Result<Vec<u8>, OcrError> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, ImageFormat::Png)?;
    Ok(bytes.into_inner())
}

/// The text tesseract reads in one image (a PNG).
pub fn read(image_png: &[u8]) -> Result<String, OcrError> {
    let program = TESSERACT.require()?;
    let mut child = Command::new(program)
        .args(["stdin", "stdout"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    // Written from a thread of its own: tesseract reads all of its input
    // before it writes, but a pipe holds less than an image.
    let text = std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.write_all(image_png));
        let mut text = String::new();
        let read = child.stdout.take().expect("piped").read_to_string(&mut text);
        writer.join().expect("the writer does not panic")?;
        read.map(|_| text)
    })?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        return Err(OcrError::Failed { status: output.status.to_string(), stderr: String::from_utf8_lossy(&output.stderr).trim().to_string() });
    }
    Ok(text)
}

/// The text of each variant of a screen (a PNG), read side by side.
pub fn read_variants(screen_png: &[u8]) -> Result<Vec<String>, OcrError> {
    let variants = variants(screen_png)?;
    std::thread::scope(|scope| {
        let readers: Vec<_> = variants.iter().map(|variant| scope.spawn(|| read(variant))).collect();
        readers.into_iter().map(|reader| reader.join().expect("a reader does not panic")).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_are_enlarged_and_the_main_one_is_dark_on_light() {
        // Light grey text (one pixel) on black, as a virtual terminal.
        let mut screen = GrayImage::new(8, 4);
        screen.put_pixel(2, 1, Luma([200]));
        let variants = variants(&png(&screen).unwrap()).unwrap();
        assert_eq!(variants.len(), 3);
        let decoded: Vec<GrayImage> = variants.iter().map(|v| ::image::load_from_memory(v).unwrap().to_luma8()).collect();
        for variant in &decoded {
            assert_eq!(variant.dimensions(), (16, 8));
        }
        // The negated one, which `read_main` reads.
        let main = &decoded[1];
        assert_eq!(main.get_pixel(0, 0), &Luma([255]), "the ground is white");
        assert!(main.get_pixel(5, 3).0[0] < 128, "the text is dark");
        assert!(decoded[2].pixels().all(|Luma([v])| *v == 0 || *v == 255), "the last one is black and white");
    }
}
