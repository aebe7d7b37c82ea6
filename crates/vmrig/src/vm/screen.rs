//! A node's screen and keyboard, for nodes with a display (`graphics`):
//! keys named as NixOS tests name them, sent as QMP `send-key`; text typed
//! as the keys of a US keyboard; the screen saved by QMP `screendump`.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::qmp::QmpError;
use super::{Machine, VmError};

/// How long each key is held down: well under the guest's 250 ms before a
/// held key repeats, and short, so that typing a line takes little time.
const HOLD: Duration = Duration::from_millis(20);

/// How long QEMU takes to press and release one combination. QEMU queues
/// the keys sent meanwhile, in a queue of 50 events, and drops what does
/// not fit: measured, a line sent a key every 10 ms lost its last third.
/// The next combination waits this long.
pub const KEY_STROKE: Duration = Duration::from_millis(30);

/// A key, or keys pressed together, as NixOS tests name them (QEMU's
/// `sendkey` names): `ret`, `alt-f2`, `ctrl-alt-delete`, `shift-a`, and
/// `0x1c` for a scancode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    name: String,
    /// QMP `KeyValue`s, pressed in order and released together.
    values: Vec<Value>,
}

impl Keys {
    /// The combination written as `name`; an error says which part is no
    /// key name.
    pub fn named(name: &str) -> Result<Self, String> {
        let values = name
            .split('-')
            .map(|part| {
                if let Some(hex) = part.strip_prefix("0x") {
                    u8::from_str_radix(hex, 16).map(|code| json!({"type": "number", "data": code})).ok()
                } else {
                    let plain = !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                    plain.then(|| json!({"type": "qcode", "data": part}))
                }
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                format!("`{name}` is not a key: name keys as QEMU's sendkey does (`ret`, `spc`, `a`, `f2`, `0x1c`), joined by `-` for keys pressed together (`ctrl-alt-delete`)")
            })?;
        Ok(Self { name: name.to_string(), values })
    }

    /// The keys that type `c` on a US keyboard, if any do.
    pub fn typing(c: char) -> Option<Self> {
        let name = match c {
            'a'..='z' | '0'..='9' => c.to_string(),
            'A'..='Z' => format!("shift-{}", c.to_ascii_lowercase()),
            _ => SYMBOLS.iter().find_map(|(plain, shifted, key)| {
                if *plain == c {
                    Some(key.to_string())
                } else {
                    (*shifted == Some(c)).then(|| format!("shift-{key}"))
                }
            })?,
        };
        Self::named(&name).ok()
    }

    /// The combination as it was written.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The characters of a US keyboard's other keys: each key's character,
/// the one it gives with shift, and QEMU's name for it.
const SYMBOLS: &[(char, Option<char>, &str)] = &[
    ('\n', None, "ret"),
    ('\t', None, "tab"),
    (' ', None, "spc"),
    ('\u{8}', None, "backspace"),
    ('\u{1b}', None, "esc"),
    ('-', Some('_'), "minus"),
    ('=', Some('+'), "equal"),
    ('[', Some('{'), "bracket_left"),
    (']', Some('}'), "bracket_right"),
    (';', Some(':'), "semicolon"),
    ('\'', Some('"'), "apostrophe"),
    ('`', Some('~'), "grave_accent"),
    ('\\', Some('|'), "backslash"),
    (',', Some('<'), "comma"),
    ('.', Some('>'), "dot"),
    ('/', Some('?'), "slash"),
    ('1', Some('!'), "1"),
    ('2', Some('@'), "2"),
    ('3', Some('#'), "3"),
    ('4', Some('$'), "4"),
    ('5', Some('%'), "5"),
    ('6', Some('^'), "6"),
    ('7', Some('&'), "7"),
    ('8', Some('*'), "8"),
    ('9', Some('('), "9"),
    ('0', Some(')'), "0"),
];

/// The format QEMU writes a screen in, by the file's extension: PPM for
/// `.ppm`, else PNG.
fn screen_format(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("ppm") => "ppm",
        _ => "png",
    }
}

impl Machine {
    /// Presses `keys` together, then releases them.
    pub fn send_keys(&mut self, keys: &Keys) -> Result<(), VmError> {
        self.ensure_display("keyboard")?;
        let node = self.config.name.clone();
        let hold = u64::try_from(HOLD.as_millis()).expect("a short hold");
        let sent = self.qmp()?.execute("send-key", Some(json!({"keys": keys.values, "hold-time": hold})));
        match sent {
            Ok(_) => Ok(()),
            Err(QmpError::Refused { message, .. }) => Err(VmError::NoSuchKey { node, keys: keys.name.clone(), message }),
            Err(source) => Err(VmError::Qmp { node, source }),
        }
    }

    /// Writes what the screen shows to `path` (PNG, or PPM for a `.ppm`).
    pub fn screendump(&mut self, path: &Path) -> Result<(), VmError> {
        self.ensure_display("display")?;
        let node = self.config.name.clone();
        let arguments = json!({"filename": path, "format": screen_format(path)});
        self.qmp()?.execute("screendump", Some(arguments)).map(drop).map_err(|source| VmError::Qmp { node, source })
    }

    /// What the screen shows, as a PNG.
    pub fn screen_png(&mut self) -> Result<Vec<u8>, VmError> {
        let path = self.config.socket_dir.join(format!("{}-screen.png", self.config.name));
        self.screendump(&path)?;
        let png = std::fs::read(&path).map_err(self.io_error(&path));
        let _ = std::fs::remove_file(&path);
        png
    }

    /// Starts the machine if it is off; fails, naming `what` it lacks,
    /// for a node without a display.
    pub fn ensure_display(&mut self, what: &'static str) -> Result<(), VmError> {
        if !self.config.graphics {
            return Err(VmError::Headless { node: self.config.name.clone(), what });
        }
        self.ensure_running()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(keys: &Keys) -> Vec<String> {
        keys.values.iter().map(|v| v["data"].to_string().trim_matches('"').to_string()).collect()
    }

    #[test]
    fn key_names_are_read_as_nixos_tests_write_them() {
        assert_eq!(sent(&Keys::named("ctrl-alt-delete").unwrap()), ["ctrl", "alt", "delete"]);
        assert_eq!(sent(&Keys::named("alt-f2").unwrap()), ["alt", "f2"]);
        assert_eq!(Keys::named("0x1c").unwrap().values, [json!({"type": "number", "data": 28})]);
        for wrong in ["", "ctrl-", "Ret", "a b", "0xzz"] {
            let error = Keys::named(wrong).unwrap_err();
            assert!(error.starts_with(&format!("`{wrong}` is not a key")), "{error}");
        }
    }

    #[test]
    fn every_printable_ascii_character_is_typed_by_some_keys() {
        for c in (' '..='~').chain(['\n', '\t']) {
            assert!(Keys::typing(c).is_some(), "{c:?}");
        }
        assert_eq!(Keys::typing('A').unwrap().name(), "shift-a");
        assert_eq!(Keys::typing('>').unwrap().name(), "shift-dot");
        assert_eq!(Keys::typing('!').unwrap().name(), "shift-1");
        assert_eq!(Keys::typing('7').unwrap().name(), "7");
        assert_eq!(Keys::typing('\n').unwrap().name(), "ret");
        assert!(Keys::typing('é').is_none());
    }

    #[test]
    fn a_screen_is_png_unless_its_file_says_ppm() {
        assert_eq!(screen_format(Path::new("result/login.png")), "png");
        assert_eq!(screen_format(Path::new("result/login.ppm")), "ppm");
        assert_eq!(screen_format(Path::new("result/login")), "png");
    }
}
