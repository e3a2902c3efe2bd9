//! The library's layout rule, checked from its source: every import between stage folders points
//! down the layers of `docs/ARCHITECTURE.md`, and no files import each other in a circle.
//!
//! Imports are read as text (`crate::…` and `super::…` paths, `use` groups included), outside
//! comments and string literals, and resolved to the file of the deepest module they name. Test
//! code (`tests.rs` files and `#[cfg(test)] mod … { … }` blocks) is left out: tests may reach
//! anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The stages from the bottom up: a folder may import only from folders of a lower layer (and
/// from itself). Folders on one layer do not import each other.
const LAYERS: &[&[&str]] = &[
    &["contract", "system"],
    &["data"],
    &["training", "db", "broker"],
    &["publish"],
    &["bench", "job"],
    &["worker"],
    &["cli"],
];

fn layer_of(stage: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&stage))
}

/// Module path (e.g. `["db", "coord", "lease"]`) → file, for every module of `src/`.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let mut parts: Vec<String> =
                rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
            if parts.last().is_some_and(|p| p == "mod" || p == "lib" || p == "main") {
                parts.pop();
            }
            if parts.last().is_some_and(|p| p == "tests") {
                continue;
            }
            out.insert(parts, path);
        }
    }
    out
}

/// The source with comments, string and char literals blanked, and `#[cfg(test)] mod … { … }`
/// blocks removed.
fn code_of(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').unwrap_or(rest.len());
            i += end;
        } else if rest.starts_with("/*") {
            let end = rest.find("*/").map_or(rest.len(), |e| e + 2);
            out.extend(rest[..end].chars().filter(|c| *c == '\n'));
            i += end;
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].chars().take_while(|c| *c == '#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let start = 2 + hashes;
            let end = rest[start..].find(&close).map_or(rest.len(), |e| start + e + close.len());
            out.extend(rest[..end].chars().filter(|c| *c == '\n'));
            i += end;
        } else if rest.starts_with('"') {
            let mut j = 1;
            while j < rest.len() && rest.as_bytes()[j] != b'"' {
                j += if rest.as_bytes()[j] == b'\\' { 2 } else { 1 };
            }
            out.extend(rest[..j.min(rest.len())].chars().filter(|c| *c == '\n'));
            out.push_str("\"\"");
            i += (j + 1).min(rest.len());
        } else if rest.starts_with("'\\")
            || (rest.len() > 2 && rest.as_bytes()[0] == b'\'' && rest[1..].chars().nth(1) == Some('\''))
        {
            // A char literal ('x' or '\n'); a lifetime ('a) has no closing quote and is kept.
            let end = rest[1..].find('\'').map_or(rest.len(), |e| e + 2);
            out.push_str("' '");
            i += end;
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    strip_test_modules(&out)
}

