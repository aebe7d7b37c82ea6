//! `result/report.html`: one self-contained page a person opens after a
//! run. The failure comes first, with the script's failing line among its
//! neighbours; then a timeline with a lane per node, each call a bar; each
//! node's steps with what their commands printed, folded; each node's
//! console (kernel, journal, agent); the packet captures as tables of
//! conversations; screenshots; and a link to every file of `result/`.
//! No script, no fetches: it opens the same from a CI artifact as from
//! the disk.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{escape, failure_message};
use super::pcap::{self, Conversation};
use crate::runlog::{Step, Timeline};
use crate::spec::Script;

/// The report's file name in `result/`.
pub const REPORT_FILE: &str = "report.html";
/// Lines of the script shown on each side of the failing one.
const SCRIPT_CONTEXT: usize = 3;
/// Pixels between nested bars of a lane.
const BAR_PITCH: usize = 18;

/// Everything the page shows.
pub struct Page<'a> {
    /// The test's name.
    pub test: &'a str,
    /// Why it failed; `None` when it passed.
    pub failure: Option<&'a str>,
    /// The test script, to quote its failing line.
    pub script: &'a Script,
    /// The run's steps and consoles.
    pub timeline: &'a Timeline,
    /// The node each of the run's addresses belongs to.
    pub addresses: &'a BTreeMap<String, String>,
    /// Each node's kind (`VM`, `container`), by name.
    pub kinds: &'a BTreeMap<String, &'static str>,
    /// When the run ended, as UTC text.
    pub ended: String,
    /// What `result/` holds besides the report.
    pub files: Files,
}

/// The files of `result/` the report shows or links to.
#[derive(Default)]
pub struct Files {
    /// Every file, relative to `result/`, with its size.
    pub all: Vec<(PathBuf, u64)>,
    /// Each packet capture's conversations, or why it could not be read.
    pub captures: Vec<(PathBuf, Result<Vec<Conversation>, String>)>,
    /// Each screenshot's bytes.
    pub screenshots: Vec<(PathBuf, Vec<u8>)>,
}

impl Files {
    /// Reads what `result_dir` holds, but the report itself.
    pub fn gather(result_dir: &Path) -> io::Result<Self> {
        let mut files = Self::default();
        let mut pending = vec![result_dir.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                let path = entry.path();
                let kind = entry.file_type()?;
                let relative = path.strip_prefix(result_dir).unwrap_or(&path).to_path_buf();
                if kind.is_dir() {
                    pending.push(path);
                } else if kind.is_file() && relative != Path::new(REPORT_FILE) && !relative.starts_with(".vmrig-key") {
                    files.all.push((relative, entry.metadata()?.len()));
                }
            }
        }
        files.all.sort();
        for (relative, _) in &files.all {
            match relative.extension().and_then(|e| e.to_str()) {
                Some("pcap") => {
                    let read = fs::read(result_dir.join(relative)).map_err(|e| e.to_string());
                    let conversations = read.and_then(|bytes| pcap::conversations(&bytes).map_err(|_| "not a pcap capture".to_string()));
                    files.captures.push((relative.clone(), conversations));
                }
                Some("png") => files.screenshots.push((relative.clone(), fs::read(result_dir.join(relative))?)),
                _ => {}
            }
        }
        Ok(files)
    }
}

/// The page, as HTML.
pub fn render(page: &Page<'_>) -> String {
    let mut html = String::with_capacity(64 * 1024);
    let verdict = if page.failure.is_some() { "failed" } else { "passed" };
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{test}: {verdict}</title><style>{STYLE}</style></head><body>\n\
         <header class=\"{verdict}\"><h1>{test} <span class=\"verdict\">{verdict}</span></h1><p>ended {ended} · {steps} steps over {total} · {nodes} · <a href=\"log.txt\">log.txt</a></p></header>\n",
        test = escape(page.test),
        nodes = escape(&page.kinds.iter().map(|(node, kind)| format!("{node} ({kind})")).collect::<Vec<_>>().join(", ")),
        ended = escape(&page.ended),
        steps = page.timeline.steps.len(),
        total = seconds(span(page.timeline)),
    );
    if let Some(failure) = page.failure {
        failure_section(&mut html, failure, page);
    }
    timeline_section(&mut html, page.timeline);
    steps_section(&mut html, page.timeline);
    consoles_section(&mut html, page.timeline, page.kinds);
    network_section(&mut html, &page.files.captures, page.addresses);
    screenshots_section(&mut html, &page.files.screenshots);
    files_section(&mut html, &page.files.all);
    html.push_str("</body></html>\n");
    html
}

