//! What a run leaves behind besides its log: `result/junit.xml`,
//! `result/report.html` (see [`html`]), and the record of a passing run in
//! the store, under a key of every input, so that running the same test
//! again answers at once.
//!
//! The key covers the test directory (every file but `result/` and `.git`:
//! the definition, the script, anything it copies in or imports), every
//! node's own layer (which also holds files from outside the directory),
//! the image keys (package sets, suite, archive), the guest agent and the
//! `vmrig` executable itself. A failure is never recorded.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

pub mod html;
pub mod pcap;

use crate::error::{file_error, FileError};
use crate::store::{hash_file, key_of, Entry, Store, StoreError};

/// Store entry kind of recorded passes.
const RESULT_KIND: &str = "result";
/// Bumped when what a key covers or what an entry holds changes.
const RESULT_FORMAT: &str = "result-v2";
/// The file in `result/` naming the key of the run it reports.
const KEY_FILE: &str = ".vmrig-key";
/// Where in a recorded pass its report is kept: all of `result/` (log,
/// JUnit file, consoles, packet captures, files copied out), so that a
/// cached run's report is the report of the run that passed.
const REPORT_DIR: &str = "report";

/// One test case of the JUnit report: a subtest, or the whole script.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// Its name.
    pub name: String,
    /// How long it ran.
    pub duration: Duration,
    /// Why it failed, if it did.
    pub failure: Option<String>,
}

/// The JUnit XML for test `name` and its cases.
pub fn junit_xml(name: &str, cases: &[Case]) -> String {
    junit_document([testsuite_xml(name, cases)])
}

/// A JUnit document holding `suites` (each a `<testsuite>` element, from
/// [`testsuite_xml`] or [`testsuites_in`]).
pub fn junit_document(suites: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
    for suite in suites {
        xml.push_str(suite.as_ref());
    }
    xml.push_str("</testsuites>\n");
    xml
}

/// The `<testsuite>` elements of a JUnit document that vmrig wrote, as
/// they are; `None` if `document` is not one.
pub fn testsuites_in(document: &str) -> Option<&str> {
    let element = document.find("<testsuite ")?;
    // From the start of its line, indentation and all.
    let start = document[..element].rfind('\n').map_or(0, |newline| newline + 1);
    let end = document.rfind("</testsuites>")?;
    (start < end).then(|| &document[start..end])
}

/// The `<testsuite>` element of test `name` and its cases.
pub fn testsuite_xml(name: &str, cases: &[Case]) -> String {
    let failures = cases.iter().filter(|c| c.failure.is_some()).count();
    let total: f64 = cases.iter().map(|c| c.duration.as_secs_f64()).sum();
    let mut xml = format!(
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{total:.3}\">\n",
        escape(name),
        cases.len(),
    );
    for case in cases {
        let open = format!(
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
            escape(name),
            escape(&case.name),
            case.duration.as_secs_f64()
        );
        match &case.failure {
            None => xml.push_str(&format!("{open}/>\n")),
            Some(failure) => {
                xml.push_str(&format!(
                    "{open}>\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    escape(failure_message(failure)),
                    escape(failure)
                ));
            }
        }
    }
    xml.push_str("  </testsuite>\n");
    xml
}

/// The exception's own line of a failure: the first line that is neither
/// a traceback's heading nor one of its indented frames.
pub fn failure_message(failure: &str) -> &str {
    failure
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with(' ') && !l.starts_with("Traceback ("))
        .unwrap_or("failed")
        .trim()
}

/// The `<testsuite>` element of test `name`, which did not run: one case,
/// skipped, saying why.
pub fn skipped_testsuite_xml(name: &str, reason: &str) -> String {
    format!(
        "  <testsuite name=\"{0}\" tests=\"1\" failures=\"0\" errors=\"0\" skipped=\"1\" time=\"0.000\">\n    <testcase classname=\"{0}\" name=\"{0}\" time=\"0.000\">\n      <skipped message=\"{1}\"/>\n    </testcase>\n  </testsuite>\n",
        escape(name),
        escape(reason)
    )
}

/// `text` made safe for XML (and HTML) text and attribute values; characters XML 1.0
/// cannot hold at all are dropped.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

/// The inputs of a run that decide its outcome.
pub struct Inputs<'a> {
    /// The test directory.
    pub test_dir: &'a Path,
    /// Every node's own layer, in node order.
    pub layers: Vec<&'a [u8]>,
    /// The keys of the images, in plan order.
    pub image_keys: Vec<String>,
    /// The guest agent.
    pub agent: &'a [u8],
}

impl Inputs<'_> {
    /// The key a pass with these inputs is recorded under.
    pub fn key(&self) -> Result<String, FileError> {
        let exe = std::env::current_exe().map_err(file_error("find", Path::new("/proc/self/exe")))?;
        let vmrig = hash_file(&exe).map_err(file_error("read", &exe))?;
        let mut parts: Vec<Vec<u8>> = vec![RESULT_FORMAT.into(), env!("CARGO_PKG_VERSION").into(), vmrig.into()];
        parts.push(blake3::hash(self.agent).to_hex().as_bytes().to_vec());
        parts.extend(self.image_keys.iter().map(|k| k.as_bytes().to_vec()));
        parts.extend(self.layers.iter().map(|layer| blake3::hash(layer).to_hex().as_bytes().to_vec()));
        hash_tree(self.test_dir, self.test_dir, &mut parts)?;
        Ok(key_of(parts))
    }
}

