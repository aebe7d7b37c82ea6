//! The test script, checked before anything boots: Python syntax, and every
//! global name it uses that neither the script, Python, nor vmrig defines,
//! which is most often a misspelt node. Errors point at the script's own
//! line in `vmrig.toml` (or in its `script_file`).

use std::io::Write;
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::host::{HostError, PYTHON};
use crate::spec::{nearest, Diagnostic, SourceFile, TestSpec};

/// The Python client every script imports (see `python/vmrig`), embedded.
pub const PYTHON_CLIENT: &str = include_str!("../../../python/vmrig/__init__.py");

/// The names the driver gives every script besides its nodes, as the
/// Python client lists them in its `DRIVER_GLOBALS`: the client is the one
/// place they are written.
pub fn driver_globals() -> Vec<&'static str> {
    let list = PYTHON_CLIENT
        .split_once("DRIVER_GLOBALS = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map_or("", |(list, _)| list);
    list.split(',')
        .map(|item| item.trim().trim_matches('"'))
        .filter(|name| !name.is_empty())
        .collect()
}

/// Reads a script on stdin and prints, as JSON, its syntax error or the
/// global names it reads without defining them.
const FREE_NAMES_PY: &str = r#"
import ast, builtins, json, sys
source = sys.stdin.read()
try:
    tree = ast.parse(source)
except SyntaxError as error:
    print(json.dumps({"syntax": {"line": error.lineno or 1, "column": error.offset or 1, "message": error.msg}}))
    sys.exit(0)
defined = set(dir(builtins))
for node in ast.walk(tree):
    if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
        defined.add(node.id)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        defined.add(node.name)
    elif isinstance(node, ast.alias):
        defined.add((node.asname or node.name).split(".")[0])
    elif isinstance(node, ast.arg):
        defined.add(node.arg)
    elif isinstance(node, ast.ExceptHandler) and node.name:
        defined.add(node.name)
    elif type(node).__name__ in ("MatchAs", "MatchStar") and node.name:
        defined.add(node.name)
free = {}
for node in ast.walk(tree):
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in defined:
        place = (node.lineno, node.col_offset + 1)
        if node.id not in free or place < free[node.id]:
            free[node.id] = place
print(json.dumps({"free": sorted([{"name": n, "line": l, "column": c} for n, (l, c) in free.items()], key=lambda f: (f["line"], f["column"]))}))
"#;

#[derive(Deserialize)]
struct LintOutput {
    syntax: Option<Located>,
    #[serde(default)]
    free: Vec<Located>,
}

#[derive(Deserialize)]
struct Located {
    line: usize,
    column: usize,
    #[serde(default)]
    message: String,
    #[serde(default)]
    name: String,
}

/// Errors of the script layer.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// python3 is missing.
    #[error(transparent)]
    Host(#[from] HostError),
    /// python3 could not be run or answered nonsense.
    #[error("cannot check the test script with python3")]
    Python(#[source] std::io::Error),
}

/// Every problem in `spec`'s script that can be found without running it.
pub fn lint(spec: &TestSpec) -> Result<Vec<Diagnostic>, ScriptError> {
    let python = PYTHON.require()?;
    let mut child = Command::new(python)
        .args(["-c", FREE_NAMES_PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ScriptError::Python)?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(spec.script.text.as_bytes())
        .map_err(ScriptError::Python)?;
    let output = child.wait_with_output().map_err(ScriptError::Python)?;
    let parsed: LintOutput = serde_json::from_slice(&output.stdout).map_err(|e| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        ScriptError::Python(std::io::Error::other(format!("{e}; python3 said: {stderr}")))
    })?;

    let file = SourceFile {
        path: spec.script.path.clone(),
        text: std::fs::read_to_string(&spec.script.path).unwrap_or_default(),
    };
    let at = |found: &Located, message: String| {
        let offset = file.line_offset(spec.script.first_line + found.line - 1);
        let column_offset: usize = file.text[offset..]
            .chars()
            .take(found.column.saturating_sub(1))
            .map(char::len_utf8)
            .sum();
        Diagnostic::new(&file, offset + column_offset..offset + column_offset, message)
    };

    if let Some(syntax) = &parsed.syntax {
        return Ok(vec![at(syntax, format!("the test script is not valid Python: {}", syntax.message))]);
    }
    let nodes: Vec<String> = spec.nodes.values().map(|n| n.python_name()).collect();
    let mut known: Vec<&str> = nodes.iter().map(String::as_str).collect();
    known.extend(driver_globals());
    if spec.nodes.len() == 1 {
        known.push("machine");
    }
    Ok(parsed
        .free
        .iter()
        .filter(|f| !known.contains(&f.name.as_str()))
        .map(|f| {
            let width = f.name.chars().count();
            let mut diagnostic = at(f, String::new());
            diagnostic.width = width;
            match nearest(&f.name, nodes.iter().map(String::as_str)) {
                Some(node) => {
                    diagnostic.message = format!("unknown node `{}` in the test script", f.name);
                    diagnostic.with_help(format!("did you mean `{node}`?"))
                }
                None => {
                    diagnostic.message = format!("the test script uses `{}`, which nothing defines", f.name);
                    let help = match nearest(&f.name, known.iter().copied()) {
                        Some(near) => format!("did you mean `{near}`?"),
                        None => format!("the nodes are {}", nodes.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")),
                    };
                    diagnostic.with_help(help)
                }
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lint_knows_exactly_the_globals_the_python_client_defines() {
        assert!(driver_globals().contains(&"start_all"));
        let python_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../python");
        let output = Command::new("python3")
            .args(["-c", "import sys; sys.path.insert(0, sys.argv[1]); import vmrig; print(' '.join(vmrig.DRIVER_GLOBALS))", python_dir])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let client: Vec<String> = String::from_utf8_lossy(&output.stdout).split_whitespace().map(str::to_string).collect();
        assert_eq!(client, driver_globals());
    }
}
