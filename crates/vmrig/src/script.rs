//! The test script, checked before anything boots: Python syntax, and every
//! global name it uses that neither the script, Python, nor vmrig defines,
//! which is most often a misspelt node. Errors point at the script's own
//! line in `vmrig.toml` (or in its `script_file`).

use std::io::Write;
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::client::{driver_globals, PYTHON_CLIENT};
use crate::host::{HostError, PYTHON};
use crate::spec::{nearest, Diagnostic, ScriptContext, SourceFile};

/// Reads `{"script", "machines", "client"}` on stdin and prints, as JSON,
/// the script's syntax error, or the global names it reads without
/// defining them and the attributes it uses on a machine (a variable named
/// after a node, a loop variable over `machines`, a parameter annotated
/// `Machine`) that the client's `Machine` does not have.
const LINT_PY: &str = r#"
import ast, builtins, json, sys
given = json.load(sys.stdin)
try:
    tree = ast.parse(given["script"])
except SyntaxError as error:
    print(json.dumps({"syntax": {"line": error.lineno or 1, "column": error.offset or 1, "message": error.msg}}))
    sys.exit(0)
client = {}
exec(compile(given["client"], "vmrig", "exec"), client)
machine_names = set(dir(client["Machine"])) | set(client["MACHINE_ATTRIBUTES"])
machine_names = sorted(n for n in machine_names if not n.startswith("_"))
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
# Names that hold a machine without being named after one: loop variables
# over `machines` and parameters annotated `Machine`.
machine_vars = set()
for node in ast.walk(tree):
    if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name):
        source = node.iter
        if (isinstance(source, ast.Name) and source.id == "machines") or (isinstance(source, ast.Attribute) and source.attr == "machines"):
            machine_vars.add(node.target.id)
    elif isinstance(node, ast.arg) and isinstance(node.annotation, ast.Name) and node.annotation.id == "Machine":
        machine_vars.add(node.arg)
free = {}
attributes = []
for node in ast.walk(tree):
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in defined:
        place = (node.lineno, node.col_offset + 1)
        if node.id not in free or place < free[node.id]:
            free[node.id] = place
    elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and ((node.value.id in given["machines"] and node.value.id not in defined) or node.value.id in machine_vars)
          and node.attr not in machine_names and node.end_lineno == node.lineno):
        column = node.end_col_offset - len(node.attr) + 1
        attributes.append({"name": node.attr, "machine": node.value.id, "line": node.lineno, "column": column})
print(json.dumps({
    "free": sorted([{"name": n, "line": l, "column": c} for n, (l, c) in free.items()], key=lambda f: (f["line"], f["column"])),
    "attributes": sorted(attributes, key=lambda a: (a["line"], a["column"])),
    "machine_names": machine_names,
}))
"#;

#[derive(Deserialize)]
struct LintOutput {
    syntax: Option<Located>,
    #[serde(default)]
    free: Vec<Located>,
    /// Unknown attributes of machines.
    #[serde(default)]
    attributes: Vec<Located>,
    /// Every attribute a machine has.
    #[serde(default)]
    machine_names: Vec<String>,
}

#[derive(Deserialize)]
struct Located {
    line: usize,
    column: usize,
    #[serde(default)]
    message: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    machine: String,
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

/// Every problem in a script that can be found without running it.
pub fn lint(context: &ScriptContext) -> Result<Vec<Diagnostic>, ScriptError> {
    let script = &context.script;
    let nodes = &context.nodes;
    let mut machines = nodes.clone();
    if nodes.len() == 1 {
        machines.push("machine".into());
    }
    let python = PYTHON.require()?;
    let mut child = Command::new(python)
        .args(["-c", LINT_PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ScriptError::Python)?;
    let given = serde_json::json!({ "script": script.text, "machines": machines, "client": PYTHON_CLIENT });
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(given.to_string().as_bytes())
        .map_err(ScriptError::Python)?;
    let output = child.wait_with_output().map_err(ScriptError::Python)?;
    let parsed: LintOutput = serde_json::from_slice(&output.stdout).map_err(|e| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        ScriptError::Python(std::io::Error::other(format!("{e}; python3 said: {stderr}")))
    })?;

    let file = SourceFile {
        path: script.path.clone(),
        text: std::fs::read_to_string(&script.path).unwrap_or_default(),
    };
    let at = |found: &Located, message: String| {
        let offset = file.line_offset(script.first_line + found.line - 1);
        let column_offset: usize = file.text[offset..]
            .chars()
            .take(found.column.saturating_sub(1))
            .map(char::len_utf8)
            .sum();
        let mut diagnostic = Diagnostic::new(&file, offset + column_offset..offset + column_offset, message);
        diagnostic.width = found.name.chars().count().max(1);
        diagnostic
    };

    if let Some(syntax) = &parsed.syntax {
        return Ok(vec![at(syntax, format!("the test script is not valid Python: {}", syntax.message))]);
    }
    let mut known: Vec<&str> = machines.iter().map(String::as_str).collect();
    known.extend(driver_globals());
    let vlan_names: Vec<String> = context.vlans.iter().flatten().map(|vlan| format!("vlan{vlan}")).collect();
    known.extend(vlan_names.iter().map(String::as_str));
    // Without the definition's VLANs, any `vlanN` may be one of them.
    let unsure_vlan = |name: &str| context.vlans.is_none() && name.strip_prefix("vlan").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let unknown_names = parsed.free.iter().filter(|f| !known.contains(&f.name.as_str()) && !unsure_vlan(&f.name)).map(|f| match nearest(&f.name, nodes.iter().map(String::as_str)) {
        Some(node) => at(f, format!("unknown node `{}` in the test script", f.name)).with_help(format!("did you mean `{node}`?")),
        None => {
            let help = match nearest(&f.name, known.iter().copied()) {
                Some(near) => format!("did you mean `{near}`?"),
                None => format!("the nodes are {}", nodes.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")),
            };
            at(f, format!("the test script uses `{}`, which nothing defines", f.name)).with_help(help)
        }
    });
    let unknown_attributes = parsed.attributes.iter().map(|a| {
        let diagnostic = at(a, format!("machine `{}` has no method or attribute `{}`", a.machine, a.name));
        match nearest(&a.name, parsed.machine_names.iter().map(String::as_str)) {
            Some(near) => diagnostic.with_help(format!("did you mean `{near}`?")),
            None => diagnostic,
        }
    });
    let mut problems: Vec<Diagnostic> = unknown_names.chain(unknown_attributes).collect();
    problems.sort_by_key(|d| (d.line, d.column));
    Ok(problems)
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
