//! The screen and keyboard calls: keys sent one combination at a time,
//! with the machine held only while QEMU takes each; screenshots named as
//! NixOS names them.

use std::path::{Path, PathBuf};

use super::call::Seconds;
use super::{locked, Failure};
use crate::driver::Run;
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