const STYLE: &str = "\
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1c1c1c;background:#fafafa}\
header{padding:10px 24px;color:#fff}header.passed{background:#2e7d32}header.failed{background:#b71c1c}\
header h1{margin:0;font-size:22px}header p{margin:2px 0 0}header a{color:#fff}\
.verdict{font-size:14px;text-transform:uppercase;border:1px solid #fff;border-radius:3px;padding:1px 6px;vertical-align:middle}\
section{margin:16px 24px}h2{font-size:17px;margin:0 0 8px}h3{font-size:15px;margin:12px 0 4px}\
.failure{border-left:6px solid #b71c1c;background:#fdecea;padding:10px 14px}\
.failure .message{font-weight:600;white-space:pre-wrap;margin:0 0 8px}\
pre{background:#fff;border:1px solid #ddd;padding:6px 8px;overflow-x:auto;margin:4px 0;font:12.5px/1.4 ui-monospace,monospace}\
.source .line{display:block}.source .failing{background:#ffcdd2;font-weight:700}.source .number{color:#888;display:inline-block;width:4em}\
.lanes{background:#fff;border:1px solid #ddd;padding:6px 8px}\
.lane{display:flex;border-bottom:1px solid #eee}.lane:last-child{border-bottom:0}\
.lane .name{width:130px;flex:none;font-weight:600;padding-top:3px;overflow:hidden;text-overflow:ellipsis}\
.track{position:relative;flex:1}\
.bar{position:absolute;height:14px;border-radius:2px;background:#66bb6a;min-width:2px;overflow:hidden;font-size:10px;line-height:14px;color:#fff;white-space:nowrap;text-decoration:none}\
.bar.failed{background:#e53935}.bar.open{background:#fb8c00}\
.axis{display:flex;justify-content:space-between;margin-left:130px;color:#777;font-size:11px}\
table{border-collapse:collapse;background:#fff;width:100%}td,th{border:1px solid #e0e0e0;padding:2px 6px;text-align:left;vertical-align:top}\
th{background:#f0f0f0}td.number{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
tr.failed td{background:#ffebee}details summary{cursor:pointer}\
img{max-width:100%;border:1px solid #ddd}";

fn failure_section(html: &mut String, failure: &str, page: &Page<'_>) {
    html.push_str("<section class=\"failure\" id=\"failure\"><h2>What failed</h2>\n");
    let _ = writeln!(html, "<p class=\"message\">{}</p>", escape(failure_message(failure)));
    if let Some(step) = page.timeline.steps.iter().rposition(|s| s.failed) {
        let failed = &page.timeline.steps[step];
        let _ = writeln!(
            html,
            "<p>in <a href=\"#step-{step}\">{}: {}</a>, {} into the run</p>",
            escape(failed.node.as_deref().unwrap_or("the run")),
            escape(&failed.title),
            seconds(failed.start)
        );
    }
    if let Some(line) = failing_line(failure, page.script) {
        let _ = writeln!(html, "<p>{}, line {line}:</p>", escape(&page.script.path.display().to_string()));
        html.push_str("<pre class=\"source\">");
        // Line `n` of the file is line `n - first_line` of the script.
        let lines: Vec<&str> = page.script.text.lines().collect();
        let index = line.saturating_sub(page.script.first_line);
        let first = index.saturating_sub(SCRIPT_CONTEXT);
        for (shown, text) in lines.iter().enumerate().skip(first).take(index + SCRIPT_CONTEXT + 1 - first) {
            let class = if shown == index { "line failing" } else { "line" };
            let _ = write!(html, "<span class=\"{class}\"><span class=\"number\">{}</span>{}</span>", shown + page.script.first_line, escape(text));
        }
        html.push_str("</pre>\n");
    }
    let _ = writeln!(html, "<details><summary>the whole failure</summary><pre>{}</pre></details></section>", escape(failure));
}

/// The line of the script's file where the failure was raised: the last
/// frame of the traceback that stands in the script.
fn failing_line(failure: &str, script: &Script) -> Option<usize> {
    let path = script.shown_path();
    let frame = format!("File \"{}\", line ", path.display());
    let line = failure.lines().filter_map(|l| l.trim_start().strip_prefix(frame.as_str())).next_back()?;
    let number: usize = line.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    (number >= script.first_line && number - script.first_line < script.text.lines().count()).then_some(number)
}

/// How long the timeline spans: to its last end, or now when a step is
/// still open.
fn span(timeline: &Timeline) -> Duration {
    let last = timeline.steps.iter().map(|s| s.end.unwrap_or_else(|| timeline.now())).max().unwrap_or_default();
    last.max(Duration::from_millis(1))
}

/// The steps grouped by lane: the run's own first, then each node's.
fn lanes(timeline: &Timeline) -> Vec<(String, Vec<(usize, &Step)>)> {
    let mut lanes: BTreeMap<Option<&str>, Vec<(usize, &Step)>> = BTreeMap::new();
    for (index, step) in timeline.steps.iter().enumerate() {
        lanes.entry(step.node.as_deref()).or_default().push((index, step));
    }
    lanes.into_iter().map(|(node, steps)| (node.unwrap_or("(run)").to_string(), steps)).collect()
}

fn timeline_section(html: &mut String, timeline: &Timeline) {
    let total = span(timeline).as_secs_f64();
    html.push_str("<section><h2>Timeline</h2><div class=\"lanes\">\n");
    for (name, steps) in lanes(timeline) {
        let depth = steps.iter().map(|(_, s)| s.depth).max().unwrap_or(0);
        let _ = write!(html, "<div class=\"lane\"><div class=\"name\">{}</div><div class=\"track\" style=\"height:{}px\">", escape(&name), (depth + 1) * BAR_PITCH + 4);
        for (index, step) in steps {
            let end = step.end.unwrap_or_else(|| timeline.now());
            let left = step.start.as_secs_f64() / total * 100.0;
            let width = (end - step.start).as_secs_f64() / total * 100.0;
            let _ = write!(
                html,
                "<a href=\"#step-{index}\" class=\"bar{}\" style=\"left:{left:.3}%;width:{width:.3}%;top:{}px\" title=\"{} ({})\">{}</a>",
                state_class(step),
                step.depth * BAR_PITCH + 2,
                escape(&step.title),
                seconds(end - step.start),
                escape(&step.title),
            );
        }
        html.push_str("</div></div>\n");
    }
    let _ = writeln!(html, "</div><div class=\"axis\"><span>0 s</span><span>{}</span><span>{}</span></div></section>", seconds(span(timeline) / 2), seconds(span(timeline)));
    if timeline.steps_dropped > 0 {
        let _ = writeln!(html, "<p>{} later steps are not shown: see log.txt.</p>", timeline.steps_dropped);
    }
}

fn state_class(step: &Step) -> &'static str {
    match (step.failed, step.end) {
        (true, _) => " failed",
        (false, None) => " open",
        (false, Some(_)) => "",
    }
}

fn steps_section(html: &mut String, timeline: &Timeline) {
    html.push_str("<section><h2>Steps</h2>\n");
    for (name, steps) in lanes(timeline) {
        let failed = steps.iter().any(|(_, s)| s.failed);
        let _ = writeln!(
            html,
            "<details{}><summary><b>{}</b>: {} steps{}</summary><table><tr><th>at</th><th>took</th><th>what</th></tr>",
            if failed { " open" } else { "" },
            escape(&name),
            steps.len(),
            if failed { ", one failed" } else { "" }
        );
        for (index, step) in steps {
            let took = step.end.map_or_else(|| "unfinished".to_string(), |end| seconds(end - step.start));
            let indent = "&nbsp;&nbsp;".repeat(step.depth);
            let _ = write!(
                html,
                "<tr id=\"step-{index}\"{}><td class=\"number\">{}</td><td class=\"number\">{took}</td><td>{indent}{}",
                if step.failed { " class=\"failed\"" } else { "" },
                seconds(step.start),
                escape(&step.title)
            );
            for (stream, text) in [("output", &step.output), ("standard error", &step.errors)] {
                if !text.is_empty() {
                    let _ = write!(html, "<details{}><summary>{stream}</summary><pre>{}</pre></details>", if step.failed { " open" } else { "" }, escape(text));
                }
            }
            html.push_str("</td></tr>\n");
        }
        html.push_str("</table></details>\n");
    }
    html.push_str("</section>\n");
}

fn consoles_section(html: &mut String, timeline: &Timeline, kinds: &BTreeMap<String, &'static str>) {
    if timeline.consoles.is_empty() {
        return;
    }
    html.push_str("<section><h2>Consoles</h2><p>Each node's console: a VM's serial console (the kernel, the journal, every entry, and the agent), a container's (its systemd, the journal and the agent).</p>\n");
    for (node, console) in &timeline.consoles {
        let kind = kinds.get(node).map_or(String::new(), |kind| format!(" ({kind})"));
        let _ = write!(html, "<details><summary><b>{}</b>{}: {} lines</summary><pre>", escape(node), escape(&kind), console.lines.len() + console.dropped);
        if console.dropped > 0 {
            let _ = writeln!(html, "[{} earlier lines: see log.txt]", console.dropped);
        }
        for (at, line) in &console.lines {
            let _ = writeln!(html, "[{:9.3}] {}", at.as_secs_f64(), escape(line));
        }
        html.push_str("</pre></details>\n");
    }
    html.push_str("</section>\n");
}

fn network_section(html: &mut String, captures: &[(PathBuf, Result<Vec<Conversation>, String>)], addresses: &BTreeMap<String, String>) {
    if captures.is_empty() {
        return;
    }
    html.push_str("<section><h2>Network</h2>\n");
    let named = |endpoint: &pcap::Endpoint| match addresses.get(&endpoint.address) {
        Some(node) => format!("<b>{}</b> {}", escape(node), escape(&endpoint.to_string())),
        None => escape(&endpoint.to_string()),
    };
    for (path, conversations) in captures {
        let link = href(path);
        let _ = write!(html, "<h3><a href=\"{link}\">{}</a></h3>", escape(&path.display().to_string()));
        match conversations {
            Err(why) => {
                let _ = writeln!(html, "<p>cannot be read: {}</p>", escape(why));
            }
            Ok(conversations) if conversations.is_empty() => html.push_str("<p>no frames</p>\n"),
            Ok(conversations) => {
                html.push_str("<table><tr><th>protocol</th><th>from</th><th>to</th><th>frames →</th><th>frames ←</th><th>bytes</th><th>first</th><th>last</th></tr>\n");
                for c in conversations {
                    let _ = writeln!(
                        html,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"number\">{}</td><td class=\"number\">{}</td><td class=\"number\">{}</td><td class=\"number\">{}</td><td class=\"number\">{}</td></tr>",
                        escape(&c.protocol),
                        named(&c.from),
                        named(&c.to),
                        c.frames.0,
                        c.frames.1,
                        c.bytes,
                        seconds(c.first),
                        seconds(c.last)
                    );
                }
                html.push_str("</table>\n");
            }
        }
    }
    html.push_str("</section>\n");
}

fn screenshots_section(html: &mut String, screenshots: &[(PathBuf, Vec<u8>)]) {
    if screenshots.is_empty() {
        return;
    }
    html.push_str("<section><h2>Screenshots</h2>\n");
    for (path, png) in screenshots {
        let _ = writeln!(html, "<h3>{}</h3><img alt=\"{0}\" src=\"data:image/png;base64,{}\">", escape(&path.display().to_string()), base64(png));
    }
    html.push_str("</section>\n");
}

fn files_section(html: &mut String, files: &[(PathBuf, u64)]) {
    html.push_str("<section><h2>Files</h2><table><tr><th>file</th><th>bytes</th></tr>\n");
    for (path, size) in files {
        let _ = writeln!(html, "<tr><td><a href=\"{}\">{}</a></td><td class=\"number\">{size}</td></tr>", href(path), escape(&path.display().to_string()));
    }
    html.push_str("</table></section>\n");
}

/// "1.23 s".
fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}


