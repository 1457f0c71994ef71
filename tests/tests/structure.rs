//! The shape of the code: file-level import cycles. A file imports another when it names an item of
//! the other's module (`use crate::x::..`, `super::y`, `crate::x::f()` in code); a module's own
//! children are not imports of it (it declares them). A cycle of such imports means neither file
//! can be read, tested or changed alone.
//! Cross-crate imports cannot cycle (cargo refuses), so only files within a crate are compared.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose sources are checked.
const CRATES: &[&str] = &["core", "wire", "node", "server", "client", "proto", "tests"];

/// A module path within its crate (`["dataplane", "bridge"]`), for a source file.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    match last.as_str() {
        "mod.rs" | "lib.rs" | "main.rs" => {}
        other => parts.push(other.trim_end_matches(".rs").to_string()),
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The text without comments and string literals (so paths in docs and messages do not count).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal such as '{'; lifetimes ('a) have no closing quote there.
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands a use tree (`a::{b, c::{d as e, *}}`) into its paths.
fn expand(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if tree.is_empty() {
        return;
    }
    // Split at top-level commas.
    let mut depth = 0;
    let mut start = 0;
    let mut parts = vec![];
    for (i, c) in tree.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&tree[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&tree[start..]);
    if parts.len() > 1 {
        for p in parts {
            expand(p, prefix, out);
        }
        return;
    }
    match tree.find('{') {
        Some(open) => {
            let head = tree[..open].trim_end_matches("::");
            let mut p = prefix.to_vec();
            p.extend(head.split("::").filter(|s| !s.is_empty()).map(|s| s.trim().to_string()));
            let close = tree.rfind('}').unwrap();
            expand(&tree[open + 1..close], &p, out);
        }
        None => {
            let tree = tree.split(" as ").next().unwrap_or(tree).trim();
            let mut p = prefix.to_vec();
            p.extend(tree.split("::").map(|s| s.trim().to_string()).filter(|s| s != "*" && s != "self"));
            out.push(p);
        }
    }
}

/// Every path the code names that starts at `crate`, `super` or `self`.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let mut out = vec![];
    // `use` statements, whose trees may spread over lines.
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before_ok = i == 0 || !is_ident(rest[..i].chars().last().unwrap());
        let after = &rest[i + 4..];
        if before_ok {
            if let Some(end) = after.find(';') {
                let tree = &after[..end];
                if tree.starts_with("crate") || tree.starts_with("super") || tree.starts_with("self") {
                    expand(tree, &[], &mut out);
                }
            }
        }
        rest = after;
    }
    // Paths in code: `crate::a::b`, `super::super::c`.
    for anchor in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(i) = rest.find(anchor) {
            let before_ok =
                i == 0 || !is_ident(rest[..i].chars().last().unwrap()) && !rest[..i].ends_with("::");
            let tail = &rest[i..];
            if before_ok {
                let end = tail.find(|c: char| !(is_ident(c) || c == ':')).unwrap_or(tail.len());
                let path: Vec<String> =
                    tail[..end].split("::").filter(|s| !s.is_empty()).map(str::to_string).collect();
                out.push(path);
            }
            rest = &rest[i + anchor.len()..];
        }
    }
    out
}

/// The file a path names an item of: the deepest module file along it.
fn resolve(modules: &BTreeMap<Vec<String>, String>, current: &[String], path: &[String]) -> Option<String> {
    let mut abs: Vec<String> = vec![];
    let mut segs = path.iter().peekable();
    match segs.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segs.next();
        }
        Some("super") | Some("self") => {
            abs = current.to_vec();
            while let Some(s) = segs.peek() {
                match s.as_str() {
                    "super" => {
                        abs.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                segs.next();
            }
        }
        _ => return None,
    }
    let mut best = modules.get(&abs).cloned();
    for s in segs {
        abs.push(s.clone());
        match modules.get(&abs) {
            Some(f) => best = Some(f.clone()),
            None => break,
        }
    }
    best
}

