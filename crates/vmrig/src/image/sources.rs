//! Which Debian archive an image is built from.
//!
//! vmrig never names an archive host itself: the test's `mirror`, else
//! `$VMRIG_MIRROR`, else the host's own apt sources (one-line `.list` files
//! and deb822 `.sources` files) decide. Host entries are taken for the host's
//! own suite and its `-updates`/`-security` companions, then renamed to the
//! suite the test asks for.

use std::fs;
use std::path::{Path, PathBuf};

/// Why no archive could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    /// The host is not Debian, so its sources cannot serve Debian suites.
    #[error("this host's apt sources are for {0}, not Debian: set `mirror` in vmrig.toml or VMRIG_MIRROR to a Debian archive URL")]
    NotDebian(String),
    /// The host's apt configuration has no Debian entry to build from.
    #[error("found no Debian archive in the host's apt sources ({}): set `mirror` in vmrig.toml or VMRIG_MIRROR", .0.display())]
    NoEntries(PathBuf),
}

/// One `deb` entry of an apt sources file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptEntry {
    /// The archive's URI.
    pub uri: String,
    /// The suite, e.g. `bookworm-updates`.
    pub suite: String,
    /// The components, e.g. `main`.
    pub components: Vec<String>,
    /// The keyring that signs it, when the entry names one.
    pub signed_by: Option<String>,
}

impl AptEntry {
    /// The entry as a one-line `deb` source, as mmdebstrap takes it.
    pub fn to_line(&self) -> String {
        let options = match &self.signed_by {
            Some(keyring) => format!("[signed-by={keyring}] "),
            None => String::new(),
        };
        format!("deb {options}{} {} {}", self.uri, self.suite, self.components.join(" "))
    }
}

/// Suites that have no `-updates` or `-security` companion.
const ROLLING_SUITES: &[&str] = &["sid", "unstable", "experimental"];

/// The entries to build `distro` from.
///
/// `mirror` is the test's `mirror` or `$VMRIG_MIRROR`; without it the host's
/// apt configuration under `etc_apt` (normally `/etc/apt`) and the host's
/// `os-release` are read.
pub fn resolve(
    distro: &str,
    mirror: Option<&str>,
    etc_apt: &Path,
    os_release: &Path,
) -> Result<Vec<AptEntry>, SourcesError> {
    if let Some(uri) = mirror {
        return Ok(vec![AptEntry {
            uri: uri.to_string(),
            suite: distro.to_string(),
            components: vec!["main".into()],
            signed_by: None,
        }]);
    }
    let release = fs::read_to_string(os_release).unwrap_or_default();
    let os_field = |name: &str| {
        release.lines().find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
                .map(|v| v.trim_matches('"').to_string())
        })
    };
    let id = os_field("ID").unwrap_or_default();
    if id != "debian" {
        return Err(SourcesError::NotDebian(if id.is_empty() { "an unknown system".into() } else { id }));
    }
    let host_suite = os_field("VERSION_CODENAME").unwrap_or_default();

    let entries = read_host_entries(etc_apt);
    let rolling = ROLLING_SUITES.contains(&distro);
    let chosen: Vec<AptEntry> = entries
        .into_iter()
        .filter_map(|entry| {
            let companion = if entry.suite == host_suite {
                ""
            } else {
                ["-updates", "-security"]
                    .into_iter()
                    .find(|suffix| entry.suite == format!("{host_suite}{suffix}"))?
            };
            if rolling && !companion.is_empty() {
                return None;
            }
            Some(AptEntry {
                suite: format!("{distro}{companion}"),
                ..entry
            })
        })
        .collect();
    if chosen.iter().any(|e| e.suite == distro) {
        Ok(chosen)
    } else {
        Err(SourcesError::NoEntries(etc_apt.to_path_buf()))
    }
}

/// Every enabled binary (`deb`) entry of the host's apt sources.
fn read_host_entries(etc_apt: &Path) -> Vec<AptEntry> {
    let mut entries = Vec::new();
    let main_list = etc_apt.join("sources.list");
    if let Ok(text) = fs::read_to_string(&main_list) {
        entries.extend(parse_one_line(&text));
    }
    let mut parts: Vec<PathBuf> = fs::read_dir(etc_apt.join("sources.list.d"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path())
        .collect();
    parts.sort();
    for path in parts {
        let Ok(text) = fs::read_to_string(&path) else { continue };
        match path.extension().and_then(|e| e.to_str()) {
            Some("list") => entries.extend(parse_one_line(&text)),
            Some("sources") => entries.extend(parse_deb822(&text)),
            _ => {}
        }
    }
    entries
}

/// Entries of a one-line-style sources file.
pub fn parse_one_line(text: &str) -> Vec<AptEntry> {
    let mut entries = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some(rest) = line.strip_prefix("deb ").or_else(|| line.strip_prefix("deb\t")) else {
            continue;
        };
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(options) = rest.strip_prefix('[') {
            let Some((options, after)) = options.split_once(']') else { continue };
            signed_by = options
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_string);
            rest = after.trim_start();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else { continue };
        entries.push(AptEntry {
            uri: uri.trim_end_matches('/').to_string(),
            suite: suite.to_string(),
            components: words.map(str::to_string).collect(),
            signed_by,
        });
    }
    entries
}

