//! The screen and keyboard calls: keys sent one combination at a time,
//! with the machine held only while QEMU takes each; screenshots named as
//! NixOS names them; the screen's text, read with the machine free, and
//! waited for.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fancy_regex::Regex;

use super::call::Seconds;
use super::{locked, wait, Failure};
use crate::driver::Run;
use crate::ocr;
use crate::vm::{Keys, KEY_STROKE};

/// Sends each of `keys` in turn, waiting `delay` after each (at least
/// until QEMU has pressed and released it), with the machine free for
/// other threads' calls while it waits.
pub(super) fn send(run: &Run<'_>, node: &str, keys: &[Keys], delay: Option<Seconds>) -> Result<(), Failure> {
    for combination in keys {
        locked(run, node)?.send_keys(combination)?;
        std::thread::sleep(delay.map_or(KEY_STROKE, |Seconds(delay)| delay.max(KEY_STROKE)));
    }
    Ok(())
}

/// The text OCR reads on the node's screen: each variant's, or the main
/// one's.
pub(super) fn text(run: &Run<'_>, node: &str, variants: bool) -> Result<Vec<String>, Failure> {
    let screen = locked(run, node)?.screen_png()?;
    let texts = if variants { ocr::read_variants(&screen) } else { ocr::read_main(&screen).map(|text| vec![text]) };
    texts.map_err(|error| ocr_failure(node, &error))
}

/// `wait_for_text`: until OCR reads text matching `pattern` on the
/// screen. Each new screen's variants are read side by side and the
/// reading stops at the first that matches; a screen that has not changed
/// is not read again.
pub(super) fn for_text(run: &Run<'_>, node: &str, pattern: &str, limit: Duration, deadline: Instant) -> Result<(), Failure> {
    let regex = script_regex("wait_for_text", pattern)?;
    let _block = run.log.block(Some(node), format!("waiting for {pattern} to appear on the screen"));
    let mut last_screen = None;
    let mut texts = Vec::new();
    let found = wait::poll_until(wait::give_up(limit, deadline), SCREEN_PAUSE, || {
        let screen = locked(run, node)?.screen_png()?;
        let hash = blake3::hash(&screen);
        if last_screen == Some(hash) {
            return Ok(false);
        }
        last_screen = Some(hash);
        let reading = ocr::search(&screen, |text| regex.is_match(text).unwrap_or(false)).map_err(|error| ocr_failure(node, &error))?;
        texts = reading.texts;
        Ok(reading.found)
    })?;
    if !found {
        return Err(Failure::Test(format!(
            "{node}: {pattern:?} did not appear on the screen within {} s; OCR read:\n{}",
            limit.as_secs(),
            texts.join("\n---\n")
        )));
    }
    Ok(())
}

/// Pause between looks at a screen that has not changed.
const SCREEN_PAUSE: Duration = Duration::from_millis(500);

/// A regular expression a script passed to `call`, read as Python reads
/// it; the test fails on one that is not.
pub(super) fn script_regex(call: &str, pattern: &str) -> Result<Regex, Failure> {
    Regex::new(pattern).map_err(|error| Failure::Test(format!("{call}(): {pattern:?} is not a regular expression: {error}")))
}

fn ocr_failure(node: &str, error: &ocr::OcrError) -> Failure {
    Failure::Infra(format!("{node}: cannot read the screen's text: {}", crate::error::chain(error)))
}

/// Where `screenshot(filename)` writes: `.png` added to a name with no
/// extension, and a relative name in the result folder.
pub(super) fn screenshot_path(result_dir: &Path, filename: &str) -> PathBuf {
    let mut path = PathBuf::from(filename);
    if path.extension().is_none() {
        path.set_extension("png");
    }
    result_dir.join(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_screenshot_goes_in_the_result_folder_as_png_unless_told_otherwise() {
        let result = Path::new("/t/result");
        assert_eq!(screenshot_path(result, "login"), Path::new("/t/result/login.png"));
        assert_eq!(screenshot_path(result, "shots/x.ppm"), Path::new("/t/result/shots/x.ppm"));
        assert_eq!(screenshot_path(result, "/tmp/abs"), Path::new("/tmp/abs.png"));
    }
}
