//! The calls on an X session's windows: `wait_for_x`, `get_window_names`
//! and `wait_for_window`. They ask the X server on display `:0` (the
//! `DISPLAY` every command has) with `xwininfo`, as NixOS's driver does;
//! a node that runs X lists `x11-utils` among its packages for it.

use std::time::{Duration, Instant};

use super::screen::script_regex;
use super::{locked, wait, Failure};
use crate::driver::Run;

/// Pause between looks at the X server.
const X_PAUSE: Duration = Duration::from_millis(500);

/// The shell's status when the command it runs is not there.
const NOT_FOUND: i32 = 127;

/// `wait_for_x`: until the X server of display `:0` answers.
pub(super) fn for_x(run: &Run<'_>, node: &str, limit: Duration, deadline: Instant) -> Result<(), Failure> {
    locked(run, node)?.ensure_display("display")?;
    let _block = run.log.block(Some(node), "waiting for the X11 server");
    let answers = wait::poll_until(wait::give_up(limit, deadline), X_PAUSE, || Ok(xwininfo(run, node, "-root")?.is_some()))?;
    if !answers {
        return Err(Failure::Test(format!("{node}: the X server on display :0 did not answer within {} s", limit.as_secs())));
    }
    Ok(())
}

/// `get_window_names`: the names of the X server's windows, all of them.
pub(super) fn names(run: &Run<'_>, node: &str) -> Result<Vec<String>, Failure> {
    match xwininfo(run, node, "-root -tree")? {
        Some(tree) => Ok(window_names(&tree)),
        None => Err(Failure::Test(format!("{node}: the X server on display :0 does not answer"))),
    }
}

/// `wait_for_window`: until a window's name matches `pattern`.
pub(super) fn for_window(run: &Run<'_>, node: &str, pattern: &str, limit: Duration, deadline: Instant) -> Result<(), Failure> {
    let regex = script_regex("wait_for_window", pattern)?;
    let _block = run.log.block(Some(node), format!("waiting for a window named {pattern} to appear"));
    let mut seen = Vec::new();
    let appeared = wait::poll_until(wait::give_up(limit, deadline), X_PAUSE, || {
        seen = names(run, node)?;
        Ok(seen.iter().any(|name| regex.is_match(name).unwrap_or(false)))
    })?;
    if !appeared {
        return Err(Failure::Test(format!(
            "{node}: no window named {pattern:?} appeared within {} s; the windows: {seen:?}",
            limit.as_secs()
        )));
    }
    Ok(())
}

/// What `xwininfo arguments` prints, or `None` while the X server does
/// not answer. The test fails on a node without `xwininfo`.
fn xwininfo(run: &Run<'_>, node: &str, arguments: &str) -> Result<Option<String>, Failure> {
    let command = format!("command -v xwininfo >/dev/null || exit {NOT_FOUND}; xwininfo {arguments}");
    let outcome = locked(run, node)?.shell(&command, Some(Duration::from_secs(60)))?;
    match outcome.status {
        Some(0) => Ok(Some(String::from_utf8_lossy(&outcome.stdout).into_owned())),
        Some(NOT_FOUND) => Err(Failure::Test(format!(
            "{node}: the X calls need xwininfo in the guest: add `x11-utils` to the node's packages"
        ))),
        _ => Ok(None),
    }
}

/// The window names in what `xwininfo -root -tree` prints: the quoted
/// name after each window's id (`0x400022 "xterm": ("xterm" "XTerm")
/// …`); windows without a name are left out.
fn window_names(tree: &str) -> Vec<String> {
    tree.lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix("0x")?;
            let (_, rest) = rest.split_once(' ')?;
            let rest = rest.strip_prefix('"')?;
            // The name ends at the quote before the colon.
            let end = rest.rfind("\":")?;
            Some(rest[..end].to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_names_are_the_quoted_names_of_windows_that_have_one() {
        let tree = r#"
xwininfo: Window id: 0x3a5 (the root window) (has no name)

  Root window id: 0x3a5 (the root window) (has no name)
  Parent window id: 0x0 (none)
     6 children:
     0x600012 "xterm": ("xterm" "XTerm")  484x316+0+0  +0+0
        1 child:
        0x600013 (has no name): ()  484x316+0+0  +0+0
     0x400001 "twm": ("twm" "twm")  1x1+-100+-100  +-100+-100
     0x400008 "Name with "quotes": inside": ()  10x10+0+0  +0+0
     0x200001 (has no name): ()  1x1+-1+-1  +-1+-1
"#;
        assert_eq!(window_names(tree), ["xterm", "twm", "Name with \"quotes\": inside"]);
    }
}