/// Adds the path, kind and contents of everything below `dir` (but the
/// report and version control) to `parts`, in a stable order.
fn hash_tree(root: &Path, dir: &Path, parts: &mut Vec<Vec<u8>>) -> Result<(), FileError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .and_then(|d| d.collect::<io::Result<Vec<_>>>())
        .map_err(file_error("list", dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let relative = path.strip_prefix(root).unwrap_or(&path);
        if dir == root && [crate::spec::RESULT_DIR, ".git"].iter().any(|skip| entry.file_name() == *skip) {
            continue;
        }
        let kind = entry.file_type().map_err(file_error("read", &path))?;
        parts.push(relative.as_os_str().as_encoded_bytes().to_vec());
        if kind.is_dir() {
            parts.push(b"dir".to_vec());
            hash_tree(root, &path, parts)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&path).map_err(file_error("read", &path))?;
            parts.push([b"link:".as_slice(), target.as_os_str().as_encoded_bytes()].concat());
        } else {
            parts.push(hash_file(&path).map_err(file_error("read", &path))?.into_bytes());
        }
    }
    Ok(())
}

/// A pass found in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedPass {
    /// When the run that passed ended, seconds since the Unix epoch.
    pub when: u64,
    /// How long its script ran.
    pub duration: Duration,
}

impl RecordedPass {
    /// "2026-11-25 10:12 UTC".
    pub fn when_text(&self) -> String {
        utc_text(self.when)
    }
}

