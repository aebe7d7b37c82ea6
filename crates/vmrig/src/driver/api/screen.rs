//! The screen and keyboard calls: keys sent one combination at a time,
//! with the machine held only while QEMU takes each; screenshots named as
//! NixOS names them; the screen's text, read with the machine free.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::call::Seconds;
use super::{locked, Failure};
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

/// The text OCR reads on the node's screen (each variant's, or the main
/// one's), with the screen's hash; nothing read when the screen is still
/// the one `unless_screen` names, so that a wait never reads one screen
/// twice.
pub(super) fn text(run: &Run<'_>, node: &str, variants: bool, unless_screen: Option<&str>) -> Result<Value, Failure> {
    let screen = locked(run, node)?.screen_png()?;
    let hash = blake3::hash(&screen).to_hex().to_string();
    if unless_screen == Some(hash.as_str()) {
        return Ok(json!({"screen": hash, "texts": null}));
    }
    let texts = if variants {
        ocr::read_variants(&screen)
    } else {
        ocr::read_main(&screen).map(|text| vec![text])
    };
    let texts = texts.map_err(|error| Failure::Infra(format!("{node}: cannot read the screen's text: {}", crate::error::chain(&error))))?;
    Ok(json!({"screen": hash, "texts": texts}))
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