/// Entries of a deb822-style `.sources` file.
pub fn parse_deb822(text: &str) -> Vec<AptEntry> {
    let mut entries = Vec::new();
    let mut stanza: Vec<(String, String)> = Vec::new();
    let mut flush = |stanza: &mut Vec<(String, String)>| {
        let get = |name: &str| {
            stanza
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let words = |name: &str| get(name).unwrap_or_default().split_whitespace().map(str::to_string).collect::<Vec<_>>();
        let enabled = get("Enabled").is_none_or(|v| !v.trim().eq_ignore_ascii_case("no"));
        let signed_by = get("Signed-By")
            .map(str::trim)
            .filter(|v| !v.is_empty() && !v.contains('\n'))
            .map(str::to_string);
        if enabled && words("Types").iter().any(|t| t == "deb") {
            for uri in words("URIs") {
                for suite in words("Suites") {
                    entries.push(AptEntry {
                        uri: uri.trim_end_matches('/').to_string(),
                        suite,
                        components: words("Components"),
                        signed_by: signed_by.clone(),
                    });
                }
            }
        }
        stanza.clear();
    };
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            flush(&mut stanza);
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = stanza.last_mut() {
                value.push('\n');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            stanza.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    flush(&mut stanza);
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\n# a comment\nURIs: http://archive.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://archive.example/debian-security\nSuites: bookworm-security\nComponents: main\n\nTypes: deb\nURIs: https://vendor.example/apt\nSuites: nodistro\nComponents: main\n\nTypes: deb-src\nURIs: http://archive.example/debian\nSuites: bookworm\nComponents: main\n\nEnabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\n";

    fn host(dir: &Path, codename: &str) -> PathBuf {
        fs::create_dir_all(dir.join("apt/sources.list.d")).unwrap();
        fs::write(dir.join("apt/sources.list.d/debian.sources"), DEB822).unwrap();
        fs::write(dir.join("apt/sources.list"), "deb [arch=amd64] https://other.example/x stable main # vendor\n").unwrap();
        let release = dir.join("os-release");
        fs::write(&release, format!("PRETTY_NAME=\"Debian\"\nID=debian\nVERSION_CODENAME={codename}\n")).unwrap();
        release
    }

    #[test]
    fn parses_both_formats() {
        let entries = parse_deb822(DEB822);
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[1].suite, "bookworm-updates");
        assert_eq!(
            entries[0].to_line(),
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://archive.example/debian bookworm main"
        );
        let lines = parse_one_line("# off\ndeb-src http://a/ s main\ndeb [signed-by=/k.gpg arch=amd64] http://a/debian/ bookworm main contrib\n");
        assert_eq!(
            lines,
            vec![AptEntry {
                uri: "http://a/debian".into(),
                suite: "bookworm".into(),
                components: vec!["main".into(), "contrib".into()],
                signed_by: Some("/k.gpg".into()),
            }]
        );
    }

    #[test]
    fn takes_the_hosts_debian_entries_for_the_wanted_suite() {
        let dir = tempfile::tempdir().unwrap();
        let release = host(dir.path(), "bookworm");
        let same = resolve("bookworm", None, &dir.path().join("apt"), &release).unwrap();
        let suites: Vec<_> = same.iter().map(|e| e.suite.as_str()).collect();
        assert_eq!(suites, ["bookworm", "bookworm-updates", "bookworm-security"]);
        let trixie = resolve("trixie", None, &dir.path().join("apt"), &release).unwrap();
        assert_eq!(trixie[2].to_line(), "deb http://archive.example/debian-security trixie-security main");
        let sid = resolve("sid", None, &dir.path().join("apt"), &release).unwrap();
        assert_eq!(sid.len(), 1);
    }

    #[test]
    fn a_mirror_overrides_the_host() {
        let entries = resolve("trixie", Some("http://mirror.example/debian"), Path::new("/nonexistent"), Path::new("/nonexistent")).unwrap();
        assert_eq!(entries[0].to_line(), "deb http://mirror.example/debian trixie main");
    }

    #[test]
    fn refuses_hosts_without_debian_sources() {
        let dir = tempfile::tempdir().unwrap();
        let release = dir.path().join("os-release");
        fs::write(&release, "ID=ubuntu\nVERSION_CODENAME=noble\n").unwrap();
        assert!(matches!(resolve("bookworm", None, dir.path(), &release), Err(SourcesError::NotDebian(id)) if id == "ubuntu"));
        let release = host(dir.path(), "trixie");
        assert!(matches!(resolve("bookworm", None, &dir.path().join("apt"), &release), Err(SourcesError::NoEntries(_))));
    }
}