/// "2026-11-25 10:12 UTC" for `seconds` since the Unix epoch.
pub fn utc_text(seconds: u64) -> String {
    let days = i64::try_from(seconds / 86_400).unwrap_or_default();
    let (year, month, day) = civil_from_days(days);
    let minutes = seconds % 86_400 / 60;
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", minutes / 60, minutes % 60)
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The pass recorded under `key`, after putting its report in
/// `result_dir` unless that already holds it.
pub fn recorded_pass(store: &Store, key: &str, result_dir: &Path) -> Result<Option<RecordedPass>, FileError> {
    let Some(entry) = store.lookup(RESULT_KIND, key) else { return Ok(None) };
    let meta = &entry.manifest.meta;
    let pass = RecordedPass {
        when: meta["when"].as_u64().unwrap_or(entry.manifest.created),
        duration: Duration::from_secs_f64(meta["duration"].as_f64().unwrap_or_default()),
    };
    let key_file = result_dir.join(KEY_FILE);
    if fs::read_to_string(&key_file).ok().as_deref() != Some(key) {
        restore(&entry, result_dir, key)?;
    }
    Ok(Some(pass))
}

fn restore(entry: &Entry, result_dir: &Path, key: &str) -> Result<(), FileError> {
    if result_dir.exists() {
        fs::remove_dir_all(result_dir).map_err(file_error("clear", result_dir))?;
    }
    fs::create_dir_all(result_dir).map_err(file_error("create", result_dir))?;
    copy_tree(&entry.file(REPORT_DIR), result_dir)?;
    mark(result_dir, key)
}

/// Copies the files and directories below `from` into `to`, but for the
/// key file, which names a run rather than belonging to its report.
fn copy_tree(from: &Path, to: &Path) -> Result<(), FileError> {
    fs::create_dir_all(to).map_err(file_error("create", to))?;
    for entry in fs::read_dir(from).map_err(file_error("list", from))? {
        let entry = entry.map_err(file_error("list", from))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(file_error("inspect", &source))?;
        if kind.is_dir() {
            copy_tree(&source, &target)?;
        } else if kind.is_file() && entry.file_name() != KEY_FILE {
            fs::copy(&source, &target).map_err(file_error("copy", &source))?;
        }
    }
    Ok(())
}

/// Notes in `result_dir` that it reports the run of `key`.
pub fn mark(result_dir: &Path, key: &str) -> Result<(), FileError> {
    let key_file = result_dir.join(KEY_FILE);
    fs::write(&key_file, key).map_err(file_error("write", &key_file))
}

/// Records a pass under `key`, keeping its whole report.
pub fn record_pass(store: &Store, key: &str, result_dir: &Path, duration: Duration) -> Result<(), StoreError> {
    let when = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    store.get_or_build(RESULT_KIND, key, |dir| {
        copy_tree(result_dir, &dir.join(REPORT_DIR))?;
        Ok::<_, StoreError>(json!({ "when": when, "duration": duration.as_secs_f64() }))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_has_one_case_each_and_escapes_what_it_quotes() {
        let cases = [
            Case { name: "boots".into(), duration: Duration::from_millis(1500), failure: None },
            Case {
                name: "serves <html> & \"quotes\"".into(),
                duration: Duration::from_millis(250),
                failure: Some("Traceback (most recent call last):\n  File \"t\", line 1\nTestFailure: server: command `curl` failed\u{1b}[0m\nstderr: refused\n".into()),
            },
        ];
        let xml = junit_xml("api-test", &cases);
        assert!(xml.contains("<testsuite name=\"api-test\" tests=\"2\" failures=\"1\" errors=\"0\" time=\"1.750\">"), "{xml}");
        assert!(xml.contains("<testcase classname=\"api-test\" name=\"boots\" time=\"1.500\"/>"), "{xml}");
        assert!(xml.contains("name=\"serves &lt;html&gt; &amp; &quot;quotes&quot;\""), "{xml}");
        assert!(xml.contains("<failure message=\"TestFailure: server: command `curl` failed[0m\">Traceback (most recent call last):\n"), "{xml}");
        assert!(!xml.contains('\u{1b}'));
        assert_eq!(testsuites_in(&xml), Some(testsuite_xml("api-test", &cases).as_str()));
        assert_eq!(testsuites_in("<testsuites/>"), None);
    }

    #[test]
    fn a_suite_document_holds_each_test_and_what_did_not_run() {
        let passed = testsuite_xml("one", &[Case { name: "one".into(), duration: Duration::from_secs(2), failure: None }]);
        let xml = junit_document([passed.clone(), skipped_testsuite_xml("two & more", "not run: --fail-fast")]);
        assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n  <testsuite name=\"one\""), "{xml}");
        assert!(xml.contains("<testsuite name=\"two &amp; more\" tests=\"1\" failures=\"0\" errors=\"0\" skipped=\"1\""), "{xml}");
        assert!(xml.contains("<skipped message=\"not run: --fail-fast\"/>"), "{xml}");
        assert_eq!(testsuites_in(&xml).map(|s| s.matches("<testsuite ").count()), Some(2));
        assert!(xml.ends_with("</testsuites>\n"));
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(RecordedPass { when: 0, duration: Duration::ZERO }.when_text(), "1970-01-01 00:00 UTC");
        // 2026-11-25 10:12:59 UTC
        assert_eq!(RecordedPass { when: 1_795_601_579, duration: Duration::ZERO }.when_text(), "2026-11-25 10:12 UTC");
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn the_key_follows_the_test_directory_but_not_its_report() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("vmrig.toml"), "x").unwrap();
        let key = || Inputs { test_dir: dir.path(), layers: vec![b"layer".as_slice()], image_keys: vec!["img".into()], agent: b"agent" }.key().unwrap();
        let first = key();
        fs::create_dir_all(dir.path().join("result/nodes")).unwrap();
        fs::write(dir.path().join("result/log.txt"), "anything").unwrap();
        assert_eq!(key(), first, "the report changed the key");
        fs::create_dir(dir.path().join("data")).unwrap();
        fs::write(dir.path().join("data/input"), "1").unwrap();
        let with_data = key();
        assert_ne!(with_data, first);
        fs::write(dir.path().join("data/input"), "2").unwrap();
        assert_ne!(key(), with_data, "an edited file kept the key");
        let other_layer = Inputs { test_dir: dir.path(), layers: vec![b"other".as_slice()], image_keys: vec!["img".into()], agent: b"agent" };
        assert_ne!(other_layer.key().unwrap(), key());
    }

    #[test]
    fn a_recorded_pass_restores_its_report() {
        let store_dir = tempfile::tempdir().unwrap();
        let store = Store::open(store_dir.path().join("store")).unwrap();
        let result = store_dir.path().join("result");
        fs::create_dir_all(&result).unwrap();
        fs::write(result.join("log.txt"), "passing log").unwrap();
        fs::write(result.join("junit.xml"), "<testsuites/>").unwrap();
        fs::create_dir_all(result.join("nodes/server")).unwrap();
        fs::write(result.join("nodes/server/console.log"), "booted").unwrap();
        fs::write(result.join("vlan1.pcap"), [0xd4, 0xc3, 0xb2, 0xa1]).unwrap();
        assert_eq!(recorded_pass(&store, "k1", &result).unwrap(), None);
        record_pass(&store, "k1", &result, Duration::from_millis(7930)).unwrap();

        // A later, different run replaced the report.
        fs::write(result.join("log.txt"), "failing log").unwrap();
        mark(&result, "k2").unwrap();
        let pass = recorded_pass(&store, "k1", &result).unwrap().expect("recorded");
        assert_eq!(pass.duration, Duration::from_millis(7930));
        assert_eq!(fs::read_to_string(result.join("log.txt")).unwrap(), "passing log");
        assert_eq!(fs::read_to_string(result.join("nodes/server/console.log")).unwrap(), "booted");
        assert_eq!(fs::read(result.join("vlan1.pcap")).unwrap(), [0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(fs::read_to_string(result.join(KEY_FILE)).unwrap(), "k1");
    }
}
