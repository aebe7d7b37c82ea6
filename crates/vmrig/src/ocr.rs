//! Text on a node's screen, read by OCR: the screen QEMU saved made into a
//! few variants in-process, each read by tesseract, side by side; a search
//! reads the screen as it is first.
//!
//! A virtual terminal is light text on black, and tesseract reads dark
//! text on a light page best, at a larger size than a console font's: the
//! variants are the screen in grey, enlarged with its contrast stretched;
//! that negated; and that made black and white.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};

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

/// What a search of a screen's variants read.
#[derive(Debug)]
pub struct Reading {
    /// The text of each image read, in the order they are read in.
    pub texts: Vec<String>,
    /// Whether one of them was wanted; the reads still going then were
    /// stopped.
    pub found: bool,
}

/// Reads a screen (a PNG) until a text is `wanted`: first the screen as
/// it is, alone (the smallest image, and plain text a wait looks for is
/// most often read there, in under half the time the variants take on
/// two cores), then its variants side by side, the first wanted text killing
/// the other reads.
pub fn search(screen_png: &[u8], wanted: impl Fn(&str) -> bool) -> Result<Reading, OcrError> {
    let as_is = read_until(&[screen_png.to_vec()], &wanted)?;
    if as_is.found {
        return Ok(as_is);
    }
    let mut processed = read_until(&variants(screen_png)?, &wanted)?;
    processed.texts.splice(0..0, as_is.texts);
    Ok(processed)
}

/// The text of each variant of a screen (a PNG), read side by side.
pub fn read_variants(screen_png: &[u8]) -> Result<Vec<String>, OcrError> {
    Ok(read_until(&variants(screen_png)?, |_| false)?.texts)
}

/// The text tesseract reads in the main variant of a screen (a PNG),
/// without making the others.
pub fn read_main(screen_png: &[u8]) -> Result<String, OcrError> {
    let main = png(&negated(&enlarged(screen_png)?))?;
    let mut texts = read_until(&[main], |_| false)?.texts;
    Ok(texts.pop().expect("one image, one text"))
}

/// Runs a tesseract per image (PNGs), side by side, until one reads
/// text that is `wanted` or all have read theirs.
fn read_until(images: &[Vec<u8>], wanted: impl Fn(&str) -> bool) -> Result<Reading, OcrError> {
    let program = TESSERACT.require()?;
    let readers = images
        .iter()
        .map(|_| {
            let child = Command::new(&program).args(["stdin", "stdout"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
            Ok(Reader(Mutex::new(child)))
        })
        .collect::<Result<Vec<_>, OcrError>>()?;
    // Whatever ends the search, no tesseract outlives it.
    let stop = StopAll(&readers);
    std::thread::scope(|scope| {
        let (sender, ended) = mpsc::channel();
        for (index, (reader, image)) in readers.iter().zip(images).enumerate() {
            let sender = sender.clone();
            scope.spawn(move || sender.send((index, reader.read(image))));
        }
        drop(sender);
        let mut texts = vec![None; images.len()];
        let mut found = false;
        for (index, text) in ended {
            let text = text?;
            found = wanted(&text);
            texts[index] = Some(text);
            if found {
                stop.stop();
                break;
            }
        }
        Ok(Reading { texts: texts.into_iter().flatten().collect(), found })
    })
}

/// A running tesseract, shared between the thread reading its answer and
/// the search that may stop it.
struct Reader(Mutex<Child>);

impl Reader {
    /// Gives tesseract `image_png` and returns the text it reads.
    fn read(&self, image_png: &[u8]) -> Result<String, OcrError> {
        let (stdin, stdout, stderr) = {
            let mut child = self.child();
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        };
        let (mut stdin, mut stdout, mut stderr) = (stdin.expect("piped"), stdout.expect("piped"), stderr.expect("piped"));
        // Written from a thread of its own: tesseract reads all of its
        // input before it writes, but a pipe holds less than an image.
        let (text, errors) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || stdin.write_all(image_png));
            let errors = scope.spawn(move || {
                let mut errors = String::new();
                stderr.read_to_string(&mut errors).map(|_| errors)
            });
            let mut text = String::new();
            let read = stdout.read_to_string(&mut text).map(|_| text);
            // A tesseract stopped mid-read leaves its input unwritten:
            // its status below says what happened.
            let _ = writer.join().expect("the writer does not panic");
            (read, errors.join().expect("the reader does not panic"))
        });
        let status = self.child().wait()?;
        if !status.success() {
            return Err(OcrError::Failed { status: status.to_string(), stderr: errors.unwrap_or_default().trim().to_string() });
        }
        Ok(text?)
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Kills every tesseract of a search that is still running, when told or
/// when dropped.
struct StopAll<'a>(&'a [Reader]);

impl StopAll<'_> {
    fn stop(&self) {
        for reader in self.0 {
            // An exited (even reaped) child is not signalled again.
            let _ = reader.child().kill();
        }
    }
}

impl Drop for StopAll<'_> {
    fn drop(&mut self) {
        self.stop();
    }
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
