//! The Python client every test script imports (`python/vmrig`), embedded
//! in the binary: its text, and the globals it gives a script besides the
//! nodes, which the definition's node names must leave alone.

/// The client's source.
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