fn strip_test_modules(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        if trimmed.starts_with("mod ") && !trimmed.split('\n').next().unwrap_or("").trim_end().ends_with(';') {
            let open = after.find('{').unwrap();
            let mut depth = 0;
            let mut end = after.len();
            for (k, c) in after[open..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = open + k + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            rest = &after[end..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Every module path the code names, relative to the crate root, starting from `crate::` or
/// `super::`; a `use` group contributes one path per member.
fn imported_paths(code: &str, own: &[String]) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let bytes = code.as_bytes();
    for (start, _) in code.match_indices("crate::").chain(code.match_indices("super::")) {
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        let (mut base, mut i) = if code[start..].starts_with("crate::") {
            (Vec::new(), start + "crate::".len())
        } else {
            // `super` of a file's module is its parent folder's module; chains of `super::` climb on.
            let mut base = own[..own.len().saturating_sub(1)].to_vec();
            let mut i = start + "super::".len();
            while code[i..].starts_with("super::") {
                base.pop();
                i += "super::".len();
            }
            (base, i)
        };
        loop {
            let ident: String = code[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if ident.is_empty() {
                break;
            }
            base.push(ident.clone());
            i += ident.len();
            if !code[i..].starts_with("::") {
                break;
            }
            i += 2;
        }
        if code[i..].starts_with('{') {
            let close = code[i..].find('}').map_or(code.len(), |e| i + e);
            for member in code[i + 1..close].split(',') {
                let first: String =
                    member.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let mut path = base.clone();
                if !first.is_empty() && first != "self" {
                    path.push(first);
                }
                paths.push(path);
            }
        } else {
            paths.push(base);
        }
    }
    paths
}

/// The deepest module of `path` that has a file.
fn resolve<'a>(path: &[String], modules: &'a BTreeMap<Vec<String>, PathBuf>) -> Option<&'a Vec<String>> {
    (1..=path.len()).rev().find_map(|n| modules.get_key_value(&path[..n]).map(|(k, _)| k))
}

/// File-level import graph of the library (module path → the modules it imports).
fn import_graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    // LAYOUT_SRC points the check at another tree (to see it fail on a planted import).
    let src = std::env::var_os("LAYOUT_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let modules = modules(&src);
    let mut graph = BTreeMap::new();
    for (module, file) in &modules {
        if module.is_empty() {
            continue; // lib.rs / main.rs: the crate root declares every stage
        }
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let is_folder_module = file.file_name().is_some_and(|n| n == "mod.rs");
        // `super::` names the parent of the file's module, for `a/b.rs` and `a/b/mod.rs` alike.
        let own = module.clone();
        let edges: BTreeSet<Vec<String>> = imported_paths(&code, &own)
            .iter()
            .filter_map(|p| resolve(p, &modules))
            .filter(|target| *target != module && !target.is_empty())
            // A folder's mod.rs declares and re-exports its children: that is ownership, not a use.
            .filter(|target| !(is_folder_module && target.starts_with(module)))
            .cloned()
            .collect();
        graph.insert(module.clone(), edges);
    }
    graph
}

fn name(m: &[String]) -> String {
    m.join("::")
}

#[test]
fn every_import_between_stages_points_down_the_layers() {
    let graph = import_graph();
    let mut upward = Vec::new();
    for (from, targets) in &graph {
        let from_layer = layer_of(&from[0]).unwrap_or_else(|| panic!("stage `{}` is in no layer of LAYERS", from[0]));
        for to in targets {
            if to[0] == from[0] {
                continue;
            }
            let to_layer = layer_of(&to[0]).unwrap_or_else(|| panic!("stage `{}` is in no layer of LAYERS", to[0]));
            if to_layer >= from_layer {
                upward.push(format!("{} -> {} (layer {from_layer} -> {to_layer})", name(from), name(to)));
            }
        }
    }
    assert!(upward.is_empty(), "imports that do not point down:\n{}", upward.join("\n"));
    // The reader sees real edges: the worker reaches the job, the job the trainer.
    assert!(graph.values().flatten().any(|t| t[0] == "job"), "no import of job was found: the reader is broken");
    assert!(graph.iter().any(|(f, t)| f[0] == "job" && t.iter().any(|t| t[0] == "training")));
}

#[test]
fn no_files_import_each_other_in_a_circle() {
    let graph = import_graph();
    let circles: Vec<String> = strongly_connected(&graph)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| {
            let ties: Vec<String> = c
                .iter()
                .map(|m| {
                    let into: Vec<String> = graph[m].iter().filter(|t| c.contains(*t)).map(|t| name(t)).collect();
                    format!("  {} -> {}", name(m), into.join(", "))
                })
                .collect();
            ties.join("\n")
        })
        .collect();
    assert!(circles.is_empty(), "files that import each other in a circle:\n{}", circles.join("\n--\n"));
    assert!(graph.len() > 50, "only {} modules were read", graph.len());
}

/// The strongly connected components of `graph` (Kosaraju): a component of more than one file is
/// a circle of imports.
fn strongly_connected(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<BTreeSet<Vec<String>>> {
    fn finish_order<'a>(
        m: &'a Vec<String>,
        graph: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        seen: &mut BTreeSet<&'a Vec<String>>,
        order: &mut Vec<&'a Vec<String>>,
    ) {
        if !seen.insert(m) {
            return;
        }
        for t in graph[m].iter().filter(|t| graph.contains_key(*t)) {
            finish_order(t, graph, seen, order);
        }
        order.push(m);
    }
    let (mut seen, mut order) = (BTreeSet::new(), Vec::new());
    for m in graph.keys() {
        finish_order(m, graph, &mut seen, &mut order);
    }
    let mut reverse: BTreeMap<&Vec<String>, Vec<&Vec<String>>> = BTreeMap::new();
    for (from, targets) in graph {
        for t in targets.iter().filter(|t| graph.contains_key(*t)) {
            reverse.entry(t).or_default().push(from);
        }
    }
    let mut assigned = BTreeSet::new();
    let mut components = Vec::new();
    for m in order.into_iter().rev() {
        if assigned.contains(m) {
            continue;
        }
        let (mut component, mut stack) = (BTreeSet::new(), vec![m]);
        while let Some(x) = stack.pop() {
            if assigned.insert(x) {
                component.insert(x.clone());
                stack.extend(reverse.get(x).into_iter().flatten().copied());
            }
        }
        components.push(component);
    }
    components
}

#[test]
fn the_reader_sees_groups_supers_and_skips_comments_and_strings() {
    let code = code_of(
        "use crate::db::{self, ledger};\nuse super::keys::x;\n// crate::cli::gone\nlet s = \"crate::worker::no\";\n#[cfg(test)]\nmod tests {\n    use crate::job::x;\n}\n",
    );
    let own = vec!["training".to_string(), "pairs".to_string(), "index".to_string()];
    let paths = imported_paths(&code, &own);
    let names: Vec<String> = paths.iter().map(|p| name(p)).collect();
    assert_eq!(names, ["db", "db::ledger", "training::pairs::keys::x"]);
}