/// Strongly connected components of more than one file.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    // Kosaraju: order by finish time, then walk the reversed graph.
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(n.to_string()) {
            return;
        }
        for m in edges.get(n).into_iter().flatten() {
            visit(m, edges, seen, order);
        }
        order.push(n.to_string());
    }
    let mut seen = BTreeSet::new();
    let mut order = vec![];
    for n in edges.keys() {
        visit(n, edges, &mut seen, &mut order);
    }
    let mut reversed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, bs) in edges {
        for b in bs {
            reversed.entry(b.clone()).or_default().insert(a.clone());
        }
    }
    // In reverse finish order, what reaches each node in the reversed graph is its component.
    let mut comps: Vec<BTreeSet<String>> = vec![];
    let mut done = BTreeSet::new();
    for n in order.iter().rev() {
        if done.contains(n) {
            continue;
        }
        let mut comp = BTreeSet::new();
        let mut stack = vec![n.clone()];
        while let Some(x) = stack.pop() {
            if done.contains(&x) || !comp.insert(x.clone()) {
                continue;
            }
            for y in reversed.get(&x).into_iter().flatten() {
                if !done.contains(y) {
                    stack.push(y.clone());
                }
            }
        }
        done.extend(comp.iter().cloned());
        if comp.len() > 1 {
            comps.push(comp);
        }
    }
    comps
}

fn import_graph(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for krate in CRATES {
        let src = root.join(krate).join("src");
        let mut files = vec![];
        rust_files(&src, &mut files);
        let name = |f: &Path| f.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        // lib.rs and main.rs are both roots; the library's wins the module path.
        let mut modules: BTreeMap<Vec<String>, String> = BTreeMap::new();
        for f in &files {
            let m = module_of(&src, f);
            if f.ends_with("main.rs") && modules.contains_key(&m) {
                continue;
            }
            modules.insert(m, name(f));
        }
        for f in &files {
            let current = module_of(&src, f);
            let me = name(f);
            let code = code_only(&std::fs::read_to_string(f).unwrap());
            for p in paths_in(&code) {
                let Some(target) = resolve(&modules, &current, &p) else { continue };
                let target_mod = modules.iter().find(|(_, v)| **v == target).map(|(k, _)| k.clone()).unwrap();
                // A module's own descendants are declared by it, not imported.
                if target == me || target_mod.starts_with(&current) {
                    continue;
                }
                edges.entry(me.clone()).or_default().insert(target);
            }
        }
    }
    edges
}

#[test]
fn no_file_level_import_cycles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let edges = import_graph(root);
    assert!(edges.len() > 50, "the graph was read ({} files with imports)", edges.len());
    let found = cycles(&edges);
    let show = |c: &BTreeSet<String>| {
        let inner: Vec<String> = c
            .iter()
            .flat_map(|a| {
                edges
                    .get(a)
                    .into_iter()
                    .flatten()
                    .filter(|b| c.contains(*b))
                    .map(move |b| format!("{a} -> {b}"))
            })
            .collect();
        format!("  {}", inner.join("\n  "))
    };
    assert!(
        found.is_empty(),
        "file-level import cycles (move what both sides need into a module that imports neither):\n{}",
        found.iter().map(show).collect::<Vec<_>>().join("\n\n")
    );
}

#[test]
fn the_cycle_finder_finds_a_cycle_and_only_that() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e")] {
        edges.entry(a.into()).or_default().insert(b.into());
    }
    let found = cycles(&edges);
    assert_eq!(found, vec![BTreeSet::from(["a".to_string(), "b".into(), "c".into()])]);
}

#[test]
fn use_trees_expand_to_each_path() {
    let mut out = vec![];
    expand("super::{flows::FlowState, Deliver as D, site::{self, Site}}", &[], &mut out);
    let want: Vec<Vec<&str>> = vec![
        vec!["super", "flows", "FlowState"],
        vec!["super", "Deliver"],
        vec!["super", "site"],
        vec!["super", "site", "Site"],
    ];
    assert_eq!(
        out,
        want.iter().map(|p| p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).collect::<Vec<_>>()
    );
    let code = code_only("// use crate::x;\nlet s = \"crate::y\"; crate::z::f(); use super::w;");
    let paths = paths_in(&code);
    assert!(paths.iter().any(|p| p == &["crate", "z", "f"]), "{paths:?}");
    assert!(paths.iter().any(|p| p == &["super", "w"]), "{paths:?}");
    assert!(!paths.iter().any(|p| p.iter().any(|s| s == "x" || s == "y")), "{paths:?}");
}