/// A relative link to `path`, every byte but the safe ones percent-encoded.
fn href(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &byte in path.as_os_str().as_bytes() {
        if byte.is_ascii_alphanumeric() || b"/._-~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let word = u32::from(chunk[0]) << 16 | u32::from(*chunk.get(1).unwrap_or(&0)) << 8 | u32::from(*chunk.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= chunk.len() { ALPHABET[(word >> shift & 63) as usize] as char } else { '=' });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failing_line_is_the_scripts_last_frame() {
        let script = Script { text: "start_all()\nserver.succeed('false')\nprint(1)\n".into(), path: PathBuf::from("/nonexistent/t/vmrig.toml"), first_line: 10 };
        let failure = "Traceback (most recent call last):\n  File \"/nonexistent/t/vmrig.toml\", line 11, in <module>\n    server.succeed('false')\nvmrig.TestFailure: server: command `false` failed (exit status 1)\n";
        assert_eq!(failing_line(failure, &script), Some(11));
        assert_eq!(failure_message(failure), "vmrig.TestFailure: server: command `false` failed (exit status 1)");
        // A line outside the script (the file's other part) is not quoted.
        assert_eq!(failing_line(&failure.replace("line 11", "line 3"), &script), None);
        assert_eq!(failing_line("the run was interrupted by SIGTERM", &script), None);
    }

    #[test]
    fn text_links_and_images_are_encoded() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&apos;");
        assert_eq!(href(Path::new("copied/a b#c.txt")), "copied/a%20b%23c.txt");
        assert_eq!([base64(b""), base64(b"f"), base64(b"fo"), base64(b"foo"), base64(b"foob")], ["", "Zg==", "Zm8=", "Zm9v", "Zm9vYg=="]);
    }
}
