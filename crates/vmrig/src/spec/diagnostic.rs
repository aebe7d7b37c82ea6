//! Located error messages for test definitions: what went wrong, where (file,
//! line, column, the offending line itself) and, when we can tell, what the
//! user probably meant. Rendering is plain text so that it reads the same in a
//! terminal, a CI log and a snapshot test.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A file whose contents diagnostics point into.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path shown to the user.
    pub path: PathBuf,
    /// The whole text of the file.
    pub text: String,
}

impl SourceFile {
    /// Reads `path`; the path is kept as given, for messages.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            text: std::fs::read_to_string(path)?,
        })
    }

    /// 1-based line and column of a byte offset (columns count characters).
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    /// Byte offset where 1-based `line` starts, or the end of the text.
    pub fn line_offset(&self, line: usize) -> usize {
        if line <= 1 {
            return 0;
        }
        self.text
            .match_indices('\n')
            .nth(line - 2)
            .map_or(self.text.len(), |(i, _)| i + 1)
    }
}

/// One problem found in a test definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// What is wrong.
    pub message: String,
    /// The file it is in.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The text of that line, for the snippet.
    pub source_line: String,
    /// How many characters of the line to underline (at least one).
    pub width: usize,
    /// A suggestion, such as the nearest valid key.
    pub help: Option<String>,
}

impl Diagnostic {
    /// A diagnostic covering `span` (byte offsets) of `file`.
    pub fn new(file: &SourceFile, span: Range<usize>, message: impl Into<String>) -> Self {
        let (line, column) = file.line_col(span.start);
        let start = file.line_offset(line);
        let source_line = file.text[start..]
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let rest_of_line = source_line.chars().count().saturating_sub(column - 1);
        let spanned = file.text[span.start.min(file.text.len())..span.end.min(file.text.len())]
            .chars()
            .take_while(|c| *c != '\n')
            .count();
        Self {
            message: message.into(),
            path: file.path.clone(),
            line,
            column,
            source_line,
            width: spanned.min(rest_of_line).max(1),
            help: None,
        }
    }

    /// Adds a suggestion.
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let number = self.line.to_string();
        let pad = " ".repeat(number.len());
        writeln!(f, "error: {}", self.message)?;
        writeln!(
            f,
            "{pad}--> {}:{}:{}",
            self.path.display(),
            self.line,
            self.column
        )?;
        writeln!(f, "{pad} |")?;
        writeln!(f, "{number} | {}", self.source_line)?;
        let indent: String = self
            .source_line
            .chars()
            .take(self.column - 1)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        write!(f, "{pad} | {indent}{}", "^".repeat(self.width))?;
        if let Some(help) = &self.help {
            write!(f, "\n{pad} = help: {help}")?;
        }
        Ok(())
    }
}

/// The nearest of `candidates` to `word`, if one is close enough to be a
/// plausible typo.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(distance, c)| *distance <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> SourceFile {
        SourceFile {
            path: "t/vmrig.toml".into(),
            text: text.into(),
        }
    }

    #[test]
    fn locates_lines_and_columns() {
        let f = file("a = 1\nbee = 2\n");
        assert_eq!(f.line_col(0), (1, 1));
        assert_eq!(f.line_col(6), (2, 1));
        assert_eq!(f.line_col(8), (2, 3));
        assert_eq!(f.line_offset(2), 6);
    }

    #[test]
    fn renders_snippet_with_caret_and_help() {
        let f = file("name = \"x\"\npakages = []\n");
        let d = Diagnostic::new(&f, 11..18, "unknown key `pakages`").with_help("did you mean `packages`?");
        assert_eq!(
            d.to_string(),
            "error: unknown key `pakages`\n --> t/vmrig.toml:2:1\n  |\n2 | pakages = []\n  | ^^^^^^^\n  = help: did you mean `packages`?"
        );
    }

    #[test]
    fn suggests_only_close_words() {
        let keys = ["packages", "memory", "services"];
        assert_eq!(nearest("pakages", keys), Some("packages"));
        assert_eq!(nearest("servces", keys), Some("services"));
        assert_eq!(nearest("firewall", keys), None);
    }
}
